"""HybridStateManager against the real servers: round trips, hydration, merge guarantees."""

from __future__ import annotations

import asyncio
import random
import uuid
from collections.abc import Callable
from typing import Any

import asyncpg
import pytest

import msstore
from msstore import _nats
from msstore.codec import dumps, init_connection, loads
from msstore.hybrid import (
    HybridStateManager,
    StateChange,
    coalesce,
    merge_changes,
    merge_lock_id,
    merge_serialised,
)
from msstore.keys import join_key


def caches_hydrations(ms: msstore.Connection) -> bool:
    """False on NATS < 2.10.14, where a logged bucket's hydrations are served uncached."""
    return _nats.sources_drop_expectations(ms.nc)


QUIET = {"flush_threshold": 1_000_000, "flush_interval": 3600.0}  # flush only when asked


async def rows_of(ms: msstore.Connection, agent: uuid.UUID) -> dict[str, tuple[Any, int]]:
    rows = await ms.pool.fetch(
        "SELECT key, value, version FROM agents.state WHERE agent_id = $1", agent)
    return {r["key"]: (r["value"], r["version"]) for r in rows}


async def write_many(hsm: HybridStateManager, agent: uuid.UUID, keys: list[str],
                     value: Callable[[str], Any] = lambda k: {"k": k}) -> dict[str, int]:
    """Write every key (in concurrent chunks); return key -> acknowledged revision."""
    revs: dict[str, int] = {}
    for i in range(0, len(keys), 500):
        chunk = keys[i:i + 500]
        got = await asyncio.gather(*(hsm.write_state(agent, k, value(k)) for k in chunk))
        revs.update(zip(chunk, got, strict=True))
    return revs


@pytest.mark.parametrize("flusher", ["stream", "dirty-set"])
async def test_write_read_remove_round_trip(ms: msstore.Connection, unique: Callable[[str], str],
                                            flusher: str) -> None:
    agent = uuid.uuid4()
    async with HybridStateManager(ms, bucket=unique("hy"), flusher=flusher,  # type: ignore[arg-type]
                                  **QUIET) as hsm:
        r1 = await hsm.write_state(agent, "plan", {"step": 1})
        r2 = await hsm.write_state(str(agent), "plan", {"step": 2})
        await hsm.write_state(agent, "agent:42/é.*", [1, 2, 3])  # invalid in NATS as is
        assert r2 > r1
        assert await hsm.read_state(agent, "plan") == {"step": 2}
        assert await hsm.read_state(agent, "agent:42/é.*") == [1, 2, 3]
        assert await rows_of(ms, agent) == {}  # write-behind: nothing in SQL yet
        await hsm.flush()
        assert await rows_of(ms, agent) == {"plan": ({"step": 2}, r2),
                                            "agent:42/é.*": ([1, 2, 3], r2 + 1)}
        rd = await hsm.remove_state(agent, "plan")
        assert rd > r2
        with pytest.raises(msstore.NotFoundError):  # the delete marker wins over the SQL row
            await hsm.read_state(agent, "plan")
        assert await hsm.read_state(agent, "plan", default=None) is None
        await hsm.flush()
        assert set(await rows_of(ms, agent)) == {"agent:42/é.*"}
        c = hsm.counters
        assert c["writes"] == 3 and c["removes"] == 1 and c["backlog"] == 0
        assert c["rows_deleted"] == 1
        frame = hsm.metrics()
        assert int(frame["rows"].sum()) == c["rows_flushed"]


@pytest.mark.parametrize("flusher", ["stream", "dirty-set"])
async def test_coalescing_many_writes_to_one_key_flush_one_row(
        ms: msstore.Connection, unique: Callable[[str], str], flusher: str) -> None:
    agent = uuid.uuid4()
    async with HybridStateManager(ms, bucket=unique("hy"), flusher=flusher,  # type: ignore[arg-type]
                                  **QUIET) as hsm:
        revs = [await hsm.write_state(agent, "counter", i) for i in range(100)]
        await hsm.flush()
        assert await rows_of(ms, agent) == {"counter": (99, revs[-1])}
        assert hsm.counters["rows_flushed"] == 1


