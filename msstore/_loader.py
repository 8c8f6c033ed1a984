"""The tiered cache's slow path: the timed L1 hit, and misses: L2 → L3 → L2, guarded installs.

::

    lookup(id): L1 hit ──▶ (entry, True)   the one hit in ``latency_sample_every`` that is timed
      │ a miss: the cache open? (else NotOpenError)
      ▼
    _miss(key) ──in flight?──▶ await the same task (single-flight: ``coalesced``)
      │ no: a _Flight (its notified_rev, the watch's epoch), one task
      ▼
    _read_through: _readthrough.read_through with
      read_kv  KV get: a value ──▶ CacheEntry(KV);  nothing or a delete marker ──▶ miss
      load     repository.find(id) (NotFoundError raised to every waiter), encoded
      create   KV update(last=0 or the marker's revision): lost ──▶ ``kv_races``, read again
      ▼
    revision >= notified_rev?  no ──▶ ``stale_loads``, read through again (within the budget)
      │ yes: install into L1 if the flight is installable and the watch's epoch unchanged
      ▼
    every waiter gets the entry and counts the tier that served it (``served``, a sample)

Writes tell this module what they did (:meth:`Loader.note_change`,
:meth:`Loader.write_failed`), and so does the watch, so a load never installs a value older
than a change it was told about.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Any, Final, Generic, TypeVar

import nats.js.errors

from ._cache_io import EntityCodec, EntityId, Finder, KVBucket, cache_key, kv_errors, l3_errors
from ._cache_stats import TierStats
from ._l1 import L1, CacheEntry, CacheSource
from ._readthrough import KVRead, read_through
from ._watch import KVWatch
from .errors import NotFoundError
from .keys import join_key

T = TypeVar("T")
_MISS: Final[KVRead[Any]] = KVRead("miss")


class _Flight:
    """One in-flight L2/L3 load; ``notified_rev`` is the highest change the watch reported.

    ``epoch`` is the watch's trust epoch when the load began: a disconnect, reconnect or new
    watch in between means changes may have gone unnotified, so the load must not install.
    ``installable`` is cleared by a failed write of the key (it may land after our read).
    """

    __slots__ = ("epoch", "installable", "notified_rev", "task")

    def __init__(self, epoch: int) -> None:
        self.notified_rev = 0
        self.epoch = epoch
        self.installable = True
        self.task: asyncio.Task[CacheEntry[Any]] | None = None


class Loader(Generic[T]):
    """Turns L1 misses into entries for one cache (its L1, watch, codec, tiers and counters)."""

    def __init__(self, repository: Finder[T], codec: EntityCodec[T], l1: L1, watch: KVWatch,
                 open_kv: Callable[[], KVBucket], *, bucket: str, key_prefix: str,
                 max_load_attempts: int, sample_every: int,
                 tiers: tuple[TierStats, TierStats, TierStats],
                 counters: dict[str, int]) -> None:
        self.repository = repository
        #: the cache's bucket, or :class:`NotOpenError` if the cache is not open
        self._open_kv = open_kv
        self.sample_every = sample_every
        self._codec = codec
        self._l1 = l1
        self._watch = watch
        self.bucket = bucket
        self.key_prefix = key_prefix
        self.max_load_attempts = max_load_attempts
        self._mem, self._kvs, self._db = tiers
        self._by_source = dict(zip(CacheSource, tiers, strict=True))
        self.counters = counters
        self._flights: dict[str, _Flight] = {}

    async def lookup(self, id: EntityId) -> tuple[CacheEntry[T], bool]:
        """(entry, served by L1?): the timed hit (one in N, kept cheap) and every miss."""
        mem = self._mem
        timed = mem.hits % self.sample_every == 0
        t0 = time.perf_counter() if timed else 0.0
        key = id if type(id) is str else cache_key(id)
        entry = self._l1.get(key)
        if entry is not None and entry.expires_at > self._l1.clock():
            self._l1.move_to_end(key)
            mem.hits += 1
            if timed:
                mem.samples.append(time.perf_counter() - t0)
            return entry, True
        key = cache_key(key)  # a str id: is it a valid key?
        miss = self._miss(key, id, self._open_kv(), t0 if timed else time.perf_counter(), entry)
        return await miss, False

    async def _miss(self, key: str, id: EntityId, kv: KVBucket, t0: float,
                   expired: CacheEntry[T] | None) -> CacheEntry[T]:
        """Single-flight: the first miss of ``key`` starts a load, the others await it."""
        self._l1.expire(key, expired)
        self._mem.misses += 1
        flight = self._flights.get(key)
        if flight is None:
            flight = _Flight(self._watch.epoch)
            self._flights[key] = flight  # before the task runs: the watch must see it
            flight.task = asyncio.create_task(self._load(key, id, kv, flight))
            flight.task.add_done_callback(_retrieve)
            self.counters["loads"] += 1
        else:
            self.counters["coalesced"] += 1
        assert flight.task is not None
        try:
            entry = await asyncio.shield(flight.task)
        except NotFoundError:
            self.counters["not_found"] += 1
            raise
        except BaseException:
            self.counters["errors"] += 1
            raise
        stats = self._by_source[entry.source]
        stats.served += 1
        stats.samples.append(time.perf_counter() - t0)
        return entry

    async def _load(self, key: str, id: EntityId, kv: KVBucket, flight: _Flight
                    ) -> CacheEntry[T]:
        """Read through L2/L3; install only if no newer change was notified meanwhile.

        ``max_load_attempts`` bounds the KV reads of all attempts together: lost races (see
        :meth:`_read_through`) and loads made stale by a notification both use one up.
        """
        try:
            budget = self.max_load_attempts
            while True:
                entry, cached, used = await self._read_through(key, id, kv, budget)
                budget -= used
                if entry.revision >= flight.notified_rev:
                    if cached and flight.installable and self._watch.can_install(flight.epoch):
                        self._l1.install(key, entry)
                    return entry
                self.counters["stale_loads"] += 1
                if budget <= 0:  # newer than anything notified before this attempt
                    return entry  # not installed
        finally:
            if self._flights.get(key) is flight:
                del self._flights[key]

    async def _read_through(self, key: str, id: EntityId, kv: KVBucket, attempts: int
                            ) -> tuple[CacheEntry[T], bool, int]:
        """(entry, is it what KV holds?, KV reads used): L2, else L3 put back into L2.

        L3's value goes back with a compare-and-set over what the KV read found (nothing, or
        a delete marker), so it never overwrites a newer write; a lost race re-reads KV. If
        every attempt loses, L3's value is returned uncached, with revision 0.
        """
        kkey = join_key(self.key_prefix, key)
        last = 0  # what the compare-and-set expects: 0, or the delete marker's revision
        loaded: list[T] = []
        created = 0

        async def read_kv() -> KVRead[CacheEntry[T]]:
            nonlocal last
            last = 0
            try:
                with kv_errors(f"read {kkey!r} from bucket {self.bucket!r}"):
                    got = await kv.get(kkey)
            except nats.js.errors.KeyNotFoundError as e:
                self._kvs.misses += 1
                if e.entry is not None and e.entry.revision:  # a delete marker: CAS over it
                    last = int(e.entry.revision)
                return _MISS  # for the cache, a delete marker only means "load from L3"
            self._kvs.hits += 1
            value = self._codec.decode(got.value, kkey)
            return KVRead("hit", self._l1.entry(value, CacheSource.KV, int(got.revision)))

        async def load() -> bytes:
            try:
                with l3_errors(self.repository, f"find {key!r}"):
                    value = await self.repository.find(id)
            except NotFoundError:
                self._db.misses += 1
                raise
            self._db.hits += 1
            loaded[:] = [value]
            return self._codec.encode(value)

        async def create(data: bytes) -> bool:
            nonlocal created
            try:  # only repopulates L2 with what L3 holds: a timeout needs no L1 caution
                with kv_errors(f"repopulate {kkey!r} in bucket {self.bucket!r}"):
                    created = int(await kv.update(kkey, data, last=last))
            except nats.js.errors.KeyWrongLastSequenceError:
                self.counters["kv_races"] += 1  # someone wrote (or deleted) since our read
                return False
            return True

        def entity(_data: bytes) -> CacheEntry[T]:  # the object L3 returned, not a re-decode
            return self._l1.entry(loaded[0], CacheSource.DB, created)

        result = await read_through(read_kv, load, create, entity, attempts=attempts)
        assert result.value is not None  # load raises NotFoundError rather than answer None
        return result.value, result.races < attempts, min(result.races + 1, attempts)

    # ---------------------------------------------------------------- what writes tell us

    def note_change(self, key: str, revision: int) -> None:
        """``revision`` of ``key`` exists (a write, or the watch): a load of it must be newer."""
        flight = self._flights.get(key)
        if flight is not None and revision > flight.notified_rev:
            flight.notified_rev = revision

    def write_failed(self, key: str) -> None:
        """A write of ``key`` raised but may land: its load in flight may not install."""
        flight = self._flights.get(key)
        if flight is not None:  # it may have read the value before the write lands
            flight.installable = False

    async def wait(self) -> None:
        """Wait for every load in flight (their errors are their waiters')."""
        tasks = [f.task for f in self._flights.values() if f.task is not None]
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)


def _retrieve(task: asyncio.Task[Any]) -> None:
    """Done callback: mark a load's exception retrieved (its waiters may all be gone)."""
    if not task.cancelled():
        task.exception()


__all__ = ["Loader"]
