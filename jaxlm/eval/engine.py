"""Batched scoring, rank classification and greedy generation over token-id examples, for
decoder-only (Llama) and encoder-decoder (T5) models, optionally with one LoRA adapter per example
and optionally data-parallel over a device mesh.

Examples are sorted by length, padded to a few length buckets and to a fixed batch size, so a whole
sweep compiles a bounded number of times: `Engine.num_compiles` counts the distinct compiled
signatures (kind, padded shapes, LoRA layout) this engine used. Jitted functions are cached per
(model, options) by `functools.cache`, the big_vision way; XLA caches per shape.

Adapters: `lora` is either one adapter (applied to every example) or a batched `LoraWeights` with a
leading axis of N adapters plus `adapter_index` (one int per example). The per-row gather
`jnp.take(leaf, idx_B, axis=0)` runs inside the jitted function, so a batch freely mixes adapters
(tasks) and the model's batched-LoRA einsums run; no per-example d x d kernel is built. Callers that
generate adapters (a hypernetwork) therefore run it once per task, stack the N adapters
(`lora.stack`) and pass every task's examples in one call.

Shared prefixes (Llama, on by default, `prefix_cache=False` turns it off): rows that start with the
same tokens (a task's definition and examples, ICIL's fixed demonstrations, rank classification's
prompt repeated for every option) are grouped (`shared_prefixes`: sorted rows, longest common prefix
of at least `min_prefix_length` tokens, per adapter); each distinct prefix runs once
(`jaxlm.models.prefix.prefix_cache`) and its rows continue from its keys/values, for scoring and for
decoding alike. Exact: the same log-probs and greedy ids as recomputing (tests/test_prefix_engine.py).
Rows that share nothing take the plain path. The prefix never covers a row's last input token, so
every scored or generated position lies in the continuation. T5 scoring: rows with the same encoder
input (a prompt and its options) share one encoder pass (T5 decoding still encodes per row).

Stop strings: a text stop such as a blank line ("\\n\\n") has several tokenizations (SmolLM2: one
token `"\\n\\n"` alone, two `"\\n"` tokens after a word). `stop_token_sequences` lists the common
ones so decoding usually ends early; the returned text is always cut at the stop string
(`cut_at_stop`), so a missed tokenization costs time, never correctness. `generate_text` does both.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
from collections.abc import Iterator, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxlm.buckets import DEFAULT_LENGTH_BUCKETS, bucket_length, pad_rows, powers_of_two
from jaxlm.checkpoints.pretrained import Pretrained
from jaxlm.models import decoding
from jaxlm.models import lora as lora_lib
from jaxlm.models import prefix as prefix_lib
from jaxlm.models.lora import LoraWeights

# How rank classification normalises an option's summed log-prob: none, per token, per UTF-8 byte.
RANK_NORMALIZATIONS = ("sum", "mean", "byte")

# Times each jitted function body was traced (= compiled), by kind: lets tests check that
# `Engine.num_compiles` is honest. Tracing is host-side Python, so the counter costs nothing at run time.
TRACE_COUNTS: collections.Counter = collections.Counter()


@dataclasses.dataclass
class ScoreResult:
    """The score of one (input, target) example.

    Attributes:
      logprob: sum over target tokens of log p(token | input, earlier target tokens), natural log.
      num_tokens: number of target tokens.
      token_logprobs: the per-token natural-log probabilities, in target order.
    """

    logprob: float
    num_tokens: int
    token_logprobs: list[float]


@dataclasses.dataclass
class GenerateResult:
    """One greedy continuation.

    Attributes:
      output_ids: the generated token ids, without padding or the EOS token (a stop sequence that
        ended the generation is included).
    """

    output_ids: list[int]


def token_logprobs(logits_BxLxV: jax.Array, targets_BxL: jax.Array) -> jax.Array:
    """log p(target) = logit[target] - logsumexp(logits), without a (B, L, V) log-softmax array.

    Args:
      logits_BxLxV: logits (B, L, V), any float dtype.
      targets_BxL: integer target ids (B, L) in [0, V).

    Returns:
      float32 (B, L) natural-log probabilities.
    """
    logits = logits_BxLxV.astype(jnp.float32)
    picked = jnp.take_along_axis(logits, targets_BxL[..., None], axis=-1)[..., 0]
    return picked - jax.nn.logsumexp(logits, axis=-1)


def _per_row_lora(lora: LoraWeights | None, adapter_idx_B: jax.Array | None) -> LoraWeights | None:
    """Row b of the batch gets adapter adapter_idx_B[b] (inside jit: a gather, then batched LoRA)."""
    if lora is None or adapter_idx_B is None:
        return lora
    return lora_lib.per_example(lora, adapter_idx_B)


@functools.cache
def _decoder_only_scorer(model: Any):
    @jax.jit
    def score(params, ids, mask, predict_at, valid, lora, adapter_idx):
        TRACE_COUNTS["score"] += 1
        # Only the positions that predict a target token reach the vocab projection.
        logits = model.apply(
            {"params": params}, ids, mask, lora=_per_row_lora(lora, adapter_idx), gather_index=predict_at
        )
        targets = jnp.take_along_axis(ids, predict_at + 1, axis=1)
        return jnp.where(valid, token_logprobs(logits, targets), 0.0)

    return score


@functools.cache
def _encoder_decoder_scorer(model: Any):
    @jax.jit
    def score(params, enc_ids, enc_mask, dec_in, dec_mask, targets, lora, adapter_idx):
        TRACE_COUNTS["score"] += 1
        logits = model.apply(
            {"params": params}, enc_ids, enc_mask, dec_in, dec_mask, lora=_per_row_lora(lora, adapter_idx)
        )
        return jnp.where(dec_mask, token_logprobs(logits, targets), 0.0)

    return score


@functools.cache
def _generator(model: Any, max_new_tokens: int, eos_ids: tuple[int, ...], stops: tuple[tuple[int, ...], ...], pad_id: int,
               sampling: decoding.Sampling = decoding.GREEDY):
    @jax.jit
    def generate(params, ids, mask, lora, adapter_idx, row_ids):
        TRACE_COUNTS["generate"] += 1
        return decoding.greedy_generate(
            model, params, ids, mask, _per_row_lora(lora, adapter_idx),
            max_new_tokens=max_new_tokens, eos_ids=eos_ids, stop_sequences=stops, pad_id=pad_id,
            sampling=sampling, row_ids=row_ids,
        )

    return generate


@functools.cache
def _t5_encoder(model: Any):
    @jax.jit
    def encode(params, ids, mask, lora, adapter_idx):
        TRACE_COUNTS["encode"] += 1
        return model.apply({"params": params}, ids, mask, lora=_per_row_lora(lora, adapter_idx), method="encode")

    return encode


@functools.cache
def _t5_shared_source_scorer(model: Any):
    @jax.jit
    def score(params, hidden, enc_mask, slot, dec_in, dec_mask, targets, lora, adapter_idx):
        TRACE_COUNTS["score_encoded"] += 1
        logits = model.apply(
            {"params": params}, dec_in, jnp.take(hidden, slot, axis=0), jnp.take(enc_mask, slot, axis=0),
            lora=_per_row_lora(lora, adapter_idx), decoder_attention_mask=dec_mask, method="decode",
        )
        return jnp.where(dec_mask, token_logprobs(logits, targets), 0.0)

    return score


@functools.cache
def _prefixer(model: Any):
    @jax.jit
    def run(params, ids, mask, lora, adapter_idx):
        TRACE_COUNTS["prefix"] += 1
        return prefix_lib.prefix_cache(model, params, ids, mask, extra_slots=0, lora=_per_row_lora(lora, adapter_idx))

    return run


def _rows_of(cache, prefix_len, slot_B):
    """Each row's prefix cache (T slots) and real prefix length, gathered from the G prefixes."""
    return prefix_lib.take_rows(cache, slot_B), jnp.take(prefix_len, slot_B)


