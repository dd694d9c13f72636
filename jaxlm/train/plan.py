"""`jaxlm plan`: compile a gin run's train step for a mesh this machine does not have and report
per-device memory, FLOPs per step and whether it fits in HBM, without allocating a single weight.

Everything is abstract: the TrainStep's state, frozen params and batch are `jax.ShapeDtypeStruct`s
with shardings, and the step is only lowered and compiled. The devices are, in order of preference:
compile-only devices of a real TPU/GPU topology (`jax.experimental.topologies`, needs the platform's
PJRT plugin, e.g. libtpu), or N fake XLA:CPU devices (`--xla_force_host_platform_device_count=N`,
set in a subprocess because it must precede JAX's backend start). The report says which one the
numbers come from: XLA:CPU's buffer assignment and fusion differ from TPU/GPU, so its temp size is an
estimate, while parameter/optimizer bytes per device are exact (they follow from the shardings).
"""

from __future__ import annotations

import copy
import dataclasses
import inspect
import math
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jaxlm.buckets import DEFAULT_LENGTH_BUCKETS, bucket_length
from jaxlm.errors import ConfigError, UsageError
from jaxlm.features import DECODER_ONLY_FEATURES, ENCODER_DECODER_FEATURES

GIB = 1024**3
DEFAULT_HBM_GIB = {"tpu": 16.0, "gpu": 80.0}  # TPU v5e chip, H100 80GB
TPU_TOPOLOGY_PREFIX = "v5e"


@dataclasses.dataclass
class PlanReport:
    """What `jaxlm plan` prints; all byte counts are per device."""

    platform: str  # the platform the run is planned for (--platform)
    compiled_for: str  # what actually compiled it, e.g. "XLA:CPU, 256 fake devices"
    mesh: dict[str, int]
    num_devices: int
    batch_shapes: dict[str, list[int]]
    param_count: int  # trainable, global
    frozen_param_count: int  # global
    param_bytes: int  # trainable params on one device
    frozen_bytes: int
    optimizer_bytes: int
    batch_bytes: int
    argument_bytes: int  # from memory_analysis: state + frozen + batch on one device
    output_bytes: int
    alias_bytes: int  # outputs written in place of donated inputs (the train state)
    temp_bytes: int  # activations, gradients, optimizer temporaries
    generated_code_bytes: int
    flops_per_device: float
    hbm_gib: float | None

    @property
    def peak_bytes(self) -> int:
        """Live at once: inputs, outputs not aliased to a donated input, temporaries."""
        return self.argument_bytes + self.output_bytes - self.alias_bytes + self.temp_bytes

    @property
    def dense_flops_estimate(self) -> float:
        """The 6·N·D rule for one step (forward + backward through every param, N = all params)."""
        tokens = sum(math.prod(shape) for name, shape in self.batch_shapes.items() if name.endswith("input_tokens"))
        return 6.0 * (self.param_count + self.frozen_param_count) * tokens

    @property
    def fits(self) -> bool | None:
        return None if self.hbm_gib is None else self.peak_bytes <= self.hbm_gib * GIB

    def format(self) -> str:
        g = _size
        mesh = ",".join(f"{k}={v}" for k, v in self.mesh.items())
        lines = [
            f"plan for {self.platform.upper()}, mesh {mesh} ({self.num_devices} devices)",
            f"compiled with: {self.compiled_for}",
            "batch: " + ", ".join(f"{k}{tuple(v)}" for k, v in sorted(self.batch_shapes.items())),
            f"trainable params: {self.param_count:,}   frozen params: {self.frozen_param_count:,}",
            "per device:",
            f"  trainable params   {g(self.param_bytes)}",
            f"  frozen params      {g(self.frozen_bytes)}",
            f"  optimizer state    {g(self.optimizer_bytes)}",
            f"  batch              {g(self.batch_bytes)}",
            f"  arguments          {g(self.argument_bytes)}   (memory_analysis)",
            f"  outputs            {g(self.output_bytes)}   (aliased to donated inputs: {g(self.alias_bytes).strip()})",
            f"  temp/activations   {g(self.temp_bytes)}",
            f"  peak               {g(self.peak_bytes)}   (arguments + outputs - aliased + temp)",
            f"FLOPs per step: {self.flops_per_device:.4g} per device, {self.flops_per_device * self.num_devices:.4g} total"
            " (XLA cost analysis; a loop body such as the microbatch scan may be counted once)",
            f"  cross-check 6 * params * tokens = {self.dense_flops_estimate:.4g} total",
        ]
        if self.fits is None:
            lines.append("no HBM size given (--hbm_gib): fit not checked")
        elif self.fits:
            lines.append(f"FITS in {self.hbm_gib:g} GiB HBM ({self.peak_bytes / GIB:.2f} GiB peak per device)")
        else:
            lines.append(f"DOES NOT FIT in {self.hbm_gib:g} GiB HBM ({self.peak_bytes / GIB:.2f} GiB peak per device)")
        return "\n".join(lines)


