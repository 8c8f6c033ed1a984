"""#3 An L1 hit in ``TieredCacheRepository`` vs other in-process caches, all awaited.

Every variant is called as ``await get(key)`` in the same loop over the same warm keys:

* **await-dict**: an ``async def`` doing ``dict.get`` plus an expiry check — the floor for
  an awaited in-memory lookup;
* **cachetools** ``TTLCache`` (its ``get``, wrapped in an ``async def`` so it is awaited too);
* **cashews** with its in-memory backend, through its public API (``Cache().setup("mem://")``,
  ``await cache.get(key)``), and the bare backend (``cashews.backends.memory.Memory.get``, no
  middleware, key handling or wrappers) for reference;
* **msstore** ``TieredCacheRepository.find`` with its defaults (LRU move-to-end, TTL check,
  per-tier hit counters and latency samples).

The hit paths do no I/O and never yields to the event loop, so it is timed in *thread CPU
time* (``time.thread_time_ns``): time the OS gives to other processes on a shared machine
does not count. ``l1_ops`` lookups per repetition are split into blocks of ``BLOCK``, the
five variants alternating block by block in a rotating order; a figure is nanoseconds per
lookup, a ratio the median of the per-block ratios.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from typing import Any

import pandas as pd

import msstore
from msstore.cache import TieredCacheRepository
from msstore.workloads import zipf_keys

from .common import Comparison, order, payload, progress, scratch

N_KEYS = 1_000
BLOCK = 2_000
TTL = 600.0


class DictFinder:
    """L3 for the benchmark: an in-memory "repository" (only the first find of a key uses it)."""

    def __init__(self, values: dict[str, Any]) -> None:
        self.values = values

    async def find(self, id: Any) -> Any:
        try:
            return self.values[str(id)]
        except KeyError as e:
            raise msstore.NotFoundError(str(id)) from e


async def run(ms: msstore.Connection, p: dict[str, int], *, bar: bool = True
              ) -> tuple[list[Comparison], pd.DataFrame]:
    from cachetools import TTLCache
    from cashews import Cache
    from cashews.backends.memory import Memory

    ops, reps = p["l1_ops"], p["l1_reps"]
    keys = [f"entity-{i:04d}" for i in range(N_KEYS)]
    values = {k: payload(i) for i, k in enumerate(keys)}
    sequence = zipf_keys(keys, ops, skew=1.0, seed=3)
    vs_dict = Comparison(3, "L1 hit", "awaited hit", "ns", "msstore L1 find", "await-dict",
                         target=("<=", 2.0), target_text="≤ 2× await-dict")
    vs_tt = Comparison(3, "L1 hit", "awaited hit", "ns", "msstore L1 find",
                       "cachetools TTLCache")
    vs_cashews = Comparison(3, "L1 hit", "awaited hit", "ns", "msstore L1 find",
                            "cashews Cache (mem://) get", target=("<=", 1 / 5),
                            target_text="≥ 5× faster than cashews")
    vs_backend = Comparison(3, "L1 hit", "awaited hit", "ns", "msstore L1 find",
                            "cashews Memory backend get")
    samples: list[dict[str, Any]] = []
    pb = progress(reps * 5, "#3 L1 hit", bar)

    # the three baselines, filled with the same values
    clock = time.monotonic
    plain: dict[str, tuple[Any, float]] = {k: (v, clock() + TTL) for k, v in values.items()}

    async def dict_get(key: str) -> Any:
        entry = plain.get(key)
        if entry is not None and entry[1] > clock():
            return entry[0]
        return None

    tt: TTLCache[str, Any] = TTLCache(maxsize=10_000, ttl=TTL)
    tt.update(values)

    async def tt_get(key: str) -> Any:
        return tt.get(key)

    mem = Memory(size=10_000)
    await mem.init()
    cashews = Cache()
    cashews.setup("mem://?size=10000")
    for k, v in values.items():
        await mem.set(k, v, expire=TTL)
        await cashews.set(k, v, expire=TTL)

    async with scratch(ms) as s:
        cache: TieredCacheRepository[Any] = TieredCacheRepository(
            ms, DictFinder(values), bucket=s.bucket("l1"), l1_ttl=TTL,
            l1_max_entries=10_000)
        await cache.start()
        s.cleanups.append(cache.close)
        for k in keys:  # warm L1: every later find is a hit
            await cache.find(k)
        assert all(cache.peek(k) is not None for k in keys)
        hits_before = cache.stats()
        getters: dict[str, Callable[[str], Awaitable[Any]]] = {
            "msstore": cache.find, "dict": dict_get, "cachetools": tt_get,
            "cashews": cashews.get, "cashews-backend": mem.get}
        for name, get in getters.items():  # warm each code path
            for k in keys[:100]:
                assert await get(k) is not None, name
        rounds = 0
        for rep in range(reps):
            for start in range(0, ops, BLOCK):
                block = sequence[start:start + BLOCK]
                ns: dict[str, float] = {}
                for name in order(rounds, list(getters)):
                    get = getters[name]
                    t0 = time.thread_time_ns()
                    for k in block:
                        await get(k)
                    ns[name] = (time.thread_time_ns() - t0) / len(block)
                rounds += 1
                vs_dict.add(ns["msstore"], ns["dict"])
                vs_tt.add(ns["msstore"], ns["cachetools"])
                vs_cashews.add(ns["msstore"], ns["cashews"])
                vs_backend.add(ns["msstore"], ns["cashews-backend"])
                samples.append({"rep": rep, "block": start // BLOCK,
                                **{f"{k}_ns": v for k, v in ns.items()}})
            pb.update(5)
        stats = cache.stats()
    pb.close()
    for closing in (mem, cashews):
        close = getattr(closing, "close", None)
        if close is not None:
            await close()
    for c in (vs_dict, vs_tt, vs_cashews, vs_backend):
        c.detail = (f"{reps} × {ops:,} awaited lookups over {N_KEYS} warm keys (Zipf 1.0), "
                    f"blocks of {BLOCK}, thread CPU time")
    frame = pd.DataFrame(samples)
    frame.attrs["stats_before"] = hits_before
    frame.attrs["stats"] = stats
    return [vs_dict, vs_tt, vs_cashews, vs_backend], frame
