"""Eval engine: batched == one-by-one, buckets do not change scores, mixed-adapter batches equal
per-adapter runs, a bounded and honestly reported compile count, sharded == unsharded."""

import collections

import jax
import numpy as np
import pytest

import jaxlm
from jaxlm.eval import engine as engine_lib
from jaxlm.eval.engine import Engine
from jaxlm.models import lora as lora_lib
from tests.hf_tiny import tiny_llama_dir, tiny_t5_dir


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    return jaxlm.load_pretrained(tiny_llama_dir(tmp_path_factory.mktemp("eval_llama"), seed=3))


@pytest.fixture(scope="module")
def t5(tmp_path_factory):
    path = tmp_path_factory.mktemp("eval_t5")
    tiny_t5_dir(path, "v1_1", seed=3)
    return jaxlm.load_pretrained(path)


# One padded shape for most calls, so the tests share compiled functions (the jit cache is per model).
SHAPE = {"batch_size": 4, "buckets": (32,)}


def _rows(rng, n, lo, hi, vocab):
    return [rng.integers(3, vocab, int(rng.integers(lo, hi + 1))).tolist() for _ in range(n)]


def _examples(vocab, n=7, seed=0):
    rng = np.random.default_rng(seed)
    return list(zip(_rows(rng, n, 1, 20, vocab), _rows(rng, n, 1, 8, vocab)))


def _adapters(pre, targets, n=3):
    """n adapters with non-zero B (a fresh adapter is the base model) and distinct weights."""
    spec = lora_lib.LoraSpec(targets, rank=2, alpha=4.0)
    out = []
    for i in range(n):
        a = lora_lib.init_lora(spec, pre.params, jax.random.PRNGKey(10 + i))
        out.append(a.replace(params=jax.tree_util.tree_map(lambda x, i=i: x + 0.2 * (i + 1), a.params)))
    return out


def _logprobs(results):
    return np.array([r.logprob for r in results])


@pytest.mark.parametrize("family", ["llama", "t5"])
def test_batched_equals_one_by_one_and_buckets_do_not_change_scores(family, llama, t5):
    pre = llama if family == "llama" else t5
    vocab = pre.config.vocab_size
    examples = _examples(vocab)
    batched = Engine(pre, **SHAPE)
    ref = _logprobs(batched.score(examples))
    single = Engine(pre, batch_size=1, buckets=(32,))
    np.testing.assert_allclose(_logprobs(single.score(examples)), ref, atol=1e-4)
    many_buckets = Engine(pre, batch_size=4, buckets=(8, 16, 32, 64))
    np.testing.assert_allclose(_logprobs(many_buckets.score(examples)), ref, atol=1e-4)
    assert many_buckets.num_compiles > 1
    assert all(r.num_tokens == len(t) for r, (_, t) in zip(batched.score(examples), examples))

    prompts = [inp for inp, _ in examples]
    gen = [r.output_ids for r in batched.generate(prompts, max_new_tokens=5)]
    assert gen == [r.output_ids for r in single.generate(prompts, max_new_tokens=5)]
    assert any(len(g) > 0 for g in gen)


def test_rank_classify_scores_each_pair_once_and_matches_score(llama):
    rng = np.random.default_rng(1)
    inputs = _rows(rng, 5, 2, 20, 128)
    options = [_rows(rng, k, 1, 4, 128) for k in (2, 4, 1, 3, 2)]  # ragged counts and lengths
    eng = Engine(llama, **SHAPE)
    got = eng.rank_classify(inputs, options)
    assert [len(g) for g in got] == [2, 4, 1, 3, 2]
    for inp, opts, scores in zip(inputs, options, got):
        direct = _logprobs(eng.score([(inp, o) for o in opts]))
        np.testing.assert_allclose(scores, direct, atol=1e-4)
    mean = eng.rank_classify(inputs, options, normalization="mean")
    for opts, s, m in zip(options, got, mean):
        np.testing.assert_allclose(m, [v / len(o) for v, o in zip(s, opts)], rtol=1e-6)
    with pytest.raises(ValueError, match="no answer options"):
        eng.rank_classify(inputs[:1], [[]])