def _size(num_bytes: float) -> str:
    for unit, scale in (("GiB", GIB), ("MiB", 1024**2), ("KiB", 1024)):
        if num_bytes >= scale:
            return f"{num_bytes / scale:10.3f} {unit}"
    return f"{num_bytes:10.0f} B  "


# ------------------------------------------------------------------------------- gin -> run pieces


def _gin_value(name: str, default: Any = None) -> Any:
    """A bound gin parameter with its `@ref()` / `%MACRO` references evaluated (gin's deepcopy does it)."""
    import gin

    try:
        value = gin.query_parameter(name)
    except ValueError:
        return default
    return copy.deepcopy(value)


def _bound(configurable: Any, name: str) -> Any:
    """`configurable`'s parameter `name` as the run will see it: the gin binding, else its default."""
    param = inspect.signature(configurable).parameters.get(name)
    default = None if param is None or param.default is inspect.Parameter.empty else param.default
    return _gin_value(f"{configurable.__name__}.{name}", default)


def abstract_batch(data: Any) -> dict[str, jax.ShapeDtypeStruct]:
    """The largest batch the run's data source can produce, as ShapeDtypeStructs (no data is read).

    `mixture_batches` pads rows to a length bucket of at most max_input_len + max_target_len
    (decoder-only) or max_input_len / max_target_len (encoder-decoder); other sources (synthetic
    batches) are cheap to construct, so one batch of theirs gives the shapes."""
    if data is None:
        raise ConfigError("train.data is not bound: plan needs the batch shapes (bind train.data in a gin file)")
    name = getattr(data, "__name__", type(data).__name__)
    if name == "mixture_batches":
        batch_size = _bound(data, "batch_size")
        if batch_size is None:
            raise ConfigError("mixture_batches.batch_size is not bound")
        layout = _bound(data, "layout")
        max_in, max_tgt = _bound(data, "max_input_len"), _bound(data, "max_target_len")
        with_task = not _bound(data, "pack")
        if layout == "decoder_only":
            width = bucket_length(max_in + max_tgt, DEFAULT_LENGTH_BUCKETS)
            shapes = {n: (batch_size, width) for n in DECODER_ONLY_FEATURES}
        else:
            w_in, w_tgt = bucket_length(max_in, DEFAULT_LENGTH_BUCKETS), bucket_length(max_tgt, DEFAULT_LENGTH_BUCKETS)
            shapes = {n: (batch_size, w_in if n.startswith("encoder") else w_tgt) for n in ENCODER_DECODER_FEATURES}
        if with_task:
            shapes["task_index"] = (batch_size,)
        return {n: jax.ShapeDtypeStruct(s, jnp.float32 if n.endswith("loss_weights") else jnp.int32)
                for n, s in shapes.items()}
    iterator = data() if callable(data) else data
    batch = next(iter(iterator))
    return {k: jax.ShapeDtypeStruct(np.shape(v), np.asarray(v).dtype) for k, v in batch.items()}


def resolve_mesh(spec: str, available: int | None) -> dict[str, int]:
    from jaxlm.sharding import parse_mesh_shape

    try:
        shape = parse_mesh_shape(spec)
    except ValueError as e:
        raise UsageError(f"--mesh {spec!r}: {e}") from None
    fill = [a for a, s in shape.items() if s == -1]
    if fill:
        known = math.prod(s for s in shape.values() if s != -1)
        if len(fill) > 1 or available is None or available % known:
            raise UsageError(f"--mesh {spec!r}: give every axis a size (e.g. --mesh data=8,fsdp=32); "
                             "plan compiles for devices this machine does not have")
        shape[fill[0]] = available // known
    if any(s < 1 for s in shape.values()):
        raise UsageError(f"--mesh {spec!r}: axis sizes must be >= 1")
    return shape


