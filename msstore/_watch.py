"""The tiered cache's coherence: the KV watch, and whether L1 can be trusted across outages.

::

    change on $KV.<bucket>.<prefix>.<key> (revision r)
      │ _nats.watch_changes: ordered push consumer, deliver NEW, headers only
      ▼
    KVWatch._on_message ──▶ on_change(key, r): the cache drops older L1 / notes its loads
                        ──▶ latency sample;  seen_revision = r;  wait_for_revision waiters

    Connection listeners (nats-py's disconnected / reconnected callbacks)
      disconnect ──▶ untrusted, epoch += 1, on_distrust() (the cache empties L1)
      reconnect  ──▶ the same, then wake the keeper: a Worker that unsubscribes the old watch,
                     subscribes anew and, if no outage came meanwhile, trusts L1 again
                     (epoch += 1) and reads the stream's last revision into seen_revision

An install into L1 is allowed only when :meth:`KVWatch.can_install` says so for the epoch the
load began in: a disconnect, reconnect or new watch in between means changes may have gone
unnotified. Without ``ms`` there is nothing to listen to: always trusted, epoch 0.

Why the reconnect path: nats-py rebuilds an ordered consumer only after two missed idle
heartbeats (5 s each), so without it another process' L1 served old values for 5–6 s after
a NATS restart. Changes made while the watch was down are never replayed (deliver NEW), which
is why L1 is emptied, and loads that began before the new watch existed may not install.
On a cluster the watch's consumer lives with the stream's leader: when another node is
elected (``$JS.EVENT.ADVISORY.STREAM.LEADER_ELECTED.KV_<bucket>``) the watch is rebuilt and L1
distrusted the same way, without waiting for heartbeats.
Not covered: a silent network partition (no TCP reset) is noticed only when nats-py's pings
fail, and L1 is trusted until then.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import deque
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from nats.aio.msg import Msg

from . import _nats
from ._background import Worker, wait_event
from ._cache_io import kv_errors
from .errors import MsstoreError, StoreTimeoutError, StoreUnavailableError
from .keys import split_key

if TYPE_CHECKING:
    from .connection import Connection

log = logging.getLogger("msstore.cache")

#: JetStream's advisory when a stream (here ``KV_<bucket>``) gets a new leader
LEADER_ELECTED = "$JS.EVENT.ADVISORY.STREAM.LEADER_ELECTED."
#: how often the keeper looks for a rebuild nobody woke it for (it is woken on reconnect)
KEEPER_INTERVAL = 30.0


class KVWatch:
    """The watch of one cache's keys, its trust epochs and the revision it has seen.

    ``on_change(key, revision)`` returns True if it dropped an L1 entry; ``on_distrust()``
    empties L1. ``watch=False`` (or ``ms=None``) keeps only the outage bookkeeping.
    """

    def __init__(self, ms: Connection | None, bucket: str, key_prefix: str, *, watch: bool,
                 on_change: Callable[[str, int], bool], on_distrust: Callable[[], None],
                 counters: dict[str, int], samples: deque[tuple[int, float, bool]]) -> None:
        self.ms = ms
        self.bucket = bucket
        self.key_prefix = key_prefix
        self.enabled = watch and ms is not None
        self._on_change = on_change
        self._on_distrust = on_distrust
        self.counters = counters
        #: (revision, seconds from the KV write to the watcher handling it, L1 entry dropped?)
        self.samples = samples
        self._cut = len(_nats.kv_prefix(bucket))
        self.seen_revision = 0
        self._seen = asyncio.Event()  # set (and replaced) when seen_revision grows
        self._sub: Any = None
        self._leader_sub: Any = None
        # L1 trust across NATS outages: installs need trusted and an unchanged epoch
        self.epoch = 0
        self.trusted = True
        self._connected = True
        self._rewatch = False
        self._closed = False
        self._unlisten: Callable[[], None] | None = None
        self._keeper: Worker | None = None

    def can_install(self, epoch: int) -> bool:
        """True if a load begun in ``epoch`` may install: no outage or new watch since."""
        return epoch == self.epoch and self.trusted

    # ---------------------------------------------------------------- lifecycle

    def listen(self) -> None:
        """Follow the connection's outages (first, so one during start is not missed)."""
        if self.ms is not None:
            self._unlisten = self.ms.add_listener(on_disconnect=self._on_disconnect,
                                                  on_reconnect=self._on_reconnect)

    async def start(self) -> None:
        """Subscribe (before any read of the cache) and start the keeper."""
        if not self.enabled:
            return
        self._sub = await self._subscribe()
        nc = getattr(self.ms, "nc", None)  # (a unit test's fake connection has none)
        if nc is not None:
            with kv_errors(f"follow the leader of bucket {self.bucket!r}"):
                self._leader_sub = await nc.subscribe(
                    LEADER_ELECTED + _nats.kv_stream(self.bucket), cb=self._on_leader)
        self._keeper = Worker(f"cache-watch-{self.bucket}", self._keep, interval=KEEPER_INTERVAL,
                              base_backoff=0.05, max_backoff=1.0)
        self._keeper.start()
        if self._rewatch:  # reconnected while subscribing: this watch may have missed changes
            self._keeper.wake.set()

    def stop_listening(self) -> None:
        if self._unlisten is not None:
            self._unlisten()
            self._unlisten = None

    async def close(self) -> None:
        """Stop listening and the keeper, drop the watch, fail whoever waits for a revision."""
        self._closed = True
        self.stop_listening()
        if self._keeper is not None:
            await self._keeper.stop()
        for sub in (self._sub, self._leader_sub):
            if sub is not None:
                with contextlib.suppress(Exception):
                    await sub.unsubscribe()
        self._seen.set()

    # ---------------------------------------------------------------- changes

    async def _on_message(self, msg: Msg) -> None:
        """Watch callback: tell the cache, sample the latency, advance ``seen_revision``."""
        try:
            revision, timestamp_ns = _nats.seq_and_time(msg)
            key = split_key(msg.subject[self._cut:], 1)[1]
        except Exception:  # not a key this cache wrote: nothing to invalidate
            log.debug("cache watch: ignoring %r", msg.subject, exc_info=True)
            return
        self.counters["notifications"] += 1
        dropped = self._on_change(key, revision)
        self.samples.append((revision, time.time() - timestamp_ns / 1e9, dropped))
        self._advance_seen(revision)

    def _advance_seen(self, revision: int) -> None:
        if revision > self.seen_revision:
            self.seen_revision = revision
            self._seen.set()
            self._seen = asyncio.Event()

    async def wait_for_revision(self, revision: int, within: float) -> None:
        """Return once ``seen_revision >= revision``; :class:`StoreTimeoutError` after ``within``.

        One event per advance (:func:`~msstore._background.wait_event`), so a waiter that
        times out or is cancelled leaves nothing behind.
        """
        deadline = time.monotonic() + within
        while self.seen_revision < revision:
            if self._closed:
                raise StoreUnavailableError("the cache was closed while waiting")
            if not await wait_event(self._seen, deadline - time.monotonic()):
                raise StoreTimeoutError(
                    f"the watch on bucket {self.bucket!r} did not see revision {revision} "
                    f"within {within} s (last seen {self.seen_revision}); is the revision from "
                    f"a key under prefix {self.key_prefix!r} of this bucket?")

    # ---------------------------------------------------------------- NATS outages

    def _distrust(self) -> None:
        """Empty L1 and refuse installs until the watch is known to be live again."""
        self.trusted = False
        self.epoch += 1
        self._on_distrust()

    def _on_disconnect(self) -> None:
        """Connection listener: changes may now go unnotified, so L1 is no longer trusted."""
        self._connected = False
        self._distrust()

    def _on_reconnect(self) -> None:
        """Connection listener: drop what L1 got meanwhile, rebuild the watch now."""
        self._connected = True
        self._distrust()
        if not self.enabled:  # no watch to rebuild: L1 is TTL-coherent only, as before
            self.epoch += 1
            self.trusted = True
        else:
            self._rewatch = True
            if self._keeper is not None:  # else start() wakes it
                self._keeper.wake.set()

    async def _on_leader(self, msg: Msg) -> None:
        """A new stream leader: the watch's consumer may be gone with the old one."""
        self.counters["leader_changes"] += 1
        self._distrust()
        self._rewatch = True
        if self._keeper is not None:
            self._keeper.wake.set()

    async def _subscribe(self) -> Any:
        assert self.ms is not None
        with kv_errors(f"watch bucket {self.bucket!r}"):
            return await _nats.watch_changes(self.ms.js, self.bucket, f"{self.key_prefix}.>",
                                             self._on_message)

    async def _keep(self) -> None:
        """Keeper step: rebuild the watch after a reconnect; one Worker, so rebuilds never overlap.

        nats-py would rebuild it only after two missed heartbeats (~10 s); a new subscription
        starts delivering at once. The old one is dropped first so no consumer is left over.
        Failure policy: a refused subscribe (JetStream may need a moment after a restart) is
        kept pending and raised, so the Worker retries it with capped backoff (50 ms → 1 s).
        """
        if not self._rewatch:
            return
        self._rewatch = False
        assert self.ms is not None and self._keeper is not None
        old, self._sub = self._sub, None
        if old is not None:
            with contextlib.suppress(Exception):
                await old.unsubscribe()
        try:
            self._sub = await self._subscribe()
        except MsstoreError:
            self._rewatch = True
            self._keeper.wake.set()  # right after the backoff, not at the next interval
            raise
        if self._rewatch or not self._connected:
            return  # an outage came meanwhile: this watch may have missed changes
        self.epoch += 1
        self.trusted = True
        self.counters["rewatches"] += 1
        try:  # every revision up to the last is in KV or comes through the new watch
            with kv_errors(f"read the state of stream {_nats.kv_stream(self.bucket)}"):
                self._advance_seen(await _nats.last_revision(self.ms.js, self.bucket))
        except MsstoreError as e:  # waiters then wait for the next change instead
            log.warning("cache %s: watch rebuilt, stream state unknown (%s)", self.bucket, e)


__all__ = ["KVWatch"]
