"""TieredCacheRepository without services: fake L2 (KV) and L3 (repository) that count calls.

Coherence across processes and the real compare-and-set are tested against real NATS in
tests/integration/test_cache.py (a real NATS restart in test_cache_faults.py); here: LRU bound,
TTL with an injected clock, the no-I/O hit path, single-flight, metrics arithmetic, typed
errors, what a failed write leaves in L1, the disconnect/reconnect path through the
connection's listeners (fake JetStream), and the workload generators.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import math
import random
import uuid
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any

import asyncpg
import nats.errors
import nats.js.errors
import numpy as np
import pytest

from msstore.cache import CacheSource, TieredCacheRepository
from msstore.connection import Connection
from msstore.errors import (
    InvalidKeyError,
    InvalidOptionError,
    InvalidValueError,
    MsstoreError,
    NotFoundError,
    NotOpenError,
    NotSerializableError,
    StoreTimeoutError,
    StoreUnavailableError,
)
from msstore.workloads import (
    agent_population,
    read_write_mix,
    zipf_keys,
    zipf_ranks,
    zipf_weights,
)
from tests.fakes import FakeClock

# --------------------------------------------------------------------------- fakes


@dataclass
class _KVEntry:
    key: str
    value: bytes | None
    revision: int


class FakeKV:
    """In-memory KV with nats-py's semantics for get/put/update(last=)/delete markers."""

    def __init__(self) -> None:
        self.data: dict[str, tuple[int, bytes | None]] = {}  # None value: delete marker
        self.revision = 0
        self.calls = 0
        #: if set, get() reads the value first, then waits here before returning it
        self.get_gate: asyncio.Event | None = None
        self.got = asyncio.Event()
        #: raised by the next get (after counting the call)
        self.get_error: BaseException | None = None
        #: raised by the next put/delete *after* applying it, as a timed-out write that landed
        self.write_error: BaseException | None = None

    def _fail_after_write(self) -> None:
        if self.write_error is not None:
            e, self.write_error = self.write_error, None
            raise e

    async def get(self, key: str) -> _KVEntry:
        self.calls += 1
        await asyncio.sleep(0)
        if self.get_error is not None:
            raise self.get_error
        if key not in self.data:
            raise nats.js.errors.KeyNotFoundError
        rev, value = self.data[key]
        self.got.set()
        if self.get_gate is not None:
            await self.get_gate.wait()
        if value is None:
            raise nats.js.errors.KeyNotFoundError(_KVEntry(key, None, rev), "DEL")
        return _KVEntry(key, value, rev)

    async def put(self, key: str, value: bytes) -> int:
        self.calls += 1
        self.revision += 1
        self.data[key] = (self.revision, value)
        self._fail_after_write()
        return self.revision

    async def update(self, key: str, value: bytes, last: int | None = None) -> int:
        self.calls += 1
        current = self.data.get(key, (0, None))[0]
        if last is not None and current != last:
            raise nats.js.errors.KeyWrongLastSequenceError(description="wrong last sequence")
        return await self.put(key, value)

    async def delete(self, key: str) -> bool:
        self.calls += 1
        self.revision += 1
        self.data[key] = (self.revision, None)
        self._fail_after_write()
        return True


@dataclass(frozen=True)
class Thing:
    id: str
    n: int
    tags: list[str] = field(default_factory=list)


class FakeRepo:
    """L3: a dict; ``gate`` (if set) holds every find until released; counts finds."""

    def __init__(self, items: dict[str, Thing]) -> None:
        self.items = items
        self.finds = 0
        self.gate: asyncio.Event | None = None
        self.fail: Exception | None = None
        self.entered = asyncio.Event()

    async def find(self, id: uuid.UUID | str) -> Thing:
        self.finds += 1
        self.entered.set()
        if self.gate is not None:
            await self.gate.wait()
        if self.fail is not None:
            raise self.fail
        try:
            return self.items[str(id)]
        except KeyError:
            raise NotFoundError(f"no thing {id}") from None

    async def save(self, entity: Thing) -> Thing:
        self.items[entity.id] = entity
        return entity


