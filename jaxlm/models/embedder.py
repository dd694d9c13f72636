"""Sentence embeddings from a BERT checkpoint (all-MiniLM-L6-v2), matching sentence-transformers:
mean of the last hidden states over real tokens, then L2 normalisation.

Used to compare task instructions (INSTA-style similarity) and to retrieve examples across tasks.
Inputs are padded to a few length buckets and batch sizes, so the jitted encoder compiles a
bounded number of times however many different text lengths it sees.
"""

from __future__ import annotations

import functools

from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from tokenizers import Tokenizer as HFTokenizer

from jaxlm.buckets import bucket_length, pad_rows, powers_of_two
from jaxlm.progress import bar

Array = jax.Array

MIN_BUCKET = 16


def mean_pool(hidden: Array, mask: Array) -> Array:
    """Mean of `hidden` (B, L, D) over positions where `mask` (B, L) is set; all-pad rows give 0.

    Args:
      hidden: hidden states (B, L, D), any float dtype.
      mask: (B, L) bool or 0/1, nonzero on real tokens.

    Returns:
      (B, D) float32 means (the divisor is clamped at 1e-9, as sentence-transformers).
    """
    m = mask.astype(jnp.float32)[..., None]
    return (hidden.astype(jnp.float32) * m).sum(axis=1) / jnp.maximum(m.sum(axis=1), 1e-9)


def l2_normalize(x: Array, eps: float = 1e-12) -> Array:
    """x / max(||x||, eps) along the last axis (torch.nn.functional.normalize).

    Args:
      x: (..., D).
      eps: lower bound of the norm (a zero vector stays zero).

    Returns:
      (..., D) unit-L2 rows, in x's dtype.
    """
    return x / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), eps)


def cosine_similarity_matrix(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """(N, D) x (M, D) -> (N, M) cosine similarities (inputs need not be normalised).

    Args:
      a: (N, D) array-like.
      b: (M, D) array-like.

    Returns:
      float32 numpy (N, M), entries in [-1, 1] (0 for a zero vector).
    """
    a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
    a = a / np.maximum(np.linalg.norm(a, axis=-1, keepdims=True), 1e-12)
    b = b / np.maximum(np.linalg.norm(b, axis=-1, keepdims=True), 1e-12)
    return a @ b.T


def sentence_embedding(model: Any, params: Any, ids_NxL: Array, mask_NxL: Array) -> Array:
    """sentence-transformers' all-MiniLM recipe: BERT hidden states, mean over real tokens, L2 norm.
    The one definition used for embedding (SentenceEmbedder) and for tuning (embedder_tuning).

    Args:
      model: a `Bert` module.
      params: its plain params.
      ids_NxL: integer token ids (N, L).
      mask_NxL: (N, L) bool or 0/1, True on real tokens.

    Returns:
      (N, D) float32 unit vectors (an all-padding row gives a zero vector).
    """
    return l2_normalize(mean_pool(model.apply({"params": params}, ids_NxL, mask_NxL), mask_NxL))


class SentenceEmbedder:
    """`SentenceEmbedder(jaxlm.load_pretrained('all-minilm-l6-v2')).embed(texts)` -> (N, D) unit vectors.

    Args:
      pretrained: a `Pretrained` BERT checkpoint with a tokenizer.

    Attributes:
      config: the BertConfig.
      params: the model params.
      pad_id: the tokenizer's pad id (0 when it has none).

    Raises:
      ValueError: `pretrained` is not of the bert family, or has no tokenizer.
    """

    def __init__(self, pretrained: Any) -> None:
        if pretrained.family != "bert":
            raise ValueError(f"SentenceEmbedder needs a BERT checkpoint, got family {pretrained.family!r}")
        if pretrained.tokenizer is None:
            raise ValueError(f"{pretrained.source}: no tokenizer.json, cannot embed text")
        self.config = pretrained.config
        self.params = pretrained.params
        self.pad_id = pretrained.tokenizer.pad_id if pretrained.tokenizer.pad_id is not None else 0
        # A private copy: `tokenize` sets truncation on it without touching the shared tokenizer.
        self._backend = HFTokenizer.from_str(pretrained.tokenizer.backend.to_str())
        # One jit; its cache holds one executable per (batch, bucket) shape.
        self._encode = jax.jit(functools.partial(sentence_embedding, pretrained.model))

    def tokenize(self, texts: Sequence[str], max_length: int = 256) -> list[list[int]]:
        """Token ids with [CLS] ... [SEP], truncated to `max_length` (sentence-transformers' max_seq_length).

        Args:
          texts: the texts.
          max_length: most tokens per text, special tokens included; capped at max_position_embeddings.

        Returns:
          One list of token ids per text, in order.
        """
        max_length = min(max_length, self.config.max_position_embeddings)
        self._backend.enable_truncation(max_length)
        return [e.ids for e in self._backend.encode_batch(list(texts), add_special_tokens=True)]

    def embed(self, texts: Sequence[str], batch_size: int = 32, max_length: int = 256) -> np.ndarray:
        """(N, D) float32 L2-normalised mean-pooled embeddings, in the order of `texts`.

        Args:
          texts: N texts (a single str counts as one text).
          batch_size: rows per encoder call; a batch is padded to the next power of two (at most `batch_size`).
          max_length: token limit per text (see `tokenize`); rows are padded to 16, 32, ... up to that limit.

        Returns:
          float32 numpy (N, D) (D = hidden_size); (0, D) for no texts.
        """
        texts = [texts] if isinstance(texts, str) else list(texts)
        if not texts:
            return np.zeros((0, self.config.hidden_size), np.float32)
        ids = self.tokenize(texts, max_length)
        order = np.argsort([-len(x) for x in ids], kind="stable")  # similar lengths share a batch
        out = np.zeros((len(texts), self.config.hidden_size), np.float32)
        cap = min(max_length, self.config.max_position_embeddings)
        progress = bar(len(texts), "embed", "text")
        for start in range(0, len(order), batch_size):
            rows = order[start : start + batch_size]
            length = bucket_length(max(len(ids[i]) for i in rows), powers_of_two(cap, MIN_BUCKET))
            batch = bucket_length(len(rows), powers_of_two(batch_size))
            tokens, mask = pad_rows([ids[i] for i in rows] + [[]] * (batch - len(rows)), length, self.pad_id)
            out[rows] = np.asarray(self._encode(self.params, tokens, mask))[: len(rows)]
            progress.update(len(rows))
        progress.close()
        return out

    @property
    def num_compiled(self) -> int:
        """How many shapes the encoder has been compiled for (bounded by batch x length buckets)."""
        return self._encode._cache_size()
