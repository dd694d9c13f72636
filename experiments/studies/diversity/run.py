"""Study 1, instruction diversity (Zhang et al. 2024): exact match on unseen rewrite rules vs the number N
of distinct training rules, at a fixed total number of training examples and a fixed step budget.

  python experiments/studies/diversity/run.py --workdir runs/diversity \
      [--num_rules 100,300,1000,3000] [--frequency uniform,power_law] [--seeds 0,1] [--binding 'NUM_STEPS = 600']

Every (N, frequency) point trains experiments/studies/diversity/diversity.gin from scratch (through
`run_gin_files`, as `jaxlm train` does) with RewriteConfig.num_rules = N and examples_per_rule =
TOTAL_EXAMPLES // N, exports the model to WORK/<point>/hf (the objective's `export`), and scores it
with the rule in context (`jaxlm.eval.rewrite.evaluate_method(..., "in_context")`) on
  unseen  the held-out rules (never trained on), and
  seen    100 training rules spread evenly over frequency rank, on inputs z drawn afresh (another random
          stream: mostly new strings, though a short z can repeat a training row when N is small);
          "seen_head" / "seen_tail" split them at the median rank (differs only under power_law).
One JSON line per point is appended to WORK/results.jsonl as it finishes (`jaxlm.jsonl.ResultsLog`);
finished points are skipped (the gin file checkpoints only at the end, so an interrupted point retrains
from scratch). The plot (`jaxlm.eval.plots.lines`: unseen EM vs N, log x, uniform vs power law; seen EM
dashed) is redrawn from every line of results.jsonl after each point, and a markdown table goes to
WORK/table.md (`--plot_only` redraws both without training).
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[3]
GIN_FILE = "experiments/studies/diversity/diversity.gin"
SEEN_RULES = 100
SEEN_EXAMPLES = 5
SEEN_STREAM = 7  # a string stream the generator never uses for training (2) or held-out (3) rows
DEFAULT_PLOT = REPO / "docs" / "plots" / "diversity_unseen_em.png"


def point_name(num_rules: int, frequency: str, seed: int = 0) -> str:
    return f"{frequency}_n{num_rules}" + (f"_s{seed}" if seed else "")


def total_examples(bindings: list[str]) -> int:
    """The gin file's TOTAL_EXAMPLES (after the extra bindings): the example budget every point shares."""
    import gin

    from jaxlm.experiment.gin_config import parse_config

    parse_config([GIN_FILE], bindings)
    return int(gin.query_parameter("%TOTAL_EXAMPLES"))


def seen_tasks(config: Any) -> list[Any]:
    """SEEN_RULES training rules evenly spread over rank, each with SEEN_EXAMPLES fresh inputs drawn by the
    generator itself (same z distribution as training, another random stream)."""
    import numpy as np

    from jaxlm.data import string_rewrite as sr

    ranks = sorted({int(r) for r in np.linspace(0, config.num_rules - 1, min(SEEN_RULES, config.num_rules))})
    return sr.fresh_training_rule_tasks(config, ranks, SEEN_EXAMPLES, stream=SEEN_STREAM)


