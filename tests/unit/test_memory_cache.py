"""MemoryCache: TTL with an injected clock, the LRU bound, and the DataStorage contract."""

from __future__ import annotations

import random

import pytest

from msstore import InvalidKeyError, NotFoundError
from msstore.errors import InvalidOptionError
from msstore.layers import InvalidValueError, MemoryCache
from msstore.router import Hit
from tests.fakes import FakeClock


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


def test_entry_expires_after_its_ttl(clock: FakeClock) -> None:
    cache = MemoryCache(ttl=10, clock=clock)
    cache.set("a", 1)
    clock.advance(9.99)
    assert cache.get("a") == 1
    clock.advance(0.01)
    with pytest.raises(NotFoundError, match="expired"):
        cache.get("a")
    assert len(cache) == 0
    assert cache.expirations == 1


def test_ttl_counts_from_the_last_write_not_the_last_read(clock: FakeClock) -> None:
    cache = MemoryCache(ttl=10, clock=clock)
    cache.set("a", 1)
    clock.advance(6)
    assert cache.get("a") == 1  # a read does not extend the TTL
    clock.advance(6)
    assert cache.get("a", None) is None
    cache.set("b", 1)
    clock.advance(6)
    cache.set("b", 2)  # a write does
    clock.advance(6)
    assert cache.get("b") == 2


def test_per_entry_ttl_overrides_the_default(clock: FakeClock) -> None:
    cache = MemoryCache(ttl=10, clock=clock)
    cache.set("short", 1, ttl=1)
    cache.set("forever", 2, ttl=None)
    cache.set("default", 3)
    clock.advance(5)
    assert "short" not in cache
    assert cache.get("default") == 3
    clock.advance(10**6)
    assert cache.get("forever") == 2
    assert "default" not in cache


def test_no_default_ttl_means_no_expiry(clock: FakeClock) -> None:
    cache = MemoryCache(clock=clock)
    cache.set("a", 1)
    clock.advance(10**9)
    assert cache.get("a") == 1


def test_lru_bound_is_never_exceeded() -> None:
    rng = random.Random(7)
    cache = MemoryCache(max_entries=16)
    for _ in range(5000):
        key = str(rng.randrange(64))
        if rng.random() < 0.6:
            cache.set(key, key)
        else:
            cache.get(key, None)
        assert len(cache) <= 16
    assert len(cache) == 16
    assert cache.evictions > 0


def test_least_recently_used_is_evicted_first() -> None:
    cache = MemoryCache(max_entries=3)
    for k in "abc":
        cache.set(k, k.upper())
    assert cache.get("a") == "A"  # "b" is now the least recently used
    cache.set("d", "D")
    assert "b" not in cache
    assert [k for k in "acd" if k in cache] == ["a", "c", "d"]
    cache.set("c", "C2")  # overwriting refreshes too: "a" is next out
    cache.set("e", "E")
    assert "a" not in cache
    assert cache.get("c") == "C2"
    assert cache.evictions == 2


def test_purge_expired_counts_what_it_drops(clock: FakeClock) -> None:
    cache = MemoryCache(ttl=5, clock=clock)
    for i in range(4):
        cache.set(f"k{i}", i, ttl=1 if i % 2 else 100)
    clock.advance(2)
    assert cache.purge_expired() == 2
    assert len(cache) == 2
    assert cache.purge_expired() == 0


def test_hit_and_miss_counters() -> None:
    cache = MemoryCache()
    cache.set("a", 1)
    cache.get("a")
    cache.get("a")
    cache.get("b", None)
    assert (cache.hits, cache.misses) == (2, 1)


def test_values_are_kept_by_reference() -> None:
    cache = MemoryCache()
    value = {"list": [1]}
    cache.set("a", value)
    assert cache.get("a") is value


@pytest.mark.parametrize("key", ["", None, 3, b"a"])
def test_bad_keys_are_typed_errors(key: object) -> None:
    cache = MemoryCache()
    with pytest.raises(InvalidKeyError):
        cache.set(key, 1)  # type: ignore[arg-type]
    with pytest.raises(InvalidKeyError):
        cache.get(key)  # type: ignore[arg-type]
    assert len(cache) == 0


@pytest.mark.parametrize("ttl", [0, -1, float("nan"), float("inf"), "10", True])
def test_bad_ttl_is_a_typed_error_and_keeps_the_old_value(ttl: object) -> None:
    cache = MemoryCache()
    cache.set("a", 1)
    with pytest.raises(InvalidValueError, match="ttl must be a positive number"):
        cache.set("a", 2, ttl=ttl)  # type: ignore[arg-type]
    assert cache.get("a") == 1


@pytest.mark.parametrize("size", [0, -1, 1.5, True])
def test_bad_bound_is_a_typed_error(size: object) -> None:
    with pytest.raises(InvalidOptionError, match="max_entries"):
        MemoryCache(max_entries=size)  # type: ignore[arg-type]


@pytest.mark.parametrize("options", [{"ttl": 0}, {"ttl": "10"}, {"ttl": float("inf")},
                                     {"clock": "monotonic"}])
def test_bad_constructor_options_are_invalid_options(options: dict[str, object]) -> None:
    with pytest.raises(InvalidOptionError, match=next(iter(options))):
        MemoryCache(**options)  # type: ignore[arg-type]


async def test_async_contract_round_trip_remove_search(clock: FakeClock) -> None:
    cache = MemoryCache(ttl=60, clock=clock)
    assert await cache.store("user:2", {"n": 2}) == "user:2"
    await cache.store("user:1", {"n": 1})
    await cache.store("other", 0)
    cache.set("user:3", 3, ttl=1)
    clock.advance(2)  # user:3 expired: search must not return it
    assert await cache.retrieve("user:1") == {"n": 1}
    assert await cache.search("user:") == [Hit("user:1", {"n": 1}), Hit("user:2", {"n": 2})]
    assert await cache.search("user:", limit=1) == [Hit("user:1", {"n": 1})]
    await cache.remove("user:1")
    await cache.remove("user:1")  # idempotent
    with pytest.raises(NotFoundError):
        await cache.retrieve("user:1")
    assert [h.key for h in await cache.search("")] == ["other", "user:2"]


async def test_search_refuses_non_text_queries_and_bad_limits() -> None:
    cache = MemoryCache()
    with pytest.raises(InvalidValueError, match="key prefix"):
        await cache.search({"a": 1})
    with pytest.raises(InvalidOptionError, match="limit"):
        await cache.search("", limit=0)


def test_peek_leaves_the_lru_order_and_the_counters_alone(clock: FakeClock) -> None:
    cache = MemoryCache(max_entries=2, ttl=10, clock=clock)
    cache.set("a", 1)
    cache.set("b", 2)
    assert cache.peek("a") == 1 and cache.peek("missing") is None
    assert cache.peek("missing", 0) == 0
    assert (cache.hits, cache.misses) == (0, 0)
    cache.set("c", 3)  # "a" is still the least recently used: peek did not refresh it
    assert "a" not in cache and cache.peek("b") == 2
    clock.advance(10)
    assert cache.peek("b") is None and cache.expirations == 1
    with pytest.raises(InvalidKeyError):
        cache.peek("")
