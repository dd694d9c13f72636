"""TAGI on string rewrites, 3 seeds: the demo's pipeline per seed, every ablation, honest baselines.

  python experiments/studies/tagi/rewrite_study.py --workdir runs/tagi_rewrite [--seeds 0,1,2]
      [--phases demo,teachers,ablations,eval,report] [--ablations no_fusion,no_pretraining,...]

Seed s draws its own rules (`RewriteConfig.seed = s`) and trains everything from scratch in WORK/seed<s>/:
  demo       the demo's stages rules, base, tagi, rewrite (jaxlm/configs/demo/*.gin, `jaxlm.experiment.demo`):
             the byte-level base, the L_ins teachers (their fit on own rows and on new inputs is a
             results row), the full hypernetwork (stage 1 + stage 2, decoder-only fusion on) and the
             no instruction / rule in context / ICIL-style / hypernetwork rows on the 40 unseen rules
  teachers   per-rule LoRA teachers of the 40 unseen rules trained on NEW inputs of those rules
             (`rewrite_tasks(part="test_fresh")`, disjoint from the evaluated ones): the per-rule oracle,
             scored on inputs it was not trained on
  ablations  one TAGI run per ablation (jaxlm/configs/tagi/ablations/<name>.gin over the demo's tagi.gin),
             each with its own stage 1 unless the ablation drops it, reusing the seed's L_ins teachers
  eval       the oracle and every ablation on the same unseen rules (`RewriteEval`), one row each
Every row goes to WORK/results.jsonl (`ResultsLog`: resumable; a killed study reruns what is missing).
  report     mean and spread over seeds per method: WORK/table.md and WORK/plots/tagi_rewrite_seeds.png
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[3]
ABLATION_DIR = "jaxlm/configs/tagi/ablations"
ABLATIONS = ("no_fusion", "no_pretraining", "no_ce", "no_kl", "no_ins")
LABELS = {
    "no_instruction": "(a) no instruction",
    "in_context": "(b) rule in context",
    "icil": "ICIL-style demos + rule",
    "teacher": "(c) per-rule LoRA teacher, new inputs",
    "hypernet": "(d) hypernetwork + fusion (full)",
    "no_fusion": "(d) no fusion",
    "no_pretraining": "(d) no stage 1",
    "no_ce": "(d) no L_ce",
    "no_kl": "(d) no L_kl",
    "no_ins": "(d) no L_ins",
}


def seed_dir(work: Path, seed: int) -> Path:
    return work / f"seed{seed}"


def demo_run(work: Path, seed: int) -> Any:
    from jaxlm.experiment.demo import DemoRun

    return DemoRun(seed_dir(work, seed), bindings=[f"RewriteConfig.seed = {seed}"])


def phase_demo(work: Path, seed: int) -> None:
    demo_run(work, seed).run(stages=("rules", "base", "tagi", "rewrite"))


def run_tagi(work: Path, seed: int, name: str, files: list[str], bindings: list[str]) -> None:
    """One TAGI pipeline over the seed's base in WORK/seed<s>/<name> (skipped when its hypernet exists)."""
    from jaxlm.experiment.gin_config import parse_config
    from jaxlm.experiment.runner import run_parsed_config

    run = seed_dir(work, seed) / name
    if (run / "stage2" / "hypernet" / "hypernet.json").is_file() or (run / "teachers" / "teachers" / "teachers.json").is_file():
        return
    t = time.time()
    parse_config(["jaxlm/configs/demo/tagi.gin", *files],
                 [f"RewriteConfig.seed = {seed}", f"BASE = '{seed_dir(work, seed) / 'base_hf'}'", *bindings])
    run_parsed_config(run)
    print(f"[seed{seed}/{name}] {time.time() - t:.0f}s", flush=True)


def phase_teachers(work: Path, seed: int) -> None:
    run_tagi(work, seed, "heldout_teachers", [], [
        "tagi_pipeline.stages = ('teachers',)", "teachers/tagi_data.part = 'test_fresh'", "TEACHER_RULES = 40"])


def phase_ablations(work: Path, seed: int, names: list[str]) -> None:
    teachers = seed_dir(work, seed) / "tagi" / "teachers" / "teachers"
    for name in names:
        stages = "('stage2',)" if name == "no_pretraining" else "('stage1', 'stage2')"
        run_tagi(work, seed, name, [f"{ABLATION_DIR}/{name}.gin"], [
            f"tagi_pipeline.stages = {stages}", f"stage2/TAGIDistillation.teachers_dir = '{teachers}'",
            f"stage2/tagi_data.teachers_dir = '{teachers}'"])