@pytest.mark.parametrize("family", ["llama", "t5"])
def test_mixed_adapter_batches_equal_per_adapter_runs(family, llama, t5):
    pre = llama if family == "llama" else t5
    targets = ("q_proj", "v_proj", "up_proj") if family == "llama" else ("q", "v", "o")
    adapters = _adapters(pre, targets)
    stacked = lora_lib.stack(adapters)
    examples = _examples(pre.config.vocab_size, n=9, seed=2)
    which = [0, 2, 1, 1, 0, 2, 2, 0, 1]
    eng = Engine(pre, **SHAPE)
    mixed = _logprobs(eng.score(examples, lora=stacked, adapter_index=which))
    base = _logprobs(eng.score(examples))
    for k, single in enumerate(adapters):
        rows = [i for i, w in enumerate(which) if w == k]
        per = _logprobs(eng.score([examples[i] for i in rows], lora=single))
        np.testing.assert_allclose(mixed[rows], per, atol=1e-4)
    assert np.abs(mixed - base).max() > 1e-2  # the adapters do change the scores
    if family == "t5":  # T5 decoding reuses the same per-row LoRA path; its compile is the slow part
        return
    prompts = [inp for inp, _ in examples]
    gen = [r.output_ids for r in eng.generate(prompts, 5, lora=stacked, adapter_index=which)]
    for k, single in enumerate(adapters):
        rows = [i for i, w in enumerate(which) if w == k]
        assert [gen[i] for i in rows] == [r.output_ids for r in eng.generate([prompts[i] for i in rows], 5, lora=single)]
    with pytest.raises(ValueError, match="adapter_index"):
        eng.score(examples, lora=stacked)


def test_compile_count_is_bounded_and_reported_honestly(llama):
    rng = np.random.default_rng(5)
    eng = Engine(llama, batch_size=4, buckets=(16, 32, 64))  # own shapes: counts start from zero
    before = sum(engine_lib.TRACE_COUNTS.values())
    for n in (3, 11, 17, 29):  # a sweep of varied sizes and lengths
        examples = list(zip(_rows(rng, n, 1, 40, 128), _rows(rng, n, 1, 12, 128)))
        eng.score(examples)
        eng.rank_classify([e[0] for e in examples[:3]], [[[5], [6, 7]]] * 3)
        eng.generate([e[0] for e in examples], max_new_tokens=4)
    # score: widths {16, 32, 64} x target buckets {16}; generate: prompt widths {16, 32, 64}.
    kinds = collections.Counter(k[0] for k in eng.compiled_shapes)
    assert kinds["score"] + kinds["generate"] <= 6
    # rank classification's shared prompts: prefix rows {1, 2, 4} x prefix widths {16, 32, 64}
    assert kinds["prefix"] <= 9 and set(kinds) <= {"score", "generate", "prefix", "score_prefix"}
    traced = sum(engine_lib.TRACE_COUNTS.values()) - before
    assert traced <= eng.num_compiles  # the jitted bodies compiled no more often than reported
    n = eng.num_compiles
    eng.score(list(zip(_rows(rng, 9, 1, 40, 128), _rows(rng, 9, 1, 12, 128))))
    assert eng.num_compiles == n and sum(engine_lib.TRACE_COUNTS.values()) - before == traced


def test_sharded_engine_equals_unsharded(llama):
    from jaxlm.sharding import make_mesh

    mesh = make_mesh("data=4,fsdp=2")
    assert len(jax.devices()) == 8
    examples = _examples(128, n=10, seed=4)
    adapters = lora_lib.stack(_adapters(llama, ("q_proj", "down_proj")))
    which = [i % 3 for i in range(10)]
    plain, sharded = Engine(llama, batch_size=8, buckets=(32,)), Engine(llama, batch_size=8, buckets=(32,), mesh=mesh)
    kw = {"lora": adapters, "adapter_index": which}
    np.testing.assert_allclose(_logprobs(sharded.score(examples, **kw)), _logprobs(plain.score(examples, **kw)), atol=1e-4)
    prompts = [e[0] for e in examples]
    assert [r.output_ids for r in sharded.generate(prompts, 5, **kw)] == [
        r.output_ids for r in plain.generate(prompts, 5, **kw)
    ]
    with pytest.raises(ValueError, match="divide"):
        Engine(llama, batch_size=6, mesh=mesh)


@pytest.mark.slow
def test_blank_line_stop_on_smollm2_text(smollm2):
    tok = smollm2.tokenizer
    stops = engine_lib.stop_token_sequences(tok, "\n\n")
    # In context "\n\n" is two "\n" tokens; alone it is one token: both must stop decoding.
    assert (tok.encode("\n", add_special_tokens=False)[0],) * 2 in stops
    assert tuple(tok.encode("\n\n", add_special_tokens=False)) in stops
    demo = "Definition: Answer yes or no.\n\nInput: Is the sky blue?\nOutput: Yes\n\n"
    prompt = demo + "Definition: Answer yes or no.\n\nInput: Is fire cold?\nOutput:"
    eng = Engine(smollm2, batch_size=1)
    full = tok.decode(eng.generate([tok.encode(prompt)], max_new_tokens=12)[0].output_ids)
    assert "\n\n" in full  # the model continues past the answer with a blank line
    stopped = eng.generate([tok.encode(prompt)], max_new_tokens=12, stop_sequences=stops)[0].output_ids
    assert len(stopped) < 12
    assert eng.generate_text([prompt], max_new_tokens=12, stop_strings=["\n\n"]) == [full.split("\n\n")[0]]
