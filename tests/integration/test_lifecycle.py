"""StateLifecycleManager against real PostgreSQL and NATS.

PostgreSQL outages use a *private* embedded server (its own state folder), never the shared one.
Idle time is driven by a fake clock, so no test waits for, or asserts on, wall-clock time.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import asyncpg
import nats.js.errors
import pytest

import msstore
from msstore import _nats, _publish, services
from msstore.codec import dumps, loads
from msstore.errors import NotFoundError, StoreUnavailableError
from msstore.hybrid import StateChange, merge_changes
from msstore.keys import join_key
from msstore.kv import ensure_bucket
from msstore.lifecycle import IllegalTransitionError, LifecycleState, StateLifecycleManager
from tests.fakes import FakeClock

S = LifecycleState


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
async def lm(ms: msstore.Connection, unique: Callable[[str], str], clock: FakeClock
             ) -> AsyncIterator[StateLifecycleManager]:
    async with StateLifecycleManager(ms, bucket=unique("lc"), ttl=600, idle_timeout=60,
                                     sweep_interval=3600, clock=clock) as manager:
        yield manager


async def seed_sql(ms: msstore.Connection, agent: uuid.UUID, values: dict[str, Any]) -> None:
    """Rows as an earlier flush would have left them (version 1)."""
    await merge_changes(ms.pool, [StateChange(agent, k, 1, dumps(v)) for k, v in values.items()])


async def sql_state(pool_or_url: asyncpg.Pool | str, agent: uuid.UUID
                    ) -> dict[str, tuple[Any, int]]:
    """key -> (value, version) as PostgreSQL holds them."""
    query = "SELECT key, value, version FROM agents.state WHERE agent_id = $1"
    if isinstance(pool_or_url, str):
        conn = await asyncpg.connect(pool_or_url)
        try:
            await msstore.codec.init_connection(conn)
            rows = await conn.fetch(query, agent)
        finally:
            await conn.close()
    else:
        rows = await pool_or_url.fetch(query, agent)
    return {r["key"]: (r["value"], r["version"]) for r in rows}


async def kv_state(lm: StateLifecycleManager, agent: uuid.UUID, keys: list[str]
                   ) -> dict[str, tuple[Any, int] | None]:
    """key -> (value, revision) as KV holds them; None for a delete marker or no message."""
    kv = await lm.ms.js.key_value(lm.bucket)
    out: dict[str, tuple[Any, int] | None] = {}
    for key in keys:
        try:
            entry = await kv.get(join_key(str(agent), key))
        except nats.js.errors.KeyNotFoundError:
            out[key] = None
        else:
            out[key] = (loads(entry.value or b"null"), entry.revision or 0)
    return out


def pairs(lm: StateLifecycleManager, agent: uuid.UUID) -> list[tuple[LifecycleState, ...]]:
    return [(e.from_state, e.to_state) for e in lm.transitions(agent)]


# --------------------------------------------------------------------------- transitions


async def test_an_agent_goes_through_every_state(lm: StateLifecycleManager,
                                                 clock: FakeClock) -> None:
    agent = uuid.uuid4()
    seen: list[tuple[uuid.UUID, LifecycleState, LifecycleState]] = []
    lm.on_transition(lambda a, f, t, _at: seen.append((a, f, t)))
    assert lm.state(agent) is S.COLD
    await lm.write_state(agent, "plan", {"step": 1})             # COLD → HYDRATING → ACTIVE
    assert lm.state(agent) is S.ACTIVE and lm.dirty(agent) == {"plan"}
    await lm.flush_agent(agent)                             # → FLUSHING → ACTIVE
    assert lm.dirty(agent) == frozenset()
    await lm.write_state(agent, "goal", "ship it")
    clock.advance(61)
    assert await lm.expire_idle() == [agent]                # → FLUSHING → ACTIVE → EXPIRED
    assert lm.state(agent) is S.EXPIRED
    assert await lm.read_state(agent, "goal") == "ship it"       # EXPIRED → HYDRATING → ACTIVE
    assert pairs(lm, agent) == [
        (S.COLD, S.HYDRATING), (S.HYDRATING, S.ACTIVE),
        (S.ACTIVE, S.FLUSHING), (S.FLUSHING, S.ACTIVE),
        (S.ACTIVE, S.FLUSHING), (S.FLUSHING, S.ACTIVE), (S.ACTIVE, S.EXPIRED),
        (S.EXPIRED, S.HYDRATING), (S.HYDRATING, S.ACTIVE),
    ]
    assert [(f, t) for a, f, t in seen if a == agent] == pairs(lm, agent)
    with pytest.raises(IllegalTransitionError, match="ACTIVE → COLD"):
        lm.tracker.transition(agent, S.COLD)
    assert lm.state(agent) is S.ACTIVE


# --------------------------------------------------------------------------- hydration


async def test_ten_concurrent_hydrations_run_exactly_one_sql_load(
        lm: StateLifecycleManager, ms: msstore.Connection) -> None:
    agent = uuid.uuid4()
    values = {f"k{i}": {"i": i} for i in range(50)}
    await seed_sql(ms, agent, values)
    results = await asyncio.gather(*(lm.hydrate_agent(agent) for _ in range(10)))
    assert lm.counters["sql_loads"] == 1
    assert lm.counters["hydration_joins"] == 9
    assert all(r is results[0] for r in results)
    assert (results[0].rows, results[0].created, results[0].skipped) == (50, 50, 0)
    kv = await kv_state(lm, agent, list(values))
    assert {k: v[0] for k, v in kv.items() if v} == values
    # an ACTIVE agent is not loaded again
    assert (await lm.hydrate_agent(agent)).sql_load is False
    assert lm.counters["sql_loads"] == 1


async def test_hydration_never_overwrites_a_newer_kv_value(
        lm: StateLifecycleManager, ms: msstore.Connection) -> None:
    agent = uuid.uuid4()
    await seed_sql(ms, agent, {"plan": "old", "goal": "from sql"})
    kv = await ms.js.key_value(lm.bucket)
    await kv.put(join_key(str(agent), "plan"), dumps("newer"))
    result = await lm.hydrate_agent(agent)
    assert (result.created, result.skipped) == (1, 1)
    assert await lm.read_state(agent, "plan") == "newer"
    assert await lm.read_state(agent, "goal") == "from sql"


@pytest.mark.parametrize("chunk", [1, 64])
async def test_hydration_is_pipelined(ms: msstore.Connection, unique: Callable[[str], str],
                                      chunk: int) -> None:
    agent = uuid.uuid4()
    await seed_sql(ms, agent, {f"k{i}": i for i in range(200)})
    async with StateLifecycleManager(ms, bucket=unique("pipe"), hydrate_chunk=chunk) as lm:
        await lm.hydrate_agent(agent)
        # every put of a chunk is in flight before the first acknowledgement comes back
        assert lm.counters["hydration_peak_in_flight"] == chunk
        assert lm.counters["keys_hydrated"] == 200


@pytest.mark.parametrize("raw", [True, False], ids=["raw-hpub", "nc-publish"])
async def test_hydration_counts_are_exact_and_newer_values_and_delete_markers_win(
        ms: msstore.Connection, unique: Callable[[str], str], raw: bool,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Both ways of sending the creates: HPUB commands built once (the fast path, taken
    while connected) and nc.publish (while reconnecting, or with another nats-py)."""
    if raw:
        assert _publish._raw_writes(ms.nc)  # this nats-py still has what the fast path needs
    else:
        monkeypatch.setattr(_publish, "_raw_writes", lambda nc: False)
    agent = uuid.uuid4()
    values = {f"k{i:03d}": {"sql": i} for i in range(100)}
    await seed_sql(ms, agent, values)
    newer = [f"k{i:03d}" for i in range(0, 100, 4)]       # 25 keys written in KV first
    deleted = [f"k{i:03d}" for i in range(1, 100, 10)]    # 10 keys deleted in KV first
    async with StateLifecycleManager(ms, bucket=unique("exact"), hydrate_chunk=8) as lm:
        kv = await ms.js.key_value(lm.bucket)
        for key in newer:
            await kv.put(join_key(str(agent), key), dumps({"kv": key}))
        for key in deleted:
            await kv.delete(join_key(str(agent), key))
        result = await lm.hydrate_agent(agent)
        assert (result.rows, result.created, result.skipped) == (100, 65, 35)
        assert (lm.counters["keys_hydrated"], lm.counters["keys_skipped"]) == (65, 35)
        assert lm.counters["hydration_peak_in_flight"] == 8
        got = await kv_state(lm, agent, list(values))
        for key, value in values.items():
            if key in newer:
                assert got[key] is not None and got[key][0] == {"kv": key}
            elif key in deleted:
                assert got[key] is None                 # the delete marker wins, as before
            else:
                assert got[key] is not None and got[key][0] == value
        with pytest.raises(NotFoundError):
            await lm.read_state(agent, deleted[0])
        assert lm.dirty(agent) == frozenset()
        msg = await ms.js.get_last_msg(lm.stream, lm.subject_prefix
                                       + msstore.keys.join_key(str(agent), "k002"))
        assert msg.data == dumps({"sql": 2})  # the codec's bytes, not PostgreSQL's text
        assert msg.headers is not None and msg.headers.get(_nats.HYDRATED) == "1"


