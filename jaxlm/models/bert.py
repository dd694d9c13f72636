"""BERT encoder (all-MiniLM-L6-v2 and other `BertModel` checkpoints) for sentence embeddings.

Module names mirror transformers' BertModel (`encoder/layer_0/attention/self/query`), so the HF
name mapping (`checkpoints.hf.hf_tensor_name`) is mechanical. Post-LN blocks, absolute positions, no pooler
(sentence embeddings mean-pool the last hidden states, see `jaxlm.models.embedder`).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

import jax
import jax.numpy as jnp
from flax import linen as nn

from jaxlm.models.layers import ACTIVATIONS, Dense, Embed, LayerNorm, dot_product_attention, heads_major, mask_bias, sub
from jaxlm.models.lora import LoraWeights

Array = jax.Array

@dataclasses.dataclass(frozen=True)
class BertConfig:
    """Hyperparameters of a BERT encoder (names follow transformers' BertConfig).

    Attributes:
      vocab_size: V.
      hidden_size: width D.
      intermediate_size: feed-forward width.
      num_layers: encoder layers.
      num_heads: attention heads H (D must be a multiple of H).
      max_position_embeddings: rows of the absolute position table: the longest input.
      type_vocab_size: rows of the token-type table.
      layer_norm_eps: epsilon of every LayerNorm.
      hidden_act: feed-forward activation, a key of `ACTIVATIONS` ("gelu" is the exact erf form).
      pad_token_id: pad id, or None.
      dtype: activation (computation) dtype name.
      param_dtype: dtype name params are created in.

    Raises:
      ValueError: at construction, when hidden_size is not a multiple of num_heads or `hidden_act`
        is not in `ACTIVATIONS`.
    """

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    max_position_embeddings: int = 512
    type_vocab_size: int = 2
    layer_norm_eps: float = 1e-12
    hidden_act: str = "gelu"
    pad_token_id: int | None = 0
    dtype: str = "float32"
    param_dtype: str = "float32"

    family = "bert"

    def __post_init__(self) -> None:
        if self.hidden_size % self.num_heads:
            raise ValueError(f"hidden_size={self.hidden_size} is not a multiple of num_heads={self.num_heads}")
        if self.hidden_act not in ACTIVATIONS:
            raise ValueError(f"hidden_act={self.hidden_act!r} is not supported; known: {sorted(ACTIVATIONS)}")

    @property
    def head_dim(self) -> int:
        """Per-head width hidden_size // num_heads."""
        return self.hidden_size // self.num_heads


def _dense(c: BertConfig, name: str, features: int, axes: tuple[str, str]) -> Dense:
    return Dense(features, axes, use_bias=True, dtype=jnp.dtype(c.dtype), param_dtype=jnp.dtype(c.param_dtype), name=name)


def _norm(c: BertConfig) -> LayerNorm:
    return LayerNorm(c.layer_norm_eps, jnp.dtype(c.dtype), jnp.dtype(c.param_dtype), name="LayerNorm")


class BertEmbeddings(nn.Module):
    """LayerNorm(word + absolute position + token-type embeddings).

    Attributes:
      config: the model config.
    """

    config: BertConfig

    @nn.compact
    def __call__(self, input_ids: Array, token_type_ids: Array) -> Array:
        """Embeds the inputs; positions are 0..L-1 whatever the padding.

        Args:
          input_ids: integer token ids (B, L), L <= max_position_embeddings.
          token_type_ids: integer segment ids (B, L), in [0, type_vocab_size).

        Returns:
          (B, L, D) in `config.dtype`.
        """
        c = self.config
        dt, pdt = jnp.dtype(c.dtype), jnp.dtype(c.param_dtype)
        positions = jnp.arange(input_ids.shape[1])[None, :]
        x = Embed(c.vocab_size, c.hidden_size, dt, pdt, name="word_embeddings")(input_ids)
        x = x + Embed(c.max_position_embeddings, c.hidden_size, dt, pdt, name="position_embeddings")(positions)
        x = x + Embed(c.type_vocab_size, c.hidden_size, dt, pdt, name="token_type_embeddings")(token_type_ids)
        return _norm(c)(x)


class BertSelfAttention(nn.Module):
    """Bidirectional multi-head attention (`query`, `key`, `value`), scaled by head_dim**-0.5.

    Attributes:
      config: the model config.
    """

    config: BertConfig

    @nn.compact
    def __call__(self, x: Array, bias: Array, lora, lora_scale: float) -> Array:
        """Attends over all real positions.

        Args:
          x: states (B, L, D).
          bias: additive key-mask bias broadcastable to (B, H, L, L), e.g. (B, 1, 1, L).
          lora: LoRA subtree (keys 'query', 'key', 'value'), or None.
          lora_scale: alpha / r.

        Returns:
          (B, L, D) per-head outputs concatenated, before the output projection, in `config.dtype`.
        """
        c = self.config
        b, l, _ = x.shape
        heads = lambda n: _dense(c, n, c.hidden_size, ("embed", "heads"))(x, sub(lora, n), lora_scale).reshape(
            b, l, c.num_heads, c.head_dim
        )
        k, v = heads_major(heads("key")), heads_major(heads("value"))
        out = dot_product_attention(heads("query"), k, v, bias, scale=c.head_dim**-0.5)
        return out.reshape(b, l, c.hidden_size)


class BertResidualOutput(nn.Module):
    """dense -> + residual -> LayerNorm (HF's BertSelfOutput and BertOutput).

    Attributes:
      config: the model config.
      axes: logical axes of the dense kernel (('heads', 'embed') or ('mlp', 'embed')).
    """

    config: BertConfig
    axes: tuple[str, str]

    @nn.compact
    def __call__(self, h: Array, residual: Array, lora, lora_scale: float) -> Array:
        """LayerNorm(dense(h) + residual).

        Args:
          h: sublayer output (B, L, F) (F = D after attention, intermediate_size after the MLP).
          residual: the sublayer's input (B, L, D).
          lora: LoRA subtree (key 'dense'), or None.
          lora_scale: alpha / r.

        Returns:
          (B, L, D) in `config.dtype`.
        """
        c = self.config
        h = _dense(c, "dense", c.hidden_size, self.axes)(h, sub(lora, "dense"), lora_scale)
        return _norm(c)(h + residual)


class BertAttention(nn.Module):
    """Self-attention plus its residual output (post-LN), as HF's BertAttention.

    Attributes:
      config: the model config.
    """

    config: BertConfig

    @nn.compact
    def __call__(self, x: Array, bias: Array, lora, lora_scale: float) -> Array:
        """LayerNorm(x + output.dense(self(x))).

        Args:
          x: states (B, L, D).
          bias: additive key-mask bias broadcastable to (B, H, L, L).
          lora: LoRA subtree (keys 'self', 'output'), or None.
          lora_scale: alpha / r.

        Returns:
          (B, L, D) in `config.dtype`.
        """
        c = self.config
        h = BertSelfAttention(c, name="self")(x, bias, sub(lora, "self"), lora_scale)
        return BertResidualOutput(c, ("heads", "embed"), name="output")(h, x, sub(lora, "output"), lora_scale)


class BertIntermediate(nn.Module):
    """act(dense(x)), the first half of BERT's feed-forward.

    Attributes:
      config: the model config.
    """

    config: BertConfig

    @nn.compact
    def __call__(self, x: Array, lora, lora_scale: float) -> Array:
        """Projects up and applies `hidden_act`.

        Args:
          x: states (B, L, D).
          lora: LoRA subtree (key 'dense'), or None.
          lora_scale: alpha / r.

        Returns:
          (B, L, intermediate_size) in `config.dtype`.
        """
        c = self.config
        h = _dense(c, "dense", c.intermediate_size, ("embed", "mlp"))(x, sub(lora, "dense"), lora_scale)
        return ACTIVATIONS[c.hidden_act](h)


class BertLayer(nn.Module):
    """One post-LN encoder layer: attention, then intermediate + output.

    Attributes:
      config: the model config.
    """

    config: BertConfig

    @nn.compact
    def __call__(self, x: Array, bias: Array, lora, lora_scale: float) -> Array:
        """Runs the layer.

        Args:
          x: states (B, L, D).
          bias: additive key-mask bias broadcastable to (B, H, L, L).
          lora: LoRA subtree (keys 'attention', 'intermediate', 'output'), or None.
          lora_scale: alpha / r.

        Returns:
          (B, L, D) in `config.dtype`.
        """
        c = self.config
        x = BertAttention(c, name="attention")(x, bias, sub(lora, "attention"), lora_scale)
        h = BertIntermediate(c, name="intermediate")(x, sub(lora, "intermediate"), lora_scale)
        return BertResidualOutput(c, ("mlp", "embed"), name="output")(h, x, sub(lora, "output"), lora_scale)


class BertEncoder(nn.Module):
    """The stack of `num_layers` BertLayers (`layer_0` ...).

    Attributes:
      config: the model config.
    """

    config: BertConfig

    @nn.compact
    def __call__(self, x: Array, bias: Array, lora, lora_scale: float) -> Array:
        """Runs every layer.

        Args:
          x: embedded inputs (B, L, D).
          bias: additive key-mask bias broadcastable to (B, H, L, L).
          lora: LoRA subtree (keys 'layer_i'), or None.
          lora_scale: alpha / r.

        Returns:
          last hidden states (B, L, D) in `config.dtype`.
        """
        for i in range(self.config.num_layers):
            name = f"layer_{i}"
            x = BertLayer(self.config, name=name)(x, bias, sub(lora, name), lora_scale)
        return x


class Bert(nn.Module):
    """`model.apply({'params': p}, ids, mask)` -> last hidden states (B, L, D) in float32.

    Padding keys are masked out of attention; padded query rows still get (meaningless) outputs,
    so pool with the attention mask.

    Attributes:
      config: the model config.
    """

    config: BertConfig

    @nn.compact
    def __call__(
        self,
        input_ids: Array,
        attention_mask: Array | None = None,
        token_type_ids: Array | None = None,
        *,
        lora: LoraWeights | None = None,
    ) -> Array:
        """Encodes a batch of token rows (no pooler).

        Args:
          input_ids: integer token ids (B, L), usually [CLS] ... [SEP] then padding.
          attention_mask: (B, L) bool or 0/1, True on real tokens; None: all real.
          token_type_ids: integer segment ids (B, L); None: zeros.
          lora: None, one adapter, or one per row (leaves (B, ...)).

        Returns:
          float32 last hidden states (B, L, D).

        Raises:
          ValueError: L > `max_position_embeddings`, or a batched LoRA whose adapter count differs from B.
        """
        c = self.config
        if input_ids.shape[1] > c.max_position_embeddings:
            raise ValueError(f"sequence length {input_ids.shape[1]} exceeds max_position_embeddings={c.max_position_embeddings}")
        mask = jnp.ones(input_ids.shape, bool) if attention_mask is None else attention_mask.astype(bool)
        token_type_ids = jnp.zeros_like(input_ids) if token_type_ids is None else token_type_ids
        tree, scale = (lora.params, lora.scale) if lora is not None else (None, 1.0)
        bias = mask_bias(mask[:, None, None, :], jnp.dtype(c.dtype))  # (B, 1, 1, S)
        x = BertEmbeddings(c, name="embeddings")(input_ids, token_type_ids)
        x = BertEncoder(c, name="encoder")(x, bias, sub(tree, "encoder"), scale)
        return x.astype(jnp.float32)


def config_from_hf(hf: Mapping[str, Any]) -> BertConfig:
    """BertConfig from a transformers `config.json` dict (BertModel, BertForMaskedLM, ...).

    Args:
      hf: the parsed config.json.

    Returns:
      The BertConfig (dtype and param_dtype left at "float32").

    Raises:
      ValueError: `position_embedding_type` other than "absolute", or values `BertConfig` rejects.
      KeyError: a required field (vocab_size, hidden_size, intermediate_size, num_hidden_layers,
        num_attention_heads) is missing.
    """
    kind = hf.get("position_embedding_type", "absolute")
    if kind != "absolute":
        raise ValueError(f"config.json: position_embedding_type={kind!r} is not supported (only 'absolute')")
    return BertConfig(
        vocab_size=hf["vocab_size"],
        hidden_size=hf["hidden_size"],
        intermediate_size=hf["intermediate_size"],
        num_layers=hf["num_hidden_layers"],
        num_heads=hf["num_attention_heads"],
        max_position_embeddings=hf.get("max_position_embeddings", 512),
        type_vocab_size=hf.get("type_vocab_size", 2),
        layer_norm_eps=hf.get("layer_norm_eps", 1e-12),
        hidden_act=hf.get("hidden_act", "gelu"),
        pad_token_id=hf.get("pad_token_id", 0),
    )


def config_to_hf(config: BertConfig) -> dict[str, Any]:
    """transformers BertModel `config.json` dict for this config (no pooler weights are written).

    Args:
      config: the model config.

    Returns:
      A JSON-serialisable dict (absolute positions, dropout 0, `torch_dtype` "float32").
    """
    return {
        "architectures": ["BertModel"],
        "model_type": "bert",
        "vocab_size": config.vocab_size,
        "hidden_size": config.hidden_size,
        "intermediate_size": config.intermediate_size,
        "num_hidden_layers": config.num_layers,
        "num_attention_heads": config.num_heads,
        "max_position_embeddings": config.max_position_embeddings,
        "type_vocab_size": config.type_vocab_size,
        "layer_norm_eps": config.layer_norm_eps,
        "hidden_act": config.hidden_act,
        "pad_token_id": config.pad_token_id,
        "position_embedding_type": "absolute",
        "hidden_dropout_prob": 0.0,
        "attention_probs_dropout_prob": 0.0,
        "torch_dtype": "float32",
    }
