"""jaxlm vs transformers (PyTorch) on SmolLM2-135M-Instruct, same weights, prompts and batch, CPU.

Prints tokens/s for both and the ratio, for scoring (teacher-forced log-probs of whole sequences)
and for greedy generation (KV cache, a fixed number of new tokens, EOS disabled on both sides).
Compilation is excluded for jaxlm (one warm-up call); each timing is the best of --repeats runs.

    python bench/score_generate.py [--batch 1,4,8] [--new_tokens 64] [--repeats 3] [--torch_device cuda]

On a GPU machine (bench/gpu.sh) JAX runs on its default device and `--torch_device cuda` puts the
transformers model and inputs on the GPU; every timed call ends by copying its result to the host.
"""

from __future__ import annotations

import argparse
import json
import os
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import jax
import jax.numpy as jnp
import numpy as np
import torch

import jaxlm
from jaxlm.checkpoints.pretrained import resolve_path
from jaxlm.eval.engine import Engine
from jaxlm.models import decoding

PROMPTS = [
    "Definition: Classify the sentiment of the review as positive or negative.\n\nInput: The plot dragged, but the acting was superb.\nOutput:",
    "Definition: Answer the question with a single number.\n\nInput: How many legs does a spider have?\nOutput:",
    "Definition: Translate the sentence into French.\n\nInput: The weather is nice today and we are going to the beach.\nOutput:",
    "Definition: Summarize the passage in one sentence.\n\nInput: The city council voted on Tuesday to expand the bike lane network, citing safety data and rising commuter demand.\nOutput:",
    "Definition: Given a word, write its antonym.\n\nInput: generous\nOutput:",
    "Definition: Decide whether the two sentences mean the same thing. Answer yes or no.\n\nInput: He bought a car. / He purchased an automobile.\nOutput:",
    "Definition: Extract the name of the person mentioned in the text.\n\nInput: Yesterday Maria Lopez presented the quarterly results to the board.\nOutput:",
    "Definition: Complete the sentence with a plausible ending.\n\nInput: After the storm passed, the children ran outside and\nOutput:",
]


def best_of(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def measure(pre, hf, batch: int, new_tokens: int, repeats: int, device: str = "cpu") -> dict:
    """Scoring and greedy-generation tokens/s for both implementations at one batch size."""
    tok = pre.tokenizer
    prompts = [tok.encode(p) for p in (PROMPTS * (batch // len(PROMPTS) + 1))[:batch]]
    width = max(map(len, prompts))
    ids = np.array([[tok.pad_id] * (width - len(p)) + p for p in prompts], np.int32)
    mask = np.array([[0] * (width - len(p)) + [1] * len(p) for p in prompts], np.int32)
    result: dict = {"batch": batch}

    # ---- scoring: full sequences (prompt + a fixed continuation) teacher-forced
    continuation = tok.encode(" The answer is given above, followed by a short explanation of the reasoning.")
    examples = [(p, continuation) for p in prompts]
    engine = Engine(pre, batch_size=batch)
    engine.score(examples)  # compile
    t_jax = best_of(lambda: engine.score(examples), repeats)
    seqs = [p + continuation for p in prompts]
    w = max(map(len, seqs))
    s_ids = torch.tensor([s + [tok.pad_id] * (w - len(s)) for s in seqs], device=device)
    s_mask = torch.tensor([[1] * len(s) + [0] * (w - len(s)) for s in seqs], device=device)

    def hf_score():
        with torch.no_grad():
            logits = hf(input_ids=s_ids, attention_mask=s_mask).logits
            lp = torch.log_softmax(logits[:, :-1].float(), -1).gather(-1, s_ids[:, 1:, None])[..., 0]
            return (lp * s_mask[:, 1:]).sum(-1).cpu()

    t_hf = best_of(hf_score, repeats)
    n_score = int(s_mask.sum())
    result["score"] = {"jaxlm": n_score / t_jax, "transformers": n_score / t_hf, "ratio": t_hf / t_jax}

    # ---- greedy generation, exactly new_tokens per row
    def jax_generate():
        out, _ = decoding.greedy_generate(pre.model, pre.params, jnp.asarray(ids), jnp.asarray(mask),
                                       max_new_tokens=new_tokens, eos_ids=(), pad_id=tok.pad_id)
        return np.asarray(out)

    jax_out = jax_generate()  # compile
    t_jax = best_of(jax_generate, repeats)

    def hf_generate():
        with torch.no_grad():
            return hf.generate(torch.tensor(ids, dtype=torch.long, device=device),
                               attention_mask=torch.tensor(mask, dtype=torch.long, device=device),
                               max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                               eos_token_id=None, pad_token_id=tok.pad_id).cpu()

    hf_out = hf_generate()[:, ids.shape[1]:].numpy()
    t_hf = best_of(hf_generate, repeats)
    n_gen = batch * new_tokens
    result["generate"] = {"jaxlm": n_gen / t_jax, "transformers": n_gen / t_hf, "ratio": t_hf / t_jax}
    result["generate_same_tokens_fraction"] = float((jax_out == hf_out).mean())
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", default="1,4,8", help="comma-separated batch sizes")
    parser.add_argument("--new_tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--torch_device", default="cpu", help="where transformers runs: cpu or cuda (default cpu)")
    args = parser.parse_args()
    from transformers import AutoModelForCausalLM

    pre = jaxlm.load_pretrained("smollm2-135m-instruct")
    path = resolve_path("smollm2-135m-instruct")
    hf = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32).eval().to(args.torch_device)
    header = {"device": jax.devices()[0].platform, "torch_device": args.torch_device,
              "torch_threads": torch.get_num_threads(), "new_tokens": args.new_tokens}
    rows = [measure(pre, hf, int(b), args.new_tokens, args.repeats, args.torch_device) for b in args.batch.split(",")]
    print(json.dumps({**header, "results": rows}, indent=1))
    print(f"\n{'batch':>5} {'task':9} {'jaxlm tok/s':>12} {'transformers tok/s':>19} {'ratio':>7}")
    for row in rows:
        for task in ("score", "generate"):
            r = row[task]
            print(f"{row['batch']:>5} {task:9} {r['jaxlm']:12.1f} {r['transformers']:19.1f} {r['ratio']:6.2f}x")


if __name__ == "__main__":
    main()
