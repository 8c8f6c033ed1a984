"""Each storage layer against the real servers: round trips, TTLs, typed errors, ranking."""

from __future__ import annotations

import asyncio
import math
import uuid
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

import msstore
from msstore import (
    InvalidAgentIdError,
    InvalidKeyError,
    NotFoundError,
    NotSerializableError,
    StoreUnavailableError,
    ValueTooLargeError,
)
from msstore.keys import encode_key, is_valid_nats_key
from msstore.layers import (
    HashingEmbedder,
    InvalidValueError,
    KVStore,
    MessageLogStore,
    TaskStore,
    VectorStore,
)
from msstore.router import DataStorage, Hit

TOO_LARGE = "x" * (1024 * 1024)
Unique = Callable[[str], str]


async def eventually_missing(layer: DataStorage, key: str, within: float = 15.0) -> bool:
    """Poll until ``key`` reads as missing; False if it is still there after ``within`` s."""
    deadline = asyncio.get_running_loop().time() + within
    while asyncio.get_running_loop().time() < deadline:
        try:
            await layer.retrieve(key)
        except NotFoundError:
            return True
        await asyncio.sleep(0.25)
    return False


# --------------------------------------------------------------------------- KV


async def test_kv_round_trip_with_seed_keys(ms: msstore.Connection, unique: Unique) -> None:
    kv = await KVStore.open(ms, unique("kv"))
    agent = f"agent:{uuid.uuid4()}"
    value = {"plan": ["a", "b"], "step": 3, "nested": {"ok": True}, "none": None}
    assert await kv.store(agent, value) == agent
    await kv.store("ünïcode key/with.dots", [1, 2.5, "x"])
    assert await kv.retrieve(agent) == value
    assert await kv.retrieve("ünïcode key/with.dots") == [1, 2.5, "x"]
    assert await kv.keys() == sorted([agent, "ünïcode key/with.dots"])
    assert is_valid_nats_key(encode_key(agent))


async def test_kv_bucket_has_direct_get_and_its_ttl(ms: msstore.Connection,
                                                    unique: Unique) -> None:
    kv = await KVStore.open(ms, unique("kv"), ttl=90)
    info = await ms.js.stream_info(f"KV_{kv.bucket}")
    assert info.config.allow_direct is True
    assert info.config.max_age == 90
    assert info.config.max_msgs_per_subject == 1
    assert kv.ttl == 90
    reopened = await KVStore.open(ms, kv.bucket, ttl=5)  # an existing bucket keeps its TTL
    assert reopened.ttl == 90


async def test_kv_put_returns_increasing_revisions(ms: msstore.Connection,
                                                   unique: Unique) -> None:
    kv = await KVStore.open(ms, unique("kv"))
    revisions = [await kv.put("k", i) for i in range(3)]
    assert revisions == sorted(revisions) and len(set(revisions)) == 3
    assert await kv.retrieve("k") == 2


async def test_kv_missing_removed_and_idempotent_remove(ms: msstore.Connection,
                                                        unique: Unique) -> None:
    kv = await KVStore.open(ms, unique("kv"))
    with pytest.raises(NotFoundError, match="never written, removed, or expired"):
        await kv.retrieve("nope")
    await kv.store("k", 1)
    await kv.remove("k")
    await kv.remove("k")
    await kv.remove("never-there")
    with pytest.raises(NotFoundError):
        await kv.retrieve("k")
    assert await kv.keys() == []


async def test_kv_entries_expire_with_the_bucket_ttl(ms: msstore.Connection,
                                                     unique: Unique) -> None:
    kv = await KVStore.open(ms, unique("kv"), ttl=1)
    await kv.store("session:1", {"user": 1})
    assert await kv.retrieve("session:1") == {"user": 1}
    assert await eventually_missing(kv, "session:1")
    assert await kv.keys() == []


