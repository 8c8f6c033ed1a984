"""The Store facade end to end: every DataType through the layer the router picks."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Callable

import pytest

import msstore
from msstore import NotFoundError, NotSerializableError, StoreUnavailableError
from msstore.layers import KVStore, MemoryCache, MessageLogStore, TaskStore, VectorStore
from msstore.router import DataType, RoutingError, StorageLayer, Store

Unique = Callable[[str], str]


async def test_open_builds_the_seeds_layers(ms: msstore.Connection, unique: Unique) -> None:
    prefix = unique("fac")
    store = await Store.open(ms, bucket_prefix=prefix)
    assert isinstance(store.storage(DataType.SESSION_DATA), KVStore)
    assert isinstance(store.storage(DataType.AGENT_STATE), KVStore)
    assert isinstance(store.storage(DataType.TASK_INFO), TaskStore)
    assert isinstance(store.storage(DataType.MESSAGE_LOG), MessageLogStore)
    for data_type in (DataType.SESSION_DATA, DataType.AGENT_STATE):
        info = await ms.js.stream_info(f"KV_{prefix}_{data_type.value}")
        assert info.config.max_age == 30 * 60  # the seed's TTL.minutes(30)
        assert info.config.allow_direct is True
    if await ms.pgvector_available():
        assert isinstance(store.storage(DataType.KNOWLEDGE_BASE), VectorStore)
        assert store.unavailable == {}
    else:
        assert list(store.unavailable) == [DataType.KNOWLEDGE_BASE]
        with pytest.raises(StoreUnavailableError, match="pgvector extension is missing"):
            await store.search(DataType.KNOWLEDGE_BASE, "anything")


async def test_every_data_type_round_trips(ms: msstore.Connection, unique: Unique) -> None:
    store = await Store.open(ms, bucket_prefix=unique("fac"), collection=unique("kb"))
    agent = uuid.uuid4()
    task_id = str(uuid.uuid4())
    channel = unique("chat")
    cases = {
        DataType.SESSION_DATA: ("session:42", {"user": 42, "cart": [1, 2]}),
        DataType.AGENT_STATE: (f"agent:{agent}", {"step": 3, "plan": ["a", "b"]}),
        DataType.TASK_INFO: (task_id, {"task_type": "plan", "status": "pending"}),
        DataType.MESSAGE_LOG: (channel, {"role": "assistant", "text": "done"}),
        DataType.KNOWLEDGE_BASE: ("fact-1", {"text": "NATS KV keys cannot contain colons"}),
    }
    for data_type, (key, value) in cases.items():
        if data_type in store.unavailable:
            continue
        ref = await store.store(data_type, key, value)
        if data_type is DataType.MESSAGE_LOG:
            assert ref != key and uuid.UUID(ref)  # the log returns the new message id
        else:
            assert ref == key
        assert await store.retrieve(data_type, ref) == value
        hits = await store.search(data_type, {
            DataType.SESSION_DATA: "session:",
            DataType.AGENT_STATE: "agent:",
            DataType.TASK_INFO: {"task_type": "plan", "status": "pending"},
            DataType.MESSAGE_LOG: channel,
            DataType.KNOWLEDGE_BASE: "colons in KV keys",
        }[data_type])
        assert ref in [h.key for h in hits]
        await store.remove(data_type, ref)
        with pytest.raises(NotFoundError):
            await store.retrieve(data_type, ref)


async def test_overridden_route_uses_the_memory_cache(ms: msstore.Connection,
                                                      unique: Unique) -> None:
    prefix = unique("fac")
    store = await Store.open(ms, bucket_prefix=prefix,
                             routes={DataType.SESSION_DATA: StorageLayer.MEMORY_CACHE})
    assert store.router.select_storage(DataType.SESSION_DATA) is StorageLayer.MEMORY_CACHE
    cache = store.storage(DataType.SESSION_DATA)
    assert isinstance(cache, MemoryCache)
    await store.store("session_data", "s1", {"v": 1})
    assert cache.get("s1") == {"v": 1}
    names = [info.config.name for info in await ms.js.streams_info()]
    assert f"KV_{prefix}_session_data" not in names  # no bucket for an unrouted layer
    assert f"KV_{prefix}_agent_state" in names


async def test_ttls_are_per_data_type(ms: msstore.Connection, unique: Unique) -> None:
    store = await Store.open(ms, bucket_prefix=unique("fac"),
                             ttls={DataType.SESSION_DATA: 1})
    await store.store(DataType.SESSION_DATA, "short", 1)
    await store.store(DataType.AGENT_STATE, "long", 2)
    deadline = asyncio.get_running_loop().time() + 15
    while asyncio.get_running_loop().time() < deadline:
        try:
            await store.retrieve(DataType.SESSION_DATA, "short")
        except NotFoundError:
            break
        await asyncio.sleep(0.25)
    with pytest.raises(NotFoundError):
        await store.retrieve(DataType.SESSION_DATA, "short")
    assert await store.retrieve(DataType.AGENT_STATE, "long") == 2


async def test_bad_input_through_the_facade(ms: msstore.Connection, unique: Unique) -> None:
    async with await Store.open(ms, bucket_prefix=unique("fac")) as store:
        await store.store(DataType.AGENT_STATE, "k", {"v": 1})
        with pytest.raises(NotSerializableError):
            await store.store(DataType.AGENT_STATE, "k", {"v": object()})
        with pytest.raises(RoutingError, match="is not a DataType"):
            await store.store("agent", "k", 1)
        assert await store.retrieve(DataType.AGENT_STATE, "k") == {"v": 1}
    with pytest.raises(RoutingError, match="RELATIONAL_DB cannot hold SESSION_DATA"):
        await Store.open(ms, routes={DataType.SESSION_DATA: StorageLayer.RELATIONAL_DB})
