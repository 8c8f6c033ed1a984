"""BaseStore's convenience methods, with msstore's namespace check first.

LangGraph checks namespace labels in each of them before it builds its op, raising its own
``InvalidNamespaceError`` (a plain ``ValueError``). Checking first makes every refusal the
same typed :class:`~msstore.errors.InvalidNamespaceError` (which is LangGraph's class too)
and adds what LangGraph lets through (lone surrogates, a namespace that is not a tuple).
``abatch`` checks the ops again, for callers that build ops themselves.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Literal

from langgraph.store.base import (
    NOT_PROVIDED,
    BaseStore,
    Item,
    NamespacePath,
    NotProvided,
    SearchItem,
)

from ._store_sql import check_namespace


def _patterns(prefix: NamespacePath | None, suffix: NamespacePath | None) -> None:
    check_namespace(prefix or (), item=False, what="prefix")
    check_namespace(suffix or (), item=False, what="suffix")


class CheckedStore(BaseStore):
    """``get``/``search``/``put``/``delete``/``list_namespaces`` and their async twins."""

    def get(self, namespace: tuple[str, ...], key: str, *,
            refresh_ttl: bool | None = None) -> Item | None:
        check_namespace(namespace)
        return super().get(namespace, key, refresh_ttl=refresh_ttl)

    async def aget(self, namespace: tuple[str, ...], key: str, *,
                   refresh_ttl: bool | None = None) -> Item | None:
        check_namespace(namespace)
        return await super().aget(namespace, key, refresh_ttl=refresh_ttl)

    def search(self, namespace_prefix: tuple[str, ...], /, *, query: str | None = None,
               filter: dict[str, Any] | None = None, limit: int = 10, offset: int = 0,
               refresh_ttl: bool | None = None) -> list[SearchItem]:
        check_namespace(namespace_prefix, item=False, what="namespace_prefix")
        return super().search(namespace_prefix, query=query, filter=filter, limit=limit,
                              offset=offset, refresh_ttl=refresh_ttl)

    async def asearch(self, namespace_prefix: tuple[str, ...], /, *,
                      query: str | None = None, filter: dict[str, Any] | None = None,
                      limit: int = 10, offset: int = 0, refresh_ttl: bool | None = None
                      ) -> list[SearchItem]:
        check_namespace(namespace_prefix, item=False, what="namespace_prefix")
        return await super().asearch(namespace_prefix, query=query, filter=filter,
                                     limit=limit, offset=offset, refresh_ttl=refresh_ttl)

    def put(self, namespace: tuple[str, ...], key: str, value: Mapping[str, Any],
            index: Literal[False] | list[str] | None = None, *,
            ttl: float | NotProvided | None = NOT_PROVIDED) -> None:
        check_namespace(namespace, write=True)
        super().put(namespace, key, value, index, ttl=ttl)

    async def aput(self, namespace: tuple[str, ...], key: str, value: Mapping[str, Any],
                   index: Literal[False] | list[str] | None = None, *,
                   ttl: float | NotProvided | None = NOT_PROVIDED) -> None:
        """Store ``value`` (a dict) under ``namespace``/``key``; ``ttl`` in minutes."""
        check_namespace(namespace, write=True)
        await super().aput(namespace, key, value, index, ttl=ttl)

    def delete(self, namespace: tuple[str, ...], key: str) -> None:
        check_namespace(namespace)
        super().delete(namespace, key)

    async def adelete(self, namespace: tuple[str, ...], key: str) -> None:
        check_namespace(namespace)
        await super().adelete(namespace, key)

    def list_namespaces(self, *, prefix: NamespacePath | None = None,
                        suffix: NamespacePath | None = None, max_depth: int | None = None,
                        limit: int = 100, offset: int = 0) -> list[tuple[str, ...]]:
        _patterns(prefix, suffix)
        return super().list_namespaces(prefix=prefix, suffix=suffix, max_depth=max_depth,
                                       limit=limit, offset=offset)

    async def alist_namespaces(self, *, prefix: NamespacePath | None = None,
                               suffix: NamespacePath | None = None,
                               max_depth: int | None = None, limit: int = 100,
                               offset: int = 0) -> list[tuple[str, ...]]:
        _patterns(prefix, suffix)
        return await super().alist_namespaces(prefix=prefix, suffix=suffix,
                                              max_depth=max_depth, limit=limit, offset=offset)


__all__ = ["CheckedStore"]
