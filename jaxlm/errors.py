"""One base class for every error a user can fix (a path, a field, a flag, a gin binding).

The CLI catches `JaxlmError` and prints one line `jaxlm: error: <message>` with exit status 2, so
each subclass's message must name the file, field or flag at fault. Anything else is a bug and keeps
its traceback.
"""

from __future__ import annotations

import errno
import os


class JaxlmError(ValueError):
    """A user-fixable error; the message names the file, field or flag."""


class UsageError(JaxlmError):
    """A bad command-line flag or flag combination."""


class ConfigError(JaxlmError):
    """A bad gin file or binding (unknown name, typo, wrong type)."""


class DataError(JaxlmError):
    """A malformed task file or data directory (names the file and the field)."""


class DiskFullError(JaxlmError):
    """A write failed for lack of space (or quota, or a read-only filesystem); names what was written.
    The CLI exits at once after printing it: the writers still open (TensorBoard, checkpoint threads)
    would otherwise print tracebacks of their own failing flushes at interpreter exit."""


DISK_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EROFS)


def is_disk_full(error: BaseException | None) -> bool:
    """Whether `error`, or an exception in its cause/context chain (however a library wrapped it), is a
    full disk, an exhausted quota or a read-only filesystem."""
    seen: set[int] = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        if isinstance(error, DiskFullError):
            return True
        if isinstance(error, OSError) and error.errno in DISK_ERRNOS:
            return True
        if any(os.strerror(n) in str(error) for n in DISK_ERRNOS):
            return True
        error = error.__cause__ or error.__context__
    return False
