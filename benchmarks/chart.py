"""The benchmark's one-page chart: requests per second by variant, drawn by ``run.py``.

Kept apart from the harness so the harness runs without matplotlib (``--quick`` in CI
draws nothing); a full run writes ``docs/img/benchmarks.png`` from the numbers it printed.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Bar:
    """One variant: its median req/s over the rounds and the rounds' range."""

    number: int
    name: str
    rps: float
    low: float
    high: float
    kind: str  # "credit_guard", "limit" (hand-written comparator) or "none" (no credit logic)


COLOURS = {"credit_guard": "#2f6fb0", "limit": "#9a9a9a", "none": "#d9d9d9"}


def draw(bars: list[Bar], path: Path, *, title: str, subtitle: str) -> None:
    """A horizontal bar per variant (median, with the rounds' range as an error bar)."""
    import matplotlib

    matplotlib.use("Agg")  # no display: a file only
    import matplotlib.pyplot as plt
    from matplotlib.patches import Rectangle

    ordered = sorted(bars, key=lambda bar: bar.number)
    labels = [f"{bar.number}. {bar.name}" for bar in ordered]
    values = [bar.rps for bar in ordered]
    errors = [[bar.rps - bar.low for bar in ordered], [bar.high - bar.rps for bar in ordered]]
    fig, ax = plt.subplots(figsize=(11, 0.42 * len(ordered) + 1.6), dpi=110)
    ax.barh(labels, values, xerr=errors, color=[COLOURS[bar.kind] for bar in ordered], capsize=3)
    ax.invert_yaxis()
    ax.set_xlabel("requests per second (median of rounds; bars: the rounds' range)")
    ax.set_title(f"{title}\n{subtitle}", fontsize=10, loc="left")
    for y, bar in enumerate(ordered):
        ax.text(bar.high, y, f"  {bar.rps:,.0f}", va="center", fontsize=8)
    handles = [Rectangle((0, 0), 1, 1, color=colour) for colour in COLOURS.values()]
    ax.legend(handles, ["credit_guard", "hand-written comparator", "no credit logic"], loc="lower right", fontsize=8)
    ax.grid(axis="x", alpha=0.3)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
