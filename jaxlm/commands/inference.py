"""`jaxlm score` and `jaxlm generate`: a model (HF dir, .gguf or weight-package name), an input JSONL,
an output JSONL written in input order as batches finish (`--resume` continues one).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
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
model's chat template. Generation stops at the EOS ids of the model's generation_config.json when it
names any (as transformers does), else at the tokenizer's; a generation_config.json field that
changes greedy output (repetition_penalty, num_beams, ...) is refused by name, and sampling fields
(do_sample, temperature, top_p, ...) do not apply: decoding is greedy unless --temperature > 0
samples (with --top_k, --top_p and --seed; a line's sample depends only on the seed and its line
number). Prompts that share a long token prefix compute it once (Llama; the same ids);
--no_prefix_cache recomputes every prompt.
"""


def _add_model_args(p: argparse.ArgumentParser) -> None:
    from jaxlm.checkpoints.hf import FLOAT_DTYPES

    p.add_argument("--model", required=True, help="a causal or seq2seq LM: HF directory, .gguf file, or the installed smollm2-135m-instruct")
    p.add_argument("--input", required=True, help="input JSONL file")
    p.add_argument("--output", required=True, help="output JSONL file")
    p.add_argument("--adapter", default=None, help="PEFT LoRA adapter directory applied to every example")
    p.add_argument("--batch_size", type=int, default=8, help="examples per forward pass")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"], help="compute dtype")
    p.add_argument("--param_dtype", default="float32", choices=FLOAT_DTYPES,
                   help="dtype the weights are held in (each tensor converted from its stored dtype as it is read)")
    p.add_argument("--resume", action="store_true", help="keep complete lines of an existing --output and continue")
    p.add_argument("--truncate", default=None, choices=["left", "right"],
                   help="cut an input that does not fit the model's max_position_embeddings (with the target, or "
                        "--max_new_tokens) from this side; by default such an input is an error")
    p.add_argument("--no_prefix_cache", action="store_true",
                   help="recompute every row in full (default: a shared token prefix is computed once)")


def _load(args) -> tuple[Any, Any]:
    from jaxlm.checkpoints.peft import load_peft_model
    from jaxlm.checkpoints.pretrained import load_pretrained

    pretrained = load_pretrained(args.model, dtype=args.dtype, param_dtype=args.param_dtype)
    if not args.adapter:
        return pretrained, None
    return load_peft_model(args.adapter, pretrained)  # modules_to_save replace base params


def _ids(row: dict, key_text: str, key_ids: str, tokenizer, path: str, special: bool,
         vocab_size: int | None = None) -> list[int]:
    """The token ids of one input field: `key_ids` as given (checked against `vocab_size`), else the
    text of `key_text` tokenized. UsageError naming path:line and the field otherwise."""
    line = row["_line"]
    if key_ids in row:
        ids = row[key_ids]
        # bool is an int subclass: `true` is not a token id
        if not isinstance(ids, list) or not all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in ids):
            raise UsageError(f"{path}:{line}: field {key_ids!r} must be a list of non-negative ints")
        if vocab_size is not None and ids and max(ids) >= vocab_size:
            raise UsageError(f"{path}:{line}: field {key_ids!r} has token id {max(ids)}, but the model's "
                             f"vocabulary has {vocab_size} ids (0..{vocab_size - 1})")
        return ids
    if key_text in row:
        if not isinstance(row[key_text], str):
            raise UsageError(f"{path}:{line}: field {key_text!r} must be a string")
        if tokenizer is None:
            raise UsageError(f"{path}:{line}: text field {key_text!r} given but the model has no tokenizer; use {key_ids!r}")
        return tokenizer.encode(row[key_text], add_special_tokens=special)
    raise UsageError(f"{path}:{line}: needs {key_text!r} (str) or {key_ids!r} (list of ints)")


def context_length(pretrained: Any) -> int | None:
    """Positions a decoder-only model was trained for (`max_position_embeddings`); None for T5, whose
    relative position buckets have no hard limit."""
    return getattr(pretrained.config, "max_position_embeddings", None) if pretrained.family == "llama" else None


def fit_context(ids: list[int], room: int, side: str | None, where: str, what: str) -> tuple[list[int], bool]:
    """`ids` cut to `room` tokens from `side` ("left": drop the first ones, "right": the last ones);
    (ids, whether cut). With `side` None an input that does not fit is a UsageError naming `where`."""
    if len(ids) <= room:
        return ids, False
    if side is None:
        raise UsageError(f"{where}: {what} ({len(ids)} tokens) does not fit the model's context (room for {room}); "
                         "shorten it, or pass --truncate left|right to cut it")
    if room <= 0:
        raise UsageError(f"{where}: {what} leaves no room for the input even with --truncate")
    return (ids[len(ids) - room:] if side == "left" else ids[:room]), True


def _report_cut(args: Any, cut: int, limit: int) -> None:
    if cut:
        print(f"jaxlm {args.command}: --truncate {args.truncate} cut {cut} input(s) to fit "
              f"max_position_embeddings={limit}", file=sys.stderr)


def _public(row: dict) -> dict:
    return {k: v for k, v in row.items() if k != "_line"}