async def test_a_value_written_while_hydrating_is_never_overwritten(
        ms: msstore.Connection, unique: Callable[[str], str]) -> None:
    agent = uuid.uuid4()
    values = {f"k{i:03d}": i for i in range(300)}
    await seed_sql(ms, agent, values)
    raced = list(values)[::3]
    async with StateLifecycleManager(ms, bucket=unique("race"), hydrate_chunk=16) as lm:
        kv = await ms.js.key_value(lm.bucket)
        result, *_ = await asyncio.gather(
            lm.hydrate_agent(agent),
            *(kv.put(join_key(str(agent), k), dumps("newer")) for k in raced))
        # each raced key: either its create landed first (then the put replaced it) or the
        # put did (then the create was skipped); the counts add up either way
        assert result.created + result.skipped == result.rows == 300
        assert result.created >= 300 - len(raced)
        got = await kv_state(lm, agent, list(values))
        assert {k: v[0] for k, v in got.items() if v is not None} == {
            k: "newer" if k in raced else v for k, v in values.items()}


async def test_a_failed_hydration_raises_a_typed_error_and_leaves_no_subscription(
        ms: msstore.Connection, unique: Callable[[str], str]) -> None:
    agent = uuid.uuid4()
    await seed_sql(ms, agent, {f"k{i}": i for i in range(50)})
    async with StateLifecycleManager(ms, bucket=unique("gone"), nats_timeout=2,
                                     flush_on_close=False) as lm:
        await ms.js.delete_stream(lm.stream)  # nothing stores the creates any more
        subs = len(ms.nc._subs)
        with pytest.raises(StoreUnavailableError):
            await lm.hydrate_agent(agent)
        assert len(ms.nc._subs) == subs
        assert pairs(lm, agent) == [(S.COLD, S.HYDRATING), (S.HYDRATING, S.COLD)]
        assert lm.counters["hydration_failures"] == 1