def evaluate(pretrained: Any, config: Any, workdir: Path) -> dict[str, Any]:
    from jaxlm.data.string_rewrite import rewrite_tasks
    from jaxlm.eval.engine import Engine
    from jaxlm.eval.rewrite import evaluate_method
    from jaxlm.files import write_atomically
    from jaxlm.jsonl import json_line

    engine = Engine(pretrained, batch_size=64)
    row: dict[str, Any] = {}
    for part, tasks in (("unseen", rewrite_tasks(config, part="test")), ("seen", seen_tasks(config))):
        scores = evaluate_method(engine, tasks, "in_context", max_new_tokens=16)
        row[f"{part}_em"] = round(scores.exact_match, 2)
        row[f"{part}_nll"] = round(scores.target_nll, 4)
        row[f"{part}_examples"] = len(scores.predictions)
        if part == "seen":
            head = [rank < config.num_rules // 2 for rank in _owners(tasks)]
            for half, want in (("head", True), ("tail", False)):
                hits = [p["correct"] for p, h in zip(scores.predictions, head) if h == want]
                row[f"seen_{half}_em"] = round(100.0 * sum(hits) / max(len(hits), 1), 2)
        write_atomically(workdir / f"predictions_{part}.jsonl",
                         lambda f, p=scores.predictions: f.write("".join(json_line(r, ensure_ascii=True) for r in p)))
    return row


def _owners(tasks: list[Any]) -> list[int]:
    """The rule rank of every evaluated instance, in `evaluate_method`'s row order."""
    return [t.metadata["rule_index"] for t in tasks for _ in t.instances]


def _final_loss(out: dict[str, Any], workdir: Path) -> float | None:
    """The run's last logged loss (a resumed, already finished run returns none of its own)."""
    from jaxlm.jsonl import read_jsonl

    if out.get("loss") is not None:
        return round(float(out["loss"]), 4)
    logged = [r["loss"] for r in read_jsonl(workdir / "metrics.jsonl") if "loss" in r] if (workdir / "metrics.jsonl").is_file() else []
    return round(float(logged[-1]), 4) if logged else None


def run_point(work: Path, num_rules: int, frequency: str, seed: int, extra: list[str], total: int) -> dict[str, Any]:
    """Train one point (model init and batch order from `seed`; the rules and their rows do not change with
    it) and score it: the results.jsonl row."""
    import gin

    from jaxlm.checkpoints.pretrained import Pretrained
    from jaxlm.data.string_rewrite import RewriteConfig
    from jaxlm.models.llama import LlamaConfig
    from jaxlm.experiment.gin_config import run_gin_files

    name = point_name(num_rules, frequency, seed)
    per_rule = total // num_rules
    bindings = [f"RewriteConfig.num_rules = {num_rules}", f"RewriteConfig.examples_per_rule = {per_rule}",
                f"RewriteConfig.frequency = '{frequency}'",
                *([f"CausalLM.init_seed = {seed}", f"rewrite_data.seed = {seed}"] if seed else []), *extra]
    start = time.perf_counter()
    out = run_gin_files([GIN_FILE], bindings, work / name)
    train_s = time.perf_counter() - start
    config = gin.get_configurable(RewriteConfig)()
    pretrained = Pretrained("llama", gin.get_configurable(LlamaConfig)(), out["state"].params, None, name)
    gin.get_bindings("train")["objective"].export(work / name / "hf", out["state"].params, out["frozen"])
    start = time.perf_counter()
    row = {"point": name, "num_rules": num_rules, "frequency": frequency, "seed": seed, "examples_per_rule": per_rule,
           "total_examples": per_rule * num_rules, "steps": int(gin.query_parameter("%NUM_STEPS")),
           "bindings": bindings, "final_loss": _final_loss(out, work / name),
           "heldout_rules": config.num_heldout_rules}
    row.update(evaluate(pretrained, config, work / name))
    row.update(train_seconds=round(train_s, 1), eval_seconds=round(time.perf_counter() - start, 1))
    return row


def plot(rows: list[dict[str, Any]], paths: list[Path]) -> None:
    """Unseen-rule EM vs N (log x), one line per frequency law through the mean over seeds (each seed a
    dot); seen-rule EM dashed."""
    from jaxlm.eval import plots

    series: dict[str, dict[int, list[float]]] = {}
    styles: dict[str, dict[str, Any]] = {}
    for frequency, color in (("uniform", "tab:blue"), ("power_law", "tab:red")):
        mine = [r for r in rows if r["frequency"] == frequency]
        for key, fmt, alpha, what in (("unseen_em", "o-", 1.0, "unseen rules"), ("seen_em", "s--", 0.5, "seen rules (fresh z)")):
            name = f"{frequency}: {what}"
            for r in mine:
                series.setdefault(name, {}).setdefault(r["num_rules"], []).append(r[key])
            styles[name] = {"fmt": fmt, "color": color, "alpha": alpha}
    budgets = sorted({(r["total_examples"], r["steps"]) for r in rows})
    fig, _ = plots.lines(series, styles=styles, figsize=(6, 4), logx=True, ylim=(-2, 102), grid=True,
                         xlabel="distinct training rules N (fixed total examples)",
                         ylabel="exact match, rule in context (%)", legend_kw={"fontsize": 8}, title_size=9,
                         title="Instruction diversity, string rewrites from scratch ("
                         + ", ".join(f"{t} examples, {s} steps" for t, s in budgets) + ")")
    plots.save(fig, *paths)


def table(rows: list[dict[str, Any]], work: Path) -> str:
    """The results as a markdown table; "rewritten" EM counts only instances whose z contains x (the other
    ~10% are no-ops a model that ignores the rule and copies z also gets right)."""
    from jaxlm.jsonl import read_jsonl

    def rewritten_em(point: str, part: str) -> str:
        path = work / point / f"predictions_{part}.jsonl"
        if not path.is_file():
            return "-"
        hits = [p["correct"] for p in read_jsonl(path) if p["x"] in p["input"]]
        return f"{100.0 * sum(hits) / max(len(hits), 1):.1f}"

    lines = [("| N rules | frequency | seed | examples/rule (mean) | unseen EM | unseen EM (rewritten) | unseen NLL | seen EM "
              "| seen EM (rewritten) | seen EM head / tail | train s |"),
             "|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in sorted(rows, key=lambda r: (r["frequency"] != "uniform", r["num_rules"], r.get("seed", 0))):
        lines.append(f"| {r['num_rules']} | {r['frequency']} | {r.get('seed', 0)} | {r['examples_per_rule']} | {r['unseen_em']:.1f} | "
                     f"{rewritten_em(r['point'], 'unseen')} | {r['unseen_nll']:.3f} | {r['seen_em']:.1f} | "
                     f"{rewritten_em(r['point'], 'seen')} | {r['seen_head_em']:.1f} / {r['seen_tail_em']:.1f} | "
                     f"{r['train_seconds']:.0f} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    from jaxlm.jsonl import ResultsLog
    from jaxlm.files import write_atomically

    os.chdir(REPO)
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workdir", required=True)
    p.add_argument("--num_rules", default="100,300,1000,3000,5000", help="comma-separated N values")
    p.add_argument("--frequency", default="uniform,power_law", help="comma-separated: uniform, power_law")
    p.add_argument("--seeds", default="0", help="comma-separated training seeds (init + batch order) per point")
    p.add_argument("--binding", action="append", default=[], help="extra gin binding for every point (repeatable)")
    p.add_argument("--plot", default=str(DEFAULT_PLOT), help="PNG path (also drawn to WORKDIR/diversity.png)")
    p.add_argument("--plot_only", action="store_true", help="redraw the plot from WORKDIR/results.jsonl")
    args = p.parse_args()
    work = Path(args.workdir).resolve()
    results = ResultsLog(work / "results.jsonl", key=lambda r: r["point"])
    paths = [Path(args.plot), work / "diversity.png"]
    if not args.plot_only:
        total = total_examples(args.binding)
        for frequency in args.frequency.split(","):
            for num_rules, seed in itertools.product((int(n) for n in args.num_rules.split(",")),
                                                     (int(s) for s in args.seeds.split(","))):
                if point_name(num_rules, frequency, seed) in results.done_keys():
                    continue
                row = run_point(work, num_rules, frequency, seed, args.binding, total)
                results.append([row])
                print(json.dumps(row), flush=True)
                plot(results.rows(), paths)
    rows = results.rows()
    plot(rows, paths)
    text = table(rows, work)
    write_atomically(work / "table.md", lambda f: f.write(text))
    print(text)


if __name__ == "__main__":
    main()
