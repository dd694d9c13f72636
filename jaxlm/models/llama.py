"""Llama-family decoder (Llama, Mistral, SmolLM2): RoPE, grouped-query attention, SwiGLU, RMSNorm.

Pure Flax Linen. One code path serves training and cached decoding: keys live in slots
[0, S) of a cache (for a plain forward, the current sequence itself), a boolean `kv_mask` marks
real slots, and RoPE positions come from the attention mask, so left and right padding are exact.
"""

from __future__ import annotations

import dataclasses
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


@dataclasses.dataclass(frozen=True)
class LlamaConfig:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int | None = None
    rope_theta: float = 10000.0
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
        return self.head_dim or self.hidden_size // self.num_heads


def rope(x_BxLxHxD: Array, positions_BxL: Array, theta: float) -> Array:
    """Rotary embedding in the Hugging Face (rotate-half, non-interleaved) layout."""
    d = x_BxLxHxD.shape[-1]
    inv_freq = 1.0 / (theta ** (jnp.arange(0, d, 2, dtype=jnp.float32) / d))
    angles = positions_BxL.astype(jnp.float32)[..., None] * inv_freq  # (B, L, D/2)
    angles = jnp.concatenate([angles, angles], axis=-1)[:, :, None, :]
    cos, sin = jnp.cos(angles), jnp.sin(angles)
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
    for packed rows (`segment_ids`, no cache so S = L), iff both lie in the same segment."""
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
    config: LlamaConfig

    @nn.compact
    def __call__(self, x, positions, bias, lora, lora_scale, layer_cache=None, cache_index=None):
        c = self.config
        dt, pdt = jnp.dtype(c.dtype), jnp.dtype(c.param_dtype)
        hd = c.dim_per_head
        dense = lambda n, f, axes: Dense(f, axes, use_bias=c.attention_bias, dtype=dt, param_dtype=pdt, name=n)
        b, l, _ = x.shape
        q = dense("q_proj", c.num_heads * hd, ("embed", "heads"))(x, sub(lora, "q_proj"), lora_scale)
        k = dense("k_proj", c.num_kv_heads * hd, ("embed", "kv"))(x, sub(lora, "k_proj"), lora_scale)
        v = dense("v_proj", c.num_kv_heads * hd, ("embed", "kv"))(x, sub(lora, "v_proj"), lora_scale)
        q = rope(q.reshape(b, l, c.num_heads, hd), positions, c.rope_theta)
        k = heads_major(rope(k.reshape(b, l, c.num_kv_heads, hd), positions, c.rope_theta))
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
    config: LlamaConfig

    @nn.compact
    def __call__(self, x, lora, lora_scale):
        c = self.config
        dt, pdt = jnp.dtype(c.dtype), jnp.dtype(c.param_dtype)
        dense = lambda n, f, axes: Dense(f, axes, use_bias=c.mlp_bias, dtype=dt, param_dtype=pdt, name=n)
        gate = dense("gate_proj", c.intermediate_size, ("embed", "mlp"))(x, sub(lora, "gate_proj"), lora_scale)
        up = dense("up_proj", c.intermediate_size, ("embed", "mlp"))(x, sub(lora, "up_proj"), lora_scale)
        return dense("down_proj", c.hidden_size, ("mlp", "embed"))(nn.silu(gate) * up, sub(lora, "down_proj"), lora_scale)


class LlamaBlock(nn.Module):
    config: LlamaConfig

    @nn.compact
    def __call__(self, x, positions, bias, lora, lora_scale, layer_cache=None, cache_index=None):
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
    ):
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
        for i in range(c.num_layers):
            name = f"layers_{i}"
            layer_cache = None if cache is None else cache[name]
            x, layer_new = block(c, name=name)(x, positions, bias, sub(tree, name), scale, layer_cache, index)
            x = constrain_activation(x)
            if new_cache is not None:
                new_cache[name] = layer_new
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
    """An empty KV cache with `max_length` slots per example, heads-major (B, K, S, D)."""
    dtype = jnp.dtype(dtype or config.dtype)
    shape = (batch_size, config.num_kv_heads, max_length, config.dim_per_head)
    cache: Cache = {"kv_mask": jnp.zeros((batch_size, max_length), bool)}
    for i in range(config.num_layers):
        cache[f"layers_{i}"] = {"k": jnp.zeros(shape, dtype), "v": jnp.zeros(shape, dtype)}
    return cache


def config_from_hf(hf: Mapping[str, Any]) -> LlamaConfig:
    """LlamaConfig from a transformers `config.json` dict (LlamaForCausalLM, MistralForCausalLM)."""
    eos = hf.get("eos_token_id", 2)
    rope_theta = hf.get("rope_theta") or (hf.get("rope_parameters") or {}).get("rope_theta", 10000.0)
    scaling = hf.get("rope_scaling") or (hf.get("rope_parameters") or {})
    if scaling and scaling.get("rope_type", scaling.get("type", "default")) not in ("default", None):
        raise ValueError(f"config.json: rope scaling {scaling!r} is not supported (only default RoPE)")
    return LlamaConfig(
        vocab_size=hf["vocab_size"],
        hidden_size=hf["hidden_size"],
        intermediate_size=hf["intermediate_size"],
        num_layers=hf["num_hidden_layers"],
        num_heads=hf["num_attention_heads"],
        num_kv_heads=hf.get("num_key_value_heads") or hf["num_attention_heads"],
        head_dim=hf.get("head_dim"),
        rope_theta=float(rope_theta),
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


def config_to_hf(config: LlamaConfig) -> dict[str, Any]:
    """transformers LlamaForCausalLM `config.json` dict for this config."""
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
