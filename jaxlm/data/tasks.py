"""Every task of a source as a seqio Task: source -> prompt-format preprocessor -> tokenize -> EOS.

Names (seqio allows only word characters, '.', ':' and '#'):
  `<source>:<task>` for the source's default prompt format (`DEFAULT_FORMATS`), e.g.
  `superni:task1562_zest_text_modification`, `bbh:date_understanding`, `rewrite:rule00042`;
  `<source>:<task>#<format>` for any other format, e.g. `superni:task1562_zest_text_modification#def`.
  A BIG-bench subtask's '/' becomes '.' (`bigbench:arithmetic.1_digit_addition`); any other character
  seqio rejects ('-' in Super-NI names such as `task105_story_cloze-rocstories_...`) becomes '_'.
  `registration(name)` maps a seqio name back to its TaskData and format.

Splits: instruction learning splits by TASK (which tasks are loaded: `split`/`part` of `load_tasks`),
so a task's seqio splits all hold the same instances, in file order. By default a task loaded with
`part="train"`/`"test"` (Super-NI: train_tasks.txt / test_tasks.txt of the `split` directory) exposes
that one seqio split (rewrite rules: part "train" -> "train", else "test"); loaded without a part it
exposes "train", "validation" and "test". `seqio_splits=` overrides.

Features: the source yields {"index", "id"}; the format preprocessor (a `tf.numpy_function` over
`example_fields`: `jaxlm.data.prompts.format_prompt`, the one prompt builder of the project, or for
rule tasks the default format "rewrite", the from-scratch model's raw "x|y|z=") turns them into
{"inputs": prompt, "targets": first reference, "id"}; `seqio.preprocessors.tokenize` and
`append_eos` follow (EOS on targets only). Metric functions come from `METRIC_HOOK(task_data)`
(no metrics until the evaluation code calls `set_metric_hook`). Registering again with the same
arguments replaces the previous Task (idempotent).
"""

from __future__ import annotations

import functools
import hashlib
import re
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Mapping, Sequence

import numpy as np

from jaxlm.data.schema import TaskData
from jaxlm.errors import DataError, UsageError

if TYPE_CHECKING:  # seqio/TensorFlow load only when a task is registered: `jaxlm data show` needs neither
    import seqio
    import tensorflow as tf

# Each source's reference protocol: Tk-Instruct def_pos2 (Super-NI), BIG-bench's json_task prompt (BIG-bench,
# BBH's zero-shot "Q: ... A:"), the from-scratch model's raw "x|y|z=" (rewrites).
DEFAULT_FORMATS: dict[str, str] = {"superni": "def_pos2", "bigbench": "bigbench", "bbh": "bigbench", "rewrite": "rewrite",
                                   "superni_files": "def_pos2", "p3_files": "none"}  # P3 inputs are whole prompts
# "rewrite" is `string_rewrite.rewrite_model_input` (rule tasks only); every other format is `format_prompt`'s.
REWRITE_FORMAT = "rewrite"
ALL_SPLITS: tuple[str, ...] = ("train", "validation", "test")
_INVALID = re.compile(r"[^\w.]")


# ----------------------------------------------------------------------------- metric hook

def _no_metrics(task: TaskData) -> list:
    return []


METRIC_HOOK: Callable[[TaskData], list] = _no_metrics


def set_metric_hook(fn: Callable[[TaskData], list] | None) -> None:
    """Install the evaluation's metric factory (TaskData -> seqio metric_fns); None restores "no metrics".

    Applies to tasks registered afterwards."""
    global METRIC_HOOK
    METRIC_HOOK = fn or _no_metrics


# ----------------------------------------------------------------------------- names & registry

@dataclass(frozen=True)
class Registration:
    """What a seqio task name stands for."""

    task: TaskData
    fmt: str
    num_shots: int
    key: str  # changes whenever the registered examples could change (keys tokenized caches)
    count_tokens: Callable[[str], int] | None = None  # Tk-Instruct's demo budget (see register_task_data)
    source_budget: int | None = None


_REGISTRATIONS: dict[str, Registration] = {}


def seqio_task_name(source: str, task_name: str, fmt: str | None = None) -> str:
    """`source:task` (default format) or `source:task#fmt`, with '/' -> '.' and other invalid chars -> '_'."""
    name = f"{source}:{_INVALID.sub('_', task_name.replace('/', '.'))}"
    if fmt is not None and fmt != DEFAULT_FORMATS.get(source):
        name += f"#{_INVALID.sub('_', fmt)}"
    return name