def make(n: int = 50, **options: Any) -> tuple[TieredCacheRepository[Thing], FakeKV, FakeRepo]:
    kv = FakeKV()
    repo = FakeRepo({f"k{i}": Thing(f"k{i}", i) for i in range(n)})
    options.setdefault("latency_sample_every", 1)  # tests count every sample
    cache: TieredCacheRepository[Thing] = TieredCacheRepository(
        None, repo, kv=kv, entity_type=Thing, **options)
    return cache, kv, repo


# --------------------------------------------------------------------------- tiers


async def test_promotion_db_then_kv_then_memory() -> None:
    cache, _kv, repo = make()
    async with cache:
        first = await cache.find_entry("k1")
        cache.evict("k1")
        second = await cache.find_entry("k1")
        third = await cache.find_entry("k1")
    assert [first.source, second.source, third.source] == \
        [CacheSource.DB, CacheSource.KV, CacheSource.MEMORY]
    assert first.value == second.value == third.value == Thing("k1", 1)
    assert repo.finds == 1


async def test_untimed_hit_path_serves_str_and_uuid_ids_and_samples_one_in_n() -> None:
    """The fast path of find() (every hit but one in N): str and UUID ids, counts exact."""
    uid = uuid.UUID(int=7)
    cache, _kv, repo = make(latency_sample_every=4)
    repo.items[str(uid)] = Thing(str(uid), 7)
    async with cache:
        for _ in range(10):
            assert await cache.find("k3") == Thing("k3", 3)
            assert await cache.find(uid) == Thing(str(uid), 7)
        stats = cache.stats()
    assert repo.finds == 2  # one L3 load per id, then 18 L1 hits
    assert stats.loc["memory", "hits"] == 18
    assert stats.loc["memory", "misses"] == 2
    # hits number 0..17 when each is checked: the ones at a multiple of 4 are timed
    assert stats.loc["memory", "samples"] == len([h for h in range(18) if h % 4 == 0])


async def test_lru_bound_never_exceeded_under_random_ops() -> None:
    cache, _kv, _repo = make(n=60, l1_max_entries=7)
    rnd = random.Random(42)
    async with cache:
        for _ in range(1500):
            key = f"k{rnd.randrange(60)}"
            op = rnd.random()
            if op < 0.7:
                await cache.find(key)
            elif op < 0.85:
                await cache.put(key, Thing(key, rnd.randrange(1000)))
            elif op < 0.95:
                cache.evict(key)
            else:
                await cache.invalidate(key)
            assert len(cache) <= 7
    assert cache.l1_high_water == 7
    assert cache.counters["evictions"] > 0


async def test_lru_drops_least_recently_used() -> None:
    cache, _kv, _repo = make(l1_max_entries=2)
    async with cache:
        await cache.find("k1")
        await cache.find("k2")
        await cache.find("k1")  # k2 is now the least recently used
        await cache.find("k3")
        assert cache.peek("k1") is not None
        assert cache.peek("k2") is None
        assert cache.peek("k3") is not None


async def test_ttl_expiry_with_injected_clock() -> None:
    clock = FakeClock()
    cache, _kv, _repo = make(l1_ttl=10.0, clock=clock)
    async with cache:
        assert (await cache.find_entry("k1")).source is CacheSource.DB
        clock.advance(9.99)
        assert (await cache.find_entry("k1")).source is CacheSource.MEMORY
        clock.advance(0.02)
        assert cache.peek("k1") is None  # expired: not served, even before eviction
        assert len(cache) == 1
        assert cache.evict_expired() == 1
        assert len(cache) == 0
        assert (await cache.find_entry("k1")).source is CacheSource.KV
    assert cache.counters["expirations"] == 1


async def test_expired_entry_on_find_goes_to_kv() -> None:
    clock = FakeClock()
    cache, _kv, repo = make(l1_ttl=1.0, clock=clock)
    async with cache:
        await cache.find("k1")
        clock.advance(5)
        assert (await cache.find_entry("k1")).source is CacheSource.KV
    assert cache.counters["expirations"] == 1
    assert repo.finds == 1


