"""Result plots (matplotlib, Agg backend; no pyplot state): every PNG of the sweep reports, the demo
and the study drivers is drawn here.

  grouped_bars  a series x group grid (methods x tasks): one group of bars per x position, one bar per
                series, optionally error bars and a `mean` group
  hbars         one horizontal bar per method, first on top
  lines         a metric vs a swept value, one line per condition (each point the mean of its values,
                each value a dot when there are several, e.g. seeds)
  scatter       (x, y) points, one colour per group
  save          tight layout, then an atomic PNG write (dpi 100) to each path

Each drawing function returns (figure, axes) so a caller can adjust the axes before `save`. A missing
cell (a (series, group) pair with no value, or a None value) is a gap: its bar has height NaN and is not
drawn, and a `mean` skips it; it is never drawn as 0.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from jaxlm.files import write_atomically

DPI = 100


def figure(figsize: tuple[float, float]) -> tuple[Any, Any]:
    """A new (Figure, Axes) on an Agg canvas, outside pyplot (nothing global to close or leak)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=figsize)
    FigureCanvasAgg(fig)
    return fig, fig.add_subplot()


def _value(v: Any) -> float:
    return float("nan") if v is None else float(v)


def _nanmean(values: Sequence[float]) -> float:
    known = [v for v in values if not math.isnan(v)]
    return float(np.mean(known)) if known else float("nan")


def _labels(ax: Any, *, xlabel: str | None = None, ylabel: str | None = None, title: str | None = None,
            title_size: float | None = None, xlim: tuple | None = None, ylim: tuple | None = None) -> None:
    if xlabel is not None:
        ax.set_xlabel(xlabel)
    if ylabel is not None:
        ax.set_ylabel(ylabel)
    if title is not None:
        ax.set_title(title, **({"fontsize": title_size} if title_size else {}))
    if xlim is not None:
        ax.set_xlim(*xlim)
    if ylim is not None:
        ax.set_ylim(*ylim)


def grouped_bars(values: Mapping[tuple[str, str], float | None], series: Sequence[str], groups: Sequence[str], *,
                 labels: Mapping[str, str] | None = None, group_labels: Sequence[str] | None = None,
                 errors: Mapping[tuple[str, str], float] | None = None, mean: str | None = None,
                 figsize: tuple[float, float] = (8.0, 4.0), xlabel: str | None = None, ylabel: str | None = None,
                 title: str | None = None, title_size: float | None = None, ylim: tuple | None = None,
                 tick_kw: Mapping[str, Any] | None = None, legend_kw: Mapping[str, Any] | None = None) -> tuple[Any, Any]:
    """Bars of the grid `values[(series, group)]`: `groups` along x, one bar per `series` in each group
    (0.8 of the slot shared), legend `labels[series]` (default: the series name).

    A (series, group) pair missing from `values`, or None, is NaN: no bar. `errors[(series, group)]`:
    error bars (caps 3) on the series that have any. `mean`: one more group of that name after the
    others, each series' mean over the groups it has. `group_labels`: the x tick labels (default: the
    groups, then `mean`); `tick_kw` / `legend_kw`: keyword arguments of the tick labels and the legend.
    """
    labels, errors = labels or {}, errors or {}
    fig, ax = figure(figsize)
    x = np.arange(len(groups) + (mean is not None))
    width = 0.8 / max(len(series), 1)
    for i, s in enumerate(series):
        heights = [_value(values.get((s, g))) for g in groups]
        if mean is not None:
            heights.append(_nanmean(heights))
        extra: dict[str, Any] = {}
        if any((s, g) in errors for g in groups):
            extra = {"yerr": [_value(errors.get((s, g))) for g in groups] + ([float("nan")] if mean is not None else []),
                     "capsize": 3}
        ax.bar(x + (i - (len(series) - 1) / 2) * width, heights, width, label=labels.get(s, s), **extra)
    ax.set_xticks(x)
    ticks = list(group_labels) if group_labels is not None else [*groups, *([mean] if mean is not None else [])]
    ax.set_xticklabels(ticks, **dict(tick_kw or {}))
    _labels(ax, xlabel=xlabel, ylabel=ylabel, title=title, title_size=title_size, ylim=ylim)
    if series:
        ax.legend(**dict(legend_kw or {}))
    return fig, ax


