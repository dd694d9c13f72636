"""A seqio Task or Mixture -> numpy batches in the layout of jaxlm/features.py, with exact resume.

Why this shape: seqio/tf.data run once per task to tokenize (`task.get_dataset(shuffle=False)`), the
ids are kept as flat numpy arrays (in memory, optionally `.npz` in a cache dir), and the mixture is
sampled in numpy. The sampling is a pure function of (seed, draw number, per-task counters), so the
iterator state is a few integers, JSON-serialisable, and `restore(state())` on a fresh iterator gives
bitwise the same next batches without replaying anything.

Sampling: draw d picks a task from block d // 4096 of `Generator(PCG64([seed, 1, block])).choice(p=rates)`;
a task's k-th consumed example is `permutation_e[k % n]` of epoch e = k // n, a permutation drawn from
`PCG64([seed, 2, task, e])` (every example of a task is seen once per task epoch).

Over-long examples (counted in `truncation`, part of the state):
  inputs  keep their LAST `max_input_len` tokens (BOS included when the tokenizer adds one; the end of
          a prompt, "Input: ... Output:", is what the model must continue).
  targets keep their first `max_target_len - 1` tokens plus the final EOS (seqio's
          append_eos_after_trim convention).
Unpacked rows pad to the smallest bucket (`jaxlm.buckets.bucket_length`) of the longest row in the
GLOBAL batch, so every process's rows have the same shape. Packed rows (pretraining, `pack=True`)
hold several examples each, filled greedily in draw order; an example that does not fit in the last
row is not consumed (it starts the next batch). Packed batches carry no `task_index` (a row mixes
tasks) and add `encoder_positions`/`decoder_positions` (encoder-decoder) for per-segment positions.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from jaxlm.buckets import DEFAULT_LENGTH_BUCKETS, bucket_length
from jaxlm.errors import DataError, UsageError
from jaxlm.files import write_atomically

LAYOUTS = ("decoder_only", "encoder_decoder")
_CHOICE_BLOCK = 4096


# ----------------------------------------------------------------------------- tokenized tasks


@dataclass(frozen=True)
class TokenizedTask:
    """One task's tokenized examples as flat arrays (`inputs` of example i = inputs_flat[off[i]:off[i+1]])."""

    name: str
    inputs_flat: np.ndarray
    inputs_offsets: np.ndarray
    targets_flat: np.ndarray
    targets_offsets: np.ndarray

    @property
    def num_examples(self) -> int:
        return len(self.inputs_offsets) - 1

    @property
    def input_lengths(self) -> np.ndarray:
        return np.diff(self.inputs_offsets)

    @property
    def target_lengths(self) -> np.ndarray:
        return np.diff(self.targets_offsets)

    def inputs(self, i: int) -> np.ndarray:
        return self.inputs_flat[self.inputs_offsets[i]:self.inputs_offsets[i + 1]]

    def targets(self, i: int) -> np.ndarray:
        return self.targets_flat[self.targets_offsets[i]:self.targets_offsets[i + 1]]

    @classmethod
    def from_rows(cls, name: str, inputs: Sequence[Sequence[int]], targets: Sequence[Sequence[int]]) -> "TokenizedTask":
        def flat(rows):
            offsets = np.zeros(len(rows) + 1, np.int64)
            offsets[1:] = np.cumsum([len(r) for r in rows])
            data = np.concatenate([np.asarray(r, np.int32) for r in rows]) if rows else np.zeros(0, np.int32)
            return data.astype(np.int32), offsets

        (fi, oi), (ft, ot) = flat(inputs), flat(targets)
        return cls(name, fi, oi, ft, ot)


_MEMORY_CACHE: dict[tuple, tuple[Any, TokenizedTask]] = {}


def _cache_file(cache_dir: Path, name: str, split: str, key: str) -> Path:
    digest = hashlib.sha1(key.encode()).hexdigest()[:12]
    return cache_dir / f"{re.sub(r'[^A-Za-z0-9_.-]', '_', name)}.{split}.{digest}.npz"


