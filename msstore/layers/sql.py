"""RELATIONAL_DB: the base of the table-backed stores, and what their tables share.

Each subclass names the data type its table holds (``class TaskStore(SQLStore,
data_type=DataType.TASK_INFO)``), which is how :meth:`SQLStore.for_data_type` finds it.
"""

from __future__ import annotations

import uuid
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import asyncpg
import orjson

from .._check import positive_int
from ..codec import MAX_VALUE_BYTES, dumps
from ..errors import InvalidKeyError, InvalidOptionError, InvalidValueError
from ..router import DataType, RoutingError, _coerce, _Refusing

if TYPE_CHECKING:
    from ..connection import Connection


def check_pool(pool: object) -> asyncpg.Pool:
    if not isinstance(pool, asyncpg.Pool):
        raise InvalidOptionError(f"pool must be an asyncpg.Pool (ms.pool), got "
                                 f"{type(pool).__name__}")
    return pool


def as_uuid(key: object, what: str) -> uuid.UUID:
    if isinstance(key, uuid.UUID):
        return key
    if isinstance(key, str):
        try:
            return uuid.UUID(key)
        except ValueError:
            pass
    raise InvalidKeyError(f"{what} must be a UUID (e.g. str(uuid.uuid4())), got {key!r}")


def jsonb(value: Any, max_bytes: int) -> orjson.Fragment:
    """Encode once, with msstore's size limit; the JSONB codec passes a Fragment through."""
    return orjson.Fragment(dumps(value, max_bytes=max_bytes))


def search_filter(query: Any, column: str, value: Any, what: str,
                  max_bytes: int) -> tuple[str, str | orjson.Fragment]:
    """``column = $1`` for a str query, ``payload @> $1`` for a mapping; else a typed error."""
    if isinstance(query, str):
        return f"{column} = $1", value
    if isinstance(query, Mapping):
        return "payload @> $1", jsonb(query, max_bytes)
    raise InvalidValueError(f"{what} takes a {column} (str) or a JSONB containment filter "
                            f"(mapping), got {type(query).__name__}")


#: The table-backed store of each data type, filled in as the subclasses are defined.
_TABLES: dict[DataType, type[SQLStore]] = {}


class SQLStore(_Refusing):
    """Base of the relational layer: one table per data type, one statement per call."""

    def __init__(self, pool: asyncpg.Pool, *, max_value_bytes: int = MAX_VALUE_BYTES) -> None:
        self._pool = check_pool(pool)
        self.max_value_bytes = positive_int("max_value_bytes", max_value_bytes)

    def __init_subclass__(cls, *, data_type: DataType | None = None, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if data_type is not None:
            _TABLES[data_type] = cls

    @staticmethod
    def for_data_type(ms: Connection, data_type: DataType) -> SQLStore:
        """The table-backed store for ``data_type`` (TASK_INFO or MESSAGE_LOG)."""
        data_type = _coerce(DataType, data_type)
        table = _TABLES.get(data_type)
        if table is None:
            held = " and ".join(d.name for d in DataType if d in _TABLES)
            raise RoutingError(f"RELATIONAL_DB has no table for {data_type.name}; "
                               f"it holds {held}")
        return table(ms.pool)

    def _refusal(self) -> RoutingError:
        return RoutingError(f"{type(self).__name__} has no table: use TaskStore or "
                            "MessageLogStore (SQLStore.for_data_type picks one)")


__all__ = ["SQLStore", "as_uuid", "check_pool", "jsonb", "search_filter"]
