"""Hybrid state manager (seed 1.3): write KV first, flush to PostgreSQL behind the writer.

::

    write_state ──encode once──▶ KV put ──ack (revision)──▶ caller
                                    │
                 ┌──────────────────┴───────────────────┐
         "stream" (default)                      "dirty-set"
     durable pull consumer on KV_<bucket>     in-memory dict key -> (revision, bytes)
     fetch ─▶ coalesce ─▶ 1 SQL statement     swap ─▶ coalesce ─▶ 1 SQL statement
     ─▶ commit ─▶ ack                         (lost if the process dies before it)

    read_state ──▶ KV get ──hit──▶ value
                      │ miss (no message at all; a delete marker is an authoritative miss)
                      ▼
                  SQL SELECT ──▶ KV update(last=0)  (compare-and-set: never a blind put)
                                    │ lost the race ──▶ re-read KV: the newer write wins

Flush triggers: ``flush_threshold`` writes since the last flush, or every ``flush_interval``
seconds; flushing runs in a background task, so writers never wait for PostgreSQL. Each batch
is coalesced to one change per key (the highest revision) and written by **one** statement
(``unnest`` arrays into a data-modifying CTE) whose ``version`` is the KV revision, guarded by
``WHERE agents.state.version < excluded.version``: replays and out-of-order batches are no-ops.

While PostgreSQL is unreachable the backlog is kept and retried with capped exponential
backoff; once it reaches ``max_backlog``, ``write_state`` raises :class:`BackpressureError`.

Keys whose KV TTL (the bucket's max age) ran out before they were flushed are counted in the
``expired_unflushed`` counter:

* ``"dirty-set"``: exact for this process' writes: a buffered change older than the TTL at
  commit time. Its value still reaches PostgreSQL (it is buffered), but reads in between
  hydrate the older row. A crash loses the whole buffer, and that is *not* counted.
* ``"stream"``: a fetched message whose age at commit time is at least the TTL (its value
  still reaches PostgreSQL). *Not* detected: a message that expired from the stream before any
  flusher fetched it; the server drops it silently. Keep ``ttl`` far above the flush interval
  and let backpressure bound the backlog so this cannot happen in practice.

Deletes leave a tombstone (``agents.state_tombstones``, migration 005) with their revision, so
an older upsert that reaches PostgreSQL after a newer delete — a redelivery after ``ack_wait``,
or another process' batch — does not re-create the row. Tombstones are cleared by a newer
upsert of the key and purged after ``tombstone_retention``. Processes sharing one stream
consumer take a per-stream advisory lock around each merge (:func:`merge_serialised`), so two
merges of the same key never overlap: each sees what the other committed.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import enum
import functools
import hashlib
import logging
import random
import sys
import time
import uuid
from abc import ABC, abstractmethod
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass
from types import TracebackType
from typing import TYPE_CHECKING, Any, Final, Literal, cast

import asyncpg
import nats.errors
import nats.js.errors
import orjson
from nats.aio.msg import Msg
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy
from nats.js.kv import KeyValue

from .codec import dumps, loads, storable
from .errors import (
    BackpressureError,
    InvalidAgentIdError,
    InvalidKeyError,
    NotFoundError,
    StoreTimeoutError,
    StoreUnavailableError,
)
from .keys import decode_key, is_valid_nats_key, join_key
from .kv import DEFAULT_TTL_SECONDS, check_bucket_name, ensure_bucket, nats_error, nats_errors

if TYPE_CHECKING:
    import pandas as pd

    from .connection import Connection

log = logging.getLogger("msstore.hybrid")

FlusherName = Literal["stream", "dirty-set"]
FLUSHERS: Final = ("stream", "dirty-set")

KV_OPERATION = "KV-Operation"
STATUS_HEADER = "Status"  # nats-py puts a status line's code here (nats.js.api.Header.STATUS)
#: a pull request is over: 404 no messages, 408 request expired, 409 ended (e.g. max bytes)
_PULL_END_STATUSES = frozenset({"404", "408", "409"})
_DELETE_OPS = frozenset({"DEL", "PURGE"})
_MISSING: Final = object()
_FIRST_RECHECK: Final = 0.005  # seconds; flush() rechecks at 5, 10, 20 … ms up to poll_interval


# --------------------------------------------------------------------------- the SQL side


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


#: The whole batch in one statement: arrays in, guarded delete and guarded upsert out. A delete
#: leaves a tombstone with its revision (migration 005), so an older upsert that arrives later
#: (a redelivery, another process' batch) cannot re-create the row; a newer upsert clears it.
MERGE_SQL: Final = """
WITH batch AS (
    SELECT * FROM unnest($1::uuid[], $2::text[], $3::text[], $4::bigint[])
        AS b(agent_id, key, value, version)
), deleted AS (
    DELETE FROM agents.state
    USING batch
    WHERE batch.value IS NULL
      AND agents.state.agent_id = batch.agent_id
      AND agents.state.key = batch.key
      AND agents.state.version < batch.version
    RETURNING 1
), tombstoned AS (
    INSERT INTO agents.state_tombstones AS t (agent_id, key, version)
    SELECT agent_id, key, version FROM batch WHERE value IS NULL
    ON CONFLICT (agent_id, key) DO UPDATE
        SET version = excluded.version, deleted_at = now()
        WHERE t.version < excluded.version
), revived AS (
    DELETE FROM agents.state_tombstones AS t
    USING batch
    WHERE batch.value IS NOT NULL
      AND t.agent_id = batch.agent_id
      AND t.key = batch.key
      AND t.version < batch.version
), upserted AS (
    INSERT INTO agents.state (agent_id, key, value, version, updated_at)
    SELECT agent_id, key, value::jsonb, version, now() FROM batch
    WHERE value IS NOT NULL
      AND NOT EXISTS (SELECT 1 FROM agents.state_tombstones AS t
                      WHERE t.agent_id = batch.agent_id AND t.key = batch.key
                        AND t.version > batch.version)
    ON CONFLICT (agent_id, key) DO UPDATE
        SET value = excluded.value, version = excluded.version, updated_at = excluded.updated_at
        WHERE agents.state.version < excluded.version
    RETURNING 1
)
SELECT (SELECT count(*) FROM upserted) AS upserted, (SELECT count(*) FROM deleted) AS deleted
"""


async def merge_changes(db: asyncpg.Pool | asyncpg.Connection, changes: Sequence[StateChange],
                        *, statement_timeout: float | None = None) -> MergeResult:
    """Write a coalesced batch with exactly one SQL statement (no-op for an empty batch).

    Values travel as the JSON text KV holds (cast to jsonb server-side), so nothing is
    re-encoded. Raises ``ValueError`` if the batch holds a key twice (call :func:`coalesce`).
    """
    if not changes:
        return MergeResult(0, 0, 0)
    if len(coalesce(changes)) != len(changes):
        raise ValueError("a merge batch must hold each (agent_id, key) once; coalesce() it first")
    row = await db.fetchrow(
        MERGE_SQL,
        [c.agent_id for c in changes],
        [c.key for c in changes],
        [None if c.data is None else c.data.decode() for c in changes],
        [c.revision for c in changes],
        timeout=statement_timeout,
    )
    assert row is not None
    return MergeResult(len(changes), int(row["upserted"]), int(row["deleted"]))


async def wait_event(event: asyncio.Event, seconds: float) -> bool:
    """``event.wait()`` for at most ``seconds``; True if it was set.

    Not ``asyncio.wait_for``: on Python 3.11 it can swallow a cancellation that arrives as
    the event is set (gh-86296), and a caller's ``asyncio.timeout()`` around ``flush()`` would
    then never fire.
    """
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(seconds):
            await event.wait()
    return event.is_set()


def merge_lock_id(name: str) -> int:
    """The advisory-lock id that serialises the merges of one stream across processes."""
    digest = hashlib.blake2b(f"msstore-merge:{name}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big", signed=True)


async def merge_serialised(pool: asyncpg.Pool, changes: Sequence[StateChange], lock_id: int,
                           *, statement_timeout: float | None = None) -> MergeResult:
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
        return await merge_changes(cast(asyncpg.Connection, conn), changes,
                                   statement_timeout=statement_timeout)


# --------------------------------------------------------------------------- metrics

COUNTERS: Final = (
    "writes", "removes", "reads", "kv_hits", "hydrations", "hydration_conflicts", "not_found",
    "flushes", "messages_flushed", "rows_flushed", "rows_upserted", "rows_deleted",
    "rows_skipped", "sql_statements", "retries", "expired_unflushed", "foreign_messages",
    "backpressure_rejections", "tombstones_purged",
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
        import pandas as pd

        return pd.DataFrame(self.samples, columns=list(SAMPLE_COLUMNS))


# --------------------------------------------------------------------------- flushers


class Flusher(ABC):
    """What the manager needs from a flusher: note writes, report backlog, flush, close."""

    name: str

    def __init__(self, hsm: HybridStateManager) -> None:
        self._hsm = hsm
        self._wake = asyncio.Event()
        self._progress = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._stopping = False
        self.error: BaseException | None = None

    async def start(self) -> None:
        self._task = asyncio.create_task(self._loop(), name=f"msstore-{self.name}-flusher")

    @abstractmethod
    def note_write(self, change: StateChange) -> None:
        """Called after KV acknowledged ``change``; must not do I/O."""

    @abstractmethod
    def backlog(self) -> int:
        """Acknowledged changes not yet committed to PostgreSQL (may be an estimate)."""

    @abstractmethod
    async def _drain(self) -> None:
        """Commit what is pending now (called by the background loop only)."""

    @abstractmethod
    async def _done(self, target: object) -> bool:
        """True when everything up to ``target`` (from :meth:`_target`) is committed."""

    @abstractmethod
    async def _target(self) -> object:
        """A marker for "everything acknowledged so far"."""

    async def flush(self) -> None:
        """Return once every change acknowledged before the call is in PostgreSQL.

        Waits as long as PostgreSQL is down (nothing is dropped); bound it with
        ``asyncio.timeout()`` if the caller cannot wait.
        """
        target = await self._target()
        recheck = _FIRST_RECHECK
        while not await self._done(target):
            self._check_alive()
            progress = self._progress
            self._wake.set()
            # After progress, check again soon: the server applies acks asynchronously, so
            # the first look at the ack floor right after a commit can be a little behind.
            if await wait_event(progress, min(recheck, self._hsm.poll_interval)):
                recheck = _FIRST_RECHECK
            else:
                recheck *= 2

    async def close(self) -> None:
        self._stopping = True
        self._wake.set()
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    def _check_alive(self) -> None:
        if self._task is not None and self._task.done() and not self._stopping:
            raise StoreUnavailableError(f"the {self.name} flusher stopped: {self.error!r}")

    def _signal_progress(self) -> None:
        self._progress.set()
        self._progress = asyncio.Event()

    async def _loop(self) -> None:
        delay = self._hsm.base_backoff
        while not self._stopping:
            await wait_event(self._wake, self._hsm.flush_interval)
            self._wake.clear()
            try:
                await self._drain()
                delay = self._hsm.base_backoff
            except asyncio.CancelledError:
                raise
            except Exception as e:  # NATS outage or a bug: keep the loop, keep the backlog
                self.error = e
                self._hsm.last_error = e
                log.warning("%s flusher: %r; retrying in %.2f s", self.name, e, delay)
                await asyncio.sleep(delay)
                delay = min(delay * 2, self._hsm.max_backoff)
            self._signal_progress()


@dataclass(slots=True)
class _Buffered:
    change: StateChange
    written_at: float
    writes: int


class DirtySetFlusher(Flusher):
    """The seed's dirty set, with values buffered: fast, but a crash loses the buffer."""

    name = "dirty-set"

    def __init__(self, hsm: HybridStateManager) -> None:
        super().__init__(hsm)
        self._dirty: dict[tuple[uuid.UUID, str], _Buffered] = {}
        self._inflight = 0
        self._gen = 0
        self._done_gen = 0

    def note_write(self, change: StateChange) -> None:
        k = (change.agent_id, change.key)
        seen = self._dirty.get(k)
        if seen is None:
            self._dirty[k] = _Buffered(change, time.monotonic(), 1)
        else:
            seen.writes += 1
            if seen.change.revision < change.revision:
                seen.change = change
        self._gen += 1
        if len(self._dirty) >= self._hsm.flush_threshold:
            self._wake.set()

    def backlog(self) -> int:
        return len(self._dirty) + self._inflight

    async def _target(self) -> object:
        return self._gen

    async def _done(self, target: object) -> bool:
        assert isinstance(target, int)
        return self._done_gen >= target

    async def _drain(self) -> None:
        # One swap per wake-up, not "until empty": under a steady stream of writes an
        # until-empty loop would flush back to back (a few writes per batch) and coalesce
        # nothing. Writes that arrive meanwhile wait for the next trigger (threshold,
        # interval or flush()), and a hot key written N times in between costs one row.
        if self._dirty:
            gen = self._gen
            batch, self._dirty = list(self._dirty.values()), {}
            self._inflight = len(batch)
            size = self._hsm.batch_size
            for i in range(0, len(batch), size):
                chunk = batch[i:i + size]
                now = time.monotonic()
                expired = sum(1 for b in chunk if now - b.written_at >= self._hsm.ttl)
                await self._hsm._commit([b.change for b in chunk], self.name,
                                        messages=sum(b.writes for b in chunk), expired=expired)
                self._inflight -= len(chunk)
            self._done_gen = gen
            self._signal_progress()


