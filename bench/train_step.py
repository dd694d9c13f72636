"""Train-step speed and memory: jaxlm vs transformers (+ peft) on SmolLM2-135M-Instruct, CPU.

Same weights (the installed GGUF), same token batch, same sequence length, AdamW (lr 1e-4,
betas 0.9/0.999, eps 1e-8, no weight decay, no clipping) on both sides, for a LoRA step (rank 8,
alpha 16, all attention and MLP projections, base frozen) and a full-finetune step. Each
(framework, mode) runs in its own subprocess, so the peak RSS (`resource.getrusage` high-water
mark) of one does not hide in another's. jaxlm's compile is excluded (warm-up steps); tokens/s is
batch * seq_len / the median step time over the timed steps (the median, because on a shared
machine a few steps stall; the best step is printed too).

    python bench/train_step.py [--batch 4] [--seq 128] [--warmup 3] [--steps 5] [--modes lora,full]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

REPO = Path(__file__).resolve().parents[1]
MODEL = "smollm2-135m-instruct"
LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
RANK, ALPHA, LR = 8, 16.0, 1e-4


def token_batch(batch: int, seq: int, vocab: int):
    """Deterministic token ids (the same array for both frameworks; speed does not depend on content)."""
    import numpy as np

    return np.random.default_rng(0).integers(1, vocab, size=(batch, seq)).astype(np.int32)


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def timed(step, warmup: int, steps: int) -> tuple[list[float], list[float]]:
    losses, times = [], []
    for i in range(warmup + steps):
        start = time.perf_counter()
        losses.append(step())
        if i >= warmup:
            times.append(time.perf_counter() - start)
    return losses, times


def run_jaxlm(mode: str, batch: int, seq: int, warmup: int, steps: int) -> dict:
    import jax
    import numpy as np

    from jaxlm.models.lora import LoraSpec
    from jaxlm.train.objectives import CausalLM
    from jaxlm.train.optim import make_optimizer
    from jaxlm.sharding import make_mesh
    from jaxlm.train.steps import TrainStep

    lora = LoraSpec(LORA_TARGETS, RANK, ALPHA) if mode == "lora" else None
    objective = CausalLM(pretrained=MODEL, lora=lora)
    optimizer = make_optimizer("adamw", learning_rate=LR, schedule="constant", warmup_steps=0, total_steps=1,
                               clip_norm=None, b2=0.999, weight_decay=0.0)
    step = TrainStep(objective, optimizer, make_mesh("data=1", jax.devices()[:1]))
    state, frozen = step.init_state(jax.random.PRNGKey(0))
    ids = token_batch(batch, seq, objective.config.vocab_size)
    targets = np.zeros_like(ids)
    targets[:, :-1] = ids[:, 1:]
    weights = np.zeros(ids.shape, np.float32)
    weights[:, :-1] = 1.0  # the same positions HF's shifted labels score
    host = {"decoder_input_tokens": ids, "decoder_target_tokens": targets, "decoder_loss_weights": weights,
            "decoder_positions": np.broadcast_to(np.arange(seq, dtype=np.int32), ids.shape).copy(),
            "decoder_segment_ids": np.ones_like(ids)}
    device_batch = step.global_batch(host)
    holder = {"state": state}

    def one():
        holder["state"], metrics = step(holder["state"], frozen, device_batch)
        return float(metrics["loss"])  # blocks until the step is done

    losses, times = timed(one, warmup, steps)
    trainable = sum(x.size for x in jax.tree_util.tree_leaves(holder["state"].params))
    return {"losses": losses, "times": times, "trainable_params": int(trainable)}


def run_torch(mode: str, batch: int, seq: int, warmup: int, steps: int) -> dict:
    import torch
    from transformers import AutoModelForCausalLM

    from jaxlm.checkpoints.pretrained import resolve_path

    path = resolve_path(MODEL)
    model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32)
    if mode == "lora":
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(model, LoraConfig(r=RANK, lora_alpha=ALPHA, lora_dropout=0.0,
                                                 target_modules=list(LORA_TARGETS), bias="none"))
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=LR, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0)
    ids = torch.tensor(token_batch(batch, seq, model.config.vocab_size), dtype=torch.long)

    def one():
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return float(loss.detach())

    losses, times = timed(one, warmup, steps)
    return {"losses": losses, "times": times, "trainable_params": int(sum(p.numel() for p in params)),
            "torch_threads": torch.get_num_threads()}


def worker(framework: str, mode: str, batch: int, seq: int, warmup: int, steps: int) -> None:
    run = run_jaxlm if framework == "jaxlm" else run_torch
    out = run(mode, batch, seq, warmup, steps)
    median = statistics.median(out["times"])
    out.update(framework=framework, mode=mode, step_s=median, best_step_s=min(out["times"]),
               tokens_per_s=batch * seq / median, peak_rss_mib=peak_rss_mib())
    print("RESULT " + json.dumps(out))


def measure(framework: str, mode: str, args) -> dict:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", framework, mode, "--batch", str(args.batch),
           "--seq", str(args.seq), "--warmup", str(args.warmup), "--steps", str(args.steps)]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH", "")]))}
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    lines = [l for l in proc.stdout.splitlines() if l.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        raise RuntimeError(f"{framework} {mode} failed:\n{proc.stderr[-3000:]}")
    return json.loads(lines[-1].removeprefix("RESULT "))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--modes", default="lora,full")
    parser.add_argument("--worker", nargs=2, metavar=("FRAMEWORK", "MODE"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(*args.worker, args.batch, args.seq, args.warmup, args.steps)
        return
    rows = []
    for mode in args.modes.split(","):
        pair = {fw: measure(fw, mode, args) for fw in ("jaxlm", "transformers")}
        rows.append((mode, pair))
    print(json.dumps({"batch": args.batch, "seq": args.seq, "warmup": args.warmup, "steps": args.steps,
                      "cpus": os.cpu_count(), "results": [p for _, p in rows]}, indent=1))
    print(f"\nSmolLM2-135M-Instruct train step, CPU, batch {args.batch} x seq {args.seq}, AdamW, "
          f"median of {args.steps} steps after {args.warmup} warm-up")
    print(f"{'mode':5} {'framework':13} {'trainable':>12} {'step s':>8} {'best s':>7} {'tokens/s':>9} "
          f"{'peak RSS MiB':>13} {'loss[0]':>8} {'loss[-1]':>8}")
    for mode, pair in rows:
        for fw, r in pair.items():
            print(f"{mode:5} {fw:13} {r['trainable_params']:12,} {r['step_s']:8.3f} {r['best_step_s']:7.3f} "
                  f"{r['tokens_per_s']:9.1f} "
                  f"{r['peak_rss_mib']:13.0f} {r['losses'][0]:8.4f} {r['losses'][-1]:8.4f}")
        ratio = pair["jaxlm"]["tokens_per_s"] / pair["transformers"]["tokens_per_s"]
        mem = pair["jaxlm"]["peak_rss_mib"] / pair["transformers"]["peak_rss_mib"]
        print(f"{mode:5} jaxlm / transformers: {ratio:.2f}x tokens/s (goal >= 1.5x), {mem:.2f}x peak RSS")


if __name__ == "__main__":
    main()
