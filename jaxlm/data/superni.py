"""Super-NaturalInstructions task files -> TaskData, and the official task splits.

Layout (allenai/natural-instructions): `<dir>/tasks/<task>.json` and
`<dir>/splits/<split>/{train,test}_tasks.txt` (one task name per line).

Every schema field is kept: `Definition` (a list of strings, joined with "\\n" into `definition`),
`Positive Examples` / `Negative Examples` (input, output, optional explanation -> `Demo`),
`Instances` (id, input, output list -> `Instance`), `Categories` -> `categories`; `Reasoning`,
`Domains`, `Input_language`, `Output_language`, `Instruction_language`, `Source`, `URL`,
`Contributors`, `Instance License` and any unknown top-level field go verbatim to `metadata`
(with `path` and `skipped_empty`).

Instances with an empty input or no non-empty output are skipped and counted in
`metadata["skipped_empty"]`; over-long instances are kept (cut at tokenization). A malformed file
raises one DataError naming the file and the field (`.../task001.json: field "Instances"[3]["output"]
must be a list of strings`).

A split lists tasks that may have no file here (the shared data is a partial copy):
`read_split` reports them (`SplitInfo.missing`) and `load_superni` logs their count and first names;
they are never silently dropped from the report.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from jaxlm.data.schema import Demo, Instance, TaskData
from jaxlm.data.task_files import (
    bad_field,
    cached_by_mtime,
    expect_str,
    expect_str_list,
    read_json,
    select_names,
    source_dir,
    warn_missing,
)
from jaxlm.errors import DataError, UsageError

PARTS = ("train", "test")
LANGUAGE_FIELDS = ("Input_language", "Output_language", "Instruction_language")
_REQUIRED = ("Definition", "Instances")
_STR_LIST_FIELDS = ("Categories", "Reasoning", "Domains", *LANGUAGE_FIELDS, "Source", "URL", "Contributors",
                    "Instance License")


def _looks_like_superni(path: Path) -> bool:
    return (path / "tasks").is_dir()


def superni_dir(data_dir: str | os.PathLike | None) -> Path:
    return source_dir(data_dir, "superni", _looks_like_superni)


def _demos(path: Path, data: dict, key: str) -> tuple[Demo, ...]:
    value = data.get(key, [])
    if not isinstance(value, list):
        raise bad_field(path, (key,), "must be a list of examples")
    demos = []
    for i, ex in enumerate(value):
        if not isinstance(ex, dict):
            raise bad_field(path, (key, i), "must be an object with input and output")
        explanation = ex.get("explanation", "")
        demos.append(Demo(input=expect_str(path, ex.get("input"), key, i, "input"),
                          output=expect_str(path, ex.get("output"), key, i, "output"),
                          explanation=expect_str(path, explanation, key, i, "explanation")))
    return tuple(demos)


def _instances(path: Path, value: Any) -> tuple[tuple[Instance, ...], int]:
    if not isinstance(value, list):
        raise bad_field(path, ("Instances",), "must be a list of instances")
    kept, skipped = [], 0
    for i, inst in enumerate(value):
        if not isinstance(inst, dict):
            raise bad_field(path, ("Instances", i), "must be an object with id, input and output")
        id_ = expect_str(path, inst.get("id"), "Instances", i, "id")
        text = expect_str(path, inst.get("input"), "Instances", i, "input")
        outputs = expect_str_list(path, inst.get("output"), "Instances", i, "output")
        if not text.strip() or not any(o.strip() for o in outputs):
            skipped += 1
            continue
        kept.append(Instance(id=id_, input=text, outputs=outputs))
    return tuple(kept), skipped


def _parse_task(path: Path) -> TaskData:
    data = read_json(path)
    if not isinstance(data, dict):
        raise DataError(f"{path}: expected a JSON object (a Super-NI task), got {type(data).__name__}")
    for key in _REQUIRED:
        if key not in data:
            raise DataError(f"{path}: field \"{key}\" is missing")
    definition = expect_str_list(path, data["Definition"], "Definition")
    instances, skipped = _instances(path, data["Instances"])
    metadata: dict[str, Any] = {"path": str(path), "skipped_empty": skipped}
    for key, value in data.items():
        if key in ("Definition", "Instances", "Positive Examples", "Negative Examples", "Categories"):
            continue
        metadata[key] = list(expect_str_list(path, value, key)) if key in _STR_LIST_FIELDS else value
    return TaskData(
        name=path.stem,
        source="superni",
        definition="\n".join(definition),
        instances=instances,
        positive_examples=_demos(path, data, "Positive Examples"),
        negative_examples=_demos(path, data, "Negative Examples"),
        categories=expect_str_list(path, data.get("Categories", []), "Categories"),
        metadata=metadata,
    )


read_task = cached_by_mtime(_parse_task)
read_task.__doc__ = "Parse one Super-NI task file (cached per path, mtime and size); DataError names file+field."


def is_english(task: TaskData) -> bool:
    """Input, output and instruction languages all exactly ["English"] (the shared files: all 220 are)."""
    return all(list(task.metadata.get(f, [])) == ["English"] for f in LANGUAGE_FIELDS)


@dataclass(frozen=True)
class SplitInfo:
    """A split's task lists and which of their tasks have a file in `tasks/`.

    train / test: the names listed in `splits/<split>/{train,test}_tasks.txt`, file order.
    on_disk: every task name with a file in `tasks/`.
    """

    split: str
    directory: Path
    train: tuple[str, ...]
    test: tuple[str, ...]
    on_disk: frozenset[str]

    def listed(self, part: str) -> tuple[str, ...]:
        if part not in PARTS:
            raise UsageError(f"Super-NI part {part!r} is unknown; expected one of {', '.join(PARTS)}")
        return self.train if part == "train" else self.test

    def present(self, part: str) -> tuple[str, ...]:
        """Listed tasks with a file here (list order)."""
        return tuple(n for n in self.listed(part) if n in self.on_disk)

    def missing(self, part: str) -> tuple[str, ...]:
        """Listed tasks with no file here (list order)."""
        return tuple(n for n in self.listed(part) if n not in self.on_disk)


def _task_list(path: Path) -> tuple[str, ...]:
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        raise DataError(f"{path}: split task list not found") from None
    except (OSError, UnicodeDecodeError) as e:
        raise DataError(f"{path}: cannot read split task list ({e})") from None
    return tuple(line.strip() for line in lines if line.strip())


def on_disk_tasks(data_dir: str | os.PathLike | None) -> dict[str, Path]:
    """Task name -> file for every `tasks/*.json`, by name."""
    tasks_dir = superni_dir(data_dir) / "tasks"
    return {p.stem: p for p in sorted(tasks_dir.glob("*.json"))}


def read_split(data_dir: str | os.PathLike | None, split: str = "default") -> SplitInfo:
    """The split's train/test task lists and which of them are on disk."""
    root = superni_dir(data_dir)
    split_dir = root / "splits" / split
    if not split_dir.is_dir():
        raise DataError(f"{split_dir}: Super-NI split {split!r} not found (expected {split_dir}/train_tasks.txt)")
    return SplitInfo(split=split, directory=root, train=_task_list(split_dir / "train_tasks.txt"),
                     test=_task_list(split_dir / "test_tasks.txt"), on_disk=frozenset(on_disk_tasks(root)))


def load_superni(data_dir: str | os.PathLike | None, *, split: str = "default", part: str | None = None,
                 names: Sequence[str] | None = None) -> list[TaskData]:
    """Tasks of `part` of `split` that are on disk (warning about the listed-but-absent ones), or every
    task file when part is None; `names` restricts to those tasks (only their files are read)."""
    files = on_disk_tasks(data_dir)
    if part is None:
        chosen = list(files)
    else:
        info = read_split(data_dir, split)
        warn_missing(f"Super-NI split {split!r} part {part!r}", info.missing(part))
        chosen = list(info.present(part))
    chosen = select_names(chosen, names, "superni") if names is not None else chosen
    return [read_task(files[n]) for n in chosen]
