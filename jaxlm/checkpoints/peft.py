"""PEFT adapter directories (`adapter_config.json` + `adapter_model.safetensors`) <-> LoraWeights.

PEFT stores `lora_A.weight` (r, in) and `lora_B.weight` (out, r) per module under
`base_model.model.<HF module name>`; our leaves are A (in, r) and B (r, out), so each is transposed.
The HF module name comes from the family's own param naming, so every family exports the same way.

Per-module rank and alpha (`rank_pattern` / `alpha_pattern`, matched as peft matches them) and
`use_rslora` (scale alpha / sqrt(r)) are honoured by folding each module's scale into its B:
LoraWeights carries one scale, and B is stored as B * (module scale / that scale), so the adapted
model is the same function (continuing training from such an adapter moves B on that footing).
`modules_to_save` (full copies of base modules, e.g. `lm_head`) replace the base params
(`load_peft_model`). Every other adapter_config.json key is used, ignored with a reason, or refused
by name (`jaxlm.checkpoints.fields.ADAPTER_CONFIG`).
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from jaxlm.checkpoints.fields import refuse
from jaxlm.checkpoints.hf import (
    FLOAT_DTYPES,
    CheckpointError,
    flatten,
    read_json_object,
    read_safetensors_file,
    unflatten,
)
from jaxlm.checkpoints.pretrained import Pretrained, family
from jaxlm.files import write_dir_atomically
from jaxlm.models.lora import LoraWeights

_TASK_TYPES = {"llama": "CAUSAL_LM", "t5": "SEQ_2_SEQ_LM", "bert": "FEATURE_EXTRACTION"}
_PREFIX = "base_model.model."
CONFIG_NAME, WEIGHTS_NAME = "adapter_config.json", "adapter_model.safetensors"
TABLE = "adapter_config.json"


def _module_name(family_name: str, path: tuple[str, ...]) -> str:
    return family(family_name).hf_name(path + ("kernel",)).removesuffix(".weight")


def pattern_value(patterns: Mapping[str, Any], module: str, default: Any) -> Any:
    """peft's `get_pattern_key`: the value of the first pattern key (a regex) that matches the end of
    the module name at a dot boundary (`q_proj` matches `model.layers.0.self_attn.q_proj`), else `default`.

    Args:
      patterns: `rank_pattern` or `alpha_pattern` of an adapter_config.json.
      module: the full HF module name, e.g. "model.layers.0.self_attn.q_proj".
      default: `r` or `lora_alpha`.

    Returns:
      The matched pattern's value or `default`.
    """
    for key in patterns:
        if re.match(rf"(.*\.)?({key})$", module):
            return patterns[key]
    return default


def module_scale(cfg: Mapping[str, Any], module: str) -> tuple[int, float]:
    """(rank, scale) of one module under an adapter config: alpha / r, or alpha / sqrt(r) with use_rslora.

    Args:
      cfg: the parsed adapter_config.json.
      module: the full HF module name.

    Returns:
      (r for this module, its LoRA scale).
    """
    r = int(pattern_value(cfg.get("rank_pattern") or {}, module, cfg["r"]))
    alpha = float(pattern_value(cfg.get("alpha_pattern") or {}, module, cfg["lora_alpha"]))
    return r, alpha / (math.sqrt(r) if cfg.get("use_rslora") else r)


def export_peft_adapter(
    lora: LoraWeights,
    pretrained: Pretrained,
    path: str | Path,
    base_model_name_or_path: str | None = None,
    modules_to_save: Sequence[str] = (),
    dtype: str = "float32",
) -> Path:
    """Write one adapter (no batch axis) as a PEFT directory, atomically.

    Modules whose rank differs from `lora.rank` get `rank_pattern` and `alpha_pattern` entries (full
    module names) that keep the scale at `lora.scale`.

    Args:
      lora: a single adapter.
      pretrained: its base (family naming; the params of `modules_to_save` are read from it).
      path: the directory to write (replaced whole).
      base_model_name_or_path: written to the config (default: `pretrained.source`).
      modules_to_save: base module names (e.g. "lm_head") whose full params are saved beside the
        adapter, as peft's `modules_to_save`.
      dtype: the stored tensors' dtype (one of `hf.FLOAT_DTYPES`; peft loads each).

    Returns:
      `path`.

    Raises:
      ValueError: `lora` is batched, a name in `modules_to_save` matches no module of the base, or
        `dtype` is not one of `hf.FLOAT_DTYPES`.
    """
    import jax.numpy as jnp
    from safetensors.numpy import save_file

    if dtype not in FLOAT_DTYPES:
        raise ValueError(f"export dtype {dtype!r}: expected float32, bfloat16 or float16")
    stored = jnp.dtype(dtype)
    if lora.batched:
        raise ValueError("export one adapter at a time: this LoRA has a leading batch axis (use lora.select)")
    tensors: dict[str, np.ndarray] = {}
    targets: set[str] = set()
    rank_pattern: dict[str, int] = {}
    for leaf_path, value in flatten(lora.params).items():
        module_path, leaf = leaf_path[:-1], leaf_path[-1]
        module = _module_name(pretrained.family, module_path)
        kind = "lora_A" if leaf == "a" else "lora_B"
        tensors[f"{_PREFIX}{module}.{kind}.weight"] = np.ascontiguousarray(np.asarray(value, np.float32).T.astype(stored))
        targets.add(module_path[-1])
        r = int(value.shape[-1 if leaf == "a" else 0])
        if r != lora.rank:
            rank_pattern[re.escape(module)] = r
    fam = family(pretrained.family)
    for name in modules_to_save:
        found = [p for p in flatten(pretrained.params) if name in p[:-1]]
        if not found:
            raise ValueError(f"modules_to_save: {name!r} is not a module of this {pretrained.family} model")
        for p in found:
            value = np.asarray(flatten(pretrained.params)[p], np.float32)
            tensors[_PREFIX + fam.hf_name(p)] = np.ascontiguousarray((value.T if p[-1] == "kernel" else value).astype(stored))
    config = {
        "peft_type": "LORA",
        "task_type": _TASK_TYPES[pretrained.family],
        "r": lora.rank,
        "lora_alpha": lora.alpha,
        "rank_pattern": rank_pattern,
        "alpha_pattern": {k: lora.scale * r for k, r in rank_pattern.items()},
        "target_modules": sorted(targets),
        "modules_to_save": list(modules_to_save) or None,
        "lora_dropout": 0.0,
        "bias": "none",
        "fan_in_fan_out": False,
        "use_rslora": False,
        "inference_mode": True,
        "base_model_name_or_path": base_model_name_or_path or pretrained.source,
    }

    def fill(tmp: Path) -> None:
        save_file(tensors, str(tmp / WEIGHTS_NAME))
        (tmp / CONFIG_NAME).write_text(json.dumps(config, indent=2))

    return write_dir_atomically(path, fill)


def _read_config(cfg_file: Path) -> dict[str, Any]:
    cfg = read_json_object(cfg_file)
    for key in ("r", "lora_alpha"):
        if key not in cfg:
            raise CheckpointError(f"{cfg_file}: field {key!r} is missing")
    for key in ("r", "lora_alpha"):
        if isinstance(cfg[key], bool) or not isinstance(cfg[key], (int, float)) or cfg[key] <= 0:
            raise CheckpointError(f"{cfg_file}: field {key!r} = {cfg[key]!r} must be a positive number")
    for key in ("rank_pattern", "alpha_pattern"):
        if not isinstance(cfg.get(key) or {}, dict):
            raise CheckpointError(f"{cfg_file}: field {key!r} must be an object (module pattern -> number)")
    if cfg.get("peft_type", "LORA") != "LORA":
        raise CheckpointError(f"{cfg_file}: field 'peft_type' = {cfg['peft_type']!r} is not supported (only LORA)")
    refuse(TABLE, cfg, str(cfg_file))
    return cfg


def read_peft_adapter(path: str | Path, pretrained: Pretrained) -> tuple[LoraWeights, dict[tuple[str, ...], np.ndarray]]:
    """An adapter directory read onto `pretrained`'s param tree: the LoRA and the base params its
    `modules_to_save` replace.

    Args:
      path: a PEFT LoRA directory (float32, bf16 or fp16 tensors).
      pretrained: the base model.

    Returns:
      (LoraWeights with float32 leaves, rank `r` and alpha `lora_alpha`, each module's own scale folded
      into its B; {base param path: float32 array in our layout} for `modules_to_save`, possibly empty).

    Raises:
      CheckpointError: one line naming the file and the field or tensor: a missing file, a refused
        config key, a tensor for no module of the base, a shape that does not fit the base (both
        shapes named), a rank that differs from the config's, or an A without its B.
    """
    path = Path(path)
    cfg_file, weights = path / CONFIG_NAME, path / WEIGHTS_NAME
    for f in (cfg_file, weights):
        if not f.is_file():
            raise CheckpointError(f"{f}: missing (a PEFT adapter directory needs it)")
    cfg = _read_config(cfg_file)
    fam = family(pretrained.family)
    base = flatten(pretrained.params)
    by_module = {_module_name(pretrained.family, p[:-1]): p[:-1] for p in base if p[-1] == "kernel"}
    by_tensor = {fam.hf_name(p): p for p in base}
    lora = LoraWeights(params={}, rank=int(cfg["r"]), alpha=float(cfg["lora_alpha"]))
    flat: dict[tuple[str, ...], np.ndarray] = {}
    saved: dict[tuple[str, ...], np.ndarray] = {}
    saved_names = cfg.get("modules_to_save") or []
    for key, value in read_safetensors_file(weights).items():
        stem = key.removeprefix(_PREFIX)
        for kind, leaf in ((".lora_A.weight", "a"), (".lora_B.weight", "b")):
            if stem.endswith(kind):
                module = stem.removesuffix(kind)
                if module not in by_module:
                    raise CheckpointError(f"{weights}: tensor {key!r} targets {module!r}, not a module of this model")
                kernel = base[by_module[module] + ("kernel",)]
                d_in, d_out = kernel.shape
                r, _ = module_scale(cfg, module)
                expected = (r, d_in) if leaf == "a" else (d_out, r)
                if tuple(value.shape) != expected:
                    raise CheckpointError(
                        f"{weights}: tensor {key!r} has shape {tuple(value.shape)}, expected {expected} "
                        f"(r={r}, base {module} is {d_out}x{d_in})"
                    )
                flat[by_module[module] + (leaf,)] = np.asarray(value, np.float32).T
                break
        else:
            param = by_tensor.get(stem)
            if param is None or not any(re.search(rf"(^|\.){re.escape(n)}(\.|$)", stem) for n in saved_names):
                raise CheckpointError(f"{weights}: tensor {key!r} is not a LoRA A/B weight nor one of modules_to_save "
                                      f"{saved_names} of this model")
            value = np.asarray(value, np.float32)
            value = value.T if param[-1] == "kernel" else value
            if tuple(value.shape) != tuple(base[param].shape):
                raise CheckpointError(f"{weights}: tensor {key!r} has shape {tuple(value.shape)}, expected "
                                      f"{tuple(base[param].shape)} (the base's {stem})")
            saved[param] = value
    if not flat:
        raise CheckpointError(f"{weights}: no LoRA tensors")
    for module_path in {p[:-1] for p in flat}:
        module = _module_name(pretrained.family, module_path)
        for leaf, kind in (("a", "lora_A"), ("b", "lora_B")):
            if module_path + (leaf,) not in flat:
                raise CheckpointError(f"{weights}: tensor {_PREFIX}{module}.{kind}.weight is missing")
        fold = module_scale(cfg, module)[1] / lora.scale
        if fold != 1.0:
            flat[module_path + ("b",)] = flat[module_path + ("b",)] * np.float32(fold)
    return lora.replace(params=unflatten(flat)), saved


def load_peft_adapter(path: str | Path, pretrained: Pretrained) -> LoraWeights:
    """Read a PEFT LoRA directory onto `pretrained`'s param tree (errors name the file and field).

    Args:
      path: a PEFT LoRA directory.
      pretrained: the base model.

    Returns:
      The adapter (see `read_peft_adapter`).

    Raises:
      CheckpointError: as `read_peft_adapter`, or the adapter has `modules_to_save` tensors, which
        replace base params (use `load_peft_model`).
    """
    lora, saved = read_peft_adapter(path, pretrained)
    if saved:
        raise CheckpointError(
            f"{Path(path) / CONFIG_NAME}: field 'modules_to_save' replaces base modules "
            f"({sorted({'/'.join(p[:-1]) for p in saved})}); here only a LoRA can be applied (jaxlm score/generate "
            "--adapter and load_peft_model apply both)"
        )
    return lora


def load_peft_model(path: str | Path, pretrained: Pretrained) -> tuple[Pretrained, LoraWeights]:
    """The base with the adapter's `modules_to_save` params in place, and the adapter's LoRA.

    Args:
      path: a PEFT LoRA directory.
      pretrained: the base model (not modified).

    Returns:
      (`pretrained` with replaced params where modules_to_save has tensors, else `pretrained` itself;
      the LoraWeights).

    Raises:
      CheckpointError: as `read_peft_adapter`.
    """
    import jax.numpy as jnp

    lora, saved = read_peft_adapter(path, pretrained)
    if not saved:
        return pretrained, lora
    flat = flatten(pretrained.params)
    for p, value in saved.items():
        flat[p] = jnp.asarray(value, flat[p].dtype)
    return dataclasses.replace(pretrained, params=unflatten(flat)), lora
