"""Batched scoring and greedy generation over token-id examples, for decoder-only and
encoder-decoder models.

Examples are sorted by length, padded to a few length buckets and to a fixed batch size, so a whole
run compiles a bounded number of times (`Engine.compiled_shapes` reports which). Jitted functions
are cached per (model, options) by `functools.cache`, the big_vision way; XLA caches per shape.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Iterator, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jaxlm.buckets import DEFAULT_LENGTH_BUCKETS, bucket_length, pad_rows
from jaxlm.checkpoints.pretrained import Pretrained
from jaxlm.models import decoding
from jaxlm.models.lora import LoraWeights


@dataclasses.dataclass
class ScoreResult:
    logprob: float
    num_tokens: int
    token_logprobs: list[float]


@dataclasses.dataclass
class GenerateResult:
    output_ids: list[int]


def token_logprobs(logits_BxLxV: jax.Array, targets_BxL: jax.Array) -> jax.Array:
    """log p(target) = logit[target] - logsumexp(logits), without a (B, L, V) log-softmax array."""
    logits = logits_BxLxV.astype(jnp.float32)
    picked = jnp.take_along_axis(logits, targets_BxL[..., None], axis=-1)[..., 0]
    return picked - jax.nn.logsumexp(logits, axis=-1)


@functools.cache
def _decoder_only_scorer(model: Any):
    @jax.jit
    def score(params, ids, mask, predict_at, valid, lora):
        # Only the positions that predict a target token reach the vocab projection.
        logits = model.apply({"params": params}, ids, mask, lora=lora, gather_index=predict_at)
        targets = jnp.take_along_axis(ids, predict_at + 1, axis=1)
        return jnp.where(valid, token_logprobs(logits, targets), 0.0)

    return score


@functools.cache
def _encoder_decoder_scorer(model: Any):
    @jax.jit
    def score(params, enc_ids, enc_mask, dec_in, dec_mask, targets, lora):
        logits = model.apply({"params": params}, enc_ids, enc_mask, dec_in, dec_mask, lora=lora)
        return jnp.where(dec_mask, token_logprobs(logits, targets), 0.0)

    return score


@dataclasses.dataclass
class Engine:
    """Scores and generates for one pretrained model (Llama or T5 family)."""

    pretrained: Pretrained
    batch_size: int = 8
    buckets: tuple[int, ...] = DEFAULT_LENGTH_BUCKETS
    compiled_shapes: set = dataclasses.field(default_factory=set)

    def __post_init__(self) -> None:
        if self.pretrained.family not in ("llama", "t5"):
            raise ValueError(f"{self.pretrained.source}: a {self.pretrained.family} model cannot score or generate text")
        self.model = self.pretrained.model
        tok = self.pretrained.tokenizer
        self.pad_id = next(
            (i for i in (getattr(self.pretrained.config, "pad_token_id", None), tok and tok.pad_id) if i is not None), 0
        )

    # -------------------------------------------------------------------- batching

    def _batches(self, lengths: Sequence[int]) -> Iterator[list[int]]:
        """Indices grouped into batches of similar length (longest first: OOM shows up at once)."""
        order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
        for start in range(0, len(order), self.batch_size):
            yield order[start : start + self.batch_size]

    def _fill(self, rows: list[Sequence[int]]) -> list[Sequence[int]]:
        """Pad the batch dimension with copies of the first row: one compiled batch shape."""
        return rows + [rows[0]] * (self.batch_size - len(rows))

    # -------------------------------------------------------------------- scoring

    def score(
        self, examples: Sequence[tuple[Sequence[int], Sequence[int]]], lora: LoraWeights | None = None
    ) -> list[ScoreResult]:
        """Sum of target-token log-probs given the input, per (input_ids, target_ids) example."""
        for i, (_, target) in enumerate(examples):
            if not target:
                raise ValueError(f"example {i}: empty target")
        if self.pretrained.family == "t5":
            return self._score_encoder_decoder(examples, lora)
        return self._score_decoder_only(examples, lora)

    def _score_decoder_only(self, examples, lora) -> list[ScoreResult]:
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
            self.compiled_shapes.add(("score", ids.shape, n_targets))
            lp = np.asarray(fn(self.pretrained.params, ids, mask, predict_at, valid, lora))
            for r, i in enumerate(batch):
                tok_lp = lp[r, : len(seqs[i][1])].tolist()
                results[i] = ScoreResult(float(np.sum(tok_lp)), len(seqs[i][1]), tok_lp)
        return results  # type: ignore[return-value]

    def _score_encoder_decoder(self, examples, lora) -> list[ScoreResult]:
        start = self.pretrained.config.decoder_start_token_id
        fn = _encoder_decoder_scorer(self.model)
        results: list[ScoreResult | None] = [None] * len(examples)
        for batch in self._batches([max(len(a), len(b)) for a, b in examples]):
            enc_rows = self._fill([list(examples[i][0]) or [self.pad_id] for i in batch])
            tgt_rows = self._fill([list(examples[i][1]) for i in batch])
            enc_w = bucket_length(max(map(len, enc_rows)), self.buckets)
            dec_w = bucket_length(max(map(len, tgt_rows)), self.buckets)
            enc_ids, enc_mask = pad_rows(enc_rows, enc_w, self.pad_id, left=False)
            targets, dec_mask = pad_rows(tgt_rows, dec_w, self.pad_id, left=False)
            dec_in = np.concatenate([np.full((len(tgt_rows), 1), start, np.int32), targets[:, :-1]], axis=1)
            self.compiled_shapes.add(("score", enc_ids.shape, dec_in.shape))
            lp = np.asarray(fn(self.pretrained.params, enc_ids, enc_mask, dec_in, dec_mask, targets, lora))
            for r, i in enumerate(batch):
                n_t = len(examples[i][1])
                tok_lp = lp[r, :n_t].tolist()
                results[i] = ScoreResult(float(np.sum(tok_lp)), n_t, tok_lp)
        return results  # type: ignore[return-value]

    # -------------------------------------------------------------------- generation

    def generate(
        self,
        prompts: Sequence[Sequence[int]],
        max_new_tokens: int = 64,
        stop_sequences: Sequence[Sequence[int]] = (),
        lora: LoraWeights | None = None,
    ) -> list[GenerateResult]:
        """Greedy continuations (EOS excluded; a stop sequence, if hit, included)."""
        tok = self.pretrained.tokenizer
        eos = tuple(tok.eos_ids) if tok else tuple(getattr(self.pretrained.config, "eos_token_ids", ()))
        stops = tuple(tuple(s) for s in stop_sequences if s)
        results: list[GenerateResult | None] = [None] * len(prompts)
        for i, p in enumerate(prompts):
            if not p:
                raise ValueError(f"prompt {i}: empty")
        for batch in self._batches([len(p) for p in prompts]):
            rows = self._fill([list(prompts[i]) for i in batch])
            width = bucket_length(max(map(len, rows)), self.buckets)
            ids, mask = pad_rows(rows, width, self.pad_id, left=self.pretrained.family == "llama")
            self.compiled_shapes.add(("generate", ids.shape, max_new_tokens))
            out, lengths = decoding.greedy_generate(
                self.model, self.pretrained.params, ids, mask, lora,
                max_new_tokens=max_new_tokens, eos_ids=eos, stop_sequences=stops, pad_id=self.pad_id,
            )
            out, lengths = np.asarray(out), np.asarray(lengths)
            for r, i in enumerate(batch):
                results[i] = GenerateResult(out[r, : lengths[r]].tolist())
        return results  # type: ignore[return-value]
