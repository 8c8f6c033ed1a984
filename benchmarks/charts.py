"""One matplotlib figure per comparison (Agg-safe: no pyplot state is needed to save them).

Rules every chart keeps: its title says what it shows (with the run's own figures); bars only
on a linear axis that starts at zero; values spanning decades are dots on a log axis (a log
bar's length means nothing); ratios are anchored at 1×, so a 0.3× bar points the other way
from a 3× bar.
"""

from __future__ import annotations

import io
import math
from typing import Any

import pandas as pd
from matplotlib.figure import Figure

from .common import percentile


def _ratio(frame: pd.DataFrame, candidate: str, baseline: str) -> float:
    """Median of the per-repetition ratios: the figure the benchmark's table reports."""
    return float((frame[candidate] / frame[baseline]).median())


def _label(v: float) -> str:
    return f"{v:,.0f}" if abs(v) >= 100 else f"{v:.3g}"


def _bars(ax: Any, labels: list[str], values: list[float], unit: str, *, log: bool = False,
          colors: list[str] | None = None) -> None:
    """Bars from zero on a linear axis, or (``log=True``) dots on a log axis: no log bars."""
    colors = colors or ["tab:blue"] * len(values)
    if log:
        ax.set_yscale("log")
        ax.scatter(labels, values, c=colors, s=60, zorder=3)
        ax.grid(axis="y", which="major", alpha=0.3)
        finite = [v for v in values if not math.isnan(v) and v > 0]
        if finite:
            ax.set_ylim(min(finite) / 3, max(finite) * 3)
        points = list(zip(range(len(values)), values, strict=True))
    else:
        bars = ax.bar(labels, values, color=colors)
        ax.set_ylim(0, max([v for v in values if not math.isnan(v)] or [1]) * 1.2)
        points = [(bar.get_x() + bar.get_width() / 2, bar.get_height()) for bar in bars]
    ax.set_ylabel(unit)
    for (x, y), v in zip(points, values, strict=True):
        if not math.isnan(v):
            ax.annotate(_label(v), (x, y), textcoords="offset points", xytext=(0, 5),
                        ha="center", va="bottom", fontsize=8)
    ax.tick_params(axis="x", labelrotation=15, labelsize=8)


def flush(frame: pd.DataFrame) -> Figure:
    fig = Figure(figsize=(7, 3.6))
    ax = fig.add_subplot()
    names = ["seed", "dirty-set", "stream", "floor"]
    labels = [f"{n}\n({int(frame[f'{n}_statements'].max()):,} stmts)" for n in names]
    _bars(ax, labels, [frame[f"{n}_s"].median() for n in names], "seconds (median)", log=True,
          colors=["tab:red", "tab:blue", "tab:cyan", "tab:gray"])
    ax.set_title(f"#1 flush of {frame.attrs.get('keys', 0):,} dirty keys: dirty-set "
                 f"{_ratio(frame, 'dirty-set_s', 'floor_s'):.2f}×, stream "
                 f"{_ratio(frame, 'stream_s', 'floor_s'):.2f}× the floor, seed "
                 f"{_ratio(frame, 'seed_s', 'floor_s'):.0f}×", fontsize=10)
    fig.tight_layout()
    return fig


def write(frame: pd.DataFrame) -> Figure:
    fig = Figure(figsize=(8, 3.4))
    a1, a2 = fig.subplots(1, 2)
    labels = ["write_state p50", "kv.put p50", "write_state p99", "kv.put p99"]
    vals = [frame[c].median() for c in ("cand_p50_us", "base_p50_us", "cand_p99_us",
                                        "base_p99_us")]
    _bars(a1, labels, vals, "µs per write", colors=["tab:blue", "tab:gray"] * 2)
    a1.set_title("#2 sequential latency", fontsize=10)
    _bars(a2, ["write_state", "raw kv.put"],
          [frame["cand_writes_per_s"].median(), frame["base_writes_per_s"].median()],
          "writes / s", colors=["tab:blue", "tab:gray"])
    a2.set_title("#2 concurrent throughput", fontsize=10)
    fig.tight_layout()
    return fig


