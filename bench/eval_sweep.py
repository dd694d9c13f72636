"""An evaluation sweep's workloads on CPU: jaxlm's Engine with and without its shared-prefix cache, and
(generation) a straightforward transformers loop.

Workloads (--workloads, comma-separated):
  generate  def_pos2 prompts of Super-NI test tasks, greedy generation (also vs transformers)
  rank      the same prompts, each scored against 3 options (its answer and two other instances'
            answers of its task): rank classification, every option continuing the cached prompt
  icil      ICIL prompts (one fixed demonstration set for every task), greedy generation
For each, examples/s with the prefix cache, without it, and the ratio (compile excluded: every
workload runs once to compile, then once timed). The machine may be shared: say so with the figures.

Both sides: SmolLM2-135M-Instruct (the same GGUF weights; transformers loads the GGUF itself), fp32,
the same prompts (Tk-Instruct def_pos2 prompts of real Super-NI test-task instances from
../shared/data, mixed lengths), the same batch size and batch composition (prompts sorted by length,
as the engine does), left padding, greedy, the model's EOS ids, `max_new_tokens` new tokens at most.

jaxlm time excludes compilation, which is reported separately (one warm-up batch per padded shape,
run twice: compile = first - second). Prints examples/s of both, the ratio, and token agreement
(fraction of prompts whose generated ids are identical, and of aligned token positions that agree).

    nice python bench/eval_sweep.py                  # 200 prompts, batch 8, 32 new tokens, all workloads
    nice python bench/eval_sweep.py --quick          # 2 tasks x 8 instances, 16 new tokens, no transformers
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
# PyTorch's OpenMP threads busy-wait by default; on a shared (oversubscribed) CPU that made its
# generate ~4x slower here (49 s vs 13 s for one batch). PASSIVE is the fair setting for the peer.
if "--omp_active" not in sys.argv:
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import jax
import numpy as np

import jaxlm
from jaxlm.eval.engine import Engine

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


def sweep_prompts(tok, data_dir: Path, n: int, max_tokens: int, per_task: int = 20, fmt: str = "def_pos2",
                  icil_demos=None) -> tuple[list[list[int]], list[str], list[list[str]]]:
    """n prompts (token ids) of at most max_tokens: the first `per_task` instances of each Super-NI test
    task in turn (a sweep cell's instances), def_pos2 or ICIL (`icil_demos`); returns (prompts, task
    name of each, 3 answer options of each: its own answer and two other instances' of its task)."""
    from jaxlm.data import icil
    from jaxlm.data.prompts import format_prompt
    from jaxlm.data.sources import load_tasks

    tasks = load_tasks("superni", data_dir / "superni", part="test")
    count = lambda text: len(tok.encode(text))
    out: list[tuple[list[int], str, list[str]]] = []
    for task in tasks.values():
        answers = [inst.outputs[0] for inst in task.instances[: per_task + 2] if inst.outputs]
        rows = []
        for inst in task.instances:
            if len(rows) == per_task or len(answers) < 3 or not inst.outputs:
                break
            if icil_demos is not None:
                ids = tok.encode(icil.icil_prompt(icil_demos, task, inst, max_tokens=max_tokens, count_tokens=count))
            else:
                ids = tok.encode(format_prompt(task, inst, fmt))
            if len(ids) <= max_tokens:
                others = [a for a in answers if a != inst.outputs[0]][:2]
                if len(others) == 2:
                    rows.append((ids, task.name, [inst.outputs[0], *others]))
        out += rows
        if len(out) >= n:
            break
    if len(out) < n:
        sys.exit(f"only {len(out)} prompts of <= {max_tokens} tokens in {data_dir}; lower --n or raise --max_prompt_tokens")
    out = out[:n]
    return [r[0] for r in out], [r[1] for r in out], [r[2] for r in out]


def timed_twice(fn) -> tuple[float, float, object]:
    """(compile estimate = first - second run, second run's seconds, its result)."""
    t0 = time.perf_counter()
    fn()
    t1 = time.perf_counter()
    result = fn()
    t2 = time.perf_counter()
    return max(0.0, (t1 - t0) - (t2 - t1)), t2 - t1, result


def with_and_without_prefix(pre, batch: int, run) -> dict:
    """One workload on an engine with the prefix cache and on one without: seconds, compile, ratio,
    and whether the answers agree."""
    out = {}
    answers = {}
    for name, on in (("prefix_cache", True), ("no_prefix_cache", False)):
        engine = Engine(pre, batch_size=batch, prefix_cache=on)
        compile_s, seconds, answers[name] = timed_twice(lambda: run(engine))
        out[name] = {"seconds": seconds, "compile_seconds": compile_s, "num_compiles": engine.num_compiles}
    out["ratio"] = out["no_prefix_cache"]["seconds"] / out["prefix_cache"]["seconds"]
    a, b = answers["prefix_cache"], answers["no_prefix_cache"]
    if a and isinstance(a[0], list) and a[0] and isinstance(a[0][0], float):  # rank scores
        diff = max(abs(x - y) / max(1.0, abs(y)) for u, v in zip(a, b) for x, y in zip(u, v))
        out["max_relative_score_difference"] = diff
        out["same_predictions"] = float(np.mean([int(np.argmax(u)) == int(np.argmax(v)) for u, v in zip(a, b)]))
    else:
        out["identical_outputs"] = float(np.mean([x == y for x, y in zip(a, b)]))
    return out


def hf_generate_all(hf, prompts: list[list[int]], batch_size: int, new_tokens: int, pad_id: int, eos: list[int]):
    import torch

    order = sorted(range(len(prompts)), key=lambda i: -len(prompts[i]))  # the engine's batch composition
    outputs: list[list[int] | None] = [None] * len(prompts)
    for start in range(0, len(order), batch_size):
        idx = order[start : start + batch_size]
        width = max(len(prompts[i]) for i in idx)
        ids = torch.tensor([[pad_id] * (width - len(prompts[i])) + prompts[i] for i in idx])
        mask = torch.tensor([[0] * (width - len(prompts[i])) + [1] * len(prompts[i]) for i in idx])
        with torch.no_grad():
            out = hf.generate(ids, attention_mask=mask, max_new_tokens=new_tokens, do_sample=False,
                              eos_token_id=eos, pad_token_id=pad_id)
        for r, i in enumerate(idx):
            row = out[r, width:].tolist()
            cut = next((k for k, t in enumerate(row) if t in eos), len(row))  # EOS excluded, as the engine does
            outputs[i] = row[:cut]
    return outputs


def agreement(a: list[list[int]], b: list[list[int]]) -> dict[str, float]:
    same_rows = float(np.mean([x == y for x, y in zip(a, b)]))
    pos = [(x[k] == y[k]) if k < len(x) and k < len(y) else False for x, y in zip(a, b) for k in range(max(len(x), len(y)))]
    return {"identical_outputs": same_rows, "token_agreement": float(np.mean(pos)) if pos else 1.0}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=200, help="number of prompts")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--new_tokens", type=int, default=32)
    parser.add_argument("--max_prompt_tokens", type=int, default=384)
    parser.add_argument("--data_dir", default=str(DATA))
    parser.add_argument("--quick", action="store_true", help="2 tasks x 8 instances, 16 new tokens, no transformers")
    parser.add_argument("--per_task", type=int, default=20, help="instances per task (a sweep cell's)")
    parser.add_argument("--workloads", default="generate,rank,icil", help="comma-separated: generate, rank, icil")
    parser.add_argument("--e2e", action="store_true",
                        help="also time `jaxlm generate` end to end (load and compile included): without the "
                             "compilation cache, filling a fresh one, reading it back, and without the prefix cache")
    parser.add_argument("--skip_hf", action="store_true", help="jaxlm only")
    parser.add_argument("--omp_active", action="store_true", help="keep OpenMP's default busy-waiting for PyTorch")
    args = parser.parse_args()
    if args.quick:
        args.n, args.per_task, args.new_tokens, args.skip_hf = 16, 8, 16, True
    workloads = [w for w in args.workloads.split(",") if w]
    unknown = set(workloads) - {"generate", "rank", "icil"}
    if unknown:
        sys.exit(f"unknown workloads {sorted(unknown)}")

    pre = jaxlm.load_pretrained("smollm2-135m-instruct")
    tok = pre.tokenizer
    prompts, names, options = sweep_prompts(tok, Path(args.data_dir), args.n, args.max_prompt_tokens, args.per_task)
    lengths = [len(p) for p in prompts]
    result: dict = {"device": jax.devices()[0].platform, "cpu_count": os.cpu_count(), "load_average": os.getloadavg(),
                    "prompts": len(prompts), "tasks": len(set(names)),
                    "prompt_tokens": {"min": min(lengths), "mean": float(np.mean(lengths)), "max": max(lengths)},
                    "batch": args.batch, "max_new_tokens": args.new_tokens}

    print(json.dumps(result), flush=True)
    if "generate" in workloads:
        result["generate"] = with_and_without_prefix(
            pre, args.batch, lambda e: [r.output_ids for r in e.generate(prompts, args.new_tokens)])
        print(json.dumps({"generate": result["generate"]}), flush=True)
    if "rank" in workloads:
        option_ids = [[tok.encode(o, add_special_tokens=False) for o in opts] for opts in options]
        result["rank"] = with_and_without_prefix(pre, args.batch, lambda e: e.rank_classify(prompts, option_ids))
        print(json.dumps({"rank": result["rank"]}), flush=True)
    if "icil" in workloads:
        from jaxlm.data.icil import build_icil_demos
        from jaxlm.data.sources import load_tasks

        train = load_tasks("superni", Path(args.data_dir) / "superni", part="train")
        count = lambda text: len(tok.encode(text))
        demos = next(d for d in (_try_icil(build_icil_demos, train, k, count) for k in range(8, 0, -1)) if d)
        icil_prompts, icil_names, _ = sweep_prompts(tok, Path(args.data_dir), args.n, 1024, args.per_task,
                                                    icil_demos=demos)
        result["icil"] = {"k": demos.k, "prompt_tokens_mean": float(np.mean([len(p) for p in icil_prompts])),
                          "tasks": len(set(icil_names)),
                          **with_and_without_prefix(pre, args.batch,
                                                    lambda e: [r.output_ids for r in e.generate(icil_prompts, args.new_tokens)])}
        print(json.dumps({"icil": result["icil"]}), flush=True)
    if args.e2e:
        result["e2e_generate"] = e2e_generate(prompts, args.batch, args.new_tokens)
    if "generate" in workloads and not args.skip_hf:
        import torch
        from transformers import AutoModelForCausalLM

        from jaxlm.checkpoints.pretrained import resolve_path

        path = resolve_path("smollm2-135m-instruct")
        hf = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32).eval()
        t0 = time.perf_counter()
        hf_out = hf_generate_all(hf, prompts, args.batch, args.new_tokens, tok.pad_id, list(tok.eos_ids))
        t_hf = time.perf_counter() - t0
        engine = Engine(pre, batch_size=args.batch)
        _, t_jax, jax_out = timed_twice(lambda: [r.output_ids for r in engine.generate(prompts, args.new_tokens)])
        result["transformers"] = {"seconds": t_hf, "torch_threads": torch.get_num_threads(),
                                  "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY", "default"),
                                  "ratio_vs_jaxlm_prefix_cache": t_hf / t_jax, "agreement": agreement(jax_out, hf_out)}
    print(json.dumps(result, indent=1))
    print()
    for w in ("generate", "rank", "icil"):
        if w in result:
            r = result[w]
            print(f"{w:9s} prefix cache {r['prefix_cache']['seconds']:7.2f}s vs none {r['no_prefix_cache']['seconds']:7.2f}s: "
                  f"{r['ratio']:.2f}x (compile excluded)")
    if "transformers" in result:
        print(f"generate  jaxlm (prefix cache) vs transformers: {result['transformers']['ratio_vs_jaxlm_prefix_cache']:.2f}x")


