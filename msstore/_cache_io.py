"""What the tiered cache needs from L2 and L3, their errors as msstore's, entities as KV bytes.

::

    L2  KVBucket (nats-py's KeyValue, or a fake)   with kv_errors(what):  transport errors and
                                                   KV answers the cache does not expect are
                                                   msstore's; a timed-out write may land
    ids cache_key: a UUID or a non-empty str, as the L1 key (and the last token of the L2 key)
    L3  Finder (anything with find(id))            with l3_errors(repository, what): its
                                                   own errors pass, PostgreSQL's (``_pg``'s
                                                   tuples) are translated, the rest wrapped
    entities  EntityCodec: to_dict → codec.dumps → KV bytes → codec.loads → from_dict
"""

from __future__ import annotations

import contextlib
import dataclasses
import uuid
from collections.abc import Callable, Iterator
from typing import Any, Final, Generic, Protocol, TypeVar

import nats.js.errors

from ._pg import TIMEOUT, UNAVAILABLE
from .codec import dumps, loads
from .errors import (
    InvalidKeyError,
    InvalidOptionError,
    InvalidValueError,
    MsstoreError,
    NotSerializableError,
    StoreTimeoutError,
    StoreUnavailableError,
)
from .keys import check_key
from .kv import nats_errors

T = TypeVar("T")
T_co = TypeVar("T_co", covariant=True)
EntityId = uuid.UUID | str


class Finder(Protocol[T_co]):
    """L3: anything with the Repository's ``find`` (``msstore.repository.AgentRepository``)."""

    async def find(self, id: uuid.UUID | str) -> T_co: ...


class KVBucket(Protocol):
    """The part of nats-py's ``KeyValue`` the cache uses (so tests can pass a fake)."""

    async def get(self, key: str) -> Any: ...

    async def put(self, key: str, value: bytes) -> int: ...

    async def update(self, key: str, value: bytes, last: int | None = None) -> int: ...

    async def delete(self, key: str) -> bool: ...


def cache_key(id: object) -> str:
    """The L1 key of ``id`` (a UUID or a non-empty str), or :class:`InvalidKeyError`."""
    if isinstance(id, uuid.UUID):
        return str(id)
    try:
        return check_key(id)
    except InvalidKeyError as e:
        raise InvalidKeyError(f"cache ids must be a UUID or a non-empty str: {e}") from e


#: KV's answers the cache interprets itself; any other nats-py error is an outage
KV_ANSWERS: Final = (nats.js.errors.KeyNotFoundError, nats.js.errors.KeyWrongLastSequenceError)

MAY_LAND: Final = ("the write may still be applied once the server answers (its outcome is "
                   "unknown): read the key back before assuming it was not")


@contextlib.contextmanager
def kv_errors(what: str, *, write: bool = False) -> Iterator[None]:
    """``kv.nats_errors`` plus: other KV answers are errors too; timed-out writes may land."""
    try:
        with nats_errors(what):
            yield
    except KV_ANSWERS:
        raise
    except nats.js.errors.KeyValueError as e:
        raise StoreUnavailableError(f"NATS KV refused to {what}: {e!r}") from e
    except StoreTimeoutError as e:
        if not write:
            raise
        raise StoreTimeoutError(f"{e}; {MAY_LAND}") from e.__cause__


@contextlib.contextmanager
def l3_errors(repository: object, what: str, *, write: bool = False) -> Iterator[None]:
    """Errors of the L3 repository as msstore's: its own pass, asyncpg's are translated.

    Anything else it raises (a bug, a foreign library) becomes a plain :class:`MsstoreError`
    with the original as its cause, so callers need one ``except``.
    """
    name = type(repository).__name__
    try:
        yield
    except MsstoreError:
        raise
    except TIMEOUT as e:  # before UNAVAILABLE: TimeoutError is an OSError
        raise StoreTimeoutError(f"L3 {name} did not answer in time to {what}: {e!r}"
                                f"{'; ' + MAY_LAND if write else ''}") from e
    except UNAVAILABLE as e:
        raise StoreUnavailableError(f"L3 {name} cannot reach PostgreSQL to {what}: {e!r}") from e
    except Exception as e:
        raise MsstoreError(f"L3 {name} failed to {what}: {e!r}") from e


def _default_to_dict(entity: Any) -> Any:
    if dataclasses.is_dataclass(entity) and not isinstance(entity, type):
        return dataclasses.asdict(entity)
    return entity


def _identity(data: Any) -> Any:
    return data


class EntityCodec(Generic[T]):
    """Entities as KV values: ``codec.dumps(to_dict(entity))``, back through ``from_dict``.

    Defaults: dataclasses go through ``dataclasses.asdict`` and ``entity_type(**data)``,
    anything else is stored as plain JSON; ``id_of`` defaults to ``entity.id``.
    """

    def __init__(self, *, bucket: str, entity_type: type[T] | None,
                 to_dict: Callable[[T], Any] | None, from_dict: Callable[[Any], T] | None,
                 id_of: Callable[[T], EntityId] | None) -> None:
        self.bucket = bucket
        self._to_dict: Callable[[T], Any] = to_dict or _default_to_dict
        if from_dict is not None:
            self._from_dict: Callable[[Any], Any] = from_dict
        elif entity_type is None:
            self._from_dict = _identity
        elif dataclasses.is_dataclass(entity_type):
            self._from_dict = lambda data: entity_type(**data)
        else:
            raise InvalidOptionError(
                f"entity_type {getattr(entity_type, '__name__', entity_type)!r} is not a "
                "dataclass: pass from_dict= (and to_dict=) to say how it is stored as JSON")
        self._id_of = id_of or (lambda entity: entity.id)  # type: ignore[attr-defined]

    def encode(self, entity: T) -> bytes:
        try:
            data = self._to_dict(entity)
        except MsstoreError:
            raise
        except Exception as e:  # the caller's to_dict: say which value and why
            raise NotSerializableError(
                f"to_dict failed on {type(entity).__name__} {entity!r:.80}: {e!r}") from e
        return dumps(data)

    def decode(self, data: bytes | None, kkey: str) -> T:
        try:
            value: T = self._from_dict(loads(data or b"null"))
        except MsstoreError:
            raise
        except Exception as e:  # not JSON, or JSON that from_dict / entity_type refuses
            raise InvalidValueError(
                f"the value of {kkey!r} in bucket {self.bucket!r} cannot be decoded: {e!r}; "
                "another writer, or a changed entity_type/from_dict?") from e
        return value

    def id_of(self, entity: T) -> EntityId:
        try:
            return self._id_of(entity)
        except Exception as e:
            raise InvalidValueError(
                f"cannot take the id of {type(entity).__name__}: {e!r}; pass id_of=") from e


__all__ = ["MAY_LAND", "EntityCodec", "EntityId", "Finder", "KVBucket", "cache_key",
           "kv_errors", "l3_errors"]
