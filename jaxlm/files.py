"""Files and directories a run writes: atomic writes (a reader, or a resumed run, never sees half a
file), local run directories (`local_dir`: URL-style paths refused), output directories checked before
any compute (`writable_dir`), the exclusive lock of a run directory (`RunLock`: two processes never
write one workdir), the task-data root (`data_root`) and the per-user caches (`user_cache_dir`).

`write_atomically` is the one helper behind every single-file cache and artefact (ICIL demo sets,
embedding shards, tokenized-task caches). Directory artefacts (HF exports, PEFT adapters) use the same
temp-then-rename idea in `write_dir_atomically`.
"""

from __future__ import annotations

import errno
import fcntl
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import IO, Any, Callable

import gin

from jaxlm.errors import UsageError

LOCK_FILE = ".lock"


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


def user_cache_dir(name: str) -> Path:
    """The per-user cache directory `name` (not created): $JAXLM_CACHE_DIR/name, else
    $XDG_CACHE_HOME/jaxlm/name, else ~/.cache/jaxlm/name. Entries there are derived data that a
    process may rebuild at any time (compiled programs, GGUF header indexes)."""
    if os.environ.get("JAXLM_CACHE_DIR"):
        return Path(os.environ["JAXLM_CACHE_DIR"]) / name
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "jaxlm" / name


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


def writable_dir(path: str | os.PathLike, flag: str, named: str | os.PathLike | None = None) -> Path:
    """`path` as a directory we can write in, created (with its parents) when missing.

    Called by every command before it loads or compiles anything, so a bad output directory fails at
    once instead of after minutes of compute. URL-style paths (gs://...) are refused (`local_dir`).

    Args:
      path: the directory (`--workdir`, `--output`, ...).
      flag: the flag that named it, for the message.
      named: what the flag named when `path` is its parent directory (an output file or directory
        about to be written), for the message; default `path`.

    Returns:
      `path` as a Path.

    Raises:
      UsageError: `path` is a URL, is a file, lies under a file, cannot be created, or is not writable
        (a read-only filesystem or missing permission); the message names `flag` and the path at fault.
    """
    path = local_dir(path, flag)
    shown = Path(named) if named is not None else path
    for ancestor in (path, *path.parents):
        if ancestor.exists() or ancestor.is_symlink():
            if not ancestor.is_dir():
                where = "is a file" if ancestor == shown else f"lies under {ancestor}, which is a file"
                raise UsageError(f"{flag} {shown}: {where}, not a directory")
            break
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=path, prefix=".write_test."):
            pass
    except OSError as e:
        raise UsageError(f"{flag} {shown}: {path} is not writable ({e.strerror or e})") from None
    return path


class RunLock:
    """An exclusive `fcntl.flock` on `directory/.lock`, held while one process writes a run directory.

    A second process (another `jaxlm train|eval|demo` on the same workdir) fails at once with the
    holder's pid; the kernel releases the lock when the holder exits or is killed, so a stale lock
    file never blocks a rerun. Use as a context manager.
    """

    def __init__(self, directory: str | os.PathLike, flag: str = "--workdir") -> None:
        self.directory = Path(directory)
        self.flag = flag
        self._file: IO | None = None

    @property
    def path(self) -> Path:
        return self.directory / LOCK_FILE

    def acquire(self) -> "RunLock":
        """Take the lock (creating the directory).

        Raises:
          UsageError: another process holds it (names its pid), or the directory is not writable.
        """
        writable_dir(self.directory, self.flag)
        f = open(self.path, "a+", encoding="utf-8")  # noqa: SIM115 - held until release()
        try:
            fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            f.seek(0)
            holder = f.read().strip() or "unknown"
            f.close()
            if e.errno in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
                raise UsageError(f"{self.flag} {self.directory}: in use by another jaxlm process (pid {holder}, "
                                 f"lock {self.path}); wait for it to finish or use another directory") from None
            raise UsageError(f"{self.flag} {self.directory}: cannot lock {self.path} ({e.strerror})") from None
        f.seek(0)
        f.truncate()
        f.write(f"{os.getpid()}\n")
        f.flush()
        self._file = f
        return self

    def release(self) -> None:
        """Drop the lock (the file stays: removing it would race with a process about to lock it)."""
        if self._file is not None:
            fcntl.flock(self._file.fileno(), fcntl.LOCK_UN)
            self._file.close()
            self._file = None

    def __enter__(self) -> "RunLock":
        return self.acquire()

    def __exit__(self, *exc: Any) -> None:
        self.release()
