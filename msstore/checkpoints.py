"""Checkpoints: an agent's live KV state snapshotted into ``agents.checkpoints``, and back.

::

    checkpoint:  KV watch <agent>.>  ──values, revisions──▶  INSERT agents.checkpoints
                 (live values; kv_revision = the highest revision, delete markers included)

    restore:     agents.checkpoints ──snapshot──▶ KV: put each key again (new revisions),
                                                      delete markers for the other keys
                                                  SQL: one transaction: merge those revisions,
                                                      delete every row not in the snapshot

The functions here do the I/O of one step each; :class:`msstore.lifecycle.StateLifecycleManager`
runs them with the agent ACTIVE and its gate held exclusively, so no write of the agent runs in
between: a snapshot is exactly the agent's state as of its ``kv_revision``.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, cast

import asyncpg
from nats.aio.client import Client
from nats.js import JetStreamContext
from nats.js.kv import KeyValue

from . import _nats
from ._pg import pg_errors
from ._publish import publish_delete, publisher
from .codec import dumps, loads
from .errors import NotFoundError
from .keys import encode_token, join_key, split_key
from .kv import nats_errors
from .merge import StateChange, merge_changes


@dataclass(frozen=True, slots=True)
class Snapshot:
    """The agent's live values and every key's revision (delete markers included) in KV."""

    values: Mapping[str, bytes]
    revisions: Mapping[str, int]

    @property
    def kv_revision(self) -> int:
        return max(self.revisions.values(), default=0)


@dataclass(frozen=True, slots=True)
class RestoreResult:
    """What ``restore`` did: keys written back, keys removed, the checkpoint's KV revision."""

    checkpoint_id: uuid.UUID
    kv_revision: int
    written: int
    removed: int


async def snapshot(js: JetStreamContext, kv: KeyValue, bucket: str, agent: uuid.UUID, *,
                   nats_timeout: float) -> Snapshot:
    """The latest entry of each of the agent's keys, in one pass (delete markers included)."""
    values: dict[str, bytes] = {}
    revisions: dict[str, int] = {}
    with nats_errors(f"snapshot agent {agent}"):
        entries = await _nats.newest_entries(js, kv, bucket, f"{encode_token(str(agent))}.>",
                                             entry_timeout=nats_timeout)
    for entry in entries:
        key = split_key(entry.key, 1)[1]
        revisions[key] = int(entry.revision or 0)
        if entry.operation in _nats.DELETE_OPS:
            values.pop(key, None)
        else:
            values[key] = entry.value or b"null"
    return Snapshot(values, revisions)


async def save(pool: asyncpg.Pool, agent: uuid.UUID, snap: Snapshot, *,
               sql_timeout: float) -> uuid.UUID:
    """Insert ``snap`` into ``agents.checkpoints``; return the new checkpoint's id."""
    with pg_errors(f"checkpoint agent {agent}"):
        checkpoint_id: uuid.UUID = await pool.fetchval(
            "INSERT INTO agents.checkpoints (agent_id, state_snapshot, kv_revision) "
            "VALUES ($1, $2::jsonb, $3) RETURNING checkpoint_id",
            agent, {k: loads(v) for k, v in snap.values.items()}, snap.kv_revision,
            timeout=sql_timeout)
    return checkpoint_id


async def load(pool: asyncpg.Pool, agent: uuid.UUID, checkpoint_id: uuid.UUID, *,
               sql_timeout: float) -> tuple[dict[str, bytes], int]:
    """The checkpoint's values (codec bytes) and its KV revision; NotFoundError if none."""
    with pg_errors(f"read checkpoint {checkpoint_id}"):
        row = await pool.fetchrow(
            "SELECT state_snapshot, kv_revision FROM agents.checkpoints "
            "WHERE agent_id = $1 AND checkpoint_id = $2", agent, checkpoint_id,
            timeout=sql_timeout)
    if row is None:
        raise NotFoundError(f"agent {agent} has no checkpoint {checkpoint_id}; list them in "
                            "agents.checkpoints")
    snap: dict[str, Any] = row["state_snapshot"]
    return {k: dumps(v, max_bytes=1 << 30) for k, v in snap.items()}, int(row["kv_revision"] or 0)


async def write_back(nc: Client, prefix: str, agent: uuid.UUID,
                     values: Mapping[str, bytes], removed: Sequence[str]) -> list[StateChange]:
    """Put ``values`` into KV again and delete ``removed`` (subjects under ``prefix``); return
    the changes with their new revisions."""
    with nats_errors(f"restore agent {agent} into KV"):
        pub = publisher(nc)
        put_revs = await asyncio.gather(*(
            pub.publish(prefix + join_key(str(agent), k), d) for k, d in values.items()))
        del_revs = await asyncio.gather(*(
            publish_delete(nc, prefix + join_key(str(agent), k)) for k in removed))
    changes = [StateChange(agent, k, int(r), d)
               for (k, d), r in zip(values.items(), put_revs, strict=True)]
    changes += [StateChange(agent, k, int(r), None) for k, r in zip(removed, del_revs, strict=True)]
    return changes


async def restore_sql(pool: asyncpg.Pool, agent: uuid.UUID, changes: Sequence[StateChange],
                      keep: Sequence[str], *, epoch: int, sql_timeout: float) -> None:
    """One transaction: merge ``changes`` (of ``epoch``), delete every row not in ``keep``."""
    with pg_errors(f"restore agent {agent} into PostgreSQL"):
        async with pool.acquire(timeout=sql_timeout) as conn, conn.transaction():
            await merge_changes(cast(asyncpg.Connection, conn), changes, epoch=epoch,
                                statement_timeout=sql_timeout)
            # rows KV never held (e.g. dropped by max age) are not in the snapshot either
            await conn.execute(
                "DELETE FROM agents.state WHERE agent_id = $1 AND NOT (key = ANY($2::text[]))",
                agent, list(keep), timeout=sql_timeout)


__all__ = ["RestoreResult", "Snapshot", "load", "restore_sql", "save", "snapshot", "write_back"]