def l1(frame: pd.DataFrame) -> Figure:
    fig = Figure(figsize=(7, 3.4))
    ax = fig.add_subplot()
    names = {"msstore": "msstore L1", "dict": "await dict", "cashews-backend": "cashews\nbackend",
             "cachetools": "cachetools\nTTLCache", "cashews": "cashews\nCache"}
    _bars(ax, list(names.values()), [frame[f"{k}_ns"].median() for k in names],
          "ns per awaited hit (CPU)", log=True,
          colors=["tab:blue", "tab:gray", "tab:orange", "tab:green", "tab:red"])
    ax.set_title(f"#3 L1 hit vs in-process caches: msstore "
                 f"{_ratio(frame, 'msstore_ns', 'dict_ns'):.2f}× an awaited dict",
                 fontsize=10)
    fig.tight_layout()
    return fig


def hydrate(frame: pd.DataFrame) -> Figure:
    fig = Figure(figsize=(5, 3.4))
    ax = fig.add_subplot()
    _bars(ax, ["seed loop", "hydrate_agent", "reference\n(acks on one inbox)"],
          [frame["seed_s"].median(), frame["msstore_s"].median(),
           frame["proposed_s"].median()], "seconds (median)",
          colors=["tab:red", "tab:blue", "tab:gray"])
    ax.set_title(f"#4 hydrate a {frame.attrs.get('keys', 0):,}-key agent: hydrate_agent "
                 f"{1 / _ratio(frame, 'msstore_s', 'seed_s'):.1f}× faster than the "
                 "seed loop", fontsize=10)
    fig.tight_layout()
    return fig


def write_behind(frame: pd.DataFrame) -> Figure:
    fig = Figure(figsize=(9, 3.4))
    a1, a2 = fig.subplots(1, 2)
    g = frame.groupby("variant", sort=False).median(numeric_only=True)
    labels = [v.replace("write-behind ", "behind\n") for v in g.index]
    colors = ["tab:red" if v == "write-through" else "tab:blue" for v in g.index]
    _bars(a1, labels, list(g["rows_per_10k"]), "SQL rows per 10,000 writes", log=True,
          colors=colors)
    a1.set_title(f"#5 PostgreSQL rows written: write-through "
                 f"{g['rows_per_10k'].max() / g['rows_per_10k'].min():.0f}× the fewest",
                 fontsize=10)
    _bars(a2, labels, list(g["p50"]), "write p50 (µs)", colors=colors)
    a2.set_title("#5 write latency", fontsize=10)
    fig.tight_layout()
    return fig


def read_path(frame: pd.DataFrame) -> Figure:
    fig = Figure(figsize=(8, 3.4))
    a1, a2 = fig.subplots(1, 2)
    labels = ["tiered cache", "KV only", "PostgreSQL only"]
    colors = ["tab:blue", "tab:orange", "tab:red"]
    for ax, m in ((a1, "mean"), (a2, "p99")):
        _bars(ax, labels, [frame[f"{k}_{m}_us"].median() for k in ("tiered", "kv", "pg")],
              f"read {m} (µs)", colors=colors)
        ax.set_title(f"#6 read {m} under Zipf", fontsize=10)
    fig.tight_layout()
    return fig


def message_log(frame: pd.DataFrame) -> Figure:
    fig = Figure(figsize=(8, 3.4))
    a1, a2 = fig.subplots(1, 2)
    _bars(a1, ["keyset (after=)", "OFFSET"],
          [frame["keyset_us"].median(), frame["offset_us"].median()], "µs per page (median)",
          colors=["tab:blue", "tab:red"])
    a1.set_title(f"#9 last page of {frame.attrs.get('messages', 0):,}: OFFSET "
                 f"{_ratio(frame, 'offset_us', 'keyset_us'):.1f}× keyset", fontsize=10)
    _bars(a2, ["MessageLog.append", "IDENTITY insert"],
          [frame["MessageLog_us"].median(), frame["IDENTITY_us"].median()],
          "µs per append (median)", colors=["tab:blue", "tab:gray"])
    a2.set_title(f"#9 ordered appends cost "
                 f"{_ratio(frame, 'MessageLog_us', 'IDENTITY_us'):.2f}× a plain insert",
                 fontsize=10)
    fig.tight_layout()
    return fig


