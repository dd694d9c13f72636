"""`jaxlm` command line: dispatch only. Every handler lives in `jaxlm.commands`.

A module listed in `COMMAND_MODULES` defines `register(subparsers) -> dict[name, handler]`, where a
handler takes the parsed args and returns an exit status. Modules are imported lazily (only the
chosen command's heavy imports run: `jaxlm data` pulls seqio/TensorFlow, nothing else does).

Every user error (a wrong path, an unsupported architecture, a malformed input line) ends in one
line `jaxlm: error: ...` and exit status 2, never a traceback; a closed stdout (`jaxlm metrics ... |
head`) ends quietly with status 141.

Compiled programs persist across runs (jax's compilation cache), on by default in a per-user
directory: `--compilation_cache_dir DIR` (or $JAXLM_COMPILATION_CACHE_DIR) moves it,
`--no_compilation_cache` (or $JAXLM_COMPILATION_CACHE=0) turns it off; both go before the command (`jaxlm --no_compilation_cache
generate ...`). A $JAX_COMPILATION_CACHE_DIR the user set is left as jax reads it.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from pathlib import Path
from collections.abc import Sequence
from typing import Any

from jaxlm.errors import DiskFullError, JaxlmError, is_disk_full

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


# Programs that compile faster than this are not worth a disk entry (seconds).
MIN_COMPILE_SECONDS = 0.2


def default_compilation_cache_dir() -> Path:
    """$JAXLM_COMPILATION_CACHE_DIR, else `files.user_cache_dir("jax_compilation")` (~/.cache/jaxlm/...)."""
    from jaxlm.files import user_cache_dir

    if os.environ.get("JAXLM_COMPILATION_CACHE_DIR"):
        return Path(os.environ["JAXLM_COMPILATION_CACHE_DIR"])
    return user_cache_dir("jax_compilation")


def enable_compilation_cache(directory: str | Path | None) -> Path | None:
    """Turns on jax's persistent compilation cache in `directory` (created if missing).

    Every program that took at least `MIN_COMPILE_SECONDS` to compile is written there and read back
    by later processes with the same jax version, device and program. A $JAX_COMPILATION_CACHE_DIR
    already set wins (jax reads it itself).

    Args:
      directory: the cache directory, or None to leave the cache off.

    Returns:
      The directory in use, or None when the cache stays off.
    """
    if directory is None:
        return None
    import jax

    if os.environ.get("JAX_COMPILATION_CACHE_DIR"):
        return Path(os.environ["JAX_COMPILATION_CACHE_DIR"])
    path = Path(directory).expanduser()
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError:  # a read-only home: run without the cache rather than fail
        return None
    jax.config.update("jax_compilation_cache_dir", str(path))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", MIN_COMPILE_SECONDS)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
    return path


def build_parser() -> tuple[argparse.ArgumentParser, Any]:
    """The top-level parser and its subparsers action (commands are added by `_register_modules`)."""
    from jaxlm.commands.gin_flags import ArgumentParser

    parser = ArgumentParser(prog="jaxlm", description="JAX/Flax instruction-learning toolkit")
    parser.add_argument("--compilation_cache_dir", default=None,
                        help="persistent jax compilation cache (default: $JAXLM_COMPILATION_CACHE_DIR or "
                             "~/.cache/jaxlm/jax_compilation)")
    parser.add_argument("--no_compilation_cache", action="store_true", help="compile every program afresh")
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
    values = {i + 1 for i, a in enumerate(argv) if a == "--compilation_cache_dir"}  # a flag's value, not a command
    chosen = next((a for i, a in enumerate(argv) if not a.startswith("-") and i not in values), None)
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
    try:
        parser, sub = build_parser()
        handlers = _register_modules(sub, argv)
        args = parser.parse_args(argv)
        if not args.no_compilation_cache and os.environ.get("JAXLM_COMPILATION_CACHE", "1") != "0":
            enable_compilation_cache(args.compilation_cache_dir or default_compilation_cache_dir())
        status = handlers[args.command](args)
        sys.stdout.flush()  # a closed pipe shows here, inside the handler below, not at interpreter exit
        return status
    except JaxlmError as e:
        if is_disk_full(e):
            _exit_disk_full(e)
        print(f"jaxlm: error: {one_line(e)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("jaxlm: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        return _closed_stdout()
    except OSError as e:
        if not is_disk_full(e):
            raise
        _exit_disk_full(e)


def one_line(error: BaseException) -> str:
    """`error`'s message as one line: gin's "In call to configurable ..." context lines (added when a
    configurable raises) are dropped, the remaining lines joined with " "."""
    lines = [line.strip() for line in str(error).splitlines()]
    return " ".join(line for line in lines if line and not line.startswith("In call to configurable"))


def _exit_disk_full(error: BaseException) -> None:
    """A full disk (during a checkpoint, a metrics write, anywhere): one line, then exit 2 at once, so the
    writers still open (TensorBoard's atexit flush, orbax's threads) add no tracebacks of their own.
    The line is the DiskFullError's in the chain when there is one (it names the checkpoint step)."""
    import os

    chain, seen = error, set()
    while chain is not None and id(chain) not in seen and not isinstance(chain, DiskFullError):
        seen.add(id(chain))
        chain = chain.__cause__ or chain.__context__
    message = one_line(chain if isinstance(chain, DiskFullError) else error)
    if isinstance(error, OSError) and getattr(error, "filename", None) and error.filename not in message:
        message = f"{error.filename}: {message}"
    if "disk full" not in message:
        message += " (disk full: free space and rerun; a run resumes from its last complete checkpoint)"
    print(f"jaxlm: error: {message}", file=sys.stderr)
    sys.stderr.flush()
    try:
        sys.stdout.flush()
    except OSError:
        pass
    os._exit(2)


def _closed_stdout() -> int:
    """The reader of stdout went away (`jaxlm metrics ... | head`): no traceback, and none again when
    Python flushes stdout at exit. Exit status 141 (128 + SIGPIPE), as a shell tool killed by it."""
    import os

    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())
    return 141


if __name__ == "__main__":
    sys.exit(main())