async def test_kv_bad_input_is_typed_and_keeps_the_old_value(ms: msstore.Connection,
                                                             unique: Unique) -> None:
    kv = await KVStore.open(ms, unique("kv"))
    await kv.store("k", {"v": 1})
    with pytest.raises(NotSerializableError, match="not JSON-serialisable"):
        await kv.store("k", {"v": object()})
    with pytest.raises(ValueTooLargeError, match="above the limit"):
        await kv.store("k", TOO_LARGE)
    with pytest.raises(InvalidKeyError):
        await kv.store("", 1)
    with pytest.raises(InvalidKeyError):
        await kv.retrieve(None)  # type: ignore[arg-type]
    assert await kv.retrieve("k") == {"v": 1}
    assert await kv.keys() == ["k"]


async def test_kv_search_is_a_prefix_listing(ms: msstore.Connection, unique: Unique) -> None:
    kv = await KVStore.open(ms, unique("kv"))
    for key in ("user:3", "user:1", "user:2", "other"):
        await kv.store(key, key.upper())
    await kv.remove("user:2")
    assert await kv.search("user:") == [Hit("user:1", "USER:1"), Hit("user:3", "USER:3")]
    assert await kv.search("user:", limit=1) == [Hit("user:1", "USER:1")]
    assert await kv.search("zzz") == []
    with pytest.raises(InvalidValueError):
        await kv.search({"a": 1})


# --------------------------------------------------------------------------- tasks


async def test_task_round_trip_and_columns(ms: msstore.Connection) -> None:
    tasks = TaskStore(ms.pool)
    task_id = str(uuid.uuid4())
    value = {"task_type": "summarise", "status": "running", "metadata": {"prio": 2},
             "input": {"doc": 7}}
    assert await tasks.store(task_id, value) == task_id
    assert await tasks.retrieve(task_id) == value
    row = await ms.pool.fetchrow(
        "SELECT task_type, status, metadata, payload, expires_at FROM tasks.queue "
        "WHERE task_id = $1", uuid.UUID(task_id))
    assert row is not None
    assert (row["task_type"], row["status"], row["metadata"]) == ("summarise", "running",
                                                                  {"prio": 2})
    assert row["payload"] == value and row["expires_at"] is None


async def test_task_defaults_and_non_mapping_values(ms: msstore.Connection) -> None:
    tasks = TaskStore(ms.pool)
    task_id = uuid.uuid4()
    await tasks.store(str(task_id), ["just", "a", "list"])
    assert await tasks.retrieve(str(task_id).upper()) == ["just", "a", "list"]
    row = await ms.pool.fetchrow("SELECT status, metadata FROM tasks.queue WHERE task_id = $1",
                                 task_id)
    assert row is not None and (row["status"], row["metadata"]) == ("pending", {})


async def test_expired_tasks_read_as_missing(ms: msstore.Connection) -> None:
    tasks = TaskStore(ms.pool)
    past, live, later = (str(uuid.uuid4()) for _ in range(3))
    status = f"exp-{uuid.uuid4().hex[:8]}"
    await tasks.store(past, {"status": status,
                             "expires_at": datetime.now(UTC) - timedelta(seconds=1)})
    await tasks.store(live, {"status": status,
                             "expires_at": (datetime.now(UTC) + timedelta(hours=1)).isoformat()})
    await tasks.store(later, {"status": status}, ttl=3600)
    with pytest.raises(NotFoundError, match="past its expires_at"):
        await tasks.retrieve(past)
    assert [h.key for h in await tasks.search(status)] == [live, later]  # oldest first
    ttl_expiry = await ms.pool.fetchval(
        "SELECT expires_at - now() FROM tasks.queue WHERE task_id = $1", uuid.UUID(later))
    assert timedelta(minutes=59) < ttl_expiry <= timedelta(hours=1)
    assert await tasks.purge_expired() >= 1
    assert await ms.pool.fetchval("SELECT count(*) FROM tasks.queue WHERE task_id = $1",
                                  uuid.UUID(past)) == 0


