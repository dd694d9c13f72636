"""Run metrics: `workdir/metrics.jsonl` (one flushed line per logged step), TensorBoard scalars
(tensorboardX, `workdir/tensorboard/`), a tqdm bar on a terminal, and MFU.

TensorBoard gets every numeric metric as a scalar (`train/<name>`; a name that already has a
prefix, e.g. `eval/loss`, keeps it), and once per run the operative gin config as text
(`config/gin`) and its bindings as hyperparameters (the hparams plugin; `gin_hparams`).

MFU = (FLOPs of one compiled step per device, from `compiled.cost_analysis()`) x steps / seconds /
(the device's peak FLOP/s). Peaks are dense bf16 datasheet numbers per chip; the CPU entry is a
nominal 1e11 FLOP/s per device (a few vectorised cores' order of magnitude) so CPU runs report a
number, not a measurement: CPU MFU is only comparable between CPU runs of the same machine.
"""

from __future__ import annotations

import json
import os
import sys
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import gin
import jax
from gin import config_parser

from jaxlm.jsonl import json_line

# device_kind substring (lower case) -> peak dense bf16 FLOP/s per device.
PEAK_FLOPS: tuple[tuple[str, float], ...] = (
    ("h200", 989e12),
    ("h100", 989e12),
    ("a100", 312e12),
    ("v5 lite", 197e12),  # TPU v5e reports "TPU v5 lite"
    ("v5e", 197e12),
    ("v5p", 459e12),
    ("v6", 918e12),  # TPU v6e (Trillium)
    ("v4", 275e12),
    ("cpu", 1e11),  # nominal, see module docstring
)

METRICS_FILE = "metrics.jsonl"


def peak_flops_per_device(device: jax.Device | None = None) -> float | None:
    """Datasheet peak of `device` (default: the first device), None when the kind is unknown."""
    kind = (device or jax.devices()[0]).device_kind.lower()
    for key, peak in PEAK_FLOPS:
        if key in kind:
            return peak
    return None


def mfu(flops_per_step: float | None, steps: int, seconds: float, peak: float | None) -> float | None:
    if not flops_per_step or not peak or seconds <= 0:
        return None
    return flops_per_step * steps / seconds / peak


def truncate_metrics(path: str | os.PathLike, last_step: int) -> int:
    """Keep the complete lines with step <= `last_step` (a resumed run rewrites what came after its
    checkpoint, so no step appears twice); returns how many lines were kept."""
    path = Path(path)
    if not path.is_file():
        return 0
    kept = []
    with open(path, "rb") as f:
        for raw in f:
            if not raw.endswith(b"\n"):
                break  # torn last line of a killed run
            try:
                record = json.loads(raw)
            except (json.JSONDecodeError, UnicodeDecodeError):
                break
            if record.get("step", 0) <= last_step:
                kept.append(raw)
    tmp = path.with_suffix(".jsonl.tmp")
    tmp.write_bytes(b"".join(kept))
    tmp.replace(path)
    return len(kept)


def read_metrics(path: str | os.PathLike) -> list[dict[str, Any]]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


class MetricsLogger:
    """Writes every logged step on process 0; other processes do nothing."""

    def __init__(self, workdir: str | os.PathLike, *, start_step: int, total_steps: int,
                 tensorboard: bool = True, progress: bool | None = None) -> None:
        self.enabled = jax.process_index() == 0
        self.workdir = Path(workdir)
        self._file = self._tb = self._bar = None
        if not self.enabled:
            return
        self.workdir.mkdir(parents=True, exist_ok=True)
        truncate_metrics(self.workdir / METRICS_FILE, start_step)
        self._file = open(self.workdir / METRICS_FILE, "a", encoding="utf-8")  # noqa: SIM115 - lives with the run
        if tensorboard:
            from tensorboardX import SummaryWriter

            self._tb = SummaryWriter(str(self.workdir / "tensorboard"), purge_step=start_step + 1)
        if progress is None:
            progress = sys.stderr.isatty()
        if progress:
            from tqdm import tqdm

            self._bar = tqdm(total=total_steps, initial=start_step, unit="step", dynamic_ncols=True)

    def log(self, step: int, values: Mapping[str, Any]) -> None:
        if not self.enabled:
            return
        record = {"step": int(step), **{k: _plain(v) for k, v in values.items()}}
        self._file.write(json_line(record))  # strict JSON: a NaN loss is null
        self._file.flush()
        if self._tb is not None:
            for k, v in record.items():
                if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool):
                    self._tb.add_scalar(k if "/" in k and k.split("/")[0] in TB_PREFIXES else f"train/{k}", v, step)
        if self._bar is not None:
            shown = {k: f"{record[k]:.4g}" for k in ("loss", "tokens_per_s") if isinstance(record.get(k), float)}
            self._bar.set_postfix(shown, refresh=False)
            self._bar.update(step - self._bar.n)

    def log_run(self, config_text: str, hparams: Mapping[str, Any], metrics: tuple[str, ...] = ("train/loss",)) -> None:
        """Write the run's description to TensorBoard (process 0): the config as text and the hparams.

        Args:
          config_text: the operative gin config (shown as a code block under the tag `config/gin`).
          hparams: {name: bool / int / float / str} (e.g. `gin_hparams(config_text)`); other values
            are written as their repr.
          metrics: scalar tags the hparams plugin shows beside the hyperparameters (e.g. "eval/loss").
        """
        if not self.enabled or self._tb is None:
            return
        from tensorboardX.summary import hparams as hparams_summary

        self._tb.add_text("config/gin", "\n".join("    " + line for line in config_text.splitlines()), 0)
        plain = {k: v if isinstance(v, (bool, int, float, str)) else repr(v) for k, v in hparams.items()}
        for summary in hparams_summary(plain, {name: 0.0 for name in metrics}):
            self._tb.file_writer.add_summary(summary)
        self._tb.flush()

    def close(self) -> None:
        for handle in (self._file, self._tb, self._bar):
            if handle is not None:
                handle.close()
        self._file = self._tb = self._bar = None


