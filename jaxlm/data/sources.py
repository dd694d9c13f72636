"""Task sources: one entry point (`load_tasks`, `task_stats`) over the four readers (their shared file
helpers are `jaxlm.data.task_files`).

Sources
  superni   Super-NaturalInstructions task files (`jaxlm.data.superni`); `split`/`part` pick the tasks
            of `splits/<split>/{train,test}_tasks.txt`.
  bigbench  BIG-bench JSON tasks, one TaskData per leaf `task.json` (`jaxlm.data.bigbench`).
  bbh       BIG-Bench Hard `<task>.json` files (`jaxlm.data.bigbench`).
  rewrite   synthetic string-rewrite rules generated from a `RewriteConfig` (`jaxlm.data.string_rewrite`);
            no directory; part "train" = the training rules, "test" = the held-out rules, None = both.
  superni_files / p3_files
            local JSONL / Parquet / Arrow task files (one per task) read with Hugging Face `datasets`, in
            the Super-NI row schema (input, output) or the P3 schema (inputs, targets, answer_choices)
            (`jaxlm.data.hf_files`); no task splits.

`data_dir` may be the source's own folder (`.../superni`) or a folder holding it (`.../data`, with
`superni/`, `bigbench/`, `bbh/` inside): the readers look one level down when the folder itself is
not in the source's layout.

Every reader skips empty instances (no input, or no non-empty reference) and counts them in
`TaskData.metadata["skipped_empty"]`; over-long instances are kept whole here and cut at tokenization
(the seqio tasks / prompt builder apply Tk-Instruct's truncation), so the files' content is never
silently lost in this layer.

Parsed files are cached per (path, mtime, size), so re-loading a directory (every seqio registration,
every `jaxlm data` call in one process) costs one `stat` per file.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from jaxlm.data.schema import TaskData
from jaxlm.data.task_files import select_names
from jaxlm.errors import UsageError

SOURCES = ("superni", "bigbench", "bbh", "rewrite", "superni_files", "p3_files")
SUPERNI_TEST_MAX_INSTANCES = 100  # official Super-NI test protocol: the first 100 instances of a task



def cut_instances(task: TaskData, max_instances: int | None) -> TaskData:
    """The first `max_instances` instances (file order), as the official protocols do."""
    if max_instances is None or len(task.instances) <= max_instances:
        return task
    return dataclasses.replace(task, instances=task.instances[:max_instances])


# ----------------------------------------------------------------------------- dispatch

def _check_source(source: str) -> None:
    if source not in SOURCES:
        raise UsageError(f"source {source!r} is unknown; known: {', '.join(SOURCES)}")


def _read_tasks(source: str, data_dir, *, split, part, names, english_only, rewrite_config) -> list[TaskData]:
    """The source's tasks, unsorted and uncut (see `load_tasks`)."""
    _check_source(source)
    if source == "superni":
        from jaxlm.data import superni

        tasks = superni.load_superni(data_dir, split=split or "default", part=part, names=names)
        return [t for t in tasks if superni.is_english(t)] if english_only else tasks
    if source in ("bigbench", "bbh"):
        if split is not None or part is not None:
            raise UsageError(f"source {source} has no task splits; got split={split!r} part={part!r}")
        from jaxlm.data import bigbench

        tasks = bigbench.load_bigbench(data_dir, names=names) if source == "bigbench" else bigbench.load_bbh(data_dir, names=names)
        return [t for t in tasks if bigbench.is_english(t)] if english_only else tasks
    if source in ("superni_files", "p3_files"):
        if split is not None or part is not None:
            raise UsageError(f"source {source} has no task splits; got split={split!r} part={part!r}")
        from jaxlm.data import hf_files

        return hf_files.load_files(data_dir, schema=source, names=names)
    from jaxlm.data import string_rewrite

    tasks = string_rewrite.rewrite_tasks(rewrite_config, part=part)
    if names is None:
        return tasks
    kept = set(select_names([t.name for t in tasks], names, "rewrite"))
    return [t for t in tasks if t.name in kept]


def load_tasks(
    source: str,
    data_dir: str | Path | None,
    *,
    split: str | None = None,
    part: str | None = None,
    names: Sequence[str] | None = None,
    english_only: bool = False,
    max_instances: int | None = None,
    rewrite_config: Any = None,
) -> dict[str, TaskData]:
    """A source's tasks, ordered by task name.

    superni: `split` names `splits/<split>/` (default "default"); `part` "train"/"test" loads the tasks
      that split lists and that have a file (the listed-but-absent ones are logged as a warning with
      their count and first names); None loads every task file on disk. part="test" defaults to
      `max_instances=100` (the official protocol: the first 100 instances of each test task).
    bigbench / bbh: every leaf task of the directory (`split`/`part` do not apply and must be None).
    rewrite: `data_dir` is ignored; tasks come from `rewrite_config` (default `RewriteConfig()`),
      part "train" = training rules, "test" = held-out rules, None = both.
    names: keep only these tasks (a BIG-bench parent name keeps all its subtasks); unknown names are
      logged, not fatal, so callers decide (`jaxlm data show` reports a missing --task itself).
    english_only: Super-NI tasks whose input, output and instruction languages are all ["English"];
      BIG-bench tasks without the "non-English" keyword; BBH and rewrites are English/synthetic (no-op).
    max_instances: the first N instances of each task, in file order.
    """
    if max_instances is not None and max_instances < 1:
        raise UsageError(f"max_instances must be >= 1, got {max_instances}")
    if max_instances is None and source == "superni" and part == "test":
        max_instances = SUPERNI_TEST_MAX_INSTANCES
    tasks = _read_tasks(source, data_dir, split=split, part=part, names=names, english_only=english_only,
                        rewrite_config=rewrite_config)
    return {t.name: cut_instances(t, max_instances) for t in sorted(tasks, key=lambda t: t.name)}


def task_stats(source: str, data_dir: str | Path | None, *, split: str | None = None, part: str | None = None,
               rewrite_config: Any = None) -> dict:
    """Per-task counts (on-disk content, no instance cap) and the listed-but-missing tasks.

    Returns {"source", "tasks": [{"task", "instances", "skipped_empty", "positive_examples", "categories",
    "multiple_choice"}...], "missing": {"count", "names"}}; `multiple_choice` is the number of
    multiple-choice instances (0 for a generative task). `missing` is non-empty only for Super-NI:
    tasks named in the split's lists (the `part` list, or both lists when part is None) with no file.
    """
    tasks = _read_tasks(source, data_dir, split=split, part=part, names=None, english_only=False,
                        rewrite_config=rewrite_config)
    missing: list[str] = []
    if source == "superni":
        from jaxlm.data import superni

        info = superni.read_split(data_dir, split or "default")
        missing = list(info.missing(part)) if part else sorted(set(info.missing("train")) | set(info.missing("test")))
    rows = [{
        "task": t.name,
        "instances": len(t.instances),
        "skipped_empty": int(t.metadata.get("skipped_empty", 0)),
        "positive_examples": len(t.positive_examples),
        "categories": list(t.categories),
        "multiple_choice": sum(1 for i in t.instances if i.is_multiple_choice),
    } for t in sorted(tasks, key=lambda t: t.name)]
    return {"source": source, "tasks": rows, "missing": {"count": len(missing), "names": missing}}
