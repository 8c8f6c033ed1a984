"""Hybrid state manager: write KV first, flush to PostgreSQL behind the writer.

::

    write_state ──encode once──▶ KV put ──ack (revision)──▶ caller
                                    │ (flushers.py: the stream flusher reads the bucket's
                                    ▼  durability log, the dirty-set flusher its own dict)
                           Committer: coalesce ─▶ 1 SQL statement (merge.py)

    read_state ──▶ KV get ──hit──▶ value
                      │ miss (no message at all; a delete marker is an authoritative miss)
                      ▼
                  newest unflushed change of the key (log / dirty set), else the SQL row
                      ▼
                  KV create-if-absent (compare-and-set, marked "hydrated": never a blind put)
                      │ lost the race ──▶ re-read KV: the newer write wins

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
import enum
import functools
import logging
import uuid
from types import TracebackType
from typing import TYPE_CHECKING, Any, Final, Literal

import nats.errors
import nats.js.errors
from nats.js.kv import KeyValue

from . import _nats
from ._background import wait_event
from ._check import agent_uuid, not_open, one_of, optional_seconds, positive_int, positive_seconds
from ._pg import pg_errors
from ._readthrough import KVRead, read_through
from .codec import dumps, loads, reencode
from .errors import BackpressureError, NotFoundError, StoreTimeoutError, StoreUnavailableError
from .flushers import DirtySetFlusher, Flusher, FlushSettings
from .keys import join_key
from .kv import DEFAULT_TTL_SECONDS, check_bucket_name, ensure_bucket, nats_error, nats_errors
from .merge import (
    READ_VALUE_TEXT,
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
_MISSING: Final = object()


class _State(enum.Enum):
    NEW = "new"
    OPEN = "open"
    CLOSED = "closed"


@functools.lru_cache(maxsize=16_384)
def _agent_kv_key(agent_id: uuid.UUID | str, key: str) -> tuple[uuid.UUID, str]:
    """``(agent UUID, KV key)``, memoised: agents rewrite the same keys over and over.

    Exceptions (an invalid id or key) are not cached: they are raised on every call.
    """
    agent = agent_uuid(agent_id)
    return agent, join_key(str(agent), key)


class HybridStateManager:
    """Agent state written to NATS KV first and flushed to ``agents.state`` behind the writer.

    ::

        async with HybridStateManager(ms, flusher="stream") as hsm:
            rev = await hsm.write_state(agent_id, "plan", {"step": 1})
            await hsm.read_state(agent_id, "plan")      # {"step": 1}
    """

    def __init__(self, ms: Connection, *, bucket: str = "agent_state",
                 flusher: FlusherName = "stream", flush_threshold: int = 50,
                 flush_interval: float = 1.0, ttl: float = DEFAULT_TTL_SECONDS,
                 max_backlog: int = 100_000, batch_size: int = 10_000,
                 durable: str = "msstore-flusher", ack_wait: float = 30.0,
                 base_backoff: float = 0.05, max_backoff: float = 5.0,
                 sql_timeout: float = 30.0, backlog_refresh: float = 0.5,
                 fetch_timeout: float = 0.2, poll_interval: float = 0.1,
                 close_timeout: float | None = 30.0,
                 tombstone_retention: float = 86_400.0) -> None:
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
        self._state = _State.NEW
        self._kv: KeyValue | None = None
        self._committer: Committer | None = None
        self._flusher: Flusher | None = None

    # ---------------------------------------------------------------- lifecycle

    @classmethod
    async def open(cls, ms: Connection, **options: Any) -> HybridStateManager:
        """Create and start a manager (the non-``async with`` spelling)."""
        hsm = cls(ms, **options)
        await hsm.start()
        return hsm

    async def start(self) -> None:
        """Open the bucket (creating it with ``ttl`` as max age) and start the flusher."""
        if self._state is not _State.NEW:
            raise not_open("HybridStateManager", self._state.value,
                           "a manager starts once; create a new one")
        s = self.settings
        self._committer = Committer(
            self.ms.pool, self.metrics_store,
            lock_name=self.stream if self.flusher_name == "stream" else None,
            sql_timeout=self.sql_timeout, base_backoff=s.base_backoff,
            max_backoff=s.max_backoff, tombstone_retention=self.tombstone_retention)
        kind = StreamFlusher if self.flusher_name == "stream" else DirtySetFlusher
        flusher = kind(s, self._committer, self.ms.js, self.ms.nc)
        with nats_errors(f"open KV bucket {self.bucket!r} and its flusher"):
            self._kv = await ensure_bucket(self.ms.js, self.bucket, ttl=self.ttl)
            await flusher.start()
        self._flusher = flusher
        self._state = _State.OPEN

    async def flush(self) -> None:
        """Wait until every write acknowledged before this call is committed to PostgreSQL.

        While PostgreSQL is down this waits (retrying); wrap it in ``asyncio.timeout()`` to
        bound the wait. NATS unreachable: :class:`StoreUnavailableError`.
        """
        self._check_open()
        assert self._flusher is not None
        with nats_errors("follow the flush"):
            await self._flusher.flush()

    async def close(self) -> None:
        """Flush everything, then stop the flusher (the connection stays open: it is yours).

        The final flush waits at most ``close_timeout`` seconds (``None``: as long as it takes),
        and not at all when the task closing is being cancelled (e.g. by an ``asyncio.timeout``
        around an ``async with`` block): the flusher stops either way. The stream flusher's
        unflushed changes stay in the durability log for the next flusher, so nothing is lost;
        the dirty-set flusher's buffer is lost (its known flaw), and
        :class:`StoreTimeoutError` says how many keys.
        """
        if self._state is not _State.OPEN or self._flusher is None:
            return
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
            raise StoreTimeoutError(
                f"close() could not flush within {self.close_timeout} s (last error: "
                f"{self.last_error!r}); {self._flusher.backlog()} changes {where}") from e
        finally:
            await self._flusher.close()
            self._state = _State.CLOSED

    async def __aenter__(self) -> HybridStateManager:
        await self.start()
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                        tb: TracebackType | None) -> None:
        await self.close()

    def _check_open(self) -> KeyValue:
        if self._state is not _State.OPEN or self._kv is None:
            raise not_open("HybridStateManager", self._state.value,
                           "use `async with HybridStateManager(ms) as hsm` or "
                           "`await HybridStateManager.open(ms)`")
        return self._kv

    # ---------------------------------------------------------------- the API

    def _kv_key(self, agent_id: object, key: str) -> tuple[uuid.UUID, str]:
        if type(key) is str and (type(agent_id) is uuid.UUID or type(agent_id) is str):
            return _agent_kv_key(agent_id, key)  # memoised: the hot path of every call
        agent = agent_uuid(agent_id)
        return agent, join_key(str(agent), key)

    def _check_backpressure(self, flusher: Flusher) -> None:
        backlog = flusher.backlog()
        if backlog >= self.max_backlog:
            self.metrics_store.add("backpressure_rejections")
            raise BackpressureError(
                f"{backlog:,} acknowledged changes are waiting to be flushed to PostgreSQL "
                f"(max_backlog={self.max_backlog:,}; last error: {self.last_error!r}); retry "
                "later, slow down, or raise max_backlog once PostgreSQL keeps up")

    async def write_state(self, agent_id: uuid.UUID | str, key: str, value: Any) -> int:
        """Store ``value`` in KV; return its revision once KV acknowledged it.

        A :class:`StoreTimeoutError` means the write may still land (NATS did not answer).
        """
        kv = self._check_open()
        agent, kv_key = self._kv_key(agent_id, key)
        data = dumps(value)  # typed errors before any I/O
        flusher = self._flusher
        assert flusher is not None
        self._check_backpressure(flusher)
        try:  # inline, not `with nats_errors(…)`: this is the hot path
            revision = await kv.put(kv_key, data)
        except (nats.errors.Error, TimeoutError) as e:
            raise nats_error(f"write {key!r}", e) from e
        flusher.note_write(StateChange(agent, key, revision, data))
        self.metrics_store.counters["writes"] += 1
        return revision

    async def remove_state(self, agent_id: uuid.UUID | str, key: str) -> int:
        """Delete ``key`` (a KV delete marker, flushed as a guarded delete); return its revision."""
        self._check_open()
        agent, kv_key = self._kv_key(agent_id, key)
        assert self._flusher is not None
        self._check_backpressure(self._flusher)
        with nats_errors(f"remove {key!r}"):
            revision = await _nats.publish_delete(self.ms.js, self.subject_prefix + kv_key)
        self._flusher.note_write(StateChange(agent, key, revision, None))
        self.metrics_store.add("removes")
        return revision

    async def read_state(self, agent_id: uuid.UUID | str, key: str,
                         default: Any = _MISSING) -> Any:
        """KV first; on a miss the newest unflushed change, else PostgreSQL (then cached in KV).

        Raises :class:`NotFoundError` when the key exists nowhere (unless ``default``).
        """
        kv = self._check_open()
        agent, kv_key = self._kv_key(agent_id, key)
        subject = self.subject_prefix + kv_key
        self.metrics_store.add("reads")

        async def read_kv() -> KVRead[bytes]:
            with nats_errors(f"read {key!r}"):
                return await _nats.kv_read(kv, kv_key)

        async def load() -> bytes | None:
            data = await self._newest(agent, key, subject)
            await self._after_sql_read(agent, key)
            return data

        async def create(data: bytes) -> bool:
            if self.flusher_name == "stream" and not _nats.sources_drop_expectations(self.ms.nc):
                # NATS < 2.10.14 (see _nats): serve, do not cache — unless a write got there
                # first, which then wins like a lost compare-and-set
                if (await read_kv()).status != "miss":
                    self.metrics_store.add("hydration_conflicts")
                    return False
                self.metrics_store.add("hydrations_uncached")
                return True
            with nats_errors(f"hydrate {key!r}"):
                created = await _nats.create_hydrated(self.ms.js, subject, data)
            self.metrics_store.add("hydrations" if created else "hydration_conflicts")
            return created

        got = await read_through(read_kv, load, create, bytes)
        if got.source == "kv":
            self.metrics_store.add("kv_hits")
        if got.found:
            return loads(got.value or b"null")
        self.metrics_store.add("not_found")
        if default is not _MISSING:
            return default
        raise NotFoundError(f"no state for agent {agent} key {key!r}")

    async def _newest(self, agent: uuid.UUID, key: str, subject: str) -> bytes | None:
        """The newest durable value of a key KV does not hold, as codec bytes (None: none).

        The newest acknowledged change that PostgreSQL may not have yet (the durability log's
        last message for the key, or this process' dirty set) wins over the SQL row: a key
        whose KV entry expired before its flush is served its newest value, not the row's.
        SQL values are re-encoded with the codec (compact, exactly as written), never copied
        as PostgreSQL's text form, which can be larger than what NATS accepts.
        """
        assert self._flusher is not None
        with nats_errors(f"look up unflushed changes of {key!r}"):
            change = await self._flusher.pending(agent, key, subject)
        if change is not None:
            self.metrics_store.add("hydrations_from_log")
            return change.data  # None: deleted, and the delete is not flushed yet
        with pg_errors(f"read {key!r} (KV has no copy)"):
            text = await self.ms.pool.fetchval(READ_VALUE_TEXT, agent, key,
                                               timeout=self.sql_timeout)
        return None if text is None else reencode(text)

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
