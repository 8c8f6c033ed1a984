"""The data router (seed 1.1–1.2): each kind of data goes to the layer that suits it.

::

    store = await Store.open(ms)                        # ms = await msstore.connect()
    await store.store(DataType.SESSION_DATA, "user:7", {"cart": [1, 2]})
    await store.retrieve(DataType.SESSION_DATA, "user:7")      # -> {"cart": [1, 2]}
    await store.search(DataType.KNOWLEDGE_BASE, "how do I reset a password?")

          Store.store(data_type, key, value)
                     |
          DataRouter.select_storage(data_type)  -> StorageLayer
                     |
     +---------------+----------------+------------------+
     MEMORY_CACHE    DISTRIBUTED_KV    RELATIONAL_DB      VECTOR_STORE
     MemoryCache     KVStore           TaskStore          VectorStore
     (in process)    (a bucket per     MessageLogStore    (pgvector +
                     data type, TTL)   (JSONB tables)     JSONB value)

The seed's mapping is the default; pass ``routes=`` to send a data type elsewhere (for
example session data to the in-process cache in a single-process tool). Every layer honours
one contract, :class:`DataStorage`; see its docstring for what "missing" and "removed" mean.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import TYPE_CHECKING, Any, Protocol, TypeVar, runtime_checkable

from ._check import not_open
from .errors import InvalidOptionError, RoutingError, StoreUnavailableError

if TYPE_CHECKING:
    from .connection import Connection
    from .layers import Embedder


class StorageLayer(enum.StrEnum):
    """Where data can live (seed 1.1)."""

    MEMORY_CACHE = "memory_cache"  # in-process cache
    DISTRIBUTED_KV = "distributed_kv"  # JetStream KV (short-term)
    RELATIONAL_DB = "relational_db"  # PostgreSQL (long-term)
    VECTOR_STORE = "vector_store"  # pgvector, for semantic search


class DataType(enum.StrEnum):
    """The categories of agent data (seed 1.2)."""

    SESSION_DATA = "session_data"  # temporary user sessions
    AGENT_STATE = "agent_state"  # agent runtime state
    TASK_INFO = "task_info"  # task metadata
    MESSAGE_LOG = "message_log"  # communication history
    KNOWLEDGE_BASE = "knowledge_base"  # long-term facts


#: The seed's ``selectStorage`` switch, as data.
DEFAULT_ROUTES: Mapping[DataType, StorageLayer] = MappingProxyType({
    DataType.SESSION_DATA: StorageLayer.DISTRIBUTED_KV,  # fast, TTL-based
    DataType.AGENT_STATE: StorageLayer.DISTRIBUTED_KV,  # primary, flushed to SQL
    DataType.TASK_INFO: StorageLayer.RELATIONAL_DB,
    DataType.MESSAGE_LOG: StorageLayer.RELATIONAL_DB,
    DataType.KNOWLEDGE_BASE: StorageLayer.VECTOR_STORE,  # with SQL metadata
})

#: What each layer can hold. The relational layer has one table per data type it knows
#: (``tasks.queue``, ``messages.log``); the other layers hold any JSON value.
SUPPORTED: Mapping[StorageLayer, frozenset[DataType]] = MappingProxyType({
    StorageLayer.MEMORY_CACHE: frozenset(DataType),
    StorageLayer.DISTRIBUTED_KV: frozenset(DataType),
    StorageLayer.RELATIONAL_DB: frozenset({DataType.TASK_INFO, DataType.MESSAGE_LOG}),
    StorageLayer.VECTOR_STORE: frozenset({DataType.KNOWLEDGE_BASE}),
})

_E = TypeVar("_E", DataType, StorageLayer)


def _coerce(kind: type[_E], value: object) -> _E:
    """Accept the enum member, its value (``"task_info"``) or its name (``"TASK_INFO"``)."""
    if isinstance(value, kind):
        return value
    if isinstance(value, str):
        try:
            return kind(value)
        except ValueError:
            if value in kind.__members__:
                return kind.__members__[value]
    choices = ", ".join(m.name for m in kind)
    raise RoutingError(f"{value!r} is not a {kind.__name__}; use one of {choices}")


@dataclass(frozen=True)
class Hit:
    """One search result: the key to retrieve it by, its value, and a score if ranked.

    ``score`` is the cosine similarity (1 is identical) for the vector store, ``None`` for
    layers that filter rather than rank (prefix listings, JSONB containment).
    """

    key: str
    value: Any
    score: float | None = None


@runtime_checkable
class DataStorage(Protocol):
    """The seed's storage interface; every layer implements it the same way.

    * ``store(key, value)`` writes and returns the key to retrieve the value by (the message
      log appends and returns the new message id; every other layer returns ``key``).
    * ``retrieve(key)`` returns the value, or raises :class:`msstore.NotFoundError` when the
      key was never written, was removed, or outlived its TTL. Values come back as JSON
      would return them (a datetime comes back as an ISO-8601 string), except in the
      in-process cache, which hands back the very object it was given.
    * ``remove(key)`` is idempotent: removing a missing key is not an error.
    * ``search(query, *, limit=10)`` returns at most ``limit`` :class:`Hit` objects, best or
      first first; what ``query`` means depends on the layer (a key prefix, a JSONB
      containment filter, a channel, or free text ranked by meaning).

    Bad input raises a typed :class:`msstore.MsstoreError` before any I/O and changes nothing.
    """

    async def store(self, key: str, value: Any) -> str: ...

    async def retrieve(self, key: str) -> Any: ...

    async def remove(self, key: str) -> None: ...

    async def search(self, query: Any, *, limit: int = 10) -> list[Hit]: ...


class DataRouter:
    """Maps each :class:`DataType` to a :class:`StorageLayer`; the seed's mapping by default."""

    def __init__(self, routes: Mapping[Any, Any] | None = None) -> None:
        merged: dict[DataType, StorageLayer] = dict(DEFAULT_ROUTES)
        if routes is not None:
            if not isinstance(routes, Mapping):
                raise RoutingError(
                    f"routes must be a mapping of DataType to StorageLayer, got "
                    f"{type(routes).__name__}"
                )
            for data_type, layer in routes.items():
                merged[_coerce(DataType, data_type)] = _coerce(StorageLayer, layer)
        for data_type, layer in merged.items():
            if data_type not in SUPPORTED[layer]:
                able = ", ".join(sorted(
                    lay.name for lay, types in SUPPORTED.items() if data_type in types
                ))
                raise RoutingError(
                    f"{layer.name} cannot hold {data_type.name}; route it to one of {able}"
                )
        self._routes: Mapping[DataType, StorageLayer] = MappingProxyType(merged)

    @property
    def routes(self) -> Mapping[DataType, StorageLayer]:
        """The complete mapping in use, read-only (every DataType is in it)."""
        return self._routes

    def select_storage(self, data_type: DataType | str) -> StorageLayer:
        """The layer ``data_type`` goes to (seed: ``selectStorage``)."""
        return self._routes[_coerce(DataType, data_type)]

    def __repr__(self) -> str:
        pairs = ", ".join(f"{d.name}->{lay.name}" for d, lay in self._routes.items())
        return f"DataRouter({pairs})"


