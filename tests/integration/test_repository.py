"""AgentRepository against real NATS KV and PostgreSQL: round trips, fallback, conflicts, faults.

The PostgreSQL outage uses a *private* embedded server (its own state folder), never the
shared one.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import nats.js.errors
import pytest

import msstore
from msstore import services
from msstore.codec import loads
from msstore.repository import Agent, AgentRepository, PendingWritesError


@pytest.fixture
async def repo(ms: msstore.Connection, unique: Callable[[str], str]
               ) -> AsyncIterator[AgentRepository]:
    async with AgentRepository(ms, bucket=unique("repo")) as r:
        yield r


async def sql_row(ms: msstore.Connection, agent_id: uuid.UUID) -> dict[str, object] | None:
    row = await ms.pool.fetchrow(
        "SELECT agent_type, status, metadata, version FROM agents.registry WHERE agent_id = $1",
        agent_id)
    return None if row is None else dict(row)


async def kv_entry(ms: msstore.Connection, repo: AgentRepository, agent_id: uuid.UUID
                   ) -> tuple[int, object]:
    kv = await ms.js.key_value(repo.bucket)
    entry = await kv.get(repo.kv_key(agent_id))
    return entry.revision or 0, loads(entry.value or b"null")


async def lose_kv_entry(ms: msstore.Connection, repo: AgentRepository,
                        agent_id: uuid.UUID) -> None:
    """What a TTL expiry does: the key's messages leave the stream, no marker stays."""
    await ms.js.purge_stream(f"KV_{repo.bucket}",
                             subject=f"$KV.{repo.bucket}.{repo.kv_key(agent_id)}")


async def test_save_returns_the_kv_revision_and_sql_catches_up_after_drain(
        ms: msstore.Connection, repo: AgentRepository) -> None:
    a = Agent(uuid.uuid4(), "researcher", "idle", {"goal": "read", "n": [1, 2]})
    saved = await repo.save(a)
    revision, value = await kv_entry(ms, repo, a.id)
    assert saved.version == revision > 0
    assert saved == a.replace(version=revision)
    assert value == {"id": str(a.id), "type": "researcher", "status": "idle",
                     "metadata": {"goal": "read", "n": [1, 2]}}
    await repo.drain()
    assert repo.pending == 0
    assert await sql_row(ms, a.id) == {"agent_type": "researcher", "status": "idle",
                                       "metadata": {"goal": "read", "n": [1, 2]},
                                       "version": revision}
    assert repo.counters["saves"] == 1 and repo.counters["sql_writes"] == 1
    assert len(repo.lag_samples) == 1 and repo.lag_samples[0] >= 0


async def test_find_update_delete_round_trip(ms: msstore.Connection,
                                             repo: AgentRepository) -> None:
    saved = await repo.save(Agent(uuid.uuid4(), "planner"))
    found = await repo.find(str(saved.id))
    assert found == saved and repo.counters["kv_hits"] == 1

    updated = await repo.update(found.replace(status="busy", metadata={"step": 2}))
    assert updated.version > saved.version
    assert await repo.find(saved.id) == updated
    await repo.drain()
    assert await sql_row(ms, saved.id) == {"agent_type": "planner", "status": "busy",
                                           "metadata": {"step": 2},
                                           "version": updated.version}

    await repo.delete(saved.id)
    with pytest.raises(msstore.NotFoundError, match="delete marker"):
        await repo.find(saved.id)  # the KV delete marker answers before SQL is touched
    assert repo.counters["sql_fallbacks"] == 0
    await repo.drain()
    assert await sql_row(ms, saved.id) is None
    assert repo.counters["sql_deleted"] == 1 and repo.pending == 0
    with pytest.raises(msstore.NotFoundError):
        await repo.find(uuid.uuid4())


async def test_many_saves_of_one_agent_coalesce_into_the_newest_row(
        ms: msstore.Connection, repo: AgentRepository) -> None:
    agent = Agent(uuid.uuid4(), "counter")
    last = await asyncio.gather(*(repo.save(agent.replace(metadata={"i": i}))
                                  for i in range(50)))
    newest = max(last, key=lambda a: a.version)
    await repo.drain()
    row = await sql_row(ms, agent.id)
    assert row is not None and row["version"] == newest.version
    assert row["metadata"] == newest.metadata
    assert repo.counters["sql_writes"] < 50  # coalesced
    assert repo.counters["sql_writes"] + repo.counters["coalesced"] == 50


async def test_find_falls_back_to_sql_and_repopulates_kv_by_create(
        ms: msstore.Connection, repo: AgentRepository) -> None:
    saved = await repo.save(Agent(uuid.uuid4(), "archivist", "done", {"k": "v"}))
    await repo.drain()
    await lose_kv_entry(ms, repo, saved.id)
    kv = await ms.js.key_value(repo.bucket)
    with pytest.raises(nats.js.errors.KeyNotFoundError):
        await kv.get(repo.kv_key(saved.id))

    found = await repo.find(saved.id)
    assert (found.type, found.status, found.metadata) == ("archivist", "done", {"k": "v"})
    assert found.version > saved.version  # a new KV revision
    assert repo.counters["sql_fallbacks"] == 1 and repo.counters["kv_repopulated"] == 1
    revision, value = await kv_entry(ms, repo, saved.id)
    assert revision == found.version and value == found.to_dict()

    assert await repo.find(saved.id) == found  # now a KV hit
    assert repo.counters["kv_hits"] == 1 and repo.counters["sql_fallbacks"] == 1
    await repo.drain()  # SQL is re-stamped with the repopulated revision
    row = await sql_row(ms, saved.id)
    assert row is not None and row["version"] == found.version


