"""`jaxlm` command line: dispatch only. Every handler lives in `jaxlm.commands`.

A module listed in `COMMAND_MODULES` defines `register(subparsers) -> dict[name, handler]`, where a
handler takes the parsed args and returns an exit status. Modules are imported lazily (only the
chosen command's heavy imports run: `jaxlm data` pulls seqio/TensorFlow, nothing else does).

Every user error (a wrong path, an unsupported architecture, a malformed input line) ends in one
line `jaxlm: error: ...` and exit status 2, never a traceback.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence
from typing import Any

from jaxlm.errors import JaxlmError

# module path -> the subcommand names it registers (so `--help` lists them without importing).
COMMAND_MODULES: dict[str, tuple[str, ...]] = {
    "jaxlm.commands.inference": ("score", "generate"),
    "jaxlm.commands.demo": ("demo",),
    "jaxlm.commands.data": ("data", "select", "align-encoder"),
    "jaxlm.commands.train": ("train", "adapter"),
    "jaxlm.commands.export": ("export",),
    "jaxlm.commands.plan": ("plan",),
    "jaxlm.commands.eval": ("metrics", "eval"),
}


def build_parser() -> tuple[argparse.ArgumentParser, Any]:
    """The top-level parser and its subparsers action (commands are added by `_register_modules`)."""
    parser = argparse.ArgumentParser(prog="jaxlm", description="JAX/Flax instruction-learning toolkit")
    return parser, parser.add_subparsers(dest="command", required=True)


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Descriptions as written; an option's default appended to its help line when it has a real one
    (not None / empty / a required option) and the help text does not already say it."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        default = action.default
        if (action.required or default in (None, "", [], argparse.SUPPRESS) or isinstance(default, bool)
                or "default" in text or not action.option_strings):
            return text
        return f"{text} (default: %(default)s)"


def _show_defaults(parser: argparse.ArgumentParser) -> None:
    """Give `parser` and every subcommand parser below it `HelpFormatter`."""
    parser.formatter_class = HelpFormatter
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for child in action.choices.values():
                _show_defaults(child)


def _register_modules(sub: Any, argv: Sequence[str]) -> dict[str, Any]:
    """Import only the module owning the chosen command (all of them for bare `--help`)."""
    chosen = next((a for a in argv if not a.startswith("-")), None)
    handlers: dict[str, Any] = {}
    for module, names in COMMAND_MODULES.items():
        if chosen is None or chosen in names:
            handlers.update(importlib.import_module(module).register(sub))
        else:
            for name in names:
                sub.add_parser(name, help=f"(see `jaxlm {name} --help`)")
    for child in sub.choices.values():
        _show_defaults(child)
    return handlers


def main(argv: Sequence[str] | None = None) -> int:
    """Run `jaxlm ARGS...`; returns the exit status (2 on a user error, 130 on Ctrl-C)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser, sub = build_parser()
    try:
        handlers = _register_modules(sub, argv)
        args = parser.parse_args(argv)
        return handlers[args.command](args)
    except JaxlmError as e:
        print(f"jaxlm: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("jaxlm: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
