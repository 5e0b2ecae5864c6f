"""Pareto fronts: which runs no other run beats on every objective, and their plots.

Point ``a`` dominates ``b`` when ``a`` is at least as good as ``b`` on every objective and
strictly better on one ("good" is larger for ``max``, smaller for ``min``). The front is the
set of points that no point dominates; equal points are all on it.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

# One colour per experiment in overlaid plots (matplotlib's tab10, colour-blind friendly order).
COLOURS = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2",
           "#7f7f7f", "#bcbd22", "#17becf")
FRACTIONS = ("accuracy", "sparsity")
LABELS = {"accuracy": "test accuracy", "sparsity": "sparsity (zero conv/linear weights)",
          "nonzeros": "non-zero weights", "train_loss": "training loss",
          "test_loss": "test loss", "samples_per_second": "samples per second",
          "epoch_seconds": "seconds per epoch"}


def non_dominated(points: Sequence[Sequence[float]], modes: Sequence[str]) -> list[int]:
    """Indices (ascending) of the points on the Pareto front, for objectives with ``modes``
    (``"max"`` or ``"min"`` each). O(n^2 d), which is nothing for a search's few hundred runs."""
    signs = [1.0 if mode == "max" else -1.0 for mode in modes]
    scored = [[sign * float(value) for sign, value in zip(signs, point, strict=True)]
              for point in points]

    def dominates(a: list[float], b: list[float]) -> bool:
        pairs = list(zip(a, b, strict=True))
        return all(x >= y for x, y in pairs) and any(x > y for x, y in pairs)

    return [i for i, point in enumerate(scored)
            if not any(dominates(other, point) for other in scored)]


def staircase(xs: Sequence[float], ys: Sequence[float], modes: Sequence[str]):
    """The front's points ordered along x, for ``ax.step(..., where=...)``: the boundary of
    the region the front dominates. Returns ``(xs, ys, where)``."""
    order = sorted(range(len(xs)), key=lambda i: (xs[i], ys[i]))
    sx, sy = [xs[i] for i in order], [ys[i] for i in order]
    # The dominated region lies left of each point when x is maximized, so each point's level
    # holds over the interval to its left ("pre"); when x is minimized, to its right ("post").
    where = "pre" if modes[0] == "max" else "post"
    return sx, sy, where


def _colour_values(knobs: list[tuple[str, float] | None]) -> tuple[list[float], str]:
    """The colour of each point and the colour bar's label: log10(lambda) when lambda drives
    the runs, the target sparsity when a target does (the most common knob wins; points with
    another knob, or none, are grey)."""
    keys = [knob[0] for knob in knobs if knob is not None]
    if not keys:
        return [math.nan] * len(knobs), ""
    key = max(set(keys), key=keys.count)
    values = []
    for knob in knobs:
        if knob is None or knob[0] != key:
            values.append(math.nan)
        elif key == "lambda_":
            values.append(math.log10(knob[1]) if knob[1] > 0 else math.nan)
        else:
            values.append(knob[1])
    return values, (r"$\log_{10}\,\lambda$" if key == "lambda_" else "target sparsity")


def save_figure(fig, out: Path | str, *, force: bool = False) -> Path:
    """Write ``fig`` to ``out`` whole or not at all (:func:`~distrib_rda.atomic.atomic_output`),
    in the format its suffix names; an existing file is replaced only with ``force``."""
    from distrib_rda.atomic import atomic_output

    out = Path(out)
    with atomic_output(out, force=force) as tmp:
        fig.savefig(tmp, format=out.suffix.lstrip(".").lower() or "png")
    return out