async def test_task_ttl_expires_on_read(ms: msstore.Connection) -> None:
    tasks = TaskStore(ms.pool)
    task_id = str(uuid.uuid4())
    await tasks.store(task_id, {"n": 1}, ttl=0.5)
    assert await eventually_missing(tasks, task_id, within=10)


@pytest.mark.parametrize("bad_id", ["", "task-1", "1234", None, 42])
async def test_bad_task_id_is_a_typed_error(ms: msstore.Connection, bad_id: Any) -> None:
    tasks = TaskStore(ms.pool)
    with pytest.raises(InvalidKeyError, match="a task id must be a UUID"):
        await tasks.store(bad_id, {"n": 1})
    with pytest.raises(InvalidKeyError):
        await tasks.retrieve(bad_id)


async def test_task_bad_values_are_typed_and_keep_the_old_value(ms: msstore.Connection) -> None:
    tasks = TaskStore(ms.pool)
    task_id = str(uuid.uuid4())
    await tasks.store(task_id, {"status": "pending", "n": 1})
    bad: list[tuple[Any, type[Exception], dict[str, Any]]] = [
        ({"n": object()}, NotSerializableError, {}),
        ({"blob": TOO_LARGE}, ValueTooLargeError, {}),
        ({"status": 5}, InvalidValueError, {}),
        ({"status": "x" * 21}, InvalidValueError, {}),
        ({"metadata": [1]}, InvalidValueError, {}),
        ({"expires_at": "tomorrow"}, InvalidValueError, {}),
        ({"expires_at": datetime(2030, 1, 1)}, InvalidValueError, {}),  # naive
        ({"expires_at": datetime.now(UTC)}, InvalidValueError, {"ttl": 5}),
        ({"n": 2}, InvalidValueError, {"ttl": -1}),
    ]
    for value, error, kwargs in bad:
        with pytest.raises(error):
            await tasks.store(task_id, value, **kwargs)
    assert await tasks.retrieve(task_id) == {"status": "pending", "n": 1}


async def test_task_store_many_is_one_upsert(ms: msstore.Connection) -> None:
    tasks = TaskStore(ms.pool)
    kind = f"batch-{uuid.uuid4().hex[:8]}"
    ids = [str(uuid.uuid4()) for _ in range(50)]
    items = [(i, {"task_type": kind, "n": n}) for n, i in enumerate(ids)]
    items.append((ids[0], {"task_type": kind, "n": "last"}))  # repeated id: last one wins
    assert await tasks.store_many(items) == ids
    assert await ms.pool.fetchval("SELECT count(*) FROM tasks.queue WHERE task_type = $1",
                                  kind) == 50
    assert await tasks.retrieve(ids[0]) == {"task_type": kind, "n": "last"}
    hits = await tasks.search({"task_type": kind, "n": 7})
    assert [h.key for h in hits] == [ids[7]]
    assert len(await tasks.search({"task_type": kind}, limit=20)) == 20
    assert await tasks.store_many([]) == []


async def test_task_remove(ms: msstore.Connection) -> None:
    tasks = TaskStore(ms.pool)
    task_id = str(uuid.uuid4())
    await tasks.store(task_id, 1)
    await tasks.remove(task_id)
    await tasks.remove(task_id)
    with pytest.raises(NotFoundError):
        await tasks.retrieve(task_id)


# --------------------------------------------------------------------------- messages


async def test_message_log_appends_and_reads_back(ms: msstore.Connection,
                                                  unique: Unique) -> None:
    log = MessageLogStore(ms.pool)
    channel = unique("chat")
    agent = uuid.uuid4()
    first = await log.store(channel, {"role": "user", "text": "hi"}, agent_id=agent)
    second = await log.store(channel, {"role": "user", "text": "hi"})  # same payload, new row
    assert first != second
    assert await log.retrieve(first) == {"role": "user", "text": "hi"}
    row = await ms.pool.fetchrow("SELECT agent_id, channel FROM messages.log "
                                 "WHERE message_id = $1", uuid.UUID(first))
    assert row is not None and (row["agent_id"], row["channel"]) == (agent, channel)


