"""Llama-family decoder (Llama, Mistral, SmolLM2): RoPE, grouped-query attention, SwiGLU, RMSNorm.

Pure Flax Linen. One code path serves training and cached decoding: keys live in slots
[0, S) of a cache (for a plain forward, the current sequence itself), a boolean `kv_mask` marks
real slots, and RoPE positions come from the attention mask, so left and right padding are exact.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Mapping

import jax
import jax.numpy as jnp
from flax import linen as nn

from jaxlm.models.layers import Dense, Embed, RMSNorm, dot_product_attention, heads_major, mask_bias, sub
from jaxlm.models.lora import LoraWeights
from jaxlm.sharding import constrain_activation

Array = jax.Array
Cache = dict[str, Any]


REMAT_POLICIES = {
    "none": None,
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


ROPE_TYPES = ("default", "linear", "dynamic", "yarn", "llama3")


@dataclasses.dataclass(frozen=True)
class RopeScaling:
    """RoPE frequency scaling, as transformers' `rope_parameters` / `rope_scaling` (same names).

    Attributes:
      rope_type: "linear" (frequencies / factor), "dynamic" (NTK base grown with the longest position
        of the call, past `original_max_position_embeddings`), "yarn" or "llama3".
      factor: the scaling factor.
      original_max_position_embeddings: pretraining context (llama3, yarn; dynamic: the model's
        max_position_embeddings).
      low_freq_factor: llama3's low-frequency factor.
      high_freq_factor: llama3's high-frequency factor.
      beta_fast: yarn's extrapolation boundary (transformers' default 32).
      beta_slow: yarn's interpolation boundary (default 1).
      attention_factor: yarn's cos/sin scale; None derives it from factor/mscale/mscale_all_dim.
      mscale: yarn's mscale (with mscale_all_dim), or None.
      mscale_all_dim: yarn's mscale_all_dim, or None.
      truncate: yarn truncates the correction range to whole dimensions (transformers' default True).

    Raises:
      ValueError: at construction, an unknown rope_type, a factor <= 0, or a missing original context.
    """

    rope_type: str
    factor: float = 1.0
    original_max_position_embeddings: int | None = None
    low_freq_factor: float | None = None
    high_freq_factor: float | None = None
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    attention_factor: float | None = None
    mscale: float | None = None
    mscale_all_dim: float | None = None
    truncate: bool = True

    def __post_init__(self) -> None:
        if self.rope_type not in ROPE_TYPES[1:]:
            raise ValueError(f"rope_type={self.rope_type!r} is not supported; supported: {list(ROPE_TYPES)}")
        if not self.factor > 0:
            raise ValueError(f"rope scaling factor={self.factor!r} must be positive")
        if self.rope_type in ("llama3", "yarn", "dynamic") and not self.original_max_position_embeddings:
            raise ValueError(f"rope_type={self.rope_type!r} needs original_max_position_embeddings")
        if self.rope_type == "llama3" and (self.low_freq_factor is None or self.high_freq_factor is None):
            raise ValueError("rope_type='llama3' needs low_freq_factor and high_freq_factor")


@dataclasses.dataclass(frozen=True)
class LlamaConfig:
    """Hyperparameters of a Llama-family decoder (names follow transformers' LlamaConfig where they can).

    Attributes:
      vocab_size: V.
      hidden_size: model width D.
      intermediate_size: width of the SwiGLU MLP.
      num_layers: number of decoder blocks (`layers_0` ... `layers_{n-1}`).
      num_heads: query heads H.
      num_kv_heads: key/value heads K (GQA); H must be a multiple of K.
      head_dim: per-head width; None means hidden_size // num_heads (see `dim_per_head`).
      rope_theta: RoPE base.
      rope_scaling: RoPE frequency scaling (Llama 3.1's "llama3", "linear", "dynamic", "yarn"), or None.
      rms_norm_eps: epsilon of every RMSNorm.
      tie_word_embeddings: logits from the embedding table (no `lm_head` param).
      attention_bias: q/k/v/o projections have biases.
      mlp_bias: gate/up/down projections have biases.
      max_position_embeddings: context length, kept for export (the model does not check positions).
      sliding_window: Mistral's attention window in cache slots, or None for full causal attention.
      bos_token_id: BOS id, or None.
      eos_token_ids: ids that end a generation.
      pad_token_id: pad id, or None.
      dtype: activation (computation) dtype name, e.g. "float32" or "bfloat16".
      param_dtype: dtype name params are created in.
      remat: gradient checkpointing of each block in training forwards: "none", "full" or "dots".

    Raises:
      ValueError: at construction, when num_heads is not a multiple of num_kv_heads or `remat` is unknown.
    """

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int | None = None
    rope_theta: float = 10000.0
    rope_scaling: RopeScaling | None = None
    rms_norm_eps: float = 1e-6
    tie_word_embeddings: bool = False
    attention_bias: bool = False
    mlp_bias: bool = False
    max_position_embeddings: int = 2048
    sliding_window: int | None = None
    bos_token_id: int | None = 1
    eos_token_ids: tuple[int, ...] = (2,)
    pad_token_id: int | None = None
    dtype: str = "float32"
    param_dtype: str = "float32"
    # Gradient checkpointing of each decoder block in training forwards (no cache): "none", "full"
    # (recompute everything in the backward pass) or "dots" (keep matmul outputs, recompute the rest).
    remat: str = "none"

    family = "llama"

    def __post_init__(self) -> None:
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"num_heads={self.num_heads} is not a multiple of num_kv_heads={self.num_kv_heads}")
        if self.remat not in REMAT_POLICIES:
            raise ValueError(f"remat={self.remat!r}: expected one of {sorted(REMAT_POLICIES)}")

    @property
    def dim_per_head(self) -> int:
        """Per-head width: `head_dim`, or hidden_size // num_heads when unset."""
        return self.head_dim or self.hidden_size // self.num_heads


def rope_frequencies(dim: int, theta: float, scaling: RopeScaling | None, positions_BxL: Array) -> tuple[Array, float]:
    """Inverse frequencies (dim/2,) float32 and the cos/sin scale, as transformers' rope init functions.

    Args:
      dim: the rotated width D (even).
      theta: RoPE base.
      scaling: the scaling, or None for plain RoPE.
      positions_BxL: the call's positions (only "dynamic" reads them: its base grows with max + 1).

    Returns:
      (inv_freq (D/2,) float32, attention factor: 1.0 except for yarn).
    """
    exponents = jnp.arange(0, dim, 2, dtype=jnp.float32) / dim
    inv_freq = 1.0 / (theta ** exponents)
    if scaling is None:
        return inv_freq, 1.0
    s = scaling
    if s.rope_type == "linear":
        return inv_freq / s.factor, 1.0
    if s.rope_type == "dynamic":
        # transformers recomputes the base once the longest position passes the original context;
        # stateless here: each call uses its own longest position (as a fresh transformers model does).
        original = s.original_max_position_embeddings
        seq_len = jnp.maximum(jnp.max(positions_BxL) + 1, original).astype(jnp.float32)
        base = theta * ((s.factor * seq_len / original) - (s.factor - 1)) ** (dim / (dim - 2))
        return 1.0 / (base ** exponents), 1.0
    if s.rope_type == "llama3":
        original = s.original_max_position_embeddings
        low_wavelen, high_wavelen = original / s.low_freq_factor, original / s.high_freq_factor
        wavelen = 2 * math.pi / inv_freq
        scaled = jnp.where(wavelen > low_wavelen, inv_freq / s.factor, inv_freq)
        smooth = (original / wavelen - s.low_freq_factor) / (s.high_freq_factor - s.low_freq_factor)
        smoothed = (1 - smooth) * scaled / s.factor + smooth * scaled
        medium = ~(wavelen < high_wavelen) & ~(wavelen > low_wavelen)
        return jnp.where(medium, smoothed, scaled), 1.0
    # yarn
    def get_mscale(scale: float, m: float = 1.0) -> float:
        return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0

    attention_factor = s.attention_factor
    if attention_factor is None:
        if s.mscale and s.mscale_all_dim:
            attention_factor = get_mscale(s.factor, s.mscale) / get_mscale(s.factor, s.mscale_all_dim)
        else:
            attention_factor = get_mscale(s.factor)
    original = s.original_max_position_embeddings

    def correction_dim(rotations: float) -> float:
        return (dim * math.log(original / (rotations * 2 * math.pi))) / (2 * math.log(theta))

    low, high = correction_dim(s.beta_fast), correction_dim(s.beta_slow)
    if s.truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001  # transformers' guard against a zero-width ramp
    pos_freqs = theta ** exponents
    ramp = jnp.clip((jnp.arange(dim // 2, dtype=jnp.float32) - low) / (high - low), 0, 1)
    extrapolation = 1 - ramp
    inv_freq = (1.0 / (s.factor * pos_freqs)) * (1 - extrapolation) + (1.0 / pos_freqs) * extrapolation
    return inv_freq, float(attention_factor)


def rope(x_BxLxHxD: Array, positions_BxL: Array, theta: float, scaling: RopeScaling | None = None) -> Array:
    """Rotary embedding in the Hugging Face (rotate-half, non-interleaved) layout.

    Args:
      x_BxLxHxD: queries or keys (B, L, H, D), D even.
      positions_BxL: integer position of each token (B, L).
      theta: RoPE base (`rope_theta`).
      scaling: RoPE frequency scaling (`LlamaConfig.rope_scaling`), or None.

    Returns:
      (B, L, H, D) rotated, in x's dtype (the rotation is computed in float32).
    """
    d = x_BxLxHxD.shape[-1]
    inv_freq, attention_factor = rope_frequencies(d, theta, scaling, positions_BxL)
    angles = positions_BxL.astype(jnp.float32)[..., None] * inv_freq  # (B, L, D/2)
    angles = jnp.concatenate([angles, angles], axis=-1)[:, :, None, :]
    cos, sin = jnp.cos(angles), jnp.sin(angles)
    if attention_factor != 1.0:
        cos, sin = cos * attention_factor, sin * attention_factor
    x = x_BxLxHxD.astype(jnp.float32)
    x1, x2 = x[..., : d // 2], x[..., d // 2 :]
    rotated = jnp.concatenate([-x2, x1], axis=-1)
    return (x * cos + rotated * sin).astype(x_BxLxHxD.dtype)


def attention_bias(
    kv_mask_BxS: Array, cache_index: Array, length: int, dtype, window: int | None = None,
    segment_ids_BxL: Array | None = None,
) -> Array:
    """(B, 1, L, S) additive bias: key slot s is visible to query slot q = cache_index + l iff it is
    real and s <= q (and q - s < window for Mistral's sliding window, counted in cache slots), and,
    for packed rows (`segment_ids`, no cache so S = L), iff both lie in the same segment.

    Args:
      kv_mask_BxS: bool (B, S), True on real key slots.
      cache_index: slot of the first query (int or int32 scalar; 0 without a cache).
      length: number of query positions L.
      dtype: dtype of the bias.
      window: sliding window in slots, or None.
      segment_ids_BxL: packed-segment ids (B, L) (then S must equal L), or None.

    Returns:
      (B, 1, L, S) in `dtype`: 0.0 where visible, `jnp.finfo(dtype).min` elsewhere (see `mask_bias`).
    """
    query_slots = cache_index + jnp.arange(length)
    key_slots = jnp.arange(kv_mask_BxS.shape[1])
    causal = key_slots[None, :] <= query_slots[:, None]
    if window is not None:
        causal &= key_slots[None, :] > query_slots[:, None] - window
    allowed = kv_mask_BxS[:, None, None, :] & causal[None, None, :, :]
    if segment_ids_BxL is not None:
        allowed &= segment_ids_BxL[:, None, :, None] == segment_ids_BxL[:, None, None, :]
    return mask_bias(allowed, dtype)


class LlamaAttention(nn.Module):
    """Grouped-query self-attention with RoPE (`q_proj`, `k_proj`, `v_proj`, `o_proj`), scaled by Dh**-0.5.

    Attributes:
      config: the model config (H, K, Dh = `dim_per_head`, biases, dtypes).
    """

    config: LlamaConfig

    @nn.compact
    def __call__(self, x, positions, bias, lora, lora_scale, layer_cache=None, cache_index=None):
        """Attends from the L new tokens to the cache slots (or, without a cache, to themselves).

        Args:
          x: normed hidden states (B, L, D).
          positions: RoPE positions (B, L).
          bias: additive mask bias (B, 1, L, S) from `attention_bias` (S = L without a cache).
          lora: LoRA subtree of this module (keys 'q_proj', ...), or None.
          lora_scale: alpha / r.
          layer_cache: {'k', 'v'} each (B, K, S, Dh), or None for a plain forward.
          cache_index: first slot the new keys/values are written to (used only with `layer_cache`).

        Returns:
          (out (B, L, D) in `config.dtype`, updated {'k', 'v'} (B, K, S, Dh) in the cache's dtype or None).
        """
        c = self.config
        dt, pdt = jnp.dtype(c.dtype), jnp.dtype(c.param_dtype)
        hd = c.dim_per_head
        dense = lambda n, f, axes: Dense(f, axes, use_bias=c.attention_bias, dtype=dt, param_dtype=pdt, name=n)
        b, l, _ = x.shape
        q = dense("q_proj", c.num_heads * hd, ("embed", "heads"))(x, sub(lora, "q_proj"), lora_scale)
        k = dense("k_proj", c.num_kv_heads * hd, ("embed", "kv"))(x, sub(lora, "k_proj"), lora_scale)
        v = dense("v_proj", c.num_kv_heads * hd, ("embed", "kv"))(x, sub(lora, "v_proj"), lora_scale)
        q = rope(q.reshape(b, l, c.num_heads, hd), positions, c.rope_theta, c.rope_scaling)
        k = heads_major(rope(k.reshape(b, l, c.num_kv_heads, hd), positions, c.rope_theta, c.rope_scaling))
        v = heads_major(v.reshape(b, l, c.num_kv_heads, hd))
        new_cache = None
        if layer_cache is not None:
            k = jax.lax.dynamic_update_slice(layer_cache["k"], k.astype(layer_cache["k"].dtype), (0, 0, cache_index, 0))
            v = jax.lax.dynamic_update_slice(layer_cache["v"], v.astype(layer_cache["v"].dtype), (0, 0, cache_index, 0))
            new_cache = {"k": k, "v": v}
        out = dot_product_attention(q, k.astype(dt), v.astype(dt), bias, scale=hd**-0.5)
        out = dense("o_proj", c.hidden_size, ("heads", "embed"))(out.reshape(b, l, -1), sub(lora, "o_proj"), lora_scale)
        return out, new_cache


class LlamaMLP(nn.Module):
    """SwiGLU feed-forward: down_proj(silu(gate_proj(x)) * up_proj(x)).

    Attributes:
      config: the model config (widths, `mlp_bias`, dtypes).
    """

    config: LlamaConfig

    @nn.compact
    def __call__(self, x, lora, lora_scale):
        """Applies the MLP.

        Args:
          x: normed hidden states (B, L, D).
          lora: LoRA subtree of this module (keys 'gate_proj', 'up_proj', 'down_proj'), or None.
          lora_scale: alpha / r.

        Returns:
          (B, L, D) in `config.dtype`.
        """
        c = self.config
        dt, pdt = jnp.dtype(c.dtype), jnp.dtype(c.param_dtype)
        dense = lambda n, f, axes: Dense(f, axes, use_bias=c.mlp_bias, dtype=dt, param_dtype=pdt, name=n)
        gate = dense("gate_proj", c.intermediate_size, ("embed", "mlp"))(x, sub(lora, "gate_proj"), lora_scale)
        up = dense("up_proj", c.intermediate_size, ("embed", "mlp"))(x, sub(lora, "up_proj"), lora_scale)
        return dense("down_proj", c.hidden_size, ("mlp", "embed"))(nn.silu(gate) * up, sub(lora, "down_proj"), lora_scale)


class LlamaBlock(nn.Module):
    """Pre-norm decoder block: x + self_attn(input_layernorm(x)), then + mlp(post_attention_layernorm(.)).

    Attributes:
      config: the model config.
    """

    config: LlamaConfig

    @nn.compact
    def __call__(self, x, positions, bias, lora, lora_scale, layer_cache=None, cache_index=None):
        """Runs one block.

        Args:
          x: hidden states (B, L, D).
          positions: RoPE positions (B, L).
          bias: additive mask bias (B, 1, L, S).
          lora: LoRA subtree of this block (keys 'self_attn', 'mlp'), or None.
          lora_scale: alpha / r.
          layer_cache: this layer's {'k', 'v'} (B, K, S, Dh), or None.
          cache_index: first cache slot written.

        Returns:
          (hidden states (B, L, D), updated layer cache or None); see `LlamaAttention`.
        """
        c = self.config
        dt, pdt = jnp.dtype(c.dtype), jnp.dtype(c.param_dtype)
        h = RMSNorm(c.rms_norm_eps, dt, pdt, name="input_layernorm")(x)
        h, new_cache = LlamaAttention(c, name="self_attn")(
            h, positions, bias, sub(lora, "self_attn"), lora_scale, layer_cache, cache_index
        )
        x = x + h
        h = RMSNorm(c.rms_norm_eps, dt, pdt, name="post_attention_layernorm")(x)
        x = x + LlamaMLP(c, name="mlp")(h, sub(lora, "mlp"), lora_scale)
        return x, new_cache


class Llama(nn.Module):
    """Decoder-only LM. `model.apply({'params': base}, ids, mask, lora=...)` -> logits (B, L, V).

    `output='hidden'` returns the final normed hidden states instead; `gather_index` (B,) or (B, T)
    keeps only those positions before the vocab projection (prefill, scoring short targets).
    `segment_ids` (B, L) (1.. per packed segment, 0 on padding) makes attention block-diagonal for
    packed training rows; pass the per-segment `positions` with it. With `cache` (from
    `init_cache`) and `cache_index`, the tokens are written into cache slots
    [cache_index, cache_index + L) and the updated cache is returned beside the logits.

    Attributes:
      config: the model config.
    """

    config: LlamaConfig

    @nn.compact
    def __call__(
        self,
        input_ids: Array,
        attention_mask: Array | None = None,
        positions: Array | None = None,
        *,
        lora: LoraWeights | None = None,
        cache: Cache | None = None,
        cache_index: Array | int = 0,
        output: str = "logits",
        gather_index: Array | None = None,
        segment_ids: Array | None = None,
        num_layers: int | None = None,
    ):
        """Runs the decoder over L tokens per row (a training forward, a prefill, or a decoding step).

        Args:
          input_ids: integer token ids (B, L).
          attention_mask: (B, L) bool or 0/1, True on real tokens (left or right padding). None: all
            real, or `segment_ids > 0` when `segment_ids` is given.
          positions: integer RoPE positions (B, L). None: the number of real tokens before each one,
            `max(cumsum(mask) - 1, 0)`, counted over this call's tokens only, so pass positions
            explicitly for cached steps after the prefill (and per-segment ones with `segment_ids`).
          lora: None, one adapter (leaves (D_in, r) / (r, D_out)) or one per row (leaves (B, ...)).
          cache: KV cache from `init_cache` with S slots (S >= cache_index + L), or None.
          cache_index: first cache slot the L tokens are written to (int or int32 scalar).
          output: "logits" for float32 vocabulary logits, or "hidden" for the final normed hidden states.
          gather_index: integer (B,) or (B, T) positions to keep before the vocab projection, or None.
          segment_ids: packed-segment ids (B, L), 1.. per segment and 0 on padding; no cache allowed.
          num_layers: run only the first `num_layers` blocks and return their output (the residual
            stream, before the final norm) with output="hidden"; None runs every block.

        Returns:
          logits float32 (B, L, V) (with `gather_index`: (B, 1, V) for (B,), (B, T, V) for (B, T)), or
          with output="hidden" the hidden states (B, L, D) / (B, 1, D) / (B, T, D) in `config.dtype`.
          With `cache`: (that array, new cache) where the new cache is {'kv_mask': bool (B, S),
          'layers_i': {'k', 'v'} (B, K, S, Dh)} with this call's slots written.

        Raises:
          ValueError: `segment_ids` together with `cache`, or a batched LoRA whose adapter count
            differs from B.
        """
        c = self.config
        dt, pdt = jnp.dtype(c.dtype), jnp.dtype(c.param_dtype)
        b, l = input_ids.shape
        if segment_ids is not None and attention_mask is None:
            attention_mask = segment_ids > 0
        mask = jnp.ones((b, l), bool) if attention_mask is None else attention_mask.astype(bool)
        if positions is None:
            positions = jnp.maximum(jnp.cumsum(mask, axis=1) - 1, 0)
        tree, scale = (lora.params, lora.scale) if lora is not None else (None, 1.0)

        if cache is None:
            kv_mask, index = mask, 0
        else:
            kv_mask = jax.lax.dynamic_update_slice(cache["kv_mask"], mask, (0, cache_index))
            index = cache_index
        if segment_ids is not None and cache is not None:
            raise ValueError("segment_ids (packed rows) are for training forwards, not cached decoding")
        bias = attention_bias(kv_mask, index, l, dt, c.sliding_window, segment_ids)

        embed = Embed(c.vocab_size, c.hidden_size, dt, pdt, name="embed_tokens")
        x = constrain_activation(embed(input_ids))
        new_cache: Cache | None = None if cache is None else {"kv_mask": kv_mask}
        block = LlamaBlock
        if c.remat != "none" and cache is None:  # same param tree, activations recomputed in backward
            block = nn.remat(LlamaBlock, policy=REMAT_POLICIES[c.remat], prevent_cse=True)
        if num_layers is not None and (output != "hidden" or cache is not None or not 0 < num_layers <= c.num_layers):
            raise ValueError(f"num_layers={num_layers}: needs output='hidden', no cache and 1 <= num_layers <= "
                             f"{c.num_layers}")
        for i in range(c.num_layers if num_layers is None else num_layers):
            name = f"layers_{i}"
            layer_cache = None if cache is None else cache[name]
            x, layer_new = block(c, name=name)(x, positions, bias, sub(tree, name), scale, layer_cache, index)
            x = constrain_activation(x)
            if new_cache is not None:
                new_cache[name] = layer_new
        if num_layers is None:
            x = RMSNorm(c.rms_norm_eps, dt, pdt, name="norm")(x)
        if gather_index is not None:  # only these positions, (B,) or (B, T), reach the vocab projection
            index = gather_index[:, None] if gather_index.ndim == 1 else gather_index
            x = jnp.take_along_axis(x, index[:, :, None], axis=1)
        if output == "hidden":
            result = x
        elif c.tie_word_embeddings:
            result = embed.attend(x)
        else:
            result = Dense(c.vocab_size, ("embed", "vocab"), dtype=dt, param_dtype=pdt, name="lm_head")(
                x, sub(tree, "lm_head"), scale
            )
        result = result.astype(jnp.float32) if output == "logits" else result
        return result if cache is None else (result, new_cache)


def init_cache(config: LlamaConfig, batch_size: int, max_length: int, dtype: Any = None) -> Cache:
    """An empty KV cache with `max_length` slots per example, heads-major (B, K, S, D).

    Args:
      config: the model config (num_layers, K = num_kv_heads, D = dim_per_head).
      batch_size: B.
      max_length: S, slots per example (prompt length + new tokens for decoding).
      dtype: dtype of the keys/values; None means `config.dtype`.

    Returns:
      {'kv_mask': bool zeros (B, S), 'layers_i': {'k': zeros (B, K, S, D), 'v': zeros (B, K, S, D)}}
      for i in [0, num_layers).
    """
    dtype = jnp.dtype(dtype or config.dtype)
    shape = (batch_size, config.num_kv_heads, max_length, config.dim_per_head)
    cache: Cache = {"kv_mask": jnp.zeros((batch_size, max_length), bool)}
    for i in range(config.num_layers):
        cache[f"layers_{i}"] = {"k": jnp.zeros(shape, dtype), "v": jnp.zeros(shape, dtype)}
    return cache


def config_from_hf(hf: Mapping[str, Any]) -> LlamaConfig:
    """LlamaConfig from a transformers `config.json` dict (LlamaForCausalLM, MistralForCausalLM).

    Args:
      hf: the parsed config.json. `rope_theta` may also sit in `rope_parameters`; a sliding window is
        kept unless `use_sliding_window` is false; `eos_token_id` may be an int, a list or null.

    Returns:
      The LlamaConfig (dtype and param_dtype left at "float32").

    Raises:
      ValueError: an unsupported RoPE scaling (see `rope_scaling_from_hf`), or a head count the config rejects.
      KeyError: a required field (vocab_size, hidden_size, intermediate_size, num_hidden_layers,
        num_attention_heads) is missing.
    """
    eos = hf.get("eos_token_id", 2)
    rope_theta = hf.get("rope_theta") or (hf.get("rope_parameters") or {}).get("rope_theta", 10000.0)
    return LlamaConfig(
        vocab_size=hf["vocab_size"],
        hidden_size=hf["hidden_size"],
        intermediate_size=hf["intermediate_size"],
        num_layers=hf["num_hidden_layers"],
        num_heads=hf["num_attention_heads"],
        num_kv_heads=hf.get("num_key_value_heads") or hf["num_attention_heads"],
        head_dim=hf.get("head_dim"),
        rope_theta=float(rope_theta),
        rope_scaling=rope_scaling_from_hf(hf),
        rms_norm_eps=hf.get("rms_norm_eps", 1e-6),
        tie_word_embeddings=hf.get("tie_word_embeddings", False),
        attention_bias=hf.get("attention_bias", False),
        mlp_bias=hf.get("mlp_bias", False),
        max_position_embeddings=hf.get("max_position_embeddings", 2048),
        sliding_window=hf.get("sliding_window") if hf.get("use_sliding_window", True) else None,
        bos_token_id=hf.get("bos_token_id"),
        eos_token_ids=tuple(eos) if isinstance(eos, (list, tuple)) else ((eos,) if eos is not None else ()),
        pad_token_id=hf.get("pad_token_id"),
    )


_ROPE_KEYS = {f.name for f in dataclasses.fields(RopeScaling)} | {"type", "rope_theta", "partial_rotary_factor"}


def rope_scaling_from_hf(hf: Mapping[str, Any]) -> RopeScaling | None:
    """RopeScaling from a config.json's `rope_scaling` (transformers 4) or `rope_parameters` (5).

    Args:
      hf: the parsed config.json.

    Returns:
      None for default RoPE, else the scaling (llama3/yarn's original context defaults to
      max_position_embeddings, as in transformers; yarn's factor to max / original).

    Raises:
      ValueError: "config.json: ..." naming an unsupported rope_type (longrope, ...), a key of the
        scaling dict jaxlm does not know, or partial_rotary_factor != 1.
    """
    params = hf.get("rope_scaling") or hf.get("rope_parameters") or {}
    rope_type = params.get("rope_type", params.get("type", "default"))
    if rope_type in ("default", None):
        return None
    if rope_type not in ROPE_TYPES:
        raise ValueError(f"config.json: rope scaling rope_type={rope_type!r} is not supported; supported: {list(ROPE_TYPES)}")
    unknown = sorted(set(params) - _ROPE_KEYS)
    if unknown:
        raise ValueError(f"config.json: rope scaling key {unknown[0]!r} is not supported (rope_type={rope_type!r})")
    if params.get("partial_rotary_factor", 1.0) != 1.0:
        raise ValueError(f"config.json: rope scaling partial_rotary_factor={params['partial_rotary_factor']!r} is not supported")
    max_pos = hf.get("max_position_embeddings", 2048)
    original = max_pos if rope_type == "dynamic" else params.get("original_max_position_embeddings") or max_pos
    factor = params.get("factor")
    if factor is None and rope_type == "yarn":
        factor = max_pos / original
    if factor is None:
        raise ValueError(f"config.json: rope scaling rope_type={rope_type!r} needs 'factor'")
    optional = {k: params[k] for k in ("low_freq_factor", "high_freq_factor", "attention_factor", "mscale",
                                       "mscale_all_dim", "truncate") if params.get(k) is not None}
    optional.update({k: float(params[k]) for k in ("beta_fast", "beta_slow") if params.get(k)})
    return RopeScaling(rope_type, float(factor), int(original), **optional)


def rope_scaling_to_hf(scaling: RopeScaling) -> dict[str, Any]:
    """The `rope_scaling` dict of config.json for `scaling` (unset optional fields left out)."""
    out = {k: v for k, v in dataclasses.asdict(scaling).items() if v is not None}
    if scaling.rope_type == "dynamic":
        out.pop("original_max_position_embeddings")  # transformers' dynamic reads max_position_embeddings
    if scaling.rope_type != "yarn":
        for k in ("beta_fast", "beta_slow", "truncate"):
            out.pop(k)
    return out


def config_to_hf(config: LlamaConfig) -> dict[str, Any]:
    """transformers LlamaForCausalLM `config.json` dict for this config.

    Args:
      config: the model config.

    Returns:
      A JSON-serialisable dict (`eos_token_id` an int for one EOS id, else a list; `sliding_window`
      only when set; `torch_dtype` "float32").
    """
    eos = list(config.eos_token_ids)
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": config.vocab_size,
        "hidden_size": config.hidden_size,
        "intermediate_size": config.intermediate_size,
        "num_hidden_layers": config.num_layers,
        "num_attention_heads": config.num_heads,
        "num_key_value_heads": config.num_kv_heads,
        "head_dim": config.dim_per_head,
        "rope_theta": config.rope_theta,
        **({"rope_scaling": rope_scaling_to_hf(config.rope_scaling)} if config.rope_scaling else {}),
        "rms_norm_eps": config.rms_norm_eps,
        "tie_word_embeddings": config.tie_word_embeddings,
        "attention_bias": config.attention_bias,
        "mlp_bias": config.mlp_bias,
        "max_position_embeddings": config.max_position_embeddings,
        **({"sliding_window": config.sliding_window} if config.sliding_window else {}),
        "hidden_act": "silu",
        "bos_token_id": config.bos_token_id,
        "eos_token_id": eos[0] if len(eos) == 1 else eos,
        "pad_token_id": config.pad_token_id,
        "torch_dtype": "float32",
    }
