"""Checkpoints of a training run: the TrainState pytree (params, optimizer state, step, rng) plus the
data iterator's state (JSON), one orbax step directory per save.

Why orbax's CheckpointManager: saves are asynchronous (training continues while arrays are written),
every process writes only its own shards, a restore lands directly in the shardings of the target
`abstract_state` (so a checkpoint written on one mesh restores onto another), and a step becomes
visible only by an atomic rename of its tmp directory, so a save killed midway leaves nothing
`all_steps` reports. What orbax does not do is fall back when the newest step is damaged (a
truncated or deleted file: a full disk, a bad copy): `restore` validates and tries steps newest
first, warning about each one it skips and moving it aside to `<directory>.corrupt/<step>` (orbax
never rewrites a step that exists, so a damaged step left in place would block every later save of
that step). A save that runs out of disk space is one `CheckpointError`, not orbax's tracebacks.
"""

from __future__ import annotations

import logging
import os
import shutil
import warnings
from pathlib import Path
from typing import Any

import jax
import orbax.checkpoint as ocp
from etils import epath

from jaxlm.checkpoints.hf import CheckpointError
from jaxlm.errors import DiskFullError, is_disk_full

log = logging.getLogger(__name__)


class _NoDiskFullTracebacks(logging.Filter):
    """orbax logs a failed background save with its traceback (absl ERROR) before the error reaches
    `save`/`wait`; for a full disk `_disk_errors` turns it into one DiskFullError, so the log is dropped."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not (record.exc_info and is_disk_full(record.exc_info[1]))


logging.getLogger("absl").addFilter(_NoDiskFullTracebacks())

STATE, DATA = "state", "data_state"
# Files a committed step directory must hold; a step missing one is incomplete (a partial copy).
_REQUIRED = ("_CHECKPOINT_METADATA", f"{STATE}/_METADATA", f"{DATA}/metadata")


class CorruptCheckpointWarning(UserWarning):
    """A checkpoint step could not be read and an earlier step was used instead."""


class TrainCheckpointer:
    """Saves and restores (TrainState, data_state) under `directory/<step>/`.

    Keeps the `keep_last` newest steps, plus every step divisible by `keep_every` when set.
    """

    def __init__(self, directory: str | os.PathLike, *, keep_last: int = 3, keep_every: int | None = None,
                 async_save: bool = True, read_only: bool = False) -> None:
        """`read_only`: open to restore only (no directory created, unfinished saves of a run still
        writing are left alone)."""
        if keep_last < 1:
            raise CheckpointError(f"TrainCheckpointer keep_last={keep_last}: must be >= 1 (the newest step is needed to resume)")
        if keep_every is not None and keep_every < 1:
            raise CheckpointError(f"TrainCheckpointer keep_every={keep_every}: must be >= 1 or None")
        # local paths and gs:// buckets (TPU pods) alike
        self.directory = epath.Path(directory) if "://" in str(directory) else epath.Path(Path(directory).absolute())
        options = ocp.CheckpointManagerOptions(
            max_to_keep=keep_last, keep_period=keep_every, enable_async_checkpointing=async_save, create=not read_only,
            cleanup_tmp_directories=not read_only,  # leftovers of saves killed midway (never listed as steps)
        )
        self.read_only = read_only
        self._manager = ocp.CheckpointManager(self.directory, options=options, item_names=(STATE, DATA))

    # ---------------------------------------------------------------- queries
    def all_steps(self) -> list[int]:
        """Committed steps, oldest first (tmp directories of unfinished saves are never listed)."""
        self._manager.reload()
        return sorted(self._manager.all_steps())

    def _step_problem(self, step: int) -> str | None:
        """Why a committed step cannot be restored (a missing or empty file), or None if it looks whole.
        Cheap (no array is read); damage inside a file is caught when `restore` reads it."""
        step_dir = self.directory / str(step)
        for name in _REQUIRED:
            if not (step_dir / name).exists():
                return f"{step_dir / name} is missing"
        if "://" not in str(step_dir):
            for root, _, files in os.walk(step_dir):
                for name in files:
                    if os.path.getsize(os.path.join(root, name)) == 0:
                        return f"{os.path.join(root, name)} is empty"
        return None

    def latest_step(self) -> int | None:
        """The newest step that is committed and whose files look whole (None: nothing to resume)."""
        for step in reversed(self.all_steps()):
            if self._step_problem(step) is None:
                return step
        return None

    # ---------------------------------------------------------------- save
    def save(self, step: int, state: Any, data_state: dict, *, force: bool = False) -> None:
        """Start writing `state` and `data_state` as `step` (returns once the arrays are copied off
        the devices; `wait()` blocks until the step is committed). Call on every process.

        Raises:
          DiskFullError: the disk is full (this save, or an earlier asynchronous one, failed).
        """
        self._check_free_space(step, state)
        with _disk_errors(self.directory, step):
            self._manager.save(
                int(step),
                args=ocp.args.Composite(**{STATE: ocp.args.StandardSave(state), DATA: ocp.args.JsonSave(dict(data_state))}),
                force=force,
            )

    def _check_free_space(self, step: int, state: Any) -> None:
        """DiskFullError before orbax starts a write that cannot fit (single process: the arrays' bytes
        against the filesystem's free space). Caught here, a full disk never reaches orbax's background
        thread, whose failure leaves C++-printed tracebacks behind; a disk filled by someone else during
        the write is still caught by `_disk_errors`."""
        if jax.process_count() != 1:
            return  # each host writes its own shards, maybe to its own disk: no single budget to check
        need = sum(int(getattr(leaf, "nbytes", 0)) for leaf in jax.tree_util.tree_leaves(state)) + 2**20  # + metadata
        directory = Path(self.directory)
        probe = next((p for p in (directory, *directory.parents) if p.exists()), directory)
        free = shutil.disk_usage(probe).free
        if need > free:
            raise DiskFullError(f"{self.directory}: disk full: step {step} needs {need / 2**20:.1f} MiB, "
                                f"{free / 2**20:.1f} MiB free; free space and rerun: training resumes from the "
                                "last complete checkpoint")

    # ---------------------------------------------------------------- restore
    def restore(self, abstract_state: Any, step: int | None = None) -> tuple[Any, dict, int] | None:
        """(state, data_state, step) placed in `abstract_state`'s shardings (ShapeDtypeStructs with
        `.sharding`; any mesh), or None when there is no checkpoint.

        With `step=None` the newest step that reads back is used: a damaged step is skipped with a
        `CorruptCheckpointWarning` naming it. An explicit `step` that cannot be read raises."""
        self.wait()
        steps = self.all_steps()
        if step is not None:
            if step not in steps:
                raise CheckpointError(f"{self.directory}: no checkpoint for step {step} (have {steps})")
            problem = self._step_problem(step)
            if problem:
                raise CheckpointError(f"{self.directory} step {step}: {problem}")
            try:
                return self._restore_step(abstract_state, step)
            except Exception as e:  # noqa: BLE001 - orbax/tensorstore raise many types for bad files
                raise CheckpointError(f"{self.directory} step {step}: unreadable ({_one_line(e)})") from e
        for candidate in reversed(steps):
            problem = self._step_problem(candidate)
            if problem is None:
                try:
                    return self._restore_step(abstract_state, candidate)
                except LayoutMismatch:
                    raise  # another model/optimizer wrote it: a config change, not damage; never moved aside
                except Exception as e:  # noqa: BLE001
                    text = str(e).lower()
                    if "structure" in text or "stored shape" in text:  # orbax: the saved tree/shapes differ
                        raise LayoutMismatch(f"{self.directory} step {candidate}: written by a run with another "
                                             f"model/optimizer layout ({_one_line(e)}); use a new --workdir or "
                                             "the run's own config") from None
                    problem = f"unreadable ({_one_line(e)})"
            moved = self._quarantine(candidate)
            message = (f"checkpoint step {candidate} in {self.directory} is corrupt or incomplete: {problem}; "
                       + (f"moved to {moved}; " if moved else "") + "falling back to the previous step")
            log.warning(message)
            warnings.warn(message, CorruptCheckpointWarning, stacklevel=2)
        if steps:
            message = f"no readable checkpoint in {self.directory}: starting from step 0"
            log.warning(message)
            warnings.warn(message, CorruptCheckpointWarning, stacklevel=2)
        return None

    def _quarantine(self, step: int) -> Path | None:
        """Move a damaged step to `<directory>.corrupt/<step>[.N]` so that a later save can write the step
        again (orbax skips a step already on disk); None when left in place (read-only, remote, or not
        process 0: one process moves it)."""
        if self.read_only or "://" in str(self.directory) or jax.process_index() != 0:
            return None
        source = Path(str(self.directory)) / str(step)
        target_root = Path(f"{self.directory}.corrupt")
        target_root.mkdir(parents=True, exist_ok=True)
        target, n = target_root / str(step), 1
        while target.exists():
            target, n = target_root / f"{step}.{n}", n + 1
        shutil.move(str(source), str(target))
        self._manager.reload()
        return target

    def _restore_step(self, abstract_state: Any, step: int) -> tuple[Any, dict, int]:
        restored = self._manager.restore(
            step, args=ocp.args.Composite(**{STATE: ocp.args.StandardRestore(abstract_state), DATA: ocp.args.JsonRestore()})
        )
        state = restored[STATE]
        _check_shapes(abstract_state, state, self.directory / str(step))
        return state, dict(restored[DATA] or {}), step

    # ---------------------------------------------------------------- lifecycle
    def wait(self) -> None:
        """Block until every started save is committed (and old steps are pruned).

        Raises:
          DiskFullError: an asynchronous save ran out of disk space.
        """
        with _disk_errors(self.directory, None):
            self._manager.wait_until_finished()

    def close(self) -> None:
        self._manager.close()

    def __enter__(self) -> "TrainCheckpointer":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class LayoutMismatch(CheckpointError):
    """A readable checkpoint written by another model or optimizer layout (a changed config): refused
    loudly, never quarantined as damage."""


def _check_shapes(abstract: Any, restored: Any, where: Path) -> None:
    """A checkpoint of a different model must fail loudly, not restore into mismatched arrays."""
    want = jax.tree_util.tree_leaves(abstract)
    got = jax.tree_util.tree_leaves(restored)
    hint = "; use a new --workdir or the run's own config"
    if len(want) != len(got):
        raise LayoutMismatch(f"{where}: {len(got)} arrays in the checkpoint, the run expects {len(want)}{hint}")
    for w, g in zip(want, got):
        if tuple(w.shape) != tuple(g.shape):
            raise LayoutMismatch(f"{where}: array of shape {tuple(g.shape)} where the run expects "
                                 f"{tuple(w.shape)}{hint}")


class _disk_errors:
    """Turns a full disk (quota, read-only filesystem) during a checkpoint write into one DiskFullError."""

    def __init__(self, directory: Any, step: int | None) -> None:
        self.directory, self.step = directory, step

    def __enter__(self) -> None:
        return None

    def __exit__(self, kind: Any, e: BaseException | None, tb: Any) -> bool:
        if e is not None and not isinstance(e, DiskFullError) and is_disk_full(e):
            which = f"step {self.step}" if self.step is not None else "a checkpoint"
            raise DiskFullError(f"{self.directory}: disk full (or read-only) while writing {which}; free space "
                                "and rerun: training resumes from the last complete checkpoint") from None
        return False


def _one_line(e: BaseException) -> str:
    text = " ".join(str(e).split())
    return f"{type(e).__name__}: {text[:300]}"
