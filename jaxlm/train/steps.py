"""One jitted, sharded train step for any Objective.

Built once from (objective, optimizer, mesh, microbatches, compute_dtype). Params are created in
their shardings (`jax.eval_shape` -> logical axes -> NamedShardings -> `jax.jit(out_shardings=...)`),
the step is `jax.jit(in_shardings, out_shardings, donate_argnums=(0,))` under `jax.set_mesh`, the
train state is donated, and frozen params are passed beside it (never donated). Gradient
accumulation scans over microbatches; each microbatch's mean loss is weighted by its share of the
batch's loss tokens, so the result is the token-weighted mean over the whole batch, as without
accumulation. A non-finite loss or gradient leaves params and optimizer state untouched
(`metrics['finite']` says so); the loop then stops or skips by its NaN policy.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from jaxlm import sharding
from jaxlm.errors import ConfigError
from jaxlm.train.optim import current_learning_rate
from jaxlm.train.state import TrainState

PyTree = Any
WEIGHTS = "decoder_loss_weights"


def _key_names(path) -> tuple[str, ...]:
    return tuple(str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k)))) for k in path)


def opt_state_shardings(abstract_opt: PyTree, abstract_params: PyTree, param_shardings: PyTree, replicated) -> PyTree:
    """Optimizer-state leaves that mirror a param (same path suffix and shape: Adam moments) take its
    sharding; the rest (counts, Adafactor's factored rows/columns) are replicated."""
    by_path = {}
    flat_params = jax.tree_util.tree_flatten_with_path(abstract_params)[0]
    flat_shardings = jax.tree_util.tree_leaves(param_shardings, is_leaf=lambda x: isinstance(x, NamedSharding))
    for (path, leaf), sh in zip(flat_params, flat_shardings):
        by_path[_key_names(path)] = (tuple(leaf.shape), sh)

    def one(path, leaf):
        keys = _key_names(path)
        for start in range(len(keys)):
            hit = by_path.get(keys[start:])
            if hit is not None and hit[0] == tuple(leaf.shape):
                return hit[1]
        return replicated

    return jax.tree_util.tree_map_with_path(one, abstract_opt)


def split_microbatches(batch: Mapping[str, jax.Array], count: int) -> dict[str, jax.Array]:
    """(B, ...) -> (count, B / count, ...), microbatch i = rows i, i + count, ...: every device's
    contiguous block of the batch splits evenly, so no microbatch lives on a subset of devices."""

    def one(x):
        if x.shape[0] % count:
            raise ValueError(f"batch size {x.shape[0]} is not divisible by microbatches={count}")
        x = x.reshape((x.shape[0] // count, count) + x.shape[1:])
        return jnp.swapaxes(x, 0, 1)

    return {k: one(v) for k, v in batch.items()}


class TrainStep:
    """`step(state, frozen, batch) -> (state, metrics)`; see the module docstring.

    `compute_dtype` / `param_dtype` (when not None) replace the objective's activation / param dtype
    (`with_compute_dtype`, `with_param_dtype`); an objective without a param dtype refuses the latter
    (ConfigError).
    """

    def __init__(
        self,
        objective: Any,
        optimizer: optax.GradientTransformation,
        mesh: Mesh,
        microbatches: int = 1,
        compute_dtype: str | None = None,
        param_dtype: str | None = None,
    ) -> None:
        if compute_dtype is not None and hasattr(objective, "with_compute_dtype"):
            objective = objective.with_compute_dtype(compute_dtype)
        if param_dtype is not None:
            if not hasattr(objective, "with_param_dtype"):
                raise ConfigError(f"train.param_dtype={param_dtype!r}: {type(objective).__name__} has no param_dtype")
            objective = objective.with_param_dtype(param_dtype)
        if microbatches < 1:
            raise ValueError(f"microbatches must be >= 1, got {microbatches}")
        self.objective, self.optimizer, self.mesh, self.microbatches = objective, optimizer, mesh, microbatches
        self.replicated = NamedSharding(mesh, PartitionSpec())
        trainable_axes, frozen_axes = objective.logical_axes()
        abstract_trainable, abstract_frozen = jax.eval_shape(
            lambda rng, base: objective.init(rng) if base is None else objective.init(rng, base),
            jax.random.PRNGKey(0), self._pretrained_base(abstract=True))  # no weights read for shapes
        self.trainable_shardings = sharding.logical_sharding(trainable_axes, abstract_trainable, mesh)
        self.frozen_shardings = sharding.logical_sharding(frozen_axes, abstract_frozen, mesh)
        abstract_opt = jax.eval_shape(optimizer.init, abstract_trainable)
        self.state_shardings = TrainState(
            step=self.replicated,
            params=self.trainable_shardings,
            opt_state=opt_state_shardings(abstract_opt, abstract_trainable, self.trainable_shardings, self.replicated),
            rng=self.replicated,
        )
        self._abstract_state = TrainState(
            step=jax.ShapeDtypeStruct((), jnp.int32), params=abstract_trainable, opt_state=abstract_opt,
            rng=jax.ShapeDtypeStruct((2,), jnp.uint32),
        )
        self._abstract_frozen = abstract_frozen
        self._compiled: dict[Any, Any] = {}
        self.flops_per_step: float | None = None  # per device, from the last compiled step's cost analysis

    # ------------------------------------------------------------------ abstract views
    def abstract_state(self) -> TrainState:
        return _with_shardings(self._abstract_state, self.state_shardings)

    def abstract_frozen(self) -> PyTree:
        return _with_shardings(self._abstract_frozen, self.frozen_shardings)

    def batch_sharding(self, batch: Mapping[str, Any]) -> dict[str, NamedSharding]:
        return {k: sharding.batch_sharding(self.mesh, np.ndim(v) if not hasattr(v, "ndim") else v.ndim)
                for k, v in batch.items()}

    # ------------------------------------------------------------------ init
    def _init_fn(self, rng, base):
        rng_init, rng_state = jax.random.split(rng)
        trainable, frozen = self.objective.init(rng_init) if base is None else self.objective.init(rng_init, base)
        state = TrainState(step=jnp.zeros((), jnp.int32), params=trainable,
                           opt_state=self.optimizer.init(trainable), rng=rng_state)
        return state, frozen

    def _pretrained_base(self, **kwargs):
        """The objective's `pretrained_base(**kwargs)`, or None for an objective without one."""
        read = getattr(self.objective, "pretrained_base", None)
        return None if read is None else read(**kwargs)

    def _placed_base(self):
        """The frozen parts read from disk, in their shardings (never a constant inside a jit), each in
        buffers of its own, which the jitted init consumes (`donate_argnums`: the frozen params it
        returns reuse them, so the base never exists twice). The objective places each checkpoint
        tensor on the mesh as it reads it for this call (the whole base never exists on one host):
        those arrays are kept as they are; anything else (host arrays, device arrays a cache may
        still hold) is copied into its sharding."""
        base = self._pretrained_base(mesh=self.mesh)
        if base is None:
            return None
        axes = self.objective.base_logical_axes()

        def place(x, where):
            if isinstance(x, jax.Array) and x.sharding == where:
                return x
            return jax.device_put(x, where, may_alias=False)

        return jax.tree_util.tree_map(place, base, sharding.logical_sharding(axes, base, self.mesh))

    def init_state(self, rng: jax.Array) -> tuple[TrainState, PyTree]:
        """(TrainState, frozen) built directly in their shardings."""
        base = self._placed_base()
        with jax.set_mesh(self.mesh):
            fn = jax.jit(self._init_fn, out_shardings=(self.state_shardings, self.frozen_shardings), donate_argnums=(1,))
            return fn(rng, base)

    def init_frozen(self, rng: jax.Array) -> PyTree:
        """The frozen params alone (after a checkpoint restore: they are a function of the seed/weights)."""
        base = self._placed_base()
        with jax.set_mesh(self.mesh):
            fn = jax.jit(lambda r, b: self._init_fn(r, b)[1], out_shardings=self.frozen_shardings, donate_argnums=(1,))
            return fn(rng, base)

    # ------------------------------------------------------------------ the step
    def _loss_and_grads(self, params, frozen, batch, rng):
        denom = jnp.maximum(jnp.sum(batch[WEIGHTS].astype(jnp.float32)), 1e-9)

        def weighted(p, mb, r):
            loss, aux = self.objective.loss(p, frozen, mb, r)
            share = jnp.sum(mb[WEIGHTS].astype(jnp.float32)) / denom
            return loss * share, {k: v * share for k, v in aux.items()}

        grad_fn = jax.value_and_grad(weighted, has_aux=True)
        if self.microbatches == 1:
            (loss, aux), grads = grad_fn(params, batch, rng)
            return loss, aux, grads
        micro = split_microbatches(batch, self.microbatches)
        micro = self._constrain_microbatches(micro)
        rngs = jax.random.split(rng, self.microbatches)
        first = jax.tree_util.tree_map(lambda x: x[0], micro)
        aux_shape = jax.eval_shape(lambda: grad_fn(params, first, rngs[0])[0][1])
        carry0 = (
            jax.tree_util.tree_map(jnp.zeros_like, params),
            jnp.zeros((), jnp.float32),
            jax.tree_util.tree_map(lambda s: jnp.zeros(s.shape, s.dtype), aux_shape),
        )

        def body(carry, xs):
            grads_acc, loss_acc, aux_acc = carry
            (loss, aux), grads = grad_fn(params, *xs)
            add = lambda a, b: a + b
            return (jax.tree_util.tree_map(add, grads_acc, grads), loss_acc + loss,
                    jax.tree_util.tree_map(add, aux_acc, aux)), None

        (grads, loss, aux), _ = jax.lax.scan(body, carry0, (micro, rngs))
        return loss, aux, grads

    def _constrain_microbatches(self, micro):
        data_ways = self.mesh.shape["data"] * self.mesh.shape["fsdp"]

        def one(x):
            if x.shape[1] % data_ways:
                return x
            spec = sharding.logical_to_spec((None, "batch") + (None,) * (x.ndim - 2))
            return jax.lax.with_sharding_constraint(x, NamedSharding(self.mesh, spec))

        return {k: one(v) for k, v in micro.items()}

    def _step_fn(self, state: TrainState, frozen: PyTree, batch: Mapping[str, jax.Array]):
        rng, step_rng = jax.random.split(state.rng)
        loss, aux, grads = self._loss_and_grads(state.params, frozen, batch, step_rng)
        grad_norm = optax.tree.norm(grads)
        updates, new_opt = self.optimizer.update(grads, state.opt_state, state.params)
        new_params = optax.apply_updates(state.params, updates)
        finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
        keep = lambda new, old: jax.tree_util.tree_map(lambda n, o: jnp.where(finite, n, o), new, old)
        lr = current_learning_rate(new_opt)
        new_state = TrainState(step=state.step + 1, params=keep(new_params, state.params),
                               opt_state=keep(new_opt, state.opt_state), rng=rng)
        metrics = {"loss": loss, "grad_norm": grad_norm, "finite": finite,
                   "num_tokens": jnp.sum(batch[WEIGHTS].astype(jnp.float32)), **aux}
        if lr is not None:
            metrics["learning_rate"] = jnp.asarray(lr, jnp.float32)
        return new_state, metrics

    def _jitted(self, batch_shardings: dict[str, NamedSharding]):
        return jax.jit(
            self._step_fn,
            in_shardings=(self.state_shardings, self.frozen_shardings, batch_shardings),
            out_shardings=(self.state_shardings, self.replicated),
            donate_argnums=(0,),
        )

    def lower(self, abstract_state: TrainState, abstract_frozen: PyTree, abstract_batch: Mapping[str, Any]):
        """The lowered step for abstract inputs (ShapeDtypeStructs): AOT compile, memory/cost analysis."""
        with jax.set_mesh(self.mesh):
            return self._jitted(self.batch_sharding(abstract_batch)).lower(abstract_state, abstract_frozen, dict(abstract_batch))

    def global_batch(self, batch: Mapping[str, np.ndarray]) -> dict[str, jax.Array]:
        """This process's numpy rows -> global jax.Arrays sharded over (data, fsdp)."""
        shardings = self.batch_sharding(batch)
        return {k: jax.make_array_from_process_local_data(shardings[k], np.asarray(v)) for k, v in batch.items()}

    def compiled(self, state: TrainState, frozen: PyTree, batch: Mapping[str, jax.Array]):
        """The compiled step for this batch structure (compiled once per shapes), with its FLOPs recorded."""
        key = tuple(sorted((k, tuple(v.shape), str(v.dtype)) for k, v in batch.items()))
        if key not in self._compiled:
            lowered = self.lower(state, frozen, batch)
            with jax.set_mesh(self.mesh):
                self._compiled[key] = lowered.compile()
            cost = self._compiled[key].cost_analysis()
            cost = cost[0] if isinstance(cost, (list, tuple)) else cost
            self.flops_per_step = float(cost.get("flops", 0.0)) if cost else None
        return self._compiled[key]

    def __call__(self, state: TrainState, frozen: PyTree, batch: Mapping[str, Any]) -> tuple[TrainState, dict]:
        if not all(isinstance(v, jax.Array) for v in batch.values()):
            batch = self.global_batch(batch)
        fn = self.compiled(state, frozen, batch)
        with jax.set_mesh(self.mesh):
            return fn(state, frozen, batch)


def _with_shardings(abstract: PyTree, shardings: PyTree) -> PyTree:
    return jax.tree_util.tree_map(
        lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings
    )
