"""Automatic shared-prefix caching in the eval engine: the same log-probs and greedy ids as recomputing
every row, with per-example adapters; rank classification runs each prompt once; sampling."""

import jax
import numpy as np
import pytest

import jaxlm
from jaxlm.eval import engine as engine_lib
from jaxlm.eval.engine import Engine, shared_prefixes
from jaxlm.models import lora as lora_lib
from jaxlm.models.decoding import Sampling
from tests.hf_tiny import tiny_llama_dir

SHAPE = {"batch_size": 4, "buckets": (16, 32, 64)}


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    return jaxlm.load_pretrained(tiny_llama_dir(tmp_path_factory.mktemp("prefix_llama"), seed=5))


def _shared_rows(seed=0):
    """Rows of three "tasks": each a long shared head (different lengths) + a short own tail; two loners."""
    rng = np.random.default_rng(seed)
    heads = [rng.integers(3, 128, n).tolist() for n in (40, 23, 18)]
    rows, task = [], []
    for t, head in enumerate(heads):
        for _ in range(3 + t):
            rows.append(head + rng.integers(3, 128, int(rng.integers(1, 9))).tolist())
            task.append(t)
    rows += [rng.integers(3, 128, 12).tolist(), rng.integers(3, 128, 30).tolist()]  # share nothing
    task += [0, 1]
    return rows, task


def _adapters(pre, n=3):
    return _adapters_for(pre, ("q_proj", "v_proj", "down_proj"), n)


def test_shared_prefixes_groups_by_owner_and_keeps_long_prefixes():
    a = list(range(10, 40))  # 30 shared tokens
    keys = [a + [1], a + [2], a + [3], a + [4], a[:20] + [99, 98], [5] * 25, [5] * 25 + [6]]
    groups = shared_prefixes(keys, min_length=16)
    by_rows = {tuple(sorted(rows)): n for n, rows in groups}
    # rows 0-3 share 30 tokens (3 x 30 = 90 saved); with row 4 (20 shared) 4 x 20 = 80: kept apart
    assert by_rows == {(0, 1, 2, 3): 30, (5, 6): 25}
    # owners (adapters) split a group: a prefix's cache is per adapter
    groups = shared_prefixes(keys, min_length=16, owners=[0, 1, 1, 0, 0, 0, 0])
    assert {tuple(sorted(r)): n for n, r in groups} == {(1, 2): 30, (0, 3, 4): 20, (5, 6): 25}
    assert shared_prefixes(keys, min_length=31) == []
    # 4 rows sharing 20 save 60 tokens, more than 2 rows sharing 30 (30): one group of 20
    keys = [a[:20] + [7], a[:20] + [8], a + [1], a + [2]]
    assert [(n, sorted(r)) for n, r in shared_prefixes(keys, 16)] == [(20, [0, 1, 2, 3])]


