"""Tiered cache (seed 4.3): L1 process memory → L2 NATS KV → L3 any repository (SQL).

::

    GET  find(id)
      │ L1: OrderedDict lookup + TTL check ──hit──▶ value   (sync: no await, no lock, no I/O)
      │ miss / expired
      ▼
      in-flight load for id? ──yes──▶ await the same future (single-flight: 1 load for N misses)
      │ no: start one, register it (its ``notified_rev`` starts at 0)
      ▼        ┄┄┄ _readthrough.read_through(read_kv, load, create), to the re-read ┄┄┄
      L2: KV direct get ──hit──▶ CacheEntry(source=KV, revision) ─────────────────┐
      │ no value (never cached, expired by max age, or a delete marker at rev d)  │
      ▼                                                                          │
      L3: repository.find(id) ──NotFoundError──▶ raised to every waiter, not cached
      │ entity                                                                   │
      ▼                                                                          │
      KV update(last=d)  (compare-and-set: never over a newer value)             │
      │ ok ──▶ CacheEntry(source=DB, revision=new)                               │
      │ lost the race ──▶ read KV again (someone newer wrote) ───────────────────┤
      ▼                                                                          ▼
      install into L1 only if revision >= notified_rev (else load again), LRU-bounded

    INVALIDATE  (another process, or this one: put / invalidate / save / delete)
      KV put or delete marker on $KV.<bucket>.<prefix>.<key>  (revision r, server timestamp)
        │ ordered push consumer, deliver policy NEW, headers only (one per cache)
        ▼
      watcher callback ──▶ in-flight load for key?  notified_rev = max(notified_rev, r)
                       ──▶ L1 entry with revision < r?  drop it
                       ──▶ latency sample: now - message timestamp;  seen_revision = r

    FAILED WRITE  (put / invalidate raised: timeout, unavailable, cancelled)
      the write may still land ──▶ drop L1[key]; the in-flight load of key may not install

    NATS DISCONNECT / RECONNECT  (Connection.add_listener, from nats-py's callbacks)
      disconnect ──▶ drop all of L1, epoch += 1, untrusted: no installs (finds go to L2)
      reconnect  ──▶ drop all of L1 again, epoch += 1, wake the watch keeper (one Worker)
                       │ unsubscribe the old watch; subscribe anew (deliver NEW), retrying
                       │ until JetStream answers; reconnected again meanwhile? start over
                       ▼
                     epoch += 1, trusted: installs resume (loads begun before are refused)
                       │ stream info: seen_revision = max(seen, last_seq): every revision
                       ▼ up to it is in KV, or comes through the new watch
                     waiters up to last_seq released

Read it in the order a ``find`` runs: here the L1 hit (:meth:`TieredCacheRepository.find`),
then :mod:`msstore._loader` (the timed hit, single-flight, :mod:`msstore._readthrough`'s KV →
SQL → compare-and-set, the install), with L1 in :mod:`msstore._l1`. The writes are here;
:mod:`msstore._watch` is the watch and the outage handling, :mod:`msstore._cache_io` the L2/L3
protocols, their errors and the entity codec, :mod:`msstore._cache_stats` the metrics.

Guarantee: once the watcher has processed revision ``r`` of a key (``wait_for_revision(r)``
returns), :meth:`find` never returns a value of that key older than ``r``. A load that began
before the notification cannot install its older value afterwards: installs are checked
against the revisions notified while the load ran.

Errors: everything a public method raises is an :class:`~msstore.errors.MsstoreError`
(cancellation aside). NATS and PostgreSQL outages are :class:`StoreUnavailableError`,
timeouts :class:`StoreTimeoutError`; a write that timed out may still be applied.

What differs from the seed's pseudocode: L1 is bounded (LRU + TTL); concurrent misses share
one load; the L2 repopulation is a compare-and-set, not a blind ``put``; L1s of other processes
are kept coherent by the KV watch, not only by TTL; every tier is measured: on the L1 hit
path at the cost of one int increment (see :mod:`msstore._cache_stats`).
"""

from __future__ import annotations

