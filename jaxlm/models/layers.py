"""Building blocks shared by every model: a dense layer with logical axes and optional LoRA,
norms, embeddings and one attention kernel.

Every parameter is created through `nn.with_logical_partitioning`, so `jax.eval_shape(model.init)`
yields the logical axis names that `jaxlm.sharding` maps onto a mesh.
"""

from __future__ import annotations

from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp
from flax import linen as nn

from jaxlm.models import lora as lora_lib

Array = jax.Array
Dtype = Any
LoraSubtree = Mapping[str, Any] | None


# transformers ACT2FN names -> functions ("gelu" is the exact erf form, "gelu_new" the tanh one).
ACTIVATIONS: dict[str, Callable[[Array], Array]] = {
    "relu": jax.nn.relu,
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),
    "gelu_new": lambda x: jax.nn.gelu(x, approximate=True),
    "gelu_pytorch_tanh": lambda x: jax.nn.gelu(x, approximate=True),
    "silu": jax.nn.silu,
    "swish": jax.nn.silu,
}


def sub(lora: LoraSubtree, name: str) -> LoraSubtree:
    """The LoRA subtree of child module `name` (None when there is no adapter there).

    Args:
      lora: a LoRA (sub)tree mirroring the param tree (nested mappings ending in {'a', 'b'}), or None.
      name: the child module's name, e.g. 'self_attn' or 'layers_0'.

    Returns:
      `lora[name]`, or None when `lora` is None or has no entry `name`.
    """
    if lora is None:
        return None
    return lora.get(name)


class Dense(nn.Module):
    """y = x @ kernel (+ bias) (+ scale * x @ A @ B when a LoRA subtree {'a', 'b'} is given).

    The kernel is stored (in, out) with logical `axes`; LoRA leaves may carry a leading batch axis
    (one adapter per example), see `lora.lora_delta`.

    Attributes:
      features: output width F.
      axes: logical axis names of the kernel's (in, out) dims; the bias takes `axes[1]`.
      use_bias: add a bias of shape (F,) (initialised to zeros).
      dtype: computation dtype (inputs, kernel and output are cast to it).
      param_dtype: dtype the kernel and bias are stored in.
      kernel_init: initializer of the (D_in, F) kernel (default N(0, 0.02^2)).
    """

    features: int
    axes: tuple[str, str]
    use_bias: bool = False
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    kernel_init: Callable = nn.initializers.normal(stddev=0.02)

    @nn.compact
    def __call__(self, x: Array, lora: LoraSubtree = None, lora_scale: float = 1.0) -> Array:
        """Applies the projection (plus the LoRA update when `lora` is given).

        Args:
          x: inputs (..., D_in), any float dtype (cast to `dtype`); (B, ..., D_in) with a batched LoRA.
          lora: None, or {'a': (D_in, r), 'b': (r, F)} for one adapter, or {'a': (B, D_in, r),
            'b': (B, r, F)} for one adapter per example (leading axis = x's batch axis).
          lora_scale: the LoRA scale alpha / r.

        Returns:
          (..., F) in `dtype`.

        Raises:
          ValueError: a batched LoRA whose leading axis differs from x's batch size.
        """
        kernel = self.param(
            "kernel",
            nn.with_logical_partitioning(self.kernel_init, self.axes),
            (x.shape[-1], self.features),
            self.param_dtype,
        )
        x = x.astype(self.dtype)
        y = jnp.einsum("...d,df->...f", x, kernel.astype(self.dtype))
        if self.use_bias:
            bias = self.param(
                "bias",
                nn.with_logical_partitioning(nn.initializers.zeros, (self.axes[1],)),
                (self.features,),
                self.param_dtype,
            )
            y = y + bias.astype(self.dtype)
        if lora is not None:
            y = y + lora_lib.lora_delta(x, lora["a"], lora["b"], lora_scale).astype(self.dtype)
        return y


class Embed(nn.Module):
    """Token embedding table (vocab, embed); `attend` gives logits for a tied output head.

    Attributes:
      num_embeddings: number of rows V (vocabulary size).
      features: embedding width D.
      dtype: dtype of the looked-up embeddings and of `attend`'s logits.
      param_dtype: dtype the (V, D) table is stored in.
      embedding_init: initializer of the table (default N(0, 0.02^2)).
    """

    num_embeddings: int
    features: int
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    embedding_init: Callable = nn.initializers.normal(stddev=0.02)

    def setup(self) -> None:
        """Creates the (V, D) `embedding` param with logical axes ('vocab', 'embed')."""
        self.embedding = self.param(
            "embedding",
            nn.with_logical_partitioning(self.embedding_init, ("vocab", "embed")),
            (self.num_embeddings, self.features),
            self.param_dtype,
        )

    def __call__(self, ids: Array) -> Array:
        """Looks up token embeddings.

        Args:
          ids: integer token ids of any shape (...), in [0, V).

        Returns:
          (..., D) embeddings in `dtype`.
        """
        return jnp.take(self.embedding, ids, axis=0).astype(self.dtype)

    def attend(self, x: Array) -> Array:
        """Projects hidden states onto the vocabulary with the embedding table (tied output head).

        Args:
          x: hidden states (..., D).

        Returns:
          logits (..., V) = x @ table^T, in `dtype`.
        """
        return jnp.einsum("...d,vd->...v", x.astype(self.dtype), self.embedding.astype(self.dtype))


