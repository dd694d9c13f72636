"""GGUF files (llama.cpp): metadata -> LlamaConfig and tokenizer; tensors dequantized with the
`gguf` package's numpy kernels and renamed to Hugging Face names, undoing llama.cpp's Q/K row
permutation so the HF rotate-half RoPE applies."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import numpy as np

from jaxlm.checkpoints.hf import CheckpointError
from jaxlm.checkpoints.tokenizer import Tokenizer
from jaxlm.models.llama import LlamaConfig

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


def config_from_fields(fields: dict[str, Any], source: str) -> LlamaConfig:
    arch = fields.get("general.architecture")
    if arch not in ("llama", "mistral"):
        raise CheckpointError(f"{source}: general.architecture={arch!r} is not supported (llama, mistral)")

    def need(key: str) -> Any:
        if f"{arch}.{key}" not in fields:
            raise CheckpointError(f"{source}: metadata field {arch}.{key} is missing")
        return fields[f"{arch}.{key}"]

    heads = int(need("attention.head_count"))
    tokens = fields.get("tokenizer.ggml.tokens") or []
    eos = fields.get("tokenizer.ggml.eos_token_id")
    return LlamaConfig(
        vocab_size=int(fields.get(f"{arch}.vocab_size", len(tokens))),
        hidden_size=int(need("embedding_length")),
        intermediate_size=int(need("feed_forward_length")),
        num_layers=int(need("block_count")),
        num_heads=heads,
        num_kv_heads=int(fields.get(f"{arch}.attention.head_count_kv", heads)),
        head_dim=int(fields[f"{arch}.attention.key_length"]) if f"{arch}.attention.key_length" in fields else None,
        rope_theta=float(fields.get(f"{arch}.rope.freq_base", 10000.0)),
        rms_norm_eps=float(need("attention.layer_norm_rms_epsilon")),
        max_position_embeddings=int(fields.get(f"{arch}.context_length", 2048)),
        bos_token_id=fields.get("tokenizer.ggml.bos_token_id"),
        eos_token_ids=(int(eos),) if eos is not None else (),
        pad_token_id=fields.get("tokenizer.ggml.padding_token_id"),
        tie_word_embeddings=True,  # fixed below from the tensor list
    )


def load_gguf(path: str | Path) -> tuple[LlamaConfig, dict[str, np.ndarray], Tokenizer]:
    """(config, HF-named float32 tensors, tokenizer) of a llama-architecture GGUF file."""
    import dataclasses

    import gguf

    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such GGUF file")
    try:
        reader = gguf.GGUFReader(str(path))
    except Exception as e:
        raise CheckpointError(f"{path}: not a readable GGUF file ({e})") from None
    fields = read_fields(reader)
    config = config_from_fields(fields, str(path))
    tensors: dict[str, np.ndarray] = {}
    for t in reader.tensors:
        name = _hf_tensor_name(t.name, str(path))
        w = gguf.quants.dequantize(t.data, t.tensor_type).astype(np.float32)
        w = w.reshape(tuple(int(d) for d in reversed(t.shape)))  # GGUF lists dims innermost first
        if name.endswith("self_attn.q_proj.weight"):
            w = _unpermute(w, config.num_heads)
        elif name.endswith("self_attn.k_proj.weight"):
            w = _unpermute(w, config.num_kv_heads)
        tensors[name] = w
    config = dataclasses.replace(config, tie_word_embeddings="lm_head.weight" not in tensors)
    if config.head_dim is None:
        config = dataclasses.replace(config, head_dim=tensors["model.layers.0.self_attn.q_proj.weight"].shape[0] // config.num_heads)
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
    if base not in _GGUF_TO_HF:
        raise CheckpointError(f"{source}: tensor {name!r} is not a llama tensor")
    return f"{_GGUF_TO_HF[base]}.{kind}"
