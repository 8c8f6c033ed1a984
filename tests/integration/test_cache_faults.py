"""TieredCacheRepository through a real nats-server kill -9 and restart (a private server).

Two ``msstore.connect()`` connections on the private NATS stand in for two processes, each
with its own cache on the same bucket; L3 is an AgentRepository on the session's connection,
so only L2 and the watch go through the outage. The one wall-clock assert is the issue's
requirement: after the restart, a write from A reaches B's ``find()`` within 1 s.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest
from nats.aio.msg import Msg

import msstore
from msstore import services
from msstore.cache import CacheSource, TieredCacheRepository
from msstore.errors import MsstoreError, StoreTimeoutError
from msstore.repository import Agent, AgentRepository

from .conftest import kill9, private_nats_url

pytestmark = pytest.mark.slow

#: the issue's requirement for a write made after the restart
VISIBLE_WITHIN = 1.0
#: bound of polls that wait for a state (clients reconnected, a watch rebuilt): not asserts
STATE_WITHIN = 20.0


@pytest.fixture
async def repo(ms: msstore.Connection, unique: Callable[[str], str]
               ) -> AsyncIterator[AgentRepository]:
    async with AgentRepository(ms, bucket=unique("faultl3")) as r:
        yield r


def connect(ms: msstore.Connection, home: Path) -> Any:
    """A new, independent connection: the session's database, the private nats-server."""
    return msstore.connect(ms.database_url, private_nats_url(home), migrate=False)


async def until(condition: Callable[[], bool], what: str, within: float = STATE_WITHIN) -> None:
    """Poll ``condition`` every 5 ms; fail saying ``what`` did not happen within ``within`` s."""
    deadline = time.monotonic() + within
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail(f"{what}: not within {within} s")
        await asyncio.sleep(0.005)


async def seen_within(cache: TieredCacheRepository[Agent], agent_id: uuid.UUID, i: int,
                      within: float) -> float:
    """Seconds until ``cache.find`` returns ``metadata["i"] == i``; fails after ``within``."""
    t0 = time.monotonic()
    got = None
    while time.monotonic() - t0 <= within:
        got = (await cache.find(agent_id)).metadata["i"]
        if got == i:
            return time.monotonic() - t0
        await asyncio.sleep(0.005)
    pytest.fail(f"find() still returned i={got} {within} s after i={i} was written")


async def new_agent(repo: AgentRepository, i: int) -> Agent:
    return await repo.save(Agent(uuid.uuid4(), "researcher", "idle", {"i": i}))


async def kill_nats(home: Path, *conns: msstore.Connection) -> None:
    await asyncio.to_thread(kill9, home, "nats")
    await until(lambda: not any(c.nc.is_connected for c in conns),
                "every client noticed the killed server")


async def restart_nats(home: Path, *conns: msstore.Connection) -> None:
    await asyncio.to_thread(services.up, home, which=("nats",))
    await until(lambda: all(c.nc.is_connected for c in conns), "every client reconnected")


async def attempt(call: Any) -> Exception | None:
    """The error ``call`` raised (any type, so a raw nats-py one fails the test), or None."""
    try:
        await call
    except Exception as e:
        return e
    return None


@pytest.fixture
async def nats_back_up(private_nats: Path) -> AsyncIterator[Path]:
    """The private server, started again after the test if the test left it down."""
    yield private_nats
    await asyncio.to_thread(services.up, private_nats, which=("nats",))


