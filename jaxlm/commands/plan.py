"""`jaxlm plan`: compile a gin run for a mesh or a device topology you may not have and print its
memory, FLOPs and whether it fits (the report is `jaxlm.train.plan.plan_run`'s).

Devices: a TPU/GPU compile-only topology when this JAX install has its PJRT plugin, this process's
devices when there are enough, else a child process with N fake CPU devices (the XLA flag must be
set before JAX starts).
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from collections.abc import Callable, Sequence
from typing import Any

import jax

from jaxlm.commands.gin_flags import add_gin_flags, gin_bindings, gin_search_paths, gin_subparser
from jaxlm.errors import JaxlmError, UsageError
from jaxlm.experiment.gin_config import parse_config
from jaxlm.train.plan import DEFAULT_HBM_GIB, plan_run, resolve_mesh, topology_devices

_CHILD_FLAG = "--_plan_child"


def _default_hbm(platform: str, hbm_gib: float | None) -> float | None:
    if hbm_gib is not None:
        if hbm_gib <= 0:
            raise UsageError(f"--hbm_gib {hbm_gib}: must be positive")
        return hbm_gib
    return DEFAULT_HBM_GIB.get(platform)


def _parse_gin(gin_files: Sequence[str], bindings: Sequence[str], search_paths: Sequence[str] = ()) -> None:
    if not gin_files:
        raise UsageError("jaxlm plan needs at least one --gin_file")
    parse_config(list(gin_files), list(bindings), list(search_paths))


def plan_command(args: Any) -> int:
    """`jaxlm plan`: parse gin, pick devices (topology, this process, or a CPU subprocess), print the report."""
    flags = [f"train.param_dtype = {args.param_dtype!r}"] if args.param_dtype else []  # as `train --param_dtype`
    bindings = flags + gin_bindings(args)  # --gin bindings win
    search_paths = gin_search_paths(args)
    _parse_gin(args.gin_file, bindings, search_paths)  # a typo fails here, before any compile
    hbm = _default_hbm(args.platform, args.hbm_gib)
    shape = resolve_mesh(args.mesh, jax.device_count() if "-1" in args.mesh else None)
    n = math.prod(shape.values())
    mesh_spec = ",".join(f"{k}={v}" for k, v in shape.items())
    note = ""
    if args.platform in ("tpu", "gpu"):
        found = topology_devices(args.platform, n)
        if found is not None:
            print(plan_run(mesh_spec, args.platform, hbm, found[0], found[1]).format())
            return 0
        note = (f"; no {args.platform.upper()} compile-only topology in this JAX install (needs its PJRT plugin), "
                "so temp/activation bytes are XLA:CPU's estimate")
    if jax.default_backend() == "cpu" and jax.device_count() >= n:
        report = plan_run(mesh_spec, args.platform, hbm, jax.devices()[:n], f"XLA:CPU, {n} fake devices{note}")
        print(report.format())
        return 0
    return _run_child(args.gin_file, bindings, search_paths, mesh_spec, args.platform, hbm, n, note)


def _run_child(gin_files: Sequence[str], bindings: Sequence[str], search_paths: Sequence[str], mesh_spec: str,
               platform: str, hbm: float | None, n: int, note: str) -> int:
    """Re-run the plan in a fresh process with N fake CPU devices (the flag must precede JAX's start)."""
    env = dict(os.environ)
    flags = [f for f in env.get("XLA_FLAGS", "").split() if not f.startswith("--xla_force_host_platform_device_count")]
    env["XLA_FLAGS"] = " ".join(flags + [f"--xla_force_host_platform_device_count={n}"])
    env["JAX_PLATFORMS"] = "cpu"
    spec = json.dumps({"gin_files": list(gin_files), "bindings": list(bindings), "search_paths": list(search_paths),
                       "mesh": mesh_spec,
                       "platform": platform, "hbm_gib": hbm, "note": note})
    proc = subprocess.run([sys.executable, "-m", "jaxlm.commands.plan", _CHILD_FLAG, spec], env=env)
    return proc.returncode


def _child_main(spec_json: str) -> int:
    spec = json.loads(spec_json)
    try:
        _parse_gin(spec["gin_files"], spec["bindings"], spec["search_paths"])
        n = math.prod(resolve_mesh(spec["mesh"], None).values())
        report = plan_run(spec["mesh"], spec["platform"], spec["hbm_gib"], jax.devices()[:n],
                          f"XLA:CPU, {n} fake devices{spec['note']}")
    except JaxlmError as e:
        print(f"jaxlm: error: {e}", file=sys.stderr)
        return 2
    print(report.format())
    return 0


def register(subparsers: Any) -> dict[str, Callable[[Any], int]]:
    """Add `plan`; return {"plan": handler}."""
    from jaxlm.checkpoints.hf import FLOAT_DTYPES

    plan = gin_subparser(subparsers, "plan", help="compile a gin run for a mesh/topology; print memory, FLOPs, fit")
    add_gin_flags(plan)
    plan.add_argument("--mesh", default="data=-1", help="mesh shape, e.g. data=8,fsdp=32")
    plan.add_argument("--platform", default="cpu", choices=["tpu", "gpu", "cpu"])
    plan.add_argument("--hbm_gib", type=float, default=None, help="device memory to fit in (default by platform)")
    plan.add_argument("--param_dtype", default=None, choices=FLOAT_DTYPES,
                      help="dtype params are held in, as `jaxlm train --param_dtype` (the same as "
                           "--gin.train.param_dtype=\"'...'\"; default: the config's)")
    return {"plan": plan_command}


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == _CHILD_FLAG:
        sys.exit(_child_main(sys.argv[2]))
    sys.exit("usage: jaxlm plan ... (this module's entry point is internal)")
