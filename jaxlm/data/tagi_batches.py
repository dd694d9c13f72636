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

Tasks (`TagiTask`) come from `jaxlm.data.tagi_tasks`. No TensorFlow at import.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from jaxlm.buckets import DEFAULT_LENGTH_BUCKETS, bucket_length
from jaxlm.checkpoints.instruction_codec import TextCodec
from jaxlm.data.batches import LAYOUTS, MixtureBatches, check_iterator_state
from jaxlm.data.tagi_tasks import TagiTask
from jaxlm.errors import DataError, UsageError
from jaxlm.features import TEACHER_PREFIX


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
