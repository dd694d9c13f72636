"""Peak host RSS of loading SmolLM2-135M-Instruct from a Hugging Face directory, CPU.

The installed GGUF is exported once to HF directories stored in float32 and in bfloat16
(`--workdir`). Each measurement runs in a fresh process with 8 fake CPU devices and reports, from
/proc/self/status, the resident set after imports (VmRSS), the high-water mark after the load
(VmHWM) and their difference ("load adds"). Modes:

  plain     load_pretrained(dir, param_dtype=...)                        params on one device
  mesh      load_pretrained(dir, param_dtype=..., mesh=fsdp=8)           each tensor placed on its shards as read
  host_put  load_pretrained(...) then jax.device_put(tree, shardings)    the path TrainStep took before
  train     TrainStep(CausalLM(pretrained=dir, LoRA r=8 on q/v), fsdp=8).init_state: base + LoRA + Adam state

On CPU the "devices" live in host memory, so every mode's peak includes the params themselves
(fully sharded over fsdp=8: one copy in all); what differs is the transient on top of them.

    python bench/load_rss.py [--workdir /tmp/jaxlm_load_rss] [--modes plain,mesh,host_put]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
MODEL = "smollm2-135m-instruct"
CHILD = r"""
import json, os, re, sys
os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"
os.environ["JAX_PLATFORMS"] = "cpu"
import jax
from flax import linen as nn
from jaxlm import sharding
from jaxlm.checkpoints.pretrained import load_pretrained

def status(key):
    return int(re.search(rf"{key}:\s+(\d+) kB", open("/proc/self/status").read()).group(1)) / 1024

directory, param_dtype, mode = sys.argv[1:4]
jax.devices()  # backend up before the baseline
mesh = sharding.make_mesh("fsdp=8")
before = status("VmRSS")
if mode == "train":
    from jaxlm.models.lora import LoraSpec
    from jaxlm.train.objectives import CausalLM
    from jaxlm.train.optim import make_optimizer
    from jaxlm.train.steps import TrainStep

    objective = CausalLM(pretrained=directory, lora=LoraSpec(("q_proj", "v_proj"), rank=8), param_dtype=param_dtype)
    step = TrainStep(objective, make_optimizer(learning_rate=1e-4, total_steps=10), mesh)
    state, frozen = step.init_state(jax.random.PRNGKey(0))
    pre = type("Loaded", (), {"params": frozen})()
elif mode == "mesh":
    pre = load_pretrained(directory, param_dtype=param_dtype, mesh=mesh)
else:
    pre = load_pretrained(directory, param_dtype=param_dtype)
    if mode == "host_put":
        shardings = sharding.logical_sharding(pre.logical_axes(), pre.params, mesh)
        pre.params = jax.device_put(pre.params, shardings)
jax.block_until_ready(pre.params)
nbytes = sum(x.nbytes for x in jax.tree_util.tree_leaves(pre.params))
print(json.dumps({"before_mib": before, "peak_mib": status("VmHWM"), "params_mib": nbytes / 2**20}))
"""


def prepare(workdir: Path) -> dict[str, Path]:
    """HF directories of the GGUF stored in float32 and bfloat16 (written once)."""
    dirs = {stored: workdir / f"smollm2_{stored}" for stored in ("float32", "bfloat16")}
    if not all((d / "config.json").is_file() for d in dirs.values()):
        sys.path.insert(0, str(REPO))
        from jaxlm.checkpoints.pretrained import export_hf, load_pretrained

        pre = load_pretrained(MODEL)
        for stored, d in dirs.items():
            export_hf(pre, d, dtype=stored)
    return dirs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", default="/tmp/jaxlm_load_rss")
    parser.add_argument("--modes", default="plain,mesh,host_put,train")
    args = parser.parse_args()
    dirs = prepare(Path(args.workdir))
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    print(f"{'stored':9} {'param_dtype':11} {'mode':9} {'params MiB':>10} {'load adds MiB':>13} {'peak MiB':>9}")
    for stored, param_dtype in (("float32", "float32"), ("bfloat16", "float32"), ("bfloat16", "bfloat16")):
        for mode in args.modes.split(","):
            out = subprocess.run([sys.executable, "-c", CHILD, str(dirs[stored]), param_dtype, mode], env=env,
                                 capture_output=True, text=True, check=True)
            r = json.loads(out.stdout.strip().splitlines()[-1])
            print(f"{stored:9} {param_dtype:11} {mode:9} {r['params_mib']:10.0f} {r['peak_mib'] - r['before_mib']:13.0f} "
                  f"{r['peak_mib']:9.0f}", flush=True)


if __name__ == "__main__":
    main()