TB_PREFIXES = ("train", "eval")


class _Macro:
    def __init__(self, name: str) -> None:
        self.name = name

    def __repr__(self) -> str:
        return "%" + self.name


class _Reference:
    """What the hparams show for `@name` / `@name()` (the configurable's name, not its value)."""

    def __init__(self, name: str, evaluate: bool) -> None:
        self.text = "@" + name + ("()" if evaluate else "")

    def __repr__(self) -> str:
        return self.text


class _ValueHandler:
    def configurable_reference(self, scoped_name: str, evaluate: bool) -> _Reference:
        return _Reference(scoped_name, evaluate)

    def macro(self, name: str) -> _Macro:
        return _Macro(name)


def gin_hparams(config_text: str | None = None) -> dict[str, bool | int | float | str]:
    """The bindings of a gin config as flat hyperparameters, macros resolved.

    Args:
      config_text: gin config text (default: `gin.operative_config_str()`, what the run used).

    Returns:
      {"[scope/]configurable.param" or "MACRO": value}: numbers, bools and strings as they are;
      `%MACRO` replaced by the macro's value; references as "@name" / "@name()"; None as "None";
      tuples, lists and dicts as their repr.

    Raises:
      gin's SyntaxError: the text does not parse.
    """
    import io

    text = gin.operative_config_str() if config_text is None else config_text
    statements = [s for s in config_parser.ConfigParser(io.StringIO(text), _ValueHandler())
                  if isinstance(s, config_parser.BindingStatement)]
    macros = {s.selector: s.value for s in statements if not s.arg_name}

    def plain(value: Any, depth: int = 0) -> Any:
        if isinstance(value, _Macro) and value.name in macros and depth < 16:
            return plain(macros[value.name], depth + 1)
        if isinstance(value, _Macro):
            return "%" + value.name
        if isinstance(value, _Reference):
            return value.text
        if value is None:
            return "None"
        if isinstance(value, (bool, int, float, str)):
            return value
        return repr(value)

    out = {}
    for s in statements:
        name = s.selector if not s.arg_name else f"{s.selector}.{s.arg_name}"
        out[f"{s.scope}/{name}" if s.scope else name] = plain(s.value)
    return out


def _plain(value: Any) -> Any:
    """Device scalars -> Python numbers (float32 -> float round-trips bit for bit through JSON)."""
    if hasattr(value, "item"):
        value = value.item()
    return value


class Throughput:
    """Tokens/s and MFU between consecutive logs (compile time excluded by the caller's `reset`)."""

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.start, self.tokens, self.steps = time.perf_counter(), 0.0, 0

    def add(self, tokens: float) -> None:
        self.tokens += tokens
        self.steps += 1

    def report(self, flops_per_step: float | None, peak: float | None) -> dict[str, float]:
        seconds = max(time.perf_counter() - self.start, 1e-9)
        out = {"tokens_per_s": self.tokens / seconds, "steps_per_s": self.steps / seconds}
        value = mfu(flops_per_step, self.steps, seconds, peak)
        if value is not None:
            out["mfu"] = value
        self.reset()
        return out
