"""#6 Reads under a Zipf workload: the tiered cache vs PostgreSQL-only and KV-only reads.

One agent's ``read_keys`` values sit in ``agents.state`` and in a KV bucket. The same seeded
Zipf sequence of keys is read three ways, the three reads of each step back to back in a
rotating order:

* **PostgreSQL only**: ``SELECT value FROM agents.state WHERE agent_id = $1 AND key = $2``;
* **KV only**: a direct get from the bucket;
* **tiered cache**: ``TieredCacheRepository.find`` (L1 memory → L2 KV → L3 the same SQL
  query), started cold for every repetition, so its misses (and their L2 repopulation) count.
"""

from __future__ import annotations

import time
import uuid
from typing import Any

import pandas as pd

import msstore
from msstore.cache import TieredCacheRepository
from msstore.codec import dumps, loads
from msstore.hybrid import StateChange, merge_changes
from msstore.keys import join_key
from msstore.workloads import zipf_keys

from .common import Comparison, gather_chunked, order, payload, percentile, progress, scratch

SKEW = 1.1


class StateFinder:
    """L3: one agent's rows in ``agents.state``, found by key."""

    def __init__(self, ms: msstore.Connection, agent: uuid.UUID) -> None:
        self.ms, self.agent = ms, agent

    async def find(self, id: Any) -> Any:
        value = await self.ms.pool.fetchval(
            "SELECT value FROM agents.state WHERE agent_id = $1 AND key = $2", self.agent, id)
        if value is None:
            raise msstore.NotFoundError(f"no state {id!r}")
        return value


async def run(ms: msstore.Connection, p: dict[str, int], *, bar: bool = True
              ) -> tuple[list[Comparison], pd.DataFrame]:
    ops, n_keys, reps = p["read_ops"], p["read_keys"], p["read_reps"]
    keys = [f"doc{i:05d}" for i in range(n_keys)]
    sequence = zipf_keys(keys, ops, skew=SKEW, seed=11)
    encoded = [dumps(payload(i)) for i in range(n_keys)]
    cmps = {
        (m, b): Comparison(6, "read path", f"read latency {m}", "µs", "tiered cache", b)
        for m in ("mean", "p99") for b in ("PostgreSQL only", "KV only")
    }
    samples: list[dict[str, Any]] = []
    served: list[dict[str, int]] = []
    pb = progress(reps * ops, "#6 read path", bar)
    async with scratch(ms) as s:
        agent = s.agent()
        await merge_changes(ms.pool, [StateChange(agent, k, i + 1, d)
                                      for i, (k, d) in enumerate(zip(keys, encoded, strict=True))])
        kv = await s.kv("read-kv")
        await gather_chunked((lambda k=k, d=d: kv.put(join_key(str(agent), k), d))  # type: ignore[misc]
                             for k, d in zip(keys, encoded, strict=True))
        kv_keys = {k: join_key(str(agent), k) for k in keys}
        finder = StateFinder(ms, agent)

        async def pg_read(key: str) -> Any:
            return await finder.find(key)

        async def kv_read(key: str) -> Any:
            entry = await kv.get(kv_keys[key])
            return loads(entry.value)

        for rep in range(reps):
            cache: TieredCacheRepository[Any] = TieredCacheRepository(
                ms, finder, bucket=s.bucket("read-cache"), l1_max_entries=n_keys)
            await cache.start()
            readers = {"tiered": cache.find, "pg": pg_read, "kv": kv_read}
            lat: dict[str, list[float]] = {name: [] for name in readers}
            perf = time.perf_counter
            for i, key in enumerate(sequence):
                for name in order(i, list(readers)):
                    t0 = perf()
                    await readers[name](key)
                    lat[name].append(perf() - t0)
                if i % 250 == 249:
                    pb.update(250)
            stats = cache.stats()
            served.append({str(t): int(stats.loc[t, "hits"]) for t in stats.index})
            await cache.close()
            row: dict[str, Any] = {"rep": rep}
            for name, values in lat.items():
                row[f"{name}_mean_us"] = sum(values) / len(values) * 1e6
                row[f"{name}_p99_us"] = percentile(values, 99) * 1e6
            samples.append(row)
            for (m, b), c in cmps.items():
                base = "pg" if b == "PostgreSQL only" else "kv"
                c.add(row[f"tiered_{m}_us"], row[f"{base}_{m}_us"])
    pb.close()
    hit = served[-1]
    for c in cmps.values():
        c.detail = (f"{ops:,} reads, Zipf skew {SKEW} over {n_keys:,} keys, cache cold at start"
                    f" (last run: {hit.get('memory', 0):,} L1 hits, {hit.get('db', 0):,} DB "
                    "loads)")
    frame = pd.DataFrame(samples)
    frame.attrs["served"] = served
    frame.attrs["reads"] = ops
    frame.attrs["distinct_keys_read"] = len(set(sequence))
    return list(cmps.values()), frame
