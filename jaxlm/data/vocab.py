"""seqio vocabularies: jaxlm's model `Tokenizer` (HF tokenizer.json or GGUF), and bytes for string rewrites.

Special ids (what `TokenizerVocabulary` reports to seqio):
  eos_id  the tokenizer's first EOS id (SmolLM2-135M-Instruct GGUF: 2 = "<|im_end|>", the end of a chat
          turn, which is also the id its config names; a HF dir takes `eos_token` of tokenizer_config.json
          first, then config.json's `eos_token_id`).
  pad_id  the tokenizer's pad id, or 0 when it has none (seqio's convention). Batches pad with 0 whatever
          this says (jaxlm/features.py); padding is masked by segment ids and loss weights, so the value
          never reaches a loss.
  unk_id  the BPE model's unk token, or None: byte-level BPE (SmolLM2, GPT-2) encodes every string and
          has no unknown token.
  bos_id  the tokenizer's BOS id; `add_bos` says whether the model wants it in front of a prompt (SmolLM2:
          no). seqio features never contain BOS; decoder-only batches prepend it when `add_bos`.
`encode` adds no special tokens (seqio appends EOS itself); `decode` drops special tokens.

`byte_vocabulary()` is `seqio.ByteVocabulary`: 0 = PAD, 1 = EOS, 2 = UNK, byte b -> b + 3, so a model
over it has vocab_size 259 = 256 + 3 specials; no BOS.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np

from jaxlm.checkpoints.tokenizer import Tokenizer
from jaxlm.data.tf_corner import import_seqio, import_tensorflow

seqio = import_seqio()
tf = import_tensorflow()


class TokenizerVocabulary(seqio.Vocabulary):
    """A seqio.Vocabulary over a jaxlm `Tokenizer`; TF ops call it through `tf.numpy_function`."""

    def __init__(self, tokenizer: Tokenizer, name: str = "tokenizer"):
        self.tokenizer = tokenizer
        self.name = name
        super().__init__(extra_ids=0)

    # ------------------------------------------------------------------ special ids
    @property
    def bos_id(self) -> int | None:
        return self.tokenizer.bos_id

    @property
    def add_bos(self) -> bool:
        """Whether a decoder-only prompt starts with BOS (as `Tokenizer.encode` would add it)."""
        return bool(self.tokenizer.add_bos and self.tokenizer.bos_id is not None)

    @property
    def eos_id(self) -> int | None:
        return self.tokenizer.eos_ids[0] if self.tokenizer.eos_ids else None

    @property
    def pad_id(self) -> int:
        return self.tokenizer.pad_id if self.tokenizer.pad_id is not None else 0

    @property
    def unk_id(self) -> int | None:
        unk = getattr(self.tokenizer.backend.model, "unk_token", None)
        return self.tokenizer.token_to_id(unk) if unk else None

    @property
    def _base_vocab_size(self) -> int:
        return self.tokenizer.vocab_size

    # ------------------------------------------------------------------ python
    def _encode(self, s: str) -> list[int]:
        return self.tokenizer.encode(s, add_special_tokens=False)

    def _decode(self, ids: Sequence[int]) -> str:
        ids = [int(i) for i in ids]
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    # ------------------------------------------------------------------ tensorflow
    def _encode_tf(self, s: tf.Tensor) -> tf.Tensor:
        def encode_np(text: bytes | np.ndarray) -> np.ndarray:
            # numpy_function hands a scalar string over as bytes (in tf.data) or a 0-d array (eager)
            if isinstance(text, np.ndarray):
                if text.ndim:
                    raise ValueError(f"{self.name}: encode_tf takes one string (a scalar), got shape {text.shape}")
                text = text.item()
            return np.asarray(self._encode(text.decode("utf-8")), np.int32)

        ids = tf.numpy_function(encode_np, [s], tf.int32, stateful=False)
        ids.set_shape([None])
        return ids

    def _decode_tf(self, ids: tf.Tensor) -> tf.Tensor:
        def decode_np(arr: np.ndarray) -> np.ndarray:
            if arr.ndim == 1:
                return np.asarray(self._decode(arr.tolist()).encode("utf-8"), dtype=object)
            return np.asarray([self._decode(row.tolist()).encode("utf-8") for row in arr.reshape(-1, arr.shape[-1])],
                              dtype=object).reshape(arr.shape[:-1])

        text = tf.numpy_function(decode_np, [ids], tf.string, stateful=False)
        text.set_shape(ids.shape[:-1])
        return text

    # ------------------------------------------------------------------ identity
    @property
    def fingerprint(self) -> str:
        """What tokenized caches are keyed by: same string -> same ids."""
        return f"{self.name}-v{self.vocab_size}-eos{self.eos_id}"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, TokenizerVocabulary) and other.tokenizer is self.tokenizer

    def __hash__(self) -> int:
        return id(self.tokenizer)

    def __repr__(self) -> str:
        return f"TokenizerVocabulary({self.name}, vocab_size={self.vocab_size}, eos={self.eos_id}, pad={self.pad_id})"


def tokenizer_vocabulary(model: str | Path) -> TokenizerVocabulary:
    """The vocabulary of a model (weight-package name, HF dir or .gguf) without loading its weights."""
    from jaxlm.checkpoints.pretrained import read_tokenizer

    return TokenizerVocabulary(read_tokenizer(model), name=Path(str(model)).stem)


def byte_vocabulary() -> seqio.ByteVocabulary:
    """Bytes + (PAD 0, EOS 1, UNK 2): the string-rewrite models' vocabulary (vocab_size 259)."""
    return seqio.ByteVocabulary()


def bos_to_prepend(vocabulary: seqio.Vocabulary) -> int | None:
    """The BOS id a decoder-only row starts with, or None (byte vocab, SmolLM2)."""
    return vocabulary.bos_id if getattr(vocabulary, "add_bos", False) else None


def vocabulary_fingerprint(vocabulary: seqio.Vocabulary) -> str:
    fp = getattr(vocabulary, "fingerprint", None)
    return fp if isinstance(fp, str) else f"{type(vocabulary).__name__}-v{vocabulary.vocab_size}-eos{vocabulary.eos_id}"
