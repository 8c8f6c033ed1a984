"""The facade: ``store/retrieve/remove/search(data_type, …)``, routed by :mod:`msstore.router`.

::

    store = await Store.open(ms)                        # ms = await msstore.connect()
    await store.store(DataType.SESSION_DATA, "user:7", {"cart": [1, 2]})
    await store.retrieve(DataType.SESSION_DATA, "user:7")      # -> {"cart": [1, 2]}

:meth:`Store.open` builds the layer (:mod:`msstore.layers`) each data type is routed to.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from ._check import not_open
from .errors import InvalidOptionError, RoutingError, StoreUnavailableError
from .kv import DEFAULT_TTL_SECONDS, check_bucket_name
from .layers import Embedder, KVStore, MemoryCache, SQLStore, VectorStore
from .layers.vectors import _LayerMissing
from .router import DataRouter, DataStorage, DataType, Hit, StorageLayer, _coerce, _Refusing

if TYPE_CHECKING:
    from .connection import Connection


class _Unavailable(_Refusing):
    """Stands in for a layer the server cannot provide; every call says why."""

    def __init__(self, reason: str) -> None:
        self.reason = reason

    def _refusal(self) -> StoreUnavailableError:
        return StoreUnavailableError(self.reason)


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


__all__ = ["Store"]