def _run(args, make_records) -> int:
    """Shared score/generate driver: load, validate every line first, then write chunk by chunk."""
    from jaxlm.files import writable_dir
    from jaxlm.jsonl import JsonlWriter, chunks, count_complete_lines, read_jsonl

    rows = read_jsonl(args.input)
    if args.batch_size <= 0:
        raise UsageError(f"--batch_size must be positive, got {args.batch_size}")
    if Path(args.output).is_dir():
        raise UsageError(f"--output {args.output}: is a directory, not a file")
    writable_dir(Path(args.output).parent, "--output", named=args.output)  # before loading the model
    done = count_complete_lines(args.output) if args.resume else 0
    pretrained, lora = _load(args)
    from jaxlm.eval.engine import Engine

    if pretrained.family not in ("llama", "t5"):
        raise UsageError(f"{args.model}: a {pretrained.family} model is an encoder; {args.command} needs a llama or t5 model")
    engine = Engine(pretrained, batch_size=args.batch_size, prefix_cache=not args.no_prefix_cache)
    prepared = make_records(engine, rows)  # validates every line before any compute
    todo = list(range(done, len(rows)))
    start, tokens = time.perf_counter(), 0
    from jaxlm.progress import bar

    with JsonlWriter(args.output, append=done > 0) as out, bar(len(todo), args.command, "line") as progress:
        for _, idx in chunks(todo, 8 * args.batch_size):
            records, n = prepared(idx, lora)
            out.write_all(records)
            tokens += n
            progress.update(len(idx))
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
        vocab = engine.pretrained.config.vocab_size
        limit = context_length(engine.pretrained)
        examples, cut = [], 0
        for r in rows:
            inp = _ids(r, "inputs", "input_ids", tok, args.input, True, vocab)
            tgt = _ids(r, "targets", "target_ids", tok, args.input, encdec, vocab)
            where = f"{args.input}:{r['_line']}"
            if not tgt:
                raise UsageError(f"{where}: empty target")
            if limit is not None:
                if len(tgt) >= limit:  # a target is never cut: that would change what is scored
                    raise UsageError(f"{where}: the target ({len(tgt)} tokens) does not fit the model's context "
                                     f"(max_position_embeddings={limit}, one position kept for the input)")
                inp, was_cut = fit_context(inp, limit - len(tgt), args.truncate, where, "input + target")
                cut += was_cut
            examples.append((inp, tgt))
        _report_cut(args, cut, limit)

        def run(idx, lora):
            results = engine.score([examples[i] for i in idx], lora=lora)
            records = [
                {**_public(rows[i]), "logprob": s.logprob, "num_tokens": s.num_tokens, "token_logprobs": s.token_logprobs}
                for i, s in zip(idx, results)
            ]
            return records, sum(len(examples[i][0]) + len(examples[i][1]) for i in idx)

        return run

    return _run(args, make)


def _check_cache_fits(pretrained: Any, batch_size: int, max_new_tokens: int) -> None:
    """UsageError naming --max_new_tokens when the decoding KV cache of one batch alone (float32 keys and
    values for `max_new_tokens` slots per row, every decoder layer) exceeds half of this machine's memory:
    the T5 decoder has no position limit to check against, and a long Llama context can still not fit."""
    c = pretrained.config
    if pretrained.family == "t5":
        layers, width = (c.num_decoder_layers or c.num_layers), c.num_heads * c.d_kv
    else:
        layers, width = c.num_layers, c.num_kv_heads * c.dim_per_head
    need = 2 * layers * width * 4 * batch_size * max_new_tokens
    total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    if need > total // 2:
        raise UsageError(f"--max_new_tokens {max_new_tokens}: the KV cache of one batch of {batch_size} would take "
                         f"{need / 2**30:.1f} GiB, more than half of this machine's {total / 2**30:.0f} GiB; "
                         "ask for fewer new tokens or a smaller --batch_size")


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
        vocab = engine.pretrained.config.vocab_size
        limit = context_length(engine.pretrained)
        _check_cache_fits(engine.pretrained, args.batch_size, args.max_new_tokens)
        if limit is not None and args.max_new_tokens >= limit:
            raise UsageError(f"--max_new_tokens {args.max_new_tokens}: the model has {limit} positions "
                             f"(max_position_embeddings), so at most {limit - 1} new tokens fit after a prompt")
        prompts, cut = [], 0
        for r in rows:
            if args.chat and "inputs" in r and tok is not None and isinstance(r["inputs"], str):
                r = {**r, "inputs": tok.apply_chat_template([{"role": "user", "content": r["inputs"]}])}
                prompts.append(_ids(r, "inputs", "input_ids", tok, args.input, False, vocab))
            else:
                prompts.append(_ids(r, "inputs", "input_ids", tok, args.input, True, vocab))
            if not prompts[-1]:
                raise UsageError(f"{args.input}:{r['_line']}: empty input")
            if limit is not None:
                prompts[-1], was_cut = fit_context(prompts[-1], limit - args.max_new_tokens, args.truncate,
                                                   f"{args.input}:{r['_line']}",
                                                   f"input + --max_new_tokens {args.max_new_tokens}")
                cut += was_cut
        _report_cut(args, cut, limit)
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
    gen.add_argument("--max_new_tokens", type=int, default=64, help="generated tokens per example at most")
    gen.add_argument("--stop", action="append", default=[], help="stop string (repeatable), e.g. $'\\n\\n'")
    gen.add_argument("--chat", action="store_true", help="apply the model's chat template to text inputs")
    gen.add_argument("--temperature", type=float, default=0.0, help="0: greedy (default); > 0: sample")
    gen.add_argument("--top_k", type=int, default=0, help="sample from the k most likely tokens (0: all)")
    gen.add_argument("--top_p", type=float, default=1.0, help="nucleus sampling mass in (0, 1] (1: all)")
    gen.add_argument("--seed", type=int, default=0, help="sampling seed")
    return {"score": cmd_score, "generate": cmd_generate}
