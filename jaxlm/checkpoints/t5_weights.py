"""T5 param paths <-> Hugging Face tensor names (`encoder.block.0.layer.0.SelfAttention.q.weight`).

Our module names mirror HF's, so only `block_i`/`layer_i` indices and leaf names change. HF files
also hold `encoder.embed_tokens.weight` / `decoder.embed_tokens.weight`, copies of `shared.weight`
that no param maps to (ignored on import; transformers re-ties them on load of an export).
"""

from __future__ import annotations

import re

_INDEXED = re.compile(r"(block|layer)_(\d+)")


def hf_name(path: tuple[str, ...]) -> str:
    parts: list[str] = []
    for key in path:
        m = _INDEXED.fullmatch(key)
        if m:
            parts += [m.group(1), m.group(2)]
        elif key in ("kernel", "embedding"):
            parts.append("weight")
        else:
            parts.append(key)
    return ".".join(parts)
