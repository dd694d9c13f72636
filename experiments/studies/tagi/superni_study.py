"""TAGI with SmolLM2-135M-Instruct on Super-NI: training tasks on disk -> every test task on disk.

  python experiments/studies/tagi/superni_study.py --workdir runs/tagi_superni
      [--phases topk,teachers,tagi,tagi_fusion,eval] [--steps 500] [--train_instances 10] ...

The base is frozen; the hypernetwork (jaxlm/configs/tagi/smollm2_superni.gin: width heads, the base's
own hidden states as instruction encoder, LoRA r8 on q/k/v/o) is trained with stage 2 only
(L_ce + L_kl; no stage 1 and no L_ins at this budget, see docs/results.md) on the Super-NI training
tasks on disk. Phases (each skipped when its output exists; a stopped training phase resumes from
its last checkpoint):
  topk         the KL teacher (the base reading the def_pos2 prompt, its last --teacher_input_len
               tokens: it sees more of the prompt than the students' --max_input_len) once over every
               training row: top-k log-probs at each target token -> WORK/teacher_topk.npz
               (`jaxlm.train.tagi.write_teacher_topk`), so a training step runs no teacher forward
  teachers     per-task LoRA teachers of the 16 test tasks, cross-fitted on their 100 instances:
               WORK/teachers_a trained on instances 50-99 (scores 0-49), WORK/teachers_b on 0-49
               (scores 50-99): no teacher is scored on an instance it was trained on
  tagi         (d) stage 2 without fusion -> WORK/tagi/stage2/hypernet
  tagi_fusion  (d') stage 2 with decoder-only fusion (the instruction as a cached prefix)
               -> WORK/tagi_fusion/stage2/hypernet
  eval         the eval sweep (experiments/studies/tagi/superni_eval.gin) in WORK/eval: (a) the Tk
               query alone, (b) `def` and `def_pos2` in context, (c) the cross-fitted teachers, (d)
               and (d') the hypernetworks' adapters, on the first 100 instances of every test task,
               official ROUGE-L per category (WORK/eval/summary.md, results.json); (c), (d) and (d')
               read each query cut as in their training (its last --max_input_len tokens)
  probe        (not in the default phases) lr 1e-3 for every hypernetwork param, 60 steps: loss and
               emitted ||dW||/||W|| at the start and the end (does the parametrisation keep it stable?)
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[3]
GIN = "jaxlm/configs/tagi/smollm2_superni.gin"
EVAL_GIN = "experiments/studies/tagi/superni_eval.gin"
HALF = 50  # the cross-fitting folds: instances [0, 50) and [50, 100) of each test task


def run_gin(files: list[str], bindings: list[str], workdir: Path) -> None:
    from jaxlm.experiment.gin_config import run_gin_files

    t = time.time()
    out = run_gin_files(files, bindings, workdir)
    print(f"[{workdir.name}] {time.time() - t:.0f}s loss {out.get('loss')}", flush=True)


def train_buckets(args: argparse.Namespace) -> tuple[int, ...]:
    """Length buckets of the training batches: a decoder row (query + target) and an instruction each
    pad to one of these, so a phase compiles at most a handful of step programs (with the default
    16..512 buckets the row x instruction combinations reach dozens, at ~1-2 min of compile each on 2
    cores). The last bucket holds the longest row and instruction exactly: a row one past a bucket
    would pad to a multiple of the largest (a 416-token row to 768 doubles the step's memory, ~28 GB).
    Super-NI training rows: query median 53 tokens (90%: 160), target median 4 (90%: 20), instruction
    median 168 (90%: 419, cut to --max_instruction_len)."""
    top = max(args.max_input_len + args.max_target_len, args.max_instruction_len)
    return tuple(b for b in (64, 128, 256) if b < top) + (top,)


def common(args: argparse.Namespace) -> list[str]:
    """Bindings every training phase shares (lengths, buckets, data root, logging, checkpoints for resuming)."""
    data = f"'{args.data_dir}'" if args.data_dir else "None"
    return [f"DATA_DIR = {data}", f"tagi_data.buckets = {train_buckets(args)}", f"tagi_data.max_input_len = {args.max_input_len}",
            f"tagi_data.max_target_len = {args.max_target_len}",
            f"tagi_data.max_instruction_len = {args.max_instruction_len}",
            "train.log_every = 10", f"train.checkpoint_every = {args.checkpoint_every}"]


def phase_topk(work: Path, args: argparse.Namespace) -> None:
    out = work / "teacher_topk.npz"
    if out.is_file():
        return
    import jaxlm
    from jaxlm.data.tagi_tasks import superni_tagi_tasks
    from jaxlm.train.tagi import write_teacher_topk

    t = time.time()
    base = jaxlm.load_pretrained("smollm2-135m-instruct")
    tasks = superni_tagi_tasks(args.data_dir, tokenizer="smollm2-135m-instruct", part="train",
                               max_instances=args.train_instances)[: args.max_train_tasks]
    write_teacher_topk(out, tasks, base, k=args.topk, max_targets=args.max_target_len, batch_size=8,
                       max_input_len=args.teacher_input_len)
    print(f"[topk] {len(tasks)} tasks x <= {args.train_instances} rows: {time.time() - t:.0f}s", flush=True)


def test_task_names(args: argparse.Namespace) -> list[str]:
    """The test tasks on disk, sorted (the teachers' task order); each must hold 2 x HALF instances
    with outputs in both folds, or the teachers' indices would not be the tasks' places."""
    from jaxlm.data.sources import load_tasks
    from jaxlm.data.tagi_tasks import task_examples

    tasks = load_tasks("superni", args.data_dir, part="test")
    for name, task in tasks.items():
        if len(task_examples(task, max_instances=HALF)) < 1 or len(task_examples(task, skip_instances=HALF)) < 1 \
                or len(task.instances) < 2 * HALF:
            raise SystemExit(f"superni_study.py: error: test task {name} has {len(task.instances)} instances; the "
                             f"cross-fitted teachers need {2 * HALF} with outputs in both halves")
    return sorted(tasks)


def phase_teachers(work: Path, args: argparse.Namespace) -> None:
    names = test_task_names(args)
    for fold, span in (("a", f"teachers/tagi_data.skip_instances = {HALF}"),
                       ("b", f"teachers/tagi_data.max_instances = {HALF}")):
        run = work / f"teachers_{fold}"
        if (run / "teachers" / "teachers" / "teachers.json").is_file():
            continue
        run_gin([GIN], common(args) + [
            "tagi_pipeline.stages = ('teachers',)", "teachers/tagi_data.part = 'test'", span,
            f"teachers/tagi_data.names = {names!r}", f"teachers/LoRATeachers.num_tasks = {len(names)}",
            f"teachers/LoRATeachers.task_names = {tuple(names)!r}",  # tagi_tasks orders the tasks by name
            "teachers/tagi_data.batch_size = 8", "teachers/tagi_data.tasks_per_batch = 4",
            f"NUM_STEPS = {args.teacher_steps}", "LEARNING_RATE = 1e-3", "WARMUP_STEPS = 10"], run)


def stage2_bindings(work: Path, args: argparse.Namespace, fusion: bool, steps: int, lr: float,
                    warmup: int) -> list[str]:
    """Stage 2 alone (L_ce + L_kl from the cached top-k, no L_ins) on the training tasks."""
    return common(args) + [
        "tagi_pipeline.stages = ('stage2',)", "stage2/TAGIDistillation.w_ins = 0.0", f"HypernetConfig.fusion = {fusion}",
        f"tagi_data.max_instances = {args.train_instances}", f"tagi_data.max_tasks = {args.max_train_tasks}",
        f"tagi_data.teacher_topk = '{work / 'teacher_topk.npz'}'",
        f"tagi_data.batch_size = {args.batch_size}", f"tagi_data.tasks_per_batch = {args.tasks_per_batch}",
        f"NUM_STEPS = {steps}", f"LEARNING_RATE = {lr}", f"WARMUP_STEPS = {warmup}"]


def phase_tagi(work: Path, args: argparse.Namespace, fusion: bool) -> None:
    run = work / ("tagi_fusion" if fusion else "tagi")
    if (run / "stage2" / "hypernet" / "hypernet.json").is_file():
        return
    run_gin([GIN], stage2_bindings(work, args, fusion, args.steps, args.lr, 30), run)


def phase_probe(work: Path, args: argparse.Namespace) -> None:
    """Stability at lr 1e-3 (issue 14, item 1): stage 2 with fusion for --probe_steps steps, every
    hypernetwork param at --probe_lr (no heads multiplier), constant after a short warm-up; prints the
    loss and the emitted ||dW||/||W|| (max over module types) at the first and last logged steps."""
    import json

    run = work / "probe_lr"
    if not (run / "stage2" / "hypernet" / "hypernet.json").is_file():
        run_gin([GIN], stage2_bindings(work, args, True, args.probe_steps, args.probe_lr, 5) + [
            "stage2/make_optimizer.lr_multipliers = {}", "make_optimizer.schedule = 'constant'"], run)
    rows = [json.loads(line) for line in (run / "stage2" / "metrics.jsonl").read_text().splitlines()
            if '"loss"' in line and '"eval/' not in line]
    for r in (rows[0], rows[-1]):
        ratio = max(v for k, v in r.items() if k.startswith("dw_ratio/"))
        print(f"[probe lr {args.probe_lr}] step {r['step']}: loss {r['loss']:.3f} (ce {r['loss_ce']:.3f}, "
              f"kl {r['loss_kl']:.3f}), max dw_ratio {ratio:.3f}, task_share {r['task_share']:.3f}", flush=True)


def phase_eval(work: Path, args: argparse.Namespace) -> None:
    cmd = [sys.executable, "-m", "jaxlm.cli", "eval", f"--gin_file={EVAL_GIN}", f"--workdir={work / 'eval'}",
           f"--gin.TEACHERS_A='{work / 'teachers_a/teachers/teachers'}'",
           f"--gin.TEACHERS_B='{work / 'teachers_b/teachers/teachers'}'", f"--gin.HYPERNET='{work / 'tagi'}'",
           f"--gin.HYPERNET_FUSION='{work / 'tagi_fusion'}'", f"--gin.MAX_INSTANCES={args.eval_instances}",
           f"--gin.eval_sweep.max_new_tokens={args.max_new_tokens}",
           f"--gin.MAX_INSTRUCTION_LEN={args.max_instruction_len}", f"--gin.MAX_INPUT_LEN={args.max_input_len}"]
    if args.data_dir:
        cmd.append(f"--data_dir={args.data_dir}")
    print(" ".join(cmd), flush=True)
    subprocess.run(cmd, check=True)


def main() -> None:
    os.chdir(REPO)
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workdir", required=True)
    p.add_argument("--phases", default="topk,teachers,tagi,tagi_fusion,eval")
    p.add_argument("--data_dir", default=None, help="the task-data root (default: $JAXLM_DATA_DIR, ../shared/data)")
    p.add_argument("--max_train_tasks", type=int, default=None, help="the first N training tasks (default: all)")
    p.add_argument("--train_instances", type=int, default=10, help="instances per training task (default 10)")
    p.add_argument("--steps", type=int, default=500, help="stage-2 steps of each hypernetwork (default 500)")
    p.add_argument("--lr", type=float, default=1e-4,
                   help="stage-2 trunk learning rate; the A/B heads take 30x (default 1e-4)")
    p.add_argument("--batch_size", type=int, default=4, help="stage-2 rows per step (default 4)")
    p.add_argument("--tasks_per_batch", type=int, default=2, help="stage-2 tasks per step (default 2)")
    p.add_argument("--teacher_steps", type=int, default=100,
                   help="steps of each teacher fold (default 100: one pass over the fold's 16 x 50 rows at batch 8; "
                        "a step is ~17-20 s on the 2 cores)")
    p.add_argument("--max_input_len", type=int, default=384, help="student input tokens (default 384)")
    p.add_argument("--teacher_input_len", type=int, default=992,
                   help="KL teacher input tokens (default 992: with 32 target tokens a row fits 1,024)")
    p.add_argument("--max_target_len", type=int, default=32, help="target tokens (default 32)")
    p.add_argument("--max_instruction_len", type=int, default=384, help="instruction tokens (default 384)")
    p.add_argument("--topk", type=int, default=32, help="teacher log-probs kept per target token (default 32)")
    p.add_argument("--checkpoint_every", type=int, default=25, help="steps between checkpoints (default 25)")
    p.add_argument("--probe_steps", type=int, default=60, help="steps of the lr probe phase (default 60)")
    p.add_argument("--probe_lr", type=float, default=1e-3, help="the lr probe's learning rate (default 1e-3)")
    p.add_argument("--eval_instances", type=int, default=100, help="instances per test task (default 100)")
    p.add_argument("--max_new_tokens", type=int, default=64, help="generated tokens (default 64)")
    args = p.parse_args()
    if not 1 <= args.eval_instances <= 2 * HALF:
        raise SystemExit(f"superni_study.py: error: --eval_instances {args.eval_instances}: the cross-fitted "
                         f"teachers cover instances 0-{2 * HALF - 1}")
    work = Path(args.workdir).resolve()
    work.mkdir(parents=True, exist_ok=True)
    from jaxlm.cli import default_compilation_cache_dir, enable_compilation_cache

    enable_compilation_cache(default_compilation_cache_dir())  # a resumed phase reads its step programs back
    phases = {"topk": lambda: phase_topk(work, args), "teachers": lambda: phase_teachers(work, args),
              "tagi": lambda: phase_tagi(work, args, fusion=False),
              "tagi_fusion": lambda: phase_tagi(work, args, fusion=True), "eval": lambda: phase_eval(work, args),
              "probe": lambda: phase_probe(work, args)}
    for phase in args.phases.split(","):
        if phase not in phases:
            raise SystemExit(f"superni_study.py: error: --phases: unknown phase {phase!r} (known: {', '.join(phases)})")
        t = time.time()
        phases[phase]()
        print(f"phase {phase}: {time.time() - t:.0f}s", flush=True)


if __name__ == "__main__":
    main()