# --------------------------------------------------------------------------- flush failure


async def test_a_failed_flush_rolls_back_keeps_the_dirty_keys_and_the_retry_succeeds(
        private_pg: Path, private_ms: msstore.Connection,
        unique: Callable[[str], str]) -> None:
    agent, other = uuid.uuid4(), uuid.uuid4()
    async with StateLifecycleManager(private_ms, bucket=unique("fail"),
                                     flush_on_close=False) as lm:
        await lm.write_state(agent, "a", 1)
        await lm.write_state(agent, "b", 2)
        await lm.flush_agent(agent)
        before = await sql_state(private_ms.pool, agent)
        assert {k: v for k, (v, _) in before.items()} == {"a": 1, "b": 2}
        await lm.write_state(agent, "a", 10)
        await lm.write_state(agent, "c", 3)
        await lm.remove_state(agent, "b")
        assert lm.dirty(agent) == {"a", "b", "c"}

        await asyncio.to_thread(services.down, private_pg, which=("postgres",))
        try:
            with pytest.raises(StoreUnavailableError, match="retry"):
                await lm.flush_agent(agent)
            assert lm.state(agent) is S.ACTIVE
            assert lm.dirty(agent) == {"a", "b", "c"}
            assert pairs(lm, agent)[-2:] == [(S.ACTIVE, S.FLUSHING), (S.FLUSHING, S.ACTIVE)]
            assert lm.counters["flush_failures"] == 1
            # a hydration that cannot read PostgreSQL falls back to COLD
            with pytest.raises(StoreUnavailableError):
                await lm.hydrate_agent(other)
            assert pairs(lm, other) == [(S.COLD, S.HYDRATING), (S.HYDRATING, S.COLD)]
        finally:
            await asyncio.to_thread(services.up, private_pg, which=("postgres",))

        # PostgreSQL is unchanged (read on a fresh connection, not through the pool)
        assert await sql_state(private_ms.database_url, agent) == before
        # the retry succeeds; the pool may first hand out connections the restart closed
        for _attempt in range(10):
            try:
                result = await lm.flush_agent(agent)
                break
            except StoreUnavailableError:
                continue
        else:
            pytest.fail(f"flush still failing after PostgreSQL came back: {lm.last_error!r}")
        assert (result.upserted, result.deleted) == (2, 1)
        assert lm.dirty(agent) == frozenset()
        after = await sql_state(private_ms.pool, agent)
        kv = await kv_state(lm, agent, ["a", "b", "c"])
        assert after == {k: v for k, v in kv.items() if v is not None}
        assert {k: v for k, (v, _) in after.items()} == {"a": 10, "c": 3}