def plot_search(points: list[dict[str, Any]], front: list[int], *, x: str, y: str,
                modes: tuple[str, str], title: str, out: Path | str) -> Path:
    """One search: every trial as a point coloured by the knob that drives its sparsity
    (log10 lambda, or the target sparsity), the front as a step line through its members
    (ringed). ``points`` are dicts with keys ``x``, ``y`` and ``knob`` (a ``(key, value)`` pair
    or ``None``); ``modes`` are the modes of ``x`` and ``y``."""
    from matplotlib import cm, colors
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7.5, 5.2), dpi=120, layout="constrained")
    ax = fig.add_subplot()
    xs = [p[x] for p in points]
    ys = [p[y] for p in points]
    logs, label = _colour_values([p.get("knob") for p in points])
    finite = [v for v in logs if math.isfinite(v)]
    if finite:
        lo, hi = min(finite), max(finite)
        if lo == hi:
            lo, hi = lo - 0.5, hi + 0.5
        norm = colors.Normalize(vmin=lo, vmax=hi)
        cmap = "viridis"
        idx = [i for i, v in enumerate(logs) if math.isfinite(v)]
        ax.scatter([xs[i] for i in idx], [ys[i] for i in idx], c=[logs[i] for i in idx],
                   cmap=cmap, norm=norm, s=55, edgecolors="black", linewidths=0.4, zorder=3,
                   label="trial")
        bar = fig.colorbar(cm.ScalarMappable(norm=norm, cmap=cmap), ax=ax)
        bar.set_label(label)
    zero = [i for i, v in enumerate(logs) if not math.isfinite(v)]
    if zero:
        ax.scatter([xs[i] for i in zero], [ys[i] for i in zero], c="lightgrey", s=55,
                   edgecolors="black", linewidths=0.4, zorder=3, label="dense, or another knob")
    if front:
        sx, sy, where = staircase([xs[i] for i in front], [ys[i] for i in front],
                                  (modes[0], modes[1]))
        ax.step(sx, sy, where=where, color="crimson", linewidth=1.6, zorder=2,
                label=f"Pareto front ({len(front)})")
        ax.scatter(sx, sy, s=140, facecolors="none", edgecolors="crimson", linewidths=1.4,
                   zorder=4)
    _percent_axes(ax, x, y)
    ax.set_xlabel(_label(x, modes[0]))
    ax.set_ylabel(_label(y, modes[1]))
    ax.set_title(title, fontsize="medium")
    ax.grid(True, alpha=0.3)
    ax.legend(loc="best", fontsize="small")
    return save_figure(fig, out, force=True)  # the search's own plot, redrawn on --resume


def plot_fronts(experiments: dict[str, list[dict[str, Any]]],
                fronts: dict[str, list[int]], *, out: Path | str, force: bool = False) -> Path:
    """Several experiments in one plot, sparsity (x) against accuracy (y): every run as a
    faint point, each front as a step line, one colour per experiment."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7.5, 5.2), dpi=120, layout="constrained")
    ax = fig.add_subplot()
    for n, (name, runs) in enumerate(experiments.items()):
        colour = COLOURS[n % len(COLOURS)]
        xs = [r["sparsity"] for r in runs]
        ys = [r["accuracy"] for r in runs]
        ax.scatter(xs, ys, s=22, color=colour, alpha=0.35, linewidths=0)
        front = fronts[name]
        sx, sy, where = staircase([xs[i] for i in front], [ys[i] for i in front],
                                  ("max", "max"))
        ax.step(sx, sy, where=where, color=colour, linewidth=1.6)
        ax.scatter(sx, sy, s=46, color=colour, edgecolors="black", linewidths=0.5,
                   label=f"{name} ({len(front)} of {len(runs)} runs on the front)")
    _percent_axes(ax, "sparsity", "accuracy")
    ax.set_xlabel(_label("sparsity", "max"))
    ax.set_ylabel(_label("accuracy", "max"))
    ax.set_title("Sparsity/accuracy Pareto fronts\n" + ", ".join(experiments),
                 fontsize="medium", wrap=True)
    ax.grid(True, alpha=0.3)
    ax.legend(loc="best", fontsize="small")
    return save_figure(fig, out, force=force)


def _percent_axes(ax, x: str, y: str) -> None:
    """Fractions (accuracy, sparsity) read as percentages."""
    from matplotlib.ticker import PercentFormatter

    if x in FRACTIONS:
        ax.xaxis.set_major_formatter(PercentFormatter(1.0))
    if y in FRACTIONS:
        ax.yaxis.set_major_formatter(PercentFormatter(1.0))


def _label(metric: str, mode: str) -> str:
    arrow = "higher is better" if mode == "max" else "lower is better"
    return f"{LABELS.get(metric, metric)} ({arrow})"
