"""Notebook 05: the lifecycle's state diagram, drawn from the code's own transition table."""

from __future__ import annotations

from collections.abc import Mapping
from enum import Enum

from matplotlib.axes import Axes
from matplotlib.patches import Circle

R = 0.62  # state circle radius


def draw(ax: Axes, transitions: Mapping[Enum, frozenset[Enum]],
         positions: Mapping[Enum, tuple[float, float]],
         why: Mapping[tuple[Enum, Enum], str]) -> int:
    """One circle per state, one arrow per edge of ``transitions``; returns the edges drawn.

    An edge that also exists the other way is curved, so both arrows stay visible; each arrow
    carries its reason from ``why`` (a missing reason fails loudly: the table and the picture
    must not drift apart).
    """
    for state, (x, y) in positions.items():
        ax.add_patch(Circle((x, y), R, fc="#e8f0fe", ec="tab:blue", lw=2))
        ax.text(x, y, state.name, ha="center", va="center", fontsize=9, weight="bold")
    edges = 0
    for a, targets in transitions.items():
        for b in targets:
            (x0, y0), (x1, y1) = positions[a], positions[b]
            d = ((x1 - x0) ** 2 + (y1 - y0) ** 2) ** 0.5
            ux, uy = (x1 - x0) / d, (y1 - y0) / d
            both_ways = a in transitions[b]
            ax.annotate("", xy=(x1 - ux * R, y1 - uy * R), xytext=(x0 + ux * R, y0 + uy * R),
                        arrowprops=dict(arrowstyle="-|>", lw=1.5, color="tab:gray",
                                        connectionstyle=f"arc3,rad={0.3 if both_ways else 0}"))
            off = 0.5 if both_ways else 0.0
            ax.text((x0 + x1) / 2 + uy * off, (y0 + y1) / 2 - ux * off, why[(a, b)], fontsize=8,
                    ha="center", va="center", color="tab:red")
            edges += 1
    xs = [x for x, _ in positions.values()]
    ys = [y for _, y in positions.values()]
    ax.set(xlim=(min(xs) - 1, max(xs) + 1), ylim=(min(ys) - 0.8, max(ys) + 0.8), aspect="equal")
    ax.axis("off")
    return edges