async def test_message_search_returns_latest_in_order(ms: msstore.Connection,
                                                      unique: Unique) -> None:
    log = MessageLogStore(ms.pool)
    channel = unique("chat")
    ids = await log.append_many(channel, [{"n": n, "tag": channel} for n in range(6)])
    ids.append(await log.store(channel, {"n": 6, "tag": channel}))
    hits = await log.search(channel, limit=3)
    assert [h.value["n"] for h in hits] == [4, 5, 6]
    assert [h.key for h in hits] == ids[4:]
    seqs = await ms.pool.fetch("SELECT message_id FROM messages.log WHERE channel = $1 "
                               "ORDER BY seq", channel)
    assert [str(r["message_id"]) for r in seqs] == ids
    by_payload = await log.search({"tag": channel, "n": 2})
    assert by_payload == [Hit(ids[2], {"n": 2, "tag": channel})]
    assert await log.search(unique("empty")) == []


async def test_message_remove_and_bad_input(ms: msstore.Connection, unique: Unique) -> None:
    log = MessageLogStore(ms.pool)
    channel = unique("chat")
    kept = await log.store(channel, {"n": 1})
    gone = await log.store(channel, {"n": 2})
    await log.remove(gone)
    with pytest.raises(NotFoundError):
        await log.retrieve(gone)
    with pytest.raises(InvalidKeyError, match="a message id must be a UUID"):
        await log.retrieve("not-an-id")
    with pytest.raises(InvalidKeyError, match="channel"):
        await log.store("", {"n": 3})
    with pytest.raises(InvalidAgentIdError):
        await log.store(channel, {"n": 3}, agent_id="agent-7")
    with pytest.raises(NotSerializableError):
        await log.store(channel, {"n": {1, 2}})
    with pytest.raises(ValueTooLargeError):
        await log.append_many(channel, [{"n": 4}, TOO_LARGE])
    assert [h.value for h in await log.search(channel)] == [{"n": 1}]
    assert await log.retrieve(kept) == {"n": 1}


# --------------------------------------------------------------------------- vectors


def test_hashing_embedder_is_deterministic_and_normalised() -> None:
    emb = HashingEmbedder()
    a, b, c = emb.embed(["Reset your password", "reset YOUR password!", "billing cycle"])
    assert emb.dim == 256 and len(a) == 256
    assert a == b  # case and punctuation do not matter
    assert math.isclose(sum(x * x for x in a), 1.0)
    assert HashingEmbedder().embed(["Reset your password"])[0] == a  # no per-process salt
    assert sum(x * y for x, y in zip(a, c, strict=True)) < 0.5
    assert emb.embed(["the of and"])[0] == [0.0] * 256  # stop words only: no direction


@pytest.fixture
async def vectors(open_vectors: Callable[..., Awaitable[VectorStore]]) -> VectorStore:
    """A VectorStore on a collection of its own; skipped where pgvector is missing."""
    return await open_vectors()


async def test_vector_store_says_when_pgvector_is_missing(ms: msstore.Connection) -> None:
    if await ms.pgvector_available():
        store = await VectorStore.open(ms)
        assert store.embedder.dim == 256
        return
    with pytest.raises(StoreUnavailableError,
                       match=r"pgvector extension is missing.*embedded server.*docker"):
        await VectorStore.open(ms)


DOCS = {
    "password": {"text": "To reset a forgotten password open account settings and choose "
                         "reset password.", "source": "faq", "lang": "en"},
    "billing": {"text": "The billing cycle starts on the first day of each month.",
                "source": "faq", "lang": "en"},
    "kv": {"text": "Agents keep runtime state in NATS JetStream key-value buckets.",
           "source": "docs", "lang": "en"},
    "plain": "PostgreSQL JSONB columns hold long-term agent facts.",
}


