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
FLOAT_DTYPES = ("float32", "bfloat16", "float16")  # what params are held in and checkpoints are written in
INDEX_NAME = "model.safetensors.index.json"


class CheckpointError(JaxlmError):
    """A weight directory or file that cannot be read; the message names the file and field."""



def read_json_object(file: str | os.PathLike) -> dict[str, Any]:
    """The JSON object in `file` (config.json, generation_config.json, adapter_config.json, ...).

    Raises:
      CheckpointError: the file is not valid UTF-8 JSON or not an object (one line naming the file).
    """
    try:
        values = json.loads(Path(file).read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{file}: invalid JSON ({e})") from None
    if not isinstance(values, dict):
        raise CheckpointError(f"{file}: expected a JSON object, got {type(values).__name__}")
    return values

def read_config(path: str | os.PathLike) -> dict[str, Any]:
    """The parsed `config.json` of a HF directory.

    Raises:
      CheckpointError: missing, not a JSON object, or `architectures` not a list of strings.
    """
    cfg = Path(path) / "config.json"
    if not cfg.is_file():
        raise CheckpointError(f"{cfg}: missing (a Hugging Face model directory needs config.json)")
    values = read_json_object(cfg)
    archs = values.get("architectures")
    if archs is not None and not (isinstance(archs, list) and all(isinstance(a, str) for a in archs)):
        raise CheckpointError(f"{cfg}: field 'architectures' = {archs!r} must be a list of strings")
    return values


def _safetensors_dtypes() -> dict[str, Any]:
    import ml_dtypes

    return {
        "F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16,
        "F8_E4M3": ml_dtypes.float8_e4m3fn, "F8_E5M2": ml_dtypes.float8_e5m2, "I64": np.int64, "I32": np.int32,
        "I16": np.int16, "I8": np.int8, "U64": np.uint64, "U32": np.uint32, "U16": np.uint16, "U8": np.uint8,
        "BOOL": np.bool_,
    }


class LazyTensors(Mapping[str, np.ndarray]):
    """A tensor map read on access: `entries` says where each tensor is; subclasses read one in
    `__getitem__`. Membership, iteration and length answer from `entries` alone (Mapping's default
    `in` would read the tensor)."""

    entries: dict[str, Any]

    def __getitem__(self, name: str) -> np.ndarray:
        raise NotImplementedError

    def __contains__(self, name: object) -> bool:
        return name in self.entries

    def __iter__(self):
        return iter(self.entries)

    def __len__(self) -> int:
        return len(self.entries)


class SafetensorsTensors(LazyTensors):
    """The tensors of safetensors files, read one at a time on access in their stored dtype (bf16 as
    `ml_dtypes.bfloat16`, which safetensors' numpy reader cannot load): nothing is held in memory
    beyond the tensor a caller keeps, so a loader converts one tensor at a time.

    Attributes:
      entries: {tensor name: (file, numpy dtype, shape, byte offset in the file)}.
    """

    def __init__(self, entries: Mapping[str, tuple[Path, Any, tuple[int, ...], int]]):
        self.entries = dict(entries)

    def __getitem__(self, name: str) -> np.ndarray:
        file, dtype, shape, offset = self.entries[name]
        count = int(np.prod(shape))
        try:
            data = np.fromfile(file, dtype=dtype, count=count, offset=offset)
        except OSError as e:
            raise CheckpointError(f"{file}: cannot read tensor {name!r} ({e})") from None
        if data.size != count:
            raise CheckpointError(f"{file}: tensor {name!r} is truncated ({data.size} of {count} values)")
        return data.reshape(shape)

    def renamed(self, rename: Callable[[str], str]) -> "SafetensorsTensors":
        """The same tensors under `rename(name)` (nothing is read)."""
        return SafetensorsTensors({rename(k): v for k, v in self.entries.items()})


def _safetensors_entries(file: Path) -> dict[str, tuple[Path, Any, tuple[int, ...], int]]:
    import struct

    dtypes = _safetensors_dtypes()
    try:
        with open(file, "rb") as f:
            (n,) = struct.unpack("<Q", f.read(8))
            header = json.loads(f.read(n))
        if not isinstance(header, dict):
            raise ValueError("header is not a JSON object")
        size = file.stat().st_size - 8 - n
    except (OSError, ValueError, struct.error, UnicodeDecodeError, MemoryError) as e:
        raise CheckpointError(f"{file}: cannot read safetensors ({e})") from None
    out = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype = dtypes[info["dtype"]]
            start, end = info["data_offsets"]
            shape = tuple(int(d) for d in info["shape"])
        except (KeyError, TypeError, ValueError):
            raise CheckpointError(f"{file}: tensor {name!r} has an unreadable header entry {info!r}") from None
        if not 0 <= start <= end <= size or end - start != np.dtype(dtype).itemsize * int(np.prod(shape)):
            raise CheckpointError(f"{file}: tensor {name!r} byte range {start}..{end} does not fit {shape} {info['dtype']}")
        out[name] = (file, dtype, shape, 8 + n + start)
    return out


def read_safetensors_file(file: str | os.PathLike) -> SafetensorsTensors:
    """The tensors of one .safetensors file, each read on access in its stored dtype.

    Args:
      file: a .safetensors file.

    Returns:
      A mapping {tensor name: array} (see `SafetensorsTensors`), in the file's order.

    Raises:
      CheckpointError: the file is missing, its header unreadable, a dtype unknown or a tensor's
        byte range outside the file (naming the file and the tensor).
    """
    return SafetensorsTensors(_safetensors_entries(Path(file)))


def is_float(dtype: np.dtype) -> bool:
    """True for numpy float dtypes and ml_dtypes' (bfloat16, float8), whose numpy kind is 'V'."""
    import jax.numpy as jnp

    return bool(jnp.issubdtype(dtype, jnp.floating))


def read_safetensors(path: str | os.PathLike) -> SafetensorsTensors:
    """All tensors of a HF directory (follows a sharded index), each read on access in its stored
    dtype (see `SafetensorsTensors`); `convert_to_params` converts them one at a time.

    Raises:
      CheckpointError: no safetensors files, a bad index, or an unreadable file.
    """
    path = Path(path)
    index = path / INDEX_NAME
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text()).get("weight_map")
        except (json.JSONDecodeError, UnicodeDecodeError, AttributeError) as e:
            raise CheckpointError(f"{index}: invalid index ({e})") from None
        if not isinstance(weight_map, dict):
            raise CheckpointError(f"{index}: field 'weight_map' missing or not an object")
        files = sorted(set(weight_map.values()))
    else:
        files = sorted(p.name for p in path.glob("*.safetensors"))
    if not files:
        raise CheckpointError(f"{path}: no *.safetensors files (and no {INDEX_NAME})")
    entries: dict[str, tuple[Path, Any, tuple[int, ...], int]] = {}
    for name in files:
        file = path / name
        if not file.is_file():
            raise CheckpointError(f"{file}: named in {INDEX_NAME} but missing")
        entries.update(_safetensors_entries(file))
    return SafetensorsTensors(entries)