def registration(name: str) -> Registration:
    if name not in _REGISTRATIONS:
        raise UsageError(f"seqio task {name!r} was not registered by jaxlm.data.tasks (register_tasks first)")
    return _REGISTRATIONS[name]


def registration_key(name: str) -> str:
    """The cache key of a registered task ('' for tasks registered elsewhere)."""
    reg = _REGISTRATIONS.get(name)
    return reg.key if reg else ""


def registered_examples(name: str) -> list[tuple[list[int], list[int]]] | None:
    """(inputs ids, targets ids + EOS) of every instance, by the Task's own functions run in Python
    (format -> vocabulary.encode -> EOS), or None for a task not registered here."""
    reg = _REGISTRATIONS.get(name)
    if reg is None:
        return None
    from jaxlm.data.tf_corner import import_seqio

    seqio = import_seqio()

    vocabulary = seqio.TaskRegistry.get(name).output_features["targets"].vocabulary
    rows = []
    for i in range(len(reg.task.instances)):
        ex = example_fields(reg.task, i, reg.fmt, reg.num_shots, reg.count_tokens, reg.source_budget)
        target = ex["targets"][0] if ex["targets"] else ""
        rows.append((list(vocabulary.encode(ex["inputs"])), list(vocabulary.encode(target)) + [vocabulary.eos_id]))
    return rows


# ----------------------------------------------------------------------------- examples

def example_fields(task: TaskData, index: int, fmt: str, num_shots: int = 2,
                   count_tokens: Callable[[str], int] | None = None, source_budget: int | None = None) -> dict[str, Any]:
    """{"inputs": the prompt as the model receives it, "targets": [references], "task", "id"}.

    count_tokens/source_budget: def_pos2 keeps only the positive examples that fit the budget (Tk-Instruct)."""
    instance = task.instances[index]
    if fmt == REWRITE_FORMAT:
        from jaxlm.data.string_rewrite import rewrite_model_input

        inputs = rewrite_model_input(task.metadata["x"], task.metadata["y"], instance.input)
    else:
        from jaxlm.data.prompts import format_prompt

        budget = {"count_tokens": count_tokens, "max_source_length": source_budget} if count_tokens and source_budget else {}
        inputs = format_prompt(task, instance, fmt, num_shots=num_shots, **budget)
    return {
        "inputs": inputs,
        "targets": list(instance.outputs),
        "task": task.name,
        "id": instance.id,
    }


def known_formats(source: str) -> tuple[str, ...]:
    from jaxlm.data.prompts import FORMATS

    return tuple(FORMATS) + ((REWRITE_FORMAT,) if source == "rewrite" else ())


def check_format(source: str, fmt: str) -> None:
    if fmt not in known_formats(source):
        raise UsageError(f"--format {fmt!r} is not a known prompt format for {source}; known: {', '.join(known_formats(source))}")


def format_preprocessor(dataset: tf.data.Dataset, *, task: TaskData, fmt: str, num_shots: int,
                        count_tokens: Callable[[str], int] | None = None, source_budget: int | None = None) -> tf.data.Dataset:
    """{"index", "id"} -> {"inputs": prompt, "targets": first reference, "id"} (the prompt format)."""
    from jaxlm.data.tf_corner import import_tensorflow

    tf = import_tensorflow()

    def fields(index: np.ndarray) -> tuple[bytes, bytes]:
        ex = example_fields(task, int(index), fmt, num_shots, count_tokens, source_budget)
        target = ex["targets"][0] if ex["targets"] else ""
        return ex["inputs"].encode("utf-8"), target.encode("utf-8")

    def apply(ex: Mapping[str, tf.Tensor]) -> dict[str, tf.Tensor]:
        inputs, targets = tf.numpy_function(fields, [ex["index"]], [tf.string, tf.string], stateful=False)
        inputs.set_shape([])
        targets.set_shape([])
        return {"inputs": inputs, "targets": targets, "id": ex["id"]}

    return dataset.map(apply, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)


def _dataset_fn(split: str, shuffle_files: bool, seed: int | None = None, *, ids: tuple[str, ...]) -> tf.data.Dataset:
    del split, shuffle_files, seed  # one ordered list of instances per task (see module docstring)
    from jaxlm.data.tf_corner import import_tensorflow

    tf = import_tensorflow()

    return tf.data.Dataset.from_tensor_slices({"index": np.arange(len(ids), dtype=np.int64), "id": list(ids)})