async def test_peek_and_hits_do_no_io() -> None:
    cache, kv, repo = make()
    async with cache:
        await cache.find("k1")
        calls = (kv.calls, repo.finds)
        for _ in range(100):
            assert cache.peek("k1") == Thing("k1", 1)
            assert cache.peek("k2") is None  # a miss in peek loads nothing either
        # a hit completes without ever yielding to the event loop
        coro = cache.find("k1")
        with pytest.raises(StopIteration) as done:
            coro.send(None)
        assert done.value.value == Thing("k1", 1)
        assert (kv.calls, repo.finds) == calls


async def test_single_flight_100_concurrent_misses_one_load() -> None:
    cache, _kv, repo = make()
    repo.gate = asyncio.Event()
    async with cache:
        tasks = [asyncio.create_task(cache.find("k7")) for _ in range(100)]
        await repo.entered.wait()
        for _ in range(5):
            await asyncio.sleep(0)
        repo.gate.set()
        results = await asyncio.gather(*tasks)
    assert repo.finds == 1
    assert all(r == Thing("k7", 7) for r in results)
    assert cache.counters["loads"] == 1
    assert cache.counters["coalesced"] == 99


async def test_single_flight_error_reaches_every_waiter_and_is_not_cached() -> None:
    cache, _kv, repo = make()
    repo.gate = asyncio.Event()
    repo.fail = ConnectionResetError("L3 down")  # what asyncpg raises on a lost connection
    async with cache:
        tasks = [asyncio.create_task(cache.find("k3")) for _ in range(20)]
        await repo.entered.wait()
        repo.gate.set()
        results = await asyncio.gather(*tasks, return_exceptions=True)
        assert [type(r) for r in results] == [StoreUnavailableError] * 20
        assert all(isinstance(r.__cause__, ConnectionResetError) for r in results)
        assert repo.finds == 1
        repo.fail = None
        assert await cache.find("k3") == Thing("k3", 3)  # the error was not cached
    assert repo.finds == 2
    assert cache.counters["errors"] == 20


async def test_not_found_raises_and_is_counted() -> None:
    cache, _kv, _repo = make()
    async with cache:
        with pytest.raises(NotFoundError):
            await cache.find("nope")
        assert cache.peek("nope") is None
    assert cache.counters["not_found"] == 1


async def test_install_never_replaces_a_newer_local_put() -> None:
    cache, _kv, repo = make()
    repo.gate = asyncio.Event()
    async with cache:
        task = asyncio.create_task(cache.find("k1"))
        await repo.entered.wait()
        await cache.put("k1", Thing("k1", 100))  # newer than what L3 is about to return
        repo.gate.set()
        await task
        assert cache.peek("k1") == Thing("k1", 100)
        assert await cache.find("k1") == Thing("k1", 100)


def change_message(cache: TieredCacheRepository[Thing], key: str, revision: int
                   ) -> SimpleNamespace:
    """What the KV watch delivers for a change of ``key`` at ``revision`` (headers only)."""
    return SimpleNamespace(
        subject=f"$KV.{cache.bucket}.{cache.kv_key(key)}", reply=None,
        metadata=SimpleNamespace(sequence=SimpleNamespace(stream=revision),
                                 timestamp=dt.datetime.now(dt.UTC)))


async def test_load_racing_a_notification_does_not_install_the_old_value() -> None:
    cache, kv, _repo = make()
    async with cache:
        await kv.put(cache.kv_key("k1"), b'{"id": "k1", "n": 1, "tags": []}')
        kv.get_gate = asyncio.Event()
        load = asyncio.create_task(cache.find("k1"))
        await kv.got.wait()  # the load holds revision 1 in hand
        # another process writes revision 2; our watch reports it before the load returns
        revision = await kv.put(cache.kv_key("k1"), b'{"id": "k1", "n": 2, "tags": []}')
        await cache._watch._on_message(change_message(cache, "k1", revision))  # type: ignore[arg-type]
        kv.get_gate.set()
        assert (await load).n == 2  # reloaded, never the notified-stale value
        assert cache.peek("k1") == Thing("k1", 2)
    assert cache.counters["stale_loads"] == 1


