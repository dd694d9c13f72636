"""`jaxlm metrics` (Super-NI metrics of a predictions file) and `jaxlm eval` (a resumable evaluation
sweep from gin files).

Light imports only at module level: the CLI imports this module to build its parser.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from typing import Any

from jaxlm import jsonl
from jaxlm.commands.gin_flags import add_gin_flags, gin_bindings, gin_search_paths, gin_subparser

METRICS_HELP = """\
Super-NI metrics of a predictions file, the official way (ROUGE-L via rouge-score, exact match;
max over references, mean, x100):
  jaxlm metrics --input runs/eval/predictions.jsonl [--track default|xlingual]
Each line: {"prediction": str, "references": [str, ...], "task": str, "category": str (optional)}.
Prints JSON: overall rougeL/exact_match, per task and (when lines carry "category") per category;
each group also names the benchmark's metric for its category ("metric") and its value ("score").
"""

EVAL_HELP = """\
Evaluation sweep from gin files: a grid of models x methods x tasks (x seeds).
  jaxlm eval --gin_file=jaxlm/configs/eval/smollm2_superni.gin --workdir runs/eval_superni
  jaxlm eval --gin_file=jaxlm/configs/tests/tiny_eval.gin --gin.TaskSet.max_instances=4 --workdir /tmp/e
Writes DIR/results.jsonl (one line per finished cell, appended at once), DIR/predictions/<cell>.jsonl,
DIR/summary.md, DIR/summary.csv, DIR/plots/*.png, DIR/config.gin and DIR/results.json (shaped like
lm-evaluation-harness output, bootstrap standard errors). Shared prompt prefixes are computed once
(--no_prefix_cache: every row in full). Rerunning with the same
--workdir skips finished cells. Prints the sweep summary (cells run/skipped, compile count) as JSON.
"""


def read_predictions(path: str) -> tuple[list[str], list[list[str]], list[str], list[str | None] | None]:
    """(predictions, references, tasks, categories or None) of a predictions JSONL; a bad line is a
    UsageError naming file:line and the field."""
    from jaxlm.errors import UsageError
    from jaxlm.jsonl import InputError, read_jsonl

    try:
        rows = read_jsonl(path)
    except InputError as e:
        raise UsageError(str(e)) from None
    if not rows:
        raise UsageError(f"{path}: no prediction lines")
    preds, refs, tasks, cats = [], [], [], []
    for row in rows:
        where = f"{path}:{row['_line']}"
        pred = row.get("prediction")
        if not isinstance(pred, str):
            raise UsageError(f"{where}: field 'prediction' must be a string")
        ref = row.get("references")
        if not isinstance(ref, list) or not ref or not all(isinstance(r, str) for r in ref):
            raise UsageError(f"{where}: field 'references' must be a non-empty list of strings")
        task = row.get("task")
        if not isinstance(task, str) or not task:
            raise UsageError(f"{where}: field 'task' must be a non-empty string")
        cat = row.get("category")
        if cat is not None and not isinstance(cat, str):
            raise UsageError(f"{where}: field 'category' must be a string when given")
        preds.append(pred)
        refs.append(ref)
        tasks.append(task)
        cats.append(cat)
    return preds, refs, tasks, (cats if any(c is not None for c in cats) else None)


def cmd_metrics(args: Any) -> int:
    from jaxlm.eval.metrics import superni_report

    preds, refs, tasks, cats = read_predictions(args.input)
    report = superni_report(preds, refs, tasks, cats, track=args.track)
    print(jsonl.dumps(report, indent=2, sort_keys=False))
    return 0


def cmd_eval(args: Any) -> int:
    from jaxlm.errors import UsageError
    from jaxlm.eval import sweep
    from jaxlm.experiment.gin_config import parse_config
    from jaxlm.files import RunLock, writable_dir

    if not args.gin_file:
        raise UsageError("jaxlm eval needs at least one --gin_file")
    mesh = [f"eval_sweep.mesh_shape = {args.mesh!r}"] if args.mesh else []  # as `plan --mesh`; --gin bindings win
    no_cache = ["eval_sweep.prefix_cache = False"] if args.no_prefix_cache else []
    parse_config(args.gin_file, mesh + no_cache + list(gin_bindings(args)), gin_search_paths(args))  # ConfigError before any compute
    writable_dir(args.workdir, "--workdir")  # created only once the config parses, checked before any compute
    with RunLock(args.workdir):
        summary = sweep.run_from_gin(args.workdir)
    print(jsonl.dumps({k: v for k, v in summary.items() if k != "reported"}), file=sys.stderr)
    return 0


def register(subparsers: Any) -> dict[str, Callable[[Any], int]]:
    """Add `metrics` and `eval`; return {command name: handler(args) -> exit status}."""
    metrics = subparsers.add_parser("metrics", help="Super-NI ROUGE-L / exact match of a predictions JSONL",
                                    description=METRICS_HELP, formatter_class=argparse.RawDescriptionHelpFormatter)
    metrics.add_argument("--input", required=True, help="predictions JSONL")
    metrics.add_argument("--track", default="default", choices=["default", "xlingual"],
                         help="ROUGE tokenization: default (English) or xlingual (GPT-2 BPE)")
    p = gin_subparser(subparsers, "eval", help="evaluation sweep from gin files", description=EVAL_HELP,
                   formatter_class=argparse.RawDescriptionHelpFormatter)
    add_gin_flags(p)
    p.add_argument("--workdir", required=True, help="sweep directory (a rerun skips its finished cells)")
    p.add_argument("--mesh", default=None,
                   help="engine device mesh, e.g. data=-1 (the same as --gin.eval_sweep.mesh_shape=\"'...'\"; "
                        "default: one device)")
    p.add_argument("--no_prefix_cache", action="store_true",
                   help="recompute every row in full (default: shared token prefixes are computed once)")
    return {"metrics": cmd_metrics, "eval": cmd_eval}
