"""Pooled hidden states: equal a direct model call, padding is masked out, a truncated layer equals
a model built with that many layers, and cosine centering works."""

import dataclasses

import numpy as np
import pytest

import jaxlm
from jaxlm.errors import UsageError
from jaxlm.eval import activations
from jaxlm.eval.engine import Engine
from jaxlm.models.llama import Llama
from tests.hf_tiny import tiny_llama_dir


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    return jaxlm.load_pretrained(tiny_llama_dir(tmp_path_factory.mktemp("act_llama"), seed=5))


def _direct_mean(pre, row, num_layers=None):
    """The reference: one unpadded row through model.apply, hidden states averaged in numpy."""
    model = pre.model if num_layers is None else Llama(dataclasses.replace(pre.config, num_layers=num_layers))
    ids = np.array([row], np.int32)
    hidden = np.asarray(model.apply({"params": pre.params}, ids, np.ones_like(ids, bool), output="hidden"))
    return hidden[0].astype(np.float64).mean(axis=0)


def test_pooled_states_equal_direct_call_and_ignore_padding(llama):
    rng = np.random.default_rng(0)
    vocab = llama.config.vocab_size
    rows = [rng.integers(3, vocab, n).tolist() for n in (3, 17, 9, 30, 1)]  # mixed lengths: padded batches
    engine = Engine(llama, batch_size=4, buckets=(32,))
    pooled = activations.pooled_hidden_states(engine, rows)
    assert pooled.shape == (5, llama.config.hidden_size)
    for i, row in enumerate(rows):
        np.testing.assert_allclose(pooled[i], _direct_mean(llama, row), rtol=2e-4, atol=2e-5)
    # The same row alone (less padding, another batch) gives the same vector.
    alone = activations.pooled_hidden_states(engine, [rows[0]])
    np.testing.assert_allclose(alone[0], pooled[0], rtol=2e-4, atol=2e-5)
    # Mid layer: the first k blocks over the same params.
    k = llama.config.num_layers - 1
    mid = activations.pooled_hidden_states(engine, rows[:2], layer=k)
    np.testing.assert_allclose(mid[1], _direct_mean(llama, rows[1], num_layers=k), rtol=2e-4, atol=2e-5)
    assert not np.allclose(mid[1], pooled[1], atol=1e-3)
    with pytest.raises(UsageError, match="layer=0"):
        activations.pooled_hidden_states(engine, rows, layer=0)


class _ByteTokenizer:
    """The tiny model has no tokenizer: bytes folded into its vocabulary."""

    def __init__(self, vocab):
        self.vocab = vocab

    def encode(self, text, add_special_tokens=True):
        return [3 + b % (self.vocab - 3) for b in text.encode()]


def test_task_vectors_and_cosine_matrix(llama):
    engine = Engine(llama, batch_size=4, buckets=(32,))
    tok = _ByteTokenizer(llama.config.vocab_size)
    vecs = activations.task_vectors(engine, {"a": ["hello there", "a b c"], "b": ["one two three"]}, tokenizer=tok)
    assert sorted(vecs) == ["a", "b"]
    rows = [tok.encode(t, add_special_tokens=True) for t in ("hello there", "a b c")]
    np.testing.assert_allclose(vecs["a"], np.mean([_direct_mean(llama, r) for r in rows], axis=0),
                               rtol=2e-4, atol=2e-5)
    a = np.array([[1.0, 0.0], [1.0, 1.0]])
    b = np.array([[2.0, 0.0], [0.0, 3.0]])
    np.testing.assert_allclose(activations.cosine_matrix(a, b), [[1.0, 0.0], [2 ** -0.5, 2 ** -0.5]])
    # Centered at (1, 0): a's rows become (0, 0) and (0, 1); b's rows (1, 0) and (-1, 3).
    centered = activations.cosine_matrix(a, b, center=np.array([1.0, 0.0]))
    np.testing.assert_allclose(centered[1], [0.0, 3 / 10 ** 0.5])
