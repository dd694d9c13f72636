"""Grouped-by-task batches for TAGI: G tasks x (B / G) examples, each task's instruction once.

A batch (features in `jaxlm.features`) holds
  student rows     the instance WITHOUT its instruction (decoder_* / encoder_* features), what the
                   LoRA-adapted model sees;
  teacher rows     the same instance WITH the instruction in context (`teacher_` + the same names),
                   what the in-step KL teacher reads (absent for hypernetwork pretraining);
  instruction_tokens / instruction_mask (G, T)   read once per task by the hypernetwork;
  task_index (B,)  the example's task in [0, G) (rows g * B/G ... (g + 1) * B/G - 1 belong to task g);
  teacher_index (G,)  the task's adapter in a LoRA teachers stack, -1 = none (L_ins masked).

Sampling is a pure function of (seed, counters), as in `jaxlm.data.batches.MixtureBatches` (whose
row builders and truncation rules are reused as is): the k-th task draw is `perm_e[k % n]` of task
epoch e = k // n (`PCG64([seed, 3, e])`), so the G tasks of a batch are distinct within an epoch; a
task's j-th example is `permutation[j % n]` of its own epoch (`PCG64([seed, 2, task, epoch])`).
state() = {"seed", "step", "task_draws", "counters", "truncation"}; `restore(state())` on a fresh
iterator gives bitwise the next batches. Lengths pad to buckets (few compiled shapes).

Sources: Super-NI tasks (`superni_tagi_tasks`), string-rewrite rules (`rewrite_tagi_tasks`: the rule is
the instruction; student "z=", teacher "x|y|z="), and hypernetwork pretraining passages from any
directory of .txt / .jsonl (`passage_tagi_tasks`: a first segment read by the hypernetwork, the
continuation predicted by the adapted model), with `write_passages` building such a directory from
the training tasks. No TensorFlow at import (the SmolLM2 tokenizer is loaded lazily).
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from jaxlm.buckets import DEFAULT_LENGTH_BUCKETS, bucket_length
from jaxlm.data.batches import (
    LAYOUTS,
    MixtureBatches,
    TokenizedTask,
    check_iterator_state,
)
from jaxlm.checkpoints.instruction_codec import BYTES, TextCodec, text_codec
from jaxlm.checkpoints.teachers import teacher_indices
from jaxlm.data.schema import TaskData
from jaxlm.errors import DataError, UsageError
from jaxlm.features import TEACHER_PREFIX

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
            passages += [p.strip() for p in f.read_text(encoding="utf-8").split("\n\n")]
        elif f.suffix == ".jsonl":
            for n, line in enumerate(f.read_text(encoding="utf-8").splitlines(), start=1):
                if not line.strip():
                    continue
                row = json.loads(line)
                if not isinstance(row.get(field), str):
                    raise DataError(f"{f}:{n}: field {field!r} is missing or not a string")
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


# ----------------------------------------------------------------------------- cached teacher top-k


TopK = Mapping[str, tuple[np.ndarray, np.ndarray, np.ndarray]]


def load_teacher_topk(path: str | Path) -> dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """{task: (ids (N, T, k) int32, log-probs (N, T, k) float32, valid (N, T) float32)} from the `.npz`
    written by `jaxlm.train.tagi.write_teacher_topk` (example n of the task, its t-th target token)."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: no teacher top-k file (write it with jaxlm.train.tagi.write_teacher_topk)")
    out = {}
    with np.load(path) as z:
        for key in z.files:
            if key.endswith("/ids"):
                task = key[: -len("/ids")]
                out[task] = (z[key], z[f"{task}/logprobs"], z[f"{task}/valid"])
    return out


# ----------------------------------------------------------------------------- the iterator


