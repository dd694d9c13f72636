"""gin for training runs, the t5x way: experiment files `include` a model file and a run file and set
a few macros; `--gin.KEY=value` overrides; the operative config lands in the run directory.

Every configurable a run may name is registered here before parsing, so an unknown configurable or
parameter (a typo) fails at parse time, before any compute, as a ConfigError naming it. Nothing
here imports TensorFlow: the seqio data sources (`jaxlm.experiment.data_sources`) import `jaxlm.data`
only when a run actually calls them.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import gin

from jaxlm.errors import ConfigError

# The directory holding the `jaxlm` package (the checkout's root, or site-packages once installed):
# `jaxlm/configs/...` gin files and their includes resolve against it from any working directory.
GIN_ROOT = Path(__file__).resolve().parents[2]
_REGISTERED = False
_SEARCH_PATHS: set[str] = set()  # directories already handed to gin (it keeps a list and never dedups)


class _NoPackageLookupNoise(logging.Filter):
    """gin tries every relative include as a Python-package resource too and logs 'Path not found' on
    the root logger for each miss, although the file is then found on a search path: drop those."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not (record.module == "resource_reader" and str(record.msg).startswith("Path not found"))


def register_configurables() -> None:
    """Make every configurable (training and evaluation sweeps) known to gin before any config is parsed
    and locked (idempotent): importing one later, after a parse, is a gin error."""
    global _REGISTERED
    if _REGISTERED:
        return
    from jaxlm.data.string_rewrite import (
        RewriteConfig,  # plain Python: no seqio/TensorFlow import
    )
    from jaxlm.eval import methods, rewrite, sweep  # noqa: F401  (their @gin.configurable)
    from jaxlm.models.hypernet import HypernetConfig
    from jaxlm.models.llama import LlamaConfig
    from jaxlm.models.lora import LoraSpec
    from jaxlm.models.t5 import T5Config
    from jaxlm.experiment import data_sources, runner  # noqa: F401  (their @gin.configurable)
    from jaxlm.train import loop, objectives, optim, synthetic, tagi  # noqa: F401  (their @gin.configurable)
    from jaxlm import files  # noqa: F401  (data_root)

    for cls in (LlamaConfig, T5Config, LoraSpec, RewriteConfig, HypernetConfig):
        gin.external_configurable(cls)
    gin.add_config_file_search_path(str(GIN_ROOT))
    _REGISTERED = True


def find_gin_file(name: str, search_paths: Sequence[str] = ()) -> Path | None:
    """`name` as given, else under each search path, else under `GIN_ROOT`; None if absent."""
    for root in (None, *search_paths, GIN_ROOT):
        candidate = Path(name) if root is None else Path(root) / name
        if candidate.is_file():
            return candidate
    return None


def parse_config(gin_files: Sequence[str], bindings: Sequence[str] = (), search_paths: Sequence[str] = ()) -> None:
    """Clear gin, then parse files + bindings.

    Args:
      gin_files: gin files, found as given, then under `search_paths`, then under `GIN_ROOT` (so
        `jaxlm/configs/...` works from any directory; their `include`s are looked up the same way).
      bindings: 'KEY = value' strings applied after the files, in order.
      search_paths: directories to look up gin files and includes in.

    Raises:
      ConfigError: a missing file, a parse error, an unknown configurable or parameter, or a macro
        never defined (`%gin.REQUIRED` macros left unset are named); the message names the file or binding.
    """
    register_configurables()
    gin.clear_config()
    for path in search_paths:
        if not Path(path).is_dir():
            raise ConfigError(f"--gin_search_paths {path}: not a directory")
        if path not in _SEARCH_PATHS:
            _SEARCH_PATHS.add(path)
            gin.add_config_file_search_path(path)
    files = []
    for f in gin_files:
        found = find_gin_file(f, search_paths)
        if found is None:
            raise ConfigError(f"--gin_file {f}: no such file")
        files.append(str(found))
    quiet = _NoPackageLookupNoise()
    logging.getLogger().addFilter(quiet)
    try:
        gin.parse_config_files_and_bindings(files, [], finalize_config=False)
    except (OSError, ValueError, KeyError, SyntaxError) as e:
        raise ConfigError(f"gin file {', '.join(gin_files)}: {_first_line(e)}") from None
    finally:
        logging.getLogger().removeFilter(quiet)
    for binding in bindings:
        try:
            gin.parse_config(binding)
        except (ValueError, KeyError, SyntaxError) as e:
            raise ConfigError(f"gin binding {binding!r}: {_first_line(e)}") from None
    try:
        gin.finalize()  # validates macros: a %NAME never defined fails here
    except ValueError as e:
        raise ConfigError(f"gin config {', '.join(gin_files)}: {_first_line(e).split(' in config string')[0]}") from None
    check_binding_types()


