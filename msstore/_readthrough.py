"""Read-through, once: KV miss → the newest durable value → create-if-absent → re-read on a race.

::

    read_kv() ──hit──▶ ("kv", value)
        │ deleted (a delete marker: authoritative) ──▶ ("deleted", None)
        │ miss (no message at all)
        ▼
    load() ──None──▶ ("absent", None)          the newest durable value, as codec bytes
        │ bytes
        ▼
    create(bytes) ──True──▶ ("loaded", value)  compare-and-set: only if KV still has nothing
        │ False: another writer got there first
        └──▶ read KV again (at most ``attempts`` times; then the loaded value, uncached)

Every module that puts a durable copy back into KV (the key-level engine under both state
managers, :mod:`msstore.engine`; the repository; the tiered cache) goes through
:func:`read_through`, so a lost race always ends with the newer write, never with the older
copy that was loaded.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Generic, Literal, TypeVar

T = TypeVar("T")
Source = Literal["kv", "loaded", "absent", "deleted"]


@dataclass(frozen=True, slots=True)
class KVRead(Generic[T]):
    """What one KV read found: ``"hit"`` (with ``value``), ``"deleted"`` or ``"miss"``."""

    status: Literal["hit", "deleted", "miss"]
    value: T | None = None


@dataclass(frozen=True, slots=True)
class ReadResult(Generic[T]):
    """Where a read-through value came from, and the value (None unless kv/loaded)."""

    source: Source
    value: T | None
    races: int = 0

    @property
    def found(self) -> bool:
        return self.source in ("kv", "loaded")


async def read_through(read_kv: Callable[[], Awaitable[KVRead[T]]],
                       load: Callable[[], Awaitable[bytes | None]],
                       create: Callable[[bytes], Awaitable[bool]],
                       decode: Callable[[bytes], T], *, attempts: int = 3) -> ReadResult[T]:
    """KV first; on a miss install ``load()``'s bytes with ``create`` and return them decoded."""
    data: bytes | None = None
    for races in range(attempts):
        got = await read_kv()
        if got.status == "hit":
            return ReadResult("kv", got.value, races)
        if got.status == "deleted":
            return ReadResult("deleted", None, races)
        data = await load()
        if data is None:
            return ReadResult("absent", None, races)
        if await create(data):
            return ReadResult("loaded", decode(data), races)
    # every create lost to a newer write, and every re-read missed again (expired at once):
    # the newest durable value is still the best answer, uncached
    assert data is not None
    return ReadResult("loaded", decode(data), attempts)


__all__ = ["KVRead", "ReadResult", "read_through"]
