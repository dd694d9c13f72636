"""`jaxlm export`: a trained run directory -> a HF directory, a PEFT adapter, or LoRA merged into a HF dir."""

from __future__ import annotations

import argparse
from collections.abc import Callable
from pathlib import Path
from typing import Any

from jaxlm import jsonl

EXPORT_HELP = """\
Export what a `jaxlm train` run trained, for transformers / peft / `jaxlm score --model/--adapter`:
  jaxlm export --workdir RUN --output DIR [--step N] [--merged] [--dtype bfloat16]
A full finetune -> a HF directory; a LoRA run -> a PEFT adapter directory (its
base_model_name_or_path is the pretrained base, or DIR/base/ written beside it for a random-init base);
--merged -> the LoRA folded into the base kernels, a HF directory. A TAGI run's stage directory
(RUN/stage2) -> its hypernetwork export; a LoRATeachers run -> a teachers directory.
The run's own RUN/config.gin rebuilds the model; --step picks a checkpoint (default: the newest);
--dtype is the written tensors' dtype (config.json's torch_dtype; the adapter's for LoRA).
Prints one JSON line {output, step, objective}.
"""


def cmd_export(args: Any) -> int:
    from jaxlm.commands.gin_flags import gin_search_paths
    from jaxlm.errors import UsageError
    from jaxlm.experiment.export import export_run
    from jaxlm.files import writable_dir

    if args.step is not None and args.step < 0:
        raise UsageError(f"--step must be >= 0, got {args.step}")
    if Path(args.output).exists() and not Path(args.output).is_dir():
        raise UsageError(f"--output {args.output}: is a file, not a directory")
    writable_dir(Path(args.output).parent, "--output", named=args.output)  # before restoring anything
    summary = export_run(args.workdir, args.output, step=args.step, merged=args.merged,
                         search_paths=gin_search_paths(args), dtype=args.dtype)
    print(jsonl.dumps(summary))
    return 0


def register(subparsers: Any) -> dict[str, Callable[[Any], int]]:
    """Add `export`; return {"export": handler}."""
    from jaxlm.checkpoints.hf import FLOAT_DTYPES

    p = subparsers.add_parser("export", help="a trained run -> HF dir, PEFT adapter, or merged HF dir",
                              description=EXPORT_HELP, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workdir", required=True, help="the run directory (RUN/config.gin, RUN/checkpoints/)")
    p.add_argument("--output", required=True, help="directory to write")
    p.add_argument("--step", type=int, default=None, help="checkpoint step (default: the newest readable)")
    p.add_argument("--merged", action="store_true", help="fold a LoRA into the base: a plain HF directory")
    p.add_argument("--dtype", default="float32", choices=FLOAT_DTYPES,
                   help="dtype of the written tensors (a TAGI hypernetwork export: float32 only)")
    p.add_argument("--gin_search_paths", default="", help="comma-separated directories to look up gin files in")
    return {"export": cmd_export}
