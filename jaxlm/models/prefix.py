"""A cached prefix for the decoder-only model: run a shared prefix once, continue many rows from it.

The keys and values of a prefix (an instruction, a shared prompt) are computed once per distinct
prefix and every row that starts with it attends to them. Exact: `continue_from_prefix` on a row
gives the logits that one forward over the concatenation (the prefix's real tokens, then the row)
gives, because RoPE depends only on position differences, the row's positions continue after the
prefix's real tokens, and padding slots are masked out of attention.

Used by TAGI's decoder-only instruction fusion (`HypernetConfig.fusion` on a Llama base: the adapted
model also attends to its instruction's keys/values, computed once per task in a step).

With Mistral's sliding window, the window counts cache slots, so a padded prefix row sees up to its
padding's worth of tokens fewer than the concatenated forward once the window is reached.

Cache layout is `jaxlm.models.llama`'s: {'kv_mask': (N, S), 'layers_i': {'k', 'v'}: (N, K, S, Dh)}.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from jaxlm.models.llama import Cache, Llama, init_cache
from jaxlm.models.lora import LoraWeights

Array = jax.Array


def prefix_cache(model: Llama, params: Any, ids_GxT: Array, mask_GxT: Array, *, extra_slots: int,
                 lora: LoraWeights | None = None) -> tuple[Cache, Array]:
    """Runs G prefixes once and returns their KV cache with room for `extra_slots` more tokens.

    Args:
      model: the Llama module.
      params: its params.
      ids_GxT: integer prefix token ids (G, T), right- or left-padded.
      mask_GxT: (G, T) bool or 0/1, True on real prefix tokens (a row may be all padding: an empty
        prefix, after which a row continues exactly as a plain forward).
      extra_slots: L, the slots kept free after the prefix for the rows that continue from it.
      lora: None, one adapter, or one per prefix (leaves (G, ...)); the prefix is read by the same
        (adapted) model that reads its continuation.

    Returns:
      (cache with S = T + L slots, the prefix in slots [0, T) in `model.config.dtype`; number of real
      prefix tokens int32 (G,), the position the continuation starts at).
    """
    g, t = ids_GxT.shape
    mask_GxT = mask_GxT.astype(bool)
    cache = init_cache(model.config, g, t + extra_slots)
    last = jnp.zeros((g,), jnp.int32)  # only one position reaches the final norm: cheap
    _, cache = model.apply({"params": params}, ids_GxT, mask_GxT, None, lora=lora, cache=cache, cache_index=0,
                           output="hidden", gather_index=last)
    return cache, jnp.sum(mask_GxT, axis=1, dtype=jnp.int32)


def take_rows(cache: Cache, index_B: Array) -> Cache:
    """The cache rows `index_B` (B,) of a (G, ...) cache: each row gets its prefix's keys/values."""
    return jax.tree_util.tree_map(lambda x: jnp.take(x, index_B, axis=0), cache)


def with_free_slots(cache: Cache, extra_slots: int) -> Cache:
    """The cache with `extra_slots` empty slots appended after its S slots (masked out, zero keys/values).

    Args:
      cache: a Llama cache {'kv_mask': (B, S), 'layers_i': {'k', 'v'}: (B, K, S, Dh)}.
      extra_slots: L >= 0, the slots added for the tokens that continue from it.

    Returns:
      A cache of S + L slots, slots [0, S) unchanged.
    """
    if extra_slots == 0:
        return cache

    def pad(x):
        axis = 1 if x.ndim == 2 else 2  # kv_mask (B, S); keys/values (B, K, S, Dh)
        widths = [(0, 0)] * x.ndim
        widths[axis] = (0, extra_slots)
        return jnp.pad(x, widths)

    return jax.tree_util.tree_map(pad, cache)


def pad_prefixes(cache: Cache, length_G: Array, rows: int, slots: int) -> tuple[Cache, Array]:
    """A (G, ... S slots) prefix cache and its lengths padded to `rows` prefixes of `slots` slots:
    added rows are empty (length 0, never gathered), added slots masked out with zero keys/values,
    so every row that continues from it computes what it did from the unpadded cache. Callers pad
    the prefixes of one sweep to one shape, so the programs that continue from them compile once.

    Args:
      cache: {'kv_mask': (G, S), 'layers_i': {'k', 'v'}: (G, K, S, Dh)}.
      length_G: (G,) int32 real prefix lengths.
      rows: >= G prefixes.
      slots: >= S slots.

    Returns:
      (cache (rows, ... slots), lengths (rows,)).
    """
    g, s = cache["kv_mask"].shape
    if (rows, slots) == (g, s):
        return cache, length_G

    def pad(x):
        widths = [(0, rows - g)] + [(0, 0)] * (x.ndim - 1)
        widths[1 if x.ndim == 2 else 2] = (0, slots - s)  # kv_mask (G, S); keys/values (G, K, S, Dh)
        return jnp.pad(x, widths)

    return jax.tree_util.tree_map(pad, cache), jnp.pad(length_G, (0, rows - g))


def continue_from_prefix(model: Llama, params: Any, cache_B: Cache, prefix_length_B: Array, ids_BxL: Array,
                         mask_BxL: Array | None = None, positions_BxL: Array | None = None, *,
                         lora: LoraWeights | None = None, gather_index: Array | None = None,
                         prefix_slots: int | None = None) -> Array:
    """Logits of B rows that each continue their own cached prefix.

    Args:
      model: the Llama module.
      params: its params.
      cache_B: a cache of B rows (`take_rows` of `prefix_cache`) with S = T + L slots, the prefix in
        slots [0, T) and slots [T, S) free.
      prefix_length_B: int (B,), each row's number of real prefix tokens.
      ids_BxL: integer token ids (B, L) of the continuations.
      mask_BxL: (B, L) True on real tokens; None: all real.
      positions_BxL: positions within the continuation (B, L), 0 at its first real token; None: the
        count of real tokens before each one. The prefix length is added to them.
      lora: None, one adapter, or one per row (leaves (B, ...)).
      gather_index: integer (B,) or (B, T') positions of the continuation to keep, or None.
      prefix_slots: T, the prefix's padded width (`ids_GxT.shape[1]` of `prefix_cache`); None: the
        cache's last L slots are used (right for a cache made with `extra_slots` = L).

    Returns:
      float32 logits (B, L, V) (or gathered, see `Llama`), equal to a forward over each row's real
      prefix tokens followed by its continuation, at the continuation's positions.

    Raises:
      ValueError: the cache has fewer than T + L slots.
    """
    b, l = ids_BxL.shape
    mask_BxL = jnp.ones((b, l), bool) if mask_BxL is None else mask_BxL.astype(bool)
    if positions_BxL is None:
        positions_BxL = jnp.maximum(jnp.cumsum(mask_BxL, axis=1) - 1, 0)
    slots = cache_B["kv_mask"].shape[1]
    start = slots - l if prefix_slots is None else prefix_slots
    if start < 0 or start + l > slots:
        raise ValueError(f"continue_from_prefix: a cache of {slots} slots cannot hold {l} more tokens "
                         f"after a prefix of {start}")
    logits, _ = model.apply({"params": params}, ids_BxL, mask_BxL, positions_BxL + prefix_length_B[:, None],
                            lora=lora, cache=cache_B, cache_index=start, gather_index=gather_index)
    return logits
