"""End to end, whole processes: `jaxlm generate` / `jaxlm score` against a transformers loop doing the
same work on the same JSONL (load, compile and writing included), side by side, A B A B.

    python bench/cli_vs_transformers.py [--n 96] [--per_task 12] [--batch 8] [--new_tokens 16] [--repeats 3]
                                        [--format hf|gguf]

Inputs: `def_pos2` prompts of Super-NI test tasks (bench/eval_sweep.py's `sweep_prompts`: the first
--per_task instances of each task in turn, as a sweep cell has them), as token ids, so both sides read
the same ids. generate: greedy, --new_tokens, stopping at EOS (both sides). score: 3 options per
prompt (its own answer and two other instances' answers of its task), one line per (prompt, option),
the sum of the option's token log-probs. Both sides load the same SmolLM2-135M-Instruct weights in
float32: by default a HF safetensors directory exported once from the installed GGUF package
(`--format hf`, what most checkpoints are), or the GGUF file itself (`--format gguf`; transformers
dequantizes it at load). The transformers peer (`--peer generate|score`, this file) sorts rows by length as the engine does, runs batches of
--batch with `generate` / one forward, and writes the same fields. Each pair is timed --repeats times
after a warm-up of each (page cache, jaxlm's compilation cache and GGUF index warm: the "second run");
the medians and the per-pair ratio transformers / jaxlm are printed, with the agreement of outputs.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "bench"))


def peer(kind: str, model_path: str, inp: Path, out: Path, batch: int, new_tokens: int) -> None:
    """The transformers side: read the JSONL, run it, write the JSONL (the CLI's fields)."""
    import torch
    from transformers import AutoModelForCausalLM

    rows = [json.loads(line) for line in inp.read_text().splitlines()]
    path = Path(model_path)
    if path.suffix == ".gguf":
        model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32).eval()
    else:
        model = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32).eval()
    pad = model.config.pad_token_id if model.config.pad_token_id is not None else 0
    results: list[dict | None] = [None] * len(rows)
    if kind == "generate":
        from eval_sweep import hf_generate_all

        eos = model.generation_config.eos_token_id
        eos = list(eos) if isinstance(eos, (list, tuple)) else [eos]
        outs = hf_generate_all(model, [r["input_ids"] for r in rows], batch, new_tokens, pad, eos)
        results = [{**r, "output_ids": o} for r, o in zip(rows, outs)]
    else:
        seqs = [r["input_ids"] + r["target_ids"] for r in rows]
        order = sorted(range(len(rows)), key=lambda i: -len(seqs[i]))
        for start in range(0, len(order), batch):
            idx = order[start:start + batch]
            width = max(len(seqs[i]) for i in idx)
            ids = torch.tensor([seqs[i] + [pad] * (width - len(seqs[i])) for i in idx])
            mask = torch.tensor([[1] * len(seqs[i]) + [0] * (width - len(seqs[i])) for i in idx])
            with torch.no_grad():
                logp = torch.log_softmax(model(input_ids=ids, attention_mask=mask).logits.float(), -1)
            for r, i in enumerate(idx):
                n_in, n_t = len(rows[i]["input_ids"]), len(rows[i]["target_ids"])
                pos = torch.arange(n_in - 1, n_in - 1 + n_t)
                tok = logp[r, pos, torch.tensor(rows[i]["target_ids"])]
                results[i] = {**rows[i], "logprob": float(tok.sum()), "num_tokens": n_t}
    out.write_text("".join(json.dumps(r) + "\n" for r in results))


def write_inputs(tmp: Path, n: int, per_task: int, max_prompt_tokens: int) -> tuple[Path, Path]:
    import jaxlm
    from eval_sweep import DATA, sweep_prompts

    tok = jaxlm.load_pretrained("smollm2-135m-instruct", weights=False).tokenizer
    prompts, _, options = sweep_prompts(tok, Path(DATA), n, max_prompt_tokens, per_task)
    gen, score = tmp / "generate.jsonl", tmp / "score.jsonl"
    gen.write_text("".join(json.dumps({"input_ids": p}) + "\n" for p in prompts))
    score.write_text("".join(json.dumps({"input_ids": p, "target_ids": tok.encode(" " + o, add_special_tokens=False)})
                             + "\n" for p, opts in zip(prompts, options) for o in opts))
    return gen, score