async def test_lazy_hydration_after_the_kv_entry_is_gone(ms: msstore.Connection,
                                                         unique: Callable[[str], str]) -> None:
    agent, bucket = uuid.uuid4(), unique("hy")
    async with HybridStateManager(ms, bucket=bucket, **QUIET) as hsm:
        await hsm.write_state(agent, "memo", {"text": "hello"})
        await hsm.flush()
        kv_key = join_key(str(agent), "memo")
        # what TTL expiry does: the message disappears from the stream, leaving no marker
        await ms.js.purge_stream(hsm.stream, subject=f"{hsm.subject_prefix}{kv_key}")
        kv = await ms.js.key_value(bucket)
        with pytest.raises(Exception, match="not found"):
            await kv.get(kv_key)
        assert await hsm.read_state(agent, "memo") == {"text": "hello"}
        if caches_hydrations(ms):
            assert loads((await kv.get(kv_key)).value) == {"text": "hello"}  # back
            assert await hsm.read_state(agent, "memo") == {"text": "hello"}
            c = hsm.counters
            assert (c["hydrations"], c["kv_hits"]) == (1, 1)
        else:  # NATS < 2.10.14 with a durability log: served from PostgreSQL, not cached
            assert (await _nats.kv_read(kv, kv_key)).status == "miss"
            assert await hsm.read_state(agent, "memo") == {"text": "hello"}
            c = hsm.counters
            assert (c["hydrations_uncached"], c["hydrations"], c["kv_hits"]) == (2, 0, 0)
        with pytest.raises(msstore.NotFoundError):
            await hsm.read_state(agent, "never-written")


class RacingManager(HybridStateManager):
    """Writes a newer value between the hydration's SQL read and its KV create."""

    newer: Any = None

    async def _after_sql_read(self, agent: uuid.UUID, key: str) -> None:
        await self.write_state(agent, key, self.newer)


async def test_hydration_never_overwrites_a_newer_write(ms: msstore.Connection,
                                                        unique: Callable[[str], str]) -> None:
    agent, bucket = uuid.uuid4(), unique("hy")
    async with RacingManager(ms, bucket=bucket, **QUIET) as hsm:
        await hsm.write_state(agent, "k", "old")
        await hsm.flush()
        kv_key = join_key(str(agent), "k")
        await ms.js.purge_stream(hsm.stream, subject=f"{hsm.subject_prefix}{kv_key}")
        hsm.newer = "new"
        assert await hsm.read_state(agent, "k") == "new"  # not the "old" row it had loaded
        kv = await ms.js.key_value(bucket)
        assert loads((await kv.get(kv_key)).value) == "new"
        assert hsm.counters["hydration_conflicts"] == 1
        await hsm.flush()
        value, version = (await rows_of(ms, agent))["k"]
        assert (value, version) == ("new", (await kv.get(kv_key)).revision)


async def test_bad_input_raises_typed_errors_and_loses_nothing(
        ms: msstore.Connection, unique: Callable[[str], str]) -> None:
    agent = uuid.uuid4()
    async with HybridStateManager(ms, bucket=unique("hy"), **QUIET) as hsm:
        rev = await hsm.write_state(agent, "k", {"ok": True})
        with pytest.raises(msstore.NotSerializableError):
            await hsm.write_state(agent, "k", {"bad": object()})
        with pytest.raises(msstore.ValueTooLargeError):
            await hsm.write_state(agent, "k", "x" * (2 * 1024 * 1024))
        for bad_id in ("agent:42", 42, ""):
            with pytest.raises(msstore.InvalidAgentIdError):
                await hsm.write_state(bad_id, "k", 1)  # type: ignore[arg-type]
        with pytest.raises(msstore.InvalidKeyError):
            await hsm.write_state(agent, "", 1)
        with pytest.raises(msstore.InvalidValueError, match="NUL"):  # JSONB refuses it
            await hsm.write_state(agent, "k", {"text": "a\x00b"})
        assert await hsm.read_state(agent, "k") == {"ok": True}
        await hsm.flush()
        assert await rows_of(ms, agent) == {"k": ({"ok": True}, rev)}
        assert hsm.counters["writes"] == 1


