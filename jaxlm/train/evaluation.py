"""Evaluation during training: the objective's loss and metrics on a held-out batches source.

`train(eval_data=..., eval_every=N)` builds one `Evaluator` beside the train step. Every N steps (and
after the last step) it runs the objective's pure `loss` (no gradient, no update) on the first
`eval_batches` batches of `eval_data` -- the same batches every time: the iterator's initial state is
kept and restored before each pass -- and reports token-weighted means over them under `eval/`
("eval/loss", "eval/accuracy", and whatever else the objective's loss returns, e.g. TAGI's
"eval/loss_ce", "eval/loss_kl"), plus "eval/num_tokens" and "eval/batches". Any objective works (LM,
LoRA teachers, TAGI): the eval source only has to yield the features the objective's loss reads
(for TAGI a held-out-task `TagiBatches`, e.g. `tagi_data(part='test')` in a gin scope). Batches
whose rows do not split over the mesh's data devices are replicated (one process).

gin note: a scoped reference runs in its own scope, not nested in the caller's, so stage 2 of a
TAGI pipeline binds `stage2/train.eval_data = @eval/tagi_data` and then `eval/tagi_data.part = 'test'`
(not `stage2/eval/...`); unscoped `tagi_data` bindings (source, rules, lengths) apply to it too.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jax.sharding import NamedSharding

from jaxlm.errors import ConfigError
from jaxlm.features import BatchIterator
from jaxlm.train.steps import WEIGHTS, TrainStep

PREFIX = "eval/"


class Evaluator:
    """The objective's loss and metrics on a fixed set of eval batches, sharded like the train step.

    Args:
      step_fn: the run's `TrainStep` (its objective, mesh and shardings are reused).
      data: the eval batches source, called as `data(shard_index=, num_shards=)` (the same contract
        as `train.data`); its iterator must have `state()` / `restore()` (a `BatchIterator`).
      num_batches: batches per evaluation (fewer when the source runs out first).

    Raises:
      ConfigError: `num_batches` is not positive.
    """

    def __init__(self, step_fn: TrainStep, data: Callable[..., BatchIterator], num_batches: int) -> None:
        if num_batches <= 0:
            raise ConfigError(f"train.eval_batches must be positive, got {num_batches}")
        self.step_fn, self.num_batches = step_fn, num_batches
        self.iterator = data(shard_index=jax.process_index(), num_shards=jax.process_count())
        self._start = copy.deepcopy(self.iterator.state())
        self._jitted: dict[Any, Any] = {}

    def _eval_fn(self, params: Any, frozen: Any, batch: Mapping[str, jax.Array]) -> dict[str, jax.Array]:
        loss, aux = self.step_fn.objective.loss(params, frozen, batch, jax.random.PRNGKey(0))
        weight = jnp.sum(batch[WEIGHTS].astype(jnp.float32))
        sums = {k: jnp.asarray(v, jnp.float32) * weight for k, v in {"loss": loss, **aux}.items()}
        return {"sums": sums, "weight": weight}

    def _shardings(self, host: Mapping[str, np.ndarray]) -> dict[str, NamedSharding]:
        """The train step's batch shardings; on one process an array whose rows do not split over the
        mesh's (data, fsdp) devices is replicated instead (eval batches may be small: 2 held-out tasks).

        Raises:
          ConfigError: on several processes, a row count that does not split over the devices.
        """
        mesh = self.step_fn.mesh
        ways = mesh.shape["data"] * mesh.shape["fsdp"]
        out = self.step_fn.batch_sharding(host)
        for k, v in host.items():
            rows = np.shape(v)[0] * jax.process_count()
            if rows % ways:
                if jax.process_count() > 1:
                    raise ConfigError(f"train.eval_data: {k} has {rows} rows, not divisible by the mesh's "
                                      f"{ways} data x fsdp devices")
                out[k] = self.step_fn.replicated
        return out

    def _compiled(self, batch: Mapping[str, jax.Array]):
        key = tuple(sorted((k, tuple(v.shape), str(v.dtype)) for k, v in batch.items()))
        if key not in self._jitted:
            step_fn = self.step_fn
            self._jitted[key] = jax.jit(
                self._eval_fn,
                in_shardings=(step_fn.trainable_shardings, step_fn.frozen_shardings,
                              {k: v.sharding for k, v in batch.items()}),
                out_shardings=step_fn.replicated,
            )
        return self._jitted[key]

    def __call__(self, params: Any, frozen: Any) -> dict[str, float]:
        """One evaluation of `params` (the train state's trainable params) with `frozen`.

        Args:
          params: the trainable params (as in `TrainState.params`).
          frozen: the frozen params.

        Returns:
          {"eval/<metric>": token-weighted mean over the eval batches (float), "eval/num_tokens": loss
          tokens seen, "eval/batches": batches read}; each metric is the objective loss's (the loss
          itself as "eval/loss").

        Raises:
          ConfigError: the eval source yields no batch at all.
        """
        self.iterator.restore(self._start)
        totals: dict[str, float] = {}
        weight = 0.0
        batches = 0
        for _ in range(self.num_batches):
            try:
                host = next(self.iterator)
            except StopIteration:
                break
            batch = {k: jax.make_array_from_process_local_data(sharding, np.asarray(host[k]))
                     for k, sharding in self._shardings(host).items()}
            with jax.set_mesh(self.step_fn.mesh):
                out = jax.device_get(self._compiled(batch)(params, frozen, batch))
            for k, v in out["sums"].items():
                totals[k] = totals.get(k, 0.0) + float(v)
            weight += float(out["weight"])
            batches += 1
        if batches == 0:
            raise ConfigError("train.eval_data yielded no batch")
        scale = 1.0 / weight if weight > 0 else 0.0
        result = {PREFIX + k: float(np.float64(v) * scale) for k, v in totals.items()}
        result[PREFIX + "num_tokens"] = weight
        result[PREFIX + "batches"] = batches
        return result
