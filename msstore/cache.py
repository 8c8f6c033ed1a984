"""Tiered cache (seed 4.3): L1 process memory → L2 NATS KV → L3 any repository (SQL).

::

    GET  find(id)
      │ L1: OrderedDict lookup + TTL check ──hit──▶ value   (sync: no await, no lock, no I/O)
      │ miss / expired
      ▼
      in-flight load for id? ──yes──▶ await the same future (single-flight: 1 load for N misses)
      │ no: start one, register it (its ``notified_rev`` starts at 0)
      ▼
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
      reconnect  ──▶ drop all of L1 again, epoch += 1, wake the watch keeper (one task)
                       │ unsubscribe the old watch; subscribe anew (deliver NEW), retrying
                       │ until JetStream answers; reconnected again meanwhile? start over
                       ▼
                     epoch += 1, trusted: installs resume (loads begun before are refused)
                       │ stream info: seen_revision = max(seen, last_seq): every revision
                       ▼ up to it is in KV, or comes through the new watch
                     waiters up to last_seq released

Guarantee: once the watcher has processed revision ``r`` of a key (``wait_for_revision(r)``
returns), :meth:`find` never returns a value of that key older than ``r``. A load that began
before the notification cannot install its older value afterwards: installs are checked
against the revisions notified while the load ran.

Why the reconnect path: nats-py rebuilds an ordered consumer only after two missed idle
heartbeats (5 s each), so without it another process' L1 served old values for 5–6 s after
a NATS restart. Changes made while the watch was down are never replayed (deliver NEW), which
is why L1 is emptied, and loads that began before the new watch existed may not install.
Not covered: a silent network partition (no TCP reset) is noticed only when nats-py's pings
fail, and L1 is trusted until then.

Errors: everything a public method raises is an :class:`~msstore.errors.MsstoreError`
(cancellation aside). NATS and PostgreSQL outages are :class:`StoreUnavailableError`,
timeouts :class:`StoreTimeoutError`; a write that timed out may still be applied.

What differs from the seed's pseudocode: L1 is bounded (LRU + TTL); concurrent misses share
one load; the L2 repopulation is a compare-and-set, not a blind ``put``; L1s of other processes
are kept coherent by the KV watch, not only by TTL; every tier is measured.

Metrics: every ``find`` counts one L1 hit or miss, so ``memory.hits + memory.misses`` equals the
number of calls; each call is *served* by exactly one of MEMORY, KV, DB or ends in not-found /
error. On the L1 hit path the cost is one int increment; only every N-th hit
(``latency_sample_every=N``, default 64) takes a ``perf_counter`` pair and appends a latency
sample, because timing every hit would cost more than the hit itself. Misses are always timed.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import enum
import logging
import math
import time
import uuid
from collections import OrderedDict, deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from types import TracebackType
from typing import TYPE_CHECKING, Any, Final, Generic, Protocol, TypeVar

import asyncpg
import nats.errors
import nats.js.errors
from nats.aio.msg import Msg
from nats.js.api import DeliverPolicy

from ._check import non_negative_int, not_open, optional_seconds, positive_int, positive_seconds
from .codec import dumps, loads
from .errors import (
    InvalidKeyError,
    InvalidOptionError,
    InvalidValueError,
    MsstoreError,
    NotFoundError,
    NotSerializableError,
    StoreTimeoutError,
    StoreUnavailableError,
)
from .keys import check_key, encode_token, join_key, split_key
from .kv import DEFAULT_TTL_SECONDS, check_bucket_name, ensure_bucket
from .kv import nats_errors as _nats_errors

if TYPE_CHECKING:
    import pandas as pd

    from .connection import Connection

log = logging.getLogger("msstore.cache")

T = TypeVar("T")
T_co = TypeVar("T_co", covariant=True)
EntityId = uuid.UUID | str

KV_OPERATION: Final = "KV-Operation"
TIERS: Final = ("memory", "kv", "db")


class CacheSource(enum.Enum):
    """Where a value came from: this process' memory, NATS KV, or the repository (SQL)."""

    MEMORY = "memory"
    KV = "kv"
    DB = "db"


