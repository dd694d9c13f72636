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

from jaxlm.buckets import DEFAULT_LENGTH_BUCKETS, bucket_length, pad_rows
from jaxlm.checkpoints.pretrained import Pretrained
from jaxlm.models import decoding
from jaxlm.models import lora as lora_lib
from jaxlm.models.lora import LoraWeights

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
def _generator(model: Any, max_new_tokens: int, eos_ids: tuple[int, ...], stops: tuple[tuple[int, ...], ...], pad_id: int):
    @jax.jit
    def generate(params, ids, mask, lora, adapter_idx):
        TRACE_COUNTS["generate"] += 1
        return decoding.greedy_generate(
            model, params, ids, mask, _per_row_lora(lora, adapter_idx),
            max_new_tokens=max_new_tokens, eos_ids=eos_ids, stop_sequences=stops, pad_id=pad_id,
        )

    return generate


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

    Raises:
      ValueError: at construction, when the family is not llama or t5, `batch_size` <= 0, or
        `batch_size` is not a multiple of the mesh's data * fsdp size.
    """

    pretrained: Pretrained
    batch_size: int = 8
    buckets: tuple[int, ...] = DEFAULT_LENGTH_BUCKETS
    mesh: Any = None
    compiled_shapes: set = dataclasses.field(default_factory=set)

    def __post_init__(self) -> None:
        if self.pretrained.family not in ("llama", "t5"):
            raise ValueError(f"{self.pretrained.source}: a {self.pretrained.family} model cannot score or generate text")
        if self.batch_size <= 0:
            raise ValueError(f"batch_size must be positive, got {self.batch_size}")
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

    def _batches(self, lengths: Sequence[int]) -> Iterator[list[int]]:
        """Indices grouped into batches of similar length (longest first: OOM shows up at once)."""
        order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
        for start in range(0, len(order), self.batch_size):
            yield order[start : start + self.batch_size]

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
        bos = self.pretrained.tokenizer.bos_id if self.pretrained.tokenizer else self.pretrained.config.bos_token_id
        seqs = []
        for i, (inp, tgt) in enumerate(examples):
            inp = list(inp)
            if not inp:
                if bos is None:
                    raise ValueError(f"example {i}: empty input and the model has no BOS token to condition on")
                inp = [bos]
            seqs.append((inp, list(tgt)))
        fn = _decoder_only_scorer(self.model)
        lora_key = _lora_signature(lora, idx is not None)
        results: list[ScoreResult | None] = [None] * len(seqs)
        for batch in self._batches([len(a) + len(b) for a, b in seqs]):
            pairs = self._fill([seqs[i] for i in batch])
            width = bucket_length(max(len(a) + len(b) for a, b in pairs), self.buckets)
            ids, mask = pad_rows([a + b for a, b in pairs], width, self.pad_id, left=False)
            n_targets = bucket_length(max(len(b) for _, b in pairs), self.buckets)
            # Position n_in - 1 + j predicts target token j; past a row's end, repeat a valid index.
            steps = np.arange(n_targets)[None, :]
            n_in = np.array([len(a) for a, _ in pairs])[:, None]
            n_t = np.array([len(b) for _, b in pairs])[:, None]
            valid = steps < n_t
            predict_at = np.where(valid, n_in - 1 + steps, n_in - 1).astype(np.int32)
            adapters = self._batch_adapters(idx, batch)
            placed = self._place(ids, mask, predict_at, valid, *(() if adapters is None else (adapters,)))
            key = ("score", ids.shape, n_targets, lora_key)
            lp = np.asarray(self._call(key, fn, self.params, *placed[:4], lora, placed[4] if adapters is not None else None))
            for r, i in enumerate(batch):
                tok_lp = lp[r, : len(seqs[i][1])].tolist()
                results[i] = ScoreResult(float(np.sum(tok_lp)), len(seqs[i][1]), tok_lp)
        return results  # type: ignore[return-value]

    def _score_encoder_decoder(self, examples, lora, idx) -> list[ScoreResult]:
        start = self.pretrained.config.decoder_start_token_id
        fn = _encoder_decoder_scorer(self.model)
        lora_key = _lora_signature(lora, idx is not None)
        results: list[ScoreResult | None] = [None] * len(examples)
        for batch in self._batches([max(len(a), len(b)) for a, b in examples]):
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

    def rank_classify(
        self,
        inputs: Sequence[Sequence[int]],
        options: Sequence[Sequence[Sequence[int]]],
        lora: LoraWeights | None = None,
        adapter_index: Sequence[int] | None = None,
        length_normalized: bool = False,
    ) -> list[list[float]]:
        """Per example, the log-prob of each of its answer options (sum, or per-token mean when
        `length_normalized`); the prediction is the argmax. Options may differ in number and length
        per example; all (input, option) pairs are flattened and scored once each, in shared batches
        (decoder-only: input + option in one row).

        Args:
          inputs: the input token ids of each example.
          options: per example, its answer options as token-id sequences (each non-empty).
          lora: as in `score`.
          adapter_index: one adapter index per example (shared by its options), with a batched `lora`.
          length_normalized: divide each option's sum by its number of tokens.

        Returns:
          Per example, a list of natural-log scores, one per option in the given order.

        Raises:
          ValueError: `inputs` and `options` differ in length, an example has no options,
            `adapter_index` has the wrong length, or anything `score` rejects (e.g. an empty option).
        """
        if len(inputs) != len(options):
            raise ValueError(f"{len(inputs)} inputs but {len(options)} option lists")
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
            out[i].append(s.logprob / s.num_tokens if length_normalized else s.logprob)
        return out

    # -------------------------------------------------------------------- generation

    def generate(
        self,
        prompts: Sequence[Sequence[int]],
        max_new_tokens: int = 64,
        stop_sequences: Sequence[Sequence[int]] = (),
        lora: LoraWeights | None = None,
        adapter_index: Sequence[int] | None = None,
    ) -> list[GenerateResult]:
        """Greedy continuations (EOS excluded; a stop sequence, if hit, included).

        EOS ids are `Pretrained.eos_ids` (generation_config.json's, else the tokenizer's, else the
        config's). Llama prompts are left-padded; T5 inputs go to the encoder.

        Args:
          prompts: non-empty token-id sequences.
          max_new_tokens: most tokens generated per prompt.
          stop_sequences: token-id sequences that end a generation (empty ones are ignored).
          lora: None, one adapter, or a batched adapter with `adapter_index`.
          adapter_index: the adapter of each prompt, with a batched `lora` only.

        Returns:
          One `GenerateResult` per prompt, in order.

        Raises:
          ValueError: an empty prompt, or an adapter mismatch as in `score`.
          CheckpointError: the model's generation_config.json sets a field that changes greedy output
            (repetition_penalty, num_beams, ...), named with the file.
        """
        if self.pretrained.generation is not None:
            self.pretrained.generation.check_greedy()
        eos = self.pretrained.eos_ids
        stops = tuple(dict.fromkeys(tuple(s) for s in stop_sequences if s))
        results: list[GenerateResult | None] = [None] * len(prompts)
        for i, p in enumerate(prompts):
            if not p:
                raise ValueError(f"prompt {i}: empty")
        idx = self._check_adapters(len(prompts), lora, adapter_index)
        lora = self._place_lora(lora)
        fn = _generator(self.model, max_new_tokens, eos, stops, self.pad_id)
        lora_key = _lora_signature(lora, idx is not None)
        for batch in self._batches([len(p) for p in prompts]):
            rows = self._fill([list(prompts[i]) for i in batch])
            width = bucket_length(max(map(len, rows)), self.buckets)
            ids, mask = pad_rows(rows, width, self.pad_id, left=self.pretrained.family == "llama")
            adapters = self._batch_adapters(idx, batch)
            placed = self._place(ids, mask, *(() if adapters is None else (adapters,)))
            key = ("generate", ids.shape, max_new_tokens, eos, stops, lora_key)
            out, lengths = self._call(key, fn, self.params, placed[0], placed[1], lora, placed[2] if adapters is not None else None)
            out, lengths = np.asarray(out), np.asarray(lengths)
            for r, i in enumerate(batch):
                results[i] = GenerateResult(out[r, : lengths[r]].tolist())
        return results  # type: ignore[return-value]

    def generate_text(
        self,
        prompts: Sequence[str],
        max_new_tokens: int = 64,
        stop_strings: Sequence[str] = (),
        lora: LoraWeights | None = None,
        adapter_index: Sequence[int] | None = None,
    ) -> list[str]:
        """Greedy text continuations cut at the earliest stop string (e.g. "\\n\\n", a blank line).

        Prompts are encoded with the tokenizer's special tokens (BOS when the model wants it).

        Args:
          prompts: prompt texts.
          max_new_tokens: most tokens generated per prompt.
          stop_strings: strings that end a generation (token-level early stop via
            `stop_token_sequences`, then `cut_at_stop` on the text).
          lora: None, one adapter, or a batched adapter with `adapter_index`.
          adapter_index: the adapter of each prompt, with a batched `lora` only.

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
        results = self.generate(tok.encode_batch(prompts), max_new_tokens, stops, lora, adapter_index)
        return [cut_at_stop(tok.decode(r.output_ids), stop_strings) for r in results]
