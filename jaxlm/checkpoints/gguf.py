"""GGUF files (llama.cpp): metadata -> LlamaConfig and tokenizer; tensors dequantized with the
`gguf` package's numpy kernels and renamed to Hugging Face names, undoing llama.cpp's Q/K row
permutation so the HF rotate-half RoPE applies.

The `gguf` package parses every metadata value element by element (a 49k-token vocabulary and its
merges: ~2.3 s of a ~8 s cold `jaxlm generate` on 2 cores), so the parsed header is kept in a per-user
index (`files.user_cache_dir("gguf_index")`, one JSON per file, off with $JAXLM_GGUF_INDEX=0): the
metadata values and each tensor's type, shape and byte range. The index is a function of the file's
header bytes alone, and is used only when a hash of those bytes still matches; tensor data is always
read from the file itself.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from pathlib import Path
from typing import Any, Mapping, NamedTuple

import numpy as np

from jaxlm.checkpoints.fields import GGUF, REFUSED, gguf_template
from jaxlm.checkpoints.hf import CheckpointError, LazyTensors
from jaxlm.checkpoints.tokenizer import Tokenizer
from jaxlm.models.llama import LlamaConfig, RopeScaling

_GGUF_TO_HF = {
    "token_embd": "model.embed_tokens",
    "output_norm": "model.norm",
    "output": "lm_head",
}
_BLOCK_TO_HF = {
    "attn_norm": "input_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_norm": "post_attention_layernorm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}


def read_fields(reader: Any) -> dict[str, Any]:
    """GGUF key/value metadata as plain Python values."""
    out = {}
    for key, field in reader.fields.items():
        try:
            out[key] = field.contents()
        except Exception:  # a field type the gguf package cannot decode: skip it, it is not ours to use
            continue
    return out


def _unpermute(w: np.ndarray, n_heads: int) -> np.ndarray:
    """Invert llama.cpp's convert_hf_to_gguf `permute` of q/k rows (interleaved -> rotate-half RoPE)."""
    rows = w.shape[0]
    return w.reshape(n_heads, rows // n_heads // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def refuse_fields(fields: dict[str, Any], arch: str, source: str) -> None:
    """Refuse metadata that would change the numbers and is not implemented (`fields.GGUF`).

    Raises:
      CheckpointError: naming the file and the first key that the table refuses with a non-neutral
        value, or an `<arch>.*` / `tokenizer.*` key the table does not know.
    """
    for key, value in fields.items():
        template = gguf_template(key, arch)
        field = GGUF.get(template)
        if field is None:
            if key.startswith((arch + ".", "tokenizer.")):
                raise CheckpointError(f"{source}: metadata key {key} is not known to jaxlm (it may change the numbers)")
            continue
        if field.status == REFUSED and not field.accepts(value):
            shown = value if not isinstance(value, list) or len(value) < 8 else f"[{len(value)} values]"
            raise CheckpointError(f"{source}: metadata key {key} = {shown!r} is not supported ({field.reason})")


def _rope_scaling(fields: dict[str, Any], arch: str, source: str) -> RopeScaling | None:
    kind = fields.get(f"{arch}.rope.scaling.type", "none")
    factor = float(fields.get(f"{arch}.rope.scaling.factor", 1.0))
    if kind == "none" or kind == "linear" and factor == 1.0:
        return None
    if kind == "linear":
        return RopeScaling("linear", factor)
    if kind == "yarn":
        original = fields.get(f"{arch}.rope.scaling.original_context_length") or fields.get(f"{arch}.context_length")
        if not original:
            raise CheckpointError(f"{source}: yarn RoPE needs {arch}.rope.scaling.original_context_length")
        return RopeScaling(
            "yarn", factor, int(original),
            beta_fast=float(fields.get(f"{arch}.rope.scaling.yarn_beta_fast", 32.0)),
            beta_slow=float(fields.get(f"{arch}.rope.scaling.yarn_beta_slow", 1.0)),
        )
    raise CheckpointError(f"{source}: metadata key {arch}.rope.scaling.type = {kind!r} is not supported (none, linear, yarn)")


def config_from_fields(fields: dict[str, Any], source: str) -> LlamaConfig:
    """LlamaConfig from GGUF metadata; every key is used, ignored or refused (`fields.GGUF`).

    Raises:
      CheckpointError: another architecture, a missing required key, or a refused key (named).
    """
    arch = fields.get("general.architecture")
    if arch not in ("llama", "mistral"):
        raise CheckpointError(f"{source}: general.architecture={arch!r} is not supported (llama, mistral)")
    refuse_fields(fields, arch, source)

    def need(key: str) -> Any:
        if f"{arch}.{key}" not in fields:
            raise CheckpointError(f"{source}: metadata field {arch}.{key} is missing")
        return fields[f"{arch}.{key}"]

    heads = int(need("attention.head_count"))
    tokens = fields.get("tokenizer.ggml.tokens") or []
    eos = fields.get("tokenizer.ggml.eos_token_id")
    key_length = fields.get(f"{arch}.attention.key_length")
    value_length = fields.get(f"{arch}.attention.value_length", key_length)
    if value_length != key_length:
        raise CheckpointError(f"{source}: metadata key {arch}.attention.value_length = {value_length} differs from "
                              f"key_length {key_length} (not supported)")
    head_dim = int(key_length) if key_length is not None else int(need("embedding_length")) // heads
    rope_dims = fields.get(f"{arch}.rope.dimension_count", head_dim)
    if rope_dims != head_dim:
        raise CheckpointError(f"{source}: metadata key {arch}.rope.dimension_count = {rope_dims} is not supported "
                              f"(partial rotary; head dim is {head_dim})")
    window = fields.get(f"{arch}.attention.sliding_window")
    return LlamaConfig(
        vocab_size=int(fields.get(f"{arch}.vocab_size", len(tokens))),
        hidden_size=int(need("embedding_length")),
        intermediate_size=int(need("feed_forward_length")),
        num_layers=int(need("block_count")),
        num_heads=heads,
        num_kv_heads=int(fields.get(f"{arch}.attention.head_count_kv", heads)),
        head_dim=int(fields[f"{arch}.attention.key_length"]) if f"{arch}.attention.key_length" in fields else None,
        rope_theta=float(fields.get(f"{arch}.rope.freq_base", 10000.0)),
        rope_scaling=_rope_scaling(fields, arch, source),
        sliding_window=int(window) if window else None,
        rms_norm_eps=float(need("attention.layer_norm_rms_epsilon")),
        max_position_embeddings=int(fields.get(f"{arch}.context_length", 2048)),
        bos_token_id=fields.get("tokenizer.ggml.bos_token_id"),
        eos_token_ids=(int(eos),) if eos is not None else (),
        pad_token_id=fields.get("tokenizer.ggml.padding_token_id"),
        tie_word_embeddings=True,  # fixed below from the tensor list
    )


class GgufTensors(LazyTensors):
    """The tensors of a GGUF file under HF names, each dequantized to float32 on access (the file is
    memory-mapped): like `hf.SafetensorsTensors`, nothing is held beyond the tensor a caller keeps.

    Attributes:
      entries: {HF tensor name: the gguf package's ReaderTensor}.
      heads: {HF name suffix of q/k projections: head count whose llama.cpp row permutation is undone}.
    """

    def __init__(self, entries: Mapping[str, Any], heads: Mapping[str, int]):
        self.entries, self.heads = dict(entries), dict(heads)

    def shape(self, name: str) -> tuple[int, ...]:
        """The (HF-order) shape of tensor `name`, without reading it."""
        return tuple(int(d) for d in reversed(self.entries[name].shape))  # GGUF lists dims innermost first

    def __getitem__(self, name: str) -> np.ndarray:
        import gguf

        t = self.entries[name]
        # A plain ndarray view of the mapped bytes: the numpy.memmap subclass costs a Python hook per slice
        # in the row-group kernels (~0.3 s of SmolLM2's load).
        w = gguf.quants.dequantize(np.asarray(t.data), t.tensor_type).astype(np.float32).reshape(self.shape(name))
        for suffix, n_heads in self.heads.items():
            if name.endswith(suffix):
                w = _unpermute(w, n_heads)
        return w


INDEX_FORMAT = 1  # bump when the index's contents change


class IndexedTensor(NamedTuple):
    """A tensor of the GGUF header index: what `GgufTensors` reads of a `gguf.ReaderTensor`."""
    tensor_type: Any  # gguf.GGMLQuantizationType
    shape: tuple[int, ...]  # GGUF order (innermost first)
    data: np.ndarray  # a read-only view of the file's bytes (uint8 blocks for quantized types)


def _index_file(path: Path) -> Path | None:
    from jaxlm.files import user_cache_dir

    if os.environ.get("JAXLM_GGUF_INDEX", "1") == "0":
        return None
    key = hashlib.blake2b(str(path.resolve()).encode(), digest_size=16).hexdigest()
    return user_cache_dir("gguf_index") / f"{key}.json"


def _gguf_version() -> str:
    from importlib.metadata import version

    return version("gguf")  # the index holds this version's parse


def _digest(header: np.ndarray) -> str:
    return hashlib.blake2b(header.tobytes(), digest_size=32).hexdigest()


def _read_index(path: Path) -> tuple[dict[str, Any], list[tuple[str, IndexedTensor]]] | None:
    """(fields, [(GGUF tensor name, tensor)]) from the index of `path`, or None when there is none or
    it no longer matches the file's header bytes (anything unreadable counts as no index). The hash
    is taken over the very mapping the tensors are then read from."""
    try:
        import gguf

        index = _index_file(path)
        if index is None or not index.is_file():
            return None
        meta = json.loads(index.read_text(encoding="utf-8"))
        if meta["format"] != INDEX_FORMAT or meta["gguf"] != _gguf_version():
            return None
        whole = np.memmap(path, mode="r")
        if whole.size != meta["size"] or _digest(whole[:meta["header_bytes"]]) != meta["header_digest"]:
            return None
        tensors = []
        for t in meta["tensors"]:
            dtype = np.dtype(t["dtype"])
            count = int(np.prod(t["data_shape"]))
            data = whole[t["offset"]:t["offset"] + count * dtype.itemsize].view(dtype).reshape(t["data_shape"])
            tensors.append((t["name"], IndexedTensor(gguf.GGMLQuantizationType(t["type"]), tuple(t["shape"]), data)))
        return meta["fields"], tensors
    except (OSError, ValueError, KeyError, TypeError, RuntimeError):
        return None


def _write_index(path: Path, reader: Any, fields: dict[str, Any]) -> None:
    """Keep the parsed header of `path` for the next process (best effort: a read-only or missing
    cache directory, a byte-swapped file or metadata JSON cannot hold is simply not indexed). Size
    and hash come from the reader's own mapping, so a file replaced meanwhile is never described by
    another file's parse."""
    from jaxlm.files import write_atomically

    try:
        index = _index_file(path)
        if index is None or reader.byte_order != "I":
            return
        header = int(reader.data_offset)
        meta = {"format": INDEX_FORMAT, "gguf": _gguf_version(), "size": int(reader.data.size),
                "header_bytes": header, "header_digest": _digest(reader.data[:header]), "fields": fields,
                "tensors": [{"name": t.name, "type": int(t.tensor_type), "shape": [int(d) for d in t.shape],
                             "offset": int(t.data_offset), "dtype": t.data.dtype.str, "data_shape": list(t.data.shape)}
                            for t in reader.tensors]}
        text = json.dumps(meta, ensure_ascii=False, allow_nan=False)
        if json.loads(text)["fields"] != fields:  # a value JSON would change (a tuple, a NaN): no index
            return
        write_atomically(index, lambda f: f.write(text))
    except (OSError, ValueError, TypeError, RuntimeError):
        return


def read_header(path: Path) -> tuple[dict[str, Any], list[tuple[str, Any]]]:
    """(metadata fields as plain values, [(GGUF tensor name, tensor with .tensor_type/.shape/.data)])
    of a GGUF file: from its index when the header hash matches, else parsed by `gguf.GGUFReader`
    (then indexed for the next process).

    Raises:
      CheckpointError: the file is missing or not a readable GGUF file.
    """
    import gguf

    if not path.is_file():
        raise CheckpointError(f"{path}: no such GGUF file")
    indexed = _read_index(path)
    if indexed is not None:
        return indexed
    try:
        reader = gguf.GGUFReader(str(path))
    except Exception as e:
        raise CheckpointError(f"{path}: not a readable GGUF file ({e})") from None
    fields = read_fields(reader)
    _write_index(path, reader, fields)
    return fields, [(t.name, t) for t in reader.tensors]


def load_gguf(path: str | Path) -> tuple[LlamaConfig, GgufTensors, Tokenizer]:
    """(config, HF-named tensors dequantized to float32 one at a time on access, tokenizer) of a
    llama-architecture GGUF file. The parsed header comes from the per-user index when its hash
    still matches the file (module docstring), else from `gguf.GGUFReader` (and is indexed).

    Raises:
      CheckpointError: the file is missing or unreadable, or a key/tensor is refused (named).
    """
    import dataclasses

    path = Path(path)
    fields, raw_tensors = read_header(path)
    config = config_from_fields(fields, str(path))
    tensors = GgufTensors({_hf_tensor_name(name, str(path)): t for name, t in raw_tensors},
                          {"self_attn.q_proj.weight": config.num_heads, "self_attn.k_proj.weight": config.num_kv_heads})
    config = dataclasses.replace(config, tie_word_embeddings="lm_head.weight" not in tensors)
    if config.head_dim is None:
        config = dataclasses.replace(config, head_dim=tensors.shape("model.layers.0.self_attn.q_proj.weight")[0] // config.num_heads)
    tokenizer = Tokenizer.from_gguf_fields(fields, str(path))
    return config, tensors, tokenizer


def _hf_tensor_name(name: str, source: str) -> str:
    m = re.fullmatch(r"blk\.(\d+)\.(\w+)\.(weight|bias)", name)
    if m:
        layer, part, kind = m.groups()
        if part not in _BLOCK_TO_HF:
            raise CheckpointError(f"{source}: tensor {name!r} is not a llama tensor")
        return f"model.layers.{layer}.{_BLOCK_TO_HF[part]}.{kind}"
    base, _, kind = name.rpartition(".")
    if base == "rope_freqs":
        raise CheckpointError(f"{source}: tensor {name!r} (llama.cpp's per-frequency RoPE factors, Llama 3.1 GGUFs) is "
                              "not supported; use the Hugging Face checkpoint (rope_type llama3 is)")
    if base not in _GGUF_TO_HF:
        raise CheckpointError(f"{source}: tensor {name!r} is not a llama tensor")
    return f"{_GGUF_TO_HF[base]}.{kind}"