@dataclass(frozen=True, slots=True)
class CacheEntry(Generic[T]):
    """One cached value, as the seed's ``CacheEntry`` plus the KV revision it corresponds to.

    ``timestamp`` is the cache clock (monotonic by default) when the entry was made, ``ttl`` its
    L1 lifetime in seconds (``None``: until evicted or invalidated). In L1, ``source`` says where
    the value came from (MEMORY for a local ``put``); from :meth:`TieredCacheRepository.
    find_entry` it says which tier answered that call.
    """

    value: T
    timestamp: float
    ttl: float | None
    source: CacheSource
    revision: int
    expires_at: float

    def is_valid(self, now: float) -> bool:
        return self.expires_at > now


class Finder(Protocol[T_co]):
    """L3: anything with the Repository's ``find`` (``msstore.repository.AgentRepository``)."""

    async def find(self, id: uuid.UUID | str) -> T_co: ...


class KVBucket(Protocol):
    """The part of nats-py's ``KeyValue`` the cache uses (so tests can pass a fake)."""

    async def get(self, key: str) -> Any: ...

    async def put(self, key: str, value: bytes) -> int: ...

    async def update(self, key: str, value: bytes, last: int | None = None) -> int: ...

    async def delete(self, key: str) -> bool: ...


class _TierStats:
    __slots__ = ("hits", "misses", "samples", "served")

    def __init__(self, max_samples: int) -> None:
        self.hits = 0
        self.misses = 0
        self.served = 0
        #: seconds per call served by this tier (whole ``find``, L1 check included)
        self.samples: deque[float] = deque(maxlen=max_samples)


class _Flight:
    """One in-flight L2/L3 load; ``notified_rev`` is the highest change the watch reported.

    ``epoch`` is the cache's trust epoch when the load began: a disconnect, reconnect or new
    watch in between means changes may have gone unnotified, so the load must not install.
    ``installable`` is cleared by a failed write of the key (it may land after our read).
    """

    __slots__ = ("epoch", "installable", "notified_rev", "task")

    def __init__(self, epoch: int) -> None:
        self.notified_rev = 0
        self.epoch = epoch
        self.installable = True
        self.task: asyncio.Task[CacheEntry[Any]] | None = None


class _LostRace(Exception):
    """The key was deleted in KV between our L3 read and the L2 repopulation."""


#: KV's answers the cache interprets itself; any other nats-py error is an outage
_KV_ANSWERS: Final = (nats.js.errors.KeyNotFoundError, nats.js.errors.KeyWrongLastSequenceError)

_MAY_LAND: Final = ("the write may still be applied once the server answers (its outcome is "
                    "unknown): read the key back before assuming it was not")


@contextlib.contextmanager
def _nats(what: str, *, write: bool = False) -> Iterator[None]:
    """``kv.nats_errors`` plus: other KV answers are errors too; timed-out writes may land."""
    try:
        with _nats_errors(what):
            yield
    except _KV_ANSWERS:
        raise
    except nats.js.errors.KeyValueError as e:
        raise StoreUnavailableError(f"NATS KV refused to {what}: {e!r}") from e
    except StoreTimeoutError as e:
        if not write:
            raise
        raise StoreTimeoutError(f"{e}; {_MAY_LAND}") from e.__cause__


#: PostgreSQL (asyncpg) errors that mean "not reachable now", not "wrong request"
_PG_LOST: Final = (OSError, asyncpg.InterfaceError, asyncpg.PostgresConnectionError,
                   asyncpg.exceptions.OperatorInterventionError)


@contextlib.contextmanager
def _l3(repository: object, what: str, *, write: bool = False) -> Iterator[None]:
    """Errors of the L3 repository as msstore's: its own pass, asyncpg's are translated.

    Anything else it raises (a bug, a foreign library) becomes a plain :class:`MsstoreError`
    with the original as its cause, so callers need one ``except``.
    """
    name = type(repository).__name__
    try:
        yield
    except MsstoreError:
        raise
    except (TimeoutError, asyncpg.QueryCanceledError) as e:
        raise StoreTimeoutError(f"L3 {name} did not answer in time to {what}: {e!r}"
                                f"{'; ' + _MAY_LAND if write else ''}") from e
    except _PG_LOST as e:
        raise StoreUnavailableError(f"L3 {name} cannot reach PostgreSQL to {what}: {e!r}") from e
    except Exception as e:
        raise MsstoreError(f"L3 {name} failed to {what}: {e!r}") from e


