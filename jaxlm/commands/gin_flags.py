"""The gin flags every gin-driven command takes (`train`, `plan`, `eval`, `demo`; `export` reads the run's
own config and takes only --gin_search_paths), t5x style:

  --gin_file PATH            a gin file (repeatable; later files win), found as given, then on the
                             search paths (the jaxlm checkout's root is always one)
  --gin.KEY=VALUE            one binding, e.g. --gin.train.num_steps=10 (repeatable; string values
                             need gin quotes: --gin.train.mesh_shape="'data=2,fsdp=4'")
  --gin_bindings 'KEY = V'   the same, as one argument (repeatable)
  --gin_search_paths DIRS    comma-separated directories where gin files and their includes are looked up
  --data_dir DIR             the task-data root (superni/, bigbench/, bbh/ inside): the same as
                             --gin.data_root.directory="'DIR'"; beats $JAXLM_DATA_DIR, which beats
                             ../shared/data (`jaxlm.files.data_root`)
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from typing import Any

from jaxlm.errors import UsageError
from jaxlm.experiment.gin_config import split_override


class ArgumentParser(argparse.ArgumentParser):
    """argparse whose errors (an unknown flag, `--batch_size x`, a bad choice) are a `UsageError`: one
    line `jaxlm: error: jaxlm score: argument --batch_size: invalid int value: 'x'`, exit 2, like every
    other user error (argparse's own prints the usage block first)."""

    def error(self, message: str):  # type: ignore[override]
        raise UsageError(f"{self.prog}: {message} (see {self.prog} --help)")


class GinArgumentParser(ArgumentParser):
    """Accepts `--gin.KEY=value` (an open-ended flag family argparse cannot declare) into args.gin_overrides."""

    def parse_known_args(self, args: Sequence[str] | None = None, namespace: Any = None):
        args = list(sys.argv[1:] if args is None else args)
        overrides = [a for a in args if a.startswith("--gin.")]
        rest = [a for a in args if not a.startswith("--gin.")]
        namespace, extras = super().parse_known_args(rest, namespace)
        namespace.gin_overrides = list(getattr(namespace, "gin_overrides", None) or []) + overrides
        return namespace, extras


def gin_subparser(subparsers: Any, name: str, **kwargs: Any) -> argparse.ArgumentParser:
    """A subcommand parser that accepts `--gin.KEY=value` (see `GinArgumentParser`)."""
    saved = subparsers._parser_class
    subparsers._parser_class = GinArgumentParser
    try:
        return subparsers.add_parser(name, **kwargs)
    finally:
        subparsers._parser_class = saved


def add_gin_flags(p: argparse.ArgumentParser, file_help: str = "gin file (repeatable; later files win)") -> None:
    """Add --gin_file, --gin_bindings and --gin_search_paths (--gin.KEY=value comes with `gin_subparser`)."""
    p.add_argument("--gin_file", action="append", default=[], help=file_help)
    p.add_argument("--gin_bindings", action="append", default=[],
                   help="'KEY = value' gin binding (repeatable); the same as --gin.KEY=value")
    p.add_argument("--gin_search_paths", default="", help="comma-separated directories to look up gin files in")
    p.add_argument("--data_dir", default=None,
                   help="task-data root holding superni/, bigbench/, bbh/ (default: $JAXLM_DATA_DIR, else ../shared/data)")


def gin_bindings(args: Any) -> list[str]:
    """Every binding of the command line, in order: --data_dir (as `data_root.directory`), then
    --gin_bindings, then each --gin.KEY=value (a later binding of the same key wins)."""
    root = getattr(args, "data_dir", None)
    first = [f"data_root.directory = {str(root)!r}"] if root else []
    return first + list(args.gin_bindings) + [split_override(a) for a in getattr(args, "gin_overrides", [])]


def gin_search_paths(args: Any) -> list[str]:
    """The --gin_search_paths directories, in order."""
    return [p for p in (getattr(args, "gin_search_paths", "") or "").split(",") if p]
