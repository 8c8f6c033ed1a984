"""Listing a thread's keys: what KV holds now, plus what only PostgreSQL still has.

KV answers first and is authoritative for every key it has a message for (a value, or a delete
marker that PostgreSQL may not have seen yet). Keys whose KV entry expired (the bucket's TTL)
are found in ``agents.state`` and read through the manager, which serves the newest
acknowledged change (durability log first, then the row) — so a listing sees a checkpoint the
moment ``aput`` returned, and still sees it after its KV copy expired.
"""

from __future__ import annotations

import uuid
from typing import TYPE_CHECKING, Any

from nats.js import JetStreamContext
from nats.js.kv import KeyValue

from ..._nats import DELETE_OPS, newest_entries
from ..._pg import pg_errors
from ...codec import loads
from ...kv import nats_errors

if TYPE_CHECKING:
    from ...hybrid import HybridStateManager

#: keys MsstoreSaver lists are ``<agent>.<kind>.…``: the agent is the first token
_SQL_KEYS = """
SELECT agent_id, key FROM agents.state WHERE agent_id = $1 AND starts_with(key, $2)
"""
#: a bucket-wide search for checkpoint documents (``alist(None)``, ``adelete_for_runs``)
_SQL_DOCS = """
SELECT agent_id, key FROM agents.state
WHERE starts_with(key, 'cp.') AND value @> $1::jsonb
"""

Found = dict[tuple[uuid.UUID, str], Any]


async def kv_entries(js: JetStreamContext, kv: KeyValue, bucket: str,
                     pattern: str) -> dict[str, bytes | None]:
    """Every key of ``kv`` matching the subject ``pattern``: its value, None if deleted."""
    with nats_errors(f"list KV keys {pattern!r}"):
        entries = await newest_entries(js, kv, bucket, pattern)
    return {entry.key: None if entry.operation in DELETE_OPS else (entry.value or b"null")
            for entry in entries}


async def scan(hsm: HybridStateManager, agent: uuid.UUID | None, prefix: str,
               contains: dict[str, Any] | None = None) -> Found:
    """``{(agent, key): value}`` for the live keys starting with ``prefix``.

    ``agent`` None searches the whole bucket (checkpoint documents only, matched in
    PostgreSQL by ``contains``, a JSONB containment such as ``{"bucket": …}``).
    """
    pattern = f"{'*' if agent is None else agent}.{prefix}>"
    found: Found = {}
    seen: set[tuple[uuid.UUID, str]] = set()
    for kv_key, data in (await kv_entries(hsm.ms.js, hsm.engine.kv, hsm.engine.bucket,
                                             pattern)).items():
        agent_text, key = kv_key.split(".", 1)
        where = (uuid.UUID(agent_text), key)
        seen.add(where)
        if data is not None:
            value = loads(data)
            if contains is None or all(value.get(k) == v for k, v in contains.items()):
                found[where] = value
    with pg_errors(f"list keys {prefix!r}"):
        if agent is None:
            rows = await hsm.ms.pool.fetch(_SQL_DOCS, contains or {})
        else:
            rows = await hsm.ms.pool.fetch(_SQL_KEYS, agent, prefix)
    for row in rows:
        where = (row["agent_id"], row["key"])
        if where in seen or not where[1].startswith(prefix):
            continue
        value = await hsm.read_state(where[0], where[1], default=None)  # KV expired
        if value is not None:
            found[where] = value
    return found


__all__ = ["Found", "kv_entries", "scan"]
