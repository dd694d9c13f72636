"""Mesh construction and the one table that maps logical axis names onto mesh axes.

Parameters carry logical names (`embed`, `mlp`, `heads`, ...); `LOGICAL_RULES` says which mesh
axis (`data`, `fsdp`, `tensor`) each one is split over. Everything else derives shardings from it.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Mapping, Sequence

import jax
import numpy as np
from flax import linen as nn
from jax.sharding import Mesh, NamedSharding, PartitionSpec

MESH_AXES: tuple[str, ...] = ("data", "fsdp", "tensor")

# logical axis -> mesh axes (None: replicated). One table for every model.
LOGICAL_RULES: tuple[tuple[str, Any], ...] = (
    ("batch", ("data", "fsdp")),
    ("length", None),
    ("embed", "fsdp"),
    ("mlp", "tensor"),
    ("heads", "tensor"),
    ("kv", "tensor"),
    ("vocab", "tensor"),
    ("relpos_buckets", None),
    ("lora_rank", None),
    ("layers", None),
    # TAGI hypernetwork (jaxlm/models/hypernet.py): small, replicated.
    ("hyper_width", None),
    ("hyper_table", None),
    ("hyper_io", None),
)


def parse_mesh_shape(spec: str | Mapping[str, int]) -> dict[str, int]:
    """'data=2,fsdp=2,tensor=2' or a dict -> {axis: size}; missing axes are 1, one -1 fills the rest."""
    if isinstance(spec, str):
        shape: dict[str, int] = {}
        for part in filter(None, (p.strip() for p in spec.split(","))):
            name, _, size = part.partition("=")
            if name not in MESH_AXES or not size.lstrip("-").isdigit():
                raise ValueError(f"bad mesh entry {part!r}: expected NAME=INT with NAME in {MESH_AXES}")
            shape[name] = int(size)
    else:
        shape = dict(spec)
    unknown = set(shape) - set(MESH_AXES)
    if unknown:
        raise ValueError(f"unknown mesh axes {sorted(unknown)}; expected a subset of {MESH_AXES}")
    return {axis: shape.get(axis, 1) for axis in MESH_AXES}


def make_mesh(shape: str | Mapping[str, int] | None = None, devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A (data, fsdp, tensor) mesh over `devices` (default: all). None puts every device on `data`."""
    devices = list(jax.devices() if devices is None else devices)
    sizes = parse_mesh_shape(shape or {"data": -1})
    fill = [a for a, s in sizes.items() if s == -1]
    if len(fill) > 1:
        raise ValueError(f"at most one mesh axis may be -1, got {fill}")
    known = math.prod(s for s in sizes.values() if s != -1)
    if fill:
        if len(devices) % known:
            raise ValueError(f"{len(devices)} devices do not divide into mesh {sizes}")
        sizes[fill[0]] = len(devices) // known
    if math.prod(sizes.values()) != len(devices):
        raise ValueError(f"mesh {sizes} needs {math.prod(sizes.values())} devices, have {len(devices)}")
    return jax.make_mesh(
        tuple(sizes[a] for a in MESH_AXES),
        MESH_AXES,
        axis_types=(jax.sharding.AxisType.Auto,) * len(MESH_AXES),
        devices=devices,
    )


def logical_to_spec(logical: PartitionSpec | Sequence[str | None], rules=LOGICAL_RULES) -> PartitionSpec:
    """Logical PartitionSpec -> mesh PartitionSpec; a mesh axis is used at most once per array."""
    table = dict(rules)
    used: set[str] = set()
    out = []
    for name in tuple(logical):
        axes = table.get(name) if name is not None else None
        if name is not None and name not in table:
            raise KeyError(f"logical axis {name!r} has no rule in LOGICAL_RULES")
        axes = (axes,) if isinstance(axes, str) else tuple(axes or ())
        axes = tuple(a for a in axes if a not in used)
        used.update(axes)
        out.append(axes[0] if len(axes) == 1 else (axes or None))
    return PartitionSpec(*out)


def _fit_to_shape(spec: PartitionSpec, shape: Sequence[int], mesh: Mesh) -> PartitionSpec:
    """Drop mesh axes that do not divide a dimension (tiny test models, odd vocab sizes)."""
    out = []
    for dim, axes in zip(shape, tuple(spec) + (None,) * (len(shape) - len(spec))):
        names = (axes,) if isinstance(axes, str) else tuple(axes or ())
        kept = []
        for name in names:
            if dim % (math.prod(mesh.shape[n] for n in kept) * mesh.shape[name]) == 0:
                kept.append(name)
        out.append(kept[0] if len(kept) == 1 else (tuple(kept) or None))
    return PartitionSpec(*out)


def logical_sharding(logical_specs: Any, shapes: Any, mesh: Mesh, rules=LOGICAL_RULES) -> Any:
    """Tree of logical PartitionSpecs + matching tree of shapes -> tree of NamedShardings."""

    def one(logical, leaf):
        spec = _fit_to_shape(logical_to_spec(logical, rules), np.shape(leaf) if not hasattr(leaf, "shape") else leaf.shape, mesh)
        return NamedSharding(mesh, spec)

    return jax.tree_util.tree_map(one, logical_specs, shapes, is_leaf=lambda x: isinstance(x, PartitionSpec))


def param_logical_specs(boxed_params: Any) -> Any:
    """Logical PartitionSpecs of a (possibly abstract) boxed param tree from `model.init`."""
    return nn.get_partition_spec(boxed_params)


def shard_params(params: Any, logical_specs: Any, mesh: Mesh, rules=LOGICAL_RULES) -> Any:
    """Place host params on the mesh according to their logical axes."""
    shardings = logical_sharding(logical_specs, params, mesh, rules)
    return jax.tree_util.tree_map(jax.device_put, params, shardings)


def batch_sharding(mesh: Mesh, ndim: int) -> NamedSharding:
    """Sharding of a (batch, ...) input array: batch over (data, fsdp), the rest replicated."""
    return NamedSharding(mesh, logical_to_spec(("batch",) + (None,) * (ndim - 1)))


def sharded_init(init_fn: Callable[[], Any], mesh: Mesh, rules=LOGICAL_RULES) -> Any:
    """Build params directly in their shardings (nothing large on one host): `jax.eval_shape` gives
    the boxed shapes and logical axes, they give NamedShardings, `jax.jit(out_shardings=...)` runs init.

    `init_fn()` returns the boxed param tree, e.g. `lambda: model.init(rng, *args)["params"]`.
    """
    abstract = jax.eval_shape(init_fn)
    shardings = logical_sharding(param_logical_specs(abstract), nn.unbox(abstract), mesh, rules)
    with jax.set_mesh(mesh):
        return jax.jit(lambda: nn.unbox(init_fn()), out_shardings=shardings)()


def constrain_activation(x: jax.Array, logical: Sequence[str | None] = ("batch", "length", None)) -> jax.Array:
    """Pin an activation's sharding under the ambient mesh (`jax.set_mesh`): rows split like the
    batch, features replicated. Without it XLA's propagation copies the weights' fsdp split of
    `embed` onto the hidden states and replicates the whole global batch on every device to get
    there. A no-op outside a mesh (single-device eval, tests) and for axes that do not divide."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        return x
    return jax.lax.with_sharding_constraint(x, _fit_to_shape(logical_to_spec(logical), x.shape, mesh))
