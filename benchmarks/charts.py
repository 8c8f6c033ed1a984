"""One matplotlib figure per comparison (Agg-safe: no pyplot state is needed to save them)."""

from __future__ import annotations

import io
import math
from typing import Any

import pandas as pd
from matplotlib.figure import Figure


def _bars(ax: Any, labels: list[str], values: list[float], unit: str, *, log: bool = False,
          colors: list[str] | None = None) -> None:
    bars = ax.bar(labels, values, color=colors or "tab:blue")
    if log:
        ax.set_yscale("log")
    ax.set_ylabel(unit)
    for bar, v in zip(bars, values, strict=True):
        if not math.isnan(v):
            text = f"{v:,.0f}" if abs(v) >= 100 else f"{v:.3g}"
            ax.annotate(text, (bar.get_x() + bar.get_width() / 2, bar.get_height()),
                        ha="center", va="bottom", fontsize=8)
    ax.tick_params(axis="x", labelrotation=15, labelsize=8)


def flush(frame: pd.DataFrame) -> Figure:
    fig = Figure(figsize=(7, 3.6))
    ax = fig.add_subplot()
    names = ["seed", "dirty-set", "stream", "floor"]
    labels = [f"{n}\n({int(frame[f'{n}_statements'].max()):,} stmts)" for n in names]
    _bars(ax, labels, [frame[f"{n}_s"].median() for n in names], "seconds (median)", log=True,
          colors=["tab:red", "tab:blue", "tab:cyan", "tab:gray"])
    ax.set_title(f"#1 flush of {frame.attrs.get('keys', 0):,} dirty keys", fontsize=10)
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
    ax.set_title("#3 L1 hit vs in-process caches", fontsize=10)
    fig.tight_layout()
    return fig


def hydrate(frame: pd.DataFrame) -> Figure:
    fig = Figure(figsize=(5, 3.4))
    ax = fig.add_subplot()
    _bars(ax, ["seed loop", "hydrate_agent", "reference\n(acks on one inbox)"],
          [frame["seed_s"].median(), frame["msstore_s"].median(),
           frame["proposed_s"].median()], "seconds (median)",
          colors=["tab:red", "tab:blue", "tab:gray"])
    ax.set_title(f"#4 hydrate a {frame.attrs.get('keys', 0):,}-key agent", fontsize=10)
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
    a1.set_title("#5 PostgreSQL rows written", fontsize=10)
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


def summary(table: pd.DataFrame) -> Figure:
    """Speed-up (baseline / candidate, log scale) of every comparison; targets as ticks."""
    fig = Figure(figsize=(12, 0.32 * len(table) + 1.2))
    ax = fig.add_subplot()
    labels = [f"#{r.id} {r.metric}: {r.candidate} vs {r.baseline}" for r in table.itertuples()]
    colors = ["tab:green" if r.target_met is True else "tab:red" if r.target_met is False
              else "tab:gray" for r in table.itertuples()]
    ax.barh(labels, table["speedup"], color=colors)
    ax.axvline(1.0, color="black", linewidth=0.8)
    ax.set_xscale("log")
    ax.invert_yaxis()
    ax.set_xlabel("baseline / candidate (> 1: candidate better); green: target met, red: missed")
    ax.tick_params(axis="y", labelsize=6.5)
    fig.tight_layout()
    return fig


def png(fig: Figure, dpi: int = 100) -> bytes:
    """``fig`` as PNG bytes (for ``IPython.display.Image``: no pyplot, no backend state)."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi)
    return buf.getvalue()


CHARTS = {"flush": flush, "write": write, "l1": l1, "hydrate": hydrate,
          "write_behind": write_behind, "read_path": read_path}
