"""Run what a parsed gin config describes: one `jaxlm.train.loop.train`, or a TAGI pipeline of
several (`tagi_pipeline`: LoRA teachers, hypernetwork pretraining, finetuning, each a gin scope).

`run_parsed_config(workdir)` is what `jaxlm train` calls after parsing
(`jaxlm.experiment.gin_config.run_gin_files` parses and runs in one call).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import gin

from jaxlm.errors import ConfigError
from jaxlm.files import local_dir
from jaxlm.train.loop import train



TEACHERS_STAGE = "teachers"


@gin.configurable(denylist=["workdir"])
def tagi_pipeline(workdir: str | Path, *, stages: tuple[str, ...] = ("stage1", "stage2")) -> dict[str, Any]:
    """Run `jaxlm.train.loop.train` once per gin scope in `stages`, into workdir/<scope>/.

    A scope named "teachers" trains the per-task LoRA teachers (LoRATeachers); later scopes get
    `<scope>/TAGIDistillation.teachers_dir` and `<scope>/tagi_data.teachers_dir` bound to them. Any other
    scope after a TAGI scope starts from its hypernetwork (`<scope>/TAGIDistillation.init_from`).
    `jaxlm adapter --hypernet WORKDIR` then finds the last stage's export. Stages
    ('teachers', 'stage1', 'stage2') are the paper's pipeline; dropping 'stage1' is the no-pretraining
    ablation. A rerun with the same workdir resumes each stage from its checkpoints."""
    if not stages:
        raise ConfigError("tagi_pipeline.stages is empty")
    workdir = local_dir(workdir, "--workdir")
    summary: dict[str, Any] = {}
    previous: Path | None = None
    teachers: Path | None = None
    for scope in stages:
        with gin.unlock_config():
            if previous is not None:
                gin.bind_parameter(f"{scope}/TAGIDistillation.init_from", str(previous))
            if teachers is not None:
                gin.bind_parameter(f"{scope}/TAGIDistillation.teachers_dir", str(teachers))
                gin.bind_parameter(f"{scope}/tagi_data.teachers_dir", str(teachers))
        with gin.config_scope(scope):
            summary = train(workdir=workdir / scope)
        if scope == TEACHERS_STAGE:
            teachers = workdir / scope / "teachers"
        else:
            previous = workdir / scope
    summary["stages"] = list(stages)
    return summary


def is_tagi_pipeline() -> bool:
    """Whether the parsed gin config is a TAGI pipeline (binds `tagi_pipeline.stages`)."""
    try:
        gin.query_parameter("tagi_pipeline.stages")
    except ValueError:
        return False
    return True


def require_bindings(configurable: str, names: Sequence[str]) -> None:
    """Fail before any compute when a required parameter of `configurable` is not bound."""
    missing = []
    for name in names:
        try:
            gin.query_parameter(f"{configurable}.{name}")
        except ValueError:
            missing.append(f"{configurable}.{name}")
    if missing:
        raise ConfigError(f"gin config binds no {', '.join(missing)} (add them to the experiment file or --gin.)")


def run_parsed_config(workdir: str | Path) -> dict[str, Any]:
    """Run what the parsed gin config describes: `tagi_pipeline` or a single `train` (as `jaxlm train`)."""
    local_dir(workdir, "--workdir")  # refused here, before gin wraps the error in its call trace
    if is_tagi_pipeline():
        return tagi_pipeline(workdir)
    require_bindings("train", ("objective", "optimizer", "data", "num_steps"))
    return train(workdir=workdir)