async def test_shuffled_out_of_order_flushes_end_at_the_kv_revision(
        ms: msstore.Connection, unique: Callable[[str], str]) -> None:
    agent, bucket = uuid.uuid4(), unique("hy")
    rng = random.Random(7)
    changes: list[StateChange] = []
    async with HybridStateManager(ms, bucket=bucket, flusher="dirty-set", **QUIET) as hsm:
        for round_ in range(5):
            revs = await write_many(hsm, agent, [f"k{i}" for i in range(60)],
                                    lambda k, r=round_: {"k": k, "round": r})  # type: ignore[misc]
            changes += [StateChange(agent, k, rev, dumps({"k": k, "round": round_}))
                        for k, rev in revs.items()]
        rng.shuffle(changes)
        for i in range(0, len(changes), 37):  # batches in random order, each coalesced
            await merge_changes(ms.pool, coalesce(changes[i:i + 37]))
        kv = await ms.js.key_value(bucket)
        rows = await rows_of(ms, agent)
        assert len(rows) == 60
        for key, (value, version) in rows.items():
            entry = await kv.get(join_key(str(agent), key))
            assert version == entry.revision, key
            assert value == loads(entry.value) == {"k": key, "round": 4}


async def test_the_same_batch_flushed_twice_changes_nothing(ms: msstore.Connection) -> None:
    agent = uuid.uuid4()
    batch = [StateChange(agent, f"k{i}", 1000 + i, dumps({"i": i})) for i in range(50)]
    batch.append(StateChange(agent, "gone", 2000, None))
    await ms.pool.execute(
        "INSERT INTO agents.state (agent_id, key, value, version) VALUES ($1, 'gone', '1', 1)",
        agent)
    first = await merge_changes(ms.pool, batch)
    assert (first.upserted, first.deleted) == (50, 1)
    snapshot = await ms.pool.fetch(
        "SELECT key, value, version, updated_at, xmin::text FROM agents.state "
        "WHERE agent_id = $1 ORDER BY key", agent)
    second = await merge_changes(ms.pool, batch)
    assert (second.upserted, second.deleted, second.skipped) == (0, 0, 51)
    again = await ms.pool.fetch(
        "SELECT key, value, version, updated_at, xmin::text FROM agents.state "
        "WHERE agent_id = $1 ORDER BY key", agent)
    assert again == snapshot and len(again) == 50


async def test_merge_is_one_statement_whatever_the_batch_size(ms: msstore.Connection) -> None:
    conn = await asyncpg.connect(ms.database_url)
    await init_connection(conn)
    seen: list[str] = []
    conn.add_query_logger(lambda record: seen.append(record.query))
    try:
        # the connection's first use adds asyncpg's one-off type introspection: warm it up
        await merge_changes(conn, [StateChange(uuid.uuid4(), "warm", 1, b"1")])
        counts = {}
        for n in (100, 10_000):
            agent = uuid.uuid4()
            batch = [StateChange(agent, f"k{i}", i + 1, b'{"v": 1}') for i in range(n)]
            await asyncio.sleep(0.05)  # the query logger reports asynchronously
            seen.clear()
            result = await merge_changes(conn, batch)
            await asyncio.sleep(0.05)
            assert result.upserted == n
            counts[n] = len(seen)
            assert all("unnest" in q for q in seen)
        assert counts == {100: 1, 10_000: 1}
    finally:
        await conn.close()


@pytest.mark.parametrize("flusher", ["stream", "dirty-set"])
async def test_flushing_10000_dirty_keys_costs_as_many_statements_as_100(
        ms: msstore.Connection, unique: Callable[[str], str], flusher: str) -> None:
    statements = {}
    for n in (100, 10_000):
        agent = uuid.uuid4()
        async with HybridStateManager(ms, bucket=unique("hy"), flusher=flusher,  # type: ignore[arg-type]
                                      batch_size=10_000, **QUIET) as hsm:
            revs = await write_many(hsm, agent, [f"k{i}" for i in range(n)])
            await hsm.flush()
            statements[n] = hsm.counters["sql_statements"]
            assert hsm.counters["rows_upserted"] == n
        rows = await rows_of(ms, agent)
        assert {k: v for k, (_, v) in rows.items()} == revs
    assert statements[100] == statements[10_000] == 1


