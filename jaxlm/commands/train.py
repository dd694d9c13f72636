"""`jaxlm train` (one run, or a TAGI pipeline of several) and `jaxlm adapter` (the LoRA a trained TAGI
hypernetwork emits for an instruction, as a PEFT directory).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from jaxlm import jsonl
from jaxlm.commands.gin_flags import add_gin_flags, gin_bindings, gin_search_paths, gin_subparser
from jaxlm.errors import UsageError
from jaxlm.files import writable_dir

TRAIN_HELP = """\
Train from gin files, t5x style:
  jaxlm train --gin_file=jaxlm/configs/tests/tiny_lm.gin --gin.train.num_steps=50 --workdir runs/tiny
Writes DIR/config.gin (operative config), DIR/metrics.jsonl (one line per logged step),
DIR/tensorboard/ and DIR/checkpoints/; rerunning with the same --workdir resumes from the last
complete checkpoint. String values need gin quotes: --gin.train.mesh_shape="'data=2,fsdp=4'".
"""


def run_lock(workdir: str) -> Any:
    """The workdir's `RunLock` on the process that writes it (process 0 of a multi-process run; the others
    write only their checkpoint shards), a no-op elsewhere."""
    import contextlib

    import jax

    from jaxlm.files import RunLock

    if jax.process_index() != 0:
        return contextlib.nullcontext()
    return RunLock(workdir)


def cmd_train(args: Any) -> int:
    from jaxlm.distributed import initialize_distributed
    from jaxlm.experiment.gin_config import parse_config
    from jaxlm.experiment.runner import run_parsed_config

    if not args.gin_file:
        raise UsageError("jaxlm train needs at least one --gin_file")
    flags = [f"train.mesh_shape = {args.mesh!r}"] if args.mesh else []  # as `plan --mesh`; --gin bindings win
    flags += [f"train.param_dtype = {args.param_dtype!r}"] if args.param_dtype else []
    parse_config(args.gin_file, flags + gin_bindings(args), gin_search_paths(args))  # ConfigError before any compute
    writable_dir(args.workdir, "--workdir")  # created only once the config parses, checked before any compute
    initialize_distributed()  # joins a SLURM/TPU-pod/launcher run; a no-op for one process

    with run_lock(args.workdir):
        summary = run_parsed_config(args.workdir)  # one `train`, or a TAGI pipeline (one train per gin scope)
    out = {k: summary[k] for k in ("step", "loss", "skipped_steps", "resumed_from", "workdir")}
    print(jsonl.dumps(out), file=sys.stderr)
    return 0


ADAPTER_HELP = """\
Write the LoRA adapter a trained TAGI hypernetwork generates for an instruction, as a PEFT dir:
  jaxlm adapter --hypernet RUN_DIR --instruction "Definition: ..." --output ADAPTER_DIR
RUN_DIR is a TAGI run (RUN/hypernet, or RUN/stage2/hypernet of a two-stage run) or the hypernet dir.
adapter_config.json names the base model's HF dir (exported with the hypernetwork), so
`peft.PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), ADAPTER_DIR)` and
`jaxlm generate/score --model BASE_DIR --adapter ADAPTER_DIR` use it as is; the printed JSON names that dir.
"""


def cmd_adapter(args: Any) -> int:
    from jaxlm.checkpoints.hypernet import load_hypernet

    output = Path(args.output)
    if output.exists() and not output.is_dir():
        raise UsageError(f"--output {output}: is a file, not a directory")
    writable_dir(output.parent, "--output", named=output)  # before loading anything
    if not args.instruction.strip():
        raise UsageError("--instruction is empty; the hypernetwork needs the task's instruction text")
    hyper = load_hypernet(args.hypernet)
    length, limit = len(hyper.codec.encode(args.instruction)), hyper.max_instruction_tokens
    if length > limit:
        print(f"jaxlm adapter: --instruction has {length} tokens; the hypernetwork reads the first {limit} "
              "(the rest is cut, as in training)", file=sys.stderr)
    out = hyper.export_adapter(args.instruction, args.output)
    print(jsonl.dumps({"adapter": str(out), "base_model_dir": str(hyper.base_model_dir)}))
    return 0


def register(subparsers: Any) -> dict[str, Callable[[Any], int]]:
    """Add `train` and `adapter`; return {command name: handler(args) -> exit status}."""
    from jaxlm.checkpoints.hf import FLOAT_DTYPES

    train = gin_subparser(subparsers, "train", help="train from gin files", description=TRAIN_HELP,
                          formatter_class=argparse.RawDescriptionHelpFormatter)
    add_gin_flags(train)
    train.add_argument("--workdir", required=True, help="run directory (resumes when it has checkpoints)")
    train.add_argument("--mesh", default=None,
                       help="mesh shape, e.g. data=8,fsdp=32 (the same as --gin.train.mesh_shape=\"'...'\"; "
                            "default: the config's train.mesh_shape)")
    train.add_argument("--param_dtype", default=None, choices=FLOAT_DTYPES,
                       help="dtype params are held and trained in; a pretrained base is read into it tensor by "
                            "tensor (the same as --gin.train.param_dtype=\"'...'\"; default: the config's "
                            "train.param_dtype, else the objective's param_dtype, else float32)")
    adapter = subparsers.add_parser("adapter", help="PEFT adapter from a TAGI hypernetwork and an instruction",
                                    description=ADAPTER_HELP, formatter_class=argparse.RawDescriptionHelpFormatter)
    adapter.add_argument("--hypernet", required=True, help="TAGI run dir or its hypernet/ dir")
    adapter.add_argument("--instruction", required=True, help="the task instruction the hypernetwork reads")
    adapter.add_argument("--output", required=True, help="PEFT adapter directory to write")
    return {"train": cmd_train, "adapter": cmd_adapter}