# --------------------------------------------------------------------------- checkpoints


async def test_checkpoint_then_restore_gives_back_the_checkpointed_state_exactly(
        lm: StateLifecycleManager, ms: msstore.Connection) -> None:
    agent = uuid.uuid4()
    original = {"a": {"n": 1}, "b": [2, "two"], "c": "three"}
    for k, v in original.items():
        await lm.write_state(agent, k, v)
    await lm.remove_state(agent, "c")
    await lm.write_state(agent, "c", original["c"])
    await lm.flush_agent(agent)
    checkpoint = await lm.checkpoint(agent)
    kv_before = await kv_state(lm, agent, list(original))
    row = await ms.pool.fetchrow(
        "SELECT state_snapshot, kv_revision FROM agents.checkpoints "
        "WHERE agent_id = $1 AND checkpoint_id = $2", agent, checkpoint)
    assert row["state_snapshot"] == original
    assert row["kv_revision"] == max(v[1] for v in kv_before.values() if v)

    await lm.write_state(agent, "a", {"n": 100})                 # changed
    await lm.remove_state(agent, "b")                             # removed
    await lm.write_state(agent, "d", "added")                     # added
    await lm.flush_agent(agent)
    await ms.pool.execute(                                  # a row KV never held
        "INSERT INTO agents.state (agent_id, key, value, version) VALUES ($1, 'stray', '1', 1)",
        agent)

    result = await lm.restore(agent, checkpoint)
    assert (result.written, result.removed) == (3, 1)
    kv = await kv_state(lm, agent, ["a", "b", "c", "d"])
    assert {k: v[0] for k, v in kv.items() if v} == original
    assert kv["d"] is None
    sql = await sql_state(ms.pool, agent)
    assert {k: v for k, (v, _) in sql.items()} == original
    assert {k: ver for k, (_, ver) in sql.items()} == {k: v[1] for k, v in kv.items() if v}
    assert lm.dirty(agent) == frozenset()
    with pytest.raises(NotFoundError):
        await lm.read_state(agent, "d")
    with pytest.raises(NotFoundError, match="checkpoint"):
        await lm.restore(agent, uuid.uuid4())


# --------------------------------------------------------------------------- expiry


