"""The training loop: build the step, restore or init, iterate, log, checkpoint, export.

Exact resume: params, optimizer state, step and rng (the TrainState) plus the data iterator's state
go into every checkpoint (T2's `TrainCheckpointer`, orbax); a run killed at any moment restarts from
the last complete checkpoint, truncates metrics.jsonl to it, and replays the same batches through
the same compiled step, so its losses equal an uninterrupted run's bit for bit on CPU.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import gin
import jax
import numpy as np
import optax

from jaxlm.errors import ConfigError, JaxlmError
from jaxlm.features import BatchIterator
from jaxlm.files import local_dir
from jaxlm.train import metrics as metrics_lib
from jaxlm.sharding import make_mesh
from jaxlm.train.steps import TrainStep

log = logging.getLogger(__name__)
NAN_POLICIES = ("stop", "skip")


class NonFiniteLossError(JaxlmError):
    """Loss or gradient became NaN/inf under nan_policy='stop' (names the step and the batch)."""


def _train_step(objective: Any, optimizer: optax.GradientTransformation, mesh_shape: str, microbatches: int,
                compute_dtype: str, param_dtype: str | None = None) -> TrainStep:
    """The sharded step `train` runs and `restore_trained` restores into (one construction for both)."""
    try:
        mesh = make_mesh(mesh_shape)
    except ValueError as e:
        raise ConfigError(f"train.mesh_shape={mesh_shape!r}: {e}") from None
    return TrainStep(objective, optimizer, mesh, microbatches, compute_dtype, param_dtype)


@gin.configurable(denylist=["workdir"])
def train(
    *,
    workdir: str | Path,
    objective: Any,
    optimizer: optax.GradientTransformation,
    data: Callable[..., BatchIterator],
    num_steps: int,
    mesh_shape: str = "data=-1",
    microbatches: int = 1,
    compute_dtype: str = "float32",
    param_dtype: str | None = None,
    log_every: int = 1,
    checkpoint_every: int | None = None,
    keep_last: int = 3,
    keep_every: int | None = None,
    nan_policy: str = "stop",
    seed: int = 0,
    async_checkpoint: bool = True,
    progress: bool | None = None,
    eval_data: Callable[..., BatchIterator] | None = None,
    eval_every: int | None = None,
    eval_batches: int = 8,
    profile_steps: tuple[int, int] | None = None,
) -> dict[str, Any]:
    """Train `objective` for `num_steps` steps on batches from `data(shard_index=, num_shards=)`.

    Evaluation during training: with `eval_data` (a batches source like `data`, e.g. a held-out task
    mixture or `@eval/tagi_data` with `part='test'` (held-out rules)) and `eval_every` = N, the objective's loss and
    metrics on the first `eval_batches` batches of `eval_data` (the same ones each time) are written
    every N steps and after the last step, as `eval/<metric>` lines of metrics.jsonl and TensorBoard
    scalars (`jaxlm.train.evaluation`). `profile_steps` = (start, stop) traces the steps numbered
    start .. stop - 1 (numbered as in metrics.jsonl, from 1) with `jax.profiler` into
    `workdir/profile/` (open with TensorBoard's profile plugin or xprof). `compute_dtype` is the
    activations' dtype; `param_dtype` (None: the objective's own) the dtype params are held and
    trained in, a pretrained base read into it tensor by tensor (`TrainStep`).

    Returns {"step", "loss" (last), "losses" ({step: loss} of this invocation), "skipped_steps",
    "resumed_from", "workdir", "evals" ({step: eval metrics} of this invocation)}.

    Raises:
      ConfigError: a field is out of range, `eval_every` without `eval_data` or the reverse, or
        `profile_steps` is not 1 <= start < stop <= num_steps + 1.
    """
    if nan_policy not in NAN_POLICIES:
        raise ConfigError(f"train.nan_policy={nan_policy!r}: expected one of {NAN_POLICIES}")
    for name, value in (("num_steps", num_steps), ("log_every", log_every), ("microbatches", microbatches)):
        if value <= 0:
            raise ConfigError(f"train.{name} must be positive, got {value}")
    if (eval_data is None) != (eval_every is None):
        raise ConfigError("train.eval_every and train.eval_data are set together (got "
                          f"eval_every={eval_every!r}, eval_data={'set' if eval_data is not None else None})")
    if eval_every is not None and eval_every <= 0:
        raise ConfigError(f"train.eval_every must be positive, got {eval_every}")
    profile = _profile_range(profile_steps, num_steps)
    workdir = local_dir(workdir, "--workdir")
    workdir.mkdir(parents=True, exist_ok=True)
    step_fn = _train_step(objective, optimizer, mesh_shape, microbatches, compute_dtype, param_dtype)
    iterator = data(shard_index=jax.process_index(), num_shards=jax.process_count())
    rng = jax.random.PRNGKey(seed)
    if jax.process_index() == 0:
        (workdir / "config.gin").write_text(gin.operative_config_str())

    checkpointer = None
    if checkpoint_every:
        from jaxlm.checkpoints.train_state import TrainCheckpointer

        checkpointer = TrainCheckpointer(workdir / "checkpoints", keep_last=keep_last, keep_every=keep_every,
                                         async_save=async_checkpoint)
    restored = checkpointer.restore(step_fn.abstract_state()) if checkpointer is not None else None
    if restored is not None:
        state, data_state, start = restored
        iterator.restore(data_state)
        frozen = step_fn.init_frozen(rng)
        log.info("resumed from step %d", start)
    else:
        state, frozen = step_fn.init_state(rng)
        start = 0

    logger = metrics_lib.MetricsLogger(workdir, start_step=start, total_steps=num_steps, progress=progress)
    evaluator = None
    if eval_data is not None:
        from jaxlm.train.evaluation import Evaluator

        evaluator = Evaluator(step_fn, eval_data, eval_batches)
    if jax.process_index() == 0:
        config_text = gin.operative_config_str()
        logger.log_run(config_text, metrics_lib.gin_hparams(config_text),
                       ("train/loss", "eval/loss") if evaluator is not None else ("train/loss",))
    evals: dict[int, dict[str, float]] = {}
    tracing = False
    peak = metrics_lib.peak_flops_per_device()
    throughput = metrics_lib.Throughput()
    losses: dict[int, float] = {}
    skipped = 0
    last_loss = None
    pending: tuple[int, Any, Any] | None = None  # (step, device metrics, batch id) not yet read on the host
    watch = getattr(step_fn.objective, "metric_warnings", lambda metrics, peaks: {})  # objective-specific alarms
    warned: set[str] = set()
    peaks: dict[str, float] = {}  # each logged metric's maximum so far (what "collapsed" is measured against)

    def record(done: int, step_metrics: Any, batch_id: Any) -> None:
        """Read one step's metrics on the host: count, stop or skip on non-finite, log."""
        nonlocal skipped, last_loss
        values = jax.device_get(step_metrics)
        finite = bool(values.pop("finite"))
        last_loss = float(values["loss"])
        losses[done] = last_loss
        throughput.add(float(values["num_tokens"]))
        if not finite:
            if nan_policy == "stop":
                raise NonFiniteLossError(
                    f"non-finite loss {last_loss} or grad norm {float(values['grad_norm'])} at step {done} "
                    f"(batch: data state {batch_id}); update not applied. Lower the learning rate, "
                    f"check the data, or set train.nan_policy='skip'"
                )
            skipped += 1
            log.warning("step %d: non-finite loss, update skipped (%d so far; batch %s)", done, skipped, batch_id)
        if done % log_every == 0 or done == num_steps or not finite:
            out = {k: float(v) for k, v in values.items()}
            for key, value in out.items():
                peaks[key] = max(value, peaks.get(key, value))
            for kind, message in watch(out, peaks).items():
                if kind not in warned:  # each kind once per run: a line to act on, not a flood
                    warned.add(kind)
                    log.warning("step %d: %s", done, message)
            out.update(throughput.report(step_fn.flops_per_step, peak))
            out["skipped_steps"] = skipped
            if not finite:
                out["nonfinite"] = True
            logger.log(done, out)

    try:
        for step in range(start, num_steps):
            batch_id = iterator.state()
            try:
                host_batch = next(iterator)
            except StopIteration:
                log.warning("data ran out after %d steps", step)
                break
            batch = step_fn.global_batch(host_batch)
            if step == start:
                step_fn.compiled(state, frozen, batch)  # compile outside the timed interval
                throughput.reset()
            done = step + 1
            if profile is not None and done == profile[0]:
                jax.profiler.start_trace(str(workdir / PROFILE_DIR))
                tracing = True
            state, step_metrics = step_fn(state, frozen, batch)
            if tracing and done == profile[1] - 1:
                jax.block_until_ready(state)
                jax.profiler.stop_trace()
                tracing = False
                log.info("profile of steps %d-%d written to %s", profile[0], done, workdir / PROFILE_DIR)
            # Read the previous step's metrics only now, with this step already queued on the device,
            # so the host never stalls the accelerator between steps.
            if pending is not None:
                record(*pending)
            pending = (done, step_metrics, batch_id)
            if evaluator is not None and (done % eval_every == 0 or done == num_steps):
                record(*pending)  # the step's train line comes before its eval line
                pending = None
                evals[done] = evaluator(state.params, frozen)
                logger.log(done, evals[done])
            if checkpointer is not None and (done % checkpoint_every == 0 or done == num_steps):
                if pending is not None:  # an eval at this step already reported it
                    record(*pending)  # a checkpoint is never written past an unreported (maybe non-finite) step
                pending = None
                checkpointer.save(done, state, iterator.state())
        if pending is not None:
            record(*pending)
            pending = None
        export_dir = getattr(step_fn.objective, "end_of_run_export", None)
        if export_dir and jax.process_index() == 0:
            step_fn.objective.export(workdir / export_dir, state.params, frozen)
    finally:
        if tracing:
            jax.profiler.stop_trace()
        logger.close()
        if checkpointer is not None:
            checkpointer.wait()
            checkpointer.close()
    return {
        "step": int(np.asarray(jax.device_get(state.step))),
        "loss": last_loss,
        "losses": losses,
        "skipped_steps": skipped,
        "resumed_from": start if restored is not None else None,
        "workdir": str(workdir),
        "evals": evals,
        "state": state,
        "frozen": frozen,
    }


