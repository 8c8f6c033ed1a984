"""TieredCacheRepository on real NATS KV and PostgreSQL, L3 = AgentRepository.

Promotion and recorded sources, TTL expiry (L1 with an injected clock, L2 by the bucket's max
age), single-flight on real stores, coherence between two connections through the KV watch,
and the stats arithmetic. No wall-clock asserts: waits are bounded polls or events.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest

import msstore
from msstore.cache import CacheSource, TieredCacheRepository
from msstore.errors import InvalidOptionError, NotOpenError
from msstore.repository import Agent, AgentRepository


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class CountingRepo:
    """Wraps the real repository: counts L3 finds; ``gate`` holds each result before returning."""

    def __init__(self, inner: AgentRepository) -> None:
        self.inner = inner
        self.finds = 0
        self.gate: asyncio.Event | None = None
        self.entered = asyncio.Event()

    async def find(self, id: uuid.UUID | str) -> Agent:
        self.finds += 1
        agent = await self.inner.find(id)
        self.entered.set()
        if self.gate is not None:
            await self.gate.wait()
        return agent

    async def save(self, agent: Agent) -> Agent:
        return await self.inner.save(agent)


class CountingKV:
    """Wraps the real KeyValue: counts gets (L2 loads)."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self.gets = 0

    async def get(self, key: str) -> Any:
        self.gets += 1
        return await self.inner.get(key)

    async def put(self, key: str, value: bytes) -> int:
        return int(await self.inner.put(key, value))

    async def update(self, key: str, value: bytes, last: int | None = None) -> int:
        return int(await self.inner.update(key, value, last=last))

    async def delete(self, key: str) -> bool:
        return bool(await self.inner.delete(key))


@pytest.fixture
async def repo(ms: msstore.Connection, unique: Callable[[str], str]
               ) -> AsyncIterator[AgentRepository]:
    async with AgentRepository(ms, bucket=unique("cachel3")) as r:
        yield r


@pytest.fixture
async def ms2(ms: msstore.Connection) -> AsyncIterator[msstore.Connection]:
    """A second, independent connection (own NATS client, own pool) to the same servers."""
    async with msstore.connect(ms.database_url, ms.nats_url, migrate=False) as conn:
        yield conn


async def new_agent(repo: AgentRepository, **metadata: Any) -> Agent:
    return await repo.save(Agent(uuid.uuid4(), "researcher", "idle", metadata))


async def test_promotion_db_then_kv_then_memory(ms: msstore.Connection, repo: AgentRepository,
                                                unique: Callable[[str], str]) -> None:
    agent = await new_agent(repo, goal="cache")
    counting = CountingRepo(repo)
    async with TieredCacheRepository(ms, counting, bucket=unique("cache"),
                                     entity_type=Agent) as cache:
        sources = []
        first = await cache.find_entry(agent.id)
        sources.append(first.source)
        assert cache.peek_entry(agent.id).source is CacheSource.DB  # type: ignore[union-attr]
        cache.evict(agent.id)
        second = await cache.find_entry(agent.id)
        sources.append(second.source)
        assert cache.peek_entry(agent.id).source is CacheSource.KV  # type: ignore[union-attr]
        third = await cache.find_entry(str(agent.id))  # str and UUID ids are one key
        sources.append(third.source)
        assert sources == [CacheSource.DB, CacheSource.KV, CacheSource.MEMORY]
        assert first.value == second.value == third.value == agent
        assert first.revision == second.revision == third.revision > 0
        assert counting.finds == 1


async def test_l1_ttl_expiry_then_served_from_kv(ms: msstore.Connection, repo: AgentRepository,
                                                  unique: Callable[[str], str]) -> None:
    agent = await new_agent(repo)
    clock = FakeClock()
    async with TieredCacheRepository(ms, repo, bucket=unique("cache"), entity_type=Agent,
                                     l1_ttl=30.0, clock=clock) as cache:
        assert (await cache.find_entry(agent.id)).source is CacheSource.DB
        clock.now += 29.0
        assert (await cache.find_entry(agent.id)).source is CacheSource.MEMORY
        clock.now += 2.0
        assert cache.peek(agent.id) is None
        assert cache.evict_expired() == 1
        assert (await cache.find_entry(agent.id)).source is CacheSource.KV