async def _rows_soon(ms: msstore.Connection, agent: uuid.UUID, count: int,
                     polls: int = 400) -> dict[str, tuple[Any, int]]:
    """Poll (a bounded number of times) until ``count`` rows arrived without a flush() call."""
    rows: dict[str, tuple[Any, int]] = {}
    for _ in range(polls):
        rows = await rows_of(ms, agent)
        if len(rows) >= count:
            break
        await asyncio.sleep(0.025)
    return rows


@pytest.mark.parametrize("flusher", ["stream", "dirty-set"])
async def test_reaching_flush_threshold_flushes_without_being_asked(
        ms: msstore.Connection, unique: Callable[[str], str], flusher: str) -> None:
    agent = uuid.uuid4()
    async with HybridStateManager(ms, bucket=unique("hy"), flusher=flusher,  # type: ignore[arg-type]
                                  flush_threshold=10, flush_interval=3600.0) as hsm:
        revs = await write_many(hsm, agent, [f"k{i}" for i in range(10)])
        rows = await _rows_soon(ms, agent, 10)
        assert {k: v for k, (_, v) in rows.items()} == revs
        for _ in range(400):  # the flusher records its metrics just after the commit is visible
            if hsm.counters["rows_flushed"] >= 10:
                break
            await asyncio.sleep(0.025)
        assert hsm.counters["flushes"] >= 1 and hsm.counters["rows_flushed"] == 10


@pytest.mark.parametrize("flusher", ["stream", "dirty-set"])
async def test_flush_interval_flushes_below_the_threshold(
        ms: msstore.Connection, unique: Callable[[str], str], flusher: str) -> None:
    agent = uuid.uuid4()
    async with HybridStateManager(ms, bucket=unique("hy"), flusher=flusher,  # type: ignore[arg-type]
                                  flush_threshold=1_000_000, flush_interval=0.1) as hsm:
        rev = await hsm.write_state(agent, "only", {"v": 1})
        assert await _rows_soon(ms, agent, 1) == {"only": ({"v": 1}, rev)}


async def test_a_key_that_outlives_the_kv_ttl_unflushed_is_counted_and_still_flushed(
        ms: msstore.Connection, unique: Callable[[str], str]) -> None:
    agent = uuid.uuid4()
    async with HybridStateManager(ms, bucket=unique("hy"), flusher="dirty-set", ttl=1.0,
                                  **QUIET) as hsm:
        rev = await hsm.write_state(agent, "short-lived", "v")
        await hsm.write_state(agent, "also", "w")
        for _ in range(100):  # until the bucket's max age removed the entry from KV
            if await hsm.read_state(agent, "short-lived", default=None) is None:
                break
            await asyncio.sleep(0.05)
        await hsm.flush()
        assert hsm.counters["expired_unflushed"] == 2
        assert (await rows_of(ms, agent))["short-lived"] == ("v", rev)


@pytest.mark.parametrize("flusher", ["stream", "dirty-set"])
async def test_values_postgres_refuses_are_set_aside_and_the_rest_flushes(
        ms: msstore.Connection, unique: Callable[[str], str], flusher: str) -> None:
    """A batch PostgreSQL refuses as data is not retried forever: its storable rows land."""
    agent = uuid.uuid4()
    async with asyncio.timeout(60), HybridStateManager(
            ms, bucket=unique("hy"), flusher=flusher, **QUIET) as hsm:  # type: ignore[arg-type]
        good = await write_many(hsm, agent, [f"g{i:03d}" for i in range(200)])
        for i in range(2):
            await hsm.write_state(agent, f"bad{i}", "placeholder")
        # a foreign writer replaces them in KV with what JSONB cannot hold: not JSON, a NUL
        kv = hsm.engine.kv
        await kv.put(f"{agent}.bad0", b"not json")
        await kv.put(f"{agent}.bad1", b'{"t": "a\\u0000b"}')
        if flusher == "dirty-set":  # its buffer holds msstore's own (valid) values: poison it
            for key, data in (("bad0", b"not json"), ("bad1", b'{"t": "a\\u0000b"}')):
                hsm._flusher.note_write(StateChange(agent, key, 10**6, data))
        await hsm.flush()
        rows = await rows_of(ms, agent)
        assert {k: v for k, v in rows.items() if k.startswith("g")} == {
            k: ({"k": k}, r) for k, r in good.items()}
        # KV keeps one message per key: the foreign values replaced the placeholders unflushed
        assert {k: v for k, v in rows.items() if k.startswith("bad")} == {}
        assert hsm.counters["foreign_messages"] == 2
        # the flusher is not stuck: a later write flushes as usual
        after = await hsm.write_state(agent, "later", {"n": 1})
        await hsm.flush()
        assert (await rows_of(ms, agent))["later"] == ({"n": 1}, after)


