"""`jaxlm demo`: the main job (`make demo`), the stages of `jaxlm.experiment.demo` on embedded defaults."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from jaxlm.commands.gin_flags import add_gin_flags, gin_bindings, gin_search_paths, gin_subparser


def cmd_demo(args: Any) -> int:
    from jaxlm.experiment.demo import STAGES, run_demo
    from jaxlm.files import RunLock

    stages = tuple(s for s in args.stages.split(",") if s) if args.stages else STAGES
    with RunLock(args.workdir):  # checks the directory is writable first
        return run_demo(args.workdir, args.gin_file, gin_bindings(args), stages, gin_search_paths(args))


def register(subparsers: Any) -> dict[str, Callable[[Any], int]]:
    """Add `demo`; return {"demo": handler}."""
    demo = gin_subparser(subparsers, "demo", help="the main job: the instruction-learning study on embedded "
                         "defaults (jaxlm/configs/demo/*.gin)")
    demo.add_argument("--workdir", default="runs/demo", help="run directory (a rerun resumes it)")
    add_gin_flags(demo, file_help="extra gin file parsed after every stage's own, e.g. jaxlm/configs/tests/tiny_demo.gin")
    demo.add_argument("--stages", default=None, help="comma-separated subset of rules,base,tagi,rewrite,smollm2")
    return {"demo": cmd_demo}