def check_binding_types() -> None:
    """Every bound value against its parameter's annotation, before anything runs.

    gin passes values through untyped, so `train.num_steps = 'ten'` would fail deep inside the run (or
    not at all). Checked: annotations made of int, float (an int is accepted), bool, str, None, tuples,
    lists and sequences (the container only), and unions of these; macros are resolved; references
    (`@name`) and any other annotation are left alone.

    Raises:
      ConfigError: a value of the wrong type; the message names the binding, the expected and the
        given type.
    """
    from gin import config as gin_config

    for (scope, selector), params in list(gin_config._CONFIG.items()):  # noqa: SLF001 - no public listing
        configurable = gin_config._REGISTRY.get_match(selector)  # noqa: SLF001
        if configurable is None or selector == "gin.macro":
            continue
        hints = _type_hints(configurable.wrapped)
        for name, value in params.items():
            hint = hints.get(name)
            if hint is None:
                continue
            value = _resolve_macro(value, gin_config)
            if isinstance(value, gin_config.ConfigurableReference):
                continue
            if not _matches(value, hint):
                binding = f"{scope + '/' if scope else ''}{configurable.name}.{name}"
                raise ConfigError(f"gin binding {binding} = {value!r}: expected {_type_name(hint)}, "
                                  f"got {type(value).__name__}")


def _type_hints(fn: Any) -> dict[str, Any]:
    """The resolved annotations of a function, or of a class's fields / __init__ ({} when they do not
    resolve)."""
    import typing

    target = fn
    if isinstance(fn, type) and not hasattr(fn, "__dataclass_fields__"):
        target = fn.__init__
    try:
        return typing.get_type_hints(target)
    except Exception:  # noqa: BLE001 - an annotation naming something unimportable: not checked
        return {}


def _resolve_macro(value: Any, gin_config: Any) -> Any:
    """A `%MACRO` reference replaced by its bound value (macros of macros followed)."""
    for _ in range(32):
        if not (isinstance(value, gin_config.ConfigurableReference) and value.configurable.name == "macro"):
            return value
        scope = value.scoped_selector.rsplit("/", 1)[0]
        bound = gin_config._CONFIG.get((scope, "gin.macro"), {})  # noqa: SLF001
        if "value" not in bound:
            return value
        value = bound["value"]
    return value


def _matches(value: Any, hint: Any) -> bool:
    """Whether `value` (a parsed gin literal) fits annotation `hint`; unknown annotations match."""
    import collections.abc
    import types
    import typing

    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        return any(_matches(value, h) for h in typing.get_args(hint))
    if hint is type(None):
        return value is None
    if hint is bool:
        return isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if hint is str:
        return isinstance(value, str)
    if origin in (tuple, list, collections.abc.Sequence) or hint in (tuple, list):
        return isinstance(value, (tuple, list))
    return True


def _type_name(hint: Any) -> str:
    return hint.__name__ if isinstance(hint, type) else str(hint).replace("typing.", "")


def run_gin_files(gin_files: list[str], bindings: list[str], workdir: str | Path) -> dict[str, Any]:
    """Parse gin files + bindings and run them (`jaxlm.experiment.runner.run_parsed_config`): experiment
    drivers' one call."""
    from jaxlm.experiment.runner import run_parsed_config

    parse_config(gin_files, bindings)
    return run_parsed_config(workdir)


def split_override(arg: str) -> str:
    """'--gin.train.num_steps=10' -> 'train.num_steps=10'."""
    body = arg.removeprefix("--gin.")
    if "=" not in body:
        raise ConfigError(f"{arg}: expected --gin.KEY=value")
    key, _, value = body.partition("=")
    return f"{key} = {value}"


def _first_line(e: BaseException) -> str:
    text = str(e).strip() or type(e).__name__
    return " ".join(text.splitlines()[:2])
