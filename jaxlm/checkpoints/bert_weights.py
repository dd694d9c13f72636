"""BERT param paths <-> transformers BertModel tensor names (`encoder.layer.0.attention.self.query.weight`).

Module names already mirror HF, so only `layer_<i>` and the leaf names (`kernel`/`embedding` ->
`weight`) change; LayerNorm leaves are already `weight`/`bias`.
"""

from __future__ import annotations


def hf_name(path: tuple[str, ...]) -> str:
    parts: list[str] = []
    for key in path:
        if key.startswith("layer_"):
            parts += ["layer", key.removeprefix("layer_")]
        elif key in ("kernel", "embedding"):
            parts.append("weight")
        else:
            parts.append(key)
    return ".".join(parts)
