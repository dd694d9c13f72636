"""INSTA study (issue 7, study 4): which Super-NI training tasks to LoRA-tune SmolLM2 on for a target?

  python experiments/studies/insta/run.py --workdir runs/insta

Conditions, one gin file each in this folder (all include lora.gin: same model, steps and batch):
  topk_minilm   the TOP_K training tasks whose definitions are most similar to the target's
                (all-MiniLM-L6-v2 cosine, `jaxlm.data.selection.select_top_k`), one run per target
  topk_aligned  the same with the aligned encoder (MiniLM tuned on the training tasks' instruction
                groups: `jaxlm.train.embedder_tuning.align_encoder`, as `jaxlm align-encoder`, written
                once to WORK/aligned_encoder)
  random_k      TOP_K training tasks drawn with SELECTION_SEED (one run shared by every target)
  all_tasks     every training task on disk (one run shared by every target)
and the untuned model. Every target is a Super-NI test task; its first --num_instances instances are
answered greedily from the `def` prompt the runs train on and scored by ROUGE-L.

Resumable: selections go to WORK/selections.json, each run to WORK/train/<condition>[/<target>]/ (its
adapter, a PEFT dir, to .../adapter), each evaluation is one line of WORK/results.jsonl
(`jaxlm.jsonl.ResultsLog`); rerunning skips what exists. WORK/summary.md holds the table and --plot
the PNG (`jaxlm.eval.plots.grouped_bars`; a missing (target, condition) result is a gap).
A condition's gin file defines its selection by macros (INSTA_SELECTION: top_k | random | all,
INSTA_ENCODER: pretrained | aligned, TOP_K, SELECTION_SEED); a new condition is a new gin file.
"""

from __future__ import annotations

import argparse
import functools
import json
import random
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[3]
HERE = Path(__file__).resolve().parent
CONDITIONS = ("topk_minilm", "topk_aligned", "random_k", "all_tasks")
TARGETS = ("task1345_glue_qqp_question_paraprashing", "task957_e2e_nlg_text_generation_generate",
           "task1342_amazon_us_reviews_title")
MODEL = "smollm2-135m-instruct"
SHARED = "_shared"  # the selection key of a condition that does not depend on the target