def materialize_task(task_name: str, split: str = "train", cache_dir: str | Path | None = None,
                     via: str = "auto") -> TokenizedTask:
    """Tokenize a registered seqio Task once (no shuffling); cached per registration in memory and on disk.

    via="seqio" runs the Task's tf.data pipeline (source -> format -> tokenize -> append_eos). A task
    registered by `jaxlm.data.tasks` runs the same three functions in Python by default ("auto"),
    because a tf.data pipeline costs ~0.2 s per task to build and drain, minutes for 1000 rewrite rules;
    tests check both give identical ids.
    """
    from jaxlm.data.tf_corner import import_seqio

    seqio = import_seqio()

    from jaxlm.data.tasks import registration_key, registered_examples
    from jaxlm.data.vocab import vocabulary_fingerprint

    if via not in ("auto", "seqio"):
        raise UsageError(f"via={via!r}: expected 'auto' or 'seqio'")

    task = seqio.TaskRegistry.get(task_name)
    if split not in task.splits:
        raise DataError(f"seqio task {task_name!r} has no split {split!r} (splits: {list(task.splits)})")
    memo_key = (task_name, split, id(task), via)
    if memo_key in _MEMORY_CACHE:
        return _MEMORY_CACHE[memo_key][1]
    key = f"{registration_key(task_name)}|{vocabulary_fingerprint(task.output_features['targets'].vocabulary)}"
    file = _cache_file(Path(cache_dir), task_name, split, key) if cache_dir else None
    if file is not None and file.is_file():
        with np.load(file) as z:
            tokenized = TokenizedTask(task_name, z["inputs_flat"], z["inputs_offsets"], z["targets_flat"], z["targets_offsets"])
    else:
        rows = registered_examples(task_name) if via == "auto" else None
        if rows is None:
            ds = task.get_dataset(sequence_length=None, split=split, shuffle=False, use_cached=False, num_epochs=1)
            rows = [(ex["inputs"] if "inputs" in ex else np.zeros(0, np.int32), ex["targets"]) for ex in ds.as_numpy_iterator()]
        inputs, targets = [r[0] for r in rows], [r[1] for r in rows]
        if not targets:
            raise DataError(f"seqio task {task_name!r} split {split!r} has no examples")
        tokenized = TokenizedTask.from_rows(task_name, inputs, targets)
        if file is not None:
            write_atomically(file, lambda f: np.savez(
                f, inputs_flat=tokenized.inputs_flat, inputs_offsets=tokenized.inputs_offsets,
                targets_flat=tokenized.targets_flat, targets_offsets=tokenized.targets_offsets), binary=True)
    _MEMORY_CACHE[memo_key] = (task, tokenized)
    return tokenized


# ----------------------------------------------------------------------------- the iterator

def check_iterator_state(state: Mapping[str, Any], keys: Sequence[str], *, seed: int, num_tasks: int,
                         label: str, owner: str) -> None:
    """Refuse a saved batch-iterator state that lacks `keys` or was written for another seed or task
    count (resuming it would silently replay different batches)."""
    missing = [k for k in keys if k not in state]
    if missing:
        raise UsageError(f"{label} state is missing {missing} (has {sorted(state)})")
    if int(state["seed"]) != seed:
        raise UsageError(f"{label} state has seed {state['seed']}, this iterator seed {seed}")
    if len(state["counters"]) != num_tasks:
        raise UsageError(f"{label} state has {len(state['counters'])} task counters, this {owner} {num_tasks} tasks")


