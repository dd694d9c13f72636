"""Atomic file writes (a reader, or a resumed run, never sees half a file), local run directories,
and the task-data root.

The one helper behind every single-file cache and artefact (ICIL demo sets, embedding shards,
tokenized-task caches). Directory artefacts (HF exports, PEFT adapters) use the same temp-then-rename
idea in `jaxlm.checkpoints.hf.write_dir`.
"""

from __future__ import annotations

import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import IO, Callable

import gin

from jaxlm.errors import UsageError


def write_atomically(path: str | Path, write: Callable[[IO], None], *, binary: bool = False) -> Path:
    """Call `write(file)` on a unique temp file beside `path`, then rename it over `path`.

    A crash leaves either the old file or the new one, never a torn one; the temp file is removed on
    failure, and concurrent writers of the same path cannot clobber each other's temp files."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb" if binary else "w", **({} if binary else {"encoding": "utf-8"})) as f:
            write(f)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def write_dir_atomically(path: str | Path, fill: Callable[[Path], None]) -> Path:
    """Call `fill(tmp_dir)` on a fresh temp dir beside `path`, then move it into place (replacing an old
    `path` whole): a reader never sees a half-written artefact directory (adapters, hypernetworks)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    try:
        fill(tmp)
        if path.exists():
            shutil.rmtree(path)
        tmp.rename(path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return path


_SCHEME = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")


def local_dir(path: str | os.PathLike, flag: str) -> Path:
    """`path` as a local `Path`, refusing URL-style locations (gs://, s3://, hdfs://, ...).

    Run directories are written with plain file I/O (metrics, TensorBoard, configs, exports), so a
    `gs://bucket/run` would silently become the local folder `./gs:/bucket/run`; it is refused instead.
    A network filesystem mounted on every host is the supported shared location.

    Args:
      path: the directory as given.
      flag: the flag or field that gave it (named in the error), e.g. "--workdir".

    Returns:
      `Path(path)`.

    Raises:
      UsageError: `path` has a URL scheme.
    """
    text = os.fspath(path)
    match = _SCHEME.match(text)
    if match:
        raise UsageError(f"{flag} {text}: {match.group(0)} locations are not supported (run directories are "
                         f"local paths; mount the bucket, e.g. with gcsfuse, and pass the mount point)")
    return Path(text)


DATA_DIR_ENV = "JAXLM_DATA_DIR"
DEFAULT_DATA_DIR = "../shared/data"


@gin.configurable("data_root")
def data_root(directory: str | os.PathLike | None = None) -> Path:
    """The task-data root: the folder holding `superni/`, `bigbench/`, `bbh/` (and `icil_demos/`).

    One setting, first found wins:
      1. `directory`: the gin binding `data_root.directory`, which `--data_dir DIR` of the gin commands
         (train, eval, demo, plan) binds;
      2. the environment variable JAXLM_DATA_DIR;
      3. `../shared/data`, relative to the working directory (the layout beside this repository).
    A component's own `data_dir` binding (`eval_sweep.data_dir`, `tagi_data.data_dir`,
    `task_mixture.data_dir`) names its folder explicitly and bypasses the root; the shipped configs leave
    them unset, so they follow it. Readers accept the root or the source's own folder.

    Args:
      directory: the explicit root (gin-bound), or None.

    Returns:
      The root as a Path (it may not exist; readers report a missing folder by name).
    """
    if directory is not None:
        return Path(directory)
    return Path(os.environ.get(DATA_DIR_ENV) or DEFAULT_DATA_DIR)
