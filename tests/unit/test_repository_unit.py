"""Agent validation, the Repository protocol and the SQL writer's policy: no servers needed."""

from __future__ import annotations

import datetime as dt
import uuid
from typing import Any

import asyncpg
import pytest

import msstore
from msstore._registry import RegistryWriter
from msstore.codec import dumps, loads
from msstore.errors import InvalidOptionError, NotOpenError
from msstore.repository import (
    COUNTERS,
    Agent,
    AgentRepository,
    PendingWritesError,
    Repository,
)

AID = uuid.UUID("6f1c0000-0000-4000-8000-000000000001")


def test_agent_accepts_uuid_or_uuid_string_and_normalises_metadata() -> None:
    a = Agent(str(AID), "researcher", "busy", {"n": 1, 2: (3, 4)})  # type: ignore[arg-type]
    assert a.id == AID and isinstance(a.id, uuid.UUID)
    assert a.metadata == {"n": 1, "2": [3, 4]}  # what SQL and KV would give back
    assert a.version == 0 and a.status == "busy"
    assert Agent(AID, "x").status == "idle" and Agent(AID, "x").metadata == {}


def test_agent_metadata_is_copied_not_shared() -> None:
    meta: dict[str, Any] = {"tags": ["a"]}
    a = Agent(AID, "x", metadata=meta)
    meta["tags"].append("b")
    assert a.metadata == {"tags": ["a"]}


@pytest.mark.parametrize("bad", ["not-a-uuid", "", 42, None, b"\x00" * 16])
def test_agent_rejects_ids_that_are_not_uuids(bad: object) -> None:
    with pytest.raises(msstore.InvalidAgentIdError, match="UUID"):
        Agent(bad, "x")  # type: ignore[arg-type]


@pytest.mark.parametrize(("field", "value", "match"), [
    ("type", "", "must not be empty"),
    ("type", "   ", "must not be empty"),
    ("type", "t" * 101, "101 characters, above the limit of 100"),
    ("type", 7, "must be a str"),
    ("status", "", "must not be empty"),
    ("status", "s" * 21, "21 characters, above the limit of 20"),
    ("status", None, "must be a str"),
    ("metadata", [1, 2], "must be a dict"),
    ("metadata", None, "must be a dict"),
    ("version", -1, "version must be an int >= 0"),
    ("version", True, "version must be an int >= 0"),
    ("version", "3", "version must be an int >= 0"),
])
def test_agent_rejects_bad_fields_with_a_message_that_says_what_to_fix(
        field: str, value: object, match: str) -> None:
    kwargs: dict[str, Any] = {"id": AID, "type": "x", "status": "idle", "metadata": {},
                              "version": 0}
    kwargs[field] = value
    with pytest.raises(msstore.InvalidValueError, match=match) as info:
        Agent(**kwargs)
    assert isinstance(info.value, msstore.MsstoreError) and isinstance(info.value, ValueError)


def test_agent_limits_are_inclusive() -> None:
    a = Agent(AID, "t" * 100, "s" * 20)
    assert len(a.type) == 100 and len(a.status) == 20


def test_agent_metadata_that_json_cannot_encode_raises_not_serializable() -> None:
    with pytest.raises(msstore.NotSerializableError, match=r"Agent\.metadata cannot be stored"):
        Agent(AID, "x", metadata={"f": object()})
    with pytest.raises(msstore.ValueTooLargeError):
        Agent(AID, "x", metadata={"blob": "x" * (2 * 1024 * 1024)})


def test_agent_is_frozen_and_replace_revalidates() -> None:
    a = Agent(AID, "x", version=5)
    with pytest.raises(AttributeError):
        a.status = "busy"  # type: ignore[misc]
    b = a.replace(status="busy")
    assert (b.status, b.version, b.id) == ("busy", 5, AID)
    with pytest.raises(msstore.InvalidValueError):
        a.replace(status="")
    assert hash(a) == hash(Agent(AID, "x", metadata={"ignored": "by hash"}, version=5))


def test_agent_dict_round_trip_is_exact() -> None:
    a = Agent(AID, "planner", "busy", {"when": dt.date(2024, 1, 2), "n": [1.5, None]})
    d = loads(dumps(a.to_dict()))
    assert d == {"id": str(AID), "type": "planner", "status": "busy",
                 "metadata": {"when": "2024-01-02", "n": [1.5, None]}}
    assert Agent.from_dict(d, version=9) == a.replace(version=9)
    with pytest.raises(msstore.InvalidValueError):
        Agent.from_dict(["not", "a", "dict"], version=1)  # type: ignore[arg-type]


def test_kv_key_is_a_valid_nats_key_unlike_the_seeds() -> None:
    key = AgentRepository.kv_key(AID)
    assert key == f"agent.{AID}"
    assert msstore.keys.is_valid_nats_key(key)
    assert not msstore.keys.is_valid_nats_key(f"agent:{AID}")
    with pytest.raises(msstore.InvalidAgentIdError):
        AgentRepository.kv_key("agent:42")


class FakeRepository:
    """A dict-backed repository: the protocol is structural, fakes need no base class."""

    def __init__(self) -> None:
        self.rows: dict[uuid.UUID, Agent] = {}

    async def save(self, entity: Agent) -> Agent:
        saved = entity.replace(version=entity.version + 1)
        self.rows[saved.id] = saved
        return saved

    async def find(self, id: uuid.UUID | str) -> Agent:
        try:
            return self.rows[uuid.UUID(str(id))]
        except KeyError as e:
            raise msstore.NotFoundError(str(id)) from e

    async def update(self, entity: Agent) -> Agent:
        if self.rows[entity.id].version != entity.version:
            raise msstore.ConflictError("stale")
        return await self.save(entity)

    async def delete(self, id: uuid.UUID | str) -> None:
        self.rows.pop(uuid.UUID(str(id)), None)


