"""T5 encoder-decoder (original T5, T5 v1.1, LM-adapt, Flan-T5) matching transformers' T5ForConditionalGeneration.

Pure Flax Linen; module names mirror the HF ones (`encoder/block_0/layer_0/SelfAttention/q`) so the
weight mapping (`checkpoints.hf.hf_tensor_name`) is mechanical. T5 specifics: unscaled attention,
relative position buckets (bias computed in layer 0 of each stack, shared by every layer), RMS
layer norm, one `shared` embedding for both stacks. The decoder's self-attention keys live in
cache slots like `llama.py`; cross-attention keys/values are computed once and kept in the cache.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn

from jaxlm.models.layers import ACTIVATIONS, Dense, Embed, RMSNorm, dot_product_attention, heads_major, mask_bias, sub
from jaxlm.models.lora import LoraWeights

Array = jax.Array
Cache = dict[str, Any]



@dataclasses.dataclass(frozen=True)
class T5Config:
    """Hyperparameters of a T5 encoder-decoder (names follow transformers' T5Config).

    Attributes:
      vocab_size: V.
      d_model: model width D.
      d_kv: per-head width.
      d_ff: feed-forward width.
      num_layers: encoder blocks.
      num_heads: attention heads H (inner width H * d_kv, see `inner_dim`).
      num_decoder_layers: decoder blocks; None means `num_layers`.
      relative_attention_num_buckets: relative-position buckets per stack.
      relative_attention_max_distance: distances at or beyond this share the last bucket.
      layer_norm_epsilon: epsilon of every RMS layer norm.
      feed_forward_proj: "relu", "gelu", "gated-gelu", "gated-silu", ... ("gated-" selects wi_0/wi_1).
      tie_word_embeddings: logits from the `shared` embedding (no `lm_head` param).
      scale_decoder_outputs: multiply the decoder output by d_model**-0.5 before the head; None means
        `tie_word_embeddings`.
      decoder_start_token_id: first decoder input token.
      eos_token_ids: ids that end a generation.
      pad_token_id: pad id, or None.
      dtype: activation (computation) dtype name.
      param_dtype: dtype name params are created in.

    Raises:
      ValueError: at construction, when the activation of `feed_forward_proj` is not in `ACTIVATIONS`.
    """

    vocab_size: int
    d_model: int
    d_kv: int
    d_ff: int
    num_layers: int
    num_heads: int
    num_decoder_layers: int | None = None
    relative_attention_num_buckets: int = 32
    relative_attention_max_distance: int = 128
    layer_norm_epsilon: float = 1e-6
    feed_forward_proj: str = "gated-gelu"
    # True: no lm_head param, logits come from `shared`. scale_decoder_outputs (default: = tie) multiplies
    # the decoder output by d_model**-0.5 before the head, as original T5 does.
    tie_word_embeddings: bool = False
    scale_decoder_outputs: bool | None = None
    decoder_start_token_id: int = 0
    eos_token_ids: tuple[int, ...] = (1,)
    pad_token_id: int | None = 0
    dtype: str = "float32"
    param_dtype: str = "float32"

    family = "t5"

    def __post_init__(self) -> None:
        if self.num_decoder_layers is None:
            object.__setattr__(self, "num_decoder_layers", self.num_layers)
        if self.scale_decoder_outputs is None:
            object.__setattr__(self, "scale_decoder_outputs", self.tie_word_embeddings)
        if self.activation not in ACTIVATIONS:
            raise ValueError(
                f"feed_forward_proj={self.feed_forward_proj!r}: activation not supported ({sorted(ACTIVATIONS)})"
            )

    @property
    def is_gated(self) -> bool:
        """True for "gated-*" feed-forwards (v1.1 / Flan: act(wi_0 x) * wi_1 x)."""
        return self.feed_forward_proj.startswith("gated-")

    @property
    def activation(self) -> str:
        """ACTIVATIONS key; 'gated-gelu' means gelu_new (tanh) for backward compatibility, as in HF."""
        if self.feed_forward_proj == "gated-gelu":
            return "gelu_new"
        return self.feed_forward_proj.split("-")[-1]

    @property
    def inner_dim(self) -> int:
        """Attention inner width num_heads * d_kv."""
        return self.num_heads * self.d_kv


def _bucket_table(bidirectional: bool, num_buckets: int, max_distance: int) -> np.ndarray:
    """Bucket of |distance| n = 0..max_distance (larger n share the last entry), in float32 like HF.

    Built with numpy at trace time so CPU and accelerator agree bit for bit on bucket boundaries.
    """
    if bidirectional:
        num_buckets //= 2
    max_exact = num_buckets // 2
    n = np.arange(max_distance + 1)
    with np.errstate(divide="ignore"):
        log_ratio = np.log(n.astype(np.float32) / np.float32(max_exact))
    log_ratio = log_ratio / np.float32(math.log(max_distance / max_exact))
    large = max_exact + np.nan_to_num(log_ratio * np.float32(num_buckets - max_exact), neginf=0.0).astype(np.int64)
    return np.where(n < max_exact, n, np.minimum(large, num_buckets - 1)).astype(np.int32)


def relative_position_bucket(
    relative_position: Array, bidirectional: bool, num_buckets: int = 32, max_distance: int = 128
) -> Array:
    """transformers' `T5Attention._relative_position_bucket` (relative = key pos - query pos).

    Args:
      relative_position: integer array of any shape, key position minus query position.
      bidirectional: True for the encoder (half the buckets for keys after the query), False for the
        decoder (keys after the query share bucket 0, masked out anyway).
      num_buckets: number of buckets.
      max_distance: distances >= this share the last (log-spaced) bucket.

    Returns:
      int32 bucket ids in [0, num_buckets), same shape as `relative_position`.
    """
    table = jnp.asarray(_bucket_table(bidirectional, num_buckets, max_distance))
    offset = 0
    if bidirectional:
        offset = (relative_position > 0).astype(jnp.int32) * (num_buckets // 2)
        n = jnp.abs(relative_position)
    else:
        n = -jnp.minimum(relative_position, 0)
    return offset + table[jnp.minimum(n, max_distance)]


class RelativePositionBias(nn.Module):
    """(1, H, L, S) bias for query slots `q_start + [0, L)` against key slots [0, S).

    Attributes:
      config: the model config (buckets, max distance, H).
      bidirectional: encoder (True) or decoder (False) bucketing.
    """

    config: T5Config
    bidirectional: bool

    @nn.compact
    def __call__(self, q_start: Array | int, length: int, key_length: int) -> Array:
        """Looks up the learned per-head bias of each (query, key) bucket.

        Args:
          q_start: slot of the first query (the cache index when decoding; int or int32 scalar).
          length: number of queries L.
          key_length: number of key slots S.

        Returns:
          (1, H, L, S) float32 bias, from the (num_buckets, H) `embedding` param.
        """
        c = self.config
        table = self.param(
            "embedding",
            nn.with_logical_partitioning(nn.initializers.normal(c.d_model**-0.5), ("relpos_buckets", "heads")),
            (c.relative_attention_num_buckets, c.num_heads),
            jnp.dtype(c.param_dtype),
        )
        relative = jnp.arange(key_length)[None, :] - (q_start + jnp.arange(length))[:, None]
        buckets = relative_position_bucket(
            relative, self.bidirectional, c.relative_attention_num_buckets, c.relative_attention_max_distance
        )
        values = jnp.take(table.astype(jnp.float32), buckets, axis=0)  # (L, S, H)
        return jnp.transpose(values, (2, 0, 1))[None]


def _dense(c: T5Config, name: str, features: int, axes: tuple[str, str], std: float) -> Dense:
    """A bias-free T5 projection, initialised with N(0, std^2) as in the reference."""
    return Dense(
        features, axes, dtype=jnp.dtype(c.dtype), param_dtype=jnp.dtype(c.param_dtype),
        kernel_init=nn.initializers.normal(std), name=name,
    )


class T5Attention(nn.Module):
    """Self-attention (kv_source = x) or cross-attention; no 1/sqrt(d) scaling (folded into T5's init).

    Returns (out, bias, kv): `bias` with the position term added (reused by later layers), `kv` the
    keys/values to cache (the updated self-attention cache, or the projected encoder states).

    Attributes:
      config: the model config.
      has_relative_bias: this layer owns `relative_attention_bias` (block 0's self-attention).
      bidirectional: bucketing of the relative bias (encoder True, decoder False).
    """

    config: T5Config
    has_relative_bias: bool = False
    bidirectional: bool = True

    @nn.compact
    def __call__(self, x, kv_source, bias, lora, lora_scale, layer_cache=None, cache_index=0, cross_kv=None):
        """Attends from the L positions of `x` to the keys of `kv_source` (or the cache / `cross_kv`).

        Args:
          x: normed query states (B, L, D).
          kv_source: states keys/values are projected from, (B, S, D): `x` itself for self-attention,
            the encoder output (B, Le, D) for cross-attention; not read when `cross_kv` is given.
          bias: additive bias broadcastable to (B, H, L, S), e.g. the (B, 1, L, S) mask bias, or the
            sum returned by an earlier layer.
          lora: LoRA subtree of this attention (keys 'q', 'k', 'v', 'o'), or None.
          lora_scale: alpha / r.
          layer_cache: decoder self-attention cache {'k', 'v'} (B, H, S, d_kv), or None.
          cache_index: first cache slot written, also the first query's slot for the relative bias.
          cross_kv: precomputed cross-attention {'k', 'v'} (B, H, Le, d_kv), or None.

        Returns:
          (out (B, L, D) in `config.dtype`; bias plus the (1, H, L, S) float32 position term when
          `has_relative_bias`, else `bias` unchanged; {'k', 'v'} (B, H, S, d_kv): the updated cache,
          `cross_kv` itself, or the freshly projected keys/values).
        """
        c = self.config
        dt = jnp.dtype(c.dtype)
        inner = c.inner_dim
        dense = functools.partial(_dense, c)

        b, l, _ = x.shape
        heads = lambda t: t.reshape(t.shape[0], t.shape[1], c.num_heads, c.d_kv)
        q = heads(dense("q", inner, ("embed", "heads"), (c.d_model * c.d_kv) ** -0.5)(x, sub(lora, "q"), lora_scale))
        if cross_kv is not None:
            k, v = cross_kv["k"], cross_kv["v"]
        else:
            k = heads_major(heads(dense("k", inner, ("embed", "heads"), c.d_model**-0.5)(kv_source, sub(lora, "k"), lora_scale)))
            v = heads_major(heads(dense("v", inner, ("embed", "heads"), c.d_model**-0.5)(kv_source, sub(lora, "v"), lora_scale)))
        if layer_cache is not None:
            k = jax.lax.dynamic_update_slice(layer_cache["k"], k.astype(layer_cache["k"].dtype), (0, 0, cache_index, 0))
            v = jax.lax.dynamic_update_slice(layer_cache["v"], v.astype(layer_cache["v"].dtype), (0, 0, cache_index, 0))
        if self.has_relative_bias:
            relpos = RelativePositionBias(c, self.bidirectional, name="relative_attention_bias")
            bias = bias + relpos(cache_index, l, k.shape[2])
        out = dot_product_attention(q, k.astype(dt), v.astype(dt), bias, scale=1.0)
        o = dense("o", c.d_model, ("heads", "embed"), inner**-0.5)
        return o(out.reshape(b, l, inner), sub(lora, "o"), lora_scale), bias, {"k": k, "v": v}


class T5DenseReluDense(nn.Module):
    """wo(act(wi x)) or, gated (v1.1 / Flan), wo(act(wi_0 x) * wi_1 x).

    Attributes:
      config: the model config (d_ff, `feed_forward_proj`).
    """

    config: T5Config

    @nn.compact
    def __call__(self, x, lora, lora_scale):
        """Applies the feed-forward.

        Args:
          x: normed states (B, L, D).
          lora: LoRA subtree (keys 'wi' or 'wi_0'/'wi_1', and 'wo'), or None.
          lora_scale: alpha / r.

        Returns:
          (B, L, D) in `config.dtype`.
        """
        c = self.config
        dense = functools.partial(_dense, c)

        act = ACTIVATIONS[c.activation]
        if c.is_gated:
            h = act(dense("wi_0", c.d_ff, ("embed", "mlp"), c.d_model**-0.5)(x, sub(lora, "wi_0"), lora_scale))
            h = h * dense("wi_1", c.d_ff, ("embed", "mlp"), c.d_model**-0.5)(x, sub(lora, "wi_1"), lora_scale)
        else:
            h = act(dense("wi", c.d_ff, ("embed", "mlp"), c.d_model**-0.5)(x, sub(lora, "wi"), lora_scale))
        return dense("wo", c.d_model, ("mlp", "embed"), c.d_ff**-0.5)(h, sub(lora, "wo"), lora_scale)


class T5LayerAttention(nn.Module):
    """Pre-norm residual attention sublayer; `attn_name` is 'SelfAttention' or 'EncDecAttention'.

    Attributes:
      config: the model config.
      attn_name: name of the attention submodule (and of its LoRA subtree).
      has_relative_bias: see `T5Attention`.
      bidirectional: see `T5Attention`.
    """

    config: T5Config
    attn_name: str
    has_relative_bias: bool = False
    bidirectional: bool = True

    @nn.compact
    def __call__(self, x, kv_source, bias, lora, lora_scale, layer_cache=None, cache_index=0, cross_kv=None):
        """x + attention(layer_norm(x)).

        Args:
          x: states (B, L, D).
          kv_source: None for self-attention (keys from the normed `x`), or the encoder output (B, Le, D).
          bias, layer_cache, cache_index, cross_kv: as in `T5Attention`.
          lora: LoRA subtree of this sublayer (key `attn_name`), or None.
          lora_scale: alpha / r.

        Returns:
          (x + attention output (B, L, D), bias, kv) as in `T5Attention`.
        """
        c = self.config
        dt, pdt = jnp.dtype(c.dtype), jnp.dtype(c.param_dtype)
        h = RMSNorm(c.layer_norm_epsilon, dt, pdt, name="layer_norm")(x)
        kv_source = h if kv_source is None else kv_source  # None: self-attention
        attn = T5Attention(c, self.has_relative_bias, self.bidirectional, name=self.attn_name)
        h, bias, kv = attn(h, kv_source, bias, sub(lora, self.attn_name), lora_scale, layer_cache, cache_index, cross_kv)
        return x + h, bias, kv


class T5LayerFF(nn.Module):
    """Pre-norm residual feed-forward sublayer: x + DenseReluDense(layer_norm(x)).

    Attributes:
      config: the model config.
    """

    config: T5Config

    @nn.compact
    def __call__(self, x, lora, lora_scale):
        """Applies the sublayer.

        Args:
          x: states (B, L, D).
          lora: LoRA subtree of this sublayer (key 'DenseReluDense'), or None.
          lora_scale: alpha / r.

        Returns:
          (B, L, D) in `config.dtype`.
        """
        c = self.config
        dt, pdt = jnp.dtype(c.dtype), jnp.dtype(c.param_dtype)
        h = RMSNorm(c.layer_norm_epsilon, dt, pdt, name="layer_norm")(x)
        return x + T5DenseReluDense(c, name="DenseReluDense")(h, sub(lora, "DenseReluDense"), lora_scale)


class T5Block(nn.Module):
    """layer_0 self-attention, (decoder) layer_1 EncDecAttention, then the feed-forward layer.

    Attributes:
      config: the model config.
      is_decoder: causal self-attention plus cross-attention (feed-forward at layer_2), else encoder.
      has_relative_bias: this block owns the relative-position table (block 0).
    """

    config: T5Config
    is_decoder: bool
    has_relative_bias: bool

    @nn.compact
    def __call__(self, x, self_bias, lora, lora_scale, encoder_hidden=None, cross_bias=None, layer_cache=None,
                 cache_index=0, cross_kv=None):
        """Runs one block.

        Args:
          x: states (B, L, D).
          self_bias: self-attention bias, (B, 1, L, S) mask bias, or (B, H, L, S) once block 0 has
            added the position term.
          lora: LoRA subtree of this block, or None.
          lora_scale: alpha / r.
          encoder_hidden: encoder output (B, Le, D) (decoder only).
          cross_bias: cross-attention mask bias (B, 1, L, Le) (decoder only).
          layer_cache: self-attention cache {'k', 'v'} (B, H, S, d_kv), or None.
          cache_index: first cache slot written.
          cross_kv: cached cross-attention {'k', 'v'} (B, H, Le, d_kv), or None to project `encoder_hidden`.

        Returns:
          (states (B, L, D), self_bias with the position term, self-attention {'k', 'v'},
          cross-attention {'k', 'v'} or None for an encoder block).
        """
        c = self.config
        attn = T5LayerAttention(c, "SelfAttention", self.has_relative_bias, not self.is_decoder, name="layer_0")
        x, self_bias, kv = attn(x, None, self_bias, sub(lora, "layer_0"), lora_scale, layer_cache, cache_index)
        cross_out = None
        if self.is_decoder:
            cross = T5LayerAttention(c, "EncDecAttention", name="layer_1")
            x, _, cross_out = cross(x, encoder_hidden, cross_bias, sub(lora, "layer_1"), lora_scale, cross_kv=cross_kv)
        ff_name = "layer_2" if self.is_decoder else "layer_1"
        x = T5LayerFF(c, name=ff_name)(x, sub(lora, ff_name), lora_scale)
        return x, self_bias, kv, cross_out


class T5Stack(nn.Module):
    """Encoder (bidirectional) or decoder (causal + cross-attention) stack over embedded inputs.

    `self_bias` is the (B, 1, L, S) mask bias of self-attention; block 0 adds the relative position
    term and every later block reuses the sum, as in HF. Returns (hidden, new_cache or None).

    Attributes:
      config: the model config.
      is_decoder: decoder (num_decoder_layers blocks) or encoder (num_layers blocks).
    """

    config: T5Config
    is_decoder: bool

    @nn.compact
    def __call__(self, x, self_bias, lora, lora_scale, encoder_hidden=None, cross_bias=None, cache=None, cache_index=0):
        """Runs every block, then the final layer norm.

        Args:
          x: embedded inputs (B, L, D).
          self_bias: self-attention mask bias (B, 1, L, S), float32.
          lora: LoRA subtree of this stack (keys 'block_i'), or None.
          lora_scale: alpha / r.
          encoder_hidden: encoder output (B, Le, D) (decoder only).
          cross_bias: cross-attention mask bias (B, 1, L, Le) (decoder only).
          cache: decoder cache {'block_i': {'k', 'v'}, optionally 'cross': {'block_i': {'k', 'v'}}}, or None.
          cache_index: first cache slot written.

        Returns:
          (hidden (B, L, D) in `config.dtype`, new cache {'block_i': {'k', 'v'} (B, H, S, d_kv),
          'cross': {'block_i': {'k', 'v'} (B, H, Le, d_kv)}} when `cache` was given, else None).
        """
        c = self.config
        dt, pdt = jnp.dtype(c.dtype), jnp.dtype(c.param_dtype)
        num_layers = c.num_decoder_layers if self.is_decoder else c.num_layers
        new_cache: Cache | None = None if cache is None else {"cross": {}}
        cached_cross = None if cache is None else cache.get("cross")
        for i in range(num_layers):
            name = f"block_{i}"
            block = T5Block(c, self.is_decoder, i == 0, name=name)
            x, self_bias, kv, cross_kv = block(
                x, self_bias, sub(lora, name), lora_scale, encoder_hidden, cross_bias,
                None if cache is None else cache[name], cache_index,
                None if cached_cross is None else cached_cross[name],
            )
            if new_cache is not None:
                new_cache[name] = kv
                new_cache["cross"][name] = cross_kv
        return RMSNorm(c.layer_norm_epsilon, dt, pdt, name="final_layer_norm")(x), new_cache


class T5(nn.Module):
    """Encoder-decoder LM: `model.apply({'params': p}, enc_ids, enc_mask, dec_ids)` -> logits (B, Ld, V).

    `encode` and `decode` (via `method=`) split the two stacks for generation; `decode` with a cache
    from `init_cache` writes the decoder tokens into slots [cache_index, cache_index + L).

    Attributes:
      config: the model config.
    """

    config: T5Config

    def setup(self) -> None:
        """Creates `shared` (V, D), the `encoder` and `decoder` stacks and, when untied, `lm_head`."""
        c = self.config
        dt, pdt = jnp.dtype(c.dtype), jnp.dtype(c.param_dtype)
        self.shared = Embed(c.vocab_size, c.d_model, dt, pdt, embedding_init=nn.initializers.normal(1.0))
        self.encoder = T5Stack(c, is_decoder=False)
        self.decoder = T5Stack(c, is_decoder=True)
        if not c.tie_word_embeddings:
            self.lm_head = Dense(
                c.vocab_size, ("embed", "vocab"), dtype=dt, param_dtype=pdt, kernel_init=nn.initializers.normal(1.0)
            )

    def __call__(
        self,
        encoder_input_ids: Array,
        encoder_attention_mask: Array | None,
        decoder_input_ids: Array,
        decoder_attention_mask: Array | None = None,
        *,
        lora: LoraWeights | None = None,
        encoder_segment_ids: Array | None = None,
        decoder_segment_ids: Array | None = None,
    ) -> Array:
        """Teacher-forced decoder logits: `encode`, then `decode` without a cache.

        `*_segment_ids` (1.. per packed segment, 0 on padding) make every attention block-diagonal
        over packed segments (t5x packing); without them, one example per row.

        Args:
          encoder_input_ids: integer encoder token ids (B, Le).
          encoder_attention_mask: (B, Le) bool or 0/1, True on real tokens; None: all real, or
            `encoder_segment_ids > 0` when given.
          decoder_input_ids: integer decoder inputs (B, Ld) (targets shifted right after the start token).
          decoder_attention_mask: (B, Ld); None: all real, or `decoder_segment_ids > 0` when given.
          lora: None, one adapter, or one per row (leaves (B, ...)); applied to both stacks.
          encoder_segment_ids: packed-segment ids (B, Le), or None.
          decoder_segment_ids: packed-segment ids (B, Ld), or None (needs `encoder_segment_ids`).

        Returns:
          float32 logits (B, Ld, V).

        Raises:
          ValueError: `decoder_segment_ids` without `encoder_segment_ids`, or a batched LoRA whose
            adapter count differs from B.
        """
        if encoder_attention_mask is None:
            encoder_attention_mask = (
                jnp.ones(encoder_input_ids.shape, bool) if encoder_segment_ids is None else encoder_segment_ids > 0
            )
        if decoder_attention_mask is None and decoder_segment_ids is not None:
            decoder_attention_mask = decoder_segment_ids > 0
        hidden = self.encode(encoder_input_ids, encoder_attention_mask, lora=lora, segment_ids=encoder_segment_ids)
        return self.decode(
            decoder_input_ids, hidden, encoder_attention_mask, lora=lora, decoder_attention_mask=decoder_attention_mask,
            decoder_segment_ids=decoder_segment_ids, encoder_segment_ids=encoder_segment_ids,
        )

    def encode(
        self, encoder_input_ids: Array, encoder_attention_mask: Array, *, lora: LoraWeights | None = None,
        segment_ids: Array | None = None,
    ) -> Array:
        """Encoder hidden states (B, Le, d_model) after the final layer norm.

        Args:
          encoder_input_ids: integer token ids (B, Le).
          encoder_attention_mask: (B, Le) bool or 0/1, True on real tokens (required).
          lora: None, one adapter, or one per row; its 'encoder' subtree is used.
          segment_ids: packed-segment ids (B, Le) for block-diagonal attention, or None.

        Returns:
          (B, Le, d_model) in `config.dtype`; padded positions hold (meaningless) values too.
        """
        tree, scale = (lora.params, lora.scale) if lora is not None else (None, 1.0)
        mask = encoder_attention_mask.astype(bool)
        allowed = mask[:, None, None, :]
        if segment_ids is not None:
            allowed = allowed & _same_segment(segment_ids, segment_ids)
        bias = mask_bias(allowed, jnp.float32)
        hidden, _ = self.encoder(self.shared(encoder_input_ids), bias, sub(tree, "encoder"), scale)
        return hidden

    def decode(
        self,
        decoder_input_ids: Array,
        encoder_hidden: Array,
        encoder_attention_mask: Array,
        *,
        lora: LoraWeights | None = None,
        cache: Cache | None = None,
        cache_index: Array | int = 0,
        decoder_attention_mask: Array | None = None,
        decoder_segment_ids: Array | None = None,
        encoder_segment_ids: Array | None = None,
    ):
        """Logits (B, L, V) float32; with `cache`, (logits, new_cache).

        The returned cache always holds the cross-attention keys/values ('cross'); when the given
        cache has them they are reused and `encoder_hidden` is not read again.

        Args:
          decoder_input_ids: integer decoder tokens (B, L).
          encoder_hidden: encoder output (B, Le, D) from `encode`.
          encoder_attention_mask: (B, Le) bool or 0/1, True on real encoder tokens.
          lora: None, one adapter, or one per row; its 'decoder' and 'lm_head' subtrees are used.
          cache: from `init_cache` (S slots, S >= cache_index + L) or a previous `decode`, or None.
          cache_index: first cache slot the L tokens are written to (int or int32 scalar).
          decoder_attention_mask: (B, L), True on real tokens; None: all real (segment ids do not
            set it here).
          decoder_segment_ids: packed-segment ids (B, L) (training only), or None.
          encoder_segment_ids: packed-segment ids (B, Le) of the encoder rows, needed with
            `decoder_segment_ids`.

        Returns:
          float32 logits (B, L, V); with `cache`, (logits, new cache) where the new cache is
          {'kv_mask': bool (B, S), 'block_i': {'k', 'v'} (B, H, S, d_kv), 'cross': {'block_i':
          {'k', 'v'} (B, H, Le, d_kv)}}.

        Raises:
          ValueError: `decoder_segment_ids` with a cache or without `encoder_segment_ids`, or a batched
            LoRA whose adapter count differs from B.
        """
        c = self.config
        tree, scale = (lora.params, lora.scale) if lora is not None else (None, 1.0)
        b, l = decoder_input_ids.shape
        mask = jnp.ones((b, l), bool) if decoder_attention_mask is None else decoder_attention_mask.astype(bool)
        if cache is None:
            kv_mask, index = mask, 0
        else:
            kv_mask = jax.lax.dynamic_update_slice(cache["kv_mask"], mask, (0, cache_index))
            index = cache_index
        query_slots = index + jnp.arange(l)
        causal = jnp.arange(kv_mask.shape[1])[None, :] <= query_slots[:, None]
        self_allowed = kv_mask[:, None, None, :] & causal[None, None]
        cross_allowed = encoder_attention_mask.astype(bool)[:, None, None, :]
        if decoder_segment_ids is not None:  # packed rows (training only: no cache)
            if cache is not None or encoder_segment_ids is None:
                raise ValueError("decoder_segment_ids need encoder_segment_ids and no cache (packed training rows)")
            self_allowed = self_allowed & _same_segment(decoder_segment_ids, decoder_segment_ids)
            cross_allowed = cross_allowed & _same_segment(decoder_segment_ids, encoder_segment_ids)
        self_bias = mask_bias(self_allowed, jnp.float32)
        cross_bias = mask_bias(cross_allowed, jnp.float32)
        x = self.shared(decoder_input_ids)
        x, new_cache = self.decoder(x, self_bias, sub(tree, "decoder"), scale, encoder_hidden, cross_bias, cache, index)
        if c.scale_decoder_outputs:
            x = x * (c.d_model**-0.5)
        if c.tie_word_embeddings:
            logits = self.shared.attend(x)
        else:
            logits = self.lm_head(x, sub(tree, "lm_head"), scale)
        logits = logits.astype(jnp.float32)
        if cache is None:
            return logits
        new_cache["kv_mask"] = kv_mask
        return logits, new_cache


def _same_segment(query_segments_BxL: Array, key_segments_BxS: Array) -> Array:
    """(B, 1, L, S) True where query and key lie in the same packed segment."""
    return query_segments_BxL[:, None, :, None] == key_segments_BxS[:, None, None, :]


def init_cache(config: T5Config, batch_size: int, max_length: int, dtype: Any = None) -> Cache:
    """An empty decoder self-attention cache with `max_length` slots per example.

    It has no 'cross' entry yet: the first `decode` call adds the cross-attention keys/values, so
    run that call (the decoder start token) before a `lax.while_loop` whose carry must keep one structure.

    Args:
      config: the model config (num_decoder_layers, H, d_kv).
      batch_size: B.
      max_length: S, decoder slots per example.
      dtype: dtype of the keys/values; None means `config.dtype`.

    Returns:
      {'kv_mask': bool zeros (B, S), 'block_i': {'k': zeros (B, H, S, d_kv), 'v': zeros (B, H, S, d_kv)}}
      for i in [0, num_decoder_layers).
    """
    dtype = jnp.dtype(dtype or config.dtype)
    shape = (batch_size, config.num_heads, max_length, config.d_kv)  # heads-major, see dot_product_attention
    cache: Cache = {"kv_mask": jnp.zeros((batch_size, max_length), bool)}
    for i in range(config.num_decoder_layers):
        cache[f"block_{i}"] = {"k": jnp.zeros(shape, dtype), "v": jnp.zeros(shape, dtype)}
    return cache


def config_from_hf(hf: Mapping[str, Any]) -> T5Config:
    """T5Config from a transformers T5 `config.json` dict (T5ForConditionalGeneration).

    transformers < 5 writes `tie_word_embeddings` (False for v1.1 / Flan, absent = True for original
    T5) and scales the decoder output iff tied. transformers >= 5 always writes
    tie_word_embeddings=True and keeps the real switch in `scale_decoder_outputs`; there an
    unscaled model is taken as untied (all Google v1.1 / Flan checkpoints have their own lm_head).

    Args:
      hf: the parsed config.json. A missing `decoder_start_token_id` falls back to the pad id (or 0);
        `eos_token_id` may be an int, a list or null.

    Returns:
      The T5Config (dtype and param_dtype left at "float32").

    Raises:
      KeyError: a required field (vocab_size, d_model, d_kv, d_ff, num_layers, num_heads) is missing.
      ValueError: an unsupported `feed_forward_proj` activation.
    """
    tie = hf.get("tie_word_embeddings", True)
    scale = hf.get("scale_decoder_outputs", tie)
    if "scale_decoder_outputs" in hf:
        tie = bool(scale)
    eos = hf.get("eos_token_id", 1)
    pad = hf.get("pad_token_id", 0)
    start = hf.get("decoder_start_token_id")
    return T5Config(
        vocab_size=hf["vocab_size"],
        d_model=hf["d_model"],
        d_kv=hf["d_kv"],
        d_ff=hf["d_ff"],
        num_layers=hf["num_layers"],
        num_heads=hf["num_heads"],
        num_decoder_layers=hf.get("num_decoder_layers") or hf["num_layers"],
        relative_attention_num_buckets=hf.get("relative_attention_num_buckets", 32),
        relative_attention_max_distance=hf.get("relative_attention_max_distance", 128),
        layer_norm_epsilon=hf.get("layer_norm_epsilon", 1e-6),
        feed_forward_proj=hf.get("feed_forward_proj", "relu"),
        tie_word_embeddings=bool(tie),
        scale_decoder_outputs=bool(scale),
        decoder_start_token_id=start if start is not None else (pad if pad is not None else 0),
        eos_token_ids=tuple(eos) if isinstance(eos, (list, tuple)) else ((eos,) if eos is not None else ()),
        pad_token_id=pad,
    )


def config_to_hf(config: T5Config) -> dict[str, Any]:
    """transformers T5ForConditionalGeneration `config.json` dict, readable by transformers 4 and 5.

    `tie_word_embeddings` keeps its v4 meaning (lm_head shared and output scaled); transformers 5
    reads `scale_decoder_outputs` and unties when both tensors are present.

    Args:
      config: the model config.

    Returns:
      A JSON-serialisable dict (`eos_token_id` an int for one EOS id, else a list; `torch_dtype` "float32").
    """
    eos = list(config.eos_token_ids)
    return {
        "architectures": ["T5ForConditionalGeneration"],
        "model_type": "t5",
        "vocab_size": config.vocab_size,
        "d_model": config.d_model,
        "d_kv": config.d_kv,
        "d_ff": config.d_ff,
        "num_layers": config.num_layers,
        "num_decoder_layers": config.num_decoder_layers,
        "num_heads": config.num_heads,
        "relative_attention_num_buckets": config.relative_attention_num_buckets,
        "relative_attention_max_distance": config.relative_attention_max_distance,
        "layer_norm_epsilon": config.layer_norm_epsilon,
        "feed_forward_proj": config.feed_forward_proj,
        "dense_act_fn": config.activation,
        "is_gated_act": config.is_gated,
        "tie_word_embeddings": config.tie_word_embeddings,
        "scale_decoder_outputs": config.scale_decoder_outputs,
        "is_encoder_decoder": True,
        "decoder_start_token_id": config.decoder_start_token_id,
        "eos_token_id": eos[0] if len(eos) == 1 else eos,
        "pad_token_id": config.pad_token_id,
        "dropout_rate": 0.1,
        "initializer_factor": 1.0,
        "torch_dtype": "float32",
    }
