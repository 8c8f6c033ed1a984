"""#5 Write-behind vs write-through under a Zipf hot-key workload.

The same seeded sequence of writes (``msstore.workloads.zipf_keys``: a few hot keys take most
writes) goes through:

* **write-through**: every write is a KV put plus one guarded ``INSERT … ON CONFLICT`` in its
  own transaction — the SQL row count equals the write count;
* **write-behind** (``HybridStateManager``, dirty-set flusher): a write is a KV put; the
  flusher writes the *latest* value of each dirty key once per flush, so N writes to a hot key
  between two flushes cost one row. Two settings: the default ``flush_threshold=50`` (a flush
  as soon as 50 keys are dirty: short lag, little coalescing) and ``flush_threshold=1000``
  (flushes driven by ``flush_interval=1 s``: most coalescing).

Blocks run in a rotating order; each block ends with a flush, and every path must leave the
same final rows in PostgreSQL.
"""

from __future__ import annotations

import time
import uuid
from typing import Any

import pandas as pd

import msstore
from msstore.codec import dumps
from msstore.hybrid import HybridStateManager
from msstore.keys import join_key
from msstore.workloads import zipf_keys

from .common import Comparison, order, payload, percentile, progress, scratch

SKEW = 1.1
SEED = 20260601
WRITE_THROUGH_SQL = """
INSERT INTO agents.state (agent_id, key, value, version, updated_at)
VALUES ($1, $2, $3::text::jsonb, $4, now())
ON CONFLICT (agent_id, key) DO UPDATE
    SET value = excluded.value, version = excluded.version, updated_at = excluded.updated_at
    WHERE agents.state.version < excluded.version
"""
SETTINGS = {"write-behind (threshold 1000)": 1000, "write-behind (threshold 50)": 50}


async def run(ms: msstore.Connection, p: dict[str, int], *, bar: bool = True
              ) -> tuple[list[Comparison], pd.DataFrame]:
    n, n_keys, reps = p["wb_writes"], p["wb_keys"], p["wb_reps"]
    keys = [f"hot{i:04d}" for i in range(n_keys)]
    sequence = zipf_keys(keys, n, skew=SKEW, seed=SEED)
    values = [payload(i) for i in range(n)]
    per10k = 10_000 / n
    variants = ["write-through", *SETTINGS]
    cmps: dict[str, dict[str, Comparison]] = {}
    for name in SETTINGS:
        short = name.removeprefix("write-behind ")
        cmps[name] = {
            "rows": Comparison(5, "write-behind", "PostgreSQL rows per 10,000 writes", "rows",
                               f"write-behind {short}", "write-through"),
            "tx": Comparison(5, "write-behind", "PostgreSQL transactions per 10,000 writes",
                             "tx", f"write-behind {short}", "write-through"),
            "p50": Comparison(5, "write-behind", "write latency p50", "µs",
                              f"write-behind {short}", "write-through"),
            "p99": Comparison(5, "write-behind", "write latency p99", "µs",
                              f"write-behind {short}", "write-through"),
        }
    best = cmps["write-behind (threshold 1000)"]["rows"]
    best.target, best.target_text = ("<=", 1 / 20), "≤ 1/20 of write-through"
    samples: list[dict[str, Any]] = []
    finals: list[bool] = []
    pb = progress(reps * len(variants) * n, "#5 write-behind", bar)
    async with scratch(ms) as s:
        managers: dict[str, HybridStateManager] = {}
        for name, threshold in SETTINGS.items():
            hsm = HybridStateManager(ms, bucket=s.bucket("wb"), flusher="dirty-set",
                                     flush_threshold=threshold, flush_interval=1.0,
                                     durable=f"bench-{uuid.uuid4().hex[:8]}")
            await hsm.start()
            s.cleanups.append(hsm.close)
            managers[name] = hsm
        wt_kv = await s.kv("wt")
        for rep in range(reps):
            stats: dict[str, dict[str, float]] = {}
            agents: dict[str, uuid.UUID] = {}
            for variant in order(rep, variants):
                agent = agents[variant] = s.agent()
                lat: list[float] = []
                perf = time.perf_counter
                if variant == "write-through":
                    kv_keys = {k: join_key(str(agent), k) for k in keys}
                    for i, key in enumerate(sequence):
                        t0 = perf()
                        data = dumps(values[i])
                        rev = await wt_kv.put(kv_keys[key], data)
                        await ms.pool.execute(WRITE_THROUGH_SQL, agent, key, data.decode(), rev)
                        lat.append(perf() - t0)
                        if i % 500 == 499:
                            pb.update(500)
                    stats[variant] = {"rows": n, "tx": n}
                else:
                    hsm = managers[variant]
                    before = hsm.counters
                    for i, key in enumerate(sequence):
                        t0 = perf()
                        await hsm.write_state(agent, key, values[i])
                        lat.append(perf() - t0)
                        if i % 500 == 499:
                            pb.update(500)
                    await hsm.flush()
                    after = hsm.counters
                    stats[variant] = {"rows": after["rows_flushed"] - before["rows_flushed"],
                                      "tx": after["flushes"] - before["flushes"]}
                stats[variant]["p50"] = percentile(lat, 50) * 1e6
                stats[variant]["p99"] = percentile(lat, 99) * 1e6
            # every path must leave the same final rows
            got = {}
            for variant, agent in agents.items():
                got[variant] = {r["key"]: r["value"] for r in await ms.pool.fetch(
                    "SELECT key, value FROM agents.state WHERE agent_id = $1", agent)}
            finals.append(all(g == got["write-through"] for g in got.values()))
            wt = stats["write-through"]
            for name in SETTINGS:
                st = stats[name]
                cs = cmps[name]
                cs["rows"].add(st["rows"] * per10k, wt["rows"] * per10k)
                cs["tx"].add(st["tx"] * per10k, wt["tx"] * per10k)
                cs["p50"].add(st["p50"], wt["p50"])
                cs["p99"].add(st["p99"], wt["p99"])
            for variant, st in stats.items():
                samples.append({"rep": rep, "variant": variant, **st,
                                "rows_per_10k": st["rows"] * per10k,
                                "tx_per_10k": st["tx"] * per10k})
    pb.close()
    detail = (f"{n:,} writes, Zipf skew {SKEW} over {n_keys} keys, dirty-set flusher, "
              "flush_interval 1 s")
    out: list[Comparison] = []
    for name in SETTINGS:
        for c in cmps[name].values():
            c.detail = detail
            out.append(c)
    frame = pd.DataFrame(samples)
    frame.attrs["same_final_rows"] = all(finals)
    frame.attrs["writes"] = n
    frame.attrs["distinct_keys_written"] = len(set(sequence))
    return out, frame