@pytest.mark.parametrize("with_lora", [False, True])
def test_prefix_cached_scores_and_greedy_ids_equal_recomputing(llama, with_lora):
    rows, task = _shared_rows()
    rng = np.random.default_rng(1)
    examples = [(r, rng.integers(3, 128, int(rng.integers(1, 6))).tolist()) for r in rows]
    kw = {"lora": _adapters(llama), "adapter_index": task} if with_lora else {}
    cached, plain = Engine(llama, **SHAPE), Engine(llama, prefix_cache=False, **SHAPE)
    before = engine_lib.TRACE_COUNTS["prefix"] + engine_lib.TRACE_COUNTS["score_prefix"]
    got = cached.score(examples, **kw)
    want = plain.score(examples, **kw)
    for g, w in zip(got, want):
        np.testing.assert_allclose(g.token_logprobs, w.token_logprobs, rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(g.logprob, w.logprob, rtol=1e-5)
    assert any(k[0] == "score_prefix" for k in cached.compiled_shapes)  # the cached path did run
    assert not any(k[0] == "score_prefix" for k in plain.compiled_shapes)
    assert engine_lib.TRACE_COUNTS["prefix"] + engine_lib.TRACE_COUNTS["score_prefix"] >= before

    gen_cached = [r.output_ids for r in cached.generate(rows, 6, **kw)]
    gen_plain = [r.output_ids for r in plain.generate(rows, 6, **kw)]
    assert gen_cached == gen_plain
    assert any(k[0] == "generate_prefix" for k in cached.compiled_shapes)
    assert sum(map(len, gen_cached)) > 0


def test_rank_classification_runs_each_prompt_once(llama):
    rng = np.random.default_rng(3)
    inputs = [rng.integers(3, 128, n).tolist() for n in (30, 20, 45)]
    options = [[rng.integers(3, 128, int(k)).tolist() for k in rng.integers(1, 5, 4)] for _ in inputs]
    cached, plain = Engine(llama, **SHAPE), Engine(llama, prefix_cache=False, **SHAPE)
    got, want = cached.rank_classify(inputs, options), plain.rank_classify(inputs, options)
    np.testing.assert_allclose(np.concatenate(got), np.concatenate(want), rtol=1e-5)
    # the three prompts are three prefixes of one prefix call; the 12 options continue in 3 batches of 4
    kinds = sorted(k[0] for k in cached.compiled_shapes)
    assert kinds.count("prefix") == 1 and "score" not in kinds
    prefix_key = next(k for k in cached.compiled_shapes if k[0] == "prefix")
    assert prefix_key[1] == (4, 64)  # 3 prompts padded to 4 prefix rows of 64 slots


def test_per_token_and_per_byte_normalisation(llama):
    rng = np.random.default_rng(4)
    inputs = [rng.integers(3, 128, 20).tolist()]
    options = [[[5, 6], [7], [8, 9, 10]]]
    eng = Engine(llama, **SHAPE)
    total = eng.rank_classify(inputs, options)[0]
    mean = eng.rank_classify(inputs, options, normalization="mean")[0]
    per_byte = eng.rank_classify(inputs, options, normalization="byte", option_bytes=[[4, 1, 9]])[0]
    np.testing.assert_allclose(mean, [total[0] / 2, total[1], total[2] / 3], rtol=1e-6)
    np.testing.assert_allclose(per_byte, [total[0] / 4, total[1], total[2] / 9], rtol=1e-6)
    with pytest.raises(ValueError, match="option_bytes"):
        eng.rank_classify(inputs, options, normalization="byte")
    with pytest.raises(ValueError, match="normalization"):
        eng.rank_classify(inputs, options, normalization="chars")


def test_sampling_is_seeded_and_reduces_to_greedy(llama):
    rows, _ = _shared_rows(seed=7)
    eng = Engine(llama, prefix_cache=False, batch_size=4, buckets=(64,))  # one compiled shape per setting
    gen = lambda e, s=None: [r.output_ids for r in e.generate(rows, 8, sampling=s)]
    greedy = gen(eng)
    hot = Sampling(temperature=1.5, seed=3)
    a = gen(eng, hot)
    assert a == gen(eng, hot) and a != greedy  # seeded: deterministic
    assert a != gen(eng, Sampling(temperature=1.5, seed=4))
    # a row's draws depend on (seed, row id), not on its batch or the prefix cache
    assert gen(Engine(llama, batch_size=2, buckets=(64,)), hot) == a
    assert gen(eng, Sampling(temperature=1.0, top_k=1, seed=9)) == greedy
    assert gen(eng, Sampling(temperature=1e-7, seed=9)) == greedy
    assert gen(eng, Sampling(temperature=1.0, top_p=1e-6, seed=2)) == greedy  # top_p -> 0: the argmax only
    with pytest.raises(ValueError, match="top_p"):
        Sampling(temperature=1.0, top_p=0.0)


def test_t5_options_share_one_encoder_pass(tmp_path):
    from tests.hf_tiny import tiny_t5_dir

    tiny_t5_dir(tmp_path, "v1_1", seed=3)
    t5 = jaxlm.load_pretrained(tmp_path)
    rng = np.random.default_rng(6)
    inputs = [rng.integers(3, 100, n).tolist() for n in (9, 14, 5)]
    options = [[rng.integers(3, 100, int(k)).tolist() for k in rng.integers(1, 5, 3)] for _ in inputs]
    stacked = _adapters_for(t5, ("q", "v", "o"))
    kw = {"lora": stacked, "adapter_index": [0, 2, 1]}
    shape = {"batch_size": 4, "buckets": (16,)}
    cached, plain = Engine(t5, **shape), Engine(t5, prefix_cache=False, **shape)
    got, want = cached.rank_classify(inputs, options, **kw), plain.rank_classify(inputs, options, **kw)
    np.testing.assert_allclose(np.concatenate(got), np.concatenate(want), rtol=1e-5)
    kinds = sorted(k[0] for k in cached.compiled_shapes)
    assert kinds.count("encode") == 1 and "score" not in kinds  # 3 sources, one encoder call


def _adapters_for(pre, targets, n=3):
    spec = lora_lib.LoraSpec(targets, rank=2, alpha=4.0)
    out = []
    for i in range(n):
        a = lora_lib.init_lora(spec, pre.params, jax.random.PRNGKey(30 + i))
        out.append(a.replace(params=jax.tree_util.tree_map(lambda x, i=i: x + 0.2 * (i + 1), a.params)))
    return lora_lib.stack(out)


def test_prefix_cache_under_a_device_mesh_equals_recomputing_on_one_device(llama):
    """Sharded (data=4, fsdp=2 over 8 CPU devices) with the prefix cache == one device without it:
    scores and greedy ids, with per-example adapters; the cached path did run under the mesh."""
    from jaxlm.sharding import make_mesh

    mesh = make_mesh("data=4,fsdp=2")
    rows, task = _shared_rows(seed=3)
    rng = np.random.default_rng(2)
    examples = [(r, rng.integers(3, 128, int(rng.integers(1, 6))).tolist()) for r in rows]
    kw = {"lora": _adapters(llama), "adapter_index": task}
    sharded = Engine(llama, batch_size=8, buckets=(16, 32, 64), mesh=mesh)
    plain = Engine(llama, prefix_cache=False, **SHAPE)
    for g, w in zip(sharded.score(examples, **kw), plain.score(examples, **kw)):
        np.testing.assert_allclose(g.token_logprobs, w.token_logprobs, rtol=1e-4, atol=1e-4)
    assert any(k[0] == "score_prefix" for k in sharded.compiled_shapes)
    assert [r.output_ids for r in sharded.generate(rows, 6, **kw)] == [r.output_ids for r in plain.generate(rows, 6, **kw)]
    assert any(k[0] == "generate_prefix" for k in sharded.compiled_shapes)


def test_every_chunk_continues_from_one_padded_prefix_shape(llama):
    """Six prefix groups at batch 4 (chunks of 4 and 2 prefixes, heads of 18-45 tokens: slot buckets 32
    and 64): every chunk's cache is padded to 4 prefixes x 64 slots, so the continuing programs
    compile once per continuation width, and scores and greedy ids still equal recomputing."""
    rng = np.random.default_rng(7)
    heads = [rng.integers(3, 128, n).tolist() for n in (45, 40, 33, 30, 20, 18)]
    rows = [h + rng.integers(3, 128, int(rng.integers(1, 5))).tolist() for h in heads for _ in range(2)]
    examples = [(r, rng.integers(3, 128, 3).tolist()) for r in rows]
    cached, plain = Engine(llama, **SHAPE), Engine(llama, prefix_cache=False, **SHAPE)
    for g, w in zip(cached.score(examples), plain.score(examples)):
        np.testing.assert_allclose(g.token_logprobs, w.token_logprobs, rtol=1e-5, atol=1e-5)
    assert [r.output_ids for r in cached.generate(rows, 5)] == [r.output_ids for r in plain.generate(rows, 5)]
    continued = [k for k in cached.compiled_shapes if k[0] in ("score_prefix", "generate_prefix")]
    assert {k[1] for k in continued} == {(4, 64)}
    assert len([k for k in cached.compiled_shapes if k[0] == "prefix"]) == 2  # the chunks' own prefix runs