class MixtureBatches:
    """`jaxlm.features.BatchIterator` over tokenized tasks mixed at fixed rates.

    state() = {"seed", "step", "draws", "counters" (examples consumed per task), "truncation"}.
    Each process (shard_index of num_shards) plans the whole global batch (cheap: lengths only) and
    builds only its rows [shard_index * B / num_shards, (shard_index + 1) * B / num_shards).
    """

    def __init__(
        self,
        tasks: Sequence[TokenizedTask],
        rates: Sequence[float],
        *,
        batch_size: int,
        layout: str = "decoder_only",
        max_input_len: int = 1024,
        max_target_len: int = 128,
        buckets: Sequence[int] = DEFAULT_LENGTH_BUCKETS,
        pack: bool = False,
        seed: int = 0,
        shard_index: int = 0,
        num_shards: int = 1,
        eos_id: int | None = None,
        bos_id: int | None = None,
    ):
        if layout not in LAYOUTS:
            raise UsageError(f"layout={layout!r}: expected one of {LAYOUTS}")
        if batch_size <= 0 or num_shards <= 0 or batch_size % num_shards:
            raise UsageError(f"batch_size={batch_size} must be positive and divisible by num_shards={num_shards}")
        if not 0 <= shard_index < num_shards:
            raise UsageError(f"shard_index={shard_index} must be in [0, num_shards={num_shards})")
        if max_target_len < 1 or max_input_len < (1 if bos_id is not None else 0):
            raise UsageError(f"max_input_len={max_input_len}, max_target_len={max_target_len}: too small")
        if not tasks or len(tasks) != len(rates):
            raise UsageError(f"need one rate per task: {len(tasks)} tasks, {len(rates)} rates")
        rates_arr = np.asarray(rates, np.float64)
        if np.any(rates_arr < 0) or rates_arr.sum() <= 0:
            raise UsageError(f"mixture rates must be non-negative with a positive sum, got {list(rates)}")
        self.tasks = list(tasks)
        self.task_names = [t.name for t in tasks]
        self.probabilities = rates_arr / rates_arr.sum()
        self.batch_size, self.layout, self.pack = batch_size, layout, pack
        self.max_input_len, self.max_target_len = max_input_len, max_target_len
        self.buckets = tuple(sorted(buckets))
        self.seed, self.shard_index, self.num_shards = int(seed), shard_index, num_shards
        self.eos_id, self.bos_id = eos_id, bos_id
        self._lengths = [self._effective_lengths(t) for t in self.tasks]
        self._block: tuple[int, np.ndarray] | None = None
        self._perms: dict[int, tuple[int, np.ndarray]] = {}
        self.restore({"seed": self.seed, "step": 0, "draws": 0, "counters": [0] * len(self.tasks),
                      "truncation": {"examples": 0, "inputs": 0, "targets": 0}})

    # ------------------------------------------------------------------ state
    def state(self) -> dict[str, Any]:
        return {"seed": self.seed, "step": self._step, "draws": self._draws, "counters": list(self._counters),
                "truncation": dict(self.truncation)}

    def restore(self, state: Mapping[str, Any]) -> None:
        check_iterator_state(state, ("seed", "step", "draws", "counters", "truncation"), seed=self.seed,
                             num_tasks=len(self.tasks), label="iterator", owner="mixture")
        self._step, self._draws = int(state["step"]), int(state["draws"])
        self._counters = [int(c) for c in state["counters"]]
        self.truncation = {k: int(v) for k, v in state["truncation"].items()}

    def __iter__(self) -> "MixtureBatches":
        return self

    # ------------------------------------------------------------------ sampling
    def _task_of_draw(self, d: int) -> int:
        block = d // _CHOICE_BLOCK
        if self._block is None or self._block[0] != block:
            rng = np.random.Generator(np.random.PCG64([self.seed, 1, block]))
            self._block = (block, rng.choice(len(self.tasks), size=_CHOICE_BLOCK, p=self.probabilities))
        return int(self._block[1][d % _CHOICE_BLOCK])

    def _example_of(self, task: int, k: int) -> int:
        n = self.tasks[task].num_examples
        epoch = k // n
        cached = self._perms.get(task)
        if cached is None or cached[0] != epoch:  # one epoch's permutation kept per task
            cached = (epoch, np.random.Generator(np.random.PCG64([self.seed, 2, task, epoch])).permutation(n))
            self._perms[task] = cached
        return int(cached[1][k % n])

    def _effective_lengths(self, task: TokenizedTask) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """(input length incl. BOS, target length) after truncation, and which examples were truncated."""
        bos = 1 if (self.bos_id is not None and self.layout == "decoder_only") else 0
        raw_in, raw_tgt = task.input_lengths + bos, task.target_lengths
        return (np.minimum(raw_in, self.max_input_len), np.minimum(raw_tgt, self.max_target_len),
                raw_in > self.max_input_len, raw_tgt > self.max_target_len)

    def _row_length(self, task: int, ex: int) -> tuple[int, int]:
        lin, ltg = self._lengths[task][0][ex], self._lengths[task][1][ex]
        return (int(lin + ltg), 0) if self.layout == "decoder_only" else (int(lin), int(ltg))

    def _plan(self) -> list[list[tuple[int, int]]]:
        """The global batch: per row, its (task, example) segments; consumes the draws it uses."""
        rows: list[list[tuple[int, int]]] = []
        if not self.pack:
            for _ in range(self.batch_size):
                rows.append([self._consume()])
            return rows
        width = self._pack_widths()
        fill = (0, 0)
        rows.append([])
        while True:
            task = self._task_of_draw(self._draws)
            ex = self._example_of(task, self._counters[task])
            a, b = self._row_length(task, ex)
            if fill[0] + a > width[0] or fill[1] + b > width[1]:
                if len(rows) == self.batch_size:
                    return rows
                rows.append([])
                fill = (0, 0)
            rows[-1].append(self._consume())
            fill = (fill[0] + a, fill[1] + b)

    def _pack_widths(self) -> tuple[int, int]:
        if self.layout == "decoder_only":
            return self.max_input_len + self.max_target_len, 0
        return self.max_input_len, self.max_target_len

    def _consume(self) -> tuple[int, int]:
        task = self._task_of_draw(self._draws)
        ex = self._example_of(task, self._counters[task])
        self._draws += 1
        self._counters[task] += 1
        _, _, cut_in, cut_tgt = self._lengths[task]
        self.truncation["examples"] += 1
        self.truncation["inputs"] += int(cut_in[ex])
        self.truncation["targets"] += int(cut_tgt[ex])
        return task, ex

    # ------------------------------------------------------------------ building
    def _tokens(self, task: int, ex: int) -> tuple[np.ndarray, np.ndarray]:
        t = self.tasks[task]
        inp, tgt = t.inputs(ex), t.targets(ex)
        if self.layout == "decoder_only" and self.bos_id is not None:
            inp = np.concatenate([np.asarray([self.bos_id], np.int32), inp])
        if len(inp) > self.max_input_len:
            inp = inp[len(inp) - self.max_input_len:]
        if len(tgt) > self.max_target_len:
            ends_eos = self.eos_id is not None and tgt[-1] == self.eos_id
            tgt = np.concatenate([tgt[: self.max_target_len - 1], tgt[-1:]]) if ends_eos else tgt[: self.max_target_len]
        return inp, tgt

    def __next__(self) -> dict[str, np.ndarray]:
        plan = self._plan()
        self._step += 1
        lengths = [[self._row_length(t, e) for t, e in row] for row in plan]
        widths = [bucket_length(max(1, max(sum(s[i] for s in row) for row in lengths)), self.buckets) for i in (0, 1)]
        per_shard = self.batch_size // self.num_shards
        mine = plan[self.shard_index * per_shard:(self.shard_index + 1) * per_shard]
        if self.layout == "decoder_only":
            batch = self._decoder_only(mine, widths[0])
        else:
            batch = self._encoder_decoder(mine, widths[0], widths[1])
        if not self.pack:
            batch["task_index"] = np.asarray([row[0][0] for row in mine], np.int32)
        return batch

    def _decoder_only(self, rows: list[list[tuple[int, int]]], width: int) -> dict[str, np.ndarray]:
        b = len(rows)
        out = {n: np.zeros((b, width), np.int32) for n in ("decoder_input_tokens", "decoder_target_tokens",
                                                           "decoder_positions", "decoder_segment_ids")}
        weights = np.zeros((b, width), np.float32)
        for r, row in enumerate(rows):
            offset = 0
            for seg, (task, ex) in enumerate(row, start=1):
                inp, tgt = self._tokens(task, ex)
                tokens = np.concatenate([inp, tgt])
                n, sl = len(tokens), slice(offset, offset + len(tokens))
                out["decoder_input_tokens"][r, sl] = tokens
                out["decoder_target_tokens"][r, offset:offset + n - 1] = tokens[1:]
                out["decoder_positions"][r, sl] = np.arange(n)
                out["decoder_segment_ids"][r, sl] = seg
                # the label at position p is tokens[p + 1]: a target token iff p + 1 >= len(inp)
                weights[r, offset + max(len(inp) - 1, 0):offset + n - 1] = 1.0
                offset += n
        out["decoder_loss_weights"] = weights
        return out

    def _encoder_decoder(self, rows: list[list[tuple[int, int]]], width_in: int, width_tgt: int) -> dict[str, np.ndarray]:
        b = len(rows)
        enc = {n: np.zeros((b, width_in), np.int32) for n in ("encoder_input_tokens", "encoder_segment_ids", "encoder_positions")}
        dec = {n: np.zeros((b, width_tgt), np.int32) for n in ("decoder_input_tokens", "decoder_target_tokens",
                                                               "decoder_segment_ids", "decoder_positions")}
        weights = np.zeros((b, width_tgt), np.float32)
        for r, row in enumerate(rows):
            oi = ot = 0
            for seg, (task, ex) in enumerate(row, start=1):
                inp, tgt = self._tokens(task, ex)
                ni, nt = len(inp), len(tgt)
                enc["encoder_input_tokens"][r, oi:oi + ni] = inp
                enc["encoder_segment_ids"][r, oi:oi + ni] = seg
                enc["encoder_positions"][r, oi:oi + ni] = np.arange(ni)
                dec["decoder_target_tokens"][r, ot:ot + nt] = tgt
                dec["decoder_input_tokens"][r, ot + 1:ot + nt] = tgt[:-1]  # decoder start token 0 at ot
                dec["decoder_segment_ids"][r, ot:ot + nt] = seg
                dec["decoder_positions"][r, ot:ot + nt] = np.arange(nt)
                weights[r, ot:ot + nt] = 1.0
                oi, ot = oi + ni, ot + nt
        out = {**enc, **dec, "decoder_loss_weights": weights}
        if not self.pack:
            del out["encoder_positions"], out["decoder_positions"]
        return out


