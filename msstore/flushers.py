"""The two write-behind flushers: what each remembers, and how each knows a flush is done.

::

    "stream" (default, crash-safe)                 "dirty-set" (the seed's)
    KV_b ──server-side source──▶ MSLOG_b_<epoch>    dict (agent, key) -> latest change
    durable pull consumer, shared by processes     swap the dict ─▶ coalesce
    pull ─▶ coalesce ─▶ Committer ─▶ ack            ─▶ Committer
    purge the log below the ack floor              (a crash loses the dict)

Both hand batches to a :class:`~msstore.merge.Committer` (one statement, retried until it
lands) and run in one :class:`~msstore._background.Worker`, woken by ``flush_threshold``
writes, every ``flush_interval`` seconds, or by ``flush()``. The stream flusher reads the
durability log, not the KV stream (``stream_flusher.py``): the bucket's max age (the cache
TTL) cannot drop a change it has not committed, however long PostgreSQL or the flushers are
away.
"""

from __future__ import annotations

import logging
import time
import uuid
from abc import ABC, abstractmethod
from collections.abc import Awaitable
from dataclasses import dataclass
from typing import Any, Final, TypeVar

from nats.aio.client import Client
from nats.js import JetStreamContext

from . import _nats
from ._background import Worker, wait_event
from .errors import StoreUnavailableError
from .kv import DEFAULT_LEADER_WAIT, retry_not_stored
from .merge import Committer, StateChange

log = logging.getLogger("msstore.flushers")

T = TypeVar("T")


class _Unanswered(Exception):
    """A JetStream request that timed out while the client was connected (flush() retries)."""


_FIRST_RECHECK: Final = 0.005  # seconds; flush() rechecks at 5, 10, 20 … ms up to poll_interval


@dataclass(frozen=True, slots=True)
class FlushSettings:
    """What a flusher needs to know (the manager's validated options)."""

    bucket: str
    flush_threshold: int
    flush_interval: float
    ttl: float
    batch_size: int
    durable: str
    ack_wait: float
    base_backoff: float
    max_backoff: float
    backlog_refresh: float
    fetch_timeout: float
    poll_interval: float


class Flusher(ABC):
    """What the manager needs from a flusher: note writes, report backlog, flush, close."""

    name: str

    def __init__(self, s: FlushSettings, committer: Committer, js: JetStreamContext,
                 nc: Client) -> None:
        self.s, self.committer, self.js, self.nc = s, committer, js, nc
        self.stream = _nats.kv_stream(s.bucket)
        self.worker = Worker(f"{self.name}-flusher", self._drain, interval=s.flush_interval,
                             base_backoff=s.base_backoff, max_backoff=s.max_backoff)

    async def start(self) -> None:
        self.worker.start()

    @abstractmethod
    def note_write(self, change: StateChange) -> None:
        """Called after KV acknowledged ``change``; must not do I/O."""

    @abstractmethod
    def backlog(self) -> int:
        """Acknowledged changes not yet committed to PostgreSQL (may be an estimate)."""

    @abstractmethod
    async def pending(self, agent: uuid.UUID, key: str, subject: str) -> StateChange | None:
        """The newest acknowledged change of the key not known to be in PostgreSQL, if any."""

    @abstractmethod
    async def _drain(self) -> None:
        """Commit what is pending now (called by the worker only)."""

    @abstractmethod
    async def _target(self) -> object:
        """A marker for "everything acknowledged so far"."""

    @abstractmethod
    async def _done(self, target: object) -> bool:
        """True when everything up to ``target`` (from :meth:`_target`) is committed."""

    async def flush(self) -> None:
        """Return once every change acknowledged before the call is in PostgreSQL.

        Waits as long as PostgreSQL is down (nothing is dropped); bound it with
        ``asyncio.timeout()`` if the caller cannot wait.
        """
        # A cluster answers 503 / no responders while a stream or consumer has no leader (an
        # election, a node rejoining), or does not answer at all for a while: retried for the
        # writes' budget, then NoLeaderError. (The mark is a plain put: one that timed out
        # and landed after all only moves the target later.)
        target = await retry_not_stored(lambda: self._answered(self._target()), "mark a flush",
                                        DEFAULT_LEADER_WAIT, also=(_Unanswered,))
        recheck = _FIRST_RECHECK
        while not await retry_not_stored(lambda: self._answered(self._done(target)),
                                         "follow the flush", DEFAULT_LEADER_WAIT,
                                         also=(_Unanswered,)):
            if self.worker.dead:
                raise StoreUnavailableError(f"the {self.name} flusher stopped: "
                                            f"{self.worker.error!r}")
            progress = self.worker.progress
            self.worker.wake.set()
            # After progress, check again soon: the server applies acks asynchronously, so
            # the first look at the ack floor right after a commit can be a little behind.
            if await wait_event(progress, min(recheck, self.s.poll_interval)):
                recheck = _FIRST_RECHECK
            else:
                recheck *= 2

    async def _answered(self, call: Awaitable[T]) -> T:
        """``await call``; a timeout while connected becomes :class:`_Unanswered` (retried)."""
        try:
            return await call
        except TimeoutError as e:
            if self.nc.is_connected:  # connected, yet no answer: nobody leads that stream yet
                raise _Unanswered(repr(e)) from e
            raise  # not connected: an outage, reported as such

    async def close(self) -> None:
        await self.worker.stop()

    async def _kv_epoch(self) -> int:
        return _nats.stream_epoch(await self.js.stream_info(self.stream))


