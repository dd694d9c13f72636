"""Greedy (or sampled) decoding with a KV cache: one `lax.while_loop`, jitted once per (model, shapes, options).

`greedy_loop` is model-agnostic: it takes the logits of the first new token and a `step` that feeds
one token per example and returns the next logits; each family supplies its own start (prefill
and step). EOS ids stop an example (EOS not emitted); token-level stop
sequences stop it with the sequence included (callers trim text at the stop string).
`greedy_generate` is the jitted entry point for both families; a Llama may continue from a cached
shared prefix (`jaxlm.models.prefix`): the prompts then hold only the tokens after it.

Sampling (`Sampling`: temperature, top-k, top-p, seed) replaces the argmax; temperature 0 is greedy.
Each row draws from its own key, fold_in(fold_in(PRNGKey(seed), row id), step), so a row's sample
does not depend on which rows share its batch.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp

from jaxlm.models.lora import LoraWeights

Array = jax.Array


@dataclasses.dataclass(frozen=True)
class Sampling:
    """How the next token is chosen (hashable: a static argument of the jitted decoder).

    Attributes:
      temperature: logits are divided by it before sampling; 0 means greedy (argmax).
      top_k: keep only the k most likely tokens (0: all).
      top_p: keep the smallest set of most likely tokens whose probability reaches top_p (1.0: all).
      seed: PRNG seed; a row's draws depend only on (seed, its row id, the step).

    Raises:
      ValueError: at construction, a negative temperature or top_k, or top_p outside (0, 1].
    """

    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int = 0

    def __post_init__(self) -> None:
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0, got {self.top_k}")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must lie in (0, 1], got {self.top_p}")

    @property
    def greedy(self) -> bool:
        """Whether this is plain argmax decoding."""
        return self.temperature == 0.0


GREEDY = Sampling()


def filter_logits(logits_BxV: Array, top_k: int = 0, top_p: float = 1.0) -> Array:
    """Logits with everything outside the top-k / top-p (nucleus) set at -inf.

    Args:
      logits_BxV: float logits (B, V) (already divided by the temperature).
      top_k: keep the k largest per row (0: no top-k cut). Ties at the k-th value are all kept.
      top_p: keep the most likely tokens whose cumulative probability first reaches top_p (the
        most likely token is always kept); 1.0: no cut.

    Returns:
      float32 (B, V), -inf outside the kept set.
    """
    logits = logits_BxV.astype(jnp.float32)
    if top_k > 0 and top_k < logits.shape[-1]:
        kth = jax.lax.top_k(logits, top_k)[0][:, -1:]
        logits = jnp.where(logits < kth, -jnp.inf, logits)
    if top_p < 1.0:
        sorted_logits = jnp.sort(logits, axis=-1)[:, ::-1]
        probs = jax.nn.softmax(sorted_logits, axis=-1)
        before = jnp.cumsum(probs, axis=-1) - probs  # mass of the strictly more likely tokens
        kept = before < top_p
        cutoff = jnp.min(jnp.where(kept, sorted_logits, jnp.inf), axis=-1, keepdims=True)
        logits = jnp.where(logits < cutoff, -jnp.inf, logits)
    return logits


def chooser(sampling: Sampling, row_ids_B: Array | None) -> Callable[[Array, Array], Array]:
    """The token choice of `greedy_loop`: (logits (B, V), step t) -> int32 tokens (B,).

    Args:
      sampling: greedy (temperature 0) or the sampling settings.
      row_ids_B: int (B,) row ids that key each row's draws (None: 0..B-1); unused when greedy.

    Returns:
      The choice function.
    """
    if sampling.greedy:
        return lambda logits, t: jnp.argmax(logits, axis=-1).astype(jnp.int32)
    base = jax.random.PRNGKey(sampling.seed)

    def choose(logits, t):
        rows = jnp.arange(logits.shape[0]) if row_ids_B is None else row_ids_B
        keys = jax.vmap(lambda r: jax.random.fold_in(jax.random.fold_in(base, r), t))(rows)
        filtered = filter_logits(logits.astype(jnp.float32) / sampling.temperature, sampling.top_k, sampling.top_p)
        return jax.vmap(jax.random.categorical)(keys, filtered).astype(jnp.int32)

    return choose


def greedy_loop(
    first_logits_BxV: Array,
    step: Callable[[Array, Array, Any], tuple[Array, Any]],
    state: Any,
    *,
    max_new_tokens: int,
    eos_ids: Sequence[int],
    stop_sequences: Sequence[Sequence[int]] = (),
    pad_id: int = 0,
    choose: Callable[[Array, Array], Array] | None = None,
) -> tuple[Array, Array]:
    """Returns (tokens (B, max_new_tokens) padded with `pad_id`, lengths (B,)).

    `lengths` counts generated tokens before EOS (stop-sequence tokens included).

    Greedy (argmax) decoding in one `lax.while_loop`, which ends after `max_new_tokens` steps or
    once every example is done. `step` runs after every emitted token, the last one included.

    Args:
      first_logits_BxV: logits (B, V) of the first new token.
      step: (token int32 (B,), step index t int32 scalar, state) -> (logits (B, V) of the next token,
        new state); the state must keep its structure, shapes and dtypes (e.g. a KV cache).
      state: the initial state handed to `step`.
      max_new_tokens: most tokens generated per example.
      eos_ids: ids that stop an example; the EOS token is not counted in `lengths`.
      stop_sequences: token sequences that stop an example once its generated tokens end with one
        (matched against generated tokens only; the sequence is kept).
      pad_id: fills `tokens` at and after each example's length.
      choose: (logits (B, V), step t) -> int32 tokens (B,) (see `chooser`); None: argmax.

    Returns:
      (tokens int32 (B, max_new_tokens), lengths int32 (B,)); an example that hits neither EOS nor a
      stop sequence has length `max_new_tokens`.
    """
    batch = first_logits_BxV.shape[0]
    prefix = max((len(s) for s in stop_sequences), default=0)
    eos = jnp.asarray(list(eos_ids) or [-1], jnp.int32)
    choose = choose or chooser(GREEDY, None)

    def cond(carry):
        t, _, _, _, done, _ = carry
        return (t < max_new_tokens) & ~jnp.all(done)

    def body(carry):
        t, logits, state, out, done, lengths = carry
        token = jnp.where(done, pad_id, choose(logits, t))
        out = jax.lax.dynamic_update_slice(out, token[:, None], (0, prefix + t))
        hit_eos = jnp.isin(token, eos)
        hit_stop = jnp.zeros_like(done)
        for seq in stop_sequences:
            tail = jax.lax.dynamic_slice(out, (0, prefix + t + 1 - len(seq)), (batch, len(seq)))
            hit_stop |= jnp.all(tail == jnp.asarray(seq, jnp.int32), axis=-1)
        newly = ~done & (hit_eos | hit_stop)
        lengths = jnp.where(newly, jnp.where(hit_eos, t, t + 1), lengths)
        done = done | newly
        logits, state = step(token, t, state)
        return t + 1, logits, state, out, done, lengths

    out = jnp.full((batch, prefix + max_new_tokens), -1, jnp.int32)
    carry = (
        jnp.int32(0),
        first_logits_BxV,
        state,
        out,
        jnp.zeros((batch,), bool),
        jnp.full((batch,), max_new_tokens, jnp.int32),
    )
    _, _, _, out, done, lengths = jax.lax.while_loop(cond, body, carry)
    tokens = out[:, prefix:]
    positions = jnp.arange(max_new_tokens)[None, :]
    tokens = jnp.where(positions < lengths[:, None], tokens, pad_id)
    return tokens, lengths


def last_real_index(mask_BxL: Array) -> Array:
    """Index of the last real token per row; right and left padding alike.

    Args:
      mask_BxL: (B, L) bool or 0/1, nonzero on real tokens.

    Returns:
      int32 (B,) indices in [0, L); a row with no real token gives L - 1.
    """
    length = mask_BxL.shape[1]
    return length - 1 - jnp.argmax(mask_BxL[:, ::-1].astype(jnp.int32), axis=1)


def _llama_start(model: Any, variables: Any, input_ids: Array, mask: Array, lora, max_new_tokens: int,
                 prefix: tuple[Any, Array] | None = None):
    """Prefill the prompts (left or right padded); return the first logits, the step, the cache.

    With `prefix` = (a cache of B rows whose T slots hold each row's prefix, real prefix lengths (B,)),
    the prompts continue after it: written from slot T, positions offset by the prefix length."""
    from jaxlm.models.llama import init_cache
    from jaxlm.models.prefix import with_free_slots

    batch, length = input_ids.shape
    if prefix is None:
        cache, start, offset = init_cache(model.config, batch, length + max_new_tokens), 0, jnp.zeros((batch,), jnp.int32)
    else:
        cache, offset = prefix
        start = cache["kv_mask"].shape[1]
        cache = with_free_slots(cache, length + max_new_tokens)
    positions = jnp.maximum(jnp.cumsum(mask, axis=1) - 1, 0) + offset[:, None]
    logits, cache = model.apply(
        variables, input_ids, mask, positions, lora=lora, cache=cache, cache_index=start,
        gather_index=last_real_index(mask),
    )
    next_position = jnp.sum(mask, axis=1) + offset

    def step(token, t, cache):
        logits, cache = model.apply(
            variables, token[:, None], jnp.ones((batch, 1), bool), (next_position + t)[:, None],
            lora=lora, cache=cache, cache_index=start + length + t,
        )
        return logits[:, 0], cache

    return logits[:, 0], step, cache


def _t5_start(model: Any, variables: Any, input_ids: Array, mask: Array, lora, max_new_tokens: int, prefix=None):
    """Encode once and feed the decoder start token. This first step runs before the loop because it
    also puts the cross-attention keys/values into the cache, so the loop carry keeps one structure."""
    from jaxlm.models.t5 import init_cache

    if prefix is not None:
        raise ValueError("a cached decoder prefix is for decoder-only (llama) models")
    batch = input_ids.shape[0]
    encoded = model.apply(variables, input_ids, mask, lora=lora, method="encode")
    cache = init_cache(model.config, batch, max_new_tokens + 1)
    start = jnp.full((batch, 1), model.config.decoder_start_token_id, jnp.int32)
    logits, cache = model.apply(variables, start, encoded, mask, lora=lora, cache=cache, cache_index=0, method="decode")

    def step(token, t, cache):
        logits, cache = model.apply(
            variables, token[:, None], encoded, mask, lora=lora, cache=cache, cache_index=t + 1, method="decode"
        )
        return logits[:, 0], cache

    return logits[:, 0], step, cache


_STARTS = {"llama": _llama_start, "t5": _t5_start}


# Compiled once per (model, shapes, max_new_tokens, eos/stop ids, pad id).
@functools.partial(jax.jit, static_argnames=("model", "max_new_tokens", "eos_ids", "stop_sequences", "pad_id",
                                             "sampling"))
def greedy_generate(
    model: Any,
    params: Any,
    input_ids: Array,
    attention_mask: Array,
    lora: LoraWeights | None = None,
    *,
    max_new_tokens: int,
    eos_ids: tuple[int, ...],
    stop_sequences: tuple[tuple[int, ...], ...] = (),
    pad_id: int = 0,
    prefix: Any = None,
    prefix_length: Array | None = None,
    sampling: Sampling = GREEDY,
    row_ids: Array | None = None,
) -> tuple[Array, Array]:
    """Greedy continuation of padded prompts for a `Llama` (prompts left or right padded) or `T5`
    module (inputs to the encoder). Returns (tokens (B, max_new_tokens), lengths (B,)).

    Jitted; `model`, `max_new_tokens`, `eos_ids`, `stop_sequences` and `pad_id` are static (hashable).
    Llama: the prompts are prefilled into a cache of L + max_new_tokens slots; T5: the inputs are
    encoded once and the decoder starts from `decoder_start_token_id` (cache of max_new_tokens + 1 slots).

    Args:
      model: a `Llama` or `T5` module.
      params: its plain params.
      input_ids: integer prompt (Llama) or encoder (T5) ids (B, L).
      attention_mask: (B, L) bool or 0/1, True on real tokens.
      lora: None, one adapter, or one per example (leaves (B, ...)).
      max_new_tokens: most tokens generated per example.
      eos_ids: ids that stop an example (not emitted).
      stop_sequences: token sequences that stop an example (emitted).
      pad_id: padding of the returned tokens.
      prefix: Llama only: a cache of B rows (`jaxlm.models.prefix.take_rows` of `prefix_cache`) whose
        T slots hold each row's shared prefix; `input_ids` are then the tokens after it. None: none.
      prefix_length: int32 (B,) real prefix tokens of each row (with `prefix`).
      sampling: greedy (default) or temperature / top-k / top-p sampling (static).
      row_ids: int (B,) ids keying each row's random draws (sampling only; None: 0..B-1).

    Returns:
      (tokens int32 (B, max_new_tokens) padded with `pad_id`, lengths int32 (B,)); see `greedy_loop`.

    Raises:
      ValueError: the model's `config.family` is neither "llama" nor "t5", or a `prefix` for T5 (at
        trace time).
    """
    family = model.config.family
    if family not in _STARTS:
        raise ValueError(f"greedy decoding needs a llama or t5 model, got {family!r}")
    first_logits, step, state = _STARTS[family](
        model, {"params": params}, input_ids, attention_mask.astype(bool), lora, max_new_tokens,
        None if prefix is None else (prefix, prefix_length),
    )
    return greedy_loop(
        first_logits, step, state, max_new_tokens=max_new_tokens, eos_ids=eos_ids,
        stop_sequences=stop_sequences, pad_id=pad_id, choose=chooser(sampling, row_ids),
    )
