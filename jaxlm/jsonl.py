"""JSONL in and out: validated input lines (errors name file and line), an appending writer that
flushes every record, so a killed run keeps what it wrote and `resume` skips it, and `ResultsLog`:
the resumable results file of sweeps, the demo and the study drivers (append + flush + fsync per
write, a torn last line dropped, the keys already written skipped on resume)."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any, Callable, Hashable, Iterable, Iterator

from jaxlm.errors import JaxlmError


class InputError(JaxlmError):
    """A bad input file or line; the message names the file and the line number."""


def read_jsonl(path: str | os.PathLike) -> list[dict[str, Any]]:
    """Every line of a user's input file as a dict, with its 1-based line number under "_line".

    Strict: a malformed line anywhere, the last one included, is an error (an input is never
    silently shortened); our own append-only outputs are read with `ResultsLog`, which drops a torn
    last line instead.

    Raises:
      InputError: the file is missing, or a line is not UTF-8, not JSON or not an object (names
        file:line).
    """
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: no such input file")
    rows = []
    with open(path, "rb") as f:
        for n, raw in enumerate(f, 1):
            if not raw.strip():
                continue
            row = _parse_line(path, n, raw)
            row["_line"] = n
            rows.append(row)
    return rows


def _parse_line(path: Path, n: int, line: str | bytes) -> dict[str, Any]:
    """Line `n` of `path` as a JSON object; InputError (naming file and line) otherwise."""
    try:
        if isinstance(line, bytes):
            line = line.decode("utf-8")
        row = json.loads(line)
    except json.JSONDecodeError as e:
        raise InputError(f"{path}:{n}: not valid JSON ({e.msg})") from None
    except UnicodeDecodeError as e:
        raise InputError(f"{path}:{n}: not UTF-8 (byte {line[e.start:e.start + 1]!r} at column {e.start + 1})") from None
    if not isinstance(row, dict):
        raise InputError(f"{path}:{n}: expected a JSON object, got {type(row).__name__}")
    return row


def finite_json(value: Any) -> Any:
    """`value` (nested dicts, lists, tuples) with every NaN or infinite float replaced by None, so that
    it is strict JSON (RFC 8259 has no NaN; Python's `json` would write a bare `NaN`)."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: finite_json(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [finite_json(v) for v in value]
    return value


def dumps(value: Any, **kwargs: Any) -> str:
    """`json.dumps` of `finite_json(value)` that refuses anything else non-strict: every JSON we write
    (JSONL lines, printed summaries, metadata files) goes through here."""
    return json.dumps(finite_json(value), allow_nan=False, **kwargs)


def json_line(record: dict[str, Any], ensure_ascii: bool = False) -> str:
    """One JSONL line: `record` as strict JSON (non-finite floats as null; non-ASCII kept as UTF-8
    unless `ensure_ascii`) plus a newline."""
    return dumps(record, ensure_ascii=ensure_ascii) + "\n"


def count_complete_lines(path: str | os.PathLike) -> int:
    """Lines of `path` that parse as JSON; a torn last line (killed mid-write) is dropped from the file."""
    path = Path(path)
    if not path.is_file():
        return 0
    good, keep_bytes = 0, 0
    with open(path, "rb") as f:
        for raw in f:
            if not raw.endswith(b"\n") or not _parses(raw):
                break
            good += 1
            keep_bytes += len(raw)
    if keep_bytes != path.stat().st_size:
        with open(path, "r+b") as f:
            f.truncate(keep_bytes)
    return good


class JsonlWriter:
    """Appends one JSON object per line; each `write_all` batch is flushed and fsynced at once."""

    def __init__(self, path: str | os.PathLike, append: bool = False) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._f = open(self.path, "a" if append else "w", encoding="utf-8")

    def write(self, record: dict[str, Any]) -> None:
        self._f.write(json_line(record))

    def write_all(self, records: Iterable[dict[str, Any]]) -> None:
        for r in records:
            self.write(r)
        self._f.flush()
        os.fsync(self._f.fileno())

    def close(self) -> None:
        self._f.close()

    def __enter__(self) -> "JsonlWriter":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class ResultsLog:
    """An append-only JSONL results file that a killed run resumes from.

    `append(rows)` writes, flushes and fsyncs each batch, so a line on disk is never lost; a run killed
    mid-write leaves at most a torn last line (not newline-terminated, or unparsable), which `rows()`
    skips and the next `append` cuts from the file before writing. `key(row)` names what a row is a
    result of: `done_keys()` is the set already written (what a resumed run skips), `latest()` the last
    row of each key (a redone key supersedes its older lines). A missing file is an empty log.

    Reading never changes the file (a report may read while a sweep appends); only `append` repairs.
    """

    def __init__(self, path: str | os.PathLike, key: Callable[[dict[str, Any]], Hashable] | None = None, *,
                 ensure_ascii: bool = False) -> None:
        self.path = Path(path)
        self.key = key
        self.ensure_ascii = ensure_ascii

    def rows(self) -> list[dict[str, Any]]:
        """Every complete row, in file order (blank lines skipped, a torn last line dropped).

        Raises:
          InputError: a line before the last is not a JSON object (damage, not a killed write).
        """
        if not self.path.is_file():
            return []
        lines = self.path.read_bytes().split(b"\n")
        tail = lines.pop()  # after the last newline: b"" when the file ends cleanly, else a torn line
        rows = []
        for n, raw in enumerate(lines, 1):
            if not raw.strip():
                continue
            if n == len(lines) and not tail and not _parses(raw):
                break  # the last line, newline-terminated but unparsable: torn as well
            rows.append(_parse_line(self.path, n, raw))
        return rows

    def done_keys(self) -> set[Hashable]:
        """The keys of every row already written (what a resumed run skips)."""
        return {self._key()(row) for row in self.rows()}

    def latest(self) -> dict[Hashable, dict[str, Any]]:
        """{key: its last row}, keys in first-written order."""
        key = self._key()
        return {key(row): row for row in self.rows()}

    def pending(self, rows: Iterable[dict[str, Any]]) -> list[dict[str, Any]]:
        """The `rows` whose key is not in the file yet (checked against the file as it is now)."""
        done, key = self.done_keys(), self._key()
        return [row for row in rows if key(row) not in done]

    def append(self, rows: Iterable[dict[str, Any]]) -> None:
        """Append `rows` (one line each), then flush and fsync; a torn last line is cut off first.
        The file (and its directory) is created when missing, even for no rows."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        drop_torn_tail(self.path)
        with open(self.path, "a", encoding="utf-8") as f:
            for row in rows:
                f.write(json_line(row, self.ensure_ascii))
            f.flush()
            os.fsync(f.fileno())

    def _key(self) -> Callable[[dict[str, Any]], Hashable]:
        if self.key is None:
            raise ValueError(f"ResultsLog({self.path}): pass key= to ask which results are done")
        return self.key


def drop_torn_tail(path: str | os.PathLike) -> bool:
    """Cut an incomplete last line (not newline-terminated, or unparsable) from `path`, as a write
    killed midway leaves it, so that the next append starts on a line of its own. Reads only the last
    line. True when something was cut."""
    path = Path(path)
    if not path.is_file():
        return False
    with open(path, "r+b") as f:
        size = f.seek(0, os.SEEK_END)
        if size == 0:
            return False
        f.seek(size - 1)
        terminated = f.read(1) == b"\n"
        start = _line_start(f, size - 1 if terminated else size)
        f.seek(start)
        line = f.read(size - start)
        if terminated and (not line.strip() or _parses(line)):
            return False
        f.truncate(start)
        f.flush()
        os.fsync(f.fileno())
    return True


def _line_start(f: Any, end: int, block: int = 1 << 16) -> int:
    """Offset just after the last newline before `end` in binary file `f` (0 when there is none)."""
    pos = end
    while pos > 0:
        size = min(block, pos)
        pos -= size
        f.seek(pos)
        at = f.read(size).rfind(b"\n")
        if at >= 0:
            return pos + at + 1
    return 0


def _parses(raw: bytes) -> bool:
    try:
        json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError):
        return False
    return True


def chunks(items: list, size: int) -> Iterator[tuple[int, list]]:
    for start in range(0, len(items), size):
        yield start, items[start : start + size]
