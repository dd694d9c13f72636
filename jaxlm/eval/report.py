"""Sweep reports from `results.jsonl`: summary tables (markdown + CSV) per method x task group, and
PNG bar charts comparing methods (drawn by `jaxlm.eval.plots`).

Rows: (model, method). A method with several sources (cross-task, pseudo-labels) gives three rows:
`name` (the majority vote over sources, its prediction), `name:mean` (each source's metric averaged)
and `name:best` (per task, the best single source: an oracle choice, as the cross-task papers report).
Each value is a mean over the group's tasks (and seeds) of a per-task metric (x100); `score` is
accuracy for multiple-choice tasks, else the Super-NI category's metric (`jaxlm.eval.sweep.cell_metrics`).
"""

from __future__ import annotations

import csv
import io
from collections import defaultdict
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from jaxlm.files import write_atomically

ALL = "all"
TABLE_METRICS = ("score", "rougeL", "exact_match", "accuracy")


def expand_rows(rows: Iterable[dict[str, Any]]) -> list[dict[str, Any]]:
    """One (model, method variant, group, task, seed, metrics) row per result line and variant."""
    out = []
    for r in rows:
        base = {k: r[k] for k in ("model", "group", "task", "seed")}
        out.append({**base, "method": r["method"], "metrics": r["metrics"]})
        by_source = r.get("by_source")
        if by_source:
            per_source = list(by_source.values())
            keys = [k for k in per_source[0] if all(isinstance(m.get(k), (int, float)) for m in per_source)]
            out.append({**base, "method": f"{r['method']}:mean",
                        "metrics": {k: sum(m[k] for m in per_source) / len(per_source) for k in keys}})
            out.append({**base, "method": f"{r['method']}:best",
                        "metrics": max(per_source, key=lambda m: m.get("score", 0.0))})
    return out


def summarize(rows: Iterable[dict[str, Any]]) -> list[dict[str, Any]]:
    """Long form: {"model", "method", "group", "metric", "value", "num_tasks"}, groups plus `all`."""
    acc: dict[tuple, list[float]] = defaultdict(list)
    tasks: dict[tuple, set] = defaultdict(set)
    order: dict[tuple, int] = {}
    for r in expand_rows(rows):
        for group in (r["group"], ALL):
            for metric, value in r["metrics"].items():
                if metric not in TABLE_METRICS or value is None:
                    continue
                key = (r["model"], r["method"], group, metric)
                order.setdefault(key, len(order))
                acc[key].append(float(value))
                tasks[key].add(r["task"])
    return [{"model": k[0], "method": k[1], "group": k[2], "metric": k[3],
             "value": round(sum(acc[k]) / len(acc[k]), 2), "num_tasks": len(tasks[k])}
            for k in sorted(acc, key=order.__getitem__)]


def groups_of(summary: Sequence[dict]) -> list[str]:
    groups = sorted({s["group"] for s in summary if s["group"] != ALL})
    return groups + [ALL]


def markdown_table(summary: Sequence[dict[str, Any]], metric: str) -> str:
    """Rows model/method, columns the task groups then `all`; each cell `value (tasks)`."""
    rows = [s for s in summary if s["metric"] == metric]
    if not rows:
        return ""
    groups = [g for g in groups_of(summary) if any(s["group"] == g for s in rows)]
    lines = ["| model | method | " + " | ".join(groups) + " |", "|---|---|" + "---|" * len(groups)]
    seen: list[tuple[str, str]] = []
    for s in rows:
        if (s["model"], s["method"]) not in seen:
            seen.append((s["model"], s["method"]))
    cells = {(s["model"], s["method"], s["group"]): s for s in rows}
    for model, method in seen:
        vals = [cells.get((model, method, g)) for g in groups]
        lines.append(f"| {model} | {method} | " + " | ".join(
            "" if v is None else f"{v['value']:.2f} ({v['num_tasks']})" for v in vals) + " |")
    return "\n".join(lines)


def write_reports(workdir: str | Path, rows: Sequence[dict[str, Any]]) -> dict[str, Path]:
    """summary.md, summary.csv and plots/<model>_<metric>.png under `workdir`; returns their paths."""
    workdir = Path(workdir)
    summary = summarize(rows)
    text = ["# Evaluation summary", "",
            (f"{len(rows)} cell(s). Values are means over tasks (number of tasks in parentheses), x100; `score` = "
             "accuracy (multiple choice), else the Super-NI category's metric (EM or ROUGE-L; ROUGE-L elsewhere). "
             "`:mean`/`:best` rows average or pick the best of the single sources; the plain row is their "
             "majority vote."), ""]
    text += method_notes(rows)
    for metric in TABLE_METRICS:
        table = markdown_table(summary, metric)
        if table:
            text += [f"## {metric}", "", table, ""]
    paths = {"md": write_atomically(workdir / "summary.md", lambda f: f.write("\n".join(text))),
             "csv": write_atomically(workdir / "summary.csv", lambda f: f.write(_csv(summary)))}
    for model in dict.fromkeys(s["model"] for s in summary):
        for metric in ("score", "rougeL", "exact_match"):
            path = plot_methods(summary, model, metric, workdir / "plots" / f"{_safe(model)}_{metric}.png")
            if path is not None:
                paths[f"{model}_{metric}"] = path
    return paths


def method_notes(rows: Sequence[dict[str, Any]]) -> list[str]:
    """Markdown lines for settings a method chose from the data (ICIL's K, demos taken from the pool)."""
    notes: dict[str, set] = defaultdict(set)
    for r in rows:
        info = r.get("info") or {}
        if "k_used" in info:
            notes[r["method"]].add(f"K = {info['k_used']} demonstrations (asked {info['k_asked']}: "
                                   f"{', '.join(info['demo_tasks'])})")
        if info.get("demos_from_pool"):
            notes[r["method"]].add("tasks without positive examples: demos from labelled non-evaluated instances")
    lines = [f"- `{method}`: {note}" for method, items in notes.items() for note in sorted(items)]
    return lines + [""] if lines else []


def _csv(summary: Sequence[dict[str, Any]]) -> str:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=["model", "method", "group", "metric", "value", "num_tasks"])
    writer.writeheader()
    writer.writerows(summary)
    return buf.getvalue()


def _safe(name: str) -> str:
    return "".join(c if c.isalnum() or c in "._-" else "-" for c in name)


def plot_methods(summary: Sequence[dict[str, Any]], model: str, metric: str, path: Path) -> Path | None:
    """Grouped bars (`jaxlm.eval.plots.grouped_bars`): one group of bars per task group, one bar per
    method; a method without a value in a group has no bar there (a gap, not 0)."""
    from jaxlm.eval import plots

    rows = [s for s in summary if s["model"] == model and s["metric"] == metric]
    if not rows:
        return None
    groups = [g for g in groups_of(summary) if any(s["group"] == g for s in rows)]
    methods = list(dict.fromkeys(s["method"] for s in rows))
    fig, _ = plots.grouped_bars(
        {(s["method"], s["group"]): s["value"] for s in rows}, methods, groups,
        figsize=(min(14.0, max(6.0, 0.25 * len(groups) * len(methods) + 2.0)), 4.5),
        ylabel=f"{metric} (x100)", title=f"{model}: {metric} by task group",
        tick_kw={"rotation": 30, "ha": "right", "fontsize": 8}, legend_kw={"fontsize": 7, "ncol": 2})
    return plots.save(fig, path)
