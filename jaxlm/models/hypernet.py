"""TAGI / HINT hypernetwork: read an instruction once per task, emit the LoRA of every targeted module.

One batched pass: every targeted Dense of the base model is a *slot* (path, module type, layer,
d_in, d_out). A slot's query is learned layer embedding + module-type embedding (+ a per-slot
table, zero at init); `depth` pre-norm blocks of multi-head cross-attention (queries -> projected
instruction encoding) and an MLP refine all S queries of all N instructions at once as an
(N, S, width) array. Output heads are shared per module type (q, v, ... have their own d_in, d_out)
and map a query to A (d_in, r) and B (r, d_out). B's head starts at zero, so dW = (alpha/r) A @ B = 0
and the adapted model is exactly the base model at initialisation; the initial A has PEFT's LoRA-init
magnitude (std 1/sqrt(3 d_in)): under the default `head_scaling='width'` it is a per-slot A0 and both
heads start at zero behind a 1/W multiplier (one Adam step moves the emitted A/B by about lr, as a
plain LoRA's, at any width W); under version one's 'none' the A head itself is scaled.

Usage (as in jaxlm/train/tagi.py; N tasks in a batch of B examples, `task_index_B` in [0, N)):

    spec = LoraSpec(("q_proj", "v_proj"), rank=8, alpha=16)
    config = HypernetConfig(lora=spec, width=256, depth=2, num_heads=4, encoder="base")
    slots = lora_slots(abstract_base_params, spec)          # boxed abstract params keep sharding axes
    hyper = HyperLoRA(config, slots)
    h_NxTxE = encode_instruction("base", base_model, base_params, ids_NxT, mask_NxT)
    hyper_params = hyper.init(rng, h_NxTxE, mask_NxT)["params"]   # boxed: nn.get_partition_spec works
    lora_N = hyper.apply({"params": hyper_params}, h_NxTxE, mask_NxT)      # LoraWeights, leaves (N, ...)
    logits = base_model.apply({"params": base_params}, ids_BxL, lora=lora.per_example(lora_N, task_index_B))

At evaluation run the hypernetwork once per task and cache `select(lora_N, i)` (or export it with
`jaxlm.checkpoints.peft`). Frozen vs trainable instruction encoder: `encode_instruction` is a pure
function of the params you hand it; pass params from the trainable pytree to finetune the encoder,
or the frozen base params (optionally under `jax.lax.stop_gradient`) to keep it frozen.

Encoder-decoder instruction fusion (`config.fusion`): `hyper.apply(..., with_fusion=True)` also
returns the instruction states to join to the encoder output (projected to `fusion_dim` when set
and different from the instruction width, e.g. MiniLM 384 -> T5 d_model); gather them per example
with `jnp.take(fused_NxTxD, task_index_B, axis=0)` and call `fused_logits`.
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn

from jaxlm.errors import ConfigError
from jaxlm.models import lora as lora_lib
from jaxlm.models.layers import Dense, dot_product_attention, heads_major, mask_bias
from jaxlm.models.lora import LoraSpec, LoraWeights

Array = jax.Array
PyTree = Any

ENCODERS = ("base", "minilm")
# How the shared heads' outputs scale with the generator width W (see `HypernetConfig.head_scaling`).
HEAD_SCALINGS = ("width", "none")
# First path component naming a layer of a stack: Llama `layers_i`, T5 `block_i`, BERT `layer_i`.
_LAYER_RE = re.compile(r"^(layers|block|layer)_(\d+)$")
# Sublayer wrappers inside a layer (T5 `layer_0/SelfAttention`) are not part of the module type.
_SUBLAYER_RE = re.compile(r"^layer_\d+$")


@dataclasses.dataclass(frozen=True)
class HypernetConfig:
    """Hypernetwork shape; bind in gin as `HypernetConfig.lora = @LoraSpec()` etc.

    encoder: "base" (the base model's encoder / hidden states) or "minilm" (BERT sentence encoder).
    fusion: the adapted model also reads the instruction. T5: instruction states are joined to the
    encoder output (see `fused_logits`); `fusion_dim` is the base d_model, needed only when it differs
    from the instruction width. Decoder-only (Llama): the instruction tokens are a cached prefix whose
    keys/values every example of the task attends to (`jaxlm.models.prefix`; fusion_dim unused).
    slot_queries: add a per-slot learned query table (zero at init) to layer + module embeddings.
    head_scaling: "width" (default): A = A0[slot] + (1/W) y @ K_A + bias_A and B = (1/W) y @ K_B + bias_B,
    with A0 a per-slot LoRA init (std 1/sqrt(3 d_in), a plain LoRA's A) and K_A, K_B zero at init, so
    dW = 0 at init and one Adam step (about lr per parameter entry) moves every entry of the emitted A
    and B by about lr, as it moves a plain LoRA's, at any generator width W (the muP output-layer
    rule; the instruction-dependent part of A starts at zero like B's). "none" is version one:
    A = y @ K_A + bias with std(K_A) = 1/sqrt(3 d_in W), no multiplier; its emitted A/B move about W
    times faster than a plain LoRA at the same learning rate. Exports written before this field
    existed load as "none".

    Attributes:
      lora: the generated adapter's targets, rank r and alpha.
      width: W, the width of the slot queries and of the projected instruction.
      depth: number of cross-attention blocks (>= 1).
      num_heads: attention heads of each block (W must be a multiple).
      mlp_ratio: MLP width as a multiple of W (>= 1).
      encoder: see above.
      fusion: see above.
      fusion_dim: see above.
      slot_queries: see above.
      head_scaling: see above.
      encoder_layer: read the instruction from the residual stream after this many blocks of a Llama
        encoder (`encode_instruction`); None: its final normed states.

    Raises:
      ConfigError: at construction, when `lora` is not a LoraSpec, `encoder` is unknown, `width` is not
        a positive multiple of `num_heads`, `depth` < 1 or `mlp_ratio` < 1.
    """

    lora: LoraSpec
    width: int = 256
    depth: int = 2
    num_heads: int = 4
    mlp_ratio: int = 4
    encoder: str = "base"
    fusion: bool = False
    fusion_dim: int | None = None
    slot_queries: bool = True
    head_scaling: str = "width"
    encoder_layer: int | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.lora, LoraSpec):
            raise ConfigError(f"HypernetConfig.lora must be a LoraSpec, got {type(self.lora).__name__}")
        if self.encoder not in ENCODERS:
            raise ConfigError(f"HypernetConfig.encoder={self.encoder!r}: expected one of {ENCODERS}")
        if self.width <= 0 or self.width % self.num_heads:
            raise ConfigError(f"HypernetConfig.width={self.width} must be a positive multiple of num_heads={self.num_heads}")
        if self.depth < 1:
            raise ConfigError(f"HypernetConfig.depth={self.depth}: need at least one cross-attention block")
        if self.mlp_ratio < 1:
            raise ConfigError(f"HypernetConfig.mlp_ratio={self.mlp_ratio} must be >= 1")
        if self.head_scaling not in HEAD_SCALINGS:
            raise ConfigError(f"HypernetConfig.head_scaling={self.head_scaling!r}: expected one of {HEAD_SCALINGS}")


@dataclasses.dataclass(frozen=True)
class LoraSlot:
    """One targeted Dense: where it lives in the base tree and what the generator must emit for it.

    `module` is the module type shared across layers (`self_attn/q_proj`, `SelfAttention/q`), `layer`
    a global layer index (stacks by name, then layer number: T5 decoder blocks, then encoder blocks;
    modules outside any layer, e.g. `lm_head`, get their own index after the layers), `axes` the
    kernel's logical axes.

    Attributes:
      path: keys of the module in the base param tree, e.g. ('layers_0', 'self_attn', 'q_proj').
      module: module type shared across layers.
      layer: global layer index (see above).
      d_in: the kernel's input width.
      d_out: the kernel's output width.
      axes: the kernel's (in, out) logical axes; ('hyper_io', 'hyper_io') when the params were unboxed.
    """

    path: tuple[str, ...]
    module: str
    layer: int
    d_in: int
    d_out: int
    axes: tuple[str | None, str | None] = ("hyper_io", "hyper_io")


def _layer_key(path: tuple[str, ...]) -> tuple[tuple[str, ...], int, int]:
    """(stack prefix, layer number, position of the layer component) or (parent path, big, -1)."""
    for i, name in enumerate(path):
        m = _LAYER_RE.match(name)
        if m:
            return path[:i], int(m.group(2)), i
    return path[:-1], 1 << 30, -1


def lora_slots(base_params: PyTree, spec: LoraSpec) -> tuple[LoraSlot, ...]:
    """Static description of every Dense that `spec` targets, in a canonical order (layers by number,
    not by the dict order of the tree). Works on concrete, abstract and boxed params; with boxed
    params (from `model.init` / `abstract_params`) the slots carry the kernels' logical axes.

    Args:
      base_params: the base model's params (a top-level {'params': ...} wrapper is stripped).
      spec: the adapter spec whose `targets` select the modules.

    Returns:
      A tuple of S `LoraSlot`s sorted by (layer, path).

    Raises:
      ConfigError: `spec.targets` match no module with a kernel.
    """
    if isinstance(base_params, Mapping) and set(base_params.keys()) == {"params"}:
        base_params = base_params["params"]
    found = list(lora_lib.iter_targets(base_params, spec.targets))
    if not found:
        raise ConfigError(f"HypernetConfig.lora.targets={spec.targets} match no module with a kernel in the base params")
    keys = {}
    raw = []
    for path, module in found:
        kernel = module["kernel"]
        names = getattr(kernel, "names", None)
        kernel = getattr(kernel, "value", kernel)
        d_in, d_out = kernel.shape
        prefix, number, pos = _layer_key(path)
        keys[(prefix, number)] = None
        rest = path[pos + 1:] if pos >= 0 else path[-1:]
        module_type = "/".join(p for p in rest if not _SUBLAYER_RE.match(p))
        axes = tuple(names) if names is not None else ("hyper_io", "hyper_io")
        raw.append((path, module_type, (prefix, number), d_in, d_out, axes))
    layer_of = {key: i for i, key in enumerate(sorted(keys, key=lambda k: (k[1] == 1 << 30, k[0], k[1])))}
    slots = [LoraSlot(p, m, layer_of[k], di, do, ax) for p, m, k, di, do, ax in raw]
    return tuple(sorted(slots, key=lambda s: (s.layer, s.path)))


def _head_groups(slots: tuple[LoraSlot, ...]) -> dict[str, list[int]]:
    """Head name -> slot indices; one shared head per (module type, d_in, d_out)."""
    shapes: dict[str, set] = {}
    for s in slots:
        shapes.setdefault(s.module, set()).add((s.d_in, s.d_out))
    groups: dict[str, list[int]] = {}
    for i, s in enumerate(slots):
        name = re.sub(r"[^A-Za-z0-9_]", "_", s.module)
        if len(shapes[s.module]) > 1:
            name += f"_{s.d_in}x{s.d_out}"
        groups.setdefault(name, []).append(i)
    return groups


def _layer_norm(name: str) -> nn.LayerNorm:
    return nn.LayerNorm(
        epsilon=1e-6, name=name,
        scale_init=nn.with_logical_partitioning(nn.initializers.ones, ("hyper_width",)),
        bias_init=nn.with_logical_partitioning(nn.initializers.zeros, ("hyper_width",)),
    )


def _dense(features: int, axes: tuple[str, str], name: str) -> Dense:
    return Dense(features, axes, use_bias=True, kernel_init=nn.initializers.lecun_normal(), name=name)


class CrossBlock(nn.Module):
    """Pre-norm block: queries += MHA(LN(queries), instruction); queries += MLP(LN(queries)).

    Attributes:
      width: W.
      num_heads: attention heads (W must be a multiple).
      mlp_ratio: MLP hidden width W * mlp_ratio (gelu).
    """

    width: int
    num_heads: int
    mlp_ratio: int

    @nn.compact
    def __call__(self, q_NxSxW: Array, ctx_NxTxW: Array, bias: Array) -> Array:
        """Refines the slot queries once.

        Args:
          q_NxSxW: slot queries (N, S, W).
          ctx_NxTxW: projected instruction states (N, T, W).
          bias: additive key-mask bias broadcastable to (N, heads, S, T), e.g. (N, 1, 1, T).

        Returns:
          float32 queries (N, S, W).
        """
        n, s, w = q_NxSxW.shape
        t = ctx_NxTxW.shape[1]
        hd = w // self.num_heads
        wide = ("hyper_width", "hyper_width")
        y = _layer_norm("attn_norm")(q_NxSxW)
        q = _dense(w, wide, "query")(y).reshape(n, s, self.num_heads, hd)
        k = heads_major(_dense(w, wide, "key")(ctx_NxTxW).reshape(n, t, self.num_heads, hd))
        v = heads_major(_dense(w, wide, "value")(ctx_NxTxW).reshape(n, t, self.num_heads, hd))
        out = dot_product_attention(q, k, v, bias, scale=hd**-0.5).reshape(n, s, w)
        q_NxSxW = q_NxSxW + _dense(w, wide, "out")(out)
        y = _layer_norm("mlp_norm")(q_NxSxW)
        y = nn.gelu(_dense(w * self.mlp_ratio, wide, "mlp_in")(y))
        return q_NxSxW + _dense(w, wide, "mlp_out")(y)


class HyperLoRA(nn.Module):
    """Instruction states (N, T, E) + mask (N, T) -> LoraWeights with leaves (N, d_in, r) / (N, r, d_out).

    The LoRA tree mirrors the base tree (the core's batched layout). With `with_fusion=True` returns
    (lora, instruction states for `fused_logits`, (N, T, fusion_dim or E)).

    Attributes:
      config: the hypernetwork config.
      slots: the targeted modules, from `lora_slots` (S of them).
    """

    config: HypernetConfig
    slots: tuple[LoraSlot, ...]

    @nn.compact
    def __call__(self, h_NxTxE: Array, mask_NxT: Array, *, with_fusion: bool = False):
        """Generates one adapter per instruction.

        Args:
          h_NxTxE: instruction states (N, T, E), e.g. from `encode_instruction` (cast to float32).
          mask_NxT: (N, T) bool or 0/1, True on instruction tokens.
          with_fusion: also return the instruction states to fuse (needs `config.fusion`).

        Returns:
          LoraWeights with float32 leaves a (N, d_in, r) and b (N, r, d_out) at every slot's path, rank
          and alpha from `config.lora`; with `with_fusion`, (that, float32 states (N, T, fusion_dim)
          when `fusion_dim` is set and differs from E, else the input states (N, T, E)).

        Raises:
          ConfigError: `with_fusion=True` while `config.fusion` is False.
        """
        c, slots = self.config, self.slots
        rank, width = c.lora.rank, c.width
        h_NxTxE = h_NxTxE.astype(jnp.float32)
        n = h_NxTxE.shape[0]
        ctx = _layer_norm("in_norm")(_dense(width, ("embed", "hyper_width"), "in_proj")(h_NxTxE))
        bias = mask_bias(mask_NxT.astype(bool)[:, None, None, :], jnp.float32)

        layer_S = jnp.asarray(np.array([s.layer for s in slots], np.int32))
        types = sorted({s.module for s in slots})
        type_S = jnp.asarray(np.array([types.index(s.module) for s in slots], np.int32))
        table = lambda name, rows, init: self.param(
            name, nn.with_logical_partitioning(init, ("hyper_table", "hyper_width")), (rows, width), jnp.float32
        )
        query_SxW = (
            jnp.take(table("layer_embed", max(s.layer for s in slots) + 1, nn.initializers.normal(1.0)), layer_S, axis=0)
            + jnp.take(table("module_embed", len(types), nn.initializers.normal(1.0)), type_S, axis=0)
        )
        if c.slot_queries:
            query_SxW = query_SxW + table("slot_embed", len(slots), nn.initializers.zeros)
        q_NxSxW = jnp.broadcast_to(query_SxW, (n,) + query_SxW.shape)
        for i in range(c.depth):
            q_NxSxW = CrossBlock(width, c.num_heads, c.mlp_ratio, name=f"block_{i}")(q_NxSxW, ctx, bias)
        y_NxSxW = _layer_norm("out_norm")(q_NxSxW)
        multiplier = 1.0 / width if c.head_scaling == "width" else 1.0  # see HypernetConfig.head_scaling
        tree: dict = {}
        for name, index in _head_groups(slots).items():
            first = slots[index[0]]
            d_in, d_out = first.d_in, first.d_out
            head = lambda suffix, shape, axes, init, name=name: self.param(
                f"{name}_{suffix}", nn.with_logical_partitioning(init, axes), shape, jnp.float32
            )
            lora_init = nn.initializers.normal(1.0 / math.sqrt(3.0 * d_in))  # std of PEFT's U(+-1/sqrt(d_in))
            if c.head_scaling == "width":
                # A = A0[slot] + (1/W) y @ K_A + bias: A0 is a per-slot LoRA init (a plain LoRA's A), the
                # instruction-dependent part starts at zero like B's, and 1/W keeps one Adam step on K
                # (about lr per entry) an O(lr) change of A and B at any width.
                a_kernel_init = nn.initializers.zeros
                a0_GxDxR = head("a_init", (len(index), d_in, rank), ("hyper_table", first.axes[0], "lora_rank"),
                                lora_init)
            else:  # version one: A = y @ K_A + bias with std(K_A) = 1/sqrt(3 d_in W): std(A) = 1/sqrt(3 d_in)
                a_kernel_init = nn.initializers.normal(1.0 / math.sqrt(3.0 * d_in * width))
                a0_GxDxR = 0.0
            k_a = head("a_kernel", (width, d_in, rank), ("hyper_width", first.axes[0], "lora_rank"), a_kernel_init)
            b_a = head("a_bias", (d_in, rank), (first.axes[0], "lora_rank"), nn.initializers.zeros)
            k_b = head("b_kernel", (width, rank, d_out), ("hyper_width", "lora_rank", first.axes[1]), nn.initializers.zeros)
            b_b = head("b_bias", (rank, d_out), ("lora_rank", first.axes[1]), nn.initializers.zeros)
            y_g = jnp.take(y_NxSxW, jnp.asarray(np.array(index, np.int32)), axis=1)
            a_NxGxDxR = multiplier * jnp.einsum("ngw,wdr->ngdr", y_g, k_a) + b_a + a0_GxDxR
            b_NxGxRxK = multiplier * jnp.einsum("ngw,wrk->ngrk", y_g, k_b) + b_b
            for j, slot_index in enumerate(index):
                lora_lib._set_path(tree, slots[slot_index].path, {"a": a_NxGxDxR[:, j], "b": b_NxGxRxK[:, j]})
        lora = LoraWeights(params=tree, rank=rank, alpha=c.lora.alpha)
        fused = None
        if c.fusion:
            fused = h_NxTxE
            if c.fusion_dim is not None and c.fusion_dim != h_NxTxE.shape[-1]:
                fused = _dense(c.fusion_dim, ("hyper_io", "embed"), "fusion_proj")(h_NxTxE)
        if with_fusion:
            if fused is None:
                raise ConfigError("HyperLoRA(with_fusion=True) needs HypernetConfig.fusion = True")
            return lora, fused
        return lora


def encode_instruction(kind: str, model: nn.Module, params: PyTree, ids_NxT: Array, mask_NxT: Array,
                       layer: int | None = None) -> Array:
    """Instruction hidden states (N, T, E) float32 from an existing model, without any LoRA.

    kind "base": a T5 base -> its encoder output (`method=T5.encode`); a Llama base -> its final normed
    hidden states (`output='hidden'`), or with `layer` the residual stream after that many blocks
    (`HypernetConfig.encoder_layer`: an intermediate layer, often more readable than the last one of
    a model trained to predict the next token). kind "minilm": a BERT model's last hidden states.
    Gradients flow into `params` iff the caller differentiates with respect to them (trainable encoder).

    Args:
      kind: "base" or "minilm" (`HypernetConfig.encoder`).
      model: a `T5`, `Llama` or `Bert` module.
      params: its params (boxed or plain; a top-level {'params': ...} wrapper is stripped).
      ids_NxT: integer instruction token ids (N, T).
      mask_NxT: (N, T) bool or 0/1, True on instruction tokens.
      layer: Llama only: the number of blocks to run (1..num_layers), or None for the final states.

    Returns:
      float32 (N, T, E), E = d_model (T5) or hidden_size (Llama, BERT); padded positions hold values too.

    Raises:
      ConfigError: an unknown `kind`, kind "minilm" with a model that is not `Bert`, a model of
        another class, or `layer` with a model that is not `Llama` or outside 1..num_layers.
    """
    from jaxlm.models.bert import Bert
    from jaxlm.models.llama import Llama
    from jaxlm.models.t5 import T5

    if kind not in ENCODERS:
        raise ConfigError(f"HypernetConfig.encoder={kind!r}: expected one of {ENCODERS}")
    if kind == "minilm" and not isinstance(model, Bert):
        raise ConfigError(f"HypernetConfig.encoder='minilm' needs a BERT model, got {type(model).__name__}")
    if layer is not None and (not isinstance(model, Llama) or not 1 <= layer <= model.config.num_layers):
        limit = f"1..{model.config.num_layers}" if isinstance(model, Llama) else "a Llama encoder"
        raise ConfigError(f"HypernetConfig.encoder_layer={layer}: needs {limit} ({type(model).__name__} here)")
    variables = {"params": lora_lib.unbox(params)}
    if isinstance(model, T5):
        hidden = model.apply(variables, ids_NxT, mask_NxT, method=T5.encode)
    elif isinstance(model, Llama):
        hidden = model.apply(variables, ids_NxT, mask_NxT, output="hidden", num_layers=layer)
    elif isinstance(model, Bert):
        hidden = model.apply(variables, ids_NxT, mask_NxT)
    else:
        raise ConfigError(f"encode_instruction: no instruction encoder for {type(model).__name__}")
    return hidden.astype(jnp.float32)


def fused_encoder_states(
    model: nn.Module, params: PyTree, encoder_input_ids_BxL: Array, encoder_mask_BxL: Array,
    instruction_BxTxD: Array, instruction_mask_BxT: Array, *, lora: LoraWeights | None = None,
) -> tuple[Array, Array]:
    """T5 encoder output of the input (with `lora`) joined along length with the instruction states:
    ((B, L + T, D), (B, L + T) mask), what the decoder cross-attends to (also for cached decoding).

    Args:
      model: a `T5` module.
      params: its plain params.
      encoder_input_ids_BxL: integer encoder token ids (B, L).
      encoder_mask_BxL: (B, L), True on real tokens.
      instruction_BxTxD: each example's instruction states (B, T, D), D = d_model.
      instruction_mask_BxT: (B, T), True on instruction tokens.
      lora: None, one adapter, or one per example (applied to the encoder).

    Returns:
      (states (B, L + T, D) in the encoder's dtype, bool mask (B, L + T)).

    Raises:
      ValueError: the instruction width differs from d_model.
    """
    from jaxlm.models.t5 import T5

    variables = {"params": params}
    hidden = model.apply(variables, encoder_input_ids_BxL, encoder_mask_BxL, lora=lora, method=T5.encode)
    if instruction_BxTxD.shape[-1] != hidden.shape[-1]:
        raise ValueError(
            f"instruction width {instruction_BxTxD.shape[-1]} != T5 d_model {hidden.shape[-1]}: "
            "set HypernetConfig.fusion_dim to the base d_model"
        )
    joined = jnp.concatenate([hidden, instruction_BxTxD.astype(hidden.dtype)], axis=1)
    mask = jnp.concatenate([encoder_mask_BxL.astype(bool), instruction_mask_BxT.astype(bool)], axis=1)
    return joined, mask


def fused_logits(
    model: nn.Module, params: PyTree, encoder_input_ids_BxL: Array, encoder_mask_BxL: Array,
    decoder_input_ids_BxM: Array, instruction_BxTxD: Array, instruction_mask_BxT: Array, *,
    lora: LoraWeights | None = None, decoder_attention_mask_BxM: Array | None = None,
) -> Array:
    """Decoder logits (B, M, V) with the instruction fused into the encoder output (TAGI's fusion).

    With an all-False instruction mask this equals plain `T5.__call__` (masked keys get zero weight).

    Args:
      model: a `T5` module.
      params: its plain params.
      encoder_input_ids_BxL: integer encoder token ids (B, L).
      encoder_mask_BxL: (B, L), True on real tokens.
      decoder_input_ids_BxM: integer decoder inputs (B, M).
      instruction_BxTxD: each example's instruction states (B, T, D), D = d_model.
      instruction_mask_BxT: (B, T), True on instruction tokens.
      lora: None, one adapter, or one per example (applied to encoder and decoder).
      decoder_attention_mask_BxM: (B, M), True on real decoder tokens; None: all real.

    Returns:
      float32 logits (B, M, V).

    Raises:
      ValueError: the instruction width differs from d_model.
    """
    from jaxlm.models.t5 import T5

    hidden, mask = fused_encoder_states(
        model, params, encoder_input_ids_BxL, encoder_mask_BxL, instruction_BxTxD, instruction_mask_BxT, lora=lora
    )
    return model.apply(
        {"params": params}, decoder_input_ids_BxM, hidden, mask, lora=lora,
        decoder_attention_mask=decoder_attention_mask_BxM, method=T5.decode,
    )


def num_params(params: PyTree) -> int:
    """Number of scalars in a (possibly boxed or abstract) param tree.

    Args:
      params: any param tree (leaves need a `.shape`).

    Returns:
      The total element count, as a Python int.
    """
    return int(sum(np.prod(x.shape) for x in jax.tree_util.tree_leaves(lora_lib.unbox(params))))
