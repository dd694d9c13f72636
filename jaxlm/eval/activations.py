"""Mean-pooled hidden states of a decoder-only model, and task similarity from them.

The cross-task prompting analysis asks whether a source task helps a target task more when the
model already represents their inputs alike: each task is summarised by the mean over a few of its
inputs of the mean over tokens of the hidden states at one layer, and two tasks are compared by the
cosine of those vectors.

Batching, padding and compile accounting are the eval engine's (`Engine`): rows sorted by length,
padded to its length buckets and to a fixed batch size, so a whole analysis compiles once per bucket.
`layer=k` runs only the first k blocks (a truncated config over the same params) and applies the
model's final RMSNorm to that residual stream; cosine is scale-free per token but the learned norm
weights still reweight dimensions, so "layer k" means "normed output of block k".
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxlm.buckets import bucket_length, pad_rows
from jaxlm.errors import UsageError


@functools.cache
def _pooler(model: Any):
    @jax.jit
    def pool(params, ids_BxL, mask_BxL):
        hidden_BxLxD = model.apply({"params": params}, ids_BxL, mask_BxL, output="hidden").astype(jnp.float32)
        weights_BxL = mask_BxL.astype(jnp.float32)
        total_BxD = jnp.einsum("bld,bl->bd", hidden_BxLxD, weights_BxL)
        return total_BxD / jnp.maximum(weights_BxL.sum(axis=1, keepdims=True), 1.0)

    return pool


def truncated_model(pretrained: Any, layer: int | None) -> Any:
    """The model with only its first `layer` blocks (None: all); the params tree is shared."""
    config = pretrained.config
    if layer is None or layer == config.num_layers:
        return pretrained.model
    if not 1 <= layer <= config.num_layers:
        raise UsageError(f"activations layer={layer}: the model has layers 1..{config.num_layers}")
    return type(pretrained.model)(dataclasses.replace(config, num_layers=layer))


def pooled_hidden_states(engine: Any, ids: Sequence[Sequence[int]], layer: int | None = None) -> np.ndarray:
    """(N, D) float32: per token-id row, the mean over its tokens of the layer-`layer` hidden states.

    engine: a `jaxlm.eval.engine.Engine` over a decoder-only (llama-family) model. Rows are right-padded
    and padding is masked out of both attention and the mean, so a row's vector does not depend on
    what it is batched with.
    """
    if engine.pretrained.family != "llama":
        raise UsageError(f"pooled_hidden_states: needs a decoder-only (llama) model, got {engine.pretrained.family}")
    for i, row in enumerate(ids):
        if not row:
            raise UsageError(f"pooled_hidden_states: row {i} is empty")
    model = truncated_model(engine.pretrained, layer)
    fn = _pooler(model)
    out = np.zeros((len(ids), engine.pretrained.config.hidden_size), np.float32)
    for batch in engine._batches([len(r) for r in ids]):
        rows = engine._fill([list(ids[i]) for i in batch])
        width = bucket_length(max(map(len, rows)), engine.buckets)
        ids_BxL, mask_BxL = pad_rows(rows, width, engine.pad_id, left=False)
        placed = engine._place(ids_BxL, mask_BxL)
        pooled_BxD = np.asarray(engine._call(("pool", ids_BxL.shape, layer), fn, engine.params, *placed))
        out[batch] = pooled_BxD[: len(batch)]
    return out


def task_vectors(engine: Any, texts_by_task: dict[str, Sequence[str]], layer: int | None = None,
                 max_tokens: int = 256, tokenizer: Any = None) -> dict[str, np.ndarray]:
    """{task: (D,) mean over its texts of `pooled_hidden_states`}; each text cut to `max_tokens` tokens
    (`tokenizer`, default the model's, with special tokens). All tasks' texts share one engine call."""
    tok = tokenizer or engine.pretrained.tokenizer
    if tok is None:
        raise UsageError(f"task_vectors: {engine.pretrained.source} has no tokenizer; pass tokenizer=")
    names = [n for n in texts_by_task if texts_by_task[n]]
    rows, owner = [], []
    for n in names:
        for text in texts_by_task[n]:
            rows.append(tok.encode(text, add_special_tokens=True)[:max_tokens])
            owner.append(n)
    pooled_NxD = pooled_hidden_states(engine, rows, layer)
    owner_N = np.array(owner)
    return {n: pooled_NxD[owner_N == n].mean(axis=0) for n in names}


def cosine_matrix(a_NxD: np.ndarray, b_MxD: np.ndarray, center: np.ndarray | None = None) -> np.ndarray:
    """(N, M) cosines of the rows of a and b, after subtracting `center` (D,) from both when given
    (mean-pooled LM states share a large common direction that pushes raw cosines toward 1)."""
    a, b = np.asarray(a_NxD, np.float64), np.asarray(b_MxD, np.float64)
    if center is not None:
        a, b = a - center, b - center
    a = a / np.maximum(np.linalg.norm(a, axis=-1, keepdims=True), 1e-12)
    b = b / np.maximum(np.linalg.norm(b, axis=-1, keepdims=True), 1e-12)
    return a @ b.T