async def test_expiry_purges_kv_and_the_next_read_hydrates_the_same_values(
        lm: StateLifecycleManager, ms: msstore.Connection, clock: FakeClock) -> None:
    idle, busy = uuid.uuid4(), uuid.uuid4()
    values = {f"k{i}": {"i": i} for i in range(20)}
    for k, v in values.items():
        await lm.write_state(idle, k, v)                          # dirty: expiry must flush them
    clock.advance(30)
    await lm.write_state(busy, "x", 1)
    clock.advance(31)                                       # idle: 61 s, busy: 31 s
    assert await lm.expire_idle() == [idle]
    assert (lm.state(idle), lm.state(busy)) == (S.EXPIRED, S.ACTIVE)
    assert set((await kv_state(lm, idle, list(values))).values()) == {None}
    info = await ms.js.stream_info(lm.stream, subjects_filter=f"$KV.{lm.bucket}.{idle}.>")
    assert not info.state.subjects  # purged: not even delete markers are left
    assert {k: v for k, (v, _) in (await sql_state(ms.pool, idle)).items()} == values

    loads_before = lm.counters["sql_loads"]
    assert await lm.read_state(idle, "k7") == {"i": 7}
    assert lm.counters["sql_loads"] == loads_before + 1
    assert pairs(lm, idle)[-3:] == [(S.ACTIVE, S.EXPIRED), (S.EXPIRED, S.HYDRATING),
                                    (S.HYDRATING, S.ACTIVE)]
    assert {k: v[0] for k, v in (await kv_state(lm, idle, list(values))).items()
            if v} == values


async def test_the_background_sweeper_expires_idle_agents(
        ms: msstore.Connection, unique: Callable[[str], str], clock: FakeClock) -> None:
    agent = uuid.uuid4()
    expired = asyncio.Event()
    async with StateLifecycleManager(ms, bucket=unique("sweep"), ttl=600, idle_timeout=60,
                                     sweep_interval=0.05, clock=clock) as lm:
        lm.on_transition(lambda a, _f, to, _t: expired.set() if to is S.EXPIRED else None)
        await lm.write_state(agent, "k", "v")
        clock.advance(61)
        await asyncio.wait_for(expired.wait(), timeout=30)  # a bound, not a measurement
        assert lm.state(agent) is S.EXPIRED
        assert lm.counters["sweeps"] >= 1
        assert await lm.read_state(agent, "k") == "v"


# --------------------------------------------------------------------------- epochs


async def bucket_epoch(lm: StateLifecycleManager) -> int:
    return _nats.stream_epoch(await lm.ms.js.stream_info(lm.stream))


async def sql_epochs(ms: msstore.Connection, agent: uuid.UUID) -> dict[str, int]:
    rows = await ms.pool.fetch(
        "SELECT key, epoch FROM agents.state WHERE agent_id = $1 UNION ALL "
        "SELECT 'tombstone:' || key, epoch FROM agents.state_tombstones WHERE agent_id = $1",
        agent)
    return {r["key"]: r["epoch"] for r in rows}


async def recreate_bucket(lm: StateLifecycleManager) -> int:
    """Delete the bucket under the running manager and create it again; the new epoch."""
    before = await bucket_epoch(lm)
    await lm.ms.js.delete_key_value(lm.bucket)
    await ensure_bucket(lm.ms.js, lm.bucket, ttl=lm.ttl)
    after = await bucket_epoch(lm)
    assert after not in (0, before)
    return after


async def test_flushed_and_restored_rows_carry_the_buckets_epoch(
        lm: StateLifecycleManager, ms: msstore.Connection) -> None:
    agent = uuid.uuid4()
    epoch = await bucket_epoch(lm)
    await lm.write_state(agent, "a", 1)
    await lm.write_state(agent, "gone", 2)
    await lm.flush_agent(agent)
    await lm.remove_state(agent, "gone")
    await lm.flush_agent(agent)
    assert await sql_epochs(ms, agent) == {"a": epoch, "tombstone:gone": epoch}
    checkpoint = await lm.checkpoint(agent)
    await lm.write_state(agent, "b", 3)
    await lm.flush_agent(agent)
    await lm.restore(agent, checkpoint)
    assert (await sql_epochs(ms, agent))["a"] == epoch
    assert "b" not in await sql_epochs(ms, agent)


