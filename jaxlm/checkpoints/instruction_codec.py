"""How instruction and example text becomes ids for one vocabulary, recorded in a hypernetwork export
(`hypernet.json` field `instruction.codec`) so that loading it tokenizes instructions as training did.

A codec is "bytes" (seqio.ByteVocabulary ids: byte b -> b + 3, EOS 1, no BOS; vocab 259) or the
tokenizer of a model (weight-package name, HF dir or .gguf), read without its weights and without
TensorFlow.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

BYTES = "bytes"


@dataclass(frozen=True)
class TextCodec:
    """How text becomes ids for one vocabulary: `encode` (no specials), EOS appended to targets, and the
    BOS a decoder-only row starts with (None: byte vocab, SmolLM2)."""

    name: str
    encode: Callable[[str], list[int]]
    decode: Callable[[Sequence[int]], str]
    eos_id: int | None
    bos_id: int | None


def _byte_encode(text: str) -> list[int]:
    return [b + 3 for b in text.encode("utf-8")]


def _byte_decode(ids: Sequence[int]) -> str:
    return bytes(int(i) - 3 for i in ids if 3 <= int(i) < 259).decode("utf-8", errors="replace")


def text_codec(spec: str, tokenizer: Any = None) -> TextCodec:
    """The codec named `spec`.

    Args:
      spec: "bytes", or a model name / HF dir / .gguf whose tokenizer is read without its weights.
      tokenizer: a `jaxlm.checkpoints.tokenizer.Tokenizer` to use instead of reading `spec`'s.

    Returns:
      A `TextCodec`; `encode(str) -> list[int]` adds no special tokens.

    Raises:
      CheckpointError: `spec` names no readable tokenizer.
    """
    if spec == BYTES:
        return TextCodec(BYTES, _byte_encode, _byte_decode, 1, None)
    if tokenizer is None:
        from jaxlm.checkpoints.pretrained import read_tokenizer

        tokenizer = read_tokenizer(spec)
    bos = tokenizer.bos_id if (tokenizer.add_bos and tokenizer.bos_id is not None) else None
    eos = tokenizer.eos_ids[0] if tokenizer.eos_ids else None
    return TextCodec(str(spec), lambda s: tokenizer.encode(s, add_special_tokens=False),
                     lambda ids: tokenizer.decode(list(ids), skip_special_tokens=True), eos, bos)