class StreamFlusher(Flusher):
    """A durable pull consumer on the bucket's stream; acks only after the SQL commit.

    Several processes using the same durable name share the work; a crashed process' unacked
    messages are redelivered after ``ack_wait`` to whoever fetches next.
    """

    name = "stream"

    def __init__(self, hsm: HybridStateManager) -> None:
        super().__init__(hsm)
        self._psub: Any = None
        self._local = 0  # writes since the last consumer-info refresh
        self._since_flush = 0
        self._remote = 0  # num_pending + num_ack_pending at the last refresh
        self._monitor: asyncio.Task[None] | None = None
        # our own pull requests (see _pull): delivered to a callback subscription on an inbox
        self._inbox_sub: Any = None
        self._inbox = ""
        self._next_subject = ""
        self._got: list[Msg] = []
        self._holding: list[Msg] = []  # the batch being committed
        self._want = 0
        self._pulled = asyncio.Event()

    async def start(self) -> None:
        hsm = self._hsm
        config = ConsumerConfig(
            durable_name=hsm.durable, ack_policy=AckPolicy.EXPLICIT,
            deliver_policy=DeliverPolicy.ALL, ack_wait=hsm.ack_wait, max_deliver=-1,
            max_ack_pending=max(4 * hsm.batch_size, 1000),
            description="msstore HybridStateManager write-behind flusher",
        )
        self._psub = await hsm.ms.js.pull_subscribe(
            f"{hsm.subject_prefix}>", durable=hsm.durable, stream=hsm.stream, config=config)
        nc = hsm.ms.nc
        self._inbox = nc.new_inbox()
        self._next_subject = f"$JS.API.CONSUMER.MSG.NEXT.{hsm.stream}.{hsm.durable}"
        self._inbox_sub = await nc.subscribe(self._inbox, cb=self._on_pulled)
        await self._refresh()
        await super().start()
        self._monitor = asyncio.create_task(self._watch(), name="msstore-stream-backlog")

    def note_write(self, change: StateChange) -> None:
        self._local += 1
        self._since_flush += 1
        if self._since_flush >= self._hsm.flush_threshold:
            self._wake.set()

    def backlog(self) -> int:
        return self._remote + self._local

    async def _refresh(self) -> Any:
        local_then = self._local
        info = await self._psub.consumer_info()
        self._remote = int(info.num_pending or 0) + int(info.num_ack_pending or 0)
        self._local -= local_then
        return info

    async def _watch(self) -> None:
        while not self._stopping:
            await asyncio.sleep(self._hsm.backlog_refresh)
            try:
                await self._refresh()
            except asyncio.CancelledError:
                raise
            except Exception as e:
                log.debug("backlog refresh failed: %r", e)

    async def _target(self) -> object:
        info = await self._hsm.ms.js.stream_info(self._hsm.stream)
        return int(info.state.last_seq)

    async def _done(self, target: object) -> bool:
        assert isinstance(target, int)
        info = await self._refresh()
        floor = info.ack_floor.stream_seq if info.ack_floor else 0
        quiet = not info.num_pending and not info.num_ack_pending
        return bool(floor >= target or quiet)

    async def _drain(self) -> None:
        self._since_flush = 0
        size = self._hsm.batch_size
        fresh = False  # is the backlog estimate up to date (no refresh needed on the way out)?
        while not self._stopping:
            msgs: list[Msg] = []
            info = await self._refresh()
            fresh = True
            if not info.num_pending and not info.num_ack_pending:
                break  # nothing waiting, nothing in flight: no fetch to sit through
            while len(msgs) < size:  # a fetch can stop at its deadline: top the batch up
                want = size - len(msgs)
                if info.num_pending:
                    # Ask for no more than is waiting: a pull that the stream cannot fill
                    # is held by the server until it expires (fetch_timeout) — a fixed
                    # stall on every flush. (0 waiting: a redelivery may come; wait for it.)
                    want = min(want, int(info.num_pending))
                got = await self._pull(want, wait=not info.num_pending)
                if not got:
                    break
                msgs += got
                if len(msgs) < size:
                    # more is waiting, or already on its way to us (delivered, unacked)?
                    info = await self._refresh()
                    if not info.num_pending and (info.num_ack_pending or 0) <= len(msgs):
                        break
            if not msgs:
                break
            await self._commit_msgs(msgs)
            fresh = False
            self._signal_progress()
            if len(msgs) < size:
                break
        if not fresh:
            with contextlib.suppress(Exception):
                await self._refresh()

    async def _on_pulled(self, msg: Msg) -> None:
        status = msg.headers.get(STATUS_HEADER) if msg.headers else None
        if status is None:
            self._got.append(msg)
            if len(self._got) >= self._want:
                self._pulled.set()
        elif status in _PULL_END_STATUSES:  # no messages / request expired / request ended
            self._pulled.set()

    async def _pull(self, want: int, *, wait: bool) -> list[Msg]:
        """One pull request for up to ``want`` messages (what ``PullSubscription.fetch`` does).

        Messages arrive on a callback subscription, so each costs a queue hand-off; nats-py's
        ``fetch`` awaits every message with a new task, a ``wait_for`` and a ``uuid4`` (about
        a third of a 10,000-message flush). ``wait=False`` asks the server for what is there
        now (``no_wait``); ``wait=True`` holds the request up to ``fetch_timeout`` (for
        redeliveries). Messages of an earlier, expired request that arrive late are kept for
        the next call: they are ours until acked.
        """
        timeout = self._hsm.fetch_timeout
        if len(self._got) < want:
            self._want = want
            self._pulled.clear()
            request: dict[str, Any] = {"batch": want - len(self._got)}
            if wait:
                request["expires"] = int(timeout * 1e9)
            else:
                request["no_wait"] = True
            await self._hsm.ms.nc.publish(self._next_subject, orjson.dumps(request),
                                          reply=self._inbox)
            await wait_event(self._pulled, timeout + 0.5)
        got, self._got = self._got, []
        return got

    async def _commit_msgs(self, msgs: list[Msg]) -> None:
        hsm = self._hsm
        prefix = hsm.subject_prefix
        cut = len(prefix)
        now_ns = time.time_ns()
        ttl_ns = hsm.ttl * 1e9
        agents: dict[str, uuid.UUID] = {}  # a batch holds few agents: parse each id once
        changes: list[StateChange] = []
        append = changes.append
        expired = foreign = 0
        for m in msgs:
            try:
                subject = m.subject
                if not subject.startswith(prefix):
                    raise InvalidKeyError(subject)
                agent, key = _split_agent_key(subject[cut:], agents)
            except (InvalidKeyError, ValueError):
                foreign += 1
                continue
            # Values are not parsed here: msstore wrote them through codec.dumps, and a foreign
            # value PostgreSQL cannot store is found when the merge refuses it (see _commit).
            op = m.headers.get(KV_OPERATION) if m.headers else None
            data = None if op in _DELETE_OPS else m.data
            seq, ts_ns = _stream_seq_and_time(m)
            if now_ns - ts_ns >= ttl_ns:
                expired += 1
            append(StateChange(agent, key, seq, data))
        if foreign:
            hsm.metrics_store.add("foreign_messages", foreign)
            log.warning("skipped %d messages in %s that msstore did not write", foreign,
                        hsm.stream)

        async def keep_alive() -> None:  # the batch stays ours while PostgreSQL is down
            for m in msgs:
                with contextlib.suppress(Exception):
                    await m.in_progress()

        self._holding = msgs  # close() hands them back if the commit never finishes
        await hsm._commit(coalesce(changes), self.name, messages=len(msgs), expired=expired,
                          on_retry=keep_alive)
        self._holding = []
        for m in msgs:
            await m.ack()
        # Acks are fire-and-forget publishes: one PING/PONG makes sure the server has them
        # before anyone reads the ack floor (flush() would otherwise wait for a later poll or
        # an empty fetch). If it fails, the messages are redelivered and replayed as no-ops.
        with contextlib.suppress(nats.errors.Error, TimeoutError):
            await hsm.ms.nc.flush(timeout=5)

    async def close(self) -> None:
        if self._monitor is not None:
            self._monitor.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._monitor
        await super().close()
        # Messages pulled but not committed: a NAK redelivers them now to the next flusher,
        # instead of after ack_wait.
        unflushed, self._holding, self._got = [*self._holding, *self._got], [], []
        for m in unflushed:
            with contextlib.suppress(Exception):
                await m.nak()
        if self._psub is not None:
            with contextlib.suppress(Exception):
                await self._hsm.ms.nc.flush()
            with contextlib.suppress(Exception):
                await self._psub.unsubscribe()
        if self._inbox_sub is not None:
            with contextlib.suppress(Exception):
                await self._inbox_sub.unsubscribe()