def timed(cmd: list[str]) -> float:
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.perf_counter() - t0


def agreement(kind: str, a: Path, b: Path) -> str:
    ra = [json.loads(x) for x in a.read_text().splitlines()]
    rb = [json.loads(x) for x in b.read_text().splitlines()]
    if kind == "generate":
        same = sum(x["output_ids"] == y["output_ids"] for x, y in zip(ra, rb))
        return f"identical outputs {same}/{len(ra)}"
    rel = max(abs(x["logprob"] - y["logprob"]) / max(1.0, abs(y["logprob"])) for x, y in zip(ra, rb))
    picks = lambda rows: [max(range(3), key=lambda k: rows[3 * i + k]["logprob"]) for i in range(len(rows) // 3)]
    same = sum(x == y for x, y in zip(picks(ra), picks(rb)))
    return f"same option picked {same}/{len(ra) // 3}, max rel. logprob diff {rel:.1e}"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=96, help="prompts (default 96)")
    p.add_argument("--per_task", type=int, default=12, help="prompts per task (default 12: 8 tasks)")
    p.add_argument("--max_prompt_tokens", type=int, default=384)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--new_tokens", type=int, default=16)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--workloads", default="generate,score")
    p.add_argument("--format", choices=("hf", "gguf"), default="hf", help="weights both sides load (default hf)")
    p.add_argument("--model", help=argparse.SUPPRESS)
    p.add_argument("--peer", choices=("generate", "score"), help=argparse.SUPPRESS)
    p.add_argument("--input", type=Path, help=argparse.SUPPRESS)
    p.add_argument("--output", type=Path, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.peer:
        peer(args.peer, args.model, args.input, args.output, args.batch, args.new_tokens)
        return
    py = sys.executable
    print(json.dumps({"load_average": os.getloadavg(), "cpu_count": os.cpu_count(), "n": args.n,
                      "format": args.format, "batch": args.batch, "new_tokens": args.new_tokens}), flush=True)
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        files = dict(zip(("generate", "score"), write_inputs(tmp, args.n, args.per_task, args.max_prompt_tokens)))
        from jaxlm.checkpoints.pretrained import export_hf, resolve_path

        model = resolve_path("smollm2-135m-instruct")
        if args.format == "hf":
            import jaxlm

            model = export_hf(jaxlm.load_pretrained("smollm2-135m-instruct"), tmp / "hf")
        for kind in [w for w in args.workloads.split(",") if w]:
            ours = [py, "-m", "jaxlm.cli", kind, "--model", str(model), "--input", str(files[kind]),
                    "--output", str(tmp / f"{kind}.jaxlm.jsonl"), "--batch_size", str(args.batch)]
            if kind == "generate":
                ours += ["--max_new_tokens", str(args.new_tokens)]
            theirs = [py, __file__, "--peer", kind, "--model", str(model), "--input", str(files[kind]), "--output",
                      str(tmp / f"{kind}.hf.jsonl"), "--batch", str(args.batch), "--new_tokens", str(args.new_tokens)]
            timed(ours), timed(theirs)  # warm-up: page cache, compilation cache, GGUF index
            pairs = [(timed(ours), timed(theirs)) for _ in range(args.repeats)]
            a = [x for x, _ in pairs]
            b = [y for _, y in pairs]
            ratios = [y / x for x, y in pairs]
            print(f"{kind:8s} jaxlm {statistics.median(a):6.1f}s  transformers {statistics.median(b):6.1f}s  "
                  f"ratio {statistics.median(ratios):.2f}x (min {min(ratios):.2f}, max {max(ratios):.2f}); "
                  f"{agreement(kind, tmp / f'{kind}.jaxlm.jsonl', tmp / f'{kind}.hf.jsonl')}", flush=True)
    print(json.dumps({"load_average_end": os.getloadavg()}))


if __name__ == "__main__":
    main()
