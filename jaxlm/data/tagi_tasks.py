"""TAGI's tasks: each task's instruction ids and its examples twice (student rows without the
instruction, teacher rows with it in context; same targets), from three sources:

  Super-NI tasks          `superni_tagi_tasks` (teacher prompt `teacher_format`, e.g. def_pos2; student
                          prompt `student_format`: the query alone, or nothing)
  string-rewrite rules    `rewrite_tagi_tasks` (the rule "x|y" is the instruction; student "z=",
                          teacher "x|y|z=")
  pretraining passages    `passage_tagi_tasks` over any directory of .txt / .jsonl (a first segment read
                          by the hypernetwork, the continuation predicted by the adapted model);
                          `write_passages` builds such a directory from training tasks
`jaxlm.data.tagi_batches` groups them into batches. No TensorFlow at import (a tokenizer is read
lazily, without its weights).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from jaxlm.checkpoints.instruction_codec import BYTES, TextCodec, text_codec
from jaxlm.checkpoints.teachers import teacher_indices
from jaxlm.data.batches import TokenizedTask
from jaxlm.data.schema import TaskData
from jaxlm.errors import DataError, UsageError
from jaxlm.jsonl import read_jsonl

STUDENT_FORMATS = ("query", "none")


# ----------------------------------------------------------------------------- tasks


@dataclass(frozen=True)
class TagiTask:
    """One task as TAGI trains on it: its instruction ids and its examples twice (student / teacher
    inputs, same targets). `teacher_index` is its adapter in a LoRA teachers stack (-1 = none)."""

    name: str
    instruction: np.ndarray
    student: TokenizedTask
    teacher: TokenizedTask | None = None
    teacher_index: int = -1

    @property
    def num_examples(self) -> int:
        return self.student.num_examples


def _with_eos(ids: list[int], codec: TextCodec) -> list[int]:
    return ids + ([codec.eos_id] if codec.eos_id is not None else [])


def make_task(name: str, instruction: str, examples: Sequence[tuple[str, str | None, str]], codec: TextCodec,
              teacher_index: int = -1) -> TagiTask:
    """A TagiTask from text: examples are (student input, teacher input or None, target)."""
    if not examples:
        raise DataError(f"task {name!r} has no examples")
    enc = codec.encode
    targets = [_with_eos(enc(t), codec) for _, _, t in examples]
    student = TokenizedTask.from_rows(name, [enc(s) for s, _, _ in examples], targets)
    with_teacher = all(t is not None for _, t, _ in examples)
    teacher = TokenizedTask.from_rows(name, [enc(t) for _, t, _ in examples], targets) if with_teacher else None
    return TagiTask(name, np.asarray(enc(instruction), np.int32), student, teacher, teacher_index)


def rewrite_tagi_tasks(config: Any, *, part: str = "train", instruction: str = "rule",
                       teachers_dir: str | Path | None = None, max_examples: int | None = None) -> list[TagiTask]:
    """String-rewrite rules as TAGI tasks (byte vocab): instruction "x|y" ("rule") or the English
    definition ("definition"); student input "z=", teacher input "x|y|z=", target the rewritten z."""
    from jaxlm.data.string_rewrite import (
        QUERY_END,
        rewrite_model_input,
        rewrite_tasks,
        rule_text,
    )

    if instruction not in ("rule", "definition"):
        raise UsageError(f"instruction={instruction!r}: expected 'rule' or 'definition'")
    codec, tasks = text_codec(BYTES), rewrite_tasks(config, part=part)
    index = teacher_indices(teachers_dir, [t.name for t in tasks])
    out = []
    for task in tasks:
        x, y = task.metadata["x"], task.metadata["y"]
        text = rule_text(x, y) if instruction == "rule" else task.definition
        examples = [(i.input + QUERY_END, rewrite_model_input(x, y, i.input), i.outputs[0])
                    for i in task.instances[:max_examples]]
        out.append(make_task(task.name, text, examples, codec, index.get(task.name, -1)))
    return out


def task_examples(task: TaskData, *, teacher_format: str = "def_pos2", student_format: str = "query",
                  max_instances: int | None = None, skip_instances: int = 0) -> list[tuple[str, str, str]]:
    """(student prompt, teacher prompt, first reference) per instance. The student reads the Tk query
    "Now complete the following example -\\nInput: {x}.\\nOutput: " ("query") or the bare input ("none");
    the teacher the full `teacher_format` prompt (instruction in context). `skip_instances` drops the
    first ones (e.g. the evaluated instances, when training an oracle teacher on the rest)."""
    from jaxlm.data.prompts import format_prompt, tk_query

    if student_format not in STUDENT_FORMATS:
        raise UsageError(f"student_format={student_format!r}: expected one of {STUDENT_FORMATS}")
    rows = []
    for inst in task.instances[skip_instances:max_instances]:
        if not inst.outputs:
            continue
        student = tk_query(inst.input) if student_format == "query" else inst.input.strip()
        rows.append((student, format_prompt(task, inst, teacher_format), inst.outputs[0]))
    return rows


def instruction_for(task: TaskData, teacher_format: str) -> str:
    """What the hypernetwork reads: the definition, plus 2 positive examples for def_pos2."""
    from jaxlm.data.prompts import instruction_text

    return instruction_text(task, with_examples=2 if teacher_format == "def_pos2" else 0)


def superni_tagi_tasks(data_dir: str | Path, *, tokenizer: str, part: str | None = "train",
                       names: Sequence[str] | None = None, teacher_format: str = "def_pos2",
                       student_format: str = "query", max_instances: int | None = None,
                       teachers_dir: str | Path | None = None, codec: TextCodec | None = None,
                       skip_instances: int = 0) -> list[TagiTask]:
    """Super-NI tasks as TAGI tasks (ordered by name), tokenized with `tokenizer`'s vocabulary."""
    from jaxlm.data.sources import load_tasks

    tasks = load_tasks("superni", data_dir, part=part, names=names, max_instances=max_instances)
    if not tasks:
        raise DataError(f"superni_tagi_tasks: no Super-NI tasks in {data_dir} (part={part!r}, names={names!r})")
    codec = codec or text_codec(tokenizer)
    index = teacher_indices(teachers_dir, list(tasks))
    out = []
    for name, task in tasks.items():
        rows = task_examples(task, teacher_format=teacher_format, student_format=student_format,
                             skip_instances=skip_instances)
        if rows:
            out.append(make_task(name, instruction_for(task, teacher_format), rows, codec, index.get(name, -1)))
    return out


