"""Export a finished `jaxlm train` run directory: its operative config (RUN/config.gin) rebuilds the
objective, its checkpoint gives the trained params, and the objective's `export` writes them
(`jaxlm.train.objectives.LanguageModel.export`: a HF dir, a PEFT dir, or LoRA merged into a HF dir;
a TAGI run's hypernetwork; a LoRATeachers directory).
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import gin
import jax

from jaxlm.errors import UsageError
from jaxlm.sharding import parse_mesh_shape
from jaxlm.experiment.gin_config import parse_config
from jaxlm.train.loop import restore_trained

RUN_CONFIG = "config.gin"


def export_run(workdir: str | Path, output: str | Path, *, step: int | None = None, merged: bool = False,
               search_paths: Sequence[str] = (), dtype: str = "float32") -> dict[str, Any]:
    """Write the model a run trained.

    Args:
      workdir: a `jaxlm train` run directory (RUN/config.gin and RUN/checkpoints/); for a TAGI
        pipeline, one stage's directory (RUN/stage2).
      output: the directory to write.
      step: the checkpoint step (default: the newest readable one).
      merged: fold a LoRA into the base and write a plain HF directory.
      search_paths: gin search paths (for a config whose includes are not under the checkout).
      dtype: the written tensors' dtype ("float32", "bfloat16", "float16"; a TAGI hypernetwork
        export refuses all but float32).

    Returns:
      {"output": str, "step": int, "objective": class name}.

    Raises:
      UsageError: `workdir` is not a run directory; CheckpointError: no readable checkpoint;
      ConfigError: the run's config does not parse, or `merged` / `dtype` does not apply to its objective.
    """
    config = Path(workdir) / RUN_CONFIG
    if not config.is_file():
        stages = sorted(p.name for p in Path(workdir).glob(f"*/{RUN_CONFIG}")) if Path(workdir).is_dir() else []
        hint = f"; its stages are {', '.join(str(Path(workdir) / s) for s in stages)}" if stages else ""
        raise UsageError(f"--workdir {workdir}: no {RUN_CONFIG} (not a jaxlm train run directory){hint}")
    parse_config([str(config)], [], search_paths)
    # A stage of a TAGI pipeline recorded its bindings under its gin scope (stage2/train.objective = ...).
    text = config.read_text()
    scope = Path(workdir).resolve().name if re.search(
        rf"^{re.escape(Path(workdir).resolve().name)}/train\.objective\s*=", text, re.M) else ""
    with gin.config_scope(scope or None):
        bound = gin.get_bindings("train")
        if "objective" not in bound or "optimizer" not in bound:
            raise UsageError(f"{config}: binds no train.objective / train.optimizer (not a jaxlm train run's config)")
        objective = bound["objective"]
        optimizer = bound["optimizer"]
    mesh_shape = bound.get("mesh_shape", "data=-1")
    if math.prod(v for v in parse_mesh_shape(mesh_shape).values() if v > 0) > jax.device_count():
        mesh_shape = "data=-1"  # trained on more devices than this host has: orbax reshards on restore
    state, frozen, at = restore_trained(
        workdir, objective=objective, optimizer=optimizer, mesh_shape=mesh_shape,
        microbatches=bound.get("microbatches", 1), compute_dtype=bound.get("compute_dtype", "float32"),
        param_dtype=bound.get("param_dtype"),
        seed=bound.get("seed", 0), step=step)
    path = objective.export(output, state.params, frozen, merged=merged, dtype=dtype)
    return {"output": str(path), "step": at, "objective": type(objective).__name__}
