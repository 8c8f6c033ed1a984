"""The tiered cache's L1: this process' memory, an LRU + TTL store of :class:`CacheEntry`.

::

    L1 (an OrderedDict: least recently used first)
      get(key) + entry.expires_at > clock()   the hit check, inlined in ``find`` (no call)
      move_to_end(key)                         on every hit: the LRU order
      install(key, entry)                      never over a newer revision; bounded: the least
                                               recently used entry goes first
      expire / evict_expired                   TTL: on the next find of a key, or in a sweep
      reset()                                  a NATS outage: everything goes at once

:class:`L1` *is* the ``OrderedDict``, so ``find``'s hit path costs what a dict lookup costs;
everything that changes L1 besides the hit path's ``move_to_end`` is a method here and counts
itself in the cache's ``counters`` (``evictions``, ``expirations``, ``invalidations``,
``l1_resets``).
"""

from __future__ import annotations

import enum
import math
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Generic, TypeVar, overload

T = TypeVar("T")


class CacheSource(enum.Enum):
    """Where a value came from: this process' memory, NATS KV, or the repository (SQL)."""

    MEMORY = "memory"
    KV = "kv"
    DB = "db"


@dataclass(frozen=True, slots=True)
class CacheEntry(Generic[T]):
    """One cached value, as the seed's ``CacheEntry`` plus the KV revision it corresponds to.

    ``timestamp`` is the cache clock (monotonic by default) when the entry was made, ``ttl`` its
    L1 lifetime in seconds (``None``: until evicted or invalidated). In L1, ``source`` says where
    the value came from (MEMORY for a local ``put``); from :meth:`TieredCacheRepository.
    find_entry` it says which tier answered that call.
    """

    value: T
    timestamp: float
    ttl: float | None
    source: CacheSource
    revision: int
    expires_at: float

    def is_valid(self, now: float) -> bool:
        return self.expires_at > now


class L1(OrderedDict[str, CacheEntry[Any]]):
    """LRU + TTL over at most ``max_entries`` entries, keyed by the cache key (a ``str``)."""

    def __init__(self, max_entries: int, ttl: float | None, clock: Callable[[], float],
                 counters: dict[str, int]) -> None:
        super().__init__()
        self.max_entries = max_entries
        self.ttl = ttl
        self.clock = clock
        self.counters = counters
        #: the most entries L1 ever held (never above ``max_entries``)
        self.high_water = 0

    def entry(self, value: T, source: CacheSource, revision: int) -> CacheEntry[T]:
        """A new entry for ``value``, living ``ttl`` seconds from now."""
        now = self.clock()
        ttl = self.ttl
        return CacheEntry(value, now, ttl, source, revision,
                          math.inf if ttl is None else now + ttl)

    def live(self, key: str) -> CacheEntry[Any] | None:
        """The entry of ``key`` if it has not expired (LRU order untouched)."""
        entry = self.get(key)
        if entry is None or entry.expires_at <= self.clock():
            return None
        return entry

    def install(self, key: str, entry: CacheEntry[Any]) -> None:
        """Keep ``entry`` as the most recently used, unless L1 holds a newer revision."""
        current = self.get(key)
        if current is not None and current.revision > entry.revision:
            return  # a newer value (our own put) got there first
        self[key] = entry
        self.move_to_end(key)
        while len(self) > self.max_entries:
            self.popitem(last=False)
            self.counters["evictions"] += 1
        if len(self) > self.high_water:
            self.high_water = len(self)

    def drop_older(self, key: str, revision: int) -> bool:
        """The watch saw ``revision`` of ``key``: drop an older entry (an invalidation)."""
        entry = self.get(key)
        if entry is None or entry.revision >= revision:
            return False
        del self[key]
        self.counters["invalidations"] += 1
        return True

    def expire(self, key: str, entry: CacheEntry[Any] | None) -> None:
        """Drop ``entry`` (found expired by a find) if it is still the one held for ``key``."""
        if entry is not None and self.get(key) is entry:
            del self[key]
            self.counters["expirations"] += 1

    def evict_expired(self) -> int:
        """Drop every expired entry now; return how many."""
        now = self.clock()
        dead = [k for k, e in self.items() if e.expires_at <= now]
        for k in dead:
            del self[k]
        self.counters["expirations"] += len(dead)
        return len(dead)

    def reset(self) -> None:
        """Empty L1 at once (NATS went away or came back: changes may have gone unnotified)."""
        if self:
            self.clear()
            self.counters["l1_resets"] += 1


class L1HighWater:
    """``cache.l1_high_water``: an attribute read from the cache's L1 (not a property)."""

    @overload
    def __get__(self, cache: None, owner: type) -> L1HighWater: ...

    @overload
    def __get__(self, cache: object, owner: type) -> int: ...

    def __get__(self, cache: object | None, owner: type) -> L1HighWater | int:
        return self if cache is None else cache._l1.high_water  # type: ignore[attr-defined]


__all__ = ["L1", "CacheEntry", "CacheSource", "L1HighWater"]
