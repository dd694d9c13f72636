"""Task files our users already have -- JSONL, Parquet, Arrow -- read with Hugging Face `datasets`.

One file per task: `<data_dir>/<task>.jsonl` (also `.json` with one object per line), `.parquet` or
`.arrow` (the Arrow stream files `Dataset.save_to_disk` / `datasets` write); files in subfolders are
tasks named `<folder>/<task>`, like BIG-bench subtasks. Each is read with
`datasets.load_dataset(<json|parquet|arrow>, data_files=<file>, split="train")`: a packaged local
builder, no hub access (the reader sets `HF_DATASETS_OFFLINE=1` when unset).

Two row schemas, one per source name:
  superni_files  a Super-NI task as rows: `input` (str), `output` (str or list of str: the references);
                 optional `id`, `definition` (the task instruction, read from the first row),
                 `categories` (list of str, first row). Default prompt format def_pos2.
  p3_files       the P3 (T0) schema: `inputs` and `targets` (or `inputs_pretokenized` /
                 `targets_pretokenized`), optional `answer_choices` (list of str: rank classification,
                 the instance's options; `targets` must be one of them, which gets option score 1, the
                 others 0), optional `id`, `definition`. P3 inputs are whole prompts, so the default
                 prompt format is "none" (the input alone).
An instance id defaults to "<task>-<row index>". Rows with an empty input (and no options) or no
non-empty reference are skipped and counted in `metadata["skipped_empty"]`, as the JSON readers do.
A file without the schema's columns is a DataError naming the file and the columns.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from jaxlm.data.schema import Instance, TaskData
from jaxlm.data.task_files import cached_by_mtime, select_names
from jaxlm.errors import DataError, UsageError

FILE_FORMATS: dict[str, str] = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".arrow": "arrow"}
SCHEMAS = ("superni_files", "p3_files")
P3_COLUMNS = (("inputs", "inputs_pretokenized"), ("targets", "targets_pretokenized"))


def task_files(data_dir: str | os.PathLike) -> dict[str, Path]:
    """{task name: file} of every task file under `data_dir` (see the module docstring).

    Raises:
      UsageError: `data_dir` is None.
      DataError: `data_dir` is not a directory, holds no task file, or two files give one task name.
    """
    if data_dir is None:
        raise UsageError("--data_dir is required for the superni_files / p3_files sources")
    root = Path(data_dir)
    if not root.is_dir():
        raise DataError(f"{root}: data directory does not exist")
    out: dict[str, Path] = {}
    for path in sorted(root.rglob("*")):
        if path.suffix not in FILE_FORMATS or not path.is_file():
            continue
        name = path.relative_to(root).with_suffix("").as_posix()
        if name in out:
            raise DataError(f"{root}: task {name!r} has two files ({out[name].name}, {path.name})")
        out[name] = path
    if not out:
        raise DataError(f"{root}: no task files ({', '.join(FILE_FORMATS)})")
    return out


def read_rows(path: Path) -> list[dict[str, Any]]:
    """The rows of one task file through `datasets.load_dataset` (no hub access; `datasets`' own
    progress bars are switched off for the process).

    Raises:
      DataError: `datasets` cannot read the file, or `datasets` is not installed.
    """
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    try:
        import datasets
    except ImportError:
        raise DataError(f"{path}: reading task files needs the `datasets` package (pip install -e \".[files]\")") from None
    datasets.disable_progress_bars()
    try:
        table = datasets.load_dataset(FILE_FORMATS[path.suffix], data_files=str(path), split="train")
    except Exception as e:  # datasets raises many types for a malformed file
        raise DataError(f"{path}: not a readable {FILE_FORMATS[path.suffix]} task file ({type(e).__name__}: {e})") from None
    return table.to_list()


def _column(path: Path, columns: Sequence[str], choices: Sequence[str]) -> str:
    for name in choices:
        if name in columns:
            return name
    raise DataError(f"{path}: no column {' or '.join(map(repr, choices))} (columns: {', '.join(columns) or 'none'})")


def _strings(path: Path, value: Any, where: str) -> tuple[str, ...]:
    if value is None:
        return ()
    if isinstance(value, str):
        return (value,)
    if isinstance(value, (list, tuple)) and all(isinstance(v, str) for v in value):
        return tuple(value)
    raise DataError(f"{path}: {where} must be a string or a list of strings, got {type(value).__name__}")


@cached_by_mtime
def _read_task(path: Path, name: str, schema: str) -> TaskData:
    rows = read_rows(path)
    columns = sorted(rows[0]) if rows else []
    if schema == "superni_files":
        input_col, target_col = _column(path, columns, ("input",)), _column(path, columns, ("output",))
    else:
        input_col, target_col = (_column(path, columns, choices) for choices in P3_COLUMNS)
    instances, skipped = [], 0
    for index, row in enumerate(rows):
        where = f"row {index}"
        text = row.get(input_col)
        if not isinstance(text, str):
            raise DataError(f"{path}: {where}: {input_col} must be a string, got {type(text).__name__}")
        outputs = tuple(o for o in _strings(path, row.get(target_col), f"{where}: {target_col}") if o.strip())
        options = _strings(path, row.get("answer_choices"), f"{where}: answer_choices") if schema == "p3_files" else ()
        if not outputs or (not text.strip() and not options):
            skipped += 1
            continue
        scores: tuple[float, ...] = ()
        if options:
            missing = [o for o in outputs if o not in options]
            if missing:
                raise DataError(f"{path}: {where}: target {missing[0]!r} is not one of its answer_choices")
            scores = tuple(1.0 if o in outputs else 0.0 for o in options)
        row_id = row.get("id")
        instances.append(Instance(id=str(row_id) if row_id is not None else f"{name}-{index}", input=text,
                                  outputs=outputs, options=options, option_scores=scores))
    first = rows[0] if rows else {}
    definition = first.get("definition") or ""
    categories = _strings(path, first.get("categories"), "row 0: categories")
    return TaskData(name=name, source=schema, definition=str(definition).strip(), instances=tuple(instances),
                    categories=categories, metadata={"path": str(path), "skipped_empty": skipped})


def load_files(data_dir: str | os.PathLike, *, schema: str, names: Sequence[str] | None = None) -> list[TaskData]:
    """The task files of `data_dir` as TaskData of source `schema` (see the module docstring).

    Args:
      data_dir: the folder of task files.
      schema: "superni_files" or "p3_files".
      names: keep only these tasks (a folder name keeps the tasks inside it); None: all.

    Returns:
      One TaskData per file, in task-name order.

    Raises:
      UsageError: an unknown schema.
      DataError: a missing folder, no task files, an unreadable file or a row outside the schema.
    """
    if schema not in SCHEMAS:
        raise UsageError(f"task file schema {schema!r} is unknown; known: {', '.join(SCHEMAS)}")
    files = task_files(data_dir)
    return [_read_task(files[name], name, schema) for name in select_names(sorted(files), names, schema)]
