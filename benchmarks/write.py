"""#2 ``write_state`` vs a raw nats-py ``kv.put`` on the same bucket and payload.

The raw put gets the key already encoded and the value already serialised: it is the floor.
``write_state`` also validates the agent id, encodes the key, serialises the value, checks
backpressure and notes the write for its flusher (the default stream flusher runs in the same
event loop, flushing both sides' writes, so its cost lands on both).

* sequential: one write at a time, candidate and baseline alternating write by write;
  p50 and p99 of the per-write latency;
* concurrent: ``write_concurrency`` writers at once; wall time per write (1/throughput),
  candidate and baseline blocks alternating.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Awaitable, Callable
from typing import Any

import pandas as pd

import msstore
from msstore.codec import dumps
from msstore.hybrid import HybridStateManager
from msstore.keys import join_key

from .common import Comparison, order, payload, percentile, progress, scratch

KEYS = 100


async def _concurrent(n: int, concurrency: int, op: Callable[[int], Awaitable[Any]]) -> float:
    """Wall seconds for ``n`` calls of ``op`` run by ``concurrency`` workers."""
    counter = iter(range(n))

    async def worker() -> None:
        for i in counter:
            await op(i)

    t0 = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return time.perf_counter() - t0


async def run(ms: msstore.Connection, p: dict[str, int], *, bar: bool = True
              ) -> tuple[list[Comparison], pd.DataFrame]:
    ops, conc_ops, conc, reps = (p["write_ops"], p["write_conc_ops"], p["write_concurrency"],
                                 p["write_reps"])
    p50 = Comparison(2, "write", "sequential write p50", "µs", "write_state", "raw kv.put",
                     target=("<=", 1.15), target_text="≤ 1.15× raw put")
    p99 = Comparison(2, "write", "sequential write p99", "µs", "write_state", "raw kv.put")
    thr = Comparison(2, "write", f"concurrent ({conc} writers) time per write", "µs",
                     "write_state", "raw kv.put")
    # What the durability log costs a writer (the server copies each message into it): the
    # same raw put into the manager's bucket (logged) and into a bucket with no log.
    log50 = Comparison(2, "write", "sequential write p50", "µs", "raw kv.put, logged bucket",
                       "raw kv.put, plain bucket")
    values = [payload(i) for i in range(KEYS)]
    encoded = [dumps(v) for v in values]
    samples: list[dict[str, Any]] = []
    pb = progress(reps * (3 * ops + 2 * conc_ops), "#2 write", bar)
    async with scratch(ms) as s:
        hsm = HybridStateManager(ms, bucket=s.bucket("write"),
                                 durable=f"bench-{uuid.uuid4().hex[:8]}")
        await hsm.start()
        s.cleanups.append(hsm.close)
        kv = await ms.js.key_value(hsm.bucket)
        plain = await s.kv("write_plain", ttl=hsm.ttl)
        cand_agent, base_agent = s.agent(), s.agent()
        cand_keys = [f"k{i}" for i in range(KEYS)]
        base_keys = [join_key(str(base_agent), k) for k in cand_keys]
        # warm both paths (connections, code paths, the flusher's first batch)
        for i in range(50):
            await hsm.write_state(cand_agent, cand_keys[i % KEYS], values[i % KEYS])
            await kv.put(base_keys[i % KEYS], encoded[i % KEYS])
            await plain.put(base_keys[i % KEYS], encoded[i % KEYS])
        for rep in range(reps):
            lat: dict[str, list[float]] = {"cand": [], "base": [], "plain": []}
            perf = time.perf_counter
            for i in range(ops):
                k = i % KEYS
                for side in order(i + rep, ["cand", "base", "plain"]):
                    if side == "cand":
                        t0 = perf()
                        await hsm.write_state(cand_agent, cand_keys[k], values[k])
                        lat["cand"].append(perf() - t0)
                    else:
                        store = kv if side == "base" else plain
                        t0 = perf()
                        await store.put(base_keys[k], encoded[k])
                        lat[side].append(perf() - t0)
                pb.update(3)
            c50, b50 = percentile(lat["cand"], 50) * 1e6, percentile(lat["base"], 50) * 1e6
            c99, b99 = percentile(lat["cand"], 99) * 1e6, percentile(lat["base"], 99) * 1e6
            p50.add(c50, b50)
            p99.add(c99, b99)
            log50.add(b50, percentile(lat["plain"], 50) * 1e6)
            walls: dict[str, float] = {}
            for side in order(rep, ["cand", "base"]):
                if side == "cand":
                    walls[side] = await _concurrent(
                        conc_ops, conc,
                        lambda i: hsm.write_state(cand_agent, cand_keys[i % KEYS],
                                                  values[i % KEYS]))
                else:
                    walls[side] = await _concurrent(
                        conc_ops, conc, lambda i: kv.put(base_keys[i % KEYS], encoded[i % KEYS]))
                pb.update(conc_ops)
            thr.add(walls["cand"] / conc_ops * 1e6, walls["base"] / conc_ops * 1e6)
            samples.append({"rep": rep, "cand_p50_us": c50, "base_p50_us": b50,
                            "cand_p99_us": c99, "base_p99_us": b99,
                            "cand_writes_per_s": conc_ops / walls["cand"],
                            "base_writes_per_s": conc_ops / walls["base"]})
        await hsm.flush()
    pb.close()
    frame = pd.DataFrame(samples)
    thr.detail = (f"throughput: write_state {frame['cand_writes_per_s'].median():,.0f}/s, "
                  f"raw put {frame['base_writes_per_s'].median():,.0f}/s")
    p50.detail = f"{ops:,} writes per side per repetition, interleaved"
    log50.detail = "the NATS server copies each message of the bucket into its durability log"
    return [p50, p99, thr, log50], frame
