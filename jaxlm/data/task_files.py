"""File helpers every task reader shares (`jaxlm.data.superni`, `jaxlm.data.bigbench`): JSON that fails
in one line naming the file, typed field access naming the field, parse caches keyed by (path, mtime,
size), source-directory lookup and task-name selection.
"""

from __future__ import annotations

import functools
import json
import logging
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, TypeVar

from jaxlm.errors import DataError

log = logging.getLogger(__name__)
T = TypeVar("T")


def read_json(path: str | os.PathLike) -> Any:
    """Parse a JSON file; unreadable or invalid files raise one DataError naming the file (and line)."""
    path = Path(path)
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except FileNotFoundError:
        raise DataError(f"{path}: no such file") from None
    except json.JSONDecodeError as e:
        raise DataError(f"{path}: invalid JSON at line {e.lineno} column {e.colno} ({e.msg})") from None
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    except OSError as e:
        raise DataError(f"{path}: cannot read ({e.strerror})") from None


def field_name(*parts: str | int) -> str:
    """`"Instances"[3]["output"]`: the JSON path of a field, as error messages print it."""
    first, *rest = parts
    return f'"{first}"' + "".join(f"[{p}]" if isinstance(p, int) else f'["{p}"]' for p in rest)


def bad_field(path: Path, parts: tuple[str | int, ...], problem: str) -> DataError:
    return DataError(f"{path}: field {field_name(*parts)} {problem}")


def expect_str(path: Path, value: Any, *parts: str | int) -> str:
    if not isinstance(value, str):
        raise bad_field(path, parts, f"must be a string, got {type(value).__name__}")
    return value


def expect_str_list(path: Path, value: Any, *parts: str | int) -> tuple[str, ...]:
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise bad_field(path, parts, "must be a list of strings")
    return tuple(value)


def cached_by_mtime(parse: Callable[..., T]) -> Callable[..., T]:
    """Cache `parse(path, *args)` per (path, mtime, size, args): an edited file is re-read, an unchanged one
    is not. `args` must be hashable (e.g. the task name a reader derives from the directory layout)."""

    @functools.lru_cache(maxsize=4096)
    def cached(path: str, mtime_ns: int, size: int, args: tuple) -> T:
        return parse(Path(path), *args)

    @functools.wraps(parse)
    def wrapper(path: str | os.PathLike, *args: Any) -> T:
        path = Path(path)
        try:
            st = path.stat()
        except OSError:
            raise DataError(f"{path}: no such file") from None
        return cached(str(path), st.st_mtime_ns, st.st_size, args)

    wrapper.cache_clear = cached.cache_clear  # type: ignore[attr-defined]
    return wrapper


def source_dir(data_dir: str | os.PathLike | None, folder: str, looks_right: Callable[[Path], bool]) -> Path:
    """The source's folder: `data_dir` itself when it has the source's layout, else `data_dir/folder`;
    `data_dir` None means the task-data root (`jaxlm.files.data_root`: --data_dir, $JAXLM_DATA_DIR, ../shared/data)."""
    from jaxlm.files import data_root

    root = Path(data_dir) if data_dir is not None else data_root()  # None: the task-data root setting
    if not root.is_dir():
        raise DataError(f"{root}: data directory does not exist")
    if (root / folder).is_dir() and looks_right(root / folder):  # a data root holding the source's folder
        return root / folder
    if looks_right(root):
        return root
    raise DataError(f"{root}: not a {folder} data directory (expected its files here or under {root / folder})")


class UnknownTaskError(DataError):
    """Task names asked for that the source does not have (names them)."""


def select_names(available: Sequence[str], names: Sequence[str] | None, what: str) -> list[str]:
    """The `available` names asked for (a BIG-bench parent name selects its subtasks).

    Raises:
      UnknownTaskError: a name in `names` matches nothing (a typo beside a real task would otherwise shrink
        the run silently); the message names `what` and the first unknown names.
    """
    if names is None:
        return list(available)
    wanted = set(names)
    kept = [n for n in available if n in wanted or n.split("/", 1)[0] in wanted]
    found = set(kept) | {n.split("/", 1)[0] for n in kept}
    unknown = [n for n in names if n not in found]
    if unknown:
        raise UnknownTaskError(f"{what}: {len(unknown)} requested task(s) do not exist: {', '.join(unknown[:5])}")
    return kept


def warn_missing(what: str, missing: Sequence[str]) -> None:
    if missing:
        log.warning("%s: %d listed task(s) have no file on disk and are not loaded (first: %s)",
                    what, len(missing), ", ".join(missing[:5]))