def _default_to_dict(entity: Any) -> Any:
    if dataclasses.is_dataclass(entity) and not isinstance(entity, type):
        return dataclasses.asdict(entity)
    return entity


def _identity(data: Any) -> Any:
    return data


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
        self._to_dict: Callable[[T], Any] = to_dict or _default_to_dict
        if from_dict is not None:
            self._from_dict: Callable[[Any], Any] = from_dict
        elif entity_type is None:
            self._from_dict = _identity
        elif dataclasses.is_dataclass(entity_type):
            self._from_dict = lambda data: entity_type(**data)
        else:
            raise InvalidOptionError(
                f"entity_type {getattr(entity_type, '__name__', entity_type)!r} is not a "
                "dataclass: pass from_dict= (and to_dict=) to say how it is stored as JSON")
        self._id_of = id_of or (lambda entity: entity.id)  # type: ignore[attr-defined]
        self._kv: KVBucket | None = kv
        self._watch = watch and ms is not None
        self._clock = clock
        self._l1: OrderedDict[str, CacheEntry[T]] = OrderedDict()
        self._flights: dict[str, _Flight] = {}
        self._mem = _TierStats(max_samples)
        self._kvs = _TierStats(max_samples)
        self._db = _TierStats(max_samples)
        self._by_source = {CacheSource.MEMORY: self._mem, CacheSource.KV: self._kvs,
                           CacheSource.DB: self._db}
        #: (revision, seconds from the KV write to the watcher handling it, L1 entry dropped?)
        self.invalidation_samples: deque[tuple[int, float, bool]] = deque(maxlen=max_samples)
        self.counters: dict[str, int] = dict.fromkeys(
            ("coalesced", "not_found", "errors", "loads", "stale_loads", "evictions",
             "expirations", "notifications", "invalidations", "puts", "kv_races",
             # disconnect/reconnect: L1 emptied, watches rebuilt; writes whose outcome is unknown
             "l1_resets", "rewatches", "failed_writes"), 0)
        #: the most entries L1 ever held (never above ``l1_max_entries``)
        self.l1_high_water = 0
        self._seen_revision = 0
        self._waiters: list[tuple[int, asyncio.Future[None]]] = []
        self._sub: Any = None
        self._evictor: asyncio.Task[None] | None = None
        self._started = False
        self._closed = False
        # L1 trust across NATS outages: installs need _trusted and an unchanged _epoch
        self._epoch = 0
        self._trusted = True
        self._connected = True
        self._unlisten: Callable[[], None] | None = None
        self._reconnected = asyncio.Event()
        self._keeper: asyncio.Task[None] | None = None

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
            if self.ms is not None:
                self._unlisten = self.ms.add_listener(on_disconnect=self._on_disconnect,
                                                      on_reconnect=self._on_reconnect)
            if self._kv is None:
                assert self.ms is not None
                with _nats(f"open bucket {self.bucket!r}"):
                    self._kv = await ensure_bucket(
                        self.ms.js, self.bucket, ttl=self.kv_ttl,
                        description="msstore tiered cache (L2)")
            if self._watch:
                self._sub = await self._subscribe()
                self._keeper = asyncio.create_task(self._keep_watch(),
                                                   name=f"msstore-cache-watch-{self.bucket}")
        except BaseException:
            self._started = False
            self._stop_listening()
            raise
        self._evictor = asyncio.create_task(self._evict_loop(),
                                            name=f"msstore-cache-evict-{self.bucket}")

    async def close(self) -> None:
        """Stop the watch and the evictor, wait for in-flight loads; L1 is cleared."""
        if self._closed:
            return
        self._closed = True
        self._stop_listening()
        for task in (self._evictor, self._keeper):
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        if self._sub is not None:
            with contextlib.suppress(Exception):
                await self._sub.unsubscribe()
        flights = [f.task for f in self._flights.values() if f.task is not None]
        if flights:
            await asyncio.gather(*flights, return_exceptions=True)
        for _rev, fut in self._waiters:
            if not fut.done():
                fut.set_exception(StoreUnavailableError("the cache was closed while waiting"))
        self._waiters.clear()
        self._l1.clear()

    def _stop_listening(self) -> None:
        if self._unlisten is not None:
            self._unlisten()
            self._unlisten = None

    async def __aenter__(self) -> TieredCacheRepository[T]:
        if not self._started:
            await self.start()
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None,
                        exc: BaseException | None, tb: TracebackType | None) -> None:
        await self.close()

    # ---------------------------------------------------------------- keys and values

    @staticmethod
    def _key(id: object) -> str:
        if isinstance(id, uuid.UUID):
            return str(id)
        try:
            return check_key(id)
        except InvalidKeyError as e:
            raise InvalidKeyError(f"cache ids must be a UUID or a non-empty str: {e}") from e

    def kv_key(self, id: EntityId) -> str:
        """The L2 key of ``id``: ``<key_prefix>.<encoded id>``."""
        return join_key(self.key_prefix, self._key(id))

    def _encode(self, entity: T) -> bytes:
        try:
            data = self._to_dict(entity)
        except MsstoreError:
            raise
        except Exception as e:  # the caller's to_dict: say which value and why
            raise NotSerializableError(
                f"to_dict failed on {type(entity).__name__} {entity!r:.80}: {e!r}") from e
        return dumps(data)

    def _decode(self, data: bytes | None, kkey: str) -> T:
        try:
            value: T = self._from_dict(loads(data or b"null"))
        except MsstoreError:
            raise
        except Exception as e:  # not JSON, or JSON that from_dict / entity_type refuses
            raise InvalidValueError(
                f"the value of {kkey!r} in bucket {self.bucket!r} cannot be decoded: {e!r}; "
                "another writer, or a changed entity_type/from_dict?") from e
        return value

    def _entry(self, value: T, source: CacheSource, revision: int) -> CacheEntry[T]:
        now = self._clock()
        ttl = self.l1_ttl
        return CacheEntry(value, now, ttl, source, revision,
                          math.inf if ttl is None else now + ttl)

    def _check_kv(self) -> KVBucket:
        if self._kv is None or not self._started or self._closed:
            raise not_open("this TieredCacheRepository",
                           "closed" if self._closed else "not open",
                           "use `async with TieredCacheRepository(…)` or "
                           "`await TieredCacheRepository.open(…)` (a closed one stays closed)")
        return self._kv

    # ---------------------------------------------------------------- reads

    async def find(self, id: EntityId) -> T:
        """The entity: L1, else L2, else L3; raises :class:`NotFoundError` if L3 has none."""
        mem = self._mem
        if mem.hits % self.latency_sample_every:  # not the one hit in N that is timed
            # the hit path: no await, lock, task or I/O; a str id is its own L1 key (any
            # other id misses here and takes _lookup, which converts it)
            l1: OrderedDict[object, CacheEntry[T]] = self._l1  # type: ignore[assignment]
            try:
                entry = l1.get(id)
            except TypeError:  # unhashable id: _lookup says what is wrong (no cost if not raised)
                entry = None
            if entry is not None and entry.expires_at > self._clock():
                l1.move_to_end(id)
                mem.hits += 1
                return entry.value
        return (await self._lookup(id))[0].value

    async def find_entry(self, id: EntityId) -> CacheEntry[T]:
        """Like :meth:`find`, but the :class:`CacheEntry`, ``source`` = the tier that answered."""
        entry, hit = await self._lookup(id)
        return dataclasses.replace(entry, source=CacheSource.MEMORY) if hit else entry

    async def _lookup(self, id: EntityId) -> tuple[CacheEntry[T], bool]:
        """(entry, served by L1?): the timed hit (one in N, kept cheap) and every miss."""
        mem = self._mem
        timed = mem.hits % self.latency_sample_every == 0
        t0 = time.perf_counter() if timed else 0.0
        key = id if type(id) is str else self._key(id)
        entry = self._l1.get(key)
        if entry is not None and entry.expires_at > self._clock():
            self._l1.move_to_end(key)
            mem.hits += 1
            if timed:
                mem.samples.append(time.perf_counter() - t0)
            return entry, True
        return await self._miss(key, id, t0 if timed else time.perf_counter(), entry), False

    def peek(self, id: EntityId) -> T | None:
        """The live L1 value or ``None``: synchronous, no I/O, no metrics, LRU order kept."""
        entry = self.peek_entry(id)
        return None if entry is None else entry.value

    def peek_entry(self, id: EntityId) -> CacheEntry[T] | None:
        """The live L1 entry (``source`` = where its value came from) or ``None``."""
        entry = self._l1.get(id if type(id) is str and id else self._key(id))
        if entry is None or entry.expires_at <= self._clock():
            return None
        return entry

    async def _miss(self, key: str, id: EntityId, t0: float,
                    expired: CacheEntry[T] | None) -> CacheEntry[T]:
        key = self._key(key)
        self._check_kv()
        if expired is not None and self._l1.get(key) is expired:
            del self._l1[key]
            self.counters["expirations"] += 1
        self._mem.misses += 1
        flight = self._flights.get(key)
        if flight is None:
            flight = _Flight(self._epoch)
            self._flights[key] = flight  # before the task runs: the watch must see it
            flight.task = asyncio.create_task(self._load(key, id, flight))
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

    async def _load(self, key: str, id: EntityId, flight: _Flight) -> CacheEntry[T]:
        """Load once per attempt; install only if no newer change was notified meanwhile."""
        try:
            entry: CacheEntry[T] | None = None
            for _attempt in range(self.max_load_attempts):
                try:
                    entry = await self._load_once(key, id)
                except _LostRace:
                    self.counters["kv_races"] += 1
                    continue
                if entry.revision >= flight.notified_rev:
                    if flight.installable and flight.epoch == self._epoch and self._trusted:
                        self._install(key, entry)
                    return entry
                self.counters["stale_loads"] += 1
            if entry is None:
                raise StoreUnavailableError(
                    f"could not load {key!r}: KV deleted it during each of "
                    f"{self.max_load_attempts} loads; retry, or raise max_load_attempts")
            return entry  # newer than anything notified before this attempt; not installed
        finally:
            if self._flights.get(key) is flight:
                del self._flights[key]

    async def _load_once(self, key: str, id: EntityId) -> CacheEntry[T]:
        kv = self._check_kv()
        kkey = join_key(self.key_prefix, key)
        last = 0
        try:
            with _nats(f"read {kkey!r} from bucket {self.bucket!r}"):
                got = await kv.get(kkey)
        except nats.js.errors.KeyNotFoundError as e:
            self._kvs.misses += 1
            if e.entry is not None and e.entry.revision:  # a delete marker: CAS over it
                last = int(e.entry.revision)
        else:
            self._kvs.hits += 1
            return self._entry(self._decode(got.value, kkey), CacheSource.KV, int(got.revision))
        try:
            with _l3(self.repository, f"find {key!r}"):
                value = await self.repository.find(id)
        except NotFoundError:
            self._db.misses += 1
            raise
        self._db.hits += 1
        data = self._encode(value)
        try:
            # only repopulates L2 with what L3 holds, so a timeout here needs no L1 caution
            with _nats(f"repopulate {kkey!r} in bucket {self.bucket!r}"):
                revision = await kv.update(kkey, data, last=last)
        except nats.js.errors.KeyWrongLastSequenceError:
            pass  # someone wrote (or deleted) since our KV miss: theirs is newer than our read
        else:
            return self._entry(value, CacheSource.DB, int(revision))
        try:
            with _nats(f"re-read {kkey!r} from bucket {self.bucket!r}"):
                got = await kv.get(kkey)
        except nats.js.errors.KeyNotFoundError as e:
            self._kvs.misses += 1
            raise _LostRace from e
        self._kvs.hits += 1
        return self._entry(self._decode(got.value, kkey), CacheSource.KV, int(got.revision))

    def _install(self, key: str, entry: CacheEntry[T]) -> None:
        current = self._l1.get(key)
        if current is not None and current.revision > entry.revision:
            return  # a newer value (our own put) got there first
        l1 = self._l1
        l1[key] = entry
        l1.move_to_end(key)
        while len(l1) > self.l1_max_entries:
            l1.popitem(last=False)
            self.counters["evictions"] += 1
        if len(l1) > self.l1_high_water:
            self.l1_high_water = len(l1)

    # ---------------------------------------------------------------- writes

    def _note_change(self, key: str, revision: int) -> None:
        flight = self._flights.get(key)
        if flight is not None and revision > flight.notified_rev:
            flight.notified_rev = revision

    def _write_failed(self, key: str) -> None:
        """A write of ``key`` raised, but may still land: trust nothing we hold for it."""
        self.counters["failed_writes"] += 1
        self._l1.pop(key, None)
        flight = self._flights.get(key)
        if flight is not None:  # it may have read the value before the write lands
            flight.installable = False

    async def put(self, id: EntityId, entity: T) -> int:
        """Write ``entity`` to L2 (blind put) and this process' L1; return the KV revision.

        Other processes drop their L1 copy when their watch sees the write. The caller keeps
        L3 up to date (or uses :meth:`save`). If the write raises (a timeout, an outage, a
        cancel), it may still be applied: this process' L1 drops the key either way.
        """
        kv = self._check_kv()
        key = self._key(id)
        kkey = join_key(self.key_prefix, key)
        data = self._encode(entity)
        epoch = self._epoch
        try:
            with _nats(f"write {kkey!r} to bucket {self.bucket!r}", write=True):
                revision = int(await kv.put(kkey, data))
        except BaseException:
            self._write_failed(key)
            raise
        self.counters["puts"] += 1
        self._note_change(key, revision)
        # the watch may be past a newer write (revision < seen), or was down meanwhile
        if revision >= self._seen_revision and epoch == self._epoch and self._trusted:
            self._install(key, self._entry(entity, CacheSource.MEMORY, revision))
        else:
            self._l1.pop(key, None)
        return revision

    async def invalidate(self, id: EntityId) -> int | None:
        """Drop ``id`` from L2 (a KV delete marker) and from L1; every process' watch sees it.

        Returns the marker's revision (``None`` when running on a bare ``kv`` without ``ms``).
        """
        kv = self._check_kv()
        key = self._key(id)
        kkey = join_key(self.key_prefix, key)
        revision: int | None = None
        try:
            with _nats(f"delete {kkey!r} from bucket {self.bucket!r}", write=True):
                if self.ms is not None:
                    ack = await self.ms.js.publish(f"$KV.{self.bucket}.{kkey}", b"",
                                                   headers={KV_OPERATION: "DEL"})
                    revision = int(ack.seq)
                else:
                    await kv.delete(kkey)
        except BaseException:
            self._write_failed(key)
            raise
        self._l1.pop(key, None)
        if revision is not None:
            self._note_change(key, revision)
        return revision

    def evict(self, id: EntityId) -> bool:
        """Drop ``id`` from this process' L1 only (L2 keeps it); True if it was there."""
        return self._l1.pop(self._key(id), None) is not None

    def clear_l1(self) -> None:
        """Empty this process' L1 (L2 and L3 are untouched)."""
        self._l1.clear()

    async def save(self, entity: T) -> T:
        """``repository.save(entity)``, then :meth:`put` the saved entity (L2 + own L1)."""
        saved: T = await self._write_through("save", entity)
        await self.put(self._entity_id(saved), saved)
        return saved

    async def update(self, entity: T, *args: Any, **kwargs: Any) -> T:
        """``repository.update(entity, …)`` (its concurrency check), then :meth:`put`."""
        saved: T = await self._write_through("update", entity, *args, **kwargs)
        await self.put(self._entity_id(saved), saved)
        return saved

    async def delete(self, id: EntityId) -> None:
        """``repository.delete(id)``, then :meth:`invalidate` it in every process."""
        self._key(id)
        await self._write_through("delete", id)
        await self.invalidate(id)

    async def _write_through(self, name: str, *args: Any, **kwargs: Any) -> Any:
        """Call L3's ``name``, checked open first: never an L3 write the cache cannot follow.

        If it fails, L2 still holds the old value, so dropping L1 would change nothing.
        """
        self._check_kv()
        method = self._repo_method(name)
        with _l3(self.repository, name, write=True):
            return await method(*args, **kwargs)

    def _entity_id(self, entity: T) -> EntityId:
        try:
            return self._id_of(entity)
        except Exception as e:
            raise InvalidValueError(
                f"cannot take the id of {type(entity).__name__}: {e!r}; pass id_of=") from e

    def _repo_method(self, name: str) -> Callable[..., Any]:
        method = getattr(self.repository, name, None)
        if method is None:
            raise InvalidValueError(
                f"the L3 repository {type(self.repository).__name__} has no {name}(); "
                f"write through it directly and call put()/invalidate() on the cache")
        return method  # type: ignore[no-any-return]

    # ---------------------------------------------------------------- coherence

    async def _on_change(self, msg: Msg) -> None:
        """Watch callback: record the change for in-flight loads, drop stale L1 entries."""
        try:
            meta = msg.metadata
            revision = int(meta.sequence.stream)
            kkey = msg.subject[len(self.bucket) + 5:]  # after "$KV.<bucket>."
            key = split_key(kkey, 1)[1]
        except Exception:  # not a key this cache wrote: nothing to invalidate
            log.debug("cache watch: ignoring %r", msg.subject, exc_info=True)
            return
        self.counters["notifications"] += 1
        self._note_change(key, revision)
        entry = self._l1.get(key)
        dropped = entry is not None and entry.revision < revision
        if dropped:
            del self._l1[key]
            self.counters["invalidations"] += 1
        latency = time.time() - meta.timestamp.timestamp()
        self.invalidation_samples.append((revision, latency, dropped))
        self._advance_seen(revision)

    def _advance_seen(self, revision: int) -> None:
        if revision > self._seen_revision:
            self._seen_revision = revision
            if self._waiters:
                still = []
                for rev, fut in self._waiters:
                    if rev <= revision:
                        if not fut.done():
                            fut.set_result(None)
                    else:
                        still.append((rev, fut))
                self._waiters = still

    # ---------------------------------------------------------------- NATS outages

    def _distrust(self) -> None:
        """Empty L1 and refuse installs until the watch is known to be live again."""
        self._trusted = False
        self._epoch += 1
        if self._l1:
            self._l1.clear()
            self.counters["l1_resets"] += 1

    def _on_disconnect(self) -> None:
        """Connection listener: changes may now go unnotified, so L1 is no longer trusted."""
        self._connected = False
        self._distrust()

    def _on_reconnect(self) -> None:
        """Connection listener: drop what L1 got meanwhile, rebuild the watch now."""
        self._connected = True
        self._distrust()
        if not self._watch:  # no watch to rebuild: L1 is TTL-coherent only, as before
            self._epoch += 1
            self._trusted = True
        else:
            self._reconnected.set()

    async def _subscribe(self) -> Any:
        assert self.ms is not None
        with _nats(f"watch bucket {self.bucket!r}"):
            return await self.ms.js.subscribe(
                f"$KV.{self.bucket}.{self.key_prefix}.>", stream=f"KV_{self.bucket}",
                cb=self._on_change, ordered_consumer=True,
                deliver_policy=DeliverPolicy.NEW, headers_only=True,
                inactive_threshold=300.0)

    async def _keep_watch(self) -> None:
        """Rebuild the watch after each reconnect; one task, so reconnects never overlap.

        nats-py would rebuild it only after two missed heartbeats (~10 s); a new subscription
        starts delivering at once. The old one is dropped first so no consumer is left over.
        """
        assert self.ms is not None
        while True:
            await self._reconnected.wait()
            self._reconnected.clear()
            old, self._sub = self._sub, None
            if old is not None:
                with contextlib.suppress(Exception):
                    await old.unsubscribe()
            delay = 0.05
            while True:
                try:
                    sub = await self._subscribe()
                    break
                except MsstoreError as e:  # JetStream may need a moment after a restart
                    log.info("cache %s: watch not rebuilt yet (%s); retrying", self.bucket, e)
                    await asyncio.sleep(delay)
                    delay = min(delay * 2, 1.0)
            self._sub = sub
            if self._reconnected.is_set() or not self._connected:
                continue  # an outage came meanwhile: this watch may have missed changes
            self._epoch += 1
            self._trusted = True
            self.counters["rewatches"] += 1
            try:  # every revision up to last_seq is in KV or comes through the new watch
                with _nats(f"read the state of stream KV_{self.bucket}"):
                    info = await self.ms.js.stream_info(f"KV_{self.bucket}")
                self._advance_seen(int(info.state.last_seq))
            except MsstoreError as e:  # waiters then wait for the next change instead
                log.warning("cache %s: watch rebuilt, stream state unknown (%s)",
                            self.bucket, e)

    @property
    def seen_revision(self) -> int:
        """The highest KV revision of this cache's keys the watch has processed."""
        return self._seen_revision

    async def wait_for_revision(self, revision: int, within: float = 10.0) -> None:
        """Return once the watch has processed ``revision`` (the result of a put elsewhere)."""
        if not self._watch:
            raise InvalidOptionError("this cache has no watch (ms=None or watch=False)")
        positive_seconds("within", within)
        non_negative_int("revision", revision)
        self._check_kv()
        if self._seen_revision >= revision:
            return
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiters.append((revision, fut))
        try:
            async with asyncio.timeout(within):  # not wait_for: it can lose a cancel on 3.11
                await fut
        except TimeoutError as e:
            raise StoreTimeoutError(
                f"the watch on bucket {self.bucket!r} did not see revision {revision} within "
                f"{within} s (last seen {self._seen_revision}); is the revision from a key "
                f"under prefix {self.key_prefix!r} of this bucket?") from e
        finally:
            if fut.cancelled():  # timed out or cancelled: do not keep the waiter around
                self._waiters = [(r, f) for r, f in self._waiters if f is not fut]

    # ---------------------------------------------------------------- expiry

    def evict_expired(self) -> int:
        """Drop every expired L1 entry now; return how many (also runs in the background)."""
        now = self._clock()
        dead = [k for k, e in self._l1.items() if e.expires_at <= now]
        for k in dead:
            del self._l1[k]
        self.counters["expirations"] += len(dead)
        return len(dead)

    async def _evict_loop(self) -> None:
        while True:
            await asyncio.sleep(self.evict_interval)
            try:
                self.evict_expired()
            except Exception:  # never let housekeeping die silently
                log.exception("cache evict_expired failed")

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
        import numpy as np
        import pandas as pd

        calls = self.calls
        rows = []
        for name, st in zip(TIERS, (self._mem, self._kvs, self._db), strict=True):
            lookups = st.hits + st.misses
            # an L1 hit is served by MEMORY by definition: the hit path counts it once, as a hit
            served = st.served + (st.hits if st is self._mem else 0)
            samples = np.fromiter(st.samples, dtype=float) * 1e3
            rows.append({
                "tier": name, "lookups": lookups, "hits": st.hits, "misses": st.misses,
                "hit_rate": st.hits / lookups if lookups else math.nan,
                "served": served, "share": served / calls if calls else math.nan,
                "p50_ms": float(np.percentile(samples, 50)) if len(samples) else math.nan,
                "p99_ms": float(np.percentile(samples, 99)) if len(samples) else math.nan,
                "samples": len(samples),
            })
        df = pd.DataFrame(rows).set_index("tier")
        inval = np.array([s[1] for s in self.invalidation_samples if s[2]]) * 1e3
        df.attrs.update(self.counters, calls=calls, l1_size=len(self._l1),
                        l1_max_entries=self.l1_max_entries, l1_high_water=self.l1_high_water,
                        invalidation_p50_ms=float(np.percentile(inval, 50))
                        if len(inval) else math.nan,
                        invalidation_p99_ms=float(np.percentile(inval, 99))
                        if len(inval) else math.nan)
        return df

    def samples(self) -> pd.DataFrame:
        """Raw latency samples: one row per sampled call, columns ``source``, ``latency_ms``."""
        import pandas as pd

        frames = [pd.DataFrame({"source": name, "latency_ms": [s * 1e3 for s in st.samples]})
                  for name, st in zip(TIERS, (self._mem, self._kvs, self._db), strict=True)]
        return pd.concat(frames, ignore_index=True)

    def invalidation_latencies(self) -> pd.DataFrame:
        """One row per watch notification: ``revision``, ``latency_ms``, ``dropped``.

        Latency is the watcher's wall clock minus the server's timestamp of the KV write, so it
        includes any clock difference between the machines (none on one host).
        """
        import pandas as pd

        return pd.DataFrame([(r, s * 1e3, d) for r, s, d in self.invalidation_samples],
                            columns=["revision", "latency_ms", "dropped"])


def _retrieve(task: asyncio.Task[Any]) -> None:
    """Done callback: mark a load's exception retrieved (its waiters may all be gone)."""
    if not task.cancelled():
        task.exception()


__all__ = [
    "CacheEntry",
    "CacheSource",
    "Finder",
    "KVBucket",
    "TieredCacheRepository",
]