async def test_l2_ttl_expiry_falls_back_to_db(ms: msstore.Connection, repo: AgentRepository,
                                              unique: Callable[[str], str]) -> None:
    agent = await new_agent(repo)
    async with TieredCacheRepository(ms, repo, bucket=unique("cache"), entity_type=Agent,
                                     kv_ttl=1.0) as cache:
        assert (await cache.find_entry(agent.id)).source is CacheSource.DB
        cache.evict(agent.id)
        kv = await ms.js.key_value(cache.bucket)
        for _ in range(100):  # the server drops it after its max age (bounded poll, ≤ 10 s)
            try:
                await kv.get(cache.kv_key(agent.id))
            except Exception:
                break
            await asyncio.sleep(0.1)
        else:
            pytest.fail("the KV entry did not expire within 10 s of a 1 s max age")
        assert (await cache.find_entry(agent.id)).source is CacheSource.DB


async def test_single_flight_100_concurrent_misses_one_load(
        ms: msstore.Connection, repo: AgentRepository, unique: Callable[[str], str]) -> None:
    from msstore.kv import ensure_bucket

    agent = await new_agent(repo)
    counting = CountingRepo(repo)
    counting.gate = asyncio.Event()
    bucket = unique("cache")
    kv = CountingKV(await ensure_bucket(ms.js, bucket, ttl=60.0))
    async with TieredCacheRepository(ms, counting, bucket=bucket, kv=kv,
                                     entity_type=Agent) as cache:
        tasks = [asyncio.create_task(cache.find(agent.id)) for _ in range(100)]
        await asyncio.wait_for(counting.entered.wait(), 10)
        await asyncio.sleep(0.05)  # let every task reach the in-flight future
        counting.gate.set()
        results = await asyncio.gather(*tasks)
        assert counting.finds == 1
        assert kv.gets == 1
        assert all(r == agent for r in results)
        assert cache.counters["coalesced"] == 99
        assert (await cache.find_entry(agent.id)).source is CacheSource.MEMORY


async def test_invalidation_across_two_connections(
        ms: msstore.Connection, ms2: msstore.Connection, repo: AgentRepository,
        unique: Callable[[str], str]) -> None:
    agent = await new_agent(repo, i=-1)
    bucket = unique("cache")
    async with AgentRepository(ms2, bucket=repo.bucket) as repo_b, \
            TieredCacheRepository(ms, repo, bucket=bucket, entity_type=Agent) as a, \
            TieredCacheRepository(ms2, repo_b, bucket=bucket, entity_type=Agent) as b:
        assert (await b.find(agent.id)).metadata["i"] == -1
        rev_to_i: dict[int, int] = {}
        stop = asyncio.Event()
        violations: list[str] = []
        reads = 0

        async def reader() -> None:
            # a concurrent reader in B: a read that starts after B saw write i returns >= i
            nonlocal reads
            while not stop.is_set():
                seen = b.seen_revision
                floor = max((i for r, i in rev_to_i.items() if r <= seen), default=-1)
                got = (await b.find(agent.id)).metadata["i"]
                reads += 1
                if got < floor:
                    violations.append(f"read i={got} after B was notified of i={floor}")
                await asyncio.sleep(0)

        task = asyncio.create_task(reader())
        current = agent
        for i in range(15):
            assert b.peek(agent.id) is not None or i > 0
            current = await a.save(current.replace(metadata={"i": i}))
            entry = a.peek_entry(agent.id)
            assert entry is not None and entry.source is CacheSource.MEMORY
            rev_to_i[entry.revision] = i
            await b.wait_for_revision(entry.revision)
            stale = b.peek(agent.id)
            assert stale is None or stale.metadata["i"] == i  # dropped, or already reloaded
            assert (await b.find(agent.id)).metadata["i"] == i
            assert b.peek(agent.id).metadata["i"] == i  # type: ignore[union-attr]
        stop.set()
        await task
        assert violations == []
        assert reads > 0
        lat = b.invalidation_latencies()
        assert len(lat) >= 15
        assert lat["dropped"].sum() >= 1
        assert b.counters["invalidations"] >= 1
        assert b.stats().attrs["invalidation_p50_ms"] >= 0


