"""Shared helpers: scales, payloads, timing, paired ratios, unique names, clean-up.

Every figure the suite reports is a *ratio* measured side by side: each repetition runs the
baseline and the candidate back to back (their order alternating between repetitions), and a
ratio is the median of the per-repetition ratios. Drift on a shared, noisy machine (other
processes, CPU frequency, PostgreSQL checkpoints) then hits both sides of a pair alike.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import os
import statistics
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import msstore

#: What each scale runs. ``ci`` keeps the whole notebook 07 well under 90 s on 2 cores.
SCALES: dict[str, dict[str, int]] = {
    "ci": {
        "flush_keys": 2_000, "flush_reps": 3,
        "write_ops": 600, "write_conc_ops": 2_000, "write_concurrency": 64, "write_reps": 3,
        "l1_ops": 20_000, "l1_reps": 5,
        "hydrate_keys": 1_000, "hydrate_reps": 3,
        "wb_writes": 3_000, "wb_keys": 100, "wb_reps": 1,
        "read_ops": 1_500, "read_keys": 500, "read_reps": 3,
        "queue_tasks": 1_000, "queue_workers": 4, "queue_batch": 10,
        "queue_latency_tasks": 40, "queue_reps": 2,
        "msglog_messages": 20_000, "msglog_reps": 3, "msglog_calls": 40,
        "kb_passages": 2_000, "kb_queries": 50,
        "lg_steps": 100, "lg_conc_steps": 20, "lg_reps": 2,
        "cluster_write_ops": 300, "cluster_flush_keys": 2_000, "cluster_reps": 1,
    },
    "full": {
        "flush_keys": 10_000, "flush_reps": 9,
        "write_ops": 3_000, "write_conc_ops": 10_000, "write_concurrency": 64, "write_reps": 5,
        "l1_ops": 100_000, "l1_reps": 7,
        "hydrate_keys": 1_000, "hydrate_reps": 7,
        "wb_writes": 10_000, "wb_keys": 100, "wb_reps": 3,
        "read_ops": 10_000, "read_keys": 2_000, "read_reps": 5,
        "queue_tasks": 5_000, "queue_workers": 4, "queue_batch": 10,
        "queue_latency_tasks": 200, "queue_reps": 3,
        "msglog_messages": 200_000, "msglog_reps": 5, "msglog_calls": 100,
        "kb_passages": 10_000, "kb_queries": 200,
        "lg_steps": 200, "lg_conc_steps": 50, "lg_reps": 5,
        "cluster_write_ops": 2_000, "cluster_flush_keys": 10_000, "cluster_reps": 3,
    },
}

#: Columns of the summary table (one row per measured comparison).
COLUMNS = ("id", "benchmark", "metric", "unit", "candidate", "baseline", "candidate_value",
           "baseline_value", "ratio", "speedup", "target", "target_met", "reps", "detail")

RUN = uuid.uuid4().hex[:8]  # every bucket this process creates carries it


def scale_params(scale: str) -> dict[str, int]:
    if scale not in SCALES:
        raise ValueError(f"scale must be one of {sorted(SCALES)}, got {scale!r}")
    return SCALES[scale]


def payload(i: int) -> dict[str, Any]:
    """A ~250-byte JSON value, as in the design brief's bulk-upsert figures."""
    return {"step": i, "status": "running", "tool": "search", "tokens": 1000 + i % 977,
            "note": "x" * 150, "tags": ["plan", "act", "observe"], "score": (i % 100) / 100}


def bucket_name(what: str) -> str:
    return f"bench_{what}_{RUN}_{uuid.uuid4().hex[:6]}"


def median(values: Iterable[float]) -> float:
    vals = [v for v in values if not math.isnan(v)]
    return statistics.median(vals) if vals else math.nan


def percentile(values: Sequence[float], q: float) -> float:
    """Nearest-rank percentile (q in 0..100) of ``values``."""
    if not values:
        return math.nan
    ordered = sorted(values)
    k = max(0, min(len(ordered) - 1, math.ceil(q / 100 * len(ordered)) - 1))
    return ordered[k]


async def timed(aw: Awaitable[Any]) -> float:
    t0 = time.perf_counter()
    await aw
    return time.perf_counter() - t0


