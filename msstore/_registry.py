"""The repository's tracked SQL writer: each agent's KV changes, on their way to SQL.

::

    enqueue(change) ──▶ pending {agent_id: newest change}   (coalesced: one row per agent)
                           │ Worker step: a batch of ≤ batch_size, ONE statement
                           ▼ INSERT … ON CONFLICT … WHERE registry.version < excluded.version
                committed ──▶ lag sample (KV ack → SQL commit)
                           │ out of attempts, or refused
                           ▼
                failed {agent_id: change}  ──▶ ``drain()`` raises PendingWritesError
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import time
import uuid
from collections import deque
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Final

from ._background import Worker
from ._pg import pg_error, retryable
from .agent import Agent
from .codec import dumps
from .errors import PendingWritesError, StoreUnavailableError

if TYPE_CHECKING:
    from .connection import Connection

log = logging.getLogger("msstore.repository")

#: How often the writer looks for work it was not woken for (it is woken by every change).
IDLE_INTERVAL: Final = 1.0


@dataclass(slots=True)
class _Change:
    """The newest KV change of one agent on its way to SQL; ``agent=None`` is a delete."""

    agent_id: uuid.UUID
    revision: int
    agent: Agent | None
    since: float  # perf_counter of the oldest uncommitted KV ack this change stands for
    seq: int  # the oldest enqueue sequence number it stands for (drain() waits on it)

    def absorb(self, older: _Change) -> None:
        """Stand also for ``older`` (superseded): keep its ack time and sequence if earlier."""
        self.since, self.seq = min(self.since, older.since), min(self.seq, older.seq)


#: One statement per batch: arrays in, guarded delete and guarded upsert out.
REGISTRY_MERGE_SQL: Final = """
WITH batch AS (
    SELECT * FROM unnest($1::uuid[], $2::text[], $3::text[], $4::text[], $5::bigint[])
        AS b(agent_id, agent_type, status, metadata, version)
), deleted AS (
    DELETE FROM agents.registry
    USING batch
    WHERE batch.agent_type IS NULL
      AND agents.registry.agent_id = batch.agent_id
      AND agents.registry.version < batch.version
    RETURNING 1
), upserted AS (
    INSERT INTO agents.registry (agent_id, agent_type, status, metadata, version, updated_at)
    SELECT agent_id, agent_type, status, metadata::jsonb, version, now()
    FROM batch WHERE agent_type IS NOT NULL
    ON CONFLICT (agent_id) DO UPDATE
        SET agent_type = excluded.agent_type, status = excluded.status,
            metadata = excluded.metadata, version = excluded.version,
            updated_at = excluded.updated_at
        WHERE agents.registry.version < excluded.version
    RETURNING 1
)
SELECT (SELECT count(*) FROM upserted) AS upserted, (SELECT count(*) FROM deleted) AS deleted
"""


class RegistryWriter:
    """Tracked, coalesced, version-guarded writes, run by a :class:`msstore._background.Worker`.

    Failure policy (the one place it is stated):

    * **What is retried**: a batch whose statement fails with an error
      :func:`msstore._pg.retryable` accepts (PostgreSQL unavailable, or no answer in time). The
      batch is kept in flight and the Worker runs it again after its capped exponential
      backoff (``base_backoff`` doubling up to ``max_backoff``; the defaults 0.05 s and 2 s
      wait about 3 s over 6 retries), ``1 + max_retries`` attempts in all.
    * **When writes are parked**: when the batch is out of attempts, or at once when the
      error is not retryable (a value or statement PostgreSQL refuses fails the same way
      again; a bug in msstore likewise). Its writes move to the failed set, unless a newer
      change of the same agent is already queued (that one carries them). ``pending`` still
      counts them, :meth:`drain` raises :class:`PendingWritesError` naming them, and they
      are queued again with a fresh budget by the next committed batch or the next
      :meth:`drain`. Nothing is dropped while the process lives (and KV still holds the
      values, until the bucket's TTL).
    """

    def __init__(self, ms: Connection, counters: dict[str, int], *, batch_size: int,
                 max_retries: int, base_backoff: float, max_backoff: float, sql_timeout: float,
                 max_lag_samples: int) -> None:
        self.ms = ms
        self.counters = counters
        self.batch_size = batch_size
        self.max_retries = max_retries
        self.sql_timeout = sql_timeout
        #: seconds from a KV ack to the SQL commit that made SQL agree, one per committed row
        self.lag_samples: deque[float] = deque(maxlen=max_lag_samples)
        self.last_error: BaseException | None = None
        self._pending: dict[uuid.UUID, _Change] = {}
        self._inflight: dict[uuid.UUID, _Change] = {}
        self._failed: dict[uuid.UUID, _Change] = {}
        self._attempts = 0  # of the batch in flight
        self._seq = 0
        self.worker = Worker("repository-writer", self._step, interval=IDLE_INTERVAL,
                             base_backoff=base_backoff, max_backoff=max_backoff)

    def start(self) -> None:
        self.worker.start()

    async def stop(self) -> None:
        await self.worker.stop()

    @property
    def pending(self) -> int:
        """Agents whose newest KV change is not in SQL yet (queued, in flight, or failed)."""
        return len(self._pending.keys() | self._inflight.keys() | self._failed.keys())

    @property
    def failed(self) -> list[uuid.UUID]:
        return list(self._failed)

    def enqueue(self, agent_id: uuid.UUID, revision: int, agent: Agent | None) -> None:
        """Queue the SQL half of a change KV acknowledged at ``revision`` (no I/O)."""
        now = time.perf_counter()
        self._seq += 1
        seen = self._pending.get(agent_id) or self._failed.pop(agent_id, None)
        if seen is None:
            self._pending[agent_id] = _Change(agent_id, revision, agent, now, self._seq)
        else:
            self.counters["coalesced"] += 1
            if seen.revision < revision:
                seen.revision, seen.agent = revision, agent
            self._pending[agent_id] = seen
        self.worker.wake.set()

    def _requeue(self, change: _Change) -> None:
        """Queue ``change`` again, or let the newer queued change of its agent stand for it."""
        newer = self._pending.get(change.agent_id)
        if newer is None:
            self._pending[change.agent_id] = change
        else:
            newer.absorb(change)

    def _requeue_failed(self) -> None:
        for change in self._failed.values():
            self._requeue(change)
        self._failed.clear()

    async def drain(self) -> None:
        """Wait until every change queued before this call is committed (see the class doc)."""
        self._requeue_failed()
        target = self._seq
        self.worker.wake.set()
        while any(c.seq <= target for c in (*self._pending.values(),
                                             *self._inflight.values())):
            if self.worker.dead:
                raise StoreUnavailableError(
                    f"the repository's SQL writer stopped: {self.worker.error!r}")
            await self.worker.progress.wait()
        failed = [c.agent_id for c in self._failed.values() if c.seq <= target]
        if failed:
            shown = ", ".join(map(str, failed[:5])) + (" …" if len(failed) > 5 else "")
            raise PendingWritesError(
                f"{len(failed)} agent write(s) could not be committed to agents.registry after "
                f"{1 + self.max_retries} attempts each (last error: {self.last_error!r}): "
                f"{shown}. They are kept (and in KV): make PostgreSQL reachable, then call "
                "drain() again.", failed, self.last_error)

    async def _step(self) -> None:
        """One attempt at one batch (the Worker's step); raises only to be retried."""
        if not self._inflight:
            if not self._pending:
                return
            ids = list(itertools.islice(self._pending, self.batch_size))
            self._inflight = {i: self._pending.pop(i) for i in ids}
            self._attempts = 0
        batch = list(self._inflight.values())
        self._attempts += 1
        self.counters["sql_statements"] += 1
        try:
            row = await self._write(batch)
        except asyncio.CancelledError:
            raise
        except Exception as e:  # translated by the one policy, kept for drain()'s report
            err = pg_error(f"write {len(batch)} agent(s) to agents.registry", e)
            if err is not e:
                err.__cause__ = e
            self.last_error = err
            if not retryable(e):
                log.warning("SQL write of %d agents refused (%r); kept as failed, not "
                            "retried", len(batch), e)
            elif self._attempts <= self.max_retries:
                self.counters["retries"] += 1
                self.worker.wake.set()  # the batch stays in flight: again after the backoff
                if err is e:
                    raise
                raise err from e
            else:
                log.warning("SQL write of %d agents failed %d times (%r); kept as failed",
                            len(batch), self._attempts, e)
            self._park(batch)
        else:
            self._committed(batch, row)
        self._inflight = {}
        if self._pending:
            self.worker.wake.set()

    async def _write(self, batch: list[_Change]) -> Any:
        return await self.ms.pool.fetchrow(
            REGISTRY_MERGE_SQL,
            [c.agent_id for c in batch],
            [c.agent.type if c.agent else None for c in batch],
            [c.agent.status if c.agent else None for c in batch],
            [dumps(c.agent.metadata).decode() if c.agent else None for c in batch],
            [c.revision for c in batch],
            timeout=self.sql_timeout)

    def _park(self, batch: list[_Change]) -> None:
        self.counters["failures"] += len(batch)
        for change in batch:
            if change.agent_id in self._pending:  # a newer write will carry it
                self._pending[change.agent_id].absorb(change)
            else:
                self._failed[change.agent_id] = change

    def _committed(self, batch: list[_Change], row: Any) -> None:
        assert row is not None
        now = time.perf_counter()
        self.lag_samples.extend(now - c.since for c in batch)
        upserted, deleted = int(row["upserted"]), int(row["deleted"])
        self.counters["sql_writes"] += len(batch)
        self.counters["sql_upserted"] += upserted
        self.counters["sql_deleted"] += deleted
        self.counters["sql_skipped"] += len(batch) - upserted - deleted
        self._requeue_failed()  # PostgreSQL is back: failed writes get a fresh budget


__all__ = ["REGISTRY_MERGE_SQL", "RegistryWriter"]
