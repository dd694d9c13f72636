"""LoRA as a plain pytree beside the frozen base params.

A LoRA tree mirrors the base param tree down to each targeted `Dense` and holds
`{'a': (in, r), 'b': (r, out)}` there, optionally with a leading batch axis on both leaves so that
every example of a batch uses its own adapter (`einsum('bld,bdr->blr')` then `('blr,brk->blk')`;
no per-example d x d kernel is ever built). The update is dW = (alpha / r) * A @ B in the kernel's
(in, out) layout, i.e. PEFT's `lora_B @ lora_A` transposed.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Iterable, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

Array = jax.Array
PyTree = Any


@dataclasses.dataclass(frozen=True)
class LoraSpec:
    """Which modules get an adapter (by module name, e.g. 'q_proj' or 'q'), its rank and alpha.

    Attributes:
      targets: module names to adapt (any Dense-like module with a 'kernel' of that name, at any depth).
      rank: LoRA rank r.
      alpha: LoRA alpha; the update is scaled by alpha / r.

    Raises:
      ValueError: at construction, when `rank` <= 0 or `targets` is empty.
    """

    targets: tuple[str, ...]
    rank: int = 8
    alpha: float = 16.0

    def __post_init__(self) -> None:
        if self.rank <= 0:
            raise ValueError(f"LoraSpec.rank must be positive, got {self.rank}")
        if not self.targets:
            raise ValueError("LoraSpec.targets is empty: name at least one module, e.g. ('q_proj', 'v_proj')")
        object.__setattr__(self, "targets", tuple(self.targets))

    @property
    def scale(self) -> float:
        """The LoRA scale alpha / r."""
        return self.alpha / self.rank


@struct.dataclass
class LoraWeights:
    """A LoRA pytree plus its static rank and alpha; what `model.apply(..., lora=...)` takes.

    Attributes:
      params: nested dict mirroring the base param tree down to each adapted module, which holds
        {'a': (D_in, r), 'b': (r, D_out)}, or with a leading adapter/batch axis N on both leaves
        {'a': (N, D_in, r), 'b': (N, r, D_out)}.
      rank: r (static: not a pytree leaf).
      alpha: LoRA alpha (static).
    """

    params: PyTree
    rank: int = struct.field(pytree_node=False)
    alpha: float = struct.field(pytree_node=False)

    @property
    def scale(self) -> float:
        """The LoRA scale alpha / r."""
        return self.alpha / self.rank

    @property
    def batched(self) -> bool:
        """True when the leaves carry a leading adapter axis (judged by the first leaf being 3-D).

        Raises:
          IndexError: `params` has no leaves.
        """
        leaf = jax.tree_util.tree_leaves(self.params)[0]
        return leaf.ndim == 3


def lora_delta(x: Array, a: Array, b: Array, scale: float) -> Array:
    """scale * x @ A @ B, per example when A/B carry a leading batch axis.

    Args:
      x: inputs (..., D_in); with batched A/B, (B, ..., D_in).
      a: A, (D_in, r) or batched (B, D_in, r); cast to x's dtype.
      b: B, (r, D_out) or batched (B, r, D_out); cast to x's dtype.
      scale: alpha / r.

    Returns:
      The update (..., D_out) (batched: (B, ..., D_out)) in x's dtype; no (D_in, D_out) matrix is built.

    Raises:
      ValueError: batched A whose leading axis differs from x's batch size.
    """
    if a.ndim == 2:
        return scale * ((x @ a.astype(x.dtype)) @ b.astype(x.dtype))
    if a.shape[0] != x.shape[0]:
        raise ValueError(f"batched LoRA has {a.shape[0]} adapters but the batch has {x.shape[0]} examples")
    h = jnp.einsum("b...d,bdr->b...r", x, a.astype(x.dtype))
    return scale * jnp.einsum("b...r,brk->b...k", h, b.astype(x.dtype))


def iter_targets(params: Mapping[str, Any], targets: Iterable[str], path: tuple[str, ...] = ()):
    """Yield (path, module_params) for every Dense-like module (has 'kernel') named in `targets`.

    Depth-first in the tree's dict order; a matched module is not searched further.

    Args:
      params: a plain or boxed param tree (nested mappings; leaves are not inspected).
      targets: module names to match.
      path: prefix prepended to every yielded path (for recursion).

    Yields:
      (path tuple of keys, the module's param mapping containing 'kernel').
    """
    targets = tuple(targets)
    for name, value in params.items():
        if not isinstance(value, Mapping):
            continue
        if name in targets and "kernel" in value:
            yield path + (name,), value
        else:
            yield from iter_targets(value, targets, path + (name,))


def _set_path(tree: dict, path: tuple[str, ...], value: Any) -> None:
    for key in path[:-1]:
        tree = tree.setdefault(key, {})
    tree[path[-1]] = value


def _get_path(tree: Mapping, path: tuple[str, ...]) -> Any:
    for key in path:
        tree = tree[key]
    return tree


def init_lora(
    spec: LoraSpec,
    params: PyTree,
    rng: Array | None = None,
    batch_size: int | None = None,
    dtype: Any = jnp.float32,
) -> LoraWeights:
    """A fresh adapter: A ~ U(-1/sqrt(in), 1/sqrt(in)) (PEFT's kaiming-uniform bound), B = 0.

    `params` may be concrete or abstract (ShapeDtypeStruct); with `batch_size` every leaf gets a
    leading batch axis. B = 0 makes the adapted model exactly the base model.

    Args:
      spec: targets, rank r and alpha.
      params: the base param tree (plain, boxed or abstract; a top-level {'params': ...} is stripped).
      rng: PRNG key for A (the i-th target found uses `fold_in(rng, i)`); None means PRNGKey(0).
      batch_size: N, to give every leaf a leading axis of N independently drawn adapters; None: one.
      dtype: dtype of A and B.

    Returns:
      LoraWeights with `a` (D_in, r) and `b` (r, D_out) zeros per target (batched: (N, D_in, r),
      (N, r, D_out)), rank and alpha from `spec`.

    Raises:
      ValueError: `spec.targets` match no module with a kernel in `params`.
    """
    params = unbox(params)
    found = list(iter_targets(params, spec.targets))
    if not found:
        raise ValueError(f"LoRA targets {spec.targets} match no module with a kernel in the model params")
    rng = jax.random.PRNGKey(0) if rng is None else rng
    lead = () if batch_size is None else (batch_size,)
    tree: dict = {}
    for i, (path, module) in enumerate(found):
        d_in, d_out = module["kernel"].shape
        bound = 1.0 / math.sqrt(d_in)
        a = jax.random.uniform(jax.random.fold_in(rng, i), lead + (d_in, spec.rank), dtype, -bound, bound)
        b = jnp.zeros(lead + (spec.rank, d_out), dtype)
        _set_path(tree, path, {"a": a, "b": b})
    return LoraWeights(params=tree, rank=spec.rank, alpha=spec.alpha)


def lora_logical_axes(lora: LoraWeights, param_axes: PyTree) -> PyTree:
    """Logical axis names of each LoRA leaf, derived from the targeted kernel's axes.

    `param_axes` is the tree of `nn.get_partition_spec(boxed_params)` (PartitionSpecs of logical names).

    Args:
      lora: the adapter (concrete or abstract leaves; only shapes are read).
      param_axes: PartitionSpecs of the base params, a tree containing every adapted module's 'kernel'.

    Returns:
      A tree like `lora.params` of PartitionSpecs: `a` -> (kernel in-axis, 'lora_rank'), `b` ->
      ('lora_rank', kernel out-axis), each with a leading 'batch' for 3-D (batched) leaves.

    Raises:
      KeyError: an adapted module has no kernel axes in `param_axes`.
    """
    from jax.sharding import PartitionSpec

    def axes_for(path, leaf):
        keys = tuple(p.key for p in path)
        kernel_axes = tuple(_get_path(param_axes, keys[:-1])["kernel"])
        lead = ("batch",) if leaf.ndim == 3 else ()
        if keys[-1] == "a":
            return PartitionSpec(*lead, kernel_axes[0], "lora_rank")
        return PartitionSpec(*lead, "lora_rank", kernel_axes[1])

    return jax.tree_util.tree_map_with_path(axes_for, lora.params)


def delta_w(lora: LoraWeights) -> PyTree:
    """dW = (alpha/r) A @ B per target, in kernel (in, out) layout (batched: (B, in, out)).

    Materialises d x d matrices: for export and tests, not for training losses.

    Args:
      lora: a single or batched adapter.

    Returns:
      A tree like `lora.params` where each module's {'a', 'b'} is replaced by its dW array,
      (D_in, D_out) or (N, D_in, D_out), in the leaves' dtype.
    """

    def one(module):
        return lora.scale * jnp.matmul(module["a"], module["b"])

    return jax.tree_util.tree_map(one, lora.params, is_leaf=lambda x: isinstance(x, Mapping) and "a" in x)


def merge(params: PyTree, lora: LoraWeights) -> PyTree:
    """Base params with dW added into each targeted kernel (single adapter only).

    Args:
      params: the base param tree (plain or boxed; a top-level {'params': ...} is stripped).
      lora: a single (unbatched) adapter of that base.

    Returns:
      A plain param tree (not mutated in place) where each adapted kernel is kernel + dW, cast back to
      the kernel's dtype; every other leaf is shared with `params`.

    Raises:
      ValueError: `lora` is batched.
      KeyError: `lora` adapts a module that `params` lacks.
    """
    if lora.batched:
        raise ValueError("merge needs a single adapter; this LoRA has a leading batch axis")
    deltas = delta_w(lora)

    def walk(p, d):
        out = dict(p)
        for key, value in d.items():
            if isinstance(value, Mapping):
                out[key] = walk(p[key], value)
            else:  # value is dW for module `key`
                module = dict(p[key])
                module["kernel"] = (module["kernel"] + value).astype(module["kernel"].dtype)
                out[key] = module
        return out

    return walk(unbox(params), deltas)


def select(lora: LoraWeights, index: int) -> LoraWeights:
    """Adapter `index` of a batched LoRA, as a single adapter.

    Args:
      lora: a batched adapter, leaves (N, D_in, r) / (N, r, D_out).
      index: which adapter, in [0, N) (negative counts from the end).

    Returns:
      LoraWeights with leaves (D_in, r) / (r, D_out), same rank and alpha.

    Raises:
      ValueError: `lora` is not batched.
    """
    if not lora.batched:
        raise ValueError("select needs a batched LoRA")
    return lora.replace(params=jax.tree_util.tree_map(lambda x: x[index], lora.params))


def per_example(lora_N: LoraWeights, index_B: Array) -> LoraWeights:
    """Adapter index_B[b] for every example b of a batch (a gather of N stacked adapters; the model's
    batched-LoRA path then runs a mixed-task batch in one call, never a per-example d x d kernel).

    Args:
      lora_N: a batched adapter, leaves (N, D_in, r) / (N, r, D_out).
      index_B: integer (B,) adapter index of each example, in [0, N). Not checked: `jnp.take`
        returns NaN leaves for an index >= N (negative ones count from the end).

    Returns:
      LoraWeights with leaves (B, D_in, r) / (B, r, D_out), same rank and alpha.
    """
    return lora_N.replace(params=jax.tree_util.tree_map(lambda x: jnp.take(x, index_B, axis=0), lora_N.params))


def stack(adapters: list[LoraWeights]) -> LoraWeights:
    """Batch single adapters (same targets, rank, alpha) into one batched LoRA.

    Args:
      adapters: N >= 1 single adapters with the same tree and leaf shapes.

    Returns:
      LoraWeights with leaves (N, D_in, r) / (N, r, D_out), adapter i at index i.

    Raises:
      ValueError: the adapters differ in rank or alpha (differing trees or leaf shapes also fail,
        in `jax.tree_util.tree_map` / `jnp.stack`).
      IndexError: `adapters` is empty.
    """
    first = adapters[0]
    for other in adapters[1:]:
        if (other.rank, other.alpha) != (first.rank, first.alpha):
            raise ValueError("stacked adapters must share rank and alpha")
    params = jax.tree_util.tree_map(lambda *xs: jnp.stack(xs), *[a.params for a in adapters])
    return first.replace(params=params)


def unbox(tree: PyTree) -> PyTree:
    """Strip flax partitioning boxes (nn.Partitioned) and a top-level {'params': ...} wrapper.

    Args:
      tree: a param tree, boxed or not, with or without the {'params': ...} wrapper.

    Returns:
      The plain tree (leaves are the boxes' values; nothing is copied).
    """
    from flax.core import meta

    tree = meta.unbox(tree)
    if isinstance(tree, Mapping) and set(tree.keys()) == {"params"}:
        tree = tree["params"]
    return tree


def num_params(lora: LoraWeights) -> int:
    """Number of scalars in the adapter's A and B leaves (a batched adapter counts all N)."""
    return int(sum(np.prod(x.shape) for x in jax.tree_util.tree_leaves(lora.params)))
