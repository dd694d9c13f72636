"""TAGI on string rewrites from scratch: every phase of the study, resumable, results to JSONL.

  python experiments/studies/tagi/rewrite_study.py --workdir runs/tagi_rewrite [--phases base,teachers,tagi,eval,report]

Phases (base, teachers and tagi skipped when their output exists):
  base      CausalLM from scratch on "x|y|z=" rows (jaxlm/configs/tagi/rewrite_base.gin), exported by the
            objective's `export` -> WORK/base_hf
  teachers  LoRA teachers on "z=" rows: the first 100 training rules (for L_ins) and every held-out
            rule (the oracle (c), trained on the held-out rules' own instances)
  tagi      stage1 + stage2 (jaxlm/configs/tagi/rewrite_tagi.gin, plus --tagi-binding), then each
            ablation's stage 2
  eval      exact match on the held-out rules of (a) "z=" alone, (b) "x|y|z=", (c) the rule's LoRA
            teacher on "z=", (d) the hypernetwork's adapter for "x|y" on "z=" (and each ablation), by
            `jaxlm.eval.rewrite.RewriteEval`; one line per eval appended to WORK/results.jsonl
  report    the last eval line as a markdown table and WORK/plots/tagi_rewrite.png
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[3]
ABLATIONS = {  # name -> (extra gin file, stages)
    "full": (None, None),
    "no_pretraining": ("jaxlm/configs/tagi/ablations/no_pretraining.gin", ("stage2",)),
    "no_ce": ("jaxlm/configs/tagi/ablations/no_ce.gin", None),
    "no_kl": ("jaxlm/configs/tagi/ablations/no_kl.gin", None),
    "no_ins": ("jaxlm/configs/tagi/ablations/no_ins.gin", None),
}


def run_gin(files: list[str], bindings: list[str], workdir: Path) -> dict:
    from jaxlm.experiment.gin_config import run_gin_files

    t = time.time()
    out = run_gin_files(files, bindings, workdir)
    print(f"[{workdir.name}] {time.time() - t:.0f}s loss {out['loss']}", flush=True)
    return out


def phase_base(work: Path) -> None:
    import gin

    if (work / "base_hf" / "config.json").is_file():
        return
    out = run_gin(["jaxlm/configs/tagi/rewrite_base.gin"], [], work / "base")
    gin.get_bindings("train")["objective"].export(work / "base_hf", out["state"].params, out["frozen"])


def phase_teachers(work: Path) -> None:
    base = [f"TEACHER_BASE = '{work / 'base_hf'}'"]
    if not (work / "teachers_train" / "teachers" / "teachers.json").is_file():
        run_gin(["jaxlm/configs/tagi/rewrite_teachers.gin"], base, work / "teachers_train")
    if not (work / "teachers_heldout" / "teachers" / "teachers.json").is_file():
        run_gin(["jaxlm/configs/tagi/rewrite_teachers.gin"],
                base + ["tagi_data.part = 'test'", "tagi_data.max_tasks = None", "NUM_TEACHERS = 40",
                        "NUM_STEPS = 120"], work / "teachers_heldout")


def phase_tagi(work: Path, names: list[str], extra_bindings: tuple[str, ...] | list[str] = ()) -> None:
    common = [f"BASE = '{work / 'base_hf'}'", f"TEACHERS = '{work / 'teachers_train' / 'teachers'}'",
              *extra_bindings]
    for name in names:
        extra, stages = ABLATIONS[name]
        if (work / name / "stage2" / "hypernet" / "hypernet.json").is_file():
            continue
        files = ["jaxlm/configs/tagi/rewrite_tagi.gin"] + ([extra] if extra else [])
        bindings = list(common)
        if name != "full" and stages is None:  # reuse the full run's stage 1 (same pretraining)
            bindings += ["tagi_pipeline.stages = ('stage2',)",
                         f"stage2/TAGIDistillation.init_from = '{work / 'full' / 'stage1'}'"]
        run_gin(files, bindings, work / name)


def phase_eval(work: Path, names: list[str]) -> None:
    """(a)-(d) on the held-out rules with `jaxlm.eval.rewrite.RewriteEval` (one batched engine call per
    method, adapters gathered per row; teacher i / the hypernetwork's adapter for rule i), plus (b) on
    20 seen rules (is the base any good at all?). One line of em_<run> / nll_<run> to results.jsonl."""
    import gin

    from jaxlm.data.string_rewrite import RewriteConfig, rewrite_tasks
    from jaxlm.eval.rewrite import RewriteEval, evaluate_method
    from jaxlm.experiment.gin_config import parse_config
    from jaxlm.jsonl import ResultsLog

    parse_config(["jaxlm/configs/tagi/rewrite_model.gin"])
    config = gin.get_configurable(RewriteConfig)()
    common: dict[str, Any] = {"rules": config, "base": str(work / "base_hf"), "batch_size": 64, "buckets": None,
                              "max_new_tokens": 20}
    evaluator = RewriteEval(**common, methods=("no_instruction", "in_context", "teacher"),
                            teachers=str(work / "teachers_heldout" / "teachers"))
    heldout = evaluator.heldout_tasks()
    engine = evaluator.load_engine()
    runs = {"a_no_instruction": (evaluator, "no_instruction"), "b_in_context": (evaluator, "in_context"),
            "c_teacher": (evaluator, "teacher")}
    runs.update({f"d_hypernet_{n}": (RewriteEval(**common, methods=("hypernet",), hypernet=str(work / n)), "hypernet")
                 for n in names if (work / n / "stage2" / "hypernet").is_dir()})
    result: dict = {}
    for key, (ev, method) in runs.items():
        scores = ev.score(engine, heldout, method)
        result[f"em_{key}"], result[f"nll_{key}"] = round(scores.exact_match, 2), round(scores.target_nll, 4)
    result["heldout_rules"], result["examples"] = len(heldout), sum(len(t.instances) for t in heldout)
    seen = [dataclasses.replace(t, instances=t.instances[:8]) for t in rewrite_tasks(config, part="train")[:20]]
    result["train_rule_em_b_in_context"] = round(evaluate_method(engine, seen, "in_context").exact_match, 2)
    ResultsLog(work / "results.jsonl", ensure_ascii=True).append([result])
    print(json.dumps(result, indent=1))


LABELS = {"a_no_instruction": "(a) no instruction", "b_in_context": "(b) rule in context",
          "c_teacher": "(c) rule's LoRA teacher (oracle)", "d_hypernet_full": "(d) hypernet, full",
          "d_hypernet_no_pretraining": "(d) no pretraining", "d_hypernet_no_ce": "(d) no L_ce",
          "d_hypernet_no_kl": "(d) no L_kl", "d_hypernet_no_ins": "(d) no L_ins"}


def phase_report(work: Path) -> None:
    """The last eval line as a markdown table and a bar plot (WORK/plots/tagi_rewrite.png)."""
    from jaxlm.eval import plots
    from jaxlm.jsonl import ResultsLog

    last = ResultsLog(work / "results.jsonl").rows()[-1]
    keys = [k for k in LABELS if f"em_{k}" in last]
    print("| method | EM % | NLL / target token |\n|---|---|---|")
    for k in keys:
        print(f"| {LABELS[k]} | {last[f'em_{k}']:.2f} | {last[f'nll_{k}']:.3f} |")
    fig, _ = plots.hbars([LABELS[k] for k in keys], [last[f"em_{k}"] for k in keys],
                         xlabel=f"exact match on {last['heldout_rules']} unseen rules (%)",
                         title="TAGI on string rewrites: methods and ablations")
    plots.save(fig, work / "plots" / "tagi_rewrite.png")


def main() -> None:
    import os

    os.chdir(REPO)
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workdir", required=True)
    p.add_argument("--phases", default="base,teachers,tagi,eval")
    p.add_argument("--ablations", default=",".join(ABLATIONS))
    p.add_argument("--tagi-binding", action="append", default=[],
                   help="extra gin binding for every TAGI run, e.g. 'NUM_STEPS = 1200' (repeatable)")
    args = p.parse_args()
    work = Path(args.workdir).resolve()
    names = [n for n in args.ablations.split(",") if n]
    for phase in args.phases.split(","):
        t = time.time()
        if phase == "base":
            phase_base(work)
        elif phase == "teachers":
            phase_teachers(work)
        elif phase == "tagi":
            phase_tagi(work, names, args.tagi_binding)
        elif phase == "eval":
            phase_eval(work, names)
        elif phase == "report":
            phase_report(work)
        else:
            raise SystemExit(f"unknown phase {phase!r}")
        print(f"phase {phase}: {time.time() - t:.0f}s", flush=True)


if __name__ == "__main__":
    main()