import dataclasses
import time
from collections import OrderedDict, deque
from collections.abc import Callable
from types import TracebackType
from typing import TYPE_CHECKING, Any, Generic, TypeVar

from . import _nats
from ._background import Worker
from ._cache_io import EntityCodec, EntityId, Finder, KVBucket, cache_key, kv_errors, l3_errors
from ._cache_stats import COUNTERS, TierStats, invalidations_frame, samples_frame, stats_frame
from ._check import non_negative_int, not_open, optional_seconds, positive_int, positive_seconds
from ._l1 import L1, CacheEntry, CacheSource, L1HighWater
from ._loader import Loader
from ._publish import publish_delete, publisher
from ._watch import KVWatch
from .errors import InvalidOptionError, InvalidValueError
from .keys import encode_token, join_key
from .kv import DEFAULT_TTL_SECONDS, check_bucket_name, ensure_bucket

if TYPE_CHECKING:
    import pandas as pd

    from .connection import Connection

T = TypeVar("T")


class TieredCacheRepository(Generic[T]):
    """Read-through cache L1 memory → L2 NATS KV → L3 ``repository``, coherent across processes.

    ::

        repo = await AgentRepository.open(ms)
        async with TieredCacheRepository(ms, repo, bucket="agent_cache",
                                         entity_type=Agent) as cache:
            agent = await cache.find(agent_id)        # DB, then KV, then MEMORY
            cache.peek(agent_id)                      # L1 only, synchronous
            await cache.save(agent.replace(status="busy"))   # L3 write + KV + own L1
            cache.stats()                             # DataFrame, one row per tier

    Values in KV are ``codec.dumps(to_dict(entity))`` under ``<key_prefix>.<id>``; defaults:
    dataclasses go through ``dataclasses.asdict`` and ``entity_type(**data)``, anything else is
    stored as plain JSON. L1 holds values by reference: do not mutate what ``find`` returns.

    ``ms=None`` with an explicit ``kv`` runs without a watch (unit tests): L1 is then
    coherent only through its TTL and this process' own writes.

    With ``ms``, the cache listens to the connection: L1 is emptied when NATS disconnects
    and again when it reconnects, and the watch is rebuilt at once (see the module docs).
    """

    #: the most entries L1 ever held (never above ``l1_max_entries``)
    l1_high_water = L1HighWater()

    def __init__(self, ms: Connection | None, repository: Finder[T], *,
                 bucket: str = "cache", key_prefix: str = "entity",
                 l1_max_entries: int = 10_000, l1_ttl: float | None = 60.0,
                 kv_ttl: float | None = DEFAULT_TTL_SECONDS,
                 entity_type: type[T] | None = None,
                 to_dict: Callable[[T], Any] | None = None,
                 from_dict: Callable[[Any], T] | None = None,
                 id_of: Callable[[T], EntityId] | None = None,
                 kv: KVBucket | None = None, watch: bool = True,
                 evict_interval: float | None = None,
                 clock: Callable[[], float] = time.monotonic,
                 latency_sample_every: int = 64, max_samples: int = 100_000,
                 max_load_attempts: int = 3) -> None:
        if ms is None and kv is None:
            raise InvalidOptionError("TieredCacheRepository needs a connection (ms) or a kv "
                                     "bucket; pass ms=await msstore.connect()")
        self.ms = ms
        self.repository = repository
        self.bucket = check_bucket_name(bucket)
        self.key_prefix = encode_token(key_prefix)
        self.l1_max_entries = positive_int("l1_max_entries", l1_max_entries)
        self.l1_ttl = optional_seconds("l1_ttl", l1_ttl)
        self.kv_ttl = optional_seconds("kv_ttl", kv_ttl)
        self.evict_interval = optional_seconds("evict_interval", evict_interval) \
            or min(self.l1_ttl or 60.0, 60.0) / 2
        self.latency_sample_every = positive_int("latency_sample_every", latency_sample_every)
        self.max_load_attempts = positive_int("max_load_attempts", max_load_attempts)
        positive_int("max_samples", max_samples)
        if not callable(clock):
            raise InvalidOptionError(f"clock must be a callable returning seconds, got {clock!r}")
        self._codec = EntityCodec(bucket=self.bucket, entity_type=entity_type, to_dict=to_dict,
                                  from_dict=from_dict, id_of=id_of)
        self._kv: KVBucket | None = kv
        self._clock = clock
        self.counters: dict[str, int] = dict.fromkeys(COUNTERS, 0)
        self._l1 = L1(self.l1_max_entries, self.l1_ttl, clock, self.counters)
        self._tiers = (TierStats(max_samples), TierStats(max_samples), TierStats(max_samples))
        self._mem = self._tiers[0]  # memory, kv, db: the hit path counts L1 hits here
        #: (revision, seconds from the KV write to the watcher handling it, L1 entry dropped?)
        self.invalidation_samples: deque[tuple[int, float, bool]] = deque(maxlen=max_samples)
        self._watch = KVWatch(ms, self.bucket, self.key_prefix, watch=watch,
                              on_change=self._changed, on_distrust=self._l1.reset,
                              counters=self.counters, samples=self.invalidation_samples)
        self._loader = Loader(repository, self._codec, self._l1, self._watch, self._check_kv,
                              bucket=self.bucket, key_prefix=self.key_prefix,
                              max_load_attempts=self.max_load_attempts,
                              sample_every=self.latency_sample_every, tiers=self._tiers,
                              counters=self.counters)
        self._evictor: Worker | None = None
        self._started = False
        self._closed = False

    # ---------------------------------------------------------------- lifecycle

    @classmethod
    async def open(cls, ms: Connection, repository: Finder[T], **options: Any
                   ) -> TieredCacheRepository[T]:
        """Create and start a cache (the non-``async with`` spelling)."""
        cache = cls(ms, repository, **options)
        await cache.start()
        return cache

    async def start(self) -> None:
        """Open the bucket, start the watch (before any read) and the background evictor.

        Listens to the connection first, so an outage during start is not missed. If start
        fails, the cache is left unstarted (start may be retried).
        """
        if self._started or self._closed:
            raise not_open("this TieredCacheRepository",
                           "closed" if self._closed else "already started",
                           "start() runs once per cache; create a new one")
        self._started = True
        try:
            self._watch.listen()
            if self._kv is None:
                assert self.ms is not None
                with kv_errors(f"open bucket {self.bucket!r}"):
                    self._kv = await ensure_bucket(
                        self.ms.js, self.bucket, ttl=self.kv_ttl,
                        description="msstore tiered cache (L2)")
            await self._watch.start()
        except BaseException:
            self._started = False
            self._watch.stop_listening()
            raise
        self._evictor = Worker(f"cache-evict-{self.bucket}", self._evict,
                               interval=self.evict_interval, base_backoff=0.0, max_backoff=0.0)
        self._evictor.start()

    async def close(self) -> None:
        """Stop the watch and the evictor, wait for in-flight loads; L1 is cleared."""
        if self._closed:
            return
        self._closed = True
        await self._watch.close()
        if self._evictor is not None:
            await self._evictor.stop()
        await self._loader.wait()
        self._l1.clear()

    async def __aenter__(self) -> TieredCacheRepository[T]:
        if not self._started:
            await self.start()
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None,
                        exc: BaseException | None, tb: TracebackType | None) -> None:
        await self.close()

    # ---------------------------------------------------------------- keys

    def kv_key(self, id: EntityId) -> str:
        """The L2 key of ``id``: ``<key_prefix>.<encoded id>``."""
        return join_key(self.key_prefix, cache_key(id))

    def _check_kv(self) -> KVBucket:
        if self._kv is None or not self._started or self._closed:
            raise not_open("this TieredCacheRepository",
                           "closed" if self._closed else "not open",
                           "use `async with TieredCacheRepository(…)` or "
                           "`await TieredCacheRepository.open(…)` (a closed one stays closed)")
        return self._kv

    # ---------------------------------------------------------------- reads (L1)

    async def find(self, id: EntityId) -> T:
        """The entity: L1, else L2, else L3; raises :class:`NotFoundError` if L3 has none."""
        mem = self._mem
        if mem.hits % self.latency_sample_every:  # not the one hit in N that is timed
            # the hit path: no await, lock, task or I/O; a str id is its own L1 key (any
            # other id misses here and takes the loader's lookup, which converts it)
            l1: OrderedDict[object, CacheEntry[T]] = self._l1  # type: ignore[assignment]
            try:
                entry = l1.get(id)
            except TypeError:  # unhashable id: lookup says what is wrong (no cost if not raised)
                entry = None
            if entry is not None and entry.expires_at > self._clock():
                l1.move_to_end(id)
                mem.hits += 1
                return entry.value
        return (await self._loader.lookup(id))[0].value

    async def find_entry(self, id: EntityId) -> CacheEntry[T]:
        """Like :meth:`find`, but the :class:`CacheEntry`, ``source`` = the tier that answered."""
        entry, hit = await self._loader.lookup(id)
        return dataclasses.replace(entry, source=CacheSource.MEMORY) if hit else entry

    def peek(self, id: EntityId) -> T | None:
        """The live L1 value or ``None``: synchronous, no I/O, no metrics, LRU order kept."""
        entry = self.peek_entry(id)
        return None if entry is None else entry.value

    def peek_entry(self, id: EntityId) -> CacheEntry[T] | None:
        """The live L1 entry (``source`` = where its value came from) or ``None``."""
        return self._l1.live(id if type(id) is str and id else cache_key(id))

    # ---------------------------------------------------------------- writes

    def _write_failed(self, key: str) -> None:
        """A write of ``key`` raised, but may still land: trust nothing we hold for it."""
        self.counters["failed_writes"] += 1
        self._l1.pop(key, None)
        self._loader.write_failed(key)

    async def put(self, id: EntityId, entity: T) -> int:
        """Write ``entity`` to L2 (blind put) and this process' L1; return the KV revision.

        Other processes drop their L1 copy when their watch sees the write. The caller keeps
        L3 up to date (or uses :meth:`save`). If the write raises (a timeout, an outage, a
        cancel), it may still be applied: this process' L1 drops the key either way.
        """
        kv = self._check_kv()
        key = cache_key(id)
        kkey = join_key(self.key_prefix, key)
        data = self._codec.encode(entity)
        epoch = self._watch.epoch
        try:
            with kv_errors(f"write {kkey!r} to bucket {self.bucket!r}", write=True):
                revision = int(await kv.put(kkey, data)) if self.ms is None or self.ms.nc is None \
                    else await publisher(self.ms.nc).publish(_nats.kv_prefix(self.bucket) + kkey,
                                                             data)
        except BaseException:
            self._write_failed(key)
            raise
        self.counters["puts"] += 1
        self._loader.note_change(key, revision)
        # the watch may be past a newer write (revision < seen), or was down meanwhile
        if revision >= self._watch.seen_revision and self._watch.can_install(epoch):
            self._l1.install(key, self._l1.entry(entity, CacheSource.MEMORY, revision))
        else:
            self._l1.pop(key, None)
        return revision

    async def invalidate(self, id: EntityId) -> int | None:
        """Drop ``id`` from L2 (a KV delete marker) and from L1; every process' watch sees it.

        Returns the marker's revision (``None`` when running on a bare ``kv`` without ``ms``).
        """
        kv = self._check_kv()
        key = cache_key(id)
        kkey = join_key(self.key_prefix, key)
        revision: int | None = None
        try:
            with kv_errors(f"delete {kkey!r} from bucket {self.bucket!r}", write=True):
                if self.ms is not None:
                    revision = await publish_delete(
                        self.ms.nc, _nats.kv_prefix(self.bucket) + kkey)
                else:
                    await kv.delete(kkey)
        except BaseException:
            self._write_failed(key)
            raise
        self._l1.pop(key, None)
        if revision is not None:
            self._loader.note_change(key, revision)
        return revision

    def evict(self, id: EntityId) -> bool:
        """Drop ``id`` from this process' L1 only (L2 keeps it); True if it was there."""
        return self._l1.pop(cache_key(id), None) is not None

    def clear_l1(self) -> None:
        """Empty this process' L1 (L2 and L3 are untouched)."""
        self._l1.clear()

    async def save(self, entity: T) -> T:
        """``repository.save(entity)``, then :meth:`put` the saved entity (L2 + own L1)."""
        saved: T = await self._write_through("save", entity)
        await self.put(self._codec.id_of(saved), saved)
        return saved

    async def update(self, entity: T, *args: Any, **kwargs: Any) -> T:
        """``repository.update(entity, …)`` (its concurrency check), then :meth:`put`."""
        saved: T = await self._write_through("update", entity, *args, **kwargs)
        await self.put(self._codec.id_of(saved), saved)
        return saved

    async def delete(self, id: EntityId) -> None:
        """``repository.delete(id)``, then :meth:`invalidate` it in every process."""
        cache_key(id)
        await self._write_through("delete", id)
        await self.invalidate(id)

    async def _write_through(self, name: str, *args: Any, **kwargs: Any) -> Any:
        """Call L3's ``name``, checked open first: never an L3 write the cache cannot follow.

        If it fails, L2 still holds the old value, so dropping L1 would change nothing.
        """
        self._check_kv()
        method = getattr(self.repository, name, None)
        if method is None:
            raise InvalidValueError(
                f"the L3 repository {type(self.repository).__name__} has no {name}(); "
                f"write through it directly and call put()/invalidate() on the cache")
        with l3_errors(self.repository, name, write=True):
            return await method(*args, **kwargs)

    # ---------------------------------------------------------------- coherence

    def _changed(self, key: str, revision: int) -> bool:
        """The watch saw ``revision`` of ``key``: note it for its load, drop an older L1 copy."""
        self._loader.note_change(key, revision)
        return self._l1.drop_older(key, revision)

    @property
    def seen_revision(self) -> int:
        """The highest KV revision of this cache's keys the watch has processed."""
        return self._watch.seen_revision

    async def wait_for_revision(self, revision: int, within: float = 10.0) -> None:
        """Return once the watch has processed ``revision`` (the result of a put elsewhere)."""
        if not self._watch.enabled:
            raise InvalidOptionError("this cache has no watch (ms=None or watch=False)")
        positive_seconds("within", within)
        non_negative_int("revision", revision)
        self._check_kv()
        await self._watch.wait_for_revision(revision, within)

    # ---------------------------------------------------------------- expiry

    def evict_expired(self) -> int:
        """Drop every expired L1 entry now; return how many (also runs in the background)."""
        return self._l1.evict_expired()

    async def _evict(self) -> None:
        """Evictor step, every ``evict_interval`` (a Worker).

        Failure policy: a sweep that raises (a bug) is logged and the next one runs an interval
        later; nothing is lost, as the next sweep covers every entry again.
        """
        self._l1.evict_expired()

    # ---------------------------------------------------------------- metrics

    def __len__(self) -> int:
        return len(self._l1)

    @property
    def calls(self) -> int:
        """Number of find/find_entry calls so far (= L1 hits + L1 misses)."""
        return self._mem.hits + self._mem.misses

    def stats(self) -> pd.DataFrame:
        """One row per tier: lookups, hits, misses, hit_rate, served, share, p50/p99 ms.

        ``hit_rate`` is per lookup *at that tier*; ``share`` is the fraction of all calls that
        tier answered. ``df.attrs`` holds the counters, L1 size and invalidation latency.
        """
        return stats_frame(self._tiers, self.invalidation_samples, {
            **self.counters, "l1_size": len(self._l1), "l1_max_entries": self.l1_max_entries,
            "l1_high_water": self.l1_high_water})

    def samples(self) -> pd.DataFrame:
        """Raw latency samples: one row per sampled call, columns ``source``, ``latency_ms``."""
        return samples_frame(self._tiers)

    def invalidation_latencies(self) -> pd.DataFrame:
        """One row per watch notification: ``revision``, ``latency_ms``, ``dropped``.

        Latency is the watcher's wall clock minus the server's timestamp of the KV write, so it
        includes any clock difference between the machines (none on one host).
        """
        return invalidations_frame(self.invalidation_samples)


__all__ = ["CacheEntry", "CacheSource", "Finder", "KVBucket", "TieredCacheRepository"]
