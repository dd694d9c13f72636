"""gin data sources a run names as `train.data = @...`: thin configurables over `jaxlm.data`, which
they import only when a run calls them (parsing a config never loads seqio or TensorFlow).

  mixture_batches  batches of a registered seqio Mixture/Task (`jaxlm.data.batches.build_mixture_batches`)
  task_mixture     registers a source's tasks + a Mixture and returns its name
  rewrite_data     the string-rewrite diversity mixture
  tagi_data        TAGI grouped batches (`jaxlm.data.tagi_batches` over `jaxlm.data.tagi_tasks`)
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import gin

from jaxlm.errors import ConfigError


@gin.configurable
def mixture_batches(
    mixture_or_task: str,
    *,
    batch_size: int,
    layout: str = "decoder_only",
    max_input_len: int = 1024,
    max_target_len: int = 128,
    pack: bool = False,
    seed: int = 0,
    split: str = "train",
    cache_dir: str | None = None,
    shard_index: int = 0,
    num_shards: int = 1,
) -> Any:
    """Batches of a registered seqio Mixture/Task (`jaxlm.data.batches.build_mixture_batches`); bind it as
    `train.data = @mixture_batches` (the loop supplies shard_index/num_shards)."""
    from jaxlm.data.batches import build_mixture_batches as build

    return build(mixture_or_task, batch_size=batch_size, layout=layout, max_input_len=max_input_len,
                 max_target_len=max_target_len, pack=pack, seed=seed, split=split, cache_dir=cache_dir,
                 shard_index=shard_index, num_shards=num_shards)


@gin.configurable
def task_mixture(
    source: str,
    *,
    data_dir: str | None = None,
    part: str | None = "train",
    fmt: str | None = None,
    names: Sequence[str] | None = None,
    tokenizer: str | None = None,
    rate: Any = "proportional",
    cap: int | None = None,
    temperature: float = 1.0,
    max_instances: int | None = None,
    name: str | None = None,
) -> str:
    """Register a source's tasks (e.g. the Super-NI training tasks on disk, or INSTA's `names`) as
    seqio Tasks tokenized with `tokenizer`'s vocabulary (a model name, HF dir or .gguf; None = bytes)
    and a Mixture over them; return its name. Bind it as
    `mixture_batches.mixture_or_task = @task_mixture()` so an experiment file alone defines its data."""
    from jaxlm.data.mixtures import mixture_from_tasks
    from jaxlm.data.tasks import register_tasks
    from jaxlm.data.vocab import byte_vocabulary, tokenizer_vocabulary

    vocabulary = tokenizer_vocabulary(tokenizer) if tokenizer else byte_vocabulary()
    tasks = register_tasks(source, data_dir, vocabulary=vocabulary, fmt=fmt, part=part, names=names,
                           max_instances=max_instances)
    if not tasks:
        raise ConfigError(f"task_mixture: no {source} tasks found (data_dir={data_dir!r}, part={part!r}, names={names!r})")
    split = "test" if part == "test" else "train"
    mixture = mixture_from_tasks(name or f"{source}_{part or 'all'}_{fmt or 'default'}", tasks, rate, cap=cap,
                                 temperature=temperature, split=split)
    return mixture.name


@gin.configurable
def rewrite_data(
    *,
    rules: Any,
    batch_size: int,
    part: str = "train",
    max_input_len: int = 64,
    max_target_len: int = 32,
    pack: bool = False,
    seed: int = 0,
    shard_index: int = 0,
    num_shards: int = 1,
) -> Any:
    """Batches of the string-rewrite diversity mixture of `rules` (a `RewriteConfig`, bound in gin as
    `rewrite_data.rules = @RewriteConfig()`), byte vocabulary, decoder-only `x|y|z=` rows; bind as
    `train.data = @rewrite_data`. `pack`: several rows per sequence of max_input_len + max_target_len."""
    from jaxlm.data.mixtures import rewrite_batches

    return rewrite_batches(rules, batch_size=batch_size, part=part, max_input_len=max_input_len,
                           max_target_len=max_target_len, pack=pack, seed=seed, shard_index=shard_index,
                           num_shards=num_shards)


TAGI_SOURCES = ("rewrite", "superni", "passages")


@gin.configurable
def tagi_data(
    *,
    source: str,
    batch_size: int,
    tasks_per_batch: int,
    rules: Any = None,
    data_dir: str | None = None,
    part: str | None = "train",
    names: Sequence[str] | None = None,
    tokenizer: str = "bytes",
    layout: str = "decoder_only",
    teacher_format: str = "def_pos2",
    student_format: str = "query",
    rewrite_instruction: str = "rule",
    max_instances: int | None = None,
    skip_instances: int = 0,
    teachers_dir: str | None = None,
    passages_dir: str | None = None,
    passages_field: str = "text",
    first_fraction: float = 0.5,
    context_tokens: int = 4,
    max_input_len: int = 1024,
    max_target_len: int = 128,
    max_instruction_len: int = 512,
    buckets: Sequence[int] | None = None,
    global_task_index: bool = False,
    max_tasks: int | None = None,
    teacher_topk: str | None = None,
    seed: int = 0,
    shard_index: int = 0,
    num_shards: int = 1,
) -> Any:
    """TAGI grouped batches (`jaxlm.data.tagi_batches` over `jaxlm.data.tagi_tasks`): G = tasks_per_batch tasks x B/G examples.

    source "rewrite": the string-rewrite rules of `rules` (a RewriteConfig; byte vocab);
    "superni": the Super-NI tasks of `data_dir` (`part`, `names`) tokenized with `tokenizer`;
    "passages": hypernetwork pretraining passages from `passages_dir` (.txt / .jsonl, field
    `passages_field`); without `passages_dir` they are written once from the training tasks of
    `rules` / `data_dir` (instances and definitions) into a cache dir. Bind as `train.data = @tagi_data`.
    global_task_index=True: student rows only, task_index = the task's place in the task list (train
    per-task LoRA teachers on the student inputs with LoRATeachers); `max_tasks` keeps the first N tasks.
    teacher_topk: a `.npz` of cached teacher top-k log-probs (`jaxlm.train.tagi.write_teacher_topk`)."""
    from jaxlm.buckets import DEFAULT_LENGTH_BUCKETS
    from jaxlm.checkpoints.instruction_codec import text_codec
    from jaxlm.data import tagi_batches as tb
    from jaxlm.data import tagi_tasks as tt

    if source not in TAGI_SOURCES:
        raise ConfigError(f"tagi_data.source={source!r}: expected one of {TAGI_SOURCES}")
    codec = text_codec(tokenizer)
    if source == "rewrite":
        if rules is None:
            raise ConfigError("tagi_data.source='rewrite' needs tagi_data.rules = @RewriteConfig()")
        tasks = tt.rewrite_tagi_tasks(rules, part=part or "train", instruction=rewrite_instruction,
                                      teachers_dir=teachers_dir, max_examples=max_instances)
    elif source == "superni":
        tasks = tt.superni_tagi_tasks(data_dir, tokenizer=tokenizer, part=part, names=names,
                                      teacher_format=teacher_format, student_format=student_format,
                                      max_instances=max_instances, teachers_dir=teachers_dir, codec=codec,
                                      skip_instances=skip_instances)
    else:
        directory = passages_dir or str(_passages_from_tasks(rules, data_dir, part, names, max_instances))
        tasks = tt.passage_tagi_tasks(directory, field=passages_field, first_fraction=first_fraction,
                                      context_tokens=context_tokens, codec=codec)
    if max_tasks is not None:
        tasks = tasks[:max_tasks]
    return tb.tagi_batches(tasks, codec, batch_size=batch_size, tasks_per_batch=tasks_per_batch,
                           layout=layout, max_input_len=max_input_len, max_target_len=max_target_len,
                           max_instruction_len=max_instruction_len, buckets=tuple(buckets or DEFAULT_LENGTH_BUCKETS),
                           teacher_features=source != "passages" and not global_task_index,
                           global_task_index=global_task_index, seed=seed,
                           teacher_topk=tb.load_teacher_topk(teacher_topk) if teacher_topk else None, shard_index=shard_index,
                           num_shards=num_shards)


def _passages_from_tasks(rules: Any, data_dir: str | None, part: str | None, names: Any, max_instances: Any) -> Path:
    """A passages dir written (once, keyed by the task selection) from training tasks."""
    import hashlib
    import tempfile

    from jaxlm.data.sources import load_tasks
    from jaxlm.data.tagi_tasks import write_passages

    if rules is None and data_dir is None:
        raise ConfigError("tagi_data.source='passages' needs passages_dir, or rules / data_dir to build them from")
    key = hashlib.sha1(repr((rules, data_dir, part, names, max_instances)).encode()).hexdigest()[:12]
    directory = Path(tempfile.gettempdir()) / f"jaxlm_passages_{key}"
    if not (directory / "passages.jsonl").is_file():
        source = "rewrite" if rules is not None else "superni"
        tasks = load_tasks(source, data_dir, part=part, names=names, max_instances=max_instances,
                           rewrite_config=rules)
        write_passages(list(tasks.values()), directory)
    return directory