# ----------------------------------------------------------------------------- constructors


def build_mixture_batches(
    mixture_or_task: str,
    *,
    batch_size: int,
    layout: str = "decoder_only",
    max_input_len: int = 1024,
    max_target_len: int = 128,
    buckets: Sequence[int] = DEFAULT_LENGTH_BUCKETS,
    pack: bool = False,
    seed: int = 0,
    shard_index: int = 0,
    num_shards: int = 1,
    split: str = "train",
    cache_dir: str | None = None,
) -> MixtureBatches:
    """Batches of a registered seqio Mixture (at its rates) or Task (gin-friendly: plain keyword args)."""
    from jaxlm.data.tf_corner import import_seqio

    seqio = import_seqio()

    from jaxlm.data.vocab import bos_to_prepend

    provider = seqio.get_mixture_or_task(mixture_or_task)
    if isinstance(provider, seqio.Mixture):
        pairs = [(t, float(provider.get_rate(t))) for t in provider.tasks]
    else:
        pairs = [(provider, 1.0)]
    pairs = [(t, r) for t, r in pairs if r > 0]
    vocab = pairs[0][0].output_features["targets"].vocabulary
    tokenized = [materialize_task(t.name, split, cache_dir) for t, _ in pairs]
    return MixtureBatches(
        tokenized, [r for _, r in pairs], batch_size=batch_size, layout=layout, max_input_len=max_input_len,
        max_target_len=max_target_len, buckets=buckets, pack=pack, seed=seed, shard_index=shard_index,
        num_shards=num_shards, eos_id=vocab.eos_id, bos_id=bos_to_prepend(vocab) if layout == "decoder_only" else None,
    )
