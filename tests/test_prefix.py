"""A cached prefix (jaxlm.models.prefix) gives the logits of recomputing it, with and without adapters."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxlm.models import lora as lora_lib
from jaxlm.models import prefix as prefix_lib
from jaxlm.models.llama import Llama, LlamaConfig

CONFIG = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4,
                     num_kv_heads=2, rope_theta=10000.0)
PREFIXES = [[5, 6, 7, 8, 9], [10, 11, 12], []]  # a full, a right-padded and an empty prefix
ROWS = [(0, [20, 21, 22, 23]), (1, [24, 25]), (1, [26, 27, 28, 29]), (2, [30, 31, 32])]


@pytest.fixture(scope="module")
def model_params():
    model = Llama(CONFIG)
    params = model.init(jax.random.PRNGKey(0), jnp.zeros((1, 4), jnp.int32))["params"]
    return model, params


def _pad(rows, width):
    ids = np.zeros((len(rows), width), np.int32)
    mask = np.zeros((len(rows), width), bool)
    for i, r in enumerate(rows):
        ids[i, :len(r)], mask[i, :len(r)] = r, True
    return jnp.asarray(ids), jnp.asarray(mask)


def _adapters(params, n, seed):
    lora = lora_lib.init_lora(lora_lib.LoraSpec(("q_proj", "k_proj", "v_proj", "o_proj", "down_proj"), 4, 8.0),
                              params, jax.random.PRNGKey(seed), batch_size=n)
    keys = iter(jax.random.split(jax.random.PRNGKey(seed + 1), 64))
    return lora.replace(params=jax.tree_util.tree_map(
        lambda x: x + 0.1 * jax.random.normal(next(keys), x.shape), lora.params))  # B != 0: the adapter acts


@pytest.mark.parametrize("with_lora", [False, True])
def test_cached_prefix_equals_recomputing_it(model_params, with_lora):
    model, params = model_params
    pre_ids, pre_mask = _pad(PREFIXES, 6)
    task_B = jnp.asarray([t for t, _ in ROWS])
    ids, mask = _pad([r for _, r in ROWS], 5)
    lora_G = _adapters(params, len(PREFIXES), 3) if with_lora else None
    cache, length_G = prefix_lib.prefix_cache(model, params, pre_ids, pre_mask, extra_slots=5, lora=lora_G)
    lora_B = lora_lib.per_example(lora_G, task_B) if with_lora else None
    got = prefix_lib.continue_from_prefix(model, params, prefix_lib.take_rows(cache, task_B),
                                          jnp.take(length_G, task_B), ids, mask, lora=lora_B)
    assert got.shape == (4, 5, CONFIG.vocab_size)
    for b, (task, row) in enumerate(ROWS):  # one plain forward over the concatenation, row by row
        full = jnp.asarray([PREFIXES[task] + row])
        one = None if lora_B is None else lora_B.replace(params=jax.tree_util.tree_map(lambda x: x[b], lora_B.params))
        want = model.apply({"params": params}, full, lora=one)[0, len(PREFIXES[task]):]
        np.testing.assert_allclose(np.asarray(got[b, :len(row)]), np.asarray(want), atol=2e-5, rtol=1e-5)


def test_empty_prefix_equals_the_plain_model(model_params):
    model, params = model_params
    ids, mask = _pad([r for _, r in ROWS], 5)
    cache, length = prefix_lib.prefix_cache(model, params, jnp.zeros((4, 3), jnp.int32), jnp.zeros((4, 3), bool),
                                            extra_slots=5)
    got = prefix_lib.continue_from_prefix(model, params, cache, length, ids, mask)
    want = model.apply({"params": params}, ids, mask)
    np.testing.assert_allclose(np.asarray(got)[np.asarray(mask)], np.asarray(want)[np.asarray(mask)], atol=2e-5)
    assert np.asarray(length).tolist() == [0, 0, 0, 0]


def test_gradients_flow_into_the_prefix_adapter(model_params):
    """Fusion trains the adapter on the prefix too: d loss / d (k_proj B) is non-zero through the cache only."""
    model, params = model_params
    pre_ids, pre_mask = _pad(PREFIXES[:1], 5)
    ids, mask = _pad([ROWS[0][1]], 4)
    lora = _adapters(params, 1, 7)

    def loss(tree):
        one = lora.replace(params=tree)
        cache, n = prefix_lib.prefix_cache(model, params, pre_ids, pre_mask, extra_slots=4, lora=one)
        return jnp.sum(prefix_lib.continue_from_prefix(model, params, cache, n, ids, mask, lora=one)[0, 0])

    grads = jax.grad(loss)(lora.params)
    # the first continuation token sees only the prefix's and its own k/v; the prefix's path is non-zero
    assert float(jnp.abs(grads["layers_0"]["self_attn"]["k_proj"]["b"]).sum()) > 0


def test_a_cache_too_small_is_refused(model_params):
    model, params = model_params
    cache, n = prefix_lib.prefix_cache(model, params, jnp.ones((1, 2), jnp.int32), jnp.ones((1, 2), bool),
                                       extra_slots=2)
    with pytest.raises(ValueError, match="cannot hold 3 more tokens after a prefix of 2"):
        prefix_lib.continue_from_prefix(model, params, cache, n, jnp.ones((1, 3), jnp.int32), prefix_slots=2)