def summary(table: pd.DataFrame) -> Figure:
    """Every comparison as a bar from 1× (log axis): right = the candidate is better.

    Colour says only the direction (better or worse than its baseline); a goal, where the
    comparison has one, is written next to its bar, so a large win that falls short of an
    ambitious goal still reads as a win.
    """
    fig = Figure(figsize=(12, 0.34 * len(table) + 1.4))
    ax = fig.add_subplot()
    labels = [f"#{r.id} {r.metric}: {r.candidate} vs {r.baseline}" for r in table.itertuples()]
    speedups = [float(v) for v in table["speedup"]]
    colors = ["tab:blue" if v >= 1 else "tab:orange" for v in speedups]
    ax.barh(labels, [v - 1 for v in speedups], left=1, color=colors)
    ax.axvline(1.0, color="black", linewidth=0.8)
    ax.set_xscale("log")
    lo, hi = min([*speedups, 1.0]), max([*speedups, 1.0])
    ax.set_xlim(lo / 2, hi * 8)
    for y, (r, v) in enumerate(zip(table.itertuples(), speedups, strict=True)):
        goal = r.target if isinstance(r.target, str) else ""
        note = f"{v:.2f}×" if v >= 1 else f"1/{1 / v:.2f}"
        if goal:
            reached = {True: "reached", False: "not reached"}.get(r.target_met, "")
            note += f"   goal {goal}: {reached}"
        ax.annotate(note, (max(v, 1.0), y), textcoords="offset points", xytext=(4, 0),
                    va="center", fontsize=6.5)
    ax.invert_yaxis()
    better = sum(v > 1 for v in speedups)
    ax.set_title(f"{len(speedups)} comparisons: the candidate is better in {better} (blue), "
                 f"worse in {len(speedups) - better} (orange)", fontsize=10)
    ax.set_xlabel("baseline / candidate (log scale; bars start at 1×)")
    ax.tick_params(axis="y", labelsize=6.5)
    fig.tight_layout()
    return fig


