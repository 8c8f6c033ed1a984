"""TieredCacheRepository without services: fake L2 (KV) and L3 (repository) that count calls.

Coherence across processes and the real compare-and-set are tested against real NATS in
tests/integration/test_cache.py; here: LRU bound, TTL with an injected clock, the no-I/O hit
path, single-flight, metrics arithmetic, and the workload generators.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import random
import uuid
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any

import nats.js.errors
import numpy as np
import pytest

from msstore import InvalidValueError, NotFoundError
from msstore.cache import CacheSource, TieredCacheRepository
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

    async def get(self, key: str) -> _KVEntry:
        self.calls += 1
        await asyncio.sleep(0)
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
    repo.fail = RuntimeError("L3 down")
    async with cache:
        tasks = [asyncio.create_task(cache.find("k3")) for _ in range(20)]
        await repo.entered.wait()
        repo.gate.set()
        results = await asyncio.gather(*tasks, return_exceptions=True)
        assert all(isinstance(r, RuntimeError) for r in results)
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
        subject=f"$KV.{cache.bucket}.{cache.kv_key(key)}",
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
        await cache._on_change(change_message(cache, "k1", revision))  # type: ignore[arg-type]
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
        await cache._on_change(change_message(cache, "k1", entry.revision))  # type: ignore[arg-type]
        assert cache.peek("k1") is not None  # the change we already hold
        await cache._on_change(change_message(cache, "k1", entry.revision + 5))  # type: ignore[arg-type]
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


def test_bad_options_raise_typed_errors() -> None:
    with pytest.raises(InvalidValueError, match="l1_max_entries"):
        make(l1_max_entries=0)
    with pytest.raises(InvalidValueError, match="l1_ttl"):
        make(l1_ttl=-1)
    with pytest.raises(InvalidValueError, match="connection"):
        TieredCacheRepository(None, FakeRepo({}))
    with pytest.raises(InvalidValueError, match="from_dict"):
        TieredCacheRepository(None, FakeRepo({}), kv=FakeKV(), entity_type=int)


async def test_find_before_start_says_how_to_open() -> None:
    cache, _kv, _repo = make()
    with pytest.raises(RuntimeError, match="async with"):
        await cache.find("k1")


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
