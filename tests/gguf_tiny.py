"""Tiny GGUF files written with the `gguf` package from tiny transformers Llama models, as llama.cpp's
convert_hf_to_gguf lays them out (q/k rows permuted, float32 tensors), for parity tests."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

_HF_TO_GGUF = {
    "input_layernorm": "attn_norm", "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output", "post_attention_layernorm": "ffn_norm",
    "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down",
}


def _permute(w: np.ndarray, n_head: int) -> np.ndarray:
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _gguf_name(name: str) -> str:
    if name.startswith("model.layers."):
        _, _, layer, rest = name.split(".", 3)
        module, kind = rest.rsplit(".", 1)
        return f"blk.{layer}.{_HF_TO_GGUF[module]}.{kind}"
    return {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
            "lm_head.weight": "output.weight"}[name]


def byte_level_vocab(n: int) -> dict[str, Any]:
    """A byte-level ('gpt2') vocabulary of n - 1 single characters and one merge of the first two."""
    from tokenizers.pre_tokenizers import ByteLevel

    alphabet = sorted(ByteLevel.alphabet())[: n - 1]
    return {"tokenizer.ggml.model": "gpt2", "tokenizer.ggml.tokens": alphabet + [alphabet[0] + alphabet[1]],
            "tokenizer.ggml.merges": [f"{alphabet[0]} {alphabet[1]}"], "tokenizer.ggml.token_type": [1] * n}


def write_value(writer, key: str, value: Any) -> None:
    import gguf

    if isinstance(value, bool):
        writer.add_bool(key, value)
    elif isinstance(value, int):
        writer.add_uint32(key, value)
    elif isinstance(value, float):
        writer.add_float32(key, value)
    elif isinstance(value, str):
        writer.add_string(key, value)
    elif isinstance(value, list) and value and isinstance(value[0], float):
        writer.add_array(key, value)
    elif isinstance(value, list):
        writer.add_array(key, value)
    else:
        raise TypeError(f"{key}: {type(value)}")
    del gguf


def write_llama_gguf(path: Path, model=None, fields: dict[str, Any] | None = None, tokenizer: dict[str, Any] | None = None) -> Path:
    """Write `model` (a transformers LlamaForCausalLM, or None for metadata only) as a GGUF at `path`
    with llama.* hyperparameters from its config, `tokenizer` fields (default: a byte-level vocabulary
    of the model's size) and `fields` added or overriding."""
    import gguf

    writer = gguf.GGUFWriter(str(path), "llama")
    meta: dict[str, Any] = {}
    if model is not None:
        c = model.config
        meta.update({
            "llama.context_length": c.max_position_embeddings, "llama.embedding_length": c.hidden_size,
            "llama.block_count": c.num_hidden_layers, "llama.feed_forward_length": c.intermediate_size,
            "llama.attention.head_count": c.num_attention_heads, "llama.attention.head_count_kv": c.num_key_value_heads,
            "llama.attention.layer_norm_rms_epsilon": float(c.rms_norm_eps),
            "llama.rope.freq_base": float(c.rope_parameters["rope_theta"]),
            "llama.rope.dimension_count": c.hidden_size // c.num_attention_heads,
            "llama.vocab_size": c.vocab_size,
        })
        meta.update(tokenizer or byte_level_vocab(c.vocab_size))
    else:
        meta.update(tokenizer or {})
    meta.update(fields or {})
    for key, value in meta.items():
        write_value(writer, key, value)
    if model is not None:
        c = model.config
        for name, t in model.state_dict().items():
            w = t.detach().float().numpy()
            if name.endswith("q_proj.weight"):
                w = _permute(w, c.num_attention_heads)
            elif name.endswith("k_proj.weight"):
                w = _permute(w, c.num_key_value_heads)
            writer.add_tensor(_gguf_name(name), np.ascontiguousarray(w))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path
