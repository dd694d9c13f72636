"""`jaxlm data show|stats` (prompts and per-task counts), `jaxlm select` and `jaxlm align-encoder` (INSTA)."""

from __future__ import annotations

import argparse
from typing import Any, Callable

from jaxlm import jsonl
from jaxlm.errors import DataError, UsageError

SOURCES_HELP = "superni, bigbench, bbh or rewrite"

SHOW_HELP = """\
Print the first N examples of one task as JSON lines
  {"inputs": str, "targets": [str], "task": str, "id": str}
where "inputs" is the prompt exactly as the model receives it (before tokenization: the string the
seqio task's format preprocessor produces) and "targets" are all the instance's references.
"""


def register(subparsers: Any) -> dict[str, Callable[[Any], int]]:
    """Add `data` (show, stats) and `select`; return their handlers."""
    from jaxlm.data.prompts import FORMATS

    data = subparsers.add_parser("data", help="inspect task data: prompts and per-task counts")
    sub = data.add_subparsers(dest="data_command", required=True)
    show = sub.add_parser("show", help="print a task's prompts as JSON lines", description=SHOW_HELP,
                          formatter_class=argparse.RawDescriptionHelpFormatter)
    _add_source_args(show)
    show.add_argument("--task", required=True, help="task name in its source (e.g. task1562_zest_text_modification, arithmetic/1_digit_addition)")
    show.add_argument("--format", default=None, help=f"prompt format ({', '.join(FORMATS)}; rewrite for rule tasks); default: the source's")
    show.add_argument("--n", type=int, default=3, help="number of examples")
    show.add_argument("--num_shots", type=int, default=2, help="demonstrations in few-shot formats")
    stats = sub.add_parser("stats", help="per-task instance counts and the missing-task report")
    _add_source_args(stats)

    select = subparsers.add_parser("select", help="INSTA: top-k source tasks for a target by instruction similarity")
    select.add_argument("--data_dir", required=True, help="data directory of --source")
    select.add_argument("--source", default="superni", help=SOURCES_HELP)
    select.add_argument("--target", required=True, help="target task name")
    select.add_argument("--top_k", type=int, default=10)
    select.add_argument("--encoder", default=None, help="sentence encoder checkpoint (default: all-MiniLM-L6-v2)")
    select.add_argument("--text", default="definition", help="instruction view: definition or definition+examples")
    select.add_argument("--split", default="default", help="Super-NI split directory under splits/")
    select.add_argument("--cache_dir", default=None, help="embedding cache directory")

    align = subparsers.add_parser("align-encoder", help="INSTA: tune the aligned instruction encoder (for select --encoder)")
    align.add_argument("--data_dir", required=True, help="data directory of --source")
    align.add_argument("--source", default="superni", help=SOURCES_HELP)
    align.add_argument("--split", default="default", help="Super-NI split directory under splits/ (its training tasks are used)")
    align.add_argument("--output_dir", required=True, help="where the tuned encoder is written (an HF directory)")
    align.add_argument("--group_by", default="task", choices=["task", "category"], help="what makes two instructions positives")
    align.add_argument("--steps", type=int, default=200)
    align.add_argument("--batch_size", type=int, default=16)
    align.add_argument("--learning_rate", type=float, default=2e-5)
    align.add_argument("--temperature", type=float, default=0.05)
    align.add_argument("--seed", type=int, default=0)
    align.add_argument("--max_length", type=int, default=64)
    return {"data": cmd_data, "select": cmd_select, "align-encoder": cmd_align}


def _add_source_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--source", required=True, help=SOURCES_HELP)
    p.add_argument("--data_dir", default=None,
                   help="the source's folder or the task-data root (default: $JAXLM_DATA_DIR, else ../shared/data; "
                        "not used by rewrite)")
    p.add_argument("--split", default="default",
                   help="Super-NI split directory under splits/, as in select and align-encoder")
    p.add_argument("--part", default=None, choices=["train", "test"],
                   help="only the tasks of this part (Super-NI: the --split lists; rewrite: training or held-out rules)")


def _check_source(args) -> None:
    from jaxlm.data.sources import SOURCES

    if args.source not in SOURCES:
        raise UsageError(f"--source {args.source!r}: expected one of {sorted(SOURCES)}")
    if args.split in ("train", "test"):
        raise UsageError(f"--split {args.split}: --split names a Super-NI split directory (splits/<split>/) in every "
                         f"command; the task part is --part {args.split}")
    if args.source in ("superni_files", "p3_files") and not args.data_dir:
        raise UsageError(f"--data_dir is required for --source {args.source} (the folder of task files)")