@functools.cache
def _prefix_scorer(model: Any):
    @jax.jit
    def score(params, cache, prefix_len, slot, ids, mask, predict_at, valid, lora, adapter_idx):
        TRACE_COUNTS["score_prefix"] += 1
        rows, length = _rows_of(cache, prefix_len, slot)
        slots = cache["kv_mask"].shape[1]
        logits = prefix_lib.continue_from_prefix(
            model, params, prefix_lib.with_free_slots(rows, ids.shape[1]), length, ids, mask,
            lora=_per_row_lora(lora, adapter_idx), gather_index=predict_at, prefix_slots=slots,
        )
        targets = jnp.take_along_axis(ids, predict_at + 1, axis=1)
        return jnp.where(valid, token_logprobs(logits, targets), 0.0)

    return score


@functools.cache
def _prefix_generator(model: Any, max_new_tokens: int, eos_ids: tuple[int, ...], stops: tuple[tuple[int, ...], ...],
                      pad_id: int, sampling: decoding.Sampling):
    @jax.jit
    def generate(params, cache, prefix_len, slot, ids, mask, lora, adapter_idx, row_ids):
        TRACE_COUNTS["generate_prefix"] += 1
        rows, length = _rows_of(cache, prefix_len, slot)
        return decoding.greedy_generate(
            model, params, ids, mask, _per_row_lora(lora, adapter_idx), max_new_tokens=max_new_tokens,
            eos_ids=eos_ids, stop_sequences=stops, pad_id=pad_id, prefix=rows, prefix_length=length,
            sampling=sampling, row_ids=row_ids,
        )

    return generate


def _common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    n = min(len(a), len(b))
    for k in range(n):
        if a[k] != b[k]:
            return k
    return n


def shared_prefixes(keys: Sequence[Sequence[int]], min_length: int,
                    owners: Sequence[Any] | None = None) -> list[tuple[int, list[int]]]:
    """Groups of rows that share a token prefix worth computing once.

    Rows are sorted (by owner, then tokens); adjacent rows' common prefixes give the candidates. A
    contiguous run of sorted rows shares the minimum of its adjacent common prefixes; runs are split
    at their weakest links while that saves more tokens ((rows - 1) x prefix length, summed), and a
    group needs at least two rows and `min_length` shared tokens.

    Args:
      keys: per row, the tokens a prefix may cover (e.g. a prompt without its last token).
      min_length: fewest shared tokens worth a cached prefix (>= 1).
      owners: per row, a hashable that must be equal within a group (the adapter index), or None.

    Returns:
      (prefix length, row indices in sorted order) per group; rows in no group are left out.
    """
    n = len(keys)
    if n < 2:
        return []
    owners = [0] * n if owners is None else list(owners)
    order = sorted(range(n), key=lambda i: (owners[i], tuple(keys[i])))
    adjacent = [_common_prefix(keys[order[k]], keys[order[k + 1]]) if owners[order[k]] == owners[order[k + 1]] else 0
                for k in range(n - 1)]
    groups: list[tuple[int, list[int]]] = []

    def best(lo: int, hi: int, depth: int) -> tuple[int, list[tuple[int, int, int]]]:
        """(tokens saved, [(prefix length, lo, hi)]) for sorted rows lo..hi inclusive."""
        if lo >= hi:
            return 0, []
        links = adjacent[lo:hi]
        m = min(links)
        whole = (hi - lo) * m if m >= min_length else -1
        if depth > 200 and whole >= 0:  # pathological nesting: stop refining
            return whole, [(m, lo, hi)]
        saved, parts, start = 0, [], lo
        for k in range(lo, hi + 1):
            if k == hi or adjacent[k] == m:
                v, p = best(start, k, depth + 1)
                saved, parts, start = saved + v, parts + p, k + 1
        if whole >= saved and whole > 0:
            return whole, [(m, lo, hi)]
        return saved, parts

    start = 0
    for k in range(n):  # independent segments: cut where neighbours share too little
        if k == n - 1 or adjacent[k] < min_length:
            for length, lo, hi in best(start, k, 0)[1]:
                groups.append((length, [order[i] for i in range(lo, hi + 1)]))
            start = k + 1
    return groups