def log(msg: str) -> None:
    print(f"[insta {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def condition_macros(condition: str) -> dict:
    """The selection macros of `<condition>.gin` (parsed alone; `parse_config` clears gin first)."""
    import gin

    from jaxlm.experiment.gin_config import parse_config

    parse_config([str(HERE / f"{condition}.gin")])
    out = {}
    for name, default in (("INSTA_SELECTION", None), ("INSTA_ENCODER", "pretrained"), ("TOP_K", 8),
                          ("SELECTION_SEED", 0), ("ALIGN_STEPS", 200), ("ALIGN_GROUP_BY", "task"),
                          ("ALIGN_BATCH_SIZE", 16)):
        try:
            out[name] = gin.query_parameter(f"%{name}")
        except ValueError:
            out[name] = default
    if out["INSTA_SELECTION"] not in ("top_k", "random", "all"):
        from jaxlm.errors import ConfigError

        raise ConfigError(f"{condition}.gin: INSTA_SELECTION must be top_k, random or all, got {out['INSTA_SELECTION']!r}")
    return out


def aligned_encoder(work: Path, data_dir: str, macros: dict) -> Path:
    """WORK/aligned_encoder: `align_encoder` (what `jaxlm align-encoder` runs) with the condition's
    ALIGN_* macros (tuned once)."""
    from jaxlm.train.embedder_tuning import align_encoder

    out = work / "aligned_encoder"
    if not (out / "model.safetensors").is_file():
        t = time.time()
        summary = align_encoder(data_dir, out, source="superni", split="default", group_by=macros["ALIGN_GROUP_BY"],
                                steps=macros["ALIGN_STEPS"], batch_size=macros["ALIGN_BATCH_SIZE"], learning_rate=2e-5,
                                temperature=0.05, seed=0, max_length=64)
        log(f"aligned encoder tuned in {time.time() - t:.0f}s: {json.dumps(summary)}")
    return out


def selections(work: Path, targets: list[str], conditions: list[str], data_dir: str) -> dict:
    """{condition: {target or SHARED: [{task, score}]}}, computed once into WORK/selections.json."""
    from jaxlm.data.selection import find_task, load_encoder, rank_sources
    from jaxlm.data.sources import load_tasks
    from jaxlm.files import write_atomically

    path = work / "selections.json"
    sel = json.loads(path.read_text()) if path.is_file() else {}
    sources = load_tasks("superni", data_dir, split="default", part="train")
    tests = load_tasks("superni", data_dir, part="test")
    for cond in conditions:
        m = condition_macros(cond)
        got = sel.setdefault(cond, {})
        if m["INSTA_SELECTION"] == "all" and SHARED not in got:
            got[SHARED] = [{"task": n, "score": None} for n in sorted(sources)]
        elif m["INSTA_SELECTION"] == "random" and SHARED not in got:
            chosen = random.Random(m["SELECTION_SEED"]).sample(sorted(sources), m["TOP_K"])
            got[SHARED] = [{"task": n, "score": None} for n in chosen]
        elif m["INSTA_SELECTION"] == "top_k":
            todo = [t for t in targets if t not in got]
            if todo:
                enc = None if m["INSTA_ENCODER"] == "pretrained" else str(aligned_encoder(work, data_dir, m))
                embedder = load_encoder(enc, work / "embeddings")
                for t in todo:
                    ranking = rank_sources(find_task(t, tests), sources, embedder=embedder, text="definition")
                    got[t] = [{"task": n, "score": round(s, 4)} for n, s in ranking[: m["TOP_K"]]]
    write_atomically(path, lambda f: f.write(json.dumps(sel, indent=1)))
    return sel


@functools.cache
def base_model():
    """SmolLM2 loaded once per process (adapter export names, evaluation)."""
    from jaxlm.checkpoints.pretrained import load_pretrained

    return load_pretrained(MODEL)


def run_dir(work: Path, condition: str, key: str) -> Path:
    return work / "train" / condition / ("" if key == SHARED else key)


def train_runs(work: Path, sel: dict, targets: list[str], conditions: list[str], bindings: list[str]) -> None:
    """One `jaxlm train` of `<condition>.gin` per (condition, selection key); the LoRA to WORK/.../adapter."""
    import gin

    from jaxlm.experiment.gin_config import run_gin_files

    order = [(c, SHARED) for c in conditions if SHARED in sel[c]]
    order += [(c, t) for t in targets for c in conditions if SHARED not in sel[c]]
    for cond, key in order:
        wd = run_dir(work, cond, key)
        if (wd / "adapter" / "adapter_config.json").is_file():
            continue
        names = [e["task"] for e in sel[cond][key]]
        extra = [f"TASK_NAMES = {names!r}", f"task_mixture.name = 'insta_{cond}_{key.strip('_')}'"]
        t = time.time()
        out = run_gin_files([str(HERE / f"{cond}.gin")], extra + bindings, wd)
        objective = gin.get_bindings("train")["objective"]  # the run's objective (gin is still parsed)
        objective.export(wd / "adapter", out["state"].params, out["frozen"], base_model_name_or_path=MODEL)
        seconds = time.time() - t
        (wd / "run.json").write_text(json.dumps({"condition": cond, "key": key, "tasks": names, "seconds": round(seconds, 1),
                                                 "loss": out["loss"], "steps": out["step"]}))
        log(f"trained {cond}/{key}: {out['step']} steps in {seconds:.0f}s, loss {out['loss']:.3f}")


def evaluate(work: Path, sel: dict, targets: list[str], conditions: list[str], data_dir: str, num_instances: int,
             max_new_tokens: int) -> list[dict]:
    """One results.jsonl line per (target, condition), untuned model included."""
    from jaxlm.checkpoints.peft import load_peft_adapter
    from jaxlm.data.prompts import format_prompt
    from jaxlm.data.sources import load_tasks
    from jaxlm.eval.engine import Engine
    from jaxlm.jsonl import ResultsLog
    from jaxlm.eval.methods import EvalContext
    from jaxlm.eval.sweep import cell_metrics

    results = ResultsLog(work / "results.jsonl", key=lambda r: (r["target"], r["condition"]))
    done = results.done_keys()
    todo = [(t, c) for t in targets for c in ("untuned",) + tuple(conditions) if (t, c) not in done]
    todo = [(t, c) for t, c in todo if c == "untuned" or
            (run_dir(work, c, SHARED if SHARED in sel[c] else t) / "adapter" / "adapter_config.json").is_file()]
    if todo:
        pretrained = base_model()
        ctx = EvalContext(Engine(pretrained, batch_size=num_instances), pretrained.tokenizer, lambda *a, **k: {},
                          max_source_length=256, max_new_tokens=max_new_tokens)
        tests = load_tasks("superni", data_dir, part="test", names=targets)
        for target, cond in todo:
            task, t = tests[target], time.time()
            insts = task.instances[:num_instances]
            lora = None if cond == "untuned" else load_peft_adapter(
                run_dir(work, cond, SHARED if SHARED in sel[cond] else target) / "adapter", pretrained)
            records = ctx.answer(task, insts, [format_prompt(task, i, "def") for i in insts], lora=lora)
            row = {"target": target, "condition": cond, "metrics": cell_metrics(records, task),
                   "predictions": [r["prediction"] for r in records], "seconds": round(time.time() - t, 1)}
            results.append([row])
            log(f"eval {target} {cond}: ROUGE-L {row['metrics']['rougeL']:.1f} ({row['seconds']}s)")
    return results.rows()


def report(work: Path, rows: list[dict], sel: dict, targets: list[str], conditions: list[str], plot: Path | None) -> str:
    """Markdown table ROUGE-L (target x condition) + mean; selected tasks per target; optional PNG."""
    from jaxlm.files import write_atomically

    cols = ["untuned", *conditions]
    score = {(r["target"], r["condition"]): r["metrics"]["rougeL"] for r in rows}
    lines = ["| target | " + " | ".join(cols) + " |", "|---" * (len(cols) + 1) + "|"]
    shown = [t for t in targets if any((t, c) in score for c in cols)]
    for t in shown:
        lines.append(f"| {t} | " + " | ".join(f"{score[t, c]:.1f}" if (t, c) in score else "-" for c in cols) + " |")
    means = [[score[t, c] for t in shown if (t, c) in score] for c in cols]
    lines.append("| **mean** | " + " | ".join(f"**{sum(m) / len(m):.1f}**" if m else "-" for m in means) + " |")
    lines += ["", "Selected tasks (top-k with score):"]
    for cond in conditions:
        for key, entries in sel.get(cond, {}).items():
            if key != SHARED or len(entries) <= 16:
                lines.append(f"- {cond} / {key}: " + ", ".join(
                    e["task"] + (f" ({e['score']:.2f})" if e["score"] is not None else "") for e in entries))
            else:
                lines.append(f"- {cond}: all {len(entries)} training tasks on disk")
    text = "\n".join(lines) + "\n"
    write_atomically(work / "summary.md", lambda f: f.write(text))
    if plot is not None and shown:
        from jaxlm.eval import plots

        fig, _ = plots.grouped_bars(
            {(c, t): v for (t, c), v in score.items()}, cols, shown, mean="mean",
            group_labels=[t.split("_")[0] for t in shown] + ["mean"], figsize=(8, 3.6), ylabel="ROUGE-L",
            ylim=(0, 1.3 * max(score.values())),  # room for the legend above the bars
            title="INSTA on SmolLM2-135M-Instruct (LoRA, same step budget)", legend_kw={"fontsize": 8, "ncol": len(cols)})
        plots.save(fig, plot)
    return text


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workdir", required=True)
    p.add_argument("--data_dir", default=str(REPO.parent / "shared" / "data" / "superni"))
    p.add_argument("--targets", default=",".join(TARGETS), help="comma-separated Super-NI test tasks")
    p.add_argument("--conditions", default=",".join(CONDITIONS), help="gin files of this folder, without .gin")
    p.add_argument("--num_instances", type=int, default=12, help="evaluated instances per target")
    p.add_argument("--max_new_tokens", type=int, default=32)
    p.add_argument("--gin", action="append", default=[], help="extra gin binding for every run, e.g. NUM_STEPS=60")
    p.add_argument("--plot", default=None, help="PNG path for the ROUGE-L bar chart")
    args = p.parse_args(argv)
    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    targets = [t for t in args.targets.split(",") if t]
    conditions = [c for c in args.conditions.split(",") if c]
    start = time.time()
    sel = selections(work, targets, conditions, args.data_dir)
    log(f"selections ready ({time.time() - start:.0f}s)")
    train_runs(work, sel, targets, conditions, list(args.gin))
    rows = evaluate(work, sel, targets, conditions, args.data_dir, args.num_instances, args.max_new_tokens)
    print(report(work, rows, sel, targets, conditions, Path(args.plot) if args.plot else None))
    log(f"done in {time.time() - start:.0f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