async def test_load_racing_a_write_installs_the_newer_value(
        ms: msstore.Connection, ms2: msstore.Connection, repo: AgentRepository,
        unique: Callable[[str], str]) -> None:
    agent = await new_agent(repo, i=0)
    bucket = unique("cache")
    async with AgentRepository(ms2, bucket=repo.bucket) as repo_b:
        slow = CountingRepo(repo_b)
        slow.gate = asyncio.Event()
        async with TieredCacheRepository(ms, repo, bucket=bucket, entity_type=Agent) as a, \
                TieredCacheRepository(ms2, slow, bucket=bucket, entity_type=Agent) as b:
            load = asyncio.create_task(b.find(agent.id))
            await asyncio.wait_for(slow.entered.wait(), 10)  # B holds the old value from L3
            await a.save(agent.replace(metadata={"i": 1}))
            entry = a.peek_entry(agent.id)
            assert entry is not None
            await b.wait_for_revision(entry.revision)
            slow.gate.set()
            got = await load
            assert got.metadata["i"] == 1  # the CAS lost to A's write and re-read KV
            assert b.peek(agent.id).metadata["i"] == 1  # type: ignore[union-attr]
            assert b.counters["stale_loads"] + b.stats().loc["kv", "hits"] >= 1


async def test_invalidate_is_seen_by_the_other_connection(
        ms: msstore.Connection, ms2: msstore.Connection, repo: AgentRepository,
        unique: Callable[[str], str]) -> None:
    agent = await new_agent(repo)
    bucket = unique("cache")
    async with TieredCacheRepository(ms, repo, bucket=bucket, entity_type=Agent) as a, \
            TieredCacheRepository(ms2, repo, bucket=bucket, entity_type=Agent) as b:
        await a.find(agent.id)
        await b.find(agent.id)
        rev = await a.invalidate(agent.id)
        assert rev is not None
        await b.wait_for_revision(rev)
        assert b.peek(agent.id) is None
        assert (await b.find_entry(agent.id)).source is CacheSource.DB


async def test_stats_counts_add_up_to_calls(ms: msstore.Connection, repo: AgentRepository,
                                            unique: Callable[[str], str]) -> None:
    from msstore.workloads import zipf_keys

    agents = [await new_agent(repo, n=n) for n in range(12)]
    ids = [a.id for a in agents] + [uuid.uuid4() for _ in range(3)]  # 3 never saved
    calls = zipf_keys(ids, 300, skew=1.0, seed=11)
    async with TieredCacheRepository(ms, repo, bucket=unique("cache"), entity_type=Agent,
                                     l1_max_entries=4, latency_sample_every=1) as cache:
        for agent_id in calls:
            try:
                await cache.find(agent_id)
            except msstore.NotFoundError:
                pass
        df = cache.stats()
    assert cache.calls == len(calls)
    assert df.loc["memory", "hits"] + df.loc["memory", "misses"] == len(calls)
    assert df["served"].sum() + df.attrs["not_found"] + df.attrs["errors"] == len(calls)
    assert df.attrs["not_found"] > 0
    assert df.loc["db", "lookups"] == df.loc["kv", "misses"]
    assert df.attrs["l1_high_water"] <= 4
    assert set(cache.samples()["source"]) == {"memory", "kv", "db"}


async def test_waiting_for_a_revision_never_seen_times_out_and_leaves_no_waiter(
        ms: msstore.Connection, repo: AgentRepository, unique: Callable[[str], str]) -> None:
    async with TieredCacheRepository(ms, repo, bucket=unique("cache"), entity_type=Agent) as c:
        with pytest.raises(msstore.StoreTimeoutError, match="did not see revision 1000000"):
            await c.wait_for_revision(1_000_000, within=0.05)
        assert not c._watch._seen._waiters  # type: ignore[attr-defined]  # the event's


async def test_a_closed_cache_raises_not_open_and_leaves_l3_alone(
        ms: msstore.Connection, repo: AgentRepository, unique: Callable[[str], str]) -> None:
    agent = await new_agent(repo, i=0)
    cache = await TieredCacheRepository.open(ms, repo, bucket=unique("cache"), entity_type=Agent)
    assert (await cache.find(agent.id)) == agent
    await cache.close()
    for call in (lambda: cache.find(agent.id), lambda: cache.wait_for_revision(1),
                 lambda: cache.save(agent.replace(metadata={"i": 1})),
                 lambda: cache.invalidate(agent.id)):
        with pytest.raises(NotOpenError, match="closed"):
            await call()  # type: ignore[operator]
    assert (await repo.find(agent.id)).metadata == {"i": 0}
    with pytest.raises(InvalidOptionError, match="within"):
        async with TieredCacheRepository(ms, repo, bucket=unique("cache")) as fresh:
            await fresh.wait_for_revision(1, within=0)