PROFILE_DIR = "profile"


def _profile_range(profile_steps: Any, num_steps: int) -> tuple[int, int] | None:
    """`train.profile_steps` checked: None, or (start, stop) with 1 <= start < stop <= num_steps + 1."""
    if profile_steps is None:
        return None
    try:
        start, stop = (int(x) for x in profile_steps)
    except (TypeError, ValueError):
        raise ConfigError(f"train.profile_steps={profile_steps!r}: expected (start, stop), two step numbers") from None
    if not 1 <= start < stop <= num_steps + 1:
        raise ConfigError(f"train.profile_steps={profile_steps!r}: expected 1 <= start < stop <= num_steps + 1 "
                          f"= {num_steps + 1} (traces steps start .. stop - 1)")
    return start, stop


def restore_trained(
    workdir: str | Path,
    *,
    objective: Any,
    optimizer: optax.GradientTransformation,
    mesh_shape: str = "data=-1",
    microbatches: int = 1,
    compute_dtype: str = "float32",
    param_dtype: str | None = None,
    seed: int = 0,
    step: int | None = None,
) -> tuple[Any, Any, int]:
    """The trained state of a `train` run directory, as `train` itself would resume it.

    Args:
      workdir: the run directory (its `checkpoints/` are read).
      objective, optimizer, mesh_shape, microbatches, compute_dtype, param_dtype, seed: the run's `train` arguments
        (the frozen params of a random-init base are a function of `seed`).
      step: the checkpoint step (default: the newest one that reads back).

    Returns:
      (TrainState, frozen params, the restored step).

    Raises:
      CheckpointError: no checkpoint in `workdir`, or `step` is missing or unreadable.
    """
    from jaxlm.checkpoints.hf import CheckpointError
    from jaxlm.checkpoints.train_state import TrainCheckpointer

    directory = Path(workdir) / "checkpoints"
    if not directory.is_dir():
        raise CheckpointError(f"{directory}: missing (a run saves checkpoints when train.checkpoint_every is set)")
    step_fn = _train_step(objective, optimizer, mesh_shape, microbatches, compute_dtype, param_dtype)
    with TrainCheckpointer(directory, async_save=False, read_only=True) as checkpointer:
        restored = checkpointer.restore(step_fn.abstract_state(), step=step)
    if restored is None:
        raise CheckpointError(f"{directory}: no readable checkpoint")
    state, _, at = restored
    return state, step_fn.init_frozen(jax.random.PRNGKey(seed)), at
