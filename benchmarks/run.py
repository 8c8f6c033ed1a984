"""The runner: ``msstore bench [--scale ci|full]`` = ``benchmarks.run.main(argv)``.

Runs the comparisons in ``BENCHMARKS`` against the servers ``msstore.connect()``
resolves (embedded by default, or ``MSSTORE_DATABASE_URL`` / ``MSSTORE_NATS_URL``), prints one
table, and writes ``summary.csv``, one ``<name>.csv`` of raw samples per comparison, one PNG
chart per comparison, ``summary.png`` and ``machine.json`` into ``out``.

Every figure is a ratio measured side by side in the same run (see :mod:`benchmarks.common`).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import platform
import subprocess
import sys
import time
import traceback
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

import msstore

from . import (
    charts,
    cluster,
    flush,
    hydrate,
    knowledge,
    l1,
    langgraph,
    message_log,
    queue,
    read_path,
    write,
    write_behind,
)
from .common import COLUMNS, Comparison, scale_params, show_progress

Bench = Callable[[msstore.Connection, dict[str, int]], Awaitable[tuple[list[Comparison],
                                                                       pd.DataFrame]]]

#: id -> (name, module); the order they run in
BENCHMARKS: dict[int, tuple[str, Any]] = {
    1: ("flush", flush), 2: ("write", write), 5: ("write_behind", write_behind),
    3: ("l1", l1), 4: ("hydrate", hydrate), 6: ("read_path", read_path), 7: ("queue", queue),
    8: ("knowledge", knowledge), 9: ("message_log", message_log), 10: ("langgraph", langgraph),
    11: ("cluster", cluster),
}
DEFAULT_OUT = Path("benchmarks/results")


@dataclass
class SuiteResult:
    """What :func:`run_suite` returns: the summary table, raw samples and the machine."""

    summary: pd.DataFrame
    samples: dict[str, pd.DataFrame] = field(default_factory=dict)
    machine: dict[str, Any] = field(default_factory=dict)
    seconds: dict[str, float] = field(default_factory=dict)
    #: comparisons that raised, by name (their rows are missing from ``summary``)
    errors: dict[str, str] = field(default_factory=dict)


def _free_h() -> str:
    try:
        out = subprocess.run(["free", "-h"], capture_output=True, text=True, timeout=5).stdout
        return out.splitlines()[1].split()[1]
    except Exception:
        return "?"


async def describe_machine(ms: msstore.Connection, scale: str) -> dict[str, Any]:
    versions = await ms.server_versions()
    return {
        "cores": os.cpu_count(), "memory": _free_h(), "python": platform.python_version(),
        "platform": platform.platform(), "postgres": versions["postgres"],
        "nats": versions["nats"],
        "lane": "external" if os.environ.get("MSSTORE_DATABASE_URL") else "embedded",
        "scale": scale, "load_avg_at_start": os.getloadavg()[0],
    }


async def run_suite(scale: str = "ci", out: Path | None = DEFAULT_OUT, *,
                    only: Sequence[int] | None = None, progress: bool | None = None,
                    ms: msstore.Connection | None = None) -> SuiteResult:
    """Run the comparisons (``only``: a subset of ids) and, if ``out`` is set, save results."""
    params = scale_params(scale)
    bar = show_progress() if progress is None else progress
    ids = [i for i in BENCHMARKS if only is None or i in only]
    result = SuiteResult(pd.DataFrame(columns=list(COLUMNS)))
    own = ms is None
    conn = ms if ms is not None else await msstore.connect()
    try:
        result.machine = await describe_machine(conn, scale)
        rows: list[dict[str, Any]] = []
        for i in ids:
            name, module = BENCHMARKS[i]
            t0 = time.perf_counter()
            try:
                comparisons, frame = await module.run(conn, params, bar=bar)
            except Exception as e:  # one broken comparison must not lose the others
                result.errors[name] = f"{type(e).__name__}: {e}"
                traceback.print_exc()
                continue
            result.seconds[name] = time.perf_counter() - t0
            result.samples[name] = frame
            rows += [c.row() for c in comparisons]
        summary = pd.DataFrame(rows, columns=list(COLUMNS))
        result.summary = summary.sort_values("id", kind="stable").reset_index(drop=True)
    finally:
        if own:
            await conn.close()
    if out is not None:
        save(result, out)
    return result


def save(result: SuiteResult, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    out.mkdir(parents=True, exist_ok=True)
    result.summary.to_csv(out / "summary.csv", index=False)
    for name, frame in result.samples.items():
        frame.to_csv(out / f"{name}.csv", index=False)
        charts.CHARTS[name](frame).savefig(out / f"{name}.png", dpi=110)
    if len(result.summary):
        charts.summary(result.summary).savefig(out / "summary.png", dpi=110)
    (out / "machine.json").write_text(json.dumps(
        {**result.machine, "seconds": result.seconds, "errors": result.errors}, indent=2,
        default=str))


def _fmt(v: float, unit: str) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "–"
    if unit == "s":
        return f"{v * 1000:,.1f} ms"
    if unit in ("µs", "ns"):
        return f"{v:,.1f} {unit}"
    if unit == "share":
        return f"{v:.3f}"
    return f"{v:,.0f} {unit}"


def _ratio(ratio: float, unit: str) -> str:
    """candidate/baseline in words: "11.1× faster", "1.32× slower", "25.9× fewer"."""
    if ratio is None or math.isnan(ratio) or ratio <= 0:
        return "–"
    if unit == "share":  # recall, miss rates: the plain ratio reads best
        return f"{ratio:,.3f}×"
    better, worse = ("fewer", "more") if unit in ("rows", "tx") else ("faster", "slower")
    return f"{1 / ratio:,.2f}× {better}" if ratio <= 1 else f"{ratio:,.2f}× {worse}"


def table(summary: pd.DataFrame) -> pd.DataFrame:
    """The summary as display strings: one row per comparison."""
    rows = []
    for r in summary.itertuples():
        target = r.target if isinstance(r.target, str) else ""  # NaN when read from CSV
        met = {True: "reached", False: "not reached", "True": "reached",
               "False": "not reached"}.get(r.target_met, "") if target else ""
        rows.append({
            "#": r.id, "candidate": r.candidate, "baseline": r.baseline, "metric": r.metric,
            "candidate value": _fmt(r.candidate_value, r.unit),
            "baseline value": _fmt(r.baseline_value, r.unit),
            "ratio": _ratio(r.ratio, r.unit),
            "goal": f"{target} ({met})" if target else "",
        })
    return pd.DataFrame(rows)


def markdown(result: SuiteResult) -> str:
    """The summary table as Markdown (for the README), machine line first."""
    m = result.machine
    head = (f"{m.get('cores')} cores, {m.get('memory')} RAM, PostgreSQL {m.get('postgres')}, "
            f"NATS {m.get('nats')}, Python {m.get('python')} ({m.get('lane')} servers, scale "
            f"{m.get('scale')}, load average {m.get('load_avg_at_start', 0):.1f} at start)")
    t = table(result.summary)
    lines = ["| " + " | ".join(t.columns) + " |", "|" + "---|" * len(t.columns)]
    lines += ["| " + " | ".join(str(v) for v in row) + " |" for row in t.itertuples(index=False)]
    return head + "\n\n" + "\n".join(lines)


async def run(scale: str = "ci", out: Path = DEFAULT_OUT) -> pd.DataFrame:
    """Run every comparison at ``scale``, print the table, save CSV + PNG into ``out``."""
    result = await run_suite(scale, out)
    print(markdown(result))
    for name, error in result.errors.items():
        print(f"FAILED {name}: {error}")
    print(f"\nresults: {out}/ (summary.csv, <name>.csv, <name>.png, machine.json)")
    return result.summary


def main(argv: Sequence[str] | None = None) -> int:
    """``msstore bench [--scale ci|full] [--out DIR] [--only 1,3]``; returns an exit code."""
    p = argparse.ArgumentParser(prog="msstore bench",
                                description="side-by-side benchmarks of msstore's hot paths")
    p.add_argument("--scale", choices=["ci", "full"],
                   default=os.environ.get("MSSTORE_SCALE", "ci"))
    p.add_argument("--out", type=Path, default=DEFAULT_OUT)
    p.add_argument("--only", default="", help="comma-separated ids (1-11); default: all")
    args = p.parse_args(argv)
    only = [int(x) for x in args.only.split(",") if x.strip()] or None
    result = asyncio.run(run_suite(args.scale, args.out, only=only))
    print(markdown(result))
    print(f"\nresults: {args.out}/ (summary.csv, <name>.csv, <name>.png, machine.json)",
          file=sys.stderr)
    for name, error in result.errors.items():
        print(f"FAILED {name}: {error}", file=sys.stderr)
    return 1 if result.errors else 0


if __name__ == "__main__":
    raise SystemExit(main())