def write_dir(
    path: str | os.PathLike,
    tensors: Mapping[str, np.ndarray],
    config: Mapping[str, Any],
    write_extra: Callable[[Path], None] | None = None,
    max_shard_bytes: int | None = None,
) -> Path:
    """Write a HF directory atomically (a temp dir renamed into place): config.json, the tensors
    and whatever `write_extra(tmp_dir)` adds (tokenizer files); an existing directory is replaced whole.

    Tensors are written one at a time (`write_safetensors`): with a `ParamTensors` mapping each is
    converted (gathered from its devices) just before it is written and dropped after, so the
    whole tree never exists on one host.

    Args:
      path: the directory.
      tensors: {HF name: array} in the dtype to store, or a `ParamTensors` (converted on access).
      config: the config.json dict.
      write_extra: writes further files into the temp directory.
      max_shard_bytes: above this many bytes of tensors, write model-0000i-of-0000n.safetensors
        shards (each at most this size unless one tensor is larger) and model.safetensors.index.json,
        as transformers does; None: one model.safetensors.

    Returns:
      `path`.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    try:
        sizes = {k: _nbytes(*tensor_spec(tensors, k)) for k in tensors}
        total = sum(sizes.values())
        if max_shard_bytes is None or total <= max_shard_bytes:
            write_safetensors(tmp / WEIGHTS_NAME, tensors, list(tensors), {"format": "pt"})
        else:
            shards: list[list[str]] = [[]]
            for key, size in sizes.items():
                if shards[-1] and sum(sizes[k] for k in shards[-1]) + size > max_shard_bytes:
                    shards.append([])
                shards[-1].append(key)
            weight_map = {}
            for i, shard in enumerate(shards):
                name = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
                write_safetensors(tmp / name, tensors, shard, {"format": "pt"})
                weight_map.update(dict.fromkeys(shard, name))
            index = {"metadata": {"total_size": total}, "weight_map": weight_map}
            (tmp / INDEX_NAME).write_text(json.dumps(index, indent=2, sort_keys=True))
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


def _nbytes(shape: tuple[int, ...], dtype: np.dtype) -> int:
    return int(np.prod(shape)) * np.dtype(dtype).itemsize


def tensor_spec(tensors: Mapping[str, Any], name: str) -> tuple[tuple[int, ...], np.dtype]:
    """(shape, numpy dtype) of `tensors[name]`, without converting a `ParamTensors` entry."""
    if isinstance(tensors, ParamTensors):
        return tensors.spec(name)
    value = tensors[name]
    return tuple(np.shape(value)), np.dtype(value.dtype)


def write_safetensors(file: Path, tensors: Mapping[str, Any], names: list[str], metadata: Mapping[str, str]) -> None:
    """Write `names` of `tensors` as one .safetensors file, streaming: the header from their shapes
    and dtypes, then each tensor's bytes, read from `tensors` one at a time and dropped after.

    Args:
      file: the file to write.
      tensors: {name: array} or a `ParamTensors`.
      names: the tensors to write, in file order.
      metadata: the header's `__metadata__` (str -> str).

    Raises:
      ValueError: a tensor's dtype has no safetensors name, or a converted tensor differs from its spec.
    """
    import struct

    names_of = {np.dtype(v): k for k, v in _safetensors_dtypes().items()}
    header: dict[str, Any] = {"__metadata__": dict(metadata)}
    specs, offset = {}, 0
    for name in names:
        shape, dtype = specs[name] = tensor_spec(tensors, name)
        if dtype not in names_of:
            raise ValueError(f"tensor {name!r}: dtype {dtype} cannot be stored in safetensors")
        size = _nbytes(shape, dtype)
        header[name] = {"dtype": names_of[dtype], "shape": list(shape), "data_offsets": [offset, offset + size]}
        offset += size
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # the data starts 8-byte aligned, as safetensors writes it
    with open(file, "wb") as f:
        f.write(struct.pack("<Q", len(raw)))
        f.write(raw)
        for name in names:
            value = np.ascontiguousarray(tensors[name])  # converted here, this tensor only
            if (tuple(value.shape), value.dtype) != specs[name]:
                raise ValueError(f"tensor {name!r} is {value.shape} {value.dtype}, its spec {specs[name]}")
            f.write(value.reshape(-1).view(np.uint8).data)
            del value


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
    dtype: Any = np.float32,
    shardings: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """Fill the param tree `expected` (abstract shapes) from HF `tensors`, one tensor at a time.

    `hf_name(path)` gives the HF tensor name of our param `path`; kernels are stored (in, out) here
    and (out, in) in HF, so 2-D `kernel` leaves are transposed. Each tensor is read from its stored
    dtype straight into `dtype`, so a bf16 checkpoint loaded with a bf16 `dtype` never exists in
    float32. With `shardings`, each tensor is placed on its mesh shards as it is read
    (`place_tensor`: every device receives only its slice, converted on host from the stored
    dtype) and the host copy is dropped before the next tensor is read, so the whole param tree
    never exists on one host.

    Args:
      tensors: {HF name: array} (memory-mapped views are read here, one at a time).
      expected: the param tree of abstract leaves (shapes).
      hf_name: our param path -> HF tensor name.
      source: named in errors.
      dtype: the params' dtype (the model's param_dtype).
      shardings: None (each param a jax array on the default device), or a tree with the structure
        of `expected` of `jax.sharding.Sharding`s (e.g. `jaxlm.sharding.logical_sharding` of the
        model's logical axes on a mesh).

    Returns:
      The param tree of jax arrays in `dtype` (global arrays in `shardings` when given).

    Raises:
      CheckpointError: a missing tensor or a shape mismatch, naming the tensor and `source`.
    """
    import jax.numpy as jnp

    from jaxlm.progress import bar

    flat = {}
    leaves = flatten(expected)
    placements = flatten(shardings) if shardings is not None else {}
    progress = bar(len(leaves), f"load {Path(source).name}", "tensor")
    for path, leaf in leaves.items():
        progress.update(1)
        name = hf_name(path)
        if name not in tensors:
            raise CheckpointError(f"{source}: tensor {name!r} (for param {'/'.join(path)}) is missing")
        value = tensors[name]  # read here, this tensor only
        if path[-1] == "kernel":
            value = value.T
        if tuple(value.shape) != tuple(leaf.shape):
            raise CheckpointError(
                f"{source}: tensor {name!r} has shape {value.shape}, expected {tuple(leaf.shape)} for {'/'.join(path)}"
            )
        if shardings is None:
            flat[path] = jnp.asarray(value, dtype)
        else:
            flat[path] = place_tensor(value, placements[path], dtype)
        del value  # the host copy goes before the next tensor is read
    progress.close()
    return unflatten(flat)


def place_tensor(value: np.ndarray, sharding: Any, dtype: Any) -> Any:
    """One host tensor -> a global jax.Array in `sharding`, each addressable device receiving only
    its slice, converted to `dtype` on host slice by slice (`jax.make_array_from_callback`; a slice
    several devices hold is converted once).

    Args:
      value: the tensor (any numpy / ml_dtypes dtype, any strides: a transposed view is fine).
      sharding: a `jax.sharding.Sharding` of `value.shape` (e.g. a NamedSharding on a mesh).
      dtype: the array's dtype.

    Returns:
      A jax.Array of `value.shape` and `dtype`, laid out in `sharding`.
    """
    import jax

    slices: dict[Any, np.ndarray] = {}  # devices holding the same slice (replicated axes) share one conversion

    def slice_of(index: tuple[slice, ...]) -> np.ndarray:
        key = tuple((i.start, i.stop, i.step) for i in index)
        if key not in slices:
            slices[key] = np.ascontiguousarray(value[index], dtype=dtype)
        return slices[key]

    return jax.make_array_from_callback(tuple(value.shape), sharding, slice_of, dtype=dtype)


class ParamTensors(LazyTensors):
    """Our param tree seen as {HF name: (out, in) array in `dtype`}, each converted on access (a
    device array is gathered to host then, one at a time); `spec(name)` gives shape and dtype
    without converting. What `convert_from_params` returns and `write_dir` streams to disk."""

    def __init__(self, params: Mapping[str, Any], hf_name: Callable[[tuple[str, ...]], str], dtype: Any):
        self.dtype = np.dtype(dtype)
        self.entries = {hf_name(path): (path, value) for path, value in flatten(params).items()}

    def spec(self, name: str) -> tuple[tuple[int, ...], np.dtype]:
        """(HF-order shape, stored dtype) of tensor `name`, nothing converted."""
        path, value = self.entries[name]
        shape = tuple(np.shape(value))
        return (shape[::-1] if path[-1] == "kernel" else shape), self.dtype

    def __getitem__(self, name: str) -> np.ndarray:
        path, value = self.entries[name]
        value = np.asarray(value).astype(self.dtype)
        return value.T if path[-1] == "kernel" else value


def convert_from_params(
    params: Mapping[str, Any], hf_name: Callable[[tuple[str, ...]], str], dtype: Any = np.float32
) -> ParamTensors:
    """Inverse of `convert_to_params`: our param tree -> {HF name: (out, in) array in `dtype`},
    converted tensor by tensor on access (`ParamTensors`)."""
    return ParamTensors(params, hf_name, dtype)