async def test_vector_search_ranks_the_relevant_doc_first(vectors: VectorStore) -> None:
    assert await vectors.store_many(DOCS) == list(DOCS)
    hits = await vectors.search("how do I reset my password?")
    assert hits[0].key == "password"
    assert hits[0].value == DOCS["password"]
    assert len(hits) == 4
    scores = [h.score for h in hits]
    assert all(s is not None for s in scores)
    assert scores == sorted(scores, reverse=True)  # type: ignore[type-var]
    assert hits[0].score is not None and hits[1].score is not None
    assert hits[0].score > hits[1].score
    top = await vectors.search("Agents keep runtime state in NATS JetStream key-value buckets.",
                               limit=1)
    assert [h.key for h in top] == ["kv"] and top[0].score == pytest.approx(1.0, abs=1e-5)
    two = await vectors.search("JetStream buckets", limit=2)
    assert len(two) == 2 and two[0].key == "kv"


async def test_vector_search_filters_on_jsonb_metadata(vectors: VectorStore) -> None:
    await vectors.store_many(DOCS)
    hits = await vectors.search("reset password", where={"source": "docs"})
    assert [h.key for h in hits] == ["kv"]
    assert await vectors.search("!!! ???") == []
    assert await vectors.search("the of and") == []


async def test_vector_round_trip_overwrite_remove(vectors: VectorStore) -> None:
    await vectors.store("doc", {"text": "old text about cats", "v": 1})
    await vectors.store("doc", {"text": "new text about dogs", "v": 2})
    assert await vectors.retrieve("doc") == {"text": "new text about dogs", "v": 2}
    assert [h.key for h in await vectors.search("dogs")] == ["doc"]
    await vectors.remove("doc")
    await vectors.remove("doc")
    with pytest.raises(NotFoundError):
        await vectors.retrieve("doc")
    assert await vectors.search("dogs") == []


async def test_vector_bad_input_is_typed_and_keeps_the_old_value(vectors: VectorStore) -> None:
    await vectors.store("doc", "a document about gardens")
    for value, error in [({"title": "no text"}, InvalidValueError), (42, InvalidValueError),
                         ("  ...  ", InvalidValueError),
                         ({"text": "ok words", "x": object()}, NotSerializableError),
                         ({"text": TOO_LARGE}, ValueTooLargeError)]:
        with pytest.raises(error):
            await vectors.store("doc", value)
    with pytest.raises(InvalidKeyError):
        await vectors.store("", "words")
    with pytest.raises(InvalidValueError):
        await vectors.search({"text": "gardens"})
    assert await vectors.retrieve("doc") == "a document about gardens"


class TinyEmbedder:
    """A fake model: vector = counts of three marker words (tests only)."""

    dim = 3
    words = ("red", "green", "blue")

    def embed(self, texts: list[str]) -> list[list[float]]:
        return [[float(t.split().count(w)) + 0.01 for w in self.words] for t in texts]


async def test_a_custom_embedder_plugs_in(ms: msstore.Connection, vectors: VectorStore,
                                          unique: Unique) -> None:
    store = VectorStore(ms.pool, collection=unique("kb"), embedder=TinyEmbedder(),
                        offload_embedding=True)
    await store.store_many({"r": "red red", "g": "green", "rg": "red green"})
    assert [h.key for h in await store.search("red")] == ["r", "rg", "g"]
    # one collection, two dimensions: a typed error, not a server traceback
    # one collection, two embedders: each compares only with its own rows (no server error)
    mixed = VectorStore(ms.pool, collection=store.collection)
    await mixed.store("h", "hashed words red")
    assert [h.key for h in await store.search("red")] == ["r", "rg", "g"]
    assert [h.key for h in await mixed.search("red")] == ["h"]
    assert await store.embedders() == {"hashing-256": 1,
                                       f"{TinyEmbedder.__module__}.TinyEmbedder/3": 3}