def _split_agent_key(tail: str, agents: dict[str, uuid.UUID]) -> tuple[uuid.UUID, str]:
    """``<agent>.<encoded key>`` (a subject minus its bucket prefix) as (agent id, key).

    The same result as ``split_key(tail, 1)`` plus ``uuid.UUID``, without re-validating what
    the server already checked: keys without an ``=`` escape are returned as they are.
    """
    token, dot, encoded = tail.partition(".")
    if not dot or not encoded:
        raise InvalidKeyError(f"{tail!r} does not have an agent token and a key")
    agent = agents.get(token)
    if agent is None:
        plain = "=" not in token and is_valid_nats_key(token)
        agent = agents[token] = uuid.UUID(token if plain else decode_key(token))
    if "=" in encoded or not is_valid_nats_key(encoded):
        return agent, decode_key(encoded)
    return agent, encoded


def _stream_seq_and_time(m: Msg) -> tuple[int, int]:
    """(stream sequence, timestamp in ns) of a JetStream message, from its reply subject.

    ``Msg.metadata`` builds two dataclasses and a datetime per message; a flush of 10,000
    messages only needs these two integers. Formats other than the 9-token v1 reply subject
    (e.g. with a JetStream domain) go through ``Msg.metadata``.
    """
    tokens = (m.reply or "").split(".")
    if len(tokens) == 9 and tokens[0] == "$JS" and tokens[1] == "ACK":
        return int(tokens[5]), int(tokens[7])
    meta = m.metadata
    return int(meta.sequence.stream), int(meta.timestamp.timestamp() * 1e9)


