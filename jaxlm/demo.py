"""The main job on embedded defaults (for now): greedy generation with SmolLM2-135M-Instruct on a
few instruction prompts, with timing. Later studies replace it."""

from __future__ import annotations

import json
import time
from pathlib import Path

DEMO_PROMPTS: tuple[str, ...] = (
    "Definition: Classify the sentiment of the review as positive or negative.\n\n"
    "Input: The food was cold and the waiter ignored us for an hour.\nOutput:",
    "Definition: Answer the arithmetic question with a number only.\n\nInput: What is 12 plus 30?\nOutput:",
    "Definition: Rewrite the sentence in the past tense.\n\nInput: She walks to the station every morning.\nOutput:",
    "Definition: Name the capital city of the given country.\n\nInput: Japan\nOutput:",
)


def run_demo(model: str, workdir: str, max_new_tokens: int) -> int:
    from jaxlm.checkpoints.pretrained import load_pretrained
    from jaxlm.eval.engine import Engine
    from jaxlm.eval.jsonl import JsonlWriter

    t0 = time.perf_counter()
    pretrained = load_pretrained(model)
    tok = pretrained.tokenizer
    print(f"loaded {pretrained.source} ({pretrained.family}, {pretrained.config.num_layers} layers) in {time.perf_counter() - t0:.1f}s")
    prompts = [tok.apply_chat_template([{"role": "user", "content": p}]) for p in DEMO_PROMPTS]
    engine = Engine(pretrained, batch_size=len(prompts))
    ids = [tok.encode(p, add_special_tokens=False) for p in prompts]
    t1 = time.perf_counter()
    results = engine.generate(ids, max_new_tokens=max_new_tokens)
    first = time.perf_counter() - t1
    t2 = time.perf_counter()
    results = engine.generate(ids, max_new_tokens=max_new_tokens)
    steady = time.perf_counter() - t2
    n_tokens = sum(len(r.output_ids) for r in results)
    out_dir = Path(workdir)
    out_dir.mkdir(parents=True, exist_ok=True)
    with JsonlWriter(out_dir / "predictions.jsonl") as out:
        out.write_all(
            {"prompt": p, "prediction": tok.decode(r.output_ids).strip(), "num_tokens": len(r.output_ids)}
            for p, r in zip(DEMO_PROMPTS, results)
        )
    print()
    for p, r in zip(DEMO_PROMPTS, results):
        question = p.split("Input: ", 1)[1].split("\n")[0]
        print(f"- {question}\n  -> {json.dumps(tok.decode(r.output_ids).strip())}")
    print(
        f"\ngreedy, batch {len(prompts)}: {n_tokens} new tokens; first call {first:.1f}s (includes compile), "
        f"steady {steady:.2f}s = {n_tokens / steady:.1f} tokens/s"
    )
    print(f"predictions: {out_dir / 'predictions.jsonl'}")
    return 0