def _lora_signature(lora: LoraWeights | None, batched: bool) -> Any:
    """What about a LoRA argument changes the compiled program (tree, shapes, dtypes, rank/alpha)."""
    if lora is None:
        return None
    leaves, tree = jax.tree_util.tree_flatten(lora.params)
    return (tree, tuple((tuple(x.shape), str(x.dtype)) for x in leaves), lora.rank, lora.alpha, batched)


def cut_at_stop(text: str, stops: Sequence[str]) -> str:
    """Text before the earliest stop string.

    Args:
      text: a decoded generation.
      stops: stop strings (empty strings are ignored).

    Returns:
      `text` cut before the first occurrence of any stop string, or unchanged when none occurs.
    """
    cut = min((text.find(s) for s in stops if s and s in text), default=-1)
    return text if cut < 0 else text[:cut]


def stop_token_sequences(tokenizer: Any, stop: str, max_sequences: int = 64) -> list[tuple[int, ...]]:
    """Token sequences that spell `stop` at the end of a generation, for token-level early stopping.

    The stop string's own encoding, every single token containing it, and two-token splits
    (token ending with a prefix of `stop`, token starting with the rest; shortest token texts first,
    up to `max_sequences` in all). Not exhaustive by design: callers still cut the text with `cut_at_stop`.

    Decodes every vocabulary entry once per call (O(V) host work; `Engine.generate_text` caches the
    result per stop string).

    Args:
      tokenizer: a `jaxlm.checkpoints.tokenizer.Tokenizer` (`encode`, `decode`, `vocab_size`).
      stop: the stop string, e.g. "\\n\\n".
      max_sequences: most sequences returned.

    Returns:
      Distinct token-id tuples (length 1 or 2, or the stop string's own encoding), in the order above;
      [] for an empty `stop`.
    """
    if not stop:
        return []
    texts = [tokenizer.decode([i], skip_special_tokens=False) for i in range(tokenizer.vocab_size)]
    found: dict[tuple[int, ...], None] = {tuple(tokenizer.encode(stop, add_special_tokens=False)): None}
    for i in sorted((i for i, t in enumerate(texts) if stop in t), key=lambda i: len(texts[i])):
        found[(i,)] = None
    pairs = []
    for k in range(1, len(stop)):
        head, tail = stop[:k], stop[k:]
        ends = [i for i, t in enumerate(texts) if t.endswith(head) and stop not in t]
        starts = [i for i, t in enumerate(texts) if t.startswith(tail) and stop not in t]
        pairs += [(a, b) for a in ends for b in starts]
    for pair in sorted(pairs, key=lambda p: (len(texts[p[0]]) + len(texts[p[1]]), p)):
        found[pair] = None
    return list(found)[:max_sequences]