def png(fig: Figure, dpi: int = 100) -> bytes:
    """``fig`` as PNG bytes (for ``IPython.display.Image``: no pyplot, no backend state)."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi)
    return buf.getvalue()


def queue(frame: pd.DataFrame) -> Figure:
    fig = Figure(figsize=(8, 3.4))
    a1, a2 = fig.subplots(1, 2)
    labels, colors = ["msstore TaskQueue", "pgqueuer"], ["tab:blue", "tab:gray"]
    _bars(a1, labels, [frame[f"{k}_tasks_per_s"].median() for k in ("msstore", "pgqueuer")],
          "tasks per second (median)", colors=colors)
    a1.set_title(f"#7 claim + complete, {frame.attrs.get('workers', 0)} workers: "
                 f"{_ratio(frame, 'msstore_tasks_per_s', 'pgqueuer_tasks_per_s'):.2f}× "
                 "pgqueuer's rate", fontsize=10)
    _bars(a2, labels, [frame[f"{k}_p50_us"].median() / 1e3 for k in ("msstore", "pgqueuer")],
          "enqueue → start p50 (ms)", colors=colors)
    a2.set_title(f"#7 enqueue → start p50: "
                 f"{_ratio(frame, 'msstore_p50_us', 'pgqueuer_p50_us'):.2f}× pgqueuer's",
                 fontsize=10)
    fig.tight_layout()
    return fig


def knowledge(frame: pd.DataFrame) -> Figure:
    """Recall per query (HNSW vs exact) and the latency of both, p50 and p99."""
    fig = Figure(figsize=(9, 3.4))
    a1, a2 = fig.subplots(1, 2)
    a1.hist(frame["recall"], bins=[x / 10 for x in range(12)], color="tab:blue")
    a1.set_title(f"#8 recall@10 per query: mean {frame['recall'].mean():.3f} "
                 f"({len(frame)} queries)", fontsize=10)
    a1.set_xlabel("recall@10 of HNSW against exact")
    a1.set_ylabel("queries")
    values = [percentile(list(frame[c]), q) for c in ("hnsw_us", "exact_us") for q in (50, 99)]
    _bars(a2, ["HNSW p50", "HNSW p99", "exact p50", "exact p99"], [v / 1000 for v in values],
          "search latency (ms)", colors=["tab:blue", "tab:blue", "tab:orange", "tab:orange"])
    a2.set_title(f"#8 search latency: HNSW p50 {values[0] / 1000:.2f} ms, "
                 f"exact {values[2] / 1000:.2f} ms", fontsize=10)
    fig.tight_layout()
    return fig


def cluster(frame: pd.DataFrame) -> Figure:
    fig = Figure(figsize=(10, 3.4))
    a1, a2, a3 = fig.subplots(1, 3)
    names = ["r1", "r3", "r1_always", "r3_always"]
    labels = ["R1", "R3", "R1 + always", "R3 + always"]
    colors = ["tab:gray", "tab:blue", "tab:olive", "tab:purple"]
    _bars(a1, [f"{lb} p50" for lb in labels] + [f"{lb} p99" for lb in labels],
          [frame[f"{n}_p50_us"].median() for n in names]
          + [frame[f"{n}_p99_us"].median() for n in names], "µs per write_state",
          log=True, colors=colors * 2)
    a1.set_title(f"#11 write p50: R3 {_ratio(frame, 'r3_p50_us', 'r1_p50_us'):.2f}× R1; always "
                 f"{_ratio(frame, 'r1_always_p50_us', 'r1_p50_us'):.2f}× (R1), "
                 f"{_ratio(frame, 'r3_always_p50_us', 'r3_p50_us'):.2f}× (R3)", fontsize=9)
    _bars(a2, labels, [frame[f"{n}_flush_s"].median() for n in names], "seconds (median)",
          colors=colors)
    a2.set_title(f"#11 flush: R3 {_ratio(frame, 'r3_flush_s', 'r1_flush_s'):.2f}× R1",
                 fontsize=9)
    _bars(a3, ["1 process", "2 processes", "4 processes"],
          [frame[f"drain_{k}_s"].median() for k in (1, 2, 4)], "seconds (median)",
          colors=["tab:gray", "tab:blue", "tab:cyan"])
    a3.set_title(f"#11 drain via flushers: 2 = {_ratio(frame, 'drain_2_s', 'drain_1_s'):.2f}×,"
                 f" 4 = {_ratio(frame, 'drain_4_s', 'drain_1_s'):.2f}× one", fontsize=9)
    fig.tight_layout()
    return fig


def langgraph(frame: pd.DataFrame) -> Figure:
    """Overhead per superstep over InMemorySaver, steps/s with 16 threads, PostgreSQL rows."""
    fig = Figure(figsize=(11, 3.8))
    a1, a2, a3 = fig.subplots(1, 3)
    labels, colors = ["MsstoreSaver", "AsyncPostgresSaver"], ["tab:blue", "tab:red"]
    _bars(a1, labels, [frame[f"{k}_overhead_s"].median() * 1e6 for k in ("msstore", "postgres")],
          "µs per superstep over InMemorySaver", colors=colors)
    a1.set_title(f"#10 overhead ({frame.attrs.get('steps', 0)} steps, 1 thread):\n"
                 f"MsstoreSaver {_ratio(frame, 'msstore_overhead_s', 'postgres_overhead_s'):.2f}"
                 "× the PG saver's", fontsize=9)
    _bars(a2, [*labels, "InMemorySaver"],
          [frame[f"{k}_steps_per_s"].median() for k in ("msstore", "postgres", "memory")],
          "supersteps / s (median)", colors=[*colors, "tab:gray"])
    a2.set_title(f"#10 {frame.attrs.get('threads', 16)} threads at once:\nMsstoreSaver "
                 f"{_ratio(frame, 'msstore_steps_per_s', 'postgres_steps_per_s'):.2f}× the "
                 "PG saver's steps/s", fontsize=9)
    _bars(a3, labels, [frame[f"{k}_rows_per_1k"].median() for k in ("msstore", "postgres")],
          "rows per 1,000 supersteps", colors=colors)
    a3.set_title(f"#10 PostgreSQL rows written:\nMsstoreSaver "
                 f"{_ratio(frame, 'msstore_rows_per_1k', 'postgres_rows_per_1k'):.2f}× the PG "
                 "saver's", fontsize=9)
    fig.tight_layout()
    return fig


CHARTS = {"cluster": cluster, "flush": flush, "write": write, "l1": l1, "hydrate": hydrate,
          "write_behind": write_behind, "read_path": read_path, "queue": queue,
          "knowledge": knowledge, "message_log": message_log, "langgraph": langgraph}
