"""Optimizers: AdamW or Adafactor behind warmup + cosine/linear/constant decay and global-norm clipping.

The learning rate is injected as a hyperparameter (`optax.inject_hyperparams`), so the value used by
each update sits in the optimizer state and the train step can log it without re-deriving the
schedule. Weight decay is masked to matrices (norm scales and biases are not decayed). Only the
trainable pytree ever reaches the optimizer, so frozen params get no state at all; `trainable_mask`
additionally freezes leaves inside the trainable tree with `optax.set_to_zero` (no state either).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from typing import Any

import gin
import jax
import optax

from jaxlm.errors import ConfigError

SCHEDULES = ("cosine", "linear", "constant")
OPTIMIZERS = ("adamw", "adafactor")


def make_schedule(
    learning_rate: float, schedule: str, warmup_steps: int, total_steps: int, final_fraction: float = 0.1
) -> optax.Schedule:
    """Linear warmup from 0 to `learning_rate`, then cosine/linear decay to `final_fraction` of it, or constant."""
    if schedule not in SCHEDULES:
        raise ConfigError(f"make_optimizer.schedule={schedule!r}: expected one of {SCHEDULES}")
    if warmup_steps < 0 or total_steps <= 0:
        raise ConfigError(f"make_optimizer: warmup_steps={warmup_steps} must be >= 0 and total_steps={total_steps} > 0")
    decay_steps = max(total_steps - warmup_steps, 1)
    end = learning_rate * final_fraction
    if schedule == "cosine":
        decay = optax.cosine_decay_schedule(learning_rate, decay_steps, alpha=final_fraction)
    elif schedule == "linear":
        decay = optax.linear_schedule(learning_rate, end, decay_steps)
    else:
        decay = optax.constant_schedule(learning_rate)
    if warmup_steps == 0:
        return decay
    warmup = optax.linear_schedule(0.0, learning_rate, warmup_steps)
    return optax.join_schedules([warmup, decay], [warmup_steps])


def param_path(path: tuple) -> str:
    """'/'-joined names of a `jax.tree_util` key path, e.g. 'hypernet/block_0/query/kernel'."""
    return "/".join(str(getattr(k, "key", getattr(k, "idx", getattr(k, "name", k)))) for k in path)


def scale_by_path(multipliers: Mapping[str, float]) -> optax.GradientTransformation:
    """Multiply the update of every parameter whose path matches a regex (`re.search`, first match in
    order wins) by its factor: a per-group learning-rate multiplier, applied after the optimizer.

    Args:
      multipliers: {regex over `param_path`: factor > 0}.

    Returns:
      A stateless optax transformation.

    Raises:
      ConfigError (at `init`): a factor <= 0, a bad regex, or a regex matching no parameter.
    """
    compiled = []
    for pattern, factor in multipliers.items():
        try:
            compiled.append((re.compile(pattern), float(factor)))
        except re.error as e:
            raise ConfigError(f"make_optimizer.lr_multipliers: bad regex {pattern!r} ({e})") from None
        if float(factor) <= 0:
            raise ConfigError(f"make_optimizer.lr_multipliers[{pattern!r}] = {factor}: must be > 0")

    def factor_of(path: tuple) -> float:
        name = param_path(path)
        return next((f for rx, f in compiled if rx.search(name)), 1.0)

    def init(params: Any) -> optax.EmptyState:
        names = [param_path(p) for p, _ in jax.tree_util.tree_flatten_with_path(params)[0]]
        for rx, _ in compiled:
            if not any(rx.search(n) for n in names):
                raise ConfigError(f"make_optimizer.lr_multipliers: {rx.pattern!r} matches no trainable parameter "
                                  f"(e.g. {names[:3]})")
        return optax.EmptyState()

    def update(updates: Any, state: Any, params: Any = None) -> tuple[Any, Any]:
        del params
        scaled = jax.tree_util.tree_map_with_path(lambda p, u: u if factor_of(p) == 1.0 else u * factor_of(p), updates)
        return scaled, state

    return optax.GradientTransformation(init, update)


def decay_mask(params: Any) -> Any:
    """Weight decay only on leaves with >= 2 dims (kernels, embeddings, LoRA factors)."""
    return jax.tree_util.tree_map(lambda x: x.ndim >= 2, params)


@gin.configurable
def make_optimizer(
    name: str = "adamw",
    *,
    learning_rate: float = 1e-3,
    schedule: str = "cosine",
    warmup_steps: int = 0,
    total_steps: int = 1000,
    weight_decay: float = 0.0,
    clip_norm: float | None = 1.0,
    b1: float = 0.9,
    b2: float = 0.95,
    eps: float = 1e-8,
    final_fraction: float = 0.1,
    trainable_mask: Callable[[Any], Any] | None = None,
    lr_multipliers: Mapping[str, float] | None = None,
) -> optax.GradientTransformation:
    """The optimizer of a run; `learning_rate` is logged from `current_learning_rate(opt_state)`.

    `lr_multipliers` ({regex over the '/'-joined param path: factor}, see `scale_by_path`) gives
    parameter groups their own learning rate, e.g. `{'hypernet/.*_(a|b)_': 10.0}` for a hypernetwork's
    heads; a regex that matches nothing fails at init naming it. Setting or removing it changes the
    optimizer state's structure: decide before a run's first checkpoint (a resume would not restore)."""
    if name not in OPTIMIZERS:
        raise ConfigError(f"make_optimizer.name={name!r}: expected one of {OPTIMIZERS}")
    lr = make_schedule(learning_rate, schedule, warmup_steps, total_steps, final_fraction)
    by_path = scale_by_path(lr_multipliers) if lr_multipliers else None  # bad factors/regexes fail here

    def build(learning_rate):
        parts = [optax.clip_by_global_norm(clip_norm)] if clip_norm else []
        if name == "adamw":
            parts.append(optax.adamw(learning_rate, b1=b1, b2=b2, eps=eps, weight_decay=weight_decay, mask=decay_mask))
        else:
            # t5x defaults (decay_rate 0.8 is Adafactor's second-moment exponent; b1/b2 are AdamW's).
            parts.append(optax.adafactor(learning_rate, weight_decay_rate=weight_decay or None,
                                         weight_decay_mask=decay_mask))
        if by_path is not None:
            parts.append(by_path)
        return optax.chain(*parts)

    tx = optax.inject_hyperparams(build)(learning_rate=lr)
    if trainable_mask is None:
        return tx
    labels = lambda params: jax.tree_util.tree_map(lambda t: "train" if t else "freeze", trainable_mask(params))
    return optax.multi_transform({"train": tx, "freeze": optax.set_to_zero()}, labels)


def current_learning_rate(opt_state: Any) -> jax.Array | None:
    """The learning rate of the last update, found in an `inject_hyperparams` state anywhere in `opt_state`."""
    found = []

    def visit(node):
        if hasattr(node, "hyperparams") and "learning_rate" in getattr(node, "hyperparams", {}):
            found.append(node.hyperparams["learning_rate"])
            return True
        return False

    jax.tree_util.tree_map(lambda x: x, opt_state, is_leaf=visit)
    return found[0] if found else None