def order(rep: int, names: Sequence[str]) -> list[str]:
    """Rotate ``names`` by ``rep`` so that no variant always runs first (or last)."""
    k = rep % len(names)
    return [*names[k:], *names[:k]]


@dataclass
class Comparison:
    """One measured comparison: per-repetition values of a candidate and its baseline."""

    id: int
    benchmark: str
    metric: str
    unit: str
    candidate: str
    baseline: str
    candidate_values: list[float] = field(default_factory=list)
    baseline_values: list[float] = field(default_factory=list)
    #: target on candidate/baseline: ("<=", 0.02) means "at least 50x lower"
    target: tuple[str, float] | None = None
    target_text: str = ""
    detail: str = ""

    def add(self, candidate: float, baseline: float) -> None:
        self.candidate_values.append(candidate)
        self.baseline_values.append(baseline)

    @property
    def ratio(self) -> float:
        """Median over repetitions of candidate/baseline (lower is better for every metric)."""
        pairs = [c / b for c, b in zip(self.candidate_values, self.baseline_values, strict=True)
                 if b and not math.isnan(b) and not math.isnan(c)]
        return median(pairs)

    def row(self) -> dict[str, Any]:
        ratio = self.ratio
        met: bool | None = None
        if self.target is not None and not math.isnan(ratio):
            op, bound = self.target
            met = ratio <= bound if op == "<=" else ratio >= bound
        return {
            "id": self.id, "benchmark": self.benchmark, "metric": self.metric,
            "unit": self.unit, "candidate": self.candidate, "baseline": self.baseline,
            "candidate_value": median(self.candidate_values),
            "baseline_value": median(self.baseline_values),
            "ratio": ratio, "speedup": (1 / ratio) if ratio else math.nan,
            "target": self.target_text, "target_met": met,
            "reps": len(self.candidate_values), "detail": self.detail,
        }


@contextlib.asynccontextmanager
async def scratch(ms: msstore.Connection) -> AsyncIterator[Scratch]:
    """Buckets and agents made for one benchmark; all deleted on the way out."""
    s = Scratch(ms)
    try:
        yield s
    finally:
        await s.cleanup()


class Scratch:
    def __init__(self, ms: msstore.Connection) -> None:
        self.ms = ms
        self.buckets: list[str] = []
        self.agents: list[uuid.UUID] = []
        self.cleanups: list[Callable[[], Awaitable[Any]]] = []

    def bucket(self, what: str) -> str:
        name = bucket_name(what)
        self.buckets.append(name)
        return name

    async def kv(self, what: str, **options: Any) -> Any:
        from msstore.kv import ensure_bucket

        return await ensure_bucket(self.ms.js, self.bucket(what), **options)

    def agent(self) -> uuid.UUID:
        agent = uuid.uuid4()
        self.agents.append(agent)
        return agent

    async def cleanup(self) -> None:
        for fn in reversed(self.cleanups):
            with contextlib.suppress(Exception):
                await fn()
        for name in self.buckets:
            with contextlib.suppress(Exception):
                await self.ms.js.delete_key_value(name)
        if self.agents:
            with contextlib.suppress(Exception):
                await self.ms.pool.execute(
                    "DELETE FROM agents.state WHERE agent_id = ANY($1::uuid[])", self.agents)


async def gather_chunked(factories: Iterable[Callable[[], Awaitable[Any]]],
                         chunk: int = 256) -> list[Any]:
    """Run awaitables ``chunk`` at a time (setup only: never part of a timed section)."""
    out: list[Any] = []
    batch: list[Awaitable[Any]] = []
    for f in factories:
        batch.append(f())
        if len(batch) >= chunk:
            out += await asyncio.gather(*batch)
            batch = []
    if batch:
        out += await asyncio.gather(*batch)
    return out


def progress(total: int, desc: str, enabled: bool) -> Any:
    """A tqdm bar (to stderr) when ``enabled``, else a no-op with the same interface."""
    if enabled:
        from tqdm.auto import tqdm

        return tqdm(total=total, desc=desc, leave=False)
    return _NoBar()


class _NoBar:
    def update(self, n: int = 1) -> None:
        pass

    def close(self) -> None:
        pass


def show_progress() -> bool:
    return os.environ.get("MSSTORE_BENCH_PROGRESS", "1") != "0"