async def test_notification_drops_older_l1_entry_only() -> None:
    cache, _kv, _repo = make()
    async with cache:
        await cache.find("k1")
        entry = cache.peek_entry("k1")
        assert entry is not None
        await cache._watch._on_message(change_message(cache, "k1", entry.revision))  # type: ignore[arg-type]
        assert cache.peek("k1") is not None  # the change we already hold
        await cache._watch._on_message(change_message(cache, "k1", entry.revision + 5))  # type: ignore[arg-type]
        assert cache.peek("k1") is None
        assert cache.seen_revision == entry.revision + 5
    lat = cache.invalidation_latencies()
    assert list(lat["dropped"]) == [False, True]
    assert cache.counters["invalidations"] == 1


async def test_save_writes_l3_l2_and_own_l1() -> None:
    cache, _kv, repo = make()
    async with cache:
        saved = await cache.save(Thing("k1", 11, ["x"]))
        assert repo.items["k1"] == saved
        assert cache.peek_entry("k1").source is CacheSource.MEMORY  # type: ignore[union-attr]
        cache.evict("k1")
        entry = await cache.find_entry("k1")
        assert entry.source is CacheSource.KV  # put went to L2 too
        assert entry.value == saved
        assert entry.value.tags == ["x"]


async def test_invalidate_then_find_reloads_from_db() -> None:
    cache, _kv, repo = make()
    async with cache:
        await cache.find("k2")
        repo.items["k2"] = Thing("k2", 22)
        await cache.invalidate("k2")
        assert cache.peek("k2") is None
        entry = await cache.find_entry("k2")
    assert entry.source is CacheSource.DB
    assert entry.value == Thing("k2", 22)


async def test_stats_counts_add_up_to_calls() -> None:
    cache, _kv, _repo = make(n=30, l1_max_entries=5)
    keys = zipf_keys([f"k{i}" for i in range(40)], 500, skew=1.0, seed=7)  # k30+ not found
    async with cache:
        for key in keys:
            try:
                await cache.find(key)
            except NotFoundError:
                pass
    df = cache.stats()
    mem, kvr, db = df.loc["memory"], df.loc["kv"], df.loc["db"]
    assert cache.calls == len(keys)
    assert mem.hits + mem.misses == len(keys)
    assert df["served"].sum() + df.attrs["not_found"] + df.attrs["errors"] == len(keys)
    assert kvr.hits + kvr.misses == df.attrs["loads"]  # no races here: one KV read per load
    assert db.lookups == kvr.misses
    assert mem.samples == mem.served  # sample_every=1
    assert len(cache.samples()) == df["samples"].sum()
    assert 0 < mem.hit_rate < 1


async def test_latency_sampling_one_in_n() -> None:
    cache, _kv, _repo = make(latency_sample_every=10)
    async with cache:
        for _ in range(101):
            await cache.find("k1")
    df = cache.stats()
    assert df.loc["memory", "hits"] == 100
    assert df.loc["memory", "samples"] == 10


@pytest.mark.parametrize(("option", "value"), [
    ("l1_max_entries", 0), ("l1_max_entries", 2.5), ("l1_ttl", -1), ("l1_ttl", math.inf),
    ("kv_ttl", 0), ("evict_interval", "5"), ("latency_sample_every", True),
    ("max_load_attempts", 0), ("max_samples", -3), ("clock", 1.0),
])
def test_bad_options_raise_invalid_option_error_naming_the_option(option: str,
                                                                  value: object) -> None:
    with pytest.raises(InvalidOptionError, match=option):
        make(**{option: value})


def test_missing_connection_or_unstorable_entity_type_is_an_invalid_option() -> None:
    with pytest.raises(InvalidOptionError, match="connection"):
        TieredCacheRepository(None, FakeRepo({}))
    with pytest.raises(InvalidOptionError, match="from_dict"):
        TieredCacheRepository(None, FakeRepo({}), kv=FakeKV(), entity_type=int)
    with pytest.raises(InvalidKeyError, match="bucket name"):
        TieredCacheRepository(None, FakeRepo({}), kv=FakeKV(), bucket="a.b")