class _Unavailable:
    """Stands in for a layer the server cannot provide; every call says why."""

    def __init__(self, reason: str) -> None:
        self.reason = reason

    def _fail(self) -> StoreUnavailableError:
        return StoreUnavailableError(self.reason)

    async def store(self, key: str, value: Any) -> str:
        raise self._fail()

    async def retrieve(self, key: str) -> Any:
        raise self._fail()

    async def remove(self, key: str) -> None:
        raise self._fail()

    async def search(self, query: Any, *, limit: int = 10) -> list[Hit]:
        raise self._fail()


class Store:
    """The facade: ``store/retrieve/remove/search(data_type, …)`` routed by the router.

    Open it with ``store = await Store.open(ms)`` (or ``async with await Store.open(ms)``).
    A layer the server cannot provide (pgvector missing) does not stop the others: its data
    type raises :class:`msstore.StoreUnavailableError` with the reason, which is also in
    :attr:`unavailable`. The Store does not own ``ms``; close the connection yourself.
    """

    def __init__(self, router: DataRouter, storages: Mapping[DataType, DataStorage]) -> None:
        if not isinstance(router, DataRouter):
            raise RoutingError(f"router must be a DataRouter, got {type(router).__name__}")
        if not isinstance(storages, Mapping):
            raise RoutingError(f"storages must be a mapping of DataType to DataStorage, got "
                               f"{type(storages).__name__}")
        missing = [d.name for d in DataType if d not in storages]
        if missing:
            raise RoutingError(f"no storage given for {', '.join(missing)}")
        self._router = router
        self._storages = dict(storages)
        self._closed = False

    @classmethod
    async def open(cls, ms: Connection, *, routes: Mapping[Any, Any] | None = None,
                   bucket_prefix: str = "msstore",
                   ttls: Mapping[Any, float | None] | None = None,
                   memory_max_entries: int = 10_000,
                   collection: str = "knowledge_base",
                   embedder: Embedder | None = None) -> Store:
        """Build every layer the routes need: KV buckets are created if missing.

        ``ttls`` sets a TTL in seconds per data type (KV: the bucket's max age, created
        only with a new bucket; memory: per entry); the default is the seed's 30 minutes.
        Buckets are named ``<bucket_prefix>_<data_type>``, e.g. ``msstore_session_data``.
        """
        from .kv import DEFAULT_TTL_SECONDS, check_bucket_name
        from .layers import KVStore, MemoryCache, SQLStore, VectorStore
        from .layers.vectors import _LayerMissing

        router = DataRouter(routes)
        if not isinstance(bucket_prefix, str):
            raise InvalidOptionError(f"bucket_prefix must be a str, got {bucket_prefix!r}")
        check_bucket_name(f"{bucket_prefix}_x")
        if ttls is not None and not isinstance(ttls, Mapping):
            raise InvalidOptionError(f"ttls must be a mapping of DataType to seconds (or None),"
                                     f" got {type(ttls).__name__}")
        ttl_for: dict[DataType, float | None] = dict.fromkeys(DataType, DEFAULT_TTL_SECONDS)
        for data_type, ttl in (ttls or {}).items():
            ttl_for[_coerce(DataType, data_type)] = ttl
        storages: dict[DataType, DataStorage] = {}
        for data_type, layer in router.routes.items():
            if layer is StorageLayer.MEMORY_CACHE:
                storages[data_type] = MemoryCache(max_entries=memory_max_entries,
                                                  ttl=ttl_for[data_type])
            elif layer is StorageLayer.DISTRIBUTED_KV:
                storages[data_type] = await KVStore.open(
                    ms, f"{bucket_prefix}_{data_type.value}", ttl=ttl_for[data_type],
                    description=f"msstore {data_type.name}",
                )
            elif layer is StorageLayer.RELATIONAL_DB:
                storages[data_type] = SQLStore.for_data_type(ms, data_type)
            else:
                try:
                    storages[data_type] = await VectorStore.open(
                        ms, collection=collection, embedder=embedder)
                except _LayerMissing as e:  # pgvector missing; an outage is raised
                    storages[data_type] = _Unavailable(str(e))
        return cls(router, storages)

    @property
    def router(self) -> DataRouter:
        return self._router

    @property
    def unavailable(self) -> dict[DataType, str]:
        """Data types whose layer the server cannot provide, with the reason."""
        return {d: s.reason for d, s in self._storages.items() if isinstance(s, _Unavailable)}

    def storage(self, data_type: DataType | str) -> DataStorage:
        """The storage object ``data_type`` is routed to (for layer-specific calls)."""
        if self._closed:
            raise not_open("Store", "closed", "open a new one with `await Store.open(ms)`")
        return self._storages[_coerce(DataType, data_type)]

    async def store(self, data_type: DataType | str, key: str, value: Any) -> str:
        """Store ``value``; return the key to retrieve it by (a new id for MESSAGE_LOG)."""
        return await self.storage(data_type).store(key, value)

    async def retrieve(self, data_type: DataType | str, key: str) -> Any:
        """The value, or :class:`msstore.NotFoundError` if missing, removed or expired."""
        return await self.storage(data_type).retrieve(key)

    async def remove(self, data_type: DataType | str, key: str) -> None:
        """Remove ``key``; removing a missing key is not an error."""
        await self.storage(data_type).remove(key)

    async def search(self, data_type: DataType | str, query: Any, *,
                     limit: int = 10) -> list[Hit]:
        """Search the layer ``data_type`` is routed to; see :class:`DataStorage`."""
        return await self.storage(data_type).search(query, limit=limit)

    async def close(self) -> None:
        """Nothing to release (the connection is the caller's); later calls raise NotOpenError."""
        self._closed = True

    async def __aenter__(self) -> Store:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    def __repr__(self) -> str:
        return f"Store({self._router!r})"


__all__ = [
    "DEFAULT_ROUTES",
    "SUPPORTED",
    "DataRouter",
    "DataStorage",
    "DataType",
    "Hit",
    "RoutingError",
    "StorageLayer",
    "Store",
]