async def test_a_fake_satisfies_the_repository_protocol() -> None:
    repo: Repository[Agent] = FakeRepository()
    assert isinstance(repo, Repository)
    a = await repo.save(Agent(AID, "x"))
    assert (await repo.find(AID)).version == 1
    await repo.update(a)
    with pytest.raises(msstore.ConflictError):
        await repo.update(a)
    await repo.delete(AID)
    with pytest.raises(msstore.NotFoundError):
        await repo.find(AID)


def test_repository_options_are_checked_before_any_io() -> None:
    ms: Any = object()  # never touched: validation happens first
    for bad in ({"batch_size": 0}, {"max_retries": -1}, {"base_backoff": 0},
                {"ttl": -5}, {"max_pending": True}):
        with pytest.raises(InvalidOptionError):
            AgentRepository(ms, **bad)
    with pytest.raises(msstore.InvalidKeyError):
        AgentRepository(ms, bucket="agents.v1")


async def test_methods_refuse_to_run_before_start() -> None:
    repo = AgentRepository(object())  # type: ignore[arg-type]
    with pytest.raises(NotOpenError, match="async with AgentRepository"):
        await repo.save(Agent(AID, "x"))
    assert repo.pending == 0 and repo.failed == []


def test_pending_writes_error_is_a_store_unavailable_error_with_the_ids() -> None:
    err = PendingWritesError("2 failed", [AID], OSError("refused"))
    assert isinstance(err, msstore.StoreUnavailableError)
    assert isinstance(err, ConnectionError) and err.agent_ids == [AID]


# --------------------------------------------------------------------------- the SQL writer


class FakePool:
    """``fetchrow`` that raises the queued errors first, then commits every row."""

    def __init__(self, *errors: BaseException) -> None:
        self.errors = list(errors)
        self.batches: list[list[uuid.UUID]] = []

    async def fetchrow(self, sql: str, ids: list[uuid.UUID], types: list[str | None],
                       *rest: Any, **options: Any) -> dict[str, int]:
        if self.errors:
            raise self.errors.pop(0)
        self.batches.append(ids)
        upserted = sum(t is not None for t in types)
        return {"upserted": upserted, "deleted": len(ids) - upserted}


def writer(pool: FakePool, **options: Any) -> RegistryWriter:
    ms: Any = type("FakeConnection", (), {"pool": pool})()
    settings: dict[str, Any] = {"batch_size": 2, "max_retries": 2, "base_backoff": 0.001,
                                "max_backoff": 0.002, "sql_timeout": 1.0,
                                "max_lag_samples": 100, **options}
    return RegistryWriter(ms, dict.fromkeys(COUNTERS, 0), **settings)


async def test_writer_batches_coalesces_and_commits_on_drain() -> None:
    pool = FakePool()
    w = writer(pool)
    ids = [uuid.uuid4() for _ in range(3)]
    w.start()
    try:
        for rev, i in enumerate([*ids, ids[0]], start=1):
            w.enqueue(i, rev, Agent(i, "x", metadata={"rev": rev}))
        w.enqueue(ids[2], 9, None)  # a delete supersedes the save
        assert w.pending == 3 and w.counters["coalesced"] == 2
        await w.drain()
        written = [i for batch in pool.batches for i in batch]
        assert w.pending == 0 and sorted(written) == sorted(ids)
        assert all(len(b) <= 2 for b in pool.batches)
        assert w.counters["sql_writes"] == 3 and w.counters["sql_deleted"] == 1
        assert len(w.lag_samples) == 3
    finally:
        await w.stop()


async def test_writer_retries_what_pg_retryable_accepts_then_parks_it() -> None:
    pool = FakePool(*(OSError("refused") for _ in range(3)))  # 1 + max_retries attempts
    w = writer(pool)
    w.start()
    try:
        w.enqueue(AID, 1, Agent(AID, "x"))
        with pytest.raises(PendingWritesError, match="after 3 attempts") as info:
            await w.drain()
        assert info.value.agent_ids == [AID] and w.failed == [AID] and w.pending == 1
        assert (w.counters["retries"], w.counters["failures"]) == (2, 1)
        assert isinstance(w.last_error, msstore.StoreUnavailableError)
        await w.drain()  # a fresh budget, and the pool commits now
        assert w.pending == 0 and pool.batches == [[AID]]
    finally:
        await w.stop()


async def test_writer_parks_a_refused_batch_at_once_and_drain_retries_it() -> None:
    pool = FakePool(asyncpg.DataError("bad value"))
    w = writer(pool)
    w.start()
    try:
        w.enqueue(AID, 1, Agent(AID, "x"))
        with pytest.raises(PendingWritesError):
            await w.drain()
        assert w.counters["retries"] == 0 and w.counters["sql_statements"] == 1
        assert isinstance(w.last_error, msstore.DataRejectedError)
        other = uuid.uuid4()
        w.enqueue(other, 2, Agent(other, "y"))
        await w.drain()
        assert w.pending == 0 and w.failed == []
    finally:
        await w.stop()