async def test_update_after_kv_lost_the_entry_uses_the_sql_version(
        ms: msstore.Connection, repo: AgentRepository) -> None:
    saved = await repo.save(Agent(uuid.uuid4(), "x"))
    await repo.drain()
    await lose_kv_entry(ms, repo, saved.id)
    updated = await repo.update(saved.replace(status="busy"))
    assert updated.version > saved.version
    with pytest.raises(msstore.ConflictError):
        await repo.update(saved.replace(status="again"))  # still the old version
    await repo.drain()
    row = await sql_row(ms, saved.id)
    assert row is not None and (row["status"], row["version"]) == ("busy", updated.version)


async def test_stale_update_raises_conflict_naming_the_current_version(
        repo: AgentRepository) -> None:
    v1 = await repo.save(Agent(uuid.uuid4(), "x"))
    v2 = await repo.update(v1.replace(status="busy"))
    with pytest.raises(msstore.ConflictError) as info:
        await repo.update(v1.replace(status="stale"))
    message = str(info.value)
    assert f"is at version {v2.version}, not at the expected version {v1.version}" in message
    assert "re-read it with find()" in message
    assert (await repo.find(v1.id)).status == "busy"
    assert repo.counters["conflicts"] == 1
    with pytest.raises(msstore.InvalidValueError, match="save"):
        await repo.update(Agent(uuid.uuid4(), "never-saved"))
    await repo.delete(v1.id)
    with pytest.raises(msstore.ConflictError, match=r"was deleted \(delete marker at version"):
        await repo.update(v2)


@pytest.mark.parametrize("tasks", [2, 8])
async def test_concurrent_updates_exactly_one_wins(ms: msstore.Connection,
                                                   repo: AgentRepository, tasks: int) -> None:
    base = await repo.save(Agent(uuid.uuid4(), "shared", metadata={"writer": None}))
    results = await asyncio.gather(
        *(repo.update(base.replace(status=f"w{i}", metadata={"writer": i}))
          for i in range(tasks)),
        return_exceptions=True)
    winners = [r for r in results if isinstance(r, Agent)]
    conflicts = [r for r in results if isinstance(r, msstore.ConflictError)]
    assert len(winners) == 1 and len(conflicts) == tasks - 1
    winner = winners[0]
    assert repo.counters["conflicts"] == tasks - 1 and repo.counters["updates"] == 1
    await repo.drain()
    revision, value = await kv_entry(ms, repo, base.id)
    assert revision == winner.version and value == winner.to_dict()
    assert await sql_row(ms, base.id) == {"agent_type": "shared", "status": winner.status,
                                          "metadata": winner.metadata,
                                          "version": winner.version}


async def test_sql_guard_never_lets_an_older_version_overwrite_a_newer_row(
        ms: msstore.Connection, repo: AgentRepository) -> None:
    """A row written by a newer revision (another process) is left alone by an older one."""
    agent_id, newer = uuid.uuid4(), 2**62
    await ms.pool.execute(
        "INSERT INTO agents.registry (agent_id, agent_type, status, metadata, version) "
        "VALUES ($1, 'x', 'newer', '{}', $2)", agent_id, newer)
    saved = await repo.save(Agent(agent_id, "x", "older"))
    assert saved.version < newer
    await repo.drain()
    assert repo.counters["sql_skipped"] == 1 and repo.counters["sql_upserted"] == 0
    row = await sql_row(ms, agent_id)
    assert row is not None and (row["status"], row["version"]) == ("newer", newer)
    await repo.delete(agent_id)  # a delete older than the row is refused too
    await repo.drain()
    assert await sql_row(ms, agent_id) is not None and repo.counters["sql_deleted"] == 0


# --------------------------------------------------------------------------- PostgreSQL down


async def test_persistent_sql_failure_is_reported_by_drain_and_nothing_is_lost(
        private_pg: Path, ms: msstore.Connection, unique: Callable[[str], str]) -> None:
    endpoints = await asyncio.to_thread(services.up, private_pg, which=("postgres",))
    async with msstore.connect(endpoints.database_url, ms.nats_url,
                               migration_url=endpoints.migration_url) as pms:
        repo = await AgentRepository.open(pms, bucket=unique("repo"), max_retries=2,
                                          base_backoff=0.05, max_backoff=0.1)
        before = await repo.save(Agent(uuid.uuid4(), "early"))
        await repo.drain()
        await asyncio.to_thread(services.down, private_pg, which=("postgres",))
        try:
            saved = [await repo.save(Agent(uuid.uuid4(), "during", metadata={"i": i}))
                     for i in range(5)]
            assert repo.pending == 5  # KV took them; SQL has not
            with pytest.raises(PendingWritesError) as info:
                await repo.drain()
            assert sorted(info.value.agent_ids) == sorted(a.id for a in saved)
            assert "5 agent write(s)" in str(info.value)
            assert isinstance(info.value, msstore.StoreUnavailableError)
            assert repo.pending == 5 and sorted(repo.failed) == sorted(a.id for a in saved)
            assert repo.counters["failures"] == 5 and repo.counters["retries"] >= 2
            with pytest.raises(PendingWritesError):
                await repo.close()  # close refuses to drop them too
            # reads still work from KV while PostgreSQL is down
            assert await repo.find(saved[0].id) == saved[0]
        finally:
            await asyncio.to_thread(services.up, private_pg, which=("postgres",))
        await repo.drain()  # a fresh retry budget, and PostgreSQL is back
        assert repo.pending == 0 and repo.failed == []
        for a in [before, *saved]:
            row = await sql_row(pms, a.id)
            assert row is not None
            assert (row["agent_type"], row["metadata"], row["version"]) == (
                a.type, a.metadata, a.version)
        await repo.close()