async def test_a_bucket_recreated_under_a_running_manager_still_lands_its_writes(
        lm: StateLifecycleManager, ms: msstore.Connection) -> None:
    agent = uuid.uuid4()
    for i in range(5):
        await lm.write_state(agent, "k", i)
    await lm.write_state(agent, "other", "x")
    await lm.flush_agent(agent)
    assert await sql_state(ms.pool, agent) == {"k": (4, 5), "other": ("x", 6)}

    epoch = await recreate_bucket(lm)
    assert await lm.write_state(agent, "k", "new") == 1      # versions restart at 1
    assert await lm.remove_state(agent, "other") == 2
    await lm.flush_agent(agent)
    assert await sql_state(ms.pool, agent) == {"k": ("new", 1)}
    assert await sql_epochs(ms, agent) == {"k": epoch, "tombstone:other": epoch}
    assert lm.dirty(agent) == frozenset()
    assert lm.state(agent) is S.ACTIVE


async def test_a_flush_that_reads_back_an_older_revision_reads_the_epoch_again(
        lm: StateLifecycleManager, ms: msstore.Connection) -> None:
    """Dirty keys of the old incarnation, rewritten by another process after the recreation."""
    agent = uuid.uuid4()
    for i in range(3):
        await lm.write_state(agent, "k", i)
    epoch = await recreate_bucket(lm)
    kv = await ms.js.key_value(lm.bucket)
    await kv.put(join_key(str(agent), "k"), dumps("theirs"))  # revision 1
    await lm.flush_agent(agent)
    assert await sql_state(ms.pool, agent) == {"k": ("theirs", 1)}
    assert await sql_epochs(ms, agent) == {"k": epoch}
    assert lm.dirty(agent) == frozenset()


# --------------------------------------------------------------------------- sharing a bucket


async def test_a_lifecycle_hydration_in_a_bucket_the_stream_flusher_logs_never_stalls_the_log(
        ms: msstore.Connection, unique: Callable[[str], str], clock: FakeClock) -> None:
    """Both managers on one bucket (their default), one agent each. The hybrid's durability
    log copies the lifecycle's writes too. The lifecycle expires its agent (KV purged) while
    the log still holds the agent's keys, and hydrates it again. Before nats-server 2.10.14 the
    hydration's compare-and-set header was checked again by the log's source, and refused
    there: the log stopped copying, and the hybrid's later writes never reached PostgreSQL.
    On such servers the lifecycle now serves the agent's keys from PostgreSQL without caching.
    """
    bucket = unique("shared")
    mine, theirs = uuid.uuid4(), uuid.uuid4()
    async with msstore.HybridStateManager(ms, bucket=bucket, durable=unique("d"),
                                          flush_interval=3600) as hsm, \
            StateLifecycleManager(ms, bucket=bucket, idle_timeout=60, sweep_interval=3600,
                                  clock=clock) as lm:
        for k, v in (("a", 1), ("b", 2)):
            await lm.write_state(mine, k, v)
        clock.advance(61)
        assert await lm.expire_idle() == [mine]                 # flushed, then purged from KV
        before = dict(lm.counters)
        assert await lm.read_state(mine, "a") == 1               # hydrates the agent again
        delta = {c: lm.counters[c] - before[c]
                 for c in ("agent_hydrations", "keys_hydrated", "hydrations_uncached")}
        if _nats.sources_drop_expectations(ms.nc):
            assert delta == {"agent_hydrations": 1, "keys_hydrated": 2, "hydrations_uncached": 0}
        else:  # served from PostgreSQL, not cached in KV: a create would stall the log
            assert delta == {"agent_hydrations": 1, "keys_hydrated": 0, "hydrations_uncached": 3}
        revisions = [await hsm.write_state(theirs, f"k{i}", i) for i in range(3)]
        async with asyncio.timeout(30):
            await hsm.flush()
        assert await lm.read_state(mine, "b") == 2
    assert await sql_state(ms.pool, theirs) == {f"k{i}": (i, r) for i, r in enumerate(revisions)}
    assert {k: v for k, (v, _) in (await sql_state(ms.pool, mine)).items()} == {"a": 1, "b": 2}