async def test_use_before_open_and_after_close_raises_not_open_and_writes_nothing() -> None:
    cache, kv, repo = make()
    calls: list[Any] = [
        lambda: cache.find("k1"), lambda: cache.find_entry("k1"),
        lambda: cache.put("k1", Thing("k1", 9)), lambda: cache.invalidate("k1"),
        lambda: cache.save(Thing("k1", 9)), lambda: cache.delete("k1"),
    ]
    for call in calls:
        with pytest.raises(NotOpenError, match="not open: use `async with"):
            await call()
    await cache.start()
    with pytest.raises(NotOpenError, match="already started"):
        await cache.start()
    await cache.find("k1")
    await cache.close()
    for call in calls:
        with pytest.raises(NotOpenError, match="closed"):
            await call()
    with pytest.raises(NotOpenError, match="closed"):
        await cache.start()
    assert repo.items["k1"] == Thing("k1", 1)  # neither save() nor delete() reached L3
    assert repo.finds == 1
    assert kv.revision == 1  # the one load's repopulation: no put, no delete marker


async def test_wait_for_revision_without_a_watch_is_an_invalid_option() -> None:
    cache, _kv, _repo = make()
    async with cache:
        with pytest.raises(InvalidOptionError, match="no watch"):
            await cache.wait_for_revision(1)


async def test_an_unhashable_id_is_an_invalid_key_not_a_type_error() -> None:
    cache, _kv, _repo = make()
    async with cache:
        with pytest.raises(InvalidKeyError, match="list"):
            await cache.find(["k1"])  # type: ignore[arg-type]
        with pytest.raises(InvalidKeyError):
            cache.peek(["k1"])  # type: ignore[arg-type]


@pytest.mark.parametrize(("raised", "expected"), [
    (TimeoutError(), StoreTimeoutError),
    (asyncpg.QueryCanceledError("canceling statement due to statement timeout"),
     StoreTimeoutError),
    (ConnectionRefusedError(), StoreUnavailableError),
    (asyncpg.InterfaceError("connection is closed"), StoreUnavailableError),
    (asyncpg.PostgresConnectionError("terminated"), StoreUnavailableError),
    (asyncpg.exceptions.AdminShutdownError("shutting down"), StoreUnavailableError),
    (RuntimeError("a bug in the repository"), MsstoreError),
])
async def test_l3_errors_leave_the_cache_as_msstore_errors_keeping_the_cause(
        raised: Exception, expected: type[MsstoreError]) -> None:
    cache, _kv, repo = make()
    repo.fail = raised
    async with cache:
        with pytest.raises(MsstoreError) as caught:
            await cache.find("k1")
    assert type(caught.value) is expected
    assert caught.value.__cause__ is raised


@pytest.mark.parametrize(("raised", "expected"), [
    (nats.errors.TimeoutError(), StoreTimeoutError),
    (nats.errors.ConnectionClosedError(), StoreUnavailableError),
    (nats.errors.NoRespondersError(), StoreUnavailableError),
    (nats.js.errors.NoKeysError(), StoreUnavailableError),  # a KV answer the cache never expects
])
async def test_kv_errors_leave_the_cache_as_msstore_errors(raised: Exception,
                                                         expected: type[MsstoreError]) -> None:
    cache, kv, _repo = make()
    kv.get_error = raised
    async with cache:
        with pytest.raises(MsstoreError) as caught:
            await cache.find("k1")
    assert type(caught.value) is expected
    assert caught.value.__cause__ is raised


async def test_undecodable_kv_values_and_failing_to_dict_are_typed() -> None:
    cache, kv, _repo = make()
    async with cache:
        await kv.put(cache.kv_key("k1"), b"not json")
        await kv.put(cache.kv_key("k2"), b'{"id": "k2", "colour": "red"}')  # not a Thing
        for key in ("k1", "k2"):
            with pytest.raises(InvalidValueError, match=f"value of 'entity.{key}'"):
                await cache.find(key)
    broken: TieredCacheRepository[Thing] = TieredCacheRepository(
        None, FakeRepo({}), kv=FakeKV(), to_dict=lambda thing: 1 / 0)
    async with broken:
        with pytest.raises(NotSerializableError, match="ZeroDivisionError"):
            await broken.put("k1", Thing("k1", 1))


# --------------------------------------------------------------------------- failed writes