def hbars(labels: Sequence[str], values: Sequence[float | None], *, figsize: tuple[float, float] = (7.0, 3.8),
          color: str = "tab:blue", xlabel: str | None = None, title: str | None = None,
          xlim: tuple | None = None) -> tuple[Any, Any]:
    """One horizontal bar per label, the first on top; a None value is NaN (no bar)."""
    fig, ax = figure(figsize)
    ax.barh(list(labels)[::-1], [_value(v) for v in values][::-1], color=color)
    _labels(ax, xlabel=xlabel, title=title, xlim=xlim)
    return fig, ax


def lines(series: Mapping[str, Mapping[float, float | Sequence[float]]], *,
          styles: Mapping[str, Mapping[str, Any]] | None = None, figsize: tuple[float, float] = (6.0, 4.0),
          xlabel: str | None = None, ylabel: str | None = None, title: str | None = None,
          title_size: float | None = None, logx: bool = False, logy: bool = False, ylim: tuple | None = None,
          grid: bool = False, legend_kw: Mapping[str, Any] | None = None) -> tuple[Any, Any]:
    """A metric vs a swept value, one line per condition: `series[condition][x]` is a value or a list
    of values (seeds), the line runs through their means at the sorted x, and each value of a list is
    also a dot. `styles[condition]`: {"fmt": "o-", "color", "alpha"} (defaults: "-", the colour cycle,
    1). A condition lacking an x has no point there (its line joins its neighbours)."""
    styles = styles or {}
    fig, ax = figure(figsize)
    for name, points in series.items():
        if not points:
            continue
        style = styles.get(name, {})
        color, alpha = style.get("color"), style.get("alpha", 1.0)
        xs = sorted(points)
        ys = [_nanmean([_value(v) for v in points[x]]) if isinstance(points[x], (list, tuple)) else _value(points[x])
              for x in xs]  # a missing value (None) is left out of the mean; all missing: a gap
        (line,) = ax.plot(xs, ys, style.get("fmt", "-"), color=color, alpha=alpha, label=name)
        dots = [(x, float(v)) for x in xs if isinstance(points[x], (list, tuple)) for v in points[x] if v is not None]
        if dots:
            ax.scatter(*zip(*dots), s=10, color=line.get_color(), alpha=alpha * 0.6)
    if logx:
        ax.set_xscale("log")
    if logy:
        ax.set_yscale("log")
    _labels(ax, xlabel=xlabel, ylabel=ylabel, title=title, title_size=title_size, ylim=ylim)
    if grid:
        ax.grid(alpha=0.3)
    if any(series.values()):
        ax.legend(**dict(legend_kw or {}))
    return fig, ax


def scatter(groups: Mapping[str, Sequence[tuple[float, float]]], *, figsize: tuple[float, float] = (5.5, 4.2),
            hline: float | None = None, xlabel: str | None = None, ylabel: str | None = None,
            title: str | None = None, title_size: float | None = None,
            legend_kw: Mapping[str, Any] | None = None) -> tuple[Any, Any]:
    """(x, y) points, one colour (and legend entry) per group with points; `hline`: a grey line at y."""
    fig, ax = figure(figsize)
    for name, points in groups.items():
        if points:
            ax.scatter(*zip(*points), s=18, label=name)
    if hline is not None:
        ax.axhline(hline, color="grey", lw=0.7)
    _labels(ax, xlabel=xlabel, ylabel=ylabel, title=title, title_size=title_size)
    if any(groups.values()):
        ax.legend(**dict(legend_kw or {}))
    return fig, ax


def save(fig: Any, *paths: str | Path) -> Path:
    """Tight layout, then the figure as a PNG (dpi 100) at each path, atomically; returns the first."""
    fig.tight_layout()
    for path in paths:
        write_atomically(path, lambda f: fig.savefig(f, format="png", dpi=DPI), binary=True)
    return Path(paths[0])
