"""MEMORY_CACHE: an in-process LRU with a TTL per entry, and the DataStorage face over it."""

from __future__ import annotations

import math
import time
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

from .._check import optional_seconds, positive_int
from ..errors import InvalidOptionError, InvalidValueError, NotFoundError
from ..keys import check_key
from ..router import Hit
from ._common import check_limit, check_ttl

_MISSING: Any = object()


class MemoryCache:
    """In-process, bounded LRU with a TTL per entry; no I/O, so a hit costs a dict lookup.

    The synchronous methods (:meth:`get`, :meth:`peek`, :meth:`set`, :meth:`delete`,
    :meth:`purge_expired`, :meth:`clear`, ``len()``, ``in``) are a plain LRU+TTL store that
    knows nothing of revisions or sources, for any in-process tier to build on; ``store``,
    ``retrieve``, ``remove`` and ``search`` are the :class:`~msstore.router.DataStorage` face.

    Values are kept by reference (not encoded): a hit hands back the very object stored, so
    do not mutate it. Keys are checked (:func:`msstore.keys.check_key`) when written and on a
    miss, never on a hit. ``len()`` may count expired entries until they are touched or
    :meth:`purge_expired` runs; it never exceeds ``max_entries``. The clock is injectable
    (``time.monotonic`` by default) so TTLs can be tested without sleeping.
    """

    def __init__(self, *, max_entries: int = 10_000, ttl: float | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.max_entries = positive_int("max_entries", max_entries)
        self.ttl = optional_seconds("ttl", ttl)
        if not callable(clock):
            raise InvalidOptionError(f"clock must be a callable returning seconds, got "
                                     f"{clock!r}")
        self._clock = clock
        self._data: OrderedDict[str, tuple[float, Any]] = OrderedDict()
        self.hits = 0
        self.misses = 0
        self.evictions = 0
        self.expirations = 0

    def _live(self, key: str) -> tuple[float, Any] | None:
        """The live (expires, value) of ``key``; an expired entry is dropped and counted."""
        try:
            item = self._data.get(key)
        except TypeError:  # unhashable: never stored
            item = None
        if item is None:
            check_key(key)
            return None
        if item[0] > self._clock():
            return item
        del self._data[key]
        self.expirations += 1
        return None

    def get(self, key: str, default: Any = _MISSING) -> Any:
        """The value, made most recently used; ``default`` if given and the key is missing
        or expired, else :class:`NotFoundError`."""
        item = self._live(key)
        if item is not None:
            self._data.move_to_end(key)
            self.hits += 1
            return item[1]
        self.misses += 1
        if default is not _MISSING:
            return default
        raise NotFoundError(f"key {key!r} is not in the memory cache (never set, removed, "
                            "evicted as least recently used, or expired)")

    def peek(self, key: str, default: Any = None) -> Any:
        """The live value or ``default``, leaving the LRU order and the hit counters alone."""
        item = self._live(key)
        return default if item is None else item[1]

    def set(self, key: str, value: Any, *, ttl: float | None = _MISSING) -> None:
        """Store ``value``; ``ttl`` (seconds, ``None`` = never) overrides the cache default.

        The least recently used entries are evicted (and counted) beyond ``max_entries``.
        """
        check_key(key)
        ttl = self.ttl if ttl is _MISSING else check_ttl(ttl)
        expires = math.inf if ttl is None else self._clock() + ttl
        self._data[key] = (expires, value)
        self._data.move_to_end(key)
        while len(self._data) > self.max_entries:
            self._data.popitem(last=False)
            self.evictions += 1

    def delete(self, key: str) -> bool:
        """Remove ``key``; True if it was there (expired or not)."""
        return self._data.pop(check_key(key), None) is not None

    def purge_expired(self) -> int:
        """Drop every expired entry now; return how many (O(n), for housekeeping)."""
        now = self._clock()
        dead = [k for k, (expires, _) in self._data.items() if expires <= now]
        for k in dead:
            del self._data[k]
        self.expirations += len(dead)
        return len(dead)

    def clear(self) -> None:
        self._data.clear()

    def __len__(self) -> int:
        return len(self._data)

    def __contains__(self, key: object) -> bool:
        if not isinstance(key, str):
            return False
        item = self._data.get(key)
        return item is not None and item[0] > self._clock()

    async def store(self, key: str, value: Any) -> str:
        self.set(key, value)
        return key

    async def retrieve(self, key: str) -> Any:
        return self.get(key)

    async def remove(self, key: str) -> None:
        self.delete(key)

    async def search(self, query: Any, *, limit: int = 10) -> list[Hit]:
        """Live entries whose key starts with ``query``, in key order (does not touch LRU)."""
        if not isinstance(query, str):
            raise InvalidValueError(f"memory-cache search takes a key prefix (str), got "
                                    f"{type(query).__name__}")
        limit = check_limit(limit)
        now = self._clock()
        found = sorted((k, v) for k, (expires, v) in self._data.items()
                       if expires > now and k.startswith(query))
        return [Hit(k, v) for k, v in found[:limit]]


__all__ = ["MemoryCache"]