@pytest.mark.parametrize(("raised", "expected"), [
    (nats.errors.TimeoutError(), StoreTimeoutError),
    (nats.errors.ConnectionClosedError(), StoreUnavailableError),
])
@pytest.mark.parametrize("write", ["put", "invalidate"])
async def test_a_failed_write_that_landed_anyway_is_not_hidden_by_l1(
        write: str, raised: Exception, expected: type[MsstoreError]) -> None:
    """The fake applies the write, then raises: what a timed-out publish looks like later."""
    cache, kv, _repo = make()
    async with cache:
        assert await cache.find("k1") == Thing("k1", 1)  # L1 holds the old value
        kv.write_error = raised
        with pytest.raises(MsstoreError) as caught:
            if write == "put":
                await cache.put("k1", Thing("k1", 100))
            else:
                await cache.invalidate("k1")
        assert type(caught.value) is expected
        assert cache.peek("k1") is None  # L1 assumes nothing about the outcome
        entry = await cache.find_entry("k1")
    assert entry.source is (CacheSource.KV if write == "put" else CacheSource.DB)
    assert entry.value == (Thing("k1", 100) if write == "put" else Thing("k1", 1))
    assert cache.counters["failed_writes"] == 1
    if expected is StoreTimeoutError:
        assert "may still be applied" in str(caught.value)


async def test_a_load_in_flight_during_a_failed_put_does_not_install_its_value() -> None:
    cache, kv, _repo = make()
    async with cache:
        await kv.put(cache.kv_key("k1"), b'{"id": "k1", "n": 1, "tags": []}')
        kv.get_gate = asyncio.Event()
        load = asyncio.create_task(cache.find("k1"))
        await kv.got.wait()  # the load holds n=1 in hand
        kv.write_error = nats.errors.TimeoutError()
        with pytest.raises(StoreTimeoutError, match="may still be applied"):
            await cache.put("k1", Thing("k1", 2))  # ... and it did land
        kv.get_gate.set()
        assert (await load).n == 1  # read before the write: a fair answer to that call
        kv.get_gate = None
        assert cache.peek("k1") is None  # but not kept: it would hide the landed write
        assert await cache.find("k1") == Thing("k1", 2)


async def test_a_cancelled_put_drops_the_key_from_l1() -> None:
    cache, kv, _repo = make()
    async with cache:
        await cache.find("k1")

        async def stuck_put(key: str, value: bytes) -> int:
            await asyncio.Event().wait()
            return 0

        kv.put = stuck_put  # type: ignore[method-assign]
        task = asyncio.create_task(cache.put("k1", Thing("k1", 5)))
        await asyncio.sleep(0)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert cache.peek("k1") is None


# --------------------------------------------------------------------------- workloads


def test_workloads_are_reproducible() -> None:
    keys = [f"k{i}" for i in range(100)]
    assert read_write_mix(keys, 500, skew=1.1, write_fraction=0.2, seed=3) == \
        read_write_mix(keys, 500, skew=1.1, write_fraction=0.2, seed=3)
    assert read_write_mix(keys, 500, skew=1.1, write_fraction=0.2, seed=3) != \
        read_write_mix(keys, 500, skew=1.1, write_fraction=0.2, seed=4)
    assert agent_population(50, seed=1) == agent_population(50, seed=1)
    assert agent_population(50, seed=1) != agent_population(50, seed=2)
    assert len(set(agent_population(1000, seed=9))) == 1000
    assert all(a.version == 4 for a in agent_population(10, seed=1))
    assert np.array_equal(zipf_ranks(100, 300, skew=0.8, seed=5),
                          zipf_ranks(100, 300, skew=0.8, seed=5))


def test_zipf_skew_ordering() -> None:
    w = zipf_weights(100, 1.0)
    assert w.sum() == pytest.approx(1.0)
    assert all(np.diff(w) < 0)  # rank 0 is the most popular
    assert np.allclose(zipf_weights(10, 0.0), 0.1)  # skew 0 is uniform
    top10 = [zipf_weights(100, s)[:10].sum() for s in (0.0, 0.5, 1.0, 1.5)]
    assert top10 == sorted(top10)
    counts = np.bincount(zipf_ranks(100, 20_000, skew=1.2, seed=1), minlength=100)
    assert counts[0] > counts[9] > counts[99]


