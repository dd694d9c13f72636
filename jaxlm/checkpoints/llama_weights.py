"""Llama/Mistral param paths <-> Hugging Face tensor names (`model.layers.3.self_attn.q_proj.weight`)."""

from __future__ import annotations


def hf_name(path: tuple[str, ...]) -> str:
    if path[0] == "lm_head":
        return "lm_head.weight"
    parts: list[str] = []
    for key in path:
        if key.startswith("layers_"):
            parts += ["layers", key.removeprefix("layers_")]
        elif key in ("kernel", "embedding"):
            parts.append("weight")
        else:
            parts.append(key)
    return "model." + ".".join(parts)
