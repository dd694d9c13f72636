"""A directory of per-task LoRA teachers (written by `jaxlm.train.objectives.LoRATeachers`):

  DIR/teachers.json   {"base": source, "rank": r, "alpha": a,
                       "teachers": [{"task": name, "task_index": i, "adapter": subdir}, ...]}
  DIR/<subdir>/       one PEFT adapter directory per task

`write_teachers_index` writes the index, `load_teachers` stacks the adapters on a leading task axis,
`teacher_indices` maps task names to their place in that stack.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from jaxlm import jsonl
from jaxlm.checkpoints.hf import CheckpointError
from jaxlm.models import lora as lora_lib
from jaxlm.models.lora import LoraWeights

TEACHERS_INDEX = "teachers.json"


def write_teachers_index(directory: str | Path, entries: Sequence[Mapping[str, Any]], *, base: str, rank: int,
                         alpha: float) -> Path:
    """Write DIR/teachers.json listing `entries` ({"task", "task_index", "adapter"}); returns its path."""
    index_doc = {"base": base, "rank": rank, "alpha": alpha, "teachers": [dict(e) for e in entries]}
    path = Path(directory) / TEACHERS_INDEX
    path.write_text(jsonl.dumps(index_doc, indent=2))
    return path


def _index_entries(directory: str | Path) -> tuple[Path, list[dict[str, Any]]]:
    index_file = Path(directory) / TEACHERS_INDEX
    if not index_file.is_file():
        raise CheckpointError(f"{index_file}: missing (not a directory written by LoRATeachers)")
    return index_file, json.loads(index_file.read_text()).get("teachers", [])


def load_teachers(directory: str | Path, pretrained: Any) -> tuple[list[str], LoraWeights]:
    """The teachers of DIR, stacked.

    Args:
      directory: a LoRATeachers directory.
      pretrained: the `Pretrained` base the adapters were trained on (shapes are checked against it).

    Returns:
      (task names in task_index order, LoraWeights whose leaves have a leading task axis (N, ...)).

    Raises:
      CheckpointError: no teachers.json, an empty index, or an unreadable adapter.
    """
    from jaxlm.checkpoints.peft import load_peft_adapter

    index_file, entries = _index_entries(directory)
    entries = sorted(entries, key=lambda e: e["task_index"])
    if not entries:
        raise CheckpointError(f"{index_file}: field 'teachers' is empty")
    adapters = [load_peft_adapter(Path(directory) / e["adapter"], pretrained) for e in entries]
    return [e["task"] for e in entries], lora_lib.stack(adapters)


def teacher_indices(teachers_dir: str | Path | None, task_names: Sequence[str] = ()) -> dict[str, int]:
    """Task name -> index in the stack of a LoRATeachers directory, {} for None.

    Teachers saved under the default names `task_<i>` (LoRATeachers without task_names, trained on
    these same tasks with `global_task_index=True`, maybe only the first `max_tasks`) map by position:
    teacher i <-> task_names[i]; later tasks have no teacher.

    Raises:
      CheckpointError: no teachers.json, or more positional teachers than tasks.
    """
    if teachers_dir is None:
        return {}
    index_file, entries = _index_entries(teachers_dir)
    by_name = {e["task"]: int(e["task_index"]) for e in entries}
    if by_name and all(name == f"task_{i}" for name, i in by_name.items()):
        if len(by_name) > len(task_names):
            raise CheckpointError(f"{index_file}: {len(by_name)} positional teachers (task_<i>) for {len(task_names)} tasks")
        return {name: i for i, name in enumerate(task_names[:len(by_name)])}
    return by_name