def _shard_bytes(tree: Any) -> int:
    """Bytes of one device's shards of an abstract tree (the largest shard: uneven splits round up)."""
    total = 0
    for leaf in jax.tree_util.tree_leaves(tree):
        shape = leaf.sharding.shard_shape(leaf.shape) if getattr(leaf, "sharding", None) is not None else leaf.shape
        total += math.prod(shape) * np.dtype(leaf.dtype).itemsize
    return total


def _count(tree: Any) -> int:
    return sum(math.prod(leaf.shape) for leaf in jax.tree_util.tree_leaves(tree))


def topology_devices(platform: str, n: int) -> tuple[list, str] | None:
    """Compile-only devices of a real TPU/GPU topology, when this JAX has the platform's plugin."""
    from jax.experimental import topologies

    try:
        if platform == "tpu":
            side = int(math.isqrt(n))
            name = f"{TPU_TOPOLOGY_PREFIX}:{side}x{n // side}" if side * (n // side) == n else f"{TPU_TOPOLOGY_PREFIX}:{n}"
            devices = topologies.get_topology_desc(name, "tpu").devices
        else:
            devices = topologies.get_topology_desc("", "cuda").devices
    except Exception:  # noqa: BLE001 - no plugin: RuntimeError, NotImplementedError, ...
        return None
    if len(devices) != n:
        return None
    return list(devices), f"{platform.upper()} compile-only topology ({len(devices)} devices)"


def plan_run(mesh_spec: str, platform: str, hbm_gib: float | None, devices: Sequence[Any] | None = None,
             compiled_for: str | None = None) -> PlanReport:
    """Lower and compile the gin-configured train step (gin must already be parsed) on `devices`
    (default: this process's devices) for mesh `mesh_spec`; nothing is allocated."""
    from jaxlm.sharding import MESH_AXES
    from jaxlm.train.steps import TrainStep

    devices = list(jax.devices() if devices is None else devices)
    shape = resolve_mesh(mesh_spec, len(devices))
    n = math.prod(shape.values())
    if n > len(devices):
        raise UsageError(f"--mesh {mesh_spec!r} needs {n} devices, this process has {len(devices)}")
    mesh = jax.make_mesh(tuple(shape[a] for a in MESH_AXES), MESH_AXES,
                         axis_types=(jax.sharding.AxisType.Auto,) * len(MESH_AXES), devices=devices[:n])
    objective = _gin_value("train.objective")
    optimizer = _gin_value("train.optimizer")
    if objective is None or optimizer is None:
        raise ConfigError("train.objective and train.optimizer must be bound in the gin files")
    microbatches = _gin_value("train.microbatches", 1)
    compute_dtype = _gin_value("train.compute_dtype", "float32")
    step = TrainStep(objective, optimizer, mesh, microbatches, compute_dtype, _gin_value("train.param_dtype"))
    state, frozen = step.abstract_state(), step.abstract_frozen()
    batch_shapes = abstract_batch(_gin_value("train.data"))
    global_rows = next(iter(batch_shapes.values())).shape[0]
    if global_rows % microbatches:
        raise ConfigError(f"batch size {global_rows} is not divisible by train.microbatches={microbatches}")
    shardings = step.batch_sharding(batch_shapes)
    batch = {k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=shardings[k]) for k, v in batch_shapes.items()}
    compiled = step.lower(state, frozen, batch).compile()
    memory = compiled.memory_analysis()
    cost = compiled.cost_analysis()
    cost = (cost[0] if isinstance(cost, (list, tuple)) and cost else cost) or {}
    return PlanReport(
        platform=platform,
        compiled_for=compiled_for or f"XLA:{devices[0].platform.upper()}, {n} devices",
        mesh=shape,
        num_devices=n,
        batch_shapes={k: list(v.shape) for k, v in batch.items()},
        param_count=_count(state.params),
        frozen_param_count=_count(frozen),
        param_bytes=_shard_bytes(state.params),
        frozen_bytes=_shard_bytes(frozen),
        optimizer_bytes=_shard_bytes(state.opt_state),
        batch_bytes=_shard_bytes(batch),
        argument_bytes=int(getattr(memory, "argument_size_in_bytes", 0)),
        output_bytes=int(getattr(memory, "output_size_in_bytes", 0)),
        alias_bytes=int(getattr(memory, "alias_size_in_bytes", 0)),
        temp_bytes=int(getattr(memory, "temp_size_in_bytes", 0)),
        generated_code_bytes=int(getattr(memory, "generated_code_size_in_bytes", 0)),
        flops_per_device=float(cost.get("flops", 0.0)),
        hbm_gib=hbm_gib,
    )