def e2e_generate(prompts: list[list[int]], batch: int, new_tokens: int) -> dict:
    """Wall seconds of `jaxlm generate` on the prompts (as input_ids lines), in a fresh process each."""
    import subprocess
    import tempfile

    env = {k: v for k, v in os.environ.items() if k not in ("JAX_COMPILATION_CACHE_DIR", "JAXLM_COMPILATION_CACHE")}
    out = {}
    with tempfile.TemporaryDirectory() as tmp:
        inp = Path(tmp) / "in.jsonl"
        inp.write_text("".join(json.dumps({"input_ids": p}) + "\n" for p in prompts))
        cache = Path(tmp) / "xla"
        runs = {"no_compilation_cache": ["--no_compilation_cache"], "fresh_compilation_cache": ["--compilation_cache_dir", str(cache)],
                "warm_compilation_cache": ["--compilation_cache_dir", str(cache)],
                "warm_compilation_cache_no_prefix_cache": ["--compilation_cache_dir", str(cache)]}
        for name, flags in runs.items():
            cmd = [sys.executable, "-m", "jaxlm.cli", *flags, "generate", "--model", "smollm2-135m-instruct",
                   "--input", str(inp), "--output", str(Path(tmp) / f"{name}.jsonl"), "--batch_size", str(batch),
                   "--max_new_tokens", str(new_tokens)] + (["--no_prefix_cache"] if "no_prefix" in name else [])
            t0 = time.perf_counter()
            proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
            out[name] = round(time.perf_counter() - t0, 2)
            if proc.returncode:
                sys.exit(f"{' '.join(cmd)} failed: {proc.stderr[-2000:]}")
    out["warm_over_cold"] = out["warm_compilation_cache"] / out["no_compilation_cache"]
    return out


def _try_icil(build, train, k, count):
    from jaxlm.errors import DataError

    try:
        return build(train, k=k, seed=0, count_tokens=count)
    except DataError:
        return None


if __name__ == "__main__":
    main()