@dataclass(slots=True)
class _Buffered:
    change: StateChange
    written_at: float
    writes: int


class DirtySetFlusher(Flusher):
    """The seed's dirty set, with values buffered: fast, but a crash loses the buffer."""

    name = "dirty-set"

    def __init__(self, *args: Any) -> None:
        super().__init__(*args)
        self._dirty: dict[tuple[uuid.UUID, str], _Buffered] = {}
        self._flushing: dict[tuple[uuid.UUID, str], _Buffered] = {}
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
        if len(self._dirty) >= self.s.flush_threshold:
            self.worker.wake.set()

    def backlog(self) -> int:
        return len(self._dirty) + self._inflight

    async def pending(self, agent: uuid.UUID, key: str, subject: str) -> StateChange | None:
        found = self._dirty.get((agent, key)) or self._flushing.get((agent, key))
        return None if found is None else found.change

    async def _target(self) -> object:
        return self._gen

    async def _done(self, target: object) -> bool:
        assert isinstance(target, int)
        return self._done_gen >= target

    async def _drain(self) -> None:
        # One swap per wake-up, not "until empty": under a steady stream of writes an
        # until-empty loop would flush back to back (a few writes per batch) and coalesce
        # nothing. A hot key written N times in between costs one row.
        if not self._dirty:
            return
        # The epoch of the bucket as it is now: after a recreation, every buffered change is
        # written as news from the new incarnation (nothing acknowledged is skipped).
        epoch = await self._kv_epoch()
        gen = self._gen
        self._flushing, self._dirty = self._dirty, {}
        batch = list(self._flushing.values())
        self._inflight = len(batch)
        size = self.s.batch_size
        try:
            for i in range(0, len(batch), size):
                chunk = batch[i:i + size]
                now = time.monotonic()
                expired = sum(1 for b in chunk if now - b.written_at >= self.s.ttl)
                await self.committer.commit([b.change for b in chunk], epoch, self.name,
                                            messages=sum(b.writes for b in chunk),
                                            expired=expired)
                self._inflight -= len(chunk)
        finally:
            self._flushing = {}
        self._done_gen = gen
        self.worker.signal_progress()


__all__ = ["DirtySetFlusher", "FlushSettings", "Flusher"]