# --------------------------------------------------------------------------- the manager


class _State(enum.Enum):
    NEW = "new"
    OPEN = "open"
    CLOSED = "closed"


def agent_uuid(agent_id: object) -> uuid.UUID:
    """``agent_id`` as a UUID; anything else raises :class:`InvalidAgentIdError`."""
    if isinstance(agent_id, uuid.UUID):
        return agent_id
    if isinstance(agent_id, str):
        try:
            return uuid.UUID(agent_id)
        except ValueError as e:
            raise InvalidAgentIdError(
                f"agent id {agent_id!r} is not a UUID; use uuid.uuid4() or its str()") from e
    raise InvalidAgentIdError(
        f"agent ids must be UUIDs (uuid.UUID or str), got {type(agent_id).__name__}")


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
        if flusher not in FLUSHERS:
            raise ValueError(f"flusher must be one of {FLUSHERS}, got {flusher!r}")
        for name, value in (("flush_threshold", flush_threshold), ("max_backlog", max_backlog),
                            ("batch_size", batch_size)):
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        for name, seconds in (("flush_interval", flush_interval), ("ttl", ttl),
                              ("ack_wait", ack_wait), ("max_backoff", max_backoff),
                              ("fetch_timeout", fetch_timeout),
                              ("tombstone_retention", tombstone_retention)):
            if not seconds > 0:
                raise ValueError(f"{name} must be > 0 seconds, got {seconds!r}")
        self.ms = ms
        self.bucket = check_bucket_name(bucket)
        self.stream = f"KV_{bucket}"
        self.subject_prefix = f"$KV.{bucket}."
        self._merge_lock = merge_lock_id(self.stream)
        self.flusher_name: FlusherName = flusher
        self.flush_threshold = flush_threshold
        self.flush_interval = flush_interval
        self.ttl = ttl
        self.max_backlog = max_backlog
        self.batch_size = batch_size
        self.durable = durable
        self.ack_wait = ack_wait
        self.base_backoff = base_backoff
        self.max_backoff = max_backoff
        self.sql_timeout = sql_timeout
        self.backlog_refresh = backlog_refresh
        self.fetch_timeout = fetch_timeout
        self.poll_interval = poll_interval
        if close_timeout is not None and not close_timeout > 0:
            raise ValueError(f"close_timeout must be > 0 seconds or None, got {close_timeout!r}")
        self.close_timeout = close_timeout
        #: delete tombstones are kept this long (never less than a message can live in KV)
        self.tombstone_retention = max(tombstone_retention, ttl + ack_wait)
        self._next_purge = time.monotonic() + self.tombstone_retention / 24
        self.metrics_store = Metrics()
        self.last_error: BaseException | None = None
        self._state = _State.NEW
        self._kv: KeyValue | None = None
        self._flusher: Flusher = (StreamFlusher(self) if flusher == "stream"
                                  else DirtySetFlusher(self))

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
            raise RuntimeError(f"cannot start a HybridStateManager that is {self._state.value}")
        try:
            self._kv = await ensure_bucket(self.ms.js, self.bucket, ttl=self.ttl)
            await self._flusher.start()
        except nats.errors.Error as e:
            raise StoreUnavailableError(f"cannot open KV bucket {self.bucket!r}: {e!r}") from e
        self._state = _State.OPEN

    async def flush(self) -> None:
        """Wait until every write acknowledged before this call is committed to PostgreSQL.

        While PostgreSQL is down this waits (retrying); wrap it in ``asyncio.timeout()`` to
        bound the wait.
        """
        self._check_open()
        await self._flusher.flush()

    async def close(self) -> None:
        """Flush everything, then stop the flusher (the connection stays open: it is yours).

        The final flush waits at most ``close_timeout`` seconds (``None``: as long as it takes),
        and not at all when the task closing is being cancelled (e.g. by an ``asyncio.timeout``
        around an ``async with`` block): the flusher stops either way. The stream flusher's
        unflushed changes stay in the stream for the next flusher, so nothing is lost; the
        dirty-set flusher's buffer is lost (its known flaw), and :class:`StoreTimeoutError`
        says how many keys.
        """
        if self._state is not _State.OPEN:
            return
        task = asyncio.current_task()
        try:
            if task is not None and task.cancelling():
                log.warning("closing while cancelled: %d changes not flushed (%s flusher)",
                            self._flusher.backlog(), self.flusher_name)
                return
            async with asyncio.timeout(self.close_timeout):
                await self._flusher.flush()
        except TimeoutError as e:
            where = ("stay in the stream for the next flusher" if self.flusher_name == "stream"
                     else "are lost with this process' dirty set")
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
            raise RuntimeError(
                f"HybridStateManager is {self._state.value}: use `async with "
                "HybridStateManager(ms) as hsm` or `await HybridStateManager.open(ms)`")
        return self._kv

    # ---------------------------------------------------------------- the API

    def _kv_key(self, agent_id: object, key: str) -> tuple[uuid.UUID, str]:
        if type(key) is str and (type(agent_id) is uuid.UUID or type(agent_id) is str):
            return _agent_kv_key(agent_id, key)  # memoised: the hot path of every call
        agent = agent_uuid(agent_id)
        return agent, join_key(str(agent), key)

    def _check_backpressure(self) -> None:
        backlog = self._flusher.backlog()
        if backlog >= self.max_backlog:
            self.metrics_store.add("backpressure_rejections")
            raise BackpressureError(
                f"{backlog:,} acknowledged changes are waiting to be flushed to PostgreSQL "
                f"(max_backlog={self.max_backlog:,}; last error: {self.last_error!r}); retry "
                "later, slow down, or raise max_backlog once PostgreSQL keeps up")

    async def write_state(self, agent_id: uuid.UUID | str, key: str, value: Any) -> int:
        """Store ``value`` in KV; return its revision once KV acknowledged it."""
        kv = self._check_open()
        agent, kv_key = self._kv_key(agent_id, key)
        data = dumps(value)  # typed errors before any I/O
        self._check_backpressure()
        try:  # inline, not `with nats_errors(…)`: this is the hot path
            revision = await kv.put(kv_key, data)
        except nats.js.errors.KeyValueError:
            raise
        except (nats.errors.Error, TimeoutError) as e:
            raise nats_error(f"write {key!r}", e) from e
        self._flusher.note_write(StateChange(agent, key, revision, data))
        self.metrics_store.counters["writes"] += 1
        return revision

    async def remove_state(self, agent_id: uuid.UUID | str, key: str) -> int:
        """Delete ``key`` (a KV delete marker, flushed as a guarded delete); return its revision."""
        self._check_open()
        agent, kv_key = self._kv_key(agent_id, key)
        self._check_backpressure()
        with nats_errors(f"remove {key!r}"):
            ack = await self.ms.js.publish(f"{self.subject_prefix}{kv_key}", b"",
                                           headers={KV_OPERATION: "DEL"})
        self._flusher.note_write(StateChange(agent, key, ack.seq, None))
        self.metrics_store.add("removes")
        return int(ack.seq)

    async def read_state(self, agent_id: uuid.UUID | str, key: str,
                         default: Any = _MISSING) -> Any:
        """KV first, then PostgreSQL (putting the row back into KV by compare-and-set).

        Raises :class:`NotFoundError` when the key exists in neither (unless ``default``).
        """
        kv = self._check_open()
        agent, kv_key = self._kv_key(agent_id, key)
        self.metrics_store.add("reads")
        for _attempt in range(3):
            try:
                with nats_errors(f"read {key!r}"):
                    entry = await kv.get(kv_key)
            except nats.js.errors.KeyNotFoundError as e:
                if e.op is not None:  # a delete marker: deleted, whatever SQL still says
                    break
                found, value = await self._hydrate(agent, key, kv_key)
                if found is None:
                    continue  # lost the race to a newer write: read KV again
                if not found:
                    break
                return value
            else:
                self.metrics_store.add("kv_hits")
                return loads(entry.value or b"null")
        else:
            # three lost races in a row: the SQL row is still the best answer we have
            found, value = await self._hydrate(agent, key, kv_key, cache=False)
            if found:
                return value
        self.metrics_store.add("not_found")
        if default is not _MISSING:
            return default
        raise NotFoundError(f"no state for agent {agent} key {key!r}")

    async def _hydrate(self, agent: uuid.UUID, key: str, kv_key: str,
                       cache: bool = True) -> tuple[bool | None, Any]:
        """(True, value) hydrated; (False, None) not in SQL; (None, None) lost to a write."""
        try:
            text = await self.ms.pool.fetchval(
                "SELECT value::text FROM agents.state WHERE agent_id = $1 AND key = $2",
                agent, key, timeout=self.sql_timeout)
        except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError, TimeoutError) as e:
            raise StoreUnavailableError(
                f"KV has no {key!r} and PostgreSQL cannot be read: {e!r}") from e
        if text is None:
            return False, None
        await self._after_sql_read(agent, key)
        data = str(text).encode()
        if cache:
            kv = self._check_open()
            try:
                with nats_errors(f"hydrate {key!r}"):
                    await kv.update(kv_key, data, last=0)  # only if KV has nothing at all
            except nats.js.errors.KeyWrongLastSequenceError:
                self.metrics_store.add("hydration_conflicts")
                return None, None
            self.metrics_store.add("hydrations")
        return True, loads(data)

    async def _after_sql_read(self, agent: uuid.UUID, key: str) -> None:
        """Test seam: runs between the SQL read and the KV create of a hydration."""

    # ---------------------------------------------------------------- flushing

    async def _commit(self, changes: list[StateChange], flusher: str, *, messages: int,
                      expired: int = 0,
                      on_retry: Callable[[], Awaitable[None]] | None = None) -> MergeResult:
        """One statement per batch, retried with capped exponential backoff until it lands."""
        started = time.perf_counter()
        delay = self.base_backoff
        retries = 0
        while True:
            attempt = time.perf_counter()
            if changes:
                self.metrics_store.add("sql_statements")
            try:
                result = await self._merge(changes)
                break
            except asyncio.CancelledError:
                raise
            except asyncpg.DataError as e:
                # Retrying would fail forever and hold every other row of the batch back: a
                # value PostgreSQL refuses (foreign, not written by msstore) is set aside.
                self.last_error = e
                result = await self._merge_storable(changes, e)
                break
            except Exception as e:
                retries += 1
                self.last_error = e
                self.metrics_store.add("retries")
                log.warning("flush of %d rows failed (%r); retry %d in %.2f s",
                            len(changes), e, retries, delay)
                await asyncio.sleep(delay * random.uniform(0.5, 1.0))
                delay = min(delay * 2, self.max_backoff)
                if on_retry is not None:
                    await on_retry()
        now = time.perf_counter()
        if changes:
            self.metrics_store.record_flush(flusher, messages, result, now - attempt,
                                            now - started, retries, expired)
        if time.monotonic() >= self._next_purge:
            await self.purge_tombstones()
        return result

    async def purge_tombstones(self) -> int:
        """Delete tombstones older than ``tombstone_retention``; return how many.

        The flusher calls this about every ``tombstone_retention / 24`` seconds. No KV message
        older than the bucket's max age can still be delivered, so an older tombstone guards
        nothing. A failure is logged and retried at the next interval.
        """
        self._next_purge = time.monotonic() + self.tombstone_retention / 24
        try:
            status = await self.ms.pool.execute(
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
        self.metrics_store.add("tombstones_purged", purged)
        return purged

    async def _merge(self, changes: Sequence[StateChange]) -> MergeResult:
        """One batch: serialised across processes for the stream flusher (its consumer may be
        shared), a plain statement for the dirty-set flusher (its batches are this process')."""
        if self.flusher_name == "stream":
            return await merge_serialised(self.ms.pool, changes, self._merge_lock,
                                          statement_timeout=self.sql_timeout)
        return await merge_changes(self.ms.pool, changes, statement_timeout=self.sql_timeout)

    async def _merge_storable(self, changes: list[StateChange],
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
            self.metrics_store.add("sql_statements")
            try:
                r = await self._merge(part)
            except asyncpg.DataError:
                if len(part) == 1:
                    bad.append(part[0])
                else:
                    parts += [part[:len(part) // 2], part[len(part) // 2:]]
                continue
            upserted += r.upserted
            deleted += r.deleted
        if bad:
            self.metrics_store.add("foreign_messages", len(bad))
            log.warning("PostgreSQL refused %d value(s) in %s that msstore did not write (%s); "
                        "skipped: %s", len(bad), self.stream, error,
                        ", ".join(f"{c.agent_id}/{c.key}@{c.revision}" for c in bad[:10]))
        return MergeResult(len(changes), upserted, deleted)

    # ---------------------------------------------------------------- observability

    @property
    def counters(self) -> dict[str, int]:
        """A snapshot of every counter, plus the current ``backlog``."""
        return {**self.metrics_store.counters, "backlog": self._flusher.backlog()}

    def backlog(self) -> int:
        """Acknowledged changes not yet in PostgreSQL (stream: refreshed periodically)."""
        return self._flusher.backlog()

    def metrics(self) -> pd.DataFrame:
        """One row per flushed batch: messages, rows, upserted/deleted/skipped, latency."""
        return self.metrics_store.frame()


# --------------------------------------------------------------------------- crash demo


async def _crash_writer(args: argparse.Namespace) -> None:
    """Write forever, printing ``<key> <revision>`` per acknowledged write (line-buffered)."""
    from .connection import connect

    async with connect(args.database_url, args.nats_url, migrate=False) as ms:
        hsm = await HybridStateManager.open(
            ms, bucket=args.bucket, flusher=args.flusher, flush_threshold=args.threshold,
            flush_interval=args.interval, ack_wait=args.ack_wait, durable=args.durable)
        print("ready", flush=True)
        i = 0
        while args.writes <= 0 or i < args.writes:
            key = f"k{i % args.keys}"
            rev = await hsm.write_state(args.agent, key, {"i": i, "pad": "x" * 64})
            sys.stdout.write(f"{key} {rev}\n")
            sys.stdout.flush()
            i += 1
            if i % 20 == 0:
                await asyncio.sleep(0)
        await hsm.close()
        print("done", flush=True)


def main(argv: list[str] | None = None) -> None:
    """``python -m msstore.hybrid crash-writer …``: the writer the crash demos kill -9."""
    p = argparse.ArgumentParser(prog="python -m msstore.hybrid")
    sub = p.add_subparsers(dest="command", required=True)
    w = sub.add_parser("crash-writer", help="write until killed, printing acknowledged writes")
    w.add_argument("--database-url", required=True)
    w.add_argument("--nats-url", required=True)
    w.add_argument("--bucket", required=True)
    w.add_argument("--agent", required=True)
    w.add_argument("--flusher", choices=FLUSHERS, default="stream")
    w.add_argument("--durable", default="msstore-flusher")
    w.add_argument("--keys", type=int, default=200)
    w.add_argument("--writes", type=int, default=0, help="stop after N writes (0: never)")
    w.add_argument("--threshold", type=int, default=50)
    w.add_argument("--interval", type=float, default=1.0)
    w.add_argument("--ack-wait", type=float, default=30.0)
    args = p.parse_args(argv)
    asyncio.run(_crash_writer(args))


if __name__ == "__main__":
    main()


__all__ = [
    "FLUSHERS",
    "MERGE_SQL",
    "DirtySetFlusher",
    "Flusher",
    "HybridStateManager",
    "MergeResult",
    "Metrics",
    "StateChange",
    "StreamFlusher",
    "agent_uuid",
    "coalesce",
    "merge_changes",
    "merge_lock_id",
    "merge_serialised",
]