def test_write_fraction_is_respected() -> None:
    ops = read_write_mix(list(range(10)), 10_000, skew=0.5, write_fraction=0.25, seed=2)
    writes = sum(op == "write" for op, _ in ops)
    assert 2300 < writes < 2700
    assert {op for op, _ in read_write_mix([1], 100, skew=1, write_fraction=0, seed=1)} == \
        {"read"}


def test_workload_bad_input() -> None:
    with pytest.raises(InvalidValueError, match="skew"):
        zipf_weights(10, -1)
    with pytest.raises(InvalidValueError, match="write_fraction"):
        read_write_mix([1], 10, skew=1, write_fraction=1.5, seed=1)
    with pytest.raises(InvalidValueError, match="keys"):
        zipf_keys([], 10, skew=1, seed=1)


# --------------------------------------------------------------------------- NATS outages


class FakeSub:
    def __init__(self, cb: Any) -> None:
        self.cb = cb
        self.unsubscribed = False

    async def unsubscribe(self) -> None:
        self.unsubscribed = True


class FakeJS:
    """The JetStream calls the cache makes with ``ms``: watch subscriptions, stream state, DEL."""

    def __init__(self, kv: FakeKV) -> None:
        self.kv = kv
        self.subs: list[FakeSub] = []
        #: the next subscribe calls that fail, as JetStream does just after a restart
        self.failures: list[Exception] = []

    async def subscribe(self, subject: str, **options: Any) -> FakeSub:
        await asyncio.sleep(0)
        if self.failures:
            raise self.failures.pop(0)
        assert options["deliver_policy"].value == "new"
        sub = FakeSub(options["cb"])
        self.subs.append(sub)
        return sub

    async def stream_info(self, name: str) -> SimpleNamespace:
        return SimpleNamespace(state=SimpleNamespace(last_seq=self.kv.revision))

    async def publish(self, subject: str, payload: bytes, headers: Any = None) -> Any:
        await self.kv.delete(subject.split(".", 2)[2])
        return SimpleNamespace(seq=self.kv.revision)


def connected() -> tuple[Connection, FakeJS, FakeKV]:
    """A real Connection (its listener registry) around fake JetStream; no servers."""
    kv = FakeKV()
    js = FakeJS(kv)
    none: Any = None
    return Connection(pool=none, nc=none, js=js, endpoints=none), js, kv  # type: ignore[arg-type]


def watched(conn: Connection, kv: FakeKV, **options: Any
            ) -> tuple[TieredCacheRepository[Thing], FakeRepo]:
    repo = FakeRepo({f"k{i}": Thing(f"k{i}", i) for i in range(10)})
    cache: TieredCacheRepository[Thing] = TieredCacheRepository(
        conn, repo, kv=kv, entity_type=Thing, **options)
    return cache, repo


async def settle(cache: TieredCacheRepository[Thing], rewatches: int) -> None:
    """Let the watch keeper run until it has rebuilt the watch ``rewatches`` times."""
    for _ in range(1000):
        if cache.counters["rewatches"] >= rewatches:
            return
        await asyncio.sleep(0)
    pytest.fail(f"the watch was rebuilt {cache.counters['rewatches']} times, not {rewatches}")


async def test_connection_listeners_fan_out_survive_a_failing_one_and_can_be_removed() -> None:
    conn, _js, _kv = connected()
    seen: list[str] = []

    def broken() -> None:
        raise RuntimeError("listener bug")

    remove_a = conn.add_listener(on_disconnect=lambda: seen.append("a-down"),
                                 on_reconnect=lambda: seen.append("a-up"))
    conn.add_listener(on_disconnect=broken)
    conn.add_listener(on_reconnect=lambda: seen.append("b-up"))
    await conn._listeners.disconnected()  # what nats-py awaits as disconnected_cb
    await conn._listeners.reconnected()
    remove_a()
    remove_a()  # twice is harmless
    await conn._listeners.disconnected()
    await conn._listeners.reconnected()
    assert seen == ["a-down", "a-up", "b-up", "b-up"]


