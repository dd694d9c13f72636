"""Study 2 report: ROUGE-L per category, zero-shot vs ICIL as mean +- std over the ICIL seeds.

The sweep's own summary.md averages seeds together; this table keeps them apart (each seed is one
fixed ICIL prompt). Run after the sweep:
    jaxlm eval --gin_file=experiments/studies/icil/icil.gin --workdir W
    python experiments/studies/icil/run.py --workdir W [--plot docs/plots/icil_rougeL_by_category.png]
Writes W/icil_table.md and the plot (`jaxlm.eval.plots.grouped_bars`, dpi 100).
"""

from __future__ import annotations

import argparse
from collections import defaultdict
from pathlib import Path

import numpy as np

from jaxlm.eval import plots
from jaxlm.files import write_atomically
from jaxlm.jsonl import ResultsLog

ALL = "all tasks"


def per_seed_group_means(rows: list[dict], method: str, metric: str) -> dict[str, dict[int, float]]:
    """{group: {seed: mean over the group's tasks of the metric}}, plus ALL (mean over every task)."""
    acc: dict[str, dict[int, list[float]]] = defaultdict(lambda: defaultdict(list))
    for r in rows:
        if r["method"] == method:
            for g in (r["group"], ALL):
                acc[g][r["seed"]].append(float(r["metrics"][metric]))
    return {g: {s: float(np.mean(v)) for s, v in seeds.items()} for g, seeds in acc.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workdir", required=True)
    ap.add_argument("--metric", default="rougeL")
    ap.add_argument("--plot", default="docs/plots/icil_rougeL_by_category.png")
    args = ap.parse_args()
    workdir = Path(args.workdir)
    rows = list(ResultsLog(workdir / "results.jsonl", key=lambda r: r["cell"]).latest().values())
    # Only tasks with both methods: a workdir reused with a smaller task list keeps the old cells.
    icil_tasks = {r["task"] for r in rows if r["method"] == "icil"}
    rows = [r for r in rows if r["task"] in icil_tasks]
    zero = per_seed_group_means(rows, "def", args.metric)
    icil = per_seed_group_means(rows, "icil", args.metric)
    ntasks = defaultdict(set)
    for r in rows:
        ntasks[r["group"]].add(r["task"])
        ntasks[ALL].add(r["task"])
    groups = sorted(g for g in zero if g != ALL) + [ALL]
    k_used = sorted({r["info"]["k_used"] for r in rows if r["method"] == "icil"})
    seeds = sorted({s for g in icil.values() for s in g})
    header = (f"| category | tasks | zero-shot `def` | ICIL (K = {', '.join(map(str, k_used))}), mean +- std over "
              f"{len(seeds)} seeds | ICIL - zero-shot |")
    lines = [header, "|---|---|---|---|---|"]
    stats = {}
    for g in groups:
        z = float(np.mean(list(zero[g].values())))  # `def` is unseeded: one cell (the first sweep seed)
        vals = np.array([icil[g][s] for s in seeds])
        stats[g] = (z, vals.mean(), vals.std(ddof=1) if len(vals) > 1 else 0.0)
        lines.append(f"| {g} | {len(ntasks[g])} | {z:.1f} | {vals.mean():.1f} +- {stats[g][2]:.1f} | "
                     f"{vals.mean() - z:+.1f} |")
    lines.append("")
    lines.append("Per seed (all tasks): " + ", ".join(f"seed {s}: {icil[ALL][s]:.1f}" for s in seeds))
    text = "\n".join(lines) + "\n"
    write_atomically(workdir / "icil_table.md", lambda f: f.write(text))
    print(text)

    fig, _ = plots.grouped_bars(
        {**{("def", g): stats[g][0] for g in groups}, **{("icil", g): stats[g][1] for g in groups}},
        ["def", "icil"], groups, errors={("icil", g): stats[g][2] for g in groups},
        labels={"def": "zero-shot (def)",
                "icil": f"ICIL (K = {k_used[0] if len(k_used) == 1 else k_used}), mean +- std over {len(seeds)} seeds"},
        group_labels=[f"{g}\n({len(ntasks[g])})" for g in groups], figsize=(10, 4.2), ylabel=f"{args.metric} (x100)",
        title="SmolLM2-135M-Instruct: ROUGE-L per category (Super-NI test tasks on disk + NI v1), 8 instances/task",
        title_size=9, tick_kw={"rotation": 30, "ha": "right", "fontsize": 7}, legend_kw={"fontsize": 8})
    plots.save(fig, args.plot)


if __name__ == "__main__":
    main()