class TagiBatches:
    """`jaxlm.features.BatchIterator` of grouped TAGI batches (see the module docstring)."""

    def __init__(
        self,
        tasks: Sequence[TagiTask],
        *,
        batch_size: int,
        tasks_per_batch: int,
        layout: str = "decoder_only",
        max_input_len: int = 1024,
        max_target_len: int = 128,
        max_instruction_len: int = 512,
        buckets: Sequence[int] = DEFAULT_LENGTH_BUCKETS,
        teacher_features: bool = True,
        global_task_index: bool = False,
        teacher_topk: TopK | None = None,
        seed: int = 0,
        shard_index: int = 0,
        num_shards: int = 1,
        eos_id: int | None = None,
        bos_id: int | None = None,
    ):
        if not tasks:
            raise UsageError("TagiBatches: no tasks")
        if tasks_per_batch <= 0 or batch_size % tasks_per_batch:
            raise UsageError(f"batch_size={batch_size} must be a positive multiple of tasks_per_batch={tasks_per_batch}")
        if tasks_per_batch % num_shards:
            raise UsageError(f"tasks_per_batch={tasks_per_batch} must be divisible by num_shards={num_shards}")
        if layout not in LAYOUTS:
            raise UsageError(f"layout={layout!r}: expected one of {LAYOUTS}")
        if teacher_features and any(t.teacher is None for t in tasks):
            missing = next(t.name for t in tasks if t.teacher is None)
            raise UsageError(f"teacher_features=True but task {missing!r} has no teacher inputs "
                             "(pretraining passages: set teacher_features=False)")
        self.tasks = list(tasks)
        self.task_names = [t.name for t in tasks]
        self.batch_size, self.tasks_per_batch = batch_size, tasks_per_batch
        self.per_task = batch_size // tasks_per_batch
        self.max_instruction_len, self.buckets = max_instruction_len, tuple(sorted(buckets))
        self.seed, self.shard_index, self.num_shards = int(seed), shard_index, num_shards
        self.layout, self.teacher_features = layout, teacher_features
        self.global_task_index = global_task_index
        self.teacher_topk = teacher_topk
        if teacher_topk is not None:
            missing = [t.name for t in tasks if t.name not in teacher_topk]
            if missing:
                raise DataError(f"teacher top-k cache has no entry for task {missing[0]!r} ({len(missing)} missing)")
        common = {"batch_size": batch_size, "layout": layout, "max_input_len": max_input_len,
                  "max_target_len": max_target_len, "buckets": buckets, "seed": seed, "eos_id": eos_id, "bos_id": bos_id}
        ones = [1.0] * len(tasks)
        # MixtureBatches used for its row builders only (truncation, BOS, padding, layout).
        self._student = MixtureBatches([t.student for t in tasks], ones, **common)
        self._teacher = MixtureBatches([t.teacher for t in tasks], ones, **common) if teacher_features else None
        self._task_perm: tuple[int, np.ndarray] | None = None
        self._perms: dict[int, tuple[int, np.ndarray]] = {}
        self.restore({"seed": self.seed, "step": 0, "task_draws": 0, "counters": [0] * len(tasks),
                      "truncation": {"examples": 0, "inputs": 0, "targets": 0, "instructions": 0}})

    # ------------------------------------------------------------------ state
    def state(self) -> dict[str, Any]:
        return {"seed": self.seed, "step": self._step, "task_draws": self._task_draws,
                "counters": list(self._counters), "truncation": dict(self.truncation)}

    def restore(self, state: Mapping[str, Any]) -> None:
        check_iterator_state(state, ("seed", "step", "task_draws", "counters", "truncation"), seed=self.seed,
                             num_tasks=len(self.tasks), label="TAGI iterator", owner="iterator")
        self._step, self._task_draws = int(state["step"]), int(state["task_draws"])
        self._counters = [int(c) for c in state["counters"]]
        self.truncation = {k: int(v) for k, v in state["truncation"].items()}

    def __iter__(self) -> TagiBatches:
        return self

    # ------------------------------------------------------------------ sampling
    def _task_of_draw(self, k: int) -> int:
        n = len(self.tasks)
        epoch = k // n
        if self._task_perm is None or self._task_perm[0] != epoch:
            self._task_perm = (epoch, np.random.Generator(np.random.PCG64([self.seed, 3, epoch])).permutation(n))
        return int(self._task_perm[1][k % n])

    def _example_of(self, task: int) -> int:
        k, n = self._counters[task], self.tasks[task].num_examples
        epoch = k // n
        cached = self._perms.get(task)
        if cached is None or cached[0] != epoch:
            cached = (epoch, np.random.Generator(np.random.PCG64([self.seed, 2, task, epoch])).permutation(n))
            self._perms[task] = cached
        self._counters[task] += 1
        return int(cached[1][k % n])

    def _plan(self) -> list[tuple[int, list[int]]]:
        """The global batch: G (task, [B/G example indices]); consumes the draws it uses."""
        plan = []
        for _ in range(self.tasks_per_batch):
            task = self._task_of_draw(self._task_draws)
            self._task_draws += 1
            plan.append((task, [self._example_of(task) for _ in range(self.per_task)]))
        return plan

    # ------------------------------------------------------------------ building
    def _rows(self, builder: MixtureBatches, rows: list[list[tuple[int, int]]], all_rows) -> dict[str, np.ndarray]:
        lengths = [builder._row_length(t, e) for (t, e), in all_rows]
        widths = [bucket_length(max(1, max(x[i] for x in lengths)), self.buckets) for i in (0, 1)]
        if self.layout == "decoder_only":
            return builder._decoder_only(rows, widths[0])
        return builder._encoder_decoder(rows, widths[0], widths[1])

    def __next__(self) -> dict[str, np.ndarray]:
        plan = self._plan()
        self._step += 1
        for task, examples in plan:  # truncation counts (the student rows' cuts)
            _, _, cut_in, cut_tgt = self._student._lengths[task]
            self.truncation["examples"] += len(examples)
            self.truncation["inputs"] += int(sum(cut_in[e] for e in examples))
            self.truncation["targets"] += int(sum(cut_tgt[e] for e in examples))
            self.truncation["instructions"] += int(len(self.tasks[task].instruction) > self.max_instruction_len)
        all_rows = [[(t, e)] for t, exs in plan for e in exs]
        g_shard = self.tasks_per_batch // self.num_shards
        mine_tasks = plan[self.shard_index * g_shard:(self.shard_index + 1) * g_shard]
        mine = [[(t, e)] for t, exs in mine_tasks for e in exs]
        batch = self._rows(self._student, mine, all_rows)
        if self._teacher is not None:
            batch.update({TEACHER_PREFIX + k: v for k, v in self._rows(self._teacher, mine, all_rows).items()})
        if self.teacher_topk is not None:  # cached teacher: the k-th target token of each row
            rows = [(t, e) for t, exs in mine_tasks for e in exs]
            for name, part in (("teacher_topk_ids", 0), ("teacher_topk_logprobs", 1), ("teacher_topk_valid", 2)):
                batch[name] = np.stack([self.teacher_topk[self.task_names[t]][part][e] for t, e in rows])
        if self.global_task_index:  # per-task LoRA teachers: task_index = the task's place in `tasks`
            batch["task_index"] = np.asarray([t for t, exs in mine_tasks for _ in exs], np.int32)
            return batch
        instr = [self.tasks[t].instruction[: self.max_instruction_len] for t, _ in plan]
        width = bucket_length(max(1, max(len(i) for i in instr)), self.buckets)
        ids = np.zeros((len(mine_tasks), width), np.int32)
        mask = np.zeros((len(mine_tasks), width), np.int32)
        for g, row in enumerate(instr[self.shard_index * g_shard:(self.shard_index + 1) * g_shard]):
            ids[g, :len(row)], mask[g, :len(row)] = row, 1
        batch["instruction_tokens"], batch["instruction_mask"] = ids, mask
        first = self.shard_index * g_shard  # task_index points into the GLOBAL (G,) axis
        batch["task_index"] = np.repeat(np.arange(first, first + g_shard, dtype=np.int32), self.per_task)
        batch["teacher_index"] = np.asarray([self.tasks[t].teacher_index for t, _ in mine_tasks], np.int32)
        return batch

    def batch_tasks(self, state: Mapping[str, Any]) -> list[str]:
        """Names of the G tasks of the batch that follows `state` (for logs and tests)."""
        probe = TagiBatches.__new__(TagiBatches)
        probe.__dict__.update(self.__dict__)
        probe._perms, probe._task_perm = {}, None
        probe.restore(state)
        return [self.task_names[t] for t, _ in probe._plan()]


def tagi_batches(tasks: Sequence[TagiTask], codec: TextCodec, **kwargs: Any) -> TagiBatches:
    """TagiBatches with the codec's EOS/BOS (BOS only in decoder-only rows)."""
    layout = kwargs.get("layout", "decoder_only")
    return TagiBatches(tasks, eos_id=codec.eos_id, bos_id=codec.bos_id if layout == "decoder_only" else None, **kwargs)
