"""`jaxlm score` and `jaxlm generate`: a model (HF dir, .gguf or weight-package name), an input JSONL,
an output JSONL written in input order as batches finish (`--resume` continues one).
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable
from typing import Any

from jaxlm.errors import UsageError

SCORE_HELP = """\
Score targets given inputs. Each input line is a JSON object with either
  {"inputs": str, "targets": str}            (text, tokenized with the model's tokenizer), or
  {"input_ids": [int], "target_ids": [int]}  (token ids, used as given).
Each output line repeats the input fields and adds
  "logprob": sum of the target tokens' log-probabilities (natural log),
  "num_tokens": number of target tokens, "token_logprobs": per-token log-probabilities.
Decoder-only models (Llama family) score the sequence input_ids + target_ids and count only the
target tokens; text inputs get the model's BOS token when its tokenizer adds one (SmolLM2: none),
text targets get no special tokens; an empty input is replaced by BOS. Encoder-decoder models (T5)
feed the inputs to the encoder and the targets to the decoder after the model's decoder start
token; text is tokenized with the tokenizer's special tokens, so T5 targets end with </s>.
Output lines are written in input order as batches finish; --resume keeps the complete lines of an
existing output file and continues after them. Rows that share a long token prefix (a task's
instruction and examples) compute it once (Llama; exact); --no_prefix_cache recomputes every row.
"""

GENERATE_HELP = """\
Greedy generation with a KV cache. Each input line has {"inputs": str} or {"input_ids": [int]};
each output line repeats it and adds "prediction" (decoded text, cut at the first --stop string)
and "output_ids" (generated ids, EOS excluded). --chat wraps text inputs as one user turn of the
model's chat template. --temperature > 0 samples instead (with --top_k, --top_p and --seed; a line's
sample depends only on the seed and its line number). Prompts that share a long token prefix compute
it once (Llama; the same ids); --no_prefix_cache recomputes every prompt.
"""


def _add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help="HF directory, .gguf file, or smollm2-135m-instruct / all-minilm-l6-v2")
    p.add_argument("--input", required=True, help="input JSONL file")
    p.add_argument("--output", required=True, help="output JSONL file")
    p.add_argument("--adapter", default=None, help="PEFT LoRA adapter directory applied to every example")
    p.add_argument("--batch_size", type=int, default=8)
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"], help="compute dtype")
    p.add_argument("--resume", action="store_true", help="keep complete lines of an existing --output and continue")
    p.add_argument("--no_prefix_cache", action="store_true",
                   help="recompute every row in full (default: a shared token prefix is computed once)")


def _load(args) -> tuple[Any, Any]:
    from jaxlm.checkpoints.peft import load_peft_adapter
    from jaxlm.checkpoints.pretrained import load_pretrained

    pretrained = load_pretrained(args.model, dtype=args.dtype)
    lora = load_peft_adapter(args.adapter, pretrained) if args.adapter else None
    return pretrained, lora


def _ids(row: dict, key_text: str, key_ids: str, tokenizer, path: str, special: bool) -> list[int]:
    line = row["_line"]
    if key_ids in row:
        ids = row[key_ids]
        if not isinstance(ids, list) or not all(isinstance(i, int) and i >= 0 for i in ids):
            raise UsageError(f"{path}:{line}: field {key_ids!r} must be a list of non-negative ints")
        return ids
    if key_text in row:
        if not isinstance(row[key_text], str):
            raise UsageError(f"{path}:{line}: field {key_text!r} must be a string")
        if tokenizer is None:
            raise UsageError(f"{path}:{line}: text field {key_text!r} given but the model has no tokenizer; use {key_ids!r}")
        return tokenizer.encode(row[key_text], add_special_tokens=special)
    raise UsageError(f"{path}:{line}: needs {key_text!r} (str) or {key_ids!r} (list of ints)")


def _public(row: dict) -> dict:
    return {k: v for k, v in row.items() if k != "_line"}


def _run(args, make_records) -> int:
    """Shared score/generate driver: load, validate every line first, then write chunk by chunk."""
    from jaxlm.jsonl import JsonlWriter, chunks, count_complete_lines, read_jsonl

    rows = read_jsonl(args.input)
    if args.batch_size <= 0:
        raise UsageError(f"--batch_size must be positive, got {args.batch_size}")
    done = count_complete_lines(args.output) if args.resume else 0
    pretrained, lora = _load(args)
    from jaxlm.eval.engine import Engine

    if pretrained.family not in ("llama", "t5"):
        raise UsageError(f"{args.model}: a {pretrained.family} model is an encoder; {args.command} needs a llama or t5 model")
    engine = Engine(pretrained, batch_size=args.batch_size, prefix_cache=not args.no_prefix_cache)
    prepared = make_records(engine, rows)  # validates every line before any compute
    todo = list(range(done, len(rows)))
    start, tokens = time.perf_counter(), 0
    with JsonlWriter(args.output, append=done > 0) as out:
        for _, idx in chunks(todo, 8 * args.batch_size):
            records, n = prepared(idx, lora)
            out.write_all(records)
            tokens += n
    elapsed = time.perf_counter() - start
    print(
        f"jaxlm {args.command}: {len(todo)} lines -> {args.output} ({tokens} tokens, {elapsed:.1f}s, "
        f"{len(engine.compiled_shapes)} compiled shapes)",
        file=sys.stderr,
    )
    return 0


def cmd_score(args) -> int:
    def make(engine, rows):
        tok = engine.pretrained.tokenizer
        encdec = engine.pretrained.family == "t5"
        examples = [
            (_ids(r, "inputs", "input_ids", tok, args.input, True),
             _ids(r, "targets", "target_ids", tok, args.input, encdec))
            for r in rows
        ]
        for r, (_, tgt) in zip(rows, examples):
            if not tgt:
                raise UsageError(f"{args.input}:{r['_line']}: empty target")

        def run(idx, lora):
            results = engine.score([examples[i] for i in idx], lora=lora)
            records = [
                {**_public(rows[i]), "logprob": s.logprob, "num_tokens": s.num_tokens, "token_logprobs": s.token_logprobs}
                for i, s in zip(idx, results)
            ]
            return records, sum(len(examples[i][0]) + len(examples[i][1]) for i in idx)

        return run

    return _run(args, make)


def cmd_generate(args) -> int:
    if args.max_new_tokens <= 0:
        raise UsageError(f"--max_new_tokens must be positive, got {args.max_new_tokens}")
    from jaxlm.models.decoding import Sampling

    try:
        sampling = Sampling(args.temperature, args.top_k, args.top_p, args.seed)
    except ValueError as e:
        raise UsageError(f"--temperature/--top_k/--top_p: {e}") from None

    def make(engine, rows):
        tok = engine.pretrained.tokenizer
        prompts = []
        for r in rows:
            if args.chat and "inputs" in r and tok is not None and isinstance(r["inputs"], str):
                r = {**r, "inputs": tok.apply_chat_template([{"role": "user", "content": r["inputs"]}])}
                prompts.append(_ids(r, "inputs", "input_ids", tok, args.input, False))
            else:
                prompts.append(_ids(r, "inputs", "input_ids", tok, args.input, True))
            if not prompts[-1]:
                raise UsageError(f"{args.input}:{r['_line']}: empty input")
        from jaxlm.eval.engine import cut_at_stop, stop_token_sequences

        # A stop string's usual tokenizations end decoding early; the text is cut at it regardless.
        stops = [seq for s in args.stop for seq in stop_token_sequences(tok, s)] if tok else []

        def run(idx, lora):
            results = engine.generate([prompts[i] for i in idx], args.max_new_tokens, stops, lora=lora,
                                      sampling=sampling, row_ids=idx)
            records = []
            for i, res in zip(idx, results):
                text = cut_at_stop(tok.decode(res.output_ids), args.stop) if tok else None
                records.append({**_public(rows[i]), "prediction": text, "output_ids": res.output_ids})
            return records, sum(len(r.output_ids) for r in results)

        return run

    return _run(args, make)


def register(subparsers: Any) -> dict[str, Callable[[Any], int]]:
    """Add `score` and `generate`; return their handlers."""
    score = subparsers.add_parser("score", help="log-probabilities of targets", description=SCORE_HELP,
                                  formatter_class=argparse.RawDescriptionHelpFormatter)
    _add_model_args(score)
    gen = subparsers.add_parser("generate", help="greedy or sampled generation", description=GENERATE_HELP,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    _add_model_args(gen)
    gen.add_argument("--max_new_tokens", type=int, default=64)
    gen.add_argument("--stop", action="append", default=[], help="stop string (repeatable), e.g. $'\\n\\n'")
    gen.add_argument("--chat", action="store_true", help="apply the model's chat template to text inputs")
    gen.add_argument("--temperature", type=float, default=0.0, help="0: greedy (default); > 0: sample")
    gen.add_argument("--top_k", type=int, default=0, help="sample from the k most likely tokens (0: all)")
    gen.add_argument("--top_p", type=float, default=1.0, help="nucleus sampling mass in (0, 1] (1: all)")
    gen.add_argument("--seed", type=int, default=0, help="sampling seed")
    return {"score": cmd_score, "generate": cmd_generate}