@dataclasses.dataclass
class Engine:
    """Scores, rank-classifies and generates for one pretrained model (Llama or T5 family).

    mesh: optional; batches are then split over its (data, fsdp) axes and params placed by the
    logical-axis rules of `jaxlm.sharding` (so `batch_size` must divide by data * fsdp).

    Attributes:
      pretrained: the model, its params and (optionally) tokenizer.
      batch_size: rows per jitted call; every batch is filled up to it (one compiled batch shape).
      buckets: padded lengths (see `jaxlm.buckets.bucket_length`).
      mesh: a `jax.sharding.Mesh` with 'data' and 'fsdp' axes, or None for one device.
      compiled_shapes: signatures used so far (see `num_compiles`).
      prefix_cache: Llama (not with Mistral's sliding window, where padding would shift the window):
        compute each shared token prefix once; T5 scoring: encode each shared source once (see the
        module docstring). False recomputes every row in full.
      min_prefix_length: fewest shared tokens that make a cached prefix (>= 1).

    Raises:
      ValueError: at construction, when the family is not llama or t5, `batch_size` <= 0,
        `min_prefix_length` < 1, or `batch_size` is not a multiple of the mesh's data * fsdp size.
    """

    pretrained: Pretrained
    batch_size: int = 8
    buckets: tuple[int, ...] = DEFAULT_LENGTH_BUCKETS
    mesh: Any = None
    compiled_shapes: set = dataclasses.field(default_factory=set)
    prefix_cache: bool = True
    min_prefix_length: int = 16

    def __post_init__(self) -> None:
        if self.pretrained.family not in ("llama", "t5"):
            raise ValueError(f"{self.pretrained.source}: a {self.pretrained.family} model cannot score or generate text")
        if self.batch_size <= 0:
            raise ValueError(f"batch_size must be positive, got {self.batch_size}")
        if self.min_prefix_length < 1:
            raise ValueError(f"min_prefix_length must be >= 1, got {self.min_prefix_length}")
        self.model = self.pretrained.model
        tok = self.pretrained.tokenizer
        self.pad_id = next(
            (i for i in (getattr(self.pretrained.config, "pad_token_id", None), tok and tok.pad_id) if i is not None), 0
        )
        self.params = self.pretrained.params
        self._stop_tokens: dict[str, list[tuple[int, ...]]] = {}
        if self.mesh is not None:
            from jaxlm import sharding

            split = self.mesh.shape["data"] * self.mesh.shape["fsdp"]
            if self.batch_size % split:
                raise ValueError(f"batch_size {self.batch_size} does not divide over the mesh's data*fsdp = {split} devices")
            self.params = sharding.shard_params(self.params, self.pretrained.logical_axes(), self.mesh)

    @property
    def num_compiles(self) -> int:
        """Distinct compiled signatures used so far by this engine (score, generate and rank alike)."""
        return len(self.compiled_shapes)

    # -------------------------------------------------------------------- batching

    def _batches(self, lengths: Sequence[int], indices: Sequence[int] | None = None) -> Iterator[list[int]]:
        """Indices (all, or `indices`) grouped into batches of similar length (longest first: OOM
        shows up at once)."""
        indices = range(len(lengths)) if indices is None else indices
        order = sorted(indices, key=lambda i: -lengths[i])
        for start in range(0, len(order), self.batch_size):
            yield order[start : start + self.batch_size]

    def _use_prefixes(self) -> bool:
        """Llama without a sliding window (a window counts cache slots, so a padded prefix would shift it)."""
        return (self.prefix_cache and self.pretrained.family == "llama"
                and getattr(self.pretrained.config, "sliding_window", None) is None)

    def _prefix_chunks(self, keys: Sequence[Sequence[int]], idx: np.ndarray | None):
        """Shared-prefix groups (`shared_prefixes`, per adapter), longest prefix first, in chunks of at
        most `batch_size` prefixes: a list of chunks, each a list of (prefix length, member rows)."""
        owners = None if idx is None else idx.tolist()
        groups = shared_prefixes(keys, self.min_prefix_length, owners)
        groups.sort(key=lambda g: -g[0])
        return [groups[i : i + self.batch_size] for i in range(0, len(groups), self.batch_size)]

    def _prefix_batch(self, num_prefixes: int) -> int:
        """Padded number of prefixes per chunk: a power of two up to batch_size (all of it under a mesh)."""
        if self.mesh is not None:
            return self.batch_size
        return bucket_length(num_prefixes, powers_of_two(self.batch_size))

    def _prefix_slots(self, chunks) -> int:
        """The slots every chunk's prefix cache is padded to: the bucket of the sweep's longest prefix."""
        return bucket_length(max((length for chunk in chunks for length, _ in chunk), default=1), self.buckets)

    def _run_prefixes(self, chunk, first_tokens, lora, idx, lora_key, slots: int):
        """Runs a chunk's prefixes once: (device cache (Gb, ... T slots), lengths (Gb,), T, Gb). Without a
        mesh the cache is then padded to batch_size prefixes of `slots` slots (`prefix.pad_prefixes`:
        exact), so the programs continuing from every chunk share one shape per continuation width
        (each shape costs ~2 s of tracing and loading even with a warm compilation cache)."""
        gb = self._prefix_batch(len(chunk))
        rows = self._fill_to([list(first_tokens(members[0])[:length]) for length, members in chunk], gb)
        width = bucket_length(max(length for length, _ in chunk), self.buckets)
        ids, mask = pad_rows(rows, width, self.pad_id, left=False)
        adapters = None if idx is None else np.asarray(self._fill_to([int(idx[m[0]]) for _, m in chunk], gb), np.int32)
        placed = self._place(ids, mask, *(() if adapters is None else (adapters,)))
        cache, lengths = self._call(("prefix", ids.shape, lora_key), _prefixer(self.model), self.params,
                                    placed[0], placed[1], lora, placed[2] if adapters is not None else None)
        if self.mesh is None:
            cache, lengths = prefix_lib.pad_prefixes(cache, lengths, self.batch_size, max(slots, width))
            gb, width = self.batch_size, max(slots, width)
        return cache, lengths, width, gb

    def _fill_to(self, rows: list[Any], n: int) -> list[Any]:
        return rows + [rows[0]] * (n - len(rows))

    def _fill(self, rows: list[Any]) -> list[Any]:
        """Pad the batch dimension with copies of the first row: one compiled batch shape."""
        return rows + [rows[0]] * (self.batch_size - len(rows))

    def _check_adapters(self, n: int, lora: LoraWeights | None, adapter_index: Sequence[int] | None) -> np.ndarray | None:
        if adapter_index is None:
            if lora is not None and lora.batched:
                raise ValueError("a batched LoRA (leading adapter axis) needs adapter_index: one adapter per example")
            return None
        if lora is None or not lora.batched:
            raise ValueError("adapter_index needs a batched LoRA (leading adapter axis); pass one adapter without it")
        idx = np.asarray(adapter_index, np.int32).reshape(-1)
        if len(idx) != n:
            raise ValueError(f"adapter_index has {len(idx)} entries for {n} examples")
        num_adapters = jax.tree_util.tree_leaves(lora.params)[0].shape[0]
        if n and (idx.min() < 0 or idx.max() >= num_adapters):
            raise ValueError(f"adapter_index must lie in [0, {num_adapters}), got {idx.min()}..{idx.max()}")
        return idx

    def _place(self, *arrays: np.ndarray) -> tuple:
        """Host batches -> device arrays, split over the mesh's data axes when there is a mesh."""
        if self.mesh is None:
            return arrays
        from jaxlm.sharding import batch_sharding

        return tuple(jax.device_put(a, batch_sharding(self.mesh, a.ndim)) for a in arrays)

    def _place_lora(self, lora: LoraWeights | None) -> LoraWeights | None:
        if self.mesh is None or lora is None:
            return lora
        from jax.sharding import NamedSharding, PartitionSpec

        return jax.device_put(lora, NamedSharding(self.mesh, PartitionSpec()))  # small: replicated

    def _call(self, key: tuple, fn, *args):
        """Run a jitted function, recording its compiled signature (under the mesh, if any)."""
        self.compiled_shapes.add(key)
        if self.mesh is None:
            return fn(*args)
        with jax.set_mesh(self.mesh):
            return fn(*args)

    # -------------------------------------------------------------------- scoring

    def score(
        self,
        examples: Sequence[tuple[Sequence[int], Sequence[int]]],
        lora: LoraWeights | None = None,
        adapter_index: Sequence[int] | None = None,
    ) -> list[ScoreResult]:
        """Sum of target-token log-probs given the input, per (input_ids, target_ids) example.

        Decoder-only: the row is input + target and target token j is predicted at position
        len(input) - 1 + j; an empty input is replaced by [BOS]. Encoder-decoder: the input goes to
        the encoder (an empty one becomes [pad]) and the target is teacher-forced after the decoder
        start token.

        Args:
          examples: (input_ids, target_ids) pairs of token-id sequences; targets must be non-empty.
          lora: None, one adapter for every example, or a batched adapter (N leading) with `adapter_index`.
          adapter_index: the adapter of each example, ints in [0, N), with a batched `lora` only.

        Returns:
          One `ScoreResult` per example, in order (natural-log probabilities).

        Raises:
          ValueError: an empty target; an empty input when a decoder-only model has no BOS token; a
            batched `lora` without `adapter_index`, `adapter_index` without a batched `lora`, or an
            `adapter_index` of the wrong length or out of range.
        """
        for i, (_, target) in enumerate(examples):
            if not target:
                raise ValueError(f"example {i}: empty target")
        idx = self._check_adapters(len(examples), lora, adapter_index)
        lora = self._place_lora(lora)
        if self.pretrained.family == "t5":
            return self._score_encoder_decoder(examples, lora, idx)
        return self._score_decoder_only(examples, lora, idx)

    def _batch_adapters(self, idx: np.ndarray | None, batch: list[int]) -> np.ndarray | None:
        return None if idx is None else np.asarray(self._fill([int(idx[i]) for i in batch]), np.int32)

    def _score_decoder_only(self, examples, lora, idx) -> list[ScoreResult]:
        seqs = self._decoder_rows(examples)
        results: list[ScoreResult | None] = [None] * len(seqs)
        grouped: set[int] = set()
        if self._use_prefixes():
            grouped = self._score_with_prefixes(seqs, lora, idx, results)
        rest = [i for i in range(len(seqs)) if i not in grouped]
        self._score_plain(seqs, rest, lora, idx, results)
        return results  # type: ignore[return-value]

    def _decoder_rows(self, examples) -> list[tuple[list[int], list[int]]]:
        bos = self.pretrained.tokenizer.bos_id if self.pretrained.tokenizer else self.pretrained.config.bos_token_id
        seqs = []
        for i, (inp, tgt) in enumerate(examples):
            inp = list(inp)
            if not inp:
                if bos is None:
                    raise ValueError(f"example {i}: empty input and the model has no BOS token to condition on")
                inp = [bos]
            seqs.append((inp, list(tgt)))
        return seqs

    def _score_with_prefixes(self, seqs, lora, idx, results) -> set[int]:
        """Scores the rows that share a prefix (into `results`); returns their indices."""
        fn = _prefix_scorer(self.model)
        lora_key = _lora_signature(lora, idx is not None)
        done: set[int] = set()
        chunks = self._prefix_chunks([inp[:-1] for inp, _ in seqs], idx)
        slots = self._prefix_slots(chunks)
        for chunk in chunks:
            cache, prefix_len, t_width, gb = self._run_prefixes(chunk, lambda i: seqs[i][0], lora, idx, lora_key, slots)
            slot_of = {i: g for g, (_, members) in enumerate(chunk) for i in members}
            cut = {i: length for length, members in chunk for i in members}
            conts = {i: (seqs[i][0][cut[i]:], seqs[i][1]) for i in slot_of}
            lengths = {i: len(a) + len(b) for i, (a, b) in conts.items()}
            for batch in self._batches(lengths, list(conts)):
                pairs = self._fill([conts[i] for i in batch])
                width = bucket_length(max(len(a) + len(b) for a, b in pairs), self.buckets)
                ids, mask = pad_rows([a + b for a, b in pairs], width, self.pad_id, left=False)
                n_targets, predict_at, valid = self._targets(pairs)
                slot = np.asarray(self._fill([slot_of[i] for i in batch]), np.int32)
                adapters = self._batch_adapters(idx, batch)
                placed = self._place(ids, mask, predict_at, valid, slot, *(() if adapters is None else (adapters,)))
                key = ("score_prefix", (gb, t_width), ids.shape, n_targets, lora_key)
                lp = np.asarray(self._call(key, fn, self.params, cache, prefix_len, placed[4], *placed[:4], lora,
                                           placed[5] if adapters is not None else None))
                for r, i in enumerate(batch):
                    tok_lp = lp[r, : len(seqs[i][1])].tolist()
                    results[i] = ScoreResult(float(np.sum(tok_lp)), len(seqs[i][1]), tok_lp)
                    done.add(i)
        return done

    def _targets(self, pairs) -> tuple[int, np.ndarray, np.ndarray]:
        """(padded target count, position predicting each target token (B, n), valid (B, n)) of
        right-padded rows input + target."""
        n_targets = bucket_length(max(len(b) for _, b in pairs), self.buckets)
        # Position n_in - 1 + j predicts target token j; past a row's end, repeat a valid index.
        steps = np.arange(n_targets)[None, :]
        n_in = np.array([len(a) for a, _ in pairs])[:, None]
        n_t = np.array([len(b) for _, b in pairs])[:, None]
        valid = steps < n_t
        return n_targets, np.where(valid, n_in - 1 + steps, n_in - 1).astype(np.int32), valid

    def _score_plain(self, seqs, rows, lora, idx, results) -> None:
        fn = _decoder_only_scorer(self.model)
        lora_key = _lora_signature(lora, idx is not None)
        for batch in self._batches([len(a) + len(b) for a, b in seqs], rows):
            pairs = self._fill([seqs[i] for i in batch])
            width = bucket_length(max(len(a) + len(b) for a, b in pairs), self.buckets)
            ids, mask = pad_rows([a + b for a, b in pairs], width, self.pad_id, left=False)
            n_targets, predict_at, valid = self._targets(pairs)
            adapters = self._batch_adapters(idx, batch)
            placed = self._place(ids, mask, predict_at, valid, *(() if adapters is None else (adapters,)))
            key = ("score", ids.shape, n_targets, lora_key)
            lp = np.asarray(self._call(key, fn, self.params, *placed[:4], lora, placed[4] if adapters is not None else None))
            for r, i in enumerate(batch):
                tok_lp = lp[r, : len(seqs[i][1])].tolist()
                results[i] = ScoreResult(float(np.sum(tok_lp)), len(seqs[i][1]), tok_lp)

    def _score_encoder_decoder(self, examples, lora, idx) -> list[ScoreResult]:
        results: list[ScoreResult | None] = [None] * len(examples)
        shared: set[int] = set()
        if self.prefix_cache:
            shared = self._score_shared_sources(examples, lora, idx, results)
        fn = _encoder_decoder_scorer(self.model)
        lora_key = _lora_signature(lora, idx is not None)
        rest = [i for i in range(len(examples)) if i not in shared]
        start = self.pretrained.config.decoder_start_token_id
        for batch in self._batches([max(len(a), len(b)) for a, b in examples], rest):
            enc_rows = self._fill([list(examples[i][0]) or [self.pad_id] for i in batch])
            tgt_rows = self._fill([list(examples[i][1]) for i in batch])
            enc_w = bucket_length(max(map(len, enc_rows)), self.buckets)
            dec_w = bucket_length(max(map(len, tgt_rows)), self.buckets)
            enc_ids, enc_mask = pad_rows(enc_rows, enc_w, self.pad_id, left=False)
            targets, dec_mask = pad_rows(tgt_rows, dec_w, self.pad_id, left=False)
            dec_in = np.concatenate([np.full((len(tgt_rows), 1), start, np.int32), targets[:, :-1]], axis=1)
            adapters = self._batch_adapters(idx, batch)
            placed = self._place(enc_ids, enc_mask, dec_in, dec_mask, targets, *(() if adapters is None else (adapters,)))
            key = ("score", enc_ids.shape, dec_in.shape, lora_key)
            lp = np.asarray(self._call(key, fn, self.params, *placed[:5], lora, placed[5] if adapters is not None else None))
            for r, i in enumerate(batch):
                n_t = len(examples[i][1])
                tok_lp = lp[r, :n_t].tolist()
                results[i] = ScoreResult(float(np.sum(tok_lp)), n_t, tok_lp)
        return results  # type: ignore[return-value]

    def _score_shared_sources(self, examples, lora, idx, results) -> set[int]:
        """T5: rows with the same encoder input (and adapter) share one encoder pass; their targets are
        decoded against it. Scores go into `results`; returns the rows done."""
        by_source: dict[tuple, list[int]] = {}
        for i, (inp, _) in enumerate(examples):
            by_source.setdefault((None if idx is None else int(idx[i]), tuple(inp) or (self.pad_id,)), []).append(i)
        groups = [(key, rows) for key, rows in by_source.items() if len(rows) > 1]
        groups.sort(key=lambda g: -len(g[0][1]))
        start = self.pretrained.config.decoder_start_token_id
        lora_key = _lora_signature(lora, idx is not None)
        encode, score = _t5_encoder(self.model), _t5_shared_source_scorer(self.model)
        done: set[int] = set()
        for c in range(0, len(groups), self.batch_size):
            chunk = groups[c : c + self.batch_size]
            gb = self._prefix_batch(len(chunk))
            sources = self._fill_to([list(key[1]) for key, _ in chunk], gb)
            enc_ids, enc_mask = pad_rows(sources, bucket_length(max(map(len, sources)), self.buckets), self.pad_id)
            enc_adapters = None if idx is None else np.asarray(self._fill_to([key[0] for key, _ in chunk], gb), np.int32)
            placed = self._place(enc_ids, enc_mask, *(() if enc_adapters is None else (enc_adapters,)))
            hidden = self._call(("encode", enc_ids.shape, lora_key), encode, self.params, placed[0], placed[1], lora,
                                placed[2] if enc_adapters is not None else None)
            slot_of = {i: g for g, (_, rows) in enumerate(chunk) for i in rows}
            for batch in self._batches([len(examples[i][1]) for i in range(len(examples))], list(slot_of)):
                tgt_rows = self._fill([list(examples[i][1]) for i in batch])
                targets, dec_mask = pad_rows(tgt_rows, bucket_length(max(map(len, tgt_rows)), self.buckets), self.pad_id)
                dec_in = np.concatenate([np.full((len(tgt_rows), 1), start, np.int32), targets[:, :-1]], axis=1)
                slot = np.asarray(self._fill([slot_of[i] for i in batch]), np.int32)
                adapters = self._batch_adapters(idx, batch)
                rows = self._place(slot, dec_in, dec_mask, targets, *(() if adapters is None else (adapters,)))
                key = ("score_encoded", enc_ids.shape, dec_in.shape, lora_key)
                lp = np.asarray(self._call(key, score, self.params, hidden, placed[1], *rows[:4], lora,
                                           rows[4] if adapters is not None else None))
                for r, i in enumerate(batch):
                    n_t = len(examples[i][1])
                    tok_lp = lp[r, :n_t].tolist()
                    results[i] = ScoreResult(float(np.sum(tok_lp)), n_t, tok_lp)
                    done.add(i)
        return done

    def rank_classify(
        self,
        inputs: Sequence[Sequence[int]],
        options: Sequence[Sequence[Sequence[int]]],
        lora: LoraWeights | None = None,
        adapter_index: Sequence[int] | None = None,
        normalization: str = "sum",
        option_bytes: Sequence[Sequence[int]] | None = None,
    ) -> list[list[float]]:
        """Per example, the score of each of its answer options; the prediction is the argmax.

        Options may differ in number and length per example; all (input, option) pairs are flattened
        and scored once each, in shared batches (decoder-only: input + option in one row). With the
        prefix cache (Llama), an example's prompt is run once and all its options continue from its
        keys/values, in one batched call per batch of options.

        Args:
          inputs: the input token ids of each example.
          options: per example, its answer options as token-id sequences (each non-empty).
          lora: as in `score`.
          adapter_index: one adapter index per example (shared by its options), with a batched `lora`.
          normalization: "sum" (the option's summed log-prob), "mean" (per token) or "byte" (per
            UTF-8 byte of the option's text, lm-evaluation-harness's acc_norm; needs `option_bytes`).
          option_bytes: per example and option, the option text's length in bytes (> 0), for "byte".

        Returns:
          Per example, a list of natural-log scores, one per option in the given order.

        Raises:
          ValueError: `inputs` and `options` differ in length, an example has no options,
            `adapter_index` has the wrong length, an unknown `normalization`, "byte" without matching
            positive `option_bytes`, or anything `score` rejects (e.g. an empty option).
        """
        if normalization not in RANK_NORMALIZATIONS:
            raise ValueError(f"normalization {normalization!r}: expected one of {RANK_NORMALIZATIONS}")
        if len(inputs) != len(options):
            raise ValueError(f"{len(inputs)} inputs but {len(options)} option lists")
        if normalization == "byte":
            if option_bytes is None or [len(b) for b in option_bytes] != [len(o) for o in options]:
                raise ValueError("normalization='byte' needs option_bytes: one byte count per option")
            if any(n <= 0 for b in option_bytes for n in b):
                raise ValueError("option_bytes must be positive")
        pairs, owner = [], []
        for i, (inp, opts) in enumerate(zip(inputs, options)):
            if not opts:
                raise ValueError(f"example {i}: no answer options")
            for opt in opts:
                pairs.append((inp, opt))
                owner.append(i)
        flat_idx = None
        if adapter_index is not None:
            if len(adapter_index) != len(inputs):
                raise ValueError(f"adapter_index has {len(adapter_index)} entries for {len(inputs)} examples")
            flat_idx = [adapter_index[i] for i in owner]
        scores = self.score(pairs, lora, flat_idx)
        out: list[list[float]] = [[] for _ in inputs]
        for i, s in zip(owner, scores):
            k = len(out[i])
            divisor = {"sum": 1, "mean": s.num_tokens, "byte": option_bytes[i][k] if option_bytes else 1}[normalization]
            out[i].append(s.logprob / divisor)
        return out

    # -------------------------------------------------------------------- generation

    def generate(
        self,
        prompts: Sequence[Sequence[int]],
        max_new_tokens: int = 64,
        stop_sequences: Sequence[Sequence[int]] = (),
        lora: LoraWeights | None = None,
        adapter_index: Sequence[int] | None = None,
        sampling: decoding.Sampling | None = None,
        row_ids: Sequence[int] | None = None,
    ) -> list[GenerateResult]:
        """Greedy (or sampled) continuations (EOS excluded; a stop sequence, if hit, included).

        EOS ids are `Pretrained.eos_ids` (generation_config.json's, else the tokenizer's, else the
        config's). Llama prompts are left-padded (continuing from their shared prefix's cache when
        `prefix_cache`); T5 inputs go to the encoder.

        Args:
          prompts: non-empty token-id sequences.
          max_new_tokens: most tokens generated per prompt.
          stop_sequences: token-id sequences that end a generation (empty ones are ignored).
          lora: None, one adapter, or a batched adapter with `adapter_index`.
          adapter_index: the adapter of each prompt, with a batched `lora` only.
          sampling: None or greedy `decoding.Sampling()`: argmax; else temperature / top-k / top-p
            sampling with its seed.
          row_ids: per prompt, the id that keys its random draws (default: its index in `prompts`);
            a prompt's sample depends only on (seed, row id), not on its batch.

        Returns:
          One `GenerateResult` per prompt, in order.

        Raises:
          ValueError: an empty prompt, `row_ids` of the wrong length, or an adapter mismatch as in `score`.
          CheckpointError: the model's generation_config.json sets a field that changes greedy output
            (repetition_penalty, num_beams, ...), named with the file.
        """
        if self.pretrained.generation is not None:
            self.pretrained.generation.check_greedy()
        sampling = sampling or decoding.GREEDY
        row_ids = list(range(len(prompts))) if row_ids is None else [int(r) for r in row_ids]
        if len(row_ids) != len(prompts):
            raise ValueError(f"row_ids has {len(row_ids)} entries for {len(prompts)} prompts")
        eos = self.pretrained.eos_ids
        stops = tuple(dict.fromkeys(tuple(s) for s in stop_sequences if s))
        results: list[GenerateResult | None] = [None] * len(prompts)
        for i, p in enumerate(prompts):
            if not p:
                raise ValueError(f"prompt {i}: empty")
        idx = self._check_adapters(len(prompts), lora, adapter_index)
        lora = self._place_lora(lora)
        options = (max_new_tokens, eos, stops, self.pad_id, sampling)
        grouped: set[int] = set()
        if self._use_prefixes():
            grouped = self._generate_with_prefixes(prompts, options, lora, idx, row_ids, results)
        fn = _generator(self.model, *options)
        lora_key = _lora_signature(lora, idx is not None)
        rest = [i for i in range(len(prompts)) if i not in grouped]
        for batch in self._batches([len(p) for p in prompts], rest):
            rows = self._fill([list(prompts[i]) for i in batch])
            width = bucket_length(max(map(len, rows)), self.buckets)
            ids, mask = pad_rows(rows, width, self.pad_id, left=self.pretrained.family == "llama")
            adapters = self._batch_adapters(idx, batch)
            rid = np.asarray(self._fill([row_ids[i] for i in batch]), np.int32)
            placed = self._place(ids, mask, rid, *(() if adapters is None else (adapters,)))
            key = ("generate", ids.shape, options, lora_key)
            out, lengths = self._call(key, fn, self.params, placed[0], placed[1], lora,
                                      placed[3] if adapters is not None else None, placed[2])
            out, lengths = np.asarray(out), np.asarray(lengths)
            for r, i in enumerate(batch):
                results[i] = GenerateResult(out[r, : lengths[r]].tolist())
        return results  # type: ignore[return-value]

    def _generate_with_prefixes(self, prompts, options, lora, idx, row_ids, results) -> set[int]:
        """Generates for the prompts that share a prefix (into `results`); returns their indices."""
        fn = _prefix_generator(self.model, *options)
        lora_key = _lora_signature(lora, idx is not None)
        done: set[int] = set()
        chunks = self._prefix_chunks([list(p[:-1]) for p in prompts], idx)
        slots = self._prefix_slots(chunks)
        for chunk in chunks:
            cache, prefix_len, t_width, gb = self._run_prefixes(chunk, lambda i: prompts[i], lora, idx, lora_key, slots)
            slot_of = {i: g for g, (_, members) in enumerate(chunk) for i in members}
            conts = {i: list(prompts[i][length:]) for length, members in chunk for i in members}
            lengths = {i: len(c) for i, c in conts.items()}
            for batch in self._batches(lengths, list(conts)):
                rows = self._fill([conts[i] for i in batch])
                width = bucket_length(max(map(len, rows)), self.buckets)
                ids, mask = pad_rows(rows, width, self.pad_id, left=True)
                slot = np.asarray(self._fill([slot_of[i] for i in batch]), np.int32)
                rid = np.asarray(self._fill([row_ids[i] for i in batch]), np.int32)
                adapters = self._batch_adapters(idx, batch)
                placed = self._place(ids, mask, slot, rid, *(() if adapters is None else (adapters,)))
                key = ("generate_prefix", (gb, t_width), ids.shape, options, lora_key)
                out, lengths_out = self._call(key, fn, self.params, cache, prefix_len, placed[2], placed[0], placed[1],
                                              lora, placed[4] if adapters is not None else None, placed[3])
                out, lengths_out = np.asarray(out), np.asarray(lengths_out)
                for r, i in enumerate(batch):
                    results[i] = GenerateResult(out[r, : lengths_out[r]].tolist())
                    done.add(i)
        return done

    def generate_text(
        self,
        prompts: Sequence[str],
        max_new_tokens: int = 64,
        stop_strings: Sequence[str] = (),
        lora: LoraWeights | None = None,
        adapter_index: Sequence[int] | None = None,
        sampling: decoding.Sampling | None = None,
    ) -> list[str]:
        """Greedy (or sampled) text continuations cut at the earliest stop string (e.g. "\\n\\n", a blank line).

        Prompts are encoded with the tokenizer's special tokens (BOS when the model wants it).

        Args:
          prompts: prompt texts.
          max_new_tokens: most tokens generated per prompt.
          stop_strings: strings that end a generation (token-level early stop via
            `stop_token_sequences`, then `cut_at_stop` on the text).
          lora: None, one adapter, or a batched adapter with `adapter_index`.
          adapter_index: the adapter of each prompt, with a batched `lora` only.
          sampling: as in `generate` (None: greedy).

        Returns:
          One decoded string per prompt (special tokens skipped), cut before any stop string.

        Raises:
          ValueError: the model has no tokenizer, or anything `generate` rejects.
        """
        tok = self.pretrained.tokenizer
        if tok is None:
            raise ValueError(f"{self.pretrained.source}: the model has no tokenizer; use generate() with token ids")
        for s in stop_strings:
            if s not in self._stop_tokens:
                self._stop_tokens[s] = stop_token_sequences(tok, s)
        stops = [seq for s in stop_strings for seq in self._stop_tokens[s]]
        results = self.generate(tok.encode_batch(prompts), max_new_tokens, stops, lora, adapter_index, sampling)
        return [cut_at_stop(tok.decode(r.output_ids), stop_strings) for r in results]