async def test_a_disconnect_empties_l1_and_finds_go_to_kv_until_the_watch_is_rebuilt() -> None:
    conn, js, kv = connected()
    cache, repo = watched(conn, kv)
    async with cache:
        await cache.find("k1")
        await cache.find("k2")
        assert len(cache) == 2 and len(js.subs) == 1
        await conn._listeners.disconnected()
        assert len(cache) == 0
        # while untrusted, every find is served by KV and installs nothing
        sources = [(await cache.find_entry("k1")).source for _ in range(3)]
        assert sources == [CacheSource.KV] * 3
        assert cache.peek("k1") is None
        # another process writes meanwhile; the new watch (deliver NEW) will never report it
        landed = await kv.put(cache.kv_key("k2"), b'{"id": "k2", "n": 22, "tags": []}')
        waiter = asyncio.create_task(cache.wait_for_revision(landed))
        await conn._listeners.reconnected()
        await settle(cache, 1)
        await asyncio.wait_for(waiter, 1)  # released by the stream state, not a notification
        assert cache.seen_revision == landed
        assert js.subs[0].unsubscribed and not js.subs[1].unsubscribed
        assert len(js.subs) == 2
        assert await cache.find("k2") == Thing("k2", 22)
        assert (await cache.find_entry("k2")).source is CacheSource.MEMORY  # trusted again
    assert cache.counters["l1_resets"] == 1  # the reconnect found L1 already empty
    assert repo.finds == 2


async def test_a_load_that_began_before_a_reconnect_does_not_install() -> None:
    conn, _js, kv = connected()
    cache, _repo = watched(conn, kv)
    async with cache:
        await kv.put(cache.kv_key("k1"), b'{"id": "k1", "n": 1, "tags": []}')
        kv.get_gate = asyncio.Event()
        load = asyncio.create_task(cache.find("k1"))
        await kv.got.wait()
        await conn._listeners.disconnected()
        await conn._listeners.reconnected()
        await settle(cache, 1)
        kv.get_gate.set()
        assert (await load).n == 1
        kv.get_gate = None
        assert cache.peek("k1") is None  # its read may predate the new watch
        await cache.find("k1")
        assert cache.peek("k1") == Thing("k1", 1)  # a load begun afterwards installs


async def test_a_put_while_disconnected_is_not_installed_in_l1() -> None:
    conn, _js, kv = connected()
    cache, _repo = watched(conn, kv)
    async with cache:
        await conn._listeners.disconnected()
        revision = await cache.put("k1", Thing("k1", 7))  # e.g. applied by another server
        assert revision == kv.revision
        assert cache.peek("k1") is None
        await conn._listeners.reconnected()
        await settle(cache, 1)
        await cache.put("k1", Thing("k1", 8))
        assert cache.peek("k1") == Thing("k1", 8)


async def test_the_watch_is_rebuilt_after_jetstream_refuses_at_first() -> None:
    conn, js, kv = connected()
    cache, _repo = watched(conn, kv)
    async with cache:
        await conn._listeners.disconnected()
        js.failures = [nats.errors.NoRespondersError(), nats.errors.TimeoutError()]
        await conn._listeners.reconnected()
        for _ in range(100):  # the keeper backs off 50 ms, then 100 ms
            if cache.counters["rewatches"]:
                break
            await asyncio.sleep(0.05)
        assert cache.counters["rewatches"] == 1
        assert js.failures == []
        assert [s.unsubscribed for s in js.subs] == [True, False]
        await cache.find("k1")
        assert cache.peek("k1") == Thing("k1", 1)


async def test_two_quick_reconnects_leave_one_live_watch() -> None:
    conn, js, kv = connected()
    cache, _repo = watched(conn, kv)
    async with cache:
        for _ in range(2):
            await conn._listeners.disconnected()
            await conn._listeners.reconnected()
        await settle(cache, 1)
        for _ in range(20):
            await asyncio.sleep(0)
        assert [s.unsubscribed for s in js.subs] == [True, False]
        assert cache.counters["rewatches"] == 1
    assert all(s.unsubscribed for s in js.subs)  # close drops the last one
