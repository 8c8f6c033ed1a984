"""The SQL end of write-behind: coalesce a batch, then write it with one guarded statement.

::

    [StateChange(agent, key, revision, data|None), …]   from a flusher, any order
        │ coalesce: highest revision per (agent, key)
        ▼
    MERGE_SQL($agents[], $keys[], $values[], $versions[], $epoch)      one statement
        ├─ delete rows older than a delete, leave a tombstone (epoch, version)
        ├─ clear tombstones older than an upsert
        └─ upsert, unless the row or a tombstone is newer in the same epoch

A version is the KV revision: the sequence number of one *incarnation* of the bucket's
stream. ``epoch`` names that incarnation (migration 006), so two changes are ordered by version
only when their epochs agree; a change from another incarnation (a recreated bucket) wins.
Epoch 0 is "unknown" (rows from before migration 006) and compares by version.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import random
import time
import uuid
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Final, cast

import asyncpg

from ._extras import needs_extra
from .codec import storable
from .errors import InvalidValueError

if TYPE_CHECKING:
    import pandas as pd

log = logging.getLogger("msstore.merge")


@dataclass(frozen=True, slots=True)
class StateChange:
    """One acknowledged KV change on its way to ``agents.state``; ``data=None`` is a delete."""

    agent_id: uuid.UUID
    key: str
    revision: int
    data: bytes | None


@dataclass(frozen=True, slots=True)
class MergeResult:
    """What one merge statement did; ``skipped`` rows were stale or had nothing to delete."""

    rows: int
    upserted: int
    deleted: int

    @property
    def skipped(self) -> int:
        return self.rows - self.upserted - self.deleted


def coalesce(changes: Iterable[StateChange]) -> list[StateChange]:
    """Keep the highest revision per (agent, key): a batch must not hold a key twice.

    Grouped per agent and keyed by the key string, not by (agent, key) tuples: 10,000 live
    tuples are 10,000 objects for Python's cyclic GC to track, and the collections they
    trigger cost more than the coalescing itself.
    """
    by_agent: dict[uuid.UUID, dict[str, StateChange]] = {}
    for change in changes:
        latest = by_agent.get(change.agent_id)
        if latest is None:
            latest = by_agent[change.agent_id] = {}
        seen = latest.get(change.key)
        if seen is None or seen.revision < change.revision:
            latest[change.key] = change
    return [change for latest in by_agent.values() for change in latest.values()]


#: The reads of a hydration, values as PostgreSQL's JSON text (cheaper to receive than the
#: JSONB codec's Python objects); :func:`msstore.codec.reencode` turns it into codec bytes.
READ_VALUE_TEXT: Final = "SELECT value::text FROM agents.state WHERE agent_id = $1 AND key = $2"
LOAD_AGENT_TEXT: Final = "SELECT key, value::text FROM agents.state WHERE agent_id = $1"


#: "``old`` is older than ``new``": by version within one epoch (or where either is unknown,
#: 0), and always when the epochs differ — a recreated bucket's sequences start again at 1.
_OLDER: Final = ("({old}.version < {new}.version OR ({old}.epoch <> {new}.epoch "
                 "AND {old}.epoch <> 0 AND {new}.epoch <> 0))")


def _older(old: str, new: str) -> str:
    return _OLDER.format(old=old, new=new)


#: The whole batch in one statement: arrays in, guarded delete and guarded upsert out. A delete
#: leaves a tombstone with its (epoch, version), so an older upsert that arrives later (a
#: redelivery, another process' batch) cannot re-create the row; a newer upsert clears it.
MERGE_SQL: Final = f"""
WITH batch AS (
    SELECT b.*, $5::bigint AS epoch
    FROM unnest($1::uuid[], $2::text[], $3::text[], $4::bigint[])
        AS b(agent_id, key, value, version)
), deleted AS (
    DELETE FROM agents.state AS s
    USING batch
    WHERE batch.value IS NULL
      AND s.agent_id = batch.agent_id AND s.key = batch.key
      AND {_older("s", "batch")}
    RETURNING 1
), tombstoned AS (
    INSERT INTO agents.state_tombstones AS t (agent_id, key, version, epoch)
    SELECT agent_id, key, version, epoch FROM batch WHERE value IS NULL
    ON CONFLICT (agent_id, key) DO UPDATE
        SET version = excluded.version, epoch = excluded.epoch, deleted_at = now()
        WHERE {_older("t", "excluded")}
), revived AS (
    DELETE FROM agents.state_tombstones AS t
    USING batch
    WHERE batch.value IS NOT NULL
      AND t.agent_id = batch.agent_id AND t.key = batch.key
      AND {_older("t", "batch")}
), upserted AS (
    INSERT INTO agents.state AS s (agent_id, key, value, version, epoch, updated_at)
    SELECT agent_id, key, value::jsonb, version, epoch, now() FROM batch
    WHERE value IS NOT NULL
      AND NOT EXISTS (SELECT 1 FROM agents.state_tombstones AS t
                      WHERE t.agent_id = batch.agent_id AND t.key = batch.key
                        AND NOT {_older("t", "batch")}
                        AND t.version <> batch.version)
    ON CONFLICT (agent_id, key) DO UPDATE
        SET value = excluded.value, version = excluded.version, epoch = excluded.epoch,
            updated_at = excluded.updated_at
        WHERE {_older("s", "excluded")}
    RETURNING 1
)
SELECT (SELECT count(*) FROM upserted) AS upserted, (SELECT count(*) FROM deleted) AS deleted
"""


async def merge_changes(db: asyncpg.Pool | asyncpg.Connection, changes: Sequence[StateChange],
                        *, epoch: int = 0, statement_timeout: float | None = None,
                        coalesced: bool = False) -> MergeResult:
    """Write a coalesced batch from one stream incarnation (``epoch``) with one SQL statement.

    Values travel as the JSON text KV holds (cast to jsonb server-side), so nothing is
    re-encoded. A batch holding a key twice is refused (call :func:`coalesce`), unless the
    caller says it is ``coalesced`` already (the flushers: the check costs a second pass).
    """
    if not changes:
        return MergeResult(0, 0, 0)
    if not coalesced and len(coalesce(changes)) != len(changes):
        raise InvalidValueError(
            "a merge batch must hold each (agent_id, key) once; coalesce() it first")
    row = await db.fetchrow(
        MERGE_SQL,
        [c.agent_id for c in changes],
        [c.key for c in changes],
        [None if c.data is None else c.data.decode() for c in changes],
        [c.revision for c in changes],
        epoch,
        timeout=statement_timeout,
    )
    assert row is not None
    return MergeResult(len(changes), int(row["upserted"]), int(row["deleted"]))


def merge_lock_id(name: str) -> int:
    """The advisory-lock id that serialises the merges of one stream across processes."""
    digest = hashlib.blake2b(f"msstore-merge:{name}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big", signed=True)


async def merge_serialised(pool: asyncpg.Pool, changes: Sequence[StateChange], lock_id: int,
                           *, epoch: int = 0, statement_timeout: float | None = None,
                           coalesced: bool = False) -> MergeResult:
    """:func:`merge_changes` in a transaction that first takes the advisory lock ``lock_id``.

    Under READ COMMITTED each statement sees the data committed when it *started*: two
    processes merging the same key at once could each miss the other's uncommitted delete
    (and its tombstone), and an older upsert would re-create the row. With the lock, a merge
    starts only after the previous one committed. Costs two more round trips per batch
    (BEGIN and the lock; COMMIT replaces the implicit one).
    """
    if not changes:
        return MergeResult(0, 0, 0)
    async with pool.acquire(timeout=statement_timeout) as conn, conn.transaction():
        await conn.execute("SELECT pg_advisory_xact_lock($1)", lock_id,
                           timeout=statement_timeout)
        return await merge_changes(cast(asyncpg.Connection, conn), changes, epoch=epoch,
                                   statement_timeout=statement_timeout, coalesced=coalesced)


# --------------------------------------------------------------------------- metrics

COUNTERS: Final = (
    "writes", "removes", "reads", "kv_hits", "hydrations", "hydrations_from_log",
    "hydrations_uncached",
    "hydration_conflicts", "not_found", "flushes", "messages_flushed", "rows_flushed",
    "rows_upserted", "rows_deleted", "rows_skipped", "sql_statements", "retries",
    "expired_unflushed", "foreign_messages", "backpressure_rejections", "tombstones_purged",
    "log_source_restarts",
)
SAMPLE_COLUMNS: Final = ("t", "flusher", "messages", "rows", "upserted", "deleted", "skipped",
                         "latency_s", "total_s", "retries", "expired")


class Metrics:
    """Counters (a dict) plus one sample per flushed batch (a DataFrame on demand)."""

    def __init__(self) -> None:
        self.counters: dict[str, int] = dict.fromkeys(COUNTERS, 0)
        self.samples: list[dict[str, Any]] = []
        self._t0 = time.monotonic()

    def add(self, name: str, n: int = 1) -> None:
        self.counters[name] += n

    def record_flush(self, flusher: str, messages: int, result: MergeResult, latency_s: float,
                     total_s: float, retries: int, expired: int) -> None:
        c = self.counters
        c["flushes"] += 1
        c["messages_flushed"] += messages
        c["rows_flushed"] += result.rows
        c["rows_upserted"] += result.upserted
        c["rows_deleted"] += result.deleted
        c["rows_skipped"] += result.skipped
        c["expired_unflushed"] += expired
        self.samples.append({
            "t": time.monotonic() - self._t0, "flusher": flusher, "messages": messages,
            "rows": result.rows, "upserted": result.upserted, "deleted": result.deleted,
            "skipped": result.skipped, "latency_s": latency_s, "total_s": total_s,
            "retries": retries, "expired": expired,
        })

    def frame(self) -> pd.DataFrame:
        with needs_extra("HybridStateManager.metrics()"):
            import pandas as pd

        return pd.DataFrame(self.samples, columns=list(SAMPLE_COLUMNS))


# --------------------------------------------------------------------------- committing


class Committer:
    """Writes batches to ``agents.state``: one statement, retried until it lands.

    Failure policy: a batch PostgreSQL refuses *as data* (``asyncpg.DataError``: a value it
    cannot store, which only a foreign writer can put into the bucket) is split until the
    refused rows stand alone, and those are set aside and counted; every other error (an
    outage, a timeout) is retried with capped, jittered exponential backoff — the changes are
    acknowledged, so giving up would lose them. ``serialised`` batches take a per-stream
    advisory lock (:func:`merge_serialised`), for flushers that share a consumer.
    """

    def __init__(self, pool: asyncpg.Pool, metrics: Metrics, *, lock_name: str | None,
                 sql_timeout: float, base_backoff: float, max_backoff: float,
                 tombstone_retention: float) -> None:
        self.pool = pool
        self.metrics = metrics
        self.lock_id = None if lock_name is None else merge_lock_id(lock_name)
        self.sql_timeout = sql_timeout
        self.base_backoff = base_backoff
        self.max_backoff = max_backoff
        self.tombstone_retention = tombstone_retention
        self.last_error: BaseException | None = None
        self._next_purge = time.monotonic() + tombstone_retention / 24

    async def commit(self, changes: list[StateChange], epoch: int, flusher: str, *,
                     messages: int, expired: int = 0,
                     on_retry: Callable[[], Awaitable[None]] | None = None) -> MergeResult:
        """Merge ``changes`` (one ``epoch``; each key once — the caller coalesced them); return
        only once they are committed."""
        started = time.perf_counter()
        delay = self.base_backoff
        retries = 0
        while True:
            attempt = time.perf_counter()
            if changes:
                self.metrics.add("sql_statements")
            try:
                result = await self._merge(changes, epoch)
                break
            except asyncio.CancelledError:
                raise
            except asyncpg.DataError as e:
                self.last_error = e
                result = await self._merge_storable(changes, epoch, e)
                break
            except Exception as e:
                retries += 1
                self.last_error = e
                self.metrics.add("retries")
                log.warning("flush of %d rows failed (%r); retry %d in %.2f s",
                            len(changes), e, retries, delay)
                await asyncio.sleep(delay * random.uniform(0.5, 1.0))
                delay = min(delay * 2, self.max_backoff)
                if on_retry is not None:
                    await on_retry()
        now = time.perf_counter()
        if changes:
            self.metrics.record_flush(flusher, messages, result, now - attempt, now - started,
                                      retries, expired)
        if time.monotonic() >= self._next_purge:
            await self.purge_tombstones()
        return result

    async def _merge(self, changes: Sequence[StateChange], epoch: int) -> MergeResult:
        if self.lock_id is not None:
            return await merge_serialised(self.pool, changes, self.lock_id, epoch=epoch,
                                          statement_timeout=self.sql_timeout, coalesced=True)
        return await merge_changes(self.pool, changes, epoch=epoch,
                                   statement_timeout=self.sql_timeout, coalesced=True)

    async def _merge_storable(self, changes: list[StateChange], epoch: int,
                              error: asyncpg.DataError) -> MergeResult:
        """Merge the rows of a refused batch that PostgreSQL can store; count the rest.

        Values that are not JSON, or hold a NUL character, are dropped first (what
        :func:`msstore.codec.storable` checks); if PostgreSQL still refuses, the batch is split
        in halves until each refused row stands alone. Each part is its own statement, so this
        path costs more statements; it is only taken for a batch PostgreSQL refused.
        """
        good: list[StateChange] = []
        bad: list[StateChange] = []
        for c in changes:
            (good if c.data is None or storable(c.data) else bad).append(c)
        upserted = deleted = 0
        parts = [good] if good else []
        while parts:
            part = parts.pop()
            self.metrics.add("sql_statements")
            try:
                r = await self._merge(part, epoch)
            except asyncpg.DataError:
                if len(part) == 1:
                    bad.append(part[0])
                else:
                    parts += [part[:len(part) // 2], part[len(part) // 2:]]
                continue
            upserted += r.upserted
            deleted += r.deleted
        if bad:
            self.metrics.add("foreign_messages", len(bad))
            log.warning("PostgreSQL refused %d value(s) that msstore did not write (%s); "
                        "skipped: %s", len(bad), error,
                        ", ".join(f"{c.agent_id}/{c.key}@{c.revision}" for c in bad[:10]))
        return MergeResult(len(changes), upserted, deleted)

    async def purge_tombstones(self) -> int:
        """Delete tombstones older than ``tombstone_retention``; return how many.

        Run about every ``tombstone_retention / 24`` seconds by :meth:`commit`. A failure is
        logged and retried at the next interval.
        """
        self._next_purge = time.monotonic() + self.tombstone_retention / 24
        try:
            status = await self.pool.execute(
                "DELETE FROM agents.state_tombstones "
                "WHERE deleted_at < now() - make_interval(secs => $1)",
                self.tombstone_retention, timeout=self.sql_timeout)
        except asyncio.CancelledError:
            raise
        except Exception as e:
            log.warning("purging delete tombstones failed (%r); next try in %.0f s", e,
                        self.tombstone_retention / 24)
            return 0
        purged = int(status.split()[-1])
        self.metrics.add("tombstones_purged", purged)
        return purged


__all__ = ["COUNTERS", "LOAD_AGENT_TEXT", "MERGE_SQL", "READ_VALUE_TEXT", "Committer",
           "MergeResult", "Metrics", "StateChange", "coalesce", "merge_changes", "merge_lock_id",
           "merge_serialised"]
