"""The tiered cache's metrics: per-tier hits, misses, served calls and latency samples.

Every ``find`` counts one L1 hit or miss, so ``memory.hits + memory.misses`` equals the number
of calls; each call is *served* by exactly one of MEMORY, KV, DB or ends in not-found / error.
On the L1 hit path the cost is one int increment; only every N-th hit
(``latency_sample_every=N``, default 64) takes a ``perf_counter`` pair and appends a latency
sample, because timing every hit would cost more than the hit itself. Misses are always timed.
The tables are built here, on demand; the cache only increments.
"""

from __future__ import annotations

import math
from collections import deque
from typing import TYPE_CHECKING, Any, Final

from ._extras import needs_extra

if TYPE_CHECKING:
    import pandas as pd

TIERS: Final = ("memory", "kv", "db")
COUNTERS: Final = (
    "coalesced", "not_found", "errors", "loads", "stale_loads", "evictions", "expirations",
    "notifications", "invalidations", "puts", "kv_races",
    # disconnect/reconnect: L1 emptied, watches rebuilt; writes whose outcome is unknown
    "l1_resets", "rewatches", "failed_writes",
    # a cluster's bucket got a new stream leader (its watch is rebuilt)
    "leader_changes")


class TierStats:
    __slots__ = ("hits", "misses", "samples", "served")

    def __init__(self, max_samples: int) -> None:
        self.hits = 0
        self.misses = 0
        self.served = 0
        #: seconds per call served by this tier (whole ``find``, L1 check included)
        self.samples: deque[float] = deque(maxlen=max_samples)


def _percentile(values: Any, q: float) -> float:
    with needs_extra("TieredCacheRepository.stats()"):
        import numpy as np

    return float(np.percentile(values, q)) if len(values) else math.nan


def stats_frame(tiers: tuple[TierStats, TierStats, TierStats],
                invalidations: deque[tuple[int, float, bool]],
                attrs: dict[str, Any]) -> pd.DataFrame:
    """One row per tier (memory, kv, db); ``attrs`` plus the invalidation latency go to attrs."""
    with needs_extra("TieredCacheRepository.stats()"):
        import numpy as np
        import pandas as pd

    mem = tiers[0]
    calls = mem.hits + mem.misses
    rows = []
    for name, st in zip(TIERS, tiers, strict=True):
        lookups = st.hits + st.misses
        # an L1 hit is served by MEMORY by definition: the hit path counts it once, as a hit
        served = st.served + (st.hits if st is mem else 0)
        samples = np.fromiter(st.samples, dtype=float) * 1e3
        rows.append({
            "tier": name, "lookups": lookups, "hits": st.hits, "misses": st.misses,
            "hit_rate": st.hits / lookups if lookups else math.nan,
            "served": served, "share": served / calls if calls else math.nan,
            "p50_ms": _percentile(samples, 50), "p99_ms": _percentile(samples, 99),
            "samples": len(samples),
        })
    df = pd.DataFrame(rows).set_index("tier")
    inval = np.array([s[1] for s in invalidations if s[2]]) * 1e3
    df.attrs.update(attrs, calls=calls, invalidation_p50_ms=_percentile(inval, 50),
                    invalidation_p99_ms=_percentile(inval, 99))
    return df


def samples_frame(tiers: tuple[TierStats, TierStats, TierStats]) -> pd.DataFrame:
    """Raw latency samples: one row per sampled call, columns ``source``, ``latency_ms``."""
    with needs_extra("TieredCacheRepository.samples()"):
        import pandas as pd

    frames = [pd.DataFrame({"source": name, "latency_ms": [s * 1e3 for s in st.samples]})
              for name, st in zip(TIERS, tiers, strict=True)]
    return pd.concat(frames, ignore_index=True)


def invalidations_frame(invalidations: deque[tuple[int, float, bool]]) -> pd.DataFrame:
    """One row per watch notification: ``revision``, ``latency_ms``, ``dropped``."""
    with needs_extra("TieredCacheRepository.invalidation_latencies()"):
        import pandas as pd

    return pd.DataFrame([(r, s * 1e3, d) for r, s, d in invalidations],
                        columns=["revision", "latency_ms", "dropped"])


__all__ = ["COUNTERS", "TIERS", "TierStats", "invalidations_frame", "samples_frame",
           "stats_frame"]