def _split(args) -> str | None:
    """--split where the source has split directories (Super-NI), else None."""
    return args.split if args.source == "superni" else None


def cmd_data(args) -> int:
    _check_source(args)
    return cmd_show(args) if args.data_command == "show" else cmd_stats(args)


def cmd_show(args) -> int:
    from jaxlm.data.sources import load_tasks
    from jaxlm.data.task_files import UnknownTaskError
    from jaxlm.data.tasks import DEFAULT_FORMATS, check_format, example_fields

    if args.n < 1:
        raise UsageError(f"--n must be at least 1, got {args.n}")
    fmt = args.format or DEFAULT_FORMATS[args.source]
    check_format(args.source, fmt)
    try:
        tasks = load_tasks(args.source, args.data_dir, split=_split(args), part=args.part, names=[args.task])
    except UnknownTaskError:
        tasks = {}  # the one name asked for is unknown: said below, naming --task
    task = tasks.get(args.task)
    if task is None:
        from jaxlm.files import data_root

        raise DataError(f"--task {args.task!r}: not found in --data_dir {args.data_dir or data_root()} (source {args.source})")
    for index in range(min(args.n, len(task.instances))):
        print(jsonl.dumps(example_fields(task, index, fmt, args.num_shots), ensure_ascii=False))
    return 0


def cmd_stats(args) -> int:
    from jaxlm.data.sources import task_stats

    stats = task_stats(args.source, args.data_dir, split=_split(args), part=args.part)
    for row in stats["tasks"]:
        print(jsonl.dumps(row, ensure_ascii=False))
    missing = stats.get("missing", {"count": 0, "names": []})
    print(jsonl.dumps({"source": stats.get("source", args.source), "tasks": len(stats["tasks"]),
                      "instances": sum(int(r.get("instances", 0)) for r in stats["tasks"]),
                      "missing": missing}, ensure_ascii=False))
    return 0


def cmd_align(args) -> int:
    """`jaxlm align-encoder`: tune the aligned INSTA encoder (`jaxlm.train.embedder_tuning.align_encoder`)
    and print one JSON line {output_dir, groups, steps, first_loss, last_loss}."""
    from pathlib import Path

    from jaxlm.files import writable_dir
    from jaxlm.train.embedder_tuning import align_encoder

    _check_source(args)
    output = Path(args.output_dir)
    if output.exists() and not output.is_dir():
        raise UsageError(f"--output_dir {output}: is a file, not a directory")
    writable_dir(output.parent, "--output_dir", named=output)  # before any training
    summary = align_encoder(args.data_dir, args.output_dir, source=args.source, split=getattr(args, "split", None) or "default",
                            group_by=args.group_by, steps=args.steps, batch_size=args.batch_size,
                            learning_rate=args.learning_rate, temperature=args.temperature, seed=args.seed,
                            max_length=args.max_length)
    print(jsonl.dumps(summary))
    return 0


def cmd_select(args: Any) -> int:
    """`jaxlm select`: print the top-k source tasks for a target as JSON lines {rank, task, score}.

    Super-NI sources are the training tasks of `--split` found on disk and the target may be any task
    on disk (a test task included); for BIG-bench / BBH (no splits) every task is a source.
    """
    from jaxlm.data.selection import TEXT_VIEWS, find_task, load_encoder, rank_sources
    from jaxlm.data.sources import load_tasks

    if args.top_k < 1:
        raise UsageError(f"--top_k must be at least 1, got {args.top_k}")
    if args.text not in TEXT_VIEWS:
        raise UsageError(f"--text {args.text!r} is not a known instruction view; known: {sorted(TEXT_VIEWS)}")
    if args.source == "superni":
        split = getattr(args, "split", None) or "default"
        sources = load_tasks(args.source, args.data_dir, split=split, part="train")
        target = sources.get(args.target) or find_task(args.target, load_tasks(args.source, args.data_dir))
    else:
        sources = load_tasks(args.source, args.data_dir)
        target = find_task(args.target, sources)
    if not [name for name in sources if name != target.name]:
        raise DataError(f"--data_dir {args.data_dir}: no {args.source} source tasks to rank for {target.name!r}")
    if getattr(args, "cache_dir", None):
        from jaxlm.files import writable_dir

        writable_dir(args.cache_dir, "--cache_dir")
    embedder = load_encoder(args.encoder, getattr(args, "cache_dir", None))
    ranking = rank_sources(target, sources, embedder=embedder, text=args.text)
    for rank, (name, score) in enumerate(ranking[: args.top_k], start=1):
        print(jsonl.dumps({"rank": rank, "task": name, "score": round(score, 6)}))
    return 0


