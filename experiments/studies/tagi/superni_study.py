"""TAGI with SmolLM2-135M-Instruct on Super-NI: training tasks -> test tasks, ROUGE-L of four methods.

  python experiments/studies/tagi/superni_study.py --workdir runs/tagi_superni [--phases teachers,tagi,eval]

A few-step CPU version of jaxlm/configs/tagi/smollm2_superni.gin (budgets below are bindings):
  teachers  oracle LoRA teachers of the EVALUATED test tasks, trained on those tasks' instances
            after the evaluated ones (LoRATeachers, student rows = Tk query without instruction)
  tagi      stage 2 only (no pretraining, no L_ins: no training-task teachers at this budget),
            L_ce + L_kl from the base reading the def_pos2 prompt, on the Super-NI training tasks
  eval      greedy (stop at a blank line) on the first N instances of each test task:
            (a) Tk query alone, (b) def_pos2 prompt, (c) the task's LoRA teacher + query,
            (d) the hypernetwork's adapter for the task's instruction + query; Super-NI ROUGE-L
            (jaxlm.eval.metrics, default track) and exact match; one line per (task, method) appended
            to WORK/results.jsonl (`jaxlm.jsonl.ResultsLog`).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[3]
DATA = str(REPO.parent / "shared" / "data" / "superni")
EVAL_TASKS = tuple(sorted(("task033_winogrande_answer_generation", "task1393_superglue_copa_text_completion",
                           "task1345_glue_qqp_question_paraprashing", "task670_ambigqa_question_generation")))


def run_gin(files: list[str], bindings: list[str], workdir: Path) -> dict:
    from jaxlm.experiment.gin_config import run_gin_files

    t = time.time()
    out = run_gin_files(files, bindings, workdir)
    print(f"[{workdir.name}] {time.time() - t:.0f}s loss {out['loss']}", flush=True)
    return out


COMMON = [f"DATA_DIR = '{DATA}'", "train.log_every = 1", "train.checkpoint_every = None",
          "tagi_data.max_input_len = 512", "tagi_data.max_target_len = 32", "tagi_data.max_instruction_len = 384",
          "LoraSpec.targets = ('q_proj', 'v_proj')", "HypernetConfig.depth = 1"]


def phase_teachers(work: Path, n_eval: int, steps: int) -> None:
    if (work / "teachers" / "teachers" / "teachers.json").is_file():
        return
    run_gin(["jaxlm/configs/tagi/smollm2_superni.gin"], COMMON + [
        "tagi_pipeline.stages = ('teachers',)", "teachers/tagi_data.part = 'test'",
        f"teachers/tagi_data.names = {list(EVAL_TASKS)!r}", f"teachers/LoRATeachers.num_tasks = {len(EVAL_TASKS)}",
        f"teachers/tagi_data.skip_instances = {n_eval}", "teachers/tagi_data.batch_size = 4",
        f"teachers/tagi_data.tasks_per_batch = {len(EVAL_TASKS)}", f"NUM_STEPS = {steps}",
        f"teachers/train.num_steps = {steps}", "LEARNING_RATE = 1e-3", "WARMUP_STEPS = 1"], work)


def phase_tagi(work: Path, steps: int, max_instances: int, lr: float) -> None:
    if (work / "stage2" / "hypernet" / "hypernet.json").is_file():
        return
    run_gin(["jaxlm/configs/tagi/smollm2_superni.gin"], COMMON + [
        "tagi_pipeline.stages = ('stage2',)", "stage2/TAGIDistillation.w_ins = 0.0",
        f"tagi_data.max_instances = {max_instances}", "tagi_data.batch_size = 4", "tagi_data.tasks_per_batch = 2",
        f"NUM_STEPS = {steps}", f"stage2/train.num_steps = {steps}", f"LEARNING_RATE = {lr}", "WARMUP_STEPS = 2"], work)


def phase_eval(work: Path, n_eval: int, max_new_tokens: int) -> None:
    from jaxlm.checkpoints.hypernet import load_hypernet
    from jaxlm.data.prompts import format_prompt, tk_query
    from jaxlm.data.sources import load_tasks
    from jaxlm.data.tagi_tasks import instruction_for
    from jaxlm.eval.engine import Engine
    from jaxlm.eval.metrics import compute_metrics
    from jaxlm.jsonl import ResultsLog
    from jaxlm.models import lora as lora_lib
    from jaxlm.checkpoints.teachers import load_teachers

    hyper = load_hypernet(work)
    base = hyper.base
    tok = base.tokenizer
    engine = Engine(base, batch_size=8)
    tasks = load_tasks("superni", DATA, part="test", names=list(EVAL_TASKS), max_instances=n_eval)
    names, teachers = load_teachers(work / "teachers" / "teachers", base)
    stop = [tok.encode("\n\n", add_special_tokens=False)]
    adapters = hyper.adapters([instruction_for(tasks[t], "def_pos2") for t in EVAL_TASKS])
    rows = []
    for i, name in enumerate(EVAL_TASKS):
        task = tasks[name]
        assert names[i] == f"task_{i}" or names[i] == name, names
        refs = [list(inst.outputs) for inst in task.instances]
        queries = [tok.encode(tk_query(inst.input), add_special_tokens=False) for inst in task.instances]
        full = [tok.encode(format_prompt(task, inst, "def_pos2"), add_special_tokens=False)[-1024:]
                for inst in task.instances]
        methods = {"a_no_instruction": (queries, None), "b_def_pos2_in_context": (full, None),
                   "c_task_lora_teacher": (queries, lora_lib.select(teachers, i)),
                   "d_hypernet_adapter": (queries, lora_lib.select(adapters, i))}
        for method, (prompts, lora) in methods.items():
            out = engine.generate(prompts, max_new_tokens=max_new_tokens, stop_sequences=stop, lora=lora)
            preds = [tok.decode(r.output_ids).split("\n\n")[0].strip() for r in out]
            m = compute_metrics(preds, refs)
            rows.append({"task": name, "method": method, **m, "example": preds[0][:80]})
            print(json.dumps(rows[-1]), flush=True)
    ResultsLog(work / "results.jsonl", ensure_ascii=True).append(rows)
    summary: dict[str, list[float]] = {}
    for r in rows:
        summary.setdefault(r["method"], []).append(r.get("rougeL", r.get("rouge_l", float("nan"))))
    print(json.dumps({k: round(sum(v) / len(v), 2) for k, v in summary.items()}, indent=1))


def main() -> None:
    import os

    os.chdir(REPO)
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workdir", required=True)
    p.add_argument("--phases", default="teachers,tagi,eval")
    p.add_argument("--eval_instances", type=int, default=6)
    p.add_argument("--teacher_steps", type=int, default=12)
    p.add_argument("--tagi_steps", type=int, default=10)
    p.add_argument("--train_instances", type=int, default=8)
    p.add_argument("--tagi_lr", type=float, default=2e-4)
    p.add_argument("--max_new_tokens", type=int, default=24)
    args = p.parse_args()
    work = Path(args.workdir).resolve()
    for phase in args.phases.split(","):
        t = time.time()
        if phase == "teachers":
            phase_teachers(work, args.eval_instances, args.teacher_steps)
        elif phase == "tagi":
            phase_tagi(work, args.tagi_steps, args.train_instances, args.tagi_lr)
        elif phase == "eval":
            phase_eval(work, args.eval_instances, args.max_new_tokens)
        else:
            raise SystemExit(f"unknown phase {phase!r}")
        print(f"phase {phase}: {time.time() - t:.0f}s", flush=True)


if __name__ == "__main__":
    main()