class RMSNorm(nn.Module):
    """x * rsqrt(mean(x^2) + eps) * weight, computed in float32 (Llama, T5 layer norm).

    Attributes:
      eps: added to the mean square before the rsqrt.
      dtype: output dtype.
      param_dtype: dtype of the (D,) weight (initialised to ones, logical axis 'embed').
    """

    eps: float = 1e-6
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: Array) -> Array:
        """Normalises over the last axis.

        Args:
          x: (..., D), any float dtype.

        Returns:
          (..., D) in `dtype`.
        """
        weight = self.param(
            "weight", nn.with_logical_partitioning(nn.initializers.ones, ("embed",)), (x.shape[-1],), self.param_dtype
        )
        x32 = x.astype(jnp.float32)
        y = x32 * jax.lax.rsqrt(jnp.mean(jnp.square(x32), axis=-1, keepdims=True) + self.eps)
        return (y * weight.astype(jnp.float32)).astype(self.dtype)


class LayerNorm(nn.Module):
    """Standard LayerNorm with weight and bias (BERT); statistics computed in float32.

    Attributes:
      eps: added to the variance before the rsqrt.
      dtype: output dtype.
      param_dtype: dtype of the (D,) weight (ones) and bias (zeros), logical axis 'embed'.
    """

    eps: float = 1e-12
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: Array) -> Array:
        """(x - mean) / sqrt(var + eps) * weight + bias over the last axis (biased variance, as torch).

        Args:
          x: (..., D), any float dtype.

        Returns:
          (..., D) in `dtype`.
        """
        d = x.shape[-1]
        weight = self.param("weight", nn.with_logical_partitioning(nn.initializers.ones, ("embed",)), (d,), self.param_dtype)
        bias = self.param("bias", nn.with_logical_partitioning(nn.initializers.zeros, ("embed",)), (d,), self.param_dtype)
        x32 = x.astype(jnp.float32)
        mean = jnp.mean(x32, axis=-1, keepdims=True)
        var = jnp.mean(jnp.square(x32 - mean), axis=-1, keepdims=True)
        y = (x32 - mean) * jax.lax.rsqrt(var + self.eps)
        return (y * weight + bias).astype(self.dtype)


def mask_bias(mask: Array, dtype: Dtype = jnp.float32) -> Array:
    """Boolean keep-mask -> additive bias (0 where kept, a large negative where masked).

    A finite minimum (not -inf) keeps fully masked rows (left-padding queries) free of NaNs.

    Args:
      mask: boolean keep-mask of any shape, e.g. (B, 1, L, S) (True: the key is visible).
      dtype: dtype of the bias.

    Returns:
      Same shape as `mask`, in `dtype`: 0.0 where True, `jnp.finfo(dtype).min` where False.
    """
    return jnp.where(mask, 0.0, jnp.finfo(dtype).min).astype(dtype)


def heads_major(x_BxLxKxD: Array) -> Array:
    """(B, L, K, D) -> (B, K, L, D): the key/value (and KV-cache) layout `dot_product_attention` takes.

    Args:
      x_BxLxKxD: per-head keys or values (B, L, K, D), K heads of width D.

    Returns:
      The same values transposed to (B, K, L, D), same dtype.
    """
    return x_BxLxKxD.transpose(0, 2, 1, 3)


def dot_product_attention(
    q_BxLxHxD: Array,
    k_BxKxSxD: Array,
    v_BxKxSxD: Array,
    bias: Array,
    scale: float,
) -> Array:
    """Multi-head attention with grouped KV heads (GQA): H query heads share K = H // G kv heads.

    Keys and values are heads-major (B, K, S, D) so that both dots take (batch, kv head) as leading
    batch dims and a long KV cache is never transposed: in decoding only the L new queries move.
    `bias` broadcasts to (B, H, L, S) and carries masks and relative-position terms.
    Softmax runs in float32. Returns (B, L, H, D).

    Query head h uses kv head h // (H // K) (consecutive query heads share a kv head, as HF's
    `repeat_kv`). H must be a multiple of K.

    Args:
      q_BxLxHxD: queries (B, L, H, D) for L query positions.
      k_BxKxSxD: keys (B, K, S, D) for S key slots (heads-major, see `heads_major`).
      v_BxKxSxD: values (B, K, S, D).
      bias: additive bias broadcastable to (B, H, L, S), e.g. (B, 1, L, S) from `mask_bias` or
        (B, H, L, S) with T5's relative-position term; its last dim must be S.
      scale: multiplies q . k before the bias (D**-0.5 for Llama/BERT; 1.0 for T5).

    Returns:
      (B, L, H, D) attention outputs in v's dtype (probabilities are cast to it after the softmax).
    """
    b, l, h, d = q_BxLxHxD.shape
    kv_heads = k_BxKxSxD.shape[1]
    groups = h // kv_heads
    q = q_BxLxHxD.reshape(b, l, kv_heads, groups, d).transpose(0, 2, 3, 1, 4).reshape(b, kv_heads, groups * l, d)
    scores = jnp.einsum("bkqd,bksd->bkqs", q, k_BxKxSxD).astype(jnp.float32) * scale
    bias = jnp.broadcast_to(bias, (b, h, l, bias.shape[-1])).reshape(b, kv_heads, groups * l, -1)
    probs = jax.nn.softmax(scores + bias.astype(jnp.float32), axis=-1).astype(v_BxKxSxD.dtype)
    out = jnp.einsum("bkqs,bksd->bkqd", probs, v_BxKxSxD)
    return out.reshape(b, kv_heads, groups, l, d).transpose(0, 3, 1, 2, 4).reshape(b, l, h, d)