async def test_an_older_upsert_after_a_newer_delete_does_not_recreate_the_row(
        ms: msstore.Connection) -> None:
    """A redelivered (or another process') stale upsert after a committed delete: no row."""
    agent = uuid.uuid4()
    await merge_changes(ms.pool, [StateChange(agent, "k", 3, b'"v3"'),
                                  StateChange(agent, "never-flushed", 1, None)])
    await merge_changes(ms.pool, [StateChange(agent, "k", 7, None)])  # delete at revision 7
    stale = await merge_changes(ms.pool, [StateChange(agent, "k", 5, b'"v5"'),
                                          StateChange(agent, "never-flushed", 0, b'"x"')])
    assert stale.upserted == 0
    assert await rows_of(ms, agent) == {}
    # a newer write brings the key back and clears its tombstone
    newer = await merge_changes(ms.pool, [StateChange(agent, "k", 9, b'"v9"')])
    assert newer.upserted == 1
    assert await rows_of(ms, agent) == {"k": ("v9", 9)}
    tombstones = await ms.pool.fetch(
        "SELECT key, version FROM agents.state_tombstones WHERE agent_id = $1 ORDER BY key",
        agent)
    assert [(r["key"], r["version"]) for r in tombstones] == [("never-flushed", 1)]


async def test_old_tombstones_are_purged_and_recent_ones_kept(
        ms: msstore.Connection, unique: Callable[[str], str]) -> None:
    agent = uuid.uuid4()
    async with HybridStateManager(ms, bucket=unique("hy"), flusher="dirty-set", ttl=1.0,
                                  ack_wait=1.0, tombstone_retention=60.0, **QUIET) as hsm:
        assert hsm.tombstone_retention == 60.0
        for key in ("old", "recent"):
            await hsm.write_state(agent, key, 1)
            await hsm.remove_state(agent, key)
        await hsm.flush()
        await ms.pool.execute(
            "UPDATE agents.state_tombstones SET deleted_at = now() - interval '61 seconds' "
            "WHERE agent_id = $1 AND key = 'old'", agent)
        assert await hsm.purge_tombstones() >= 1
        left = await ms.pool.fetch(
            "SELECT key FROM agents.state_tombstones WHERE agent_id = $1", agent)
        assert [r["key"] for r in left] == ["recent"]
        assert hsm.counters["tombstones_purged"] >= 1
    # retention never drops below what a message can live in KV
    assert HybridStateManager(ms, ttl=600.0, ack_wait=30.0,
                              tombstone_retention=1.0).tombstone_retention == 630.0


@pytest.mark.parametrize("serialised", [False, True])
async def test_a_stale_upsert_racing_an_uncommitted_delete(ms: msstore.Connection,
                                                          serialised: bool) -> None:
    """Two processes merge one key at once: a delete (revision 7) not yet committed, and an
    older upsert (revision 5). Unserialised, the upsert's snapshot misses the delete and the
    row comes back; with the stream's advisory lock it waits, then sees the tombstone."""
    agent, lock = uuid.uuid4(), merge_lock_id(f"KV_race_{uuid.uuid4().hex}")
    stale = [StateChange(agent, "k", 5, b'"stale"')]
    async with ms.pool.acquire() as other, other.transaction():
        await other.execute("SELECT pg_advisory_xact_lock($1)", lock)
        await merge_changes(other, [StateChange(agent, "k", 7, None)])
        upsert = asyncio.create_task(merge_serialised(ms.pool, stale, lock) if serialised
                                     else merge_changes(ms.pool, stale))
        await asyncio.sleep(0.3)
        assert upsert.done() is not serialised  # the serialised one waits for the lock
    result = await asyncio.wait_for(upsert, 10)
    assert result.upserted == (0 if serialised else 1)
    assert await rows_of(ms, agent) == ({} if serialised else {"k": ("stale", 5)})
