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

This module is the contract only (and imports no layer); the layers are in
:mod:`msstore.layers`, the :class:`~msstore.store.Store` facade that builds them in
:mod:`msstore.store` (still importable from here).
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import TYPE_CHECKING, Any, Protocol, TypeVar, runtime_checkable

from .errors import RoutingError

if TYPE_CHECKING:
    from .store import Store


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


class _Refusing:
    """A :class:`DataStorage` whose every call raises :meth:`_refusal` (a stand-in or a base)."""

    def _refusal(self) -> Exception:
        raise NotImplementedError

    async def store(self, key: str, value: Any) -> str:
        raise self._refusal()

    async def retrieve(self, key: str) -> Any:
        raise self._refusal()

    async def remove(self, key: str) -> None:
        raise self._refusal()

    async def search(self, query: Any, *, limit: int = 10) -> list[Hit]:
        raise self._refusal()


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


def __getattr__(name: str) -> object:
    """``msstore.router.Store``, imported on first use (the facade imports the layers)."""
    if name == "Store":
        from .store import Store

        return Store
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


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