async def test_after_a_nats_restart_a_write_reaches_the_other_process_within_1_s(
        ms: msstore.Connection, nats_back_up: Path, repo: AgentRepository,
        unique: Callable[[str], str]) -> None:
    private_nats = nats_back_up
    changed = await new_agent(repo, 0)   # A writes it after the restart
    still = await new_agent(repo, -1)    # nobody writes it
    tried = await new_agent(repo, 0)     # A tries to write it while the server is down
    bucket = unique("cache")
    async with connect(ms, private_nats) as conn_a, connect(ms, private_nats) as conn_b, \
            TieredCacheRepository(conn_a, repo, bucket=bucket, entity_type=Agent) as a, \
            TieredCacheRepository(conn_b, repo, bucket=bucket, entity_type=Agent) as b:
        for cache in (a, b):
            for agent in (changed, still, tried):
                await cache.find(agent.id)
            assert (await cache.find_entry(changed.id)).source is CacheSource.MEMORY
        kv = await conn_a.js.key_value(bucket)
        still_revision = (await kv.get(a.kv_key(still.id))).revision

        await kill_nats(private_nats, conn_a, conn_b)
        assert (len(a), len(b)) == (0, 0)  # the disconnect emptied both L1s
        errors = await asyncio.gather(
            attempt(b.find(still.id)), attempt(a.find(changed.id)),
            attempt(a.put(tried.id, tried.replace(metadata={"i": 1}))))
        assert None not in errors  # every call failed: nothing answered from a stale L1
        assert [e for e in errors if not isinstance(e, MsstoreError)] == []
        put_error = errors[2]
        if isinstance(put_error, StoreTimeoutError):
            assert "may still be applied" in str(put_error)
        assert a.peek(tried.id) is None and len(b) == 0

        await restart_nats(private_nats, conn_a, conn_b)
        # the first write after the restart: B may not have its new watch yet
        current = await a.save(changed.replace(metadata={"i": 1}))
        latencies = [await seen_within(b, changed.id, 1, VISIBLE_WITHIN)]
        await until(lambda: a.counters["rewatches"] == b.counters["rewatches"] == 1,
                    "both caches rebuilt their watch")
        for i in range(2, 5):  # B serves from L1 again, and the new watch keeps it coherent
            # the rebuilt watch resets L1 when it starts, which under load can come after round
            # 1's find: one find (re)loads it, and the next is an L1 hit
            await b.find(changed.id)
            assert (await b.find_entry(changed.id)).source is CacheSource.MEMORY
            current = await a.save(current.replace(metadata={"i": i}))
            latencies.append(await seen_within(b, changed.id, i, VISIBLE_WITHIN))
        print(f"\nA's write -> B's find, after the restart: "
              f"{', '.join(f'{s * 1e3:.1f} ms' for s in latencies)}")
        assert b.counters["invalidations"] >= 3  # rounds 2-4 were dropped by B's new watch

        # nothing invented: the untouched key is as it was, at the same revision
        assert (await kv.get(a.kv_key(still.id))).revision == still_revision
        assert (await a.find(still.id)) == (await b.find(still.id)) == still
        # the put that failed is indeterminate: the old value or the one tried, in both caches
        got_a = (await a.find(tried.id)).metadata["i"]
        got_b = (await b.find(tried.id)).metadata["i"]
        assert got_a == got_b
        assert got_a in (0, 1)
        print(f"the put that raised {type(put_error).__name__} during the outage "
              f"{'was applied' if got_a == 1 else 'was not applied'} after the restart")


class HeldWatch(TieredCacheRepository[Agent]):
    """A cache whose watch callback waits on ``hold``: a watch lagging behind a write."""

    hold: asyncio.Event | None = None
    held = 0

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        deliver = self._watch._on_message  # what the watch subscribes with, at start()

        async def held(msg: Msg) -> None:
            if self.hold is not None:
                self.held += 1
                await self.hold.wait()
            await deliver(msg)

        self._watch._on_message = held  # type: ignore[method-assign]


async def test_while_nats_is_down_a_lagging_watch_never_lets_a_stale_l1_value_out(
        ms: msstore.Connection, nats_back_up: Path, repo: AgentRepository,
        unique: Callable[[str], str]) -> None:
    private_nats = nats_back_up
    agent = await new_agent(repo, 0)
    bucket = unique("cache")
    async with connect(ms, private_nats) as conn_a, connect(ms, private_nats) as conn_b, \
            TieredCacheRepository(conn_a, repo, bucket=bucket, entity_type=Agent) as a, \
            HeldWatch(conn_b, repo, bucket=bucket, entity_type=Agent) as b:
        assert (await a.find(agent.id)).metadata["i"] == 0
        assert (await b.find(agent.id)).metadata["i"] == 0
        b.hold = asyncio.Event()
        await a.save(agent.replace(metadata={"i": 1}))  # acknowledged: it is in the stream
        await until(lambda: b.held == 1, "B's watch received A's write")
        stale = b.peek(agent.id)
        assert stale is not None and stale.metadata["i"] == 0  # B is stale right now

        await kill_nats(private_nats, conn_a, conn_b)
        # nats-py runs its disconnect callback a moment after is_connected turns False
        await until(lambda: b.counters["l1_resets"] >= 1, "B's L1 reset by the disconnect")
        assert b.peek(agent.id) is None  # dropped by the disconnect, not by the watch
        assert b.counters["invalidations"] == 0
        error = await attempt(b.find(agent.id))
        assert isinstance(error, MsstoreError), repr(error)

        b.hold.set()
        b.hold = None
        await restart_nats(private_nats, conn_a, conn_b)
        await seen_within(b, agent.id, 1, VISIBLE_WITHIN)
    assert b.counters["l1_resets"] >= 1