# ----------------------------------------------------------------------------- pretraining passages


def read_passages(directory: str | Path, *, field: str = "text") -> list[str]:
    """Every passage of a directory: each .txt file's blank-line separated paragraphs, each .jsonl
    line's `field` (sorted file order; empty passages dropped)."""
    directory = Path(directory)
    if not directory.is_dir():
        raise DataError(f"{directory}: not a directory of .txt / .jsonl passages")
    passages: list[str] = []
    for f in sorted(directory.rglob("*")):
        if f.suffix == ".txt":
            try:
                passages += [p.strip() for p in f.read_text(encoding="utf-8").split("\n\n")]
            except UnicodeDecodeError as e:
                raise DataError(f"{f}: not UTF-8 text ({e.reason} at byte {e.start})") from None
        elif f.suffix == ".jsonl":
            for row in read_jsonl(f):  # a line that is not UTF-8, JSON or an object: an error naming it
                if not isinstance(row.get(field), str):
                    raise DataError(f"{f}:{row['_line']}: field {field!r} is missing or not a string")
                passages.append(row[field].strip())
    passages = [p for p in passages if p]
    if not passages:
        raise DataError(f"{directory}: no passages (.txt paragraphs or .jsonl field {field!r})")
    return passages


def passage_tagi_tasks(directory: str | Path, *, tokenizer: str = BYTES, field: str = "text",
                       first_fraction: float = 0.5, context_tokens: int = 4, min_tokens: int = 8,
                       max_passages: int | None = None, codec: TextCodec | None = None) -> list[TagiTask]:
    """HINT/HyperTuning pretraining: passage -> (first segment: the instruction the hypernetwork reads;
    its last `context_tokens` tokens: the student's input; the rest of the passage: the target).
    Passages shorter than `min_tokens` are skipped; each passage is a task with one example."""
    if not 0.0 < first_fraction < 1.0:
        raise UsageError(f"first_fraction={first_fraction}: must be in (0, 1)")
    codec = codec or text_codec(tokenizer)
    out = []
    for n, text in enumerate(read_passages(directory, field=field)[:max_passages]):
        ids = codec.encode(text)
        if len(ids) < max(min_tokens, 2):
            continue
        cut = min(max(1, int(len(ids) * first_fraction)), len(ids) - 1)
        first, rest = ids[:cut], ids[cut:]
        student = TokenizedTask.from_rows(f"passage{n}", [first[-context_tokens:] if context_tokens else []],
                                          [_with_eos(rest, codec)])
        out.append(TagiTask(f"passage{n}", np.asarray(first, np.int32), student))
    if not out:
        raise DataError(f"{directory}: no passage has >= {min_tokens} tokens")
    return out


def write_passages(tasks: Sequence[TaskData], directory: str | Path, *, field: str = "text") -> Path:
    """A pretraining directory from training tasks: `passages.jsonl` with each definition, then each
    instance as "{input}\\n{first output}" (what the HINT recipe pretrains on)."""
    from jaxlm.files import write_atomically

    def write(f) -> None:
        for task in tasks:
            f.write(json.dumps({field: task.definition}) + "\n")
            for inst in task.instances:
                if inst.outputs:
                    f.write(json.dumps({field: f"{inst.input.strip()}\n{inst.outputs[0].strip()}"}) + "\n")

    return write_atomically(Path(directory) / "passages.jsonl", write)


