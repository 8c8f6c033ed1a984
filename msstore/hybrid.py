"""Hybrid state manager: write KV first, flush to PostgreSQL behind the writer.

::

    write_state ──backpressure──▶ engine: encode once, KV put ──ack (revision)──▶ caller
                                    │ (flushers.py: the stream flusher reads the bucket's
                                    ▼  durability log, the dirty-set flusher its own dict)
                           Committer: coalesce ─▶ 1 SQL statement (merge.py)

    read_state ──▶ engine: KV get ──hit──▶ value
                      │ miss (no message at all; a delete marker is an authoritative miss)
                      ▼
                  newest unflushed change of the key (the flusher: log / dirty set),
                  else the SQL row
                      ▼
                  KV create-if-absent (compare-and-set, marked "hydrated": never a blind put)
                      │ lost the race ──▶ re-read KV: the newer write wins

The key-level path is :mod:`msstore.engine`'s (the lifecycle manager runs on it too); this
module adds the write-behind around it.

The KV TTL (the bucket's max age) governs the cache tier only. An acknowledged change waits
in the durability log (stream flusher) or in the process (dirty-set flusher) until PostgreSQL
has it, however long that takes; a read in between is served that change, never the older
SQL row. Flushing runs in a background task, so writers never wait for PostgreSQL; while it
is unreachable the backlog is kept and retried, and once it reaches ``max_backlog``,
``write_state`` raises :class:`BackpressureError`.

Each batch is coalesced to one change per key and written by one statement whose ``version``
is the KV revision and whose ``epoch`` is the bucket stream's incarnation; replays,
out-of-order batches and older upserts after a delete (tombstones) are no-ops.
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from typing import TYPE_CHECKING, Final, Literal

from . import _nats
from ._background import wait_event
from ._check import agent_uuid, one_of, optional_seconds, positive_int, positive_seconds
from ._managed import Lifetime
from .engine import Encoded, StateEngine, StateManager
from .errors import BackpressureError, StoreTimeoutError, StoreUnavailableError
from .flushers import DirtySetFlusher, Flusher, FlushSettings
from .kv import DEFAULT_LEADER_WAIT, DEFAULT_TTL_SECONDS, check_bucket_name, nats_errors
from .merge import (
    Committer,
    MergeResult,
    Metrics,
    StateChange,
    coalesce,
    merge_changes,
    merge_lock_id,
    merge_serialised,
)
from .stream_flusher import StreamFlusher

if TYPE_CHECKING:
    import pandas as pd

    from .connection import Connection

log = logging.getLogger("msstore.hybrid")

FlusherName = Literal["stream", "dirty-set"]
FLUSHERS: Final = ("stream", "dirty-set")


class HybridStateManager(StateManager):
    """Agent state written to NATS KV first and flushed to ``agents.state`` behind the writer.

    ::

        async with HybridStateManager(ms, flusher="stream") as hsm:
            rev = await hsm.write_state(agent_id, "plan", {"step": 1})
            await hsm.read_state(agent_id, "plan")      # {"step": 1}

    The key-level work is :class:`msstore.engine.StateEngine`'s; this class adds the
    write-behind: backpressure, the flusher (which notes every change and answers the
    engine's "newest unflushed change" lookups), ``flush``/``close`` and the metrics.
    """

    _usage = "`async with HybridStateManager(ms) as hsm` or `await HybridStateManager.open(ms)`"

    def __init__(self, ms: Connection, *, bucket: str = "agent_state",
                 flusher: FlusherName = "stream", flush_threshold: int = 50,
                 flush_interval: float = 1.0, ttl: float = DEFAULT_TTL_SECONDS,
                 max_backlog: int = 100_000, batch_size: int = 10_000,
                 durable: str = "msstore-flusher", ack_wait: float = 30.0,
                 base_backoff: float = 0.05, max_backoff: float = 5.0,
                 sql_timeout: float = 30.0, backlog_refresh: float = 0.5,
                 fetch_timeout: float = 0.2, poll_interval: float = 0.1,
                 close_timeout: float | None = 30.0,
                 tombstone_retention: float = 86_400.0, replicas: int | None = None,
                 leader_wait: float = DEFAULT_LEADER_WAIT) -> None:
        self.ms = ms
        self.bucket = check_bucket_name(bucket)
        self.stream = _nats.kv_stream(bucket)
        self.subject_prefix = _nats.kv_prefix(bucket)
        self.flusher_name: FlusherName = one_of("flusher", flusher, FLUSHERS)
        self.ttl = positive_seconds("ttl", ttl)
        self.max_backlog = positive_int("max_backlog", max_backlog)
        self.sql_timeout = positive_seconds("sql_timeout", sql_timeout)
        self.close_timeout = optional_seconds("close_timeout", close_timeout)
        self.durable = check_bucket_name(durable)
        self.ack_wait = positive_seconds("ack_wait", ack_wait)
        self.settings = FlushSettings(
            bucket=bucket, flush_threshold=positive_int("flush_threshold", flush_threshold),
            flush_interval=positive_seconds("flush_interval", flush_interval), ttl=self.ttl,
            batch_size=positive_int("batch_size", batch_size), durable=durable,
            ack_wait=self.ack_wait, base_backoff=positive_seconds("base_backoff", base_backoff),
            max_backoff=positive_seconds("max_backoff", max_backoff),
            backlog_refresh=positive_seconds("backlog_refresh", backlog_refresh),
            fetch_timeout=positive_seconds("fetch_timeout", fetch_timeout),
            poll_interval=positive_seconds("poll_interval", poll_interval))
        #: delete tombstones are kept this long (never less than a message can wait for a
        #: redelivery or live in KV)
        self.tombstone_retention = max(
            positive_seconds("tombstone_retention", tombstone_retention), ttl + ack_wait)
        self.metrics_store = Metrics()
        self.engine = StateEngine(ms, bucket=bucket, sql_timeout=self.sql_timeout,
                                  counters=self.metrics_store.counters,
                                  after_load=self._after_sql_read, replicas=replicas,
                                  leader_wait=leader_wait)
        self._committer: Committer | None = None
        self._flusher: Flusher | None = None

    # ---------------------------------------------------------------- lifecycle

    async def _start(self) -> None:
        """Open the bucket (creating it with ``ttl`` as max age) and start the flusher."""
        s = self.settings
        self._committer = Committer(
            self.ms.pool, self.metrics_store,
            lock_name=self.stream if self.flusher_name == "stream" else None,
            sql_timeout=self.sql_timeout, base_backoff=s.base_backoff,
            max_backoff=s.max_backoff, tombstone_retention=self.tombstone_retention)
        kind = StreamFlusher if self.flusher_name == "stream" else DirtySetFlusher
        flusher = kind(s, self._committer, self.ms.js, self.ms.nc)
        with nats_errors(f"open KV bucket {self.bucket!r} and its flusher"):
            await self.engine.open(ttl=self.ttl)
            await flusher.start()
        self._flusher = flusher
        self.engine.unflushed = flusher
        self.engine.logged = self.flusher_name == "stream"

    async def flush(self) -> None:
        """Wait until every write acknowledged before this call is committed to PostgreSQL.

        While PostgreSQL is down this waits (retrying); wrap it in ``asyncio.timeout()`` to
        bound the wait. NATS unreachable: :class:`StoreUnavailableError`.
        """
        self._check_open()
        assert self._flusher is not None
        with nats_errors("follow the flush"):
            await self._flusher.flush()

    async def _close(self) -> None:
        """Flush everything, then stop the flusher (the connection stays open: it is yours).

        The final flush waits at most ``close_timeout`` seconds (``None``: as long as it takes),
        and not at all when the task closing is being cancelled (e.g. by an ``asyncio.timeout``
        around an ``async with`` block): the flusher stops either way. The stream flusher's
        unflushed changes stay in the durability log for the next flusher, so nothing is lost;
        the dirty-set flusher's buffer is lost (its known flaw), and
        :class:`StoreTimeoutError` says how many keys.
        """
        assert self._flusher is not None
        task = asyncio.current_task()
        try:
            if task is not None and task.cancelling():
                log.warning("closing while cancelled: %d changes not flushed (%s flusher)",
                            self._flusher.backlog(), self.flusher_name)
                return
            async with asyncio.timeout(self.close_timeout):
                await self.flush()
        except (TimeoutError, StoreUnavailableError) as e:
            where = ("stay in the durability log for the next flusher"
                     if self.flusher_name == "stream" else "are lost with this process' dirty set")
            if isinstance(e, StoreUnavailableError):  # it failed before close_timeout ran out
                kind = StoreTimeoutError if isinstance(e, StoreTimeoutError) \
                    else StoreUnavailableError
                raise kind(f"close() could not flush: {e}; {self._flusher.backlog()} changes "
                           f"{where}") from e
            raise StoreTimeoutError(
                f"close() could not flush within {self.close_timeout} s (last error: "
                f"{self.last_error!r}); {self._flusher.backlog()} changes {where}") from e
        finally:
            await self._flusher.close()
            self._state = Lifetime.CLOSED

    # ---------------------------------------------------------------- the API

    def _check_backpressure(self, flusher: Flusher) -> None:
        backlog = flusher.backlog()
        if backlog >= self.max_backlog:
            self.metrics_store.add("backpressure_rejections")
            raise BackpressureError(
                f"{backlog:,} acknowledged changes are waiting to be flushed to PostgreSQL "
                f"(max_backlog={self.max_backlog:,}; last error: {self.last_error!r}); retry "
                "later, slow down, or raise max_backlog once PostgreSQL keeps up")

    # write_state / remove_state / read_state are msstore.engine.StateManager's (the same
    # verbs as the lifecycle's); what write-behind adds around the engine is here.

    async def _apply(self, change: Encoded) -> int:
        """Refuse when the backlog is full; after KV's ack, hand the change to the flusher."""
        flusher = self._flusher
        assert flusher is not None
        self._check_backpressure(flusher)
        applied = await self.engine.apply(change)
        flusher.note_write(applied)
        return applied.revision

    async def _after_sql_read(self, agent: uuid.UUID, key: str) -> None:
        """Test seam: runs between the load of the value and the KV create of a hydration."""

    # ---------------------------------------------------------------- observability

    @property
    def last_error(self) -> BaseException | None:
        """The last error the flusher or a flush statement met (None until one happens)."""
        if self._flusher is not None and self._flusher.worker.error is not None:
            return self._flusher.worker.error
        return None if self._committer is None else self._committer.last_error

    async def purge_tombstones(self) -> int:
        """Delete delete-tombstones older than ``tombstone_retention``; return how many."""
        self._check_open()
        assert self._committer is not None
        return await self._committer.purge_tombstones()

    @property
    def counters(self) -> dict[str, int]:
        """A snapshot of every counter, plus the current ``backlog``."""
        return {**self.metrics_store.counters, "backlog": self.backlog()}

    def backlog(self) -> int:
        """Acknowledged changes not yet in PostgreSQL (stream: refreshed periodically)."""
        return 0 if self._flusher is None else self._flusher.backlog()

    def metrics(self) -> pd.DataFrame:
        """One row per flushed batch: messages, rows, upserted/deleted/skipped, latency."""
        return self.metrics_store.frame()


__all__ = [
    "FLUSHERS",
    "HybridStateManager",
    "MergeResult",
    "StateChange",
    "agent_uuid",
    "coalesce",
    "merge_changes",
    "merge_lock_id",
    "merge_serialised",
    "wait_event",
]
