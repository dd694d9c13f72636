"""Hugging Face directories: read and write `config.json` + `*.safetensors` (sharded or not).

Our module names mirror Hugging Face's, so one rule (`hf_tensor_name`) names every family's
tensors; `convert_to_params` / `convert_from_params` move the arrays.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Callable, Mapping

import numpy as np

from jaxlm.errors import JaxlmError

WEIGHTS_NAME = "model.safetensors"
INDEX_NAME = "model.safetensors.index.json"


class CheckpointError(JaxlmError):
    """A weight directory or file that cannot be read; the message names the file and field."""


def read_config(path: str | os.PathLike) -> dict[str, Any]:
    """The parsed `config.json` of a HF directory.

    Raises:
      CheckpointError: missing, not a JSON object, or `architectures` not a list of strings.
    """
    cfg = Path(path) / "config.json"
    if not cfg.is_file():
        raise CheckpointError(f"{cfg}: missing (a Hugging Face model directory needs config.json)")
    try:
        values = json.loads(cfg.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{cfg}: invalid JSON ({e})") from None
    if not isinstance(values, dict):
        raise CheckpointError(f"{cfg}: expected a JSON object, got {type(values).__name__}")
    archs = values.get("architectures")
    if archs is not None and not (isinstance(archs, list) and all(isinstance(a, str) for a in archs)):
        raise CheckpointError(f"{cfg}: field 'architectures' = {archs!r} must be a list of strings")
    return values


def read_safetensors_file(file: str | os.PathLike) -> dict[str, np.ndarray]:
    """Every tensor of one .safetensors file as a numpy array in its stored dtype (bf16 as
    `ml_dtypes.bfloat16`, which plain numpy readers cannot load).

    Args:
      file: a .safetensors file.

    Returns:
      {tensor name: array}, in the file's order.

    Raises:
      CheckpointError: the file is missing or unreadable (naming the file and the reader's error).
    """
    from safetensors import safe_open

    try:
        with safe_open(str(file), framework="flax") as f:
            return {key: np.asarray(f.get_tensor(key)) for key in f.keys()}
    except Exception as e:  # safetensors raises its own error types
        raise CheckpointError(f"{file}: cannot read safetensors ({e})") from None


def is_float(dtype: np.dtype) -> bool:
    """True for numpy float dtypes and ml_dtypes' (bfloat16, float8), whose numpy kind is 'V'."""
    import jax.numpy as jnp

    return bool(jnp.issubdtype(dtype, jnp.floating))


def read_safetensors(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """All tensors of a HF directory as float32/int numpy arrays (follows a sharded index)."""
    path = Path(path)
    index = path / INDEX_NAME
    if index.is_file():
        weight_map = json.loads(index.read_text()).get("weight_map")
        if not isinstance(weight_map, dict):
            raise CheckpointError(f"{index}: field 'weight_map' missing or not an object")
        files = sorted(set(weight_map.values()))
    else:
        files = sorted(p.name for p in path.glob("*.safetensors"))
    if not files:
        raise CheckpointError(f"{path}: no *.safetensors files (and no {INDEX_NAME})")
    tensors: dict[str, np.ndarray] = {}
    for name in files:
        file = path / name
        if not file.is_file():
            raise CheckpointError(f"{file}: named in {INDEX_NAME} but missing")
        for key, value in read_safetensors_file(file).items():
            tensors[key] = value.astype(np.float32) if is_float(value.dtype) else value
    return tensors


def write_dir(
    path: str | os.PathLike,
    tensors: Mapping[str, np.ndarray],
    config: Mapping[str, Any],
    write_extra: Callable[[Path], None] | None = None,
) -> Path:
    """Write a HF directory atomically (a temp dir renamed into place): config.json,
    model.safetensors, and whatever `write_extra(tmp_dir)` adds (tokenizer files);
    an existing directory is replaced whole."""
    from safetensors.numpy import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    try:
        arrays = {k: np.ascontiguousarray(v) for k, v in tensors.items()}  # float32 from convert_from_params
        save_file(arrays, str(tmp / WEIGHTS_NAME), metadata={"format": "pt"})
        (tmp / "config.json").write_text(json.dumps(dict(config), indent=2, sort_keys=True))
        if write_extra is not None:
            write_extra(tmp)
        if path.exists():
            backup = path.with_name(f".{path.name}.old")
            shutil.rmtree(backup, ignore_errors=True)
            path.rename(backup)
            tmp.rename(path)
            shutil.rmtree(backup, ignore_errors=True)
        else:
            tmp.rename(path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return path


def hf_tensor_name(
    path: tuple[str, ...], indexed: tuple[str, ...], prefix: str = "", unprefixed: tuple[str, ...] = ()
) -> str:
    """Our param path -> HF tensor name: `<c>_<i>` -> `<c>.<i>` for the indexed containers `indexed`
    (e.g. `layers_3` -> `layers.3`; T5's `wi_0` is not one), `kernel`/`embedding` -> `weight`, and
    `prefix` before every name whose first component is not in `unprefixed` (Llama's `lm_head`)."""
    parts: list[str] = []
    for key in path:
        container, _, index = key.rpartition("_")
        if container in indexed and index.isdigit():
            parts += [container, index]
        elif key in ("kernel", "embedding"):
            parts.append("weight")
        else:
            parts.append(key)
    name = ".".join(parts)
    return name if path[0] in unprefixed else prefix + name


def flatten(tree: Mapping[str, Any], prefix: tuple[str, ...] = ()) -> dict[tuple[str, ...], Any]:
    out: dict[tuple[str, ...], Any] = {}
    for key, value in tree.items():
        if isinstance(value, Mapping):
            out.update(flatten(value, prefix + (key,)))
        else:
            out[prefix + (key,)] = value
    return out


def unflatten(flat: Mapping[tuple[str, ...], Any]) -> dict[str, Any]:
    tree: dict[str, Any] = {}
    for path, value in flat.items():
        node = tree
        for key in path[:-1]:
            node = node.setdefault(key, {})
        node[path[-1]] = value
    return tree


def convert_to_params(
    tensors: Mapping[str, np.ndarray],
    expected: Mapping[str, Any],
    hf_name: Callable[[tuple[str, ...]], str],
    source: str,
) -> dict[str, Any]:
    """Fill the param tree `expected` (abstract shapes) from HF `tensors`.

    `hf_name(path)` gives the HF tensor name of our param `path`; kernels are stored (in, out) here
    and (out, in) in HF, so 2-D `kernel` leaves are transposed. Missing tensors and shape mismatches
    raise a CheckpointError naming the tensor and `source`.
    """
    flat = {}
    for path, leaf in flatten(expected).items():
        name = hf_name(path)
        if name not in tensors:
            raise CheckpointError(f"{source}: tensor {name!r} (for param {'/'.join(path)}) is missing")
        value = np.asarray(tensors[name], dtype=np.float32)
        if path[-1] == "kernel":
            value = value.T
        if tuple(value.shape) != tuple(leaf.shape):
            raise CheckpointError(
                f"{source}: tensor {name!r} has shape {value.shape}, expected {tuple(leaf.shape)} for {'/'.join(path)}"
            )
        flat[path] = value
    return unflatten(flat)


def convert_from_params(params: Mapping[str, Any], hf_name: Callable[[tuple[str, ...]], str]) -> dict[str, np.ndarray]:
    """Inverse of `convert_to_params`: our param tree -> {HF name: (out, in) array}."""
    out = {}
    for path, value in flatten(params).items():
        value = np.asarray(value, dtype=np.float32)
        out[hf_name(path)] = value.T if path[-1] == "kernel" else value
    return out