def register_task_data(
    task: TaskData,
    *,
    vocabulary: seqio.Vocabulary,
    fmt: str | None = None,
    num_shots: int = 2,
    seqio_splits: Sequence[str] = ALL_SPLITS,
    source_budget: int | None = None,
    key: str = "",
) -> str:
    """Register one TaskData as a seqio Task (replacing a previous registration); returns its name.

    source_budget: Tk-Instruct's source length in tokens of `vocabulary` (1024 in its protocol):
    def_pos2 then drops the positive examples that would overflow it, as its collator does. None
    keeps every example (the prompt `jaxlm data show` prints); batches left-truncate what is still long.
    """
    from jaxlm.data.tf_corner import import_seqio

    seqio = import_seqio()

    fmt = fmt or DEFAULT_FORMATS.get(task.source, "def_pos2")
    check_format(task.source, fmt)
    if not task.instances:
        raise DataError(f"task {task.qualified_name} has no instances")
    bad = [s for s in seqio_splits if s not in ALL_SPLITS]
    if bad or not seqio_splits:
        raise UsageError(f"seqio splits {list(seqio_splits)}: each must be one of {ALL_SPLITS}")
    name = seqio_task_name(task.source, task.name, fmt)
    previous = _REGISTRATIONS.get(name)
    if previous is not None and previous.task.name != task.name:
        raise DataError(f"tasks {previous.task.name!r} and {task.name!r} of {task.source} map to one seqio name {name!r}")
    if source_budget is not None and source_budget < 1:
        raise UsageError(f"source_budget must be >= 1 tokens, got {source_budget}")
    count_tokens = (lambda text: len(vocabulary.encode(text))) if source_budget else None
    ids = tuple(i.id for i in task.instances)
    output_features = {
        "inputs": seqio.Feature(vocabulary, add_eos=False),
        "targets": seqio.Feature(vocabulary, add_eos=True),
    }
    seqio.TaskRegistry.remove(name)
    seqio.TaskRegistry.add(
        name,
        source=seqio.FunctionDataSource(
            functools.partial(_dataset_fn, ids=ids), splits=tuple(seqio_splits),
            num_input_examples={s: len(ids) for s in seqio_splits},
        ),
        preprocessors=[
            functools.partial(format_preprocessor, task=task, fmt=fmt, num_shots=num_shots,
                              count_tokens=count_tokens, source_budget=source_budget),
            seqio.preprocessors.tokenize,
            seqio.preprocessors.append_eos,
        ],
        output_features=output_features,
        metric_fns=list(METRIC_HOOK(task)),
    )
    digest = hashlib.sha1(repr((task, fmt, num_shots, source_budget)).encode()).hexdigest()[:16]
    _REGISTRATIONS[name] = Registration(task, fmt, num_shots, key=f"{digest}:{key}", count_tokens=count_tokens,
                                        source_budget=source_budget)
    return name


def default_splits(source: str, part: str | None) -> tuple[str, ...]:
    """The seqio splits of a task loaded with `part` (the task-level train/test part of its source)."""
    if source == "rewrite":
        return ("train",) if (part or "train") == "train" else ("test",)
    return (part,) if part in ALL_SPLITS else ALL_SPLITS


def register_tasks(
    source: str,
    data_dir: Any,
    *,
    vocabulary: seqio.Vocabulary,
    fmt: str | None = None,
    num_shots: int = 2,
    split: str | None = None,
    part: str | None = None,
    names: Sequence[str] | None = None,
    english_only: bool = False,
    max_instances: int | None = None,
    rewrite_config: Any = None,
    seqio_splits: Sequence[str] | None = None,
    source_budget: int | None = None,
) -> list[str]:
    """Load a source's tasks (`jaxlm.data.sources.load_tasks`) and register each; returns the seqio names."""
    from jaxlm.data.sources import load_tasks

    tasks = load_tasks(source, data_dir, split=split, part=part, names=names, english_only=english_only,
                       max_instances=max_instances, rewrite_config=rewrite_config)
    splits = tuple(seqio_splits) if seqio_splits else default_splits(source, part)
    return [register_task_data(t, vocabulary=vocabulary, fmt=fmt, num_shots=num_shots, seqio_splits=splits,
                               source_budget=source_budget)
            for t in tasks.values()]