def phase_eval(work: Path, seed: int, names: list[str]) -> None:
    """Rows {"study": "rewrite", "seed", "method", "exact_match", "target_nll"} for the oracle and the ablations."""
    import gin

    from jaxlm.data.string_rewrite import RewriteConfig
    from jaxlm.eval.rewrite import RewriteEval
    from jaxlm.jsonl import ResultsLog

    log = ResultsLog(work / "results.jsonl", key=lambda r: (r.get("seed"), r.get("method")))
    run = demo_run(work, seed)
    run.parse("eval_rewrite.gin", [f"BASE = '{seed_dir(work, seed) / 'base_hf'}'"])
    rules = gin.get_configurable(RewriteConfig)()
    rows = [{"study": "rewrite", "seed": seed, "method": r["method"], "exact_match": r["exact_match"],
             "target_nll": r["target_nll"]} for r in run.done("rewrite")]
    fit = run.done("teachers")
    if fit:
        rows.append({"study": "teacher_fit", "seed": seed, "method": "l_ins_teachers", **{
            k: v for k, v in fit[-1].items() if k not in ("study", "method")}})
    base = str(seed_dir(work, seed) / "base_hf")
    todo = {"teacher": {"methods": ("teacher",), "teachers": str(seed_dir(work, seed) / "heldout_teachers" / "teachers" / "teachers")}}
    todo.update({n: {"methods": ("hypernet",), "hypernet": str(seed_dir(work, seed) / n)} for n in names
                 if (seed_dir(work, seed) / n / "stage2" / "hypernet").is_dir()})
    done = log.latest()
    engine = None
    for method, kw in todo.items():
        if (seed, method) in done:
            continue
        evaluator = RewriteEval(rules=rules, base=base, batch_size=64, **kw)
        engine = engine or evaluator.load_engine()
        log.append(log.pending(rows))  # the demo's rows and each finished one: a killed eval redoes only the rest
        rows = []
        scores = evaluator.score(engine, evaluator.heldout_tasks(), kw["methods"][0])
        rows.append({"study": "rewrite", "seed": seed, "method": method, "exact_match": round(scores.exact_match, 2),
                     "target_nll": round(scores.target_nll, 4)})
    log.append(log.pending(rows))


def phase_report(work: Path) -> str:
    """Mean +- sample std over seeds of every method's exact match; table.md and a bar plot with error bars."""
    from jaxlm.eval import plots
    from jaxlm.files import write_atomically
    from jaxlm.jsonl import ResultsLog

    rows = ResultsLog(work / "results.jsonl").rows()
    by: dict[str, dict[int, dict]] = {}
    for r in rows:
        if r.get("study") == "rewrite":
            by.setdefault(r["method"], {})[r["seed"]] = r
    seeds = sorted({s for m in by.values() for s in m})
    methods = [m for m in LABELS if m in by]
    lines = [f"# TAGI string-rewrite study ({len(seeds)} seeds: {seeds}; 40 unseen rules x 10 each)", "",
             "| method | EM % mean | std | per seed | NLL / token mean |", "|---|---|---|---|---|"]
    means, errors = {}, {}
    for m in methods:
        em = [by[m][s]["exact_match"] for s in seeds if s in by[m]]
        nll = [by[m][s]["target_nll"] for s in seeds if s in by[m]]
        means[m], errors[m] = statistics.mean(em), statistics.stdev(em) if len(em) > 1 else 0.0
        lines.append(f"| {LABELS[m]} | {means[m]:.2f} | {errors[m]:.2f} | {', '.join(f'{v:.2f}' for v in em)} | "
                     f"{statistics.mean(nll):.3f} |")
    fits = [r for r in rows if r.get("study") == "teacher_fit"]
    if fits:
        lines += ["", "L_ins teachers (LoRA per training rule): " + "; ".join(
            f"seed {r['seed']}: {r['own_rows_em']:.1f}% on own rows, {r['fresh_inputs_em']:.1f}% on new inputs "
            f"({r['fresh_inputs_in_context_em']:.1f}% in context)" for r in fits)]
    text = "\n".join(lines) + "\n"
    write_atomically(work / "table.md", lambda f: f.write(text))
    if methods:
        values = {(m, "EM"): means[m] for m in methods}
        fig, _ = plots.grouped_bars(values, methods, ["EM"], labels=LABELS, errors={(m, "EM"): errors[m] for m in methods},
                                    ylabel="exact match on unseen rules (%)", ylim=(0, 100),
                                    title=f"TAGI on string rewrites, mean and std over {len(seeds)} seeds",
                                    legend_kw={"fontsize": 7, "ncol": 2})
        plots.save(fig, work / "plots" / "tagi_rewrite_seeds.png")
    return text


def main() -> None:
    import os

    os.chdir(REPO)
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workdir", required=True)
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--phases", default="demo,teachers,ablations,eval,report")
    p.add_argument("--ablations", default=",".join(ABLATIONS))
    args = p.parse_args()
    work = Path(args.workdir).resolve()
    names = [n for n in args.ablations.split(",") if n]
    unknown = [n for n in names if n not in ABLATIONS]
    if unknown:
        raise SystemExit(f"--ablations: {unknown} unknown; expected some of {ABLATIONS}")
    phases = args.phases.split(",")
    for seed in [int(s) for s in args.seeds.split(",")]:  # seed by seed: a finished seed is a finished row set
        for phase in phases:
            t = time.time()
            if phase == "demo":
                phase_demo(work, seed)
            elif phase == "teachers":
                phase_teachers(work, seed)
            elif phase == "ablations":
                phase_ablations(work, seed, names)
            elif phase == "eval":
                phase_eval(work, seed, names)
            elif phase != "report":
                raise SystemExit(f"unknown phase {phase!r}")
            print(f"seed {seed} phase {phase}: {time.time() - t:.0f}s", flush=True)
    if "report" in phases:
        print(phase_report(work))


if __name__ == "__main__":
    main()
