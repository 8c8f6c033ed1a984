"""DataRouter and the Store facade's routing, with fake storages (no services)."""

from __future__ import annotations

from typing import Any

import pytest

from msstore import NotFoundError, StoreUnavailableError
from msstore.layers import MemoryCache
from msstore.router import (
    DEFAULT_ROUTES,
    DataRouter,
    DataStorage,
    DataType,
    Hit,
    RoutingError,
    StorageLayer,
    Store,
)
from msstore.store import _Unavailable


class FakeStorage:
    """Records calls; a dict behind the DataStorage interface."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.data: dict[str, Any] = {}
        self.calls: list[tuple[str, Any]] = []

    async def store(self, key: str, value: Any) -> str:
        self.calls.append(("store", key))
        self.data[key] = value
        return key

    async def retrieve(self, key: str) -> Any:
        self.calls.append(("retrieve", key))
        try:
            return self.data[key]
        except KeyError:
            raise NotFoundError(key) from None

    async def remove(self, key: str) -> None:
        self.calls.append(("remove", key))
        self.data.pop(key, None)

    async def search(self, query: Any, *, limit: int = 10) -> list[Hit]:
        self.calls.append(("search", query))
        return [Hit(k, v) for k, v in sorted(self.data.items()) if k.startswith(query)][:limit]


def test_default_routes_are_the_seeds() -> None:
    router = DataRouter()
    assert router.select_storage(DataType.SESSION_DATA) is StorageLayer.DISTRIBUTED_KV
    assert router.select_storage(DataType.AGENT_STATE) is StorageLayer.DISTRIBUTED_KV
    assert router.select_storage(DataType.TASK_INFO) is StorageLayer.RELATIONAL_DB
    assert router.select_storage(DataType.MESSAGE_LOG) is StorageLayer.RELATIONAL_DB
    assert router.select_storage(DataType.KNOWLEDGE_BASE) is StorageLayer.VECTOR_STORE
    assert dict(router.routes) == dict(DEFAULT_ROUTES)
    assert set(router.routes) == set(DataType)


def test_enums_match_the_seed() -> None:
    assert [d.name for d in DataType] == [
        "SESSION_DATA", "AGENT_STATE", "TASK_INFO", "MESSAGE_LOG", "KNOWLEDGE_BASE"]
    assert [s.name for s in StorageLayer] == [
        "MEMORY_CACHE", "DISTRIBUTED_KV", "RELATIONAL_DB", "VECTOR_STORE"]


def test_override_changes_only_what_it_names() -> None:
    router = DataRouter({DataType.SESSION_DATA: StorageLayer.MEMORY_CACHE})
    assert router.select_storage(DataType.SESSION_DATA) is StorageLayer.MEMORY_CACHE
    others = {d: lay for d, lay in router.routes.items() if d is not DataType.SESSION_DATA}
    assert others == {d: lay for d, lay in DEFAULT_ROUTES.items()
                      if d is not DataType.SESSION_DATA}


def test_names_and_values_are_accepted() -> None:
    router = DataRouter({"agent_state": "MEMORY_CACHE"})
    assert router.select_storage("AGENT_STATE") is StorageLayer.MEMORY_CACHE
    assert router.select_storage("agent_state") is StorageLayer.MEMORY_CACHE


@pytest.mark.parametrize("bad", ["sessions", 3, None, StorageLayer.MEMORY_CACHE])
def test_unknown_data_type_is_a_typed_error(bad: Any) -> None:
    with pytest.raises(RoutingError, match="is not a DataType; use one of SESSION_DATA"):
        DataRouter().select_storage(bad)


def test_unknown_layer_is_a_typed_error() -> None:
    with pytest.raises(RoutingError, match="'disk' is not a StorageLayer"):
        DataRouter({DataType.TASK_INFO: "disk"})
    with pytest.raises(RoutingError, match="is not a DataType"):
        DataRouter({"tasks": StorageLayer.RELATIONAL_DB})


def test_routes_must_be_a_mapping() -> None:
    with pytest.raises(RoutingError, match="must be a mapping"):
        DataRouter([(DataType.TASK_INFO, StorageLayer.MEMORY_CACHE)])  # type: ignore[arg-type]


@pytest.mark.parametrize(("data_type", "layer"), [
    (DataType.SESSION_DATA, StorageLayer.RELATIONAL_DB),
    (DataType.TASK_INFO, StorageLayer.VECTOR_STORE),
])
def test_a_layer_that_cannot_hold_the_type_is_refused(data_type: DataType,
                                                      layer: StorageLayer) -> None:
    with pytest.raises(RoutingError, match=f"{layer.name} cannot hold {data_type.name}"):
        DataRouter({data_type: layer})


def test_routes_are_read_only() -> None:
    router = DataRouter()
    with pytest.raises(TypeError):
        router.routes[DataType.TASK_INFO] = StorageLayer.MEMORY_CACHE  # type: ignore[index]


def test_routing_error_is_a_value_error() -> None:
    assert issubclass(RoutingError, ValueError)


def _fakes() -> dict[DataType, FakeStorage]:
    return {d: FakeStorage(d.value) for d in DataType}


async def test_store_sends_each_type_to_its_own_storage() -> None:
    fakes = _fakes()
    store = Store(DataRouter(), fakes)
    for d in DataType:
        assert await store.store(d, "k", {"type": d.value}) == "k"
    for d in DataType:
        assert await store.retrieve(d, "k") == {"type": d.value}
        assert fakes[d].calls == [("store", "k"), ("retrieve", "k")]
    await store.remove(DataType.TASK_INFO, "k")
    with pytest.raises(NotFoundError):
        await store.retrieve("task_info", "k")
    assert await store.retrieve(DataType.MESSAGE_LOG, "k") == {"type": "message_log"}
    hits = await store.search(DataType.SESSION_DATA, "k", limit=1)
    assert hits == [Hit("k", {"type": "session_data"})]


async def test_store_refuses_missing_storages_and_unknown_types() -> None:
    fakes = _fakes()
    del fakes[DataType.KNOWLEDGE_BASE]
    with pytest.raises(RoutingError, match="no storage given for KNOWLEDGE_BASE"):
        Store(DataRouter(), fakes)
    store = Store(DataRouter(), _fakes())
    with pytest.raises(RoutingError):
        await store.store("knowledge", "k", 1)


async def test_unavailable_layer_says_why_on_every_call() -> None:
    fakes: dict[DataType, Any] = _fakes()
    fakes[DataType.KNOWLEDGE_BASE] = _Unavailable("pgvector extension is missing")
    async with Store(DataRouter(), fakes) as store:
        assert store.unavailable == {DataType.KNOWLEDGE_BASE: "pgvector extension is missing"}
        for call in (store.store(DataType.KNOWLEDGE_BASE, "k", "text"),
                     store.retrieve(DataType.KNOWLEDGE_BASE, "k"),
                     store.remove(DataType.KNOWLEDGE_BASE, "k"),
                     store.search(DataType.KNOWLEDGE_BASE, "text")):
            with pytest.raises(StoreUnavailableError, match="pgvector extension is missing"):
                await call
        assert await store.store(DataType.TASK_INFO, "k", 1) == "k"


def test_layers_satisfy_the_protocol() -> None:
    assert isinstance(MemoryCache(), DataStorage)
    assert isinstance(FakeStorage("x"), DataStorage)
    assert not isinstance(object(), DataStorage)
