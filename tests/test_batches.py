"""numpy batches from real seqio tasks: exact resume, shards, packing, loss weights, mixture rates."""

from __future__ import annotations

import json

import numpy as np
import pytest

from jaxlm.data.batches import MixtureBatches, build_mixture_batches, materialize_task
from jaxlm.data.mixtures import mixture_from_tasks, mixture_rates
from jaxlm.data.tasks import register_tasks
from jaxlm.data.vocab import TokenizerVocabulary, byte_vocabulary
from jaxlm.errors import UsageError
from jaxlm.features import check_batch, layout_of

SUPERNI = ["task1393_superglue_copa_text_completion", "task645_summarization", "task670_ambigqa_question_generation"]
BBH = ["boolean_expressions", "causal_judgement", "penguins_in_a_table", "snarks"]


@pytest.fixture(scope="module")
def smollm2_vocab(smollm2):
    return TokenizerVocabulary(smollm2.tokenizer, name="smollm2")


@pytest.fixture(scope="module")
def superni_mix(shared_data, smollm2_vocab):
    names = register_tasks("superni", shared_data / "superni", vocabulary=smollm2_vocab, names=SUPERNI, max_instances=40)
    mixture_from_tasks("test_batches_superni", names, "uniform")
    return names


@pytest.fixture(scope="module")
def bbh_tasks(shared_data):
    """BBH tasks of unequal sizes (250, 187, 146, 178 examples), byte vocabulary."""
    return register_tasks("bbh", shared_data / "bbh", vocabulary=byte_vocabulary(), names=BBH)


def _take(it, n):
    return [next(it) for _ in range(n)]


def _equal(a, b):
    return len(a) == len(b) and all(x.keys() == y.keys() and all(np.array_equal(x[k], y[k]) for k in x) for x, y in zip(a, b))


@pytest.mark.parametrize("layout,pack", [("decoder_only", False), ("decoder_only", True), ("encoder_decoder", False), ("encoder_decoder", True)])
def test_restore_gives_the_same_next_batches(superni_mix, layout, pack):
    kw = dict(batch_size=4, layout=layout, max_input_len=192, max_target_len=32, buckets=(64, 128, 256), pack=pack, seed=7)
    run = build_mixture_batches("test_batches_superni", **kw)
    _take(run, 3)
    state = json.loads(json.dumps(run.state()))  # what a checkpoint stores
    expected = _take(run, 5)
    fresh = build_mixture_batches("test_batches_superni", **kw)
    fresh.restore(state)
    resumed = _take(fresh, 5)
    assert _equal(resumed, expected)
    assert layout_of(expected[0]) == layout
    for b in expected:
        check_batch(b)
        assert b["decoder_input_tokens"].dtype == np.int32 and b["decoder_loss_weights"].dtype == np.float32
        assert b["decoder_input_tokens"].shape[1] in (64, 128, 256)
    # a different seed is a different stream
    other = build_mixture_batches("test_batches_superni", **{**kw, "seed": 8})
    assert not _equal(_take(other, 3), _take(build_mixture_batches("test_batches_superni", **kw), 3))


@pytest.mark.parametrize("pack", [False, True])
def test_shards_partition_the_global_batch(superni_mix, pack):
    kw = dict(batch_size=8, max_input_len=160, max_target_len=32, buckets=(64, 128, 256), pack=pack, seed=3)
    whole = _take(build_mixture_batches("test_batches_superni", **kw), 3)
    parts = [_take(build_mixture_batches("test_batches_superni", **kw, shard_index=i, num_shards=4), 3) for i in range(4)]
    for step, batch in enumerate(whole):
        for name, value in batch.items():
            assert np.array_equal(np.concatenate([p[step][name] for p in parts]), value), name
    with pytest.raises(UsageError, match="divisible"):
        build_mixture_batches("test_batches_superni", batch_size=6, num_shards=4)


def _examples(task_name):
    t = materialize_task(task_name, "train")
    return {(tuple(t.inputs(i)), tuple(t.targets(i))) for i in range(t.num_examples)}


def test_decoder_only_loss_weights_are_exactly_the_target_tokens(superni_mix, smollm2_vocab):
    examples = {name: _examples(name) for name in superni_mix}
    run = build_mixture_batches("test_batches_superni", batch_size=8, max_input_len=4096, max_target_len=512, seed=1)
    eos = smollm2_vocab.eos_id
    for batch in _take(run, 3):
        tokens, labels, weights = batch["decoder_input_tokens"], batch["decoder_target_tokens"], batch["decoder_loss_weights"]
        for r in range(tokens.shape[0]):
            n = int((batch["decoder_segment_ids"][r] == 1).sum())
            assert np.array_equal(batch["decoder_positions"][r, :n], np.arange(n))
            assert np.array_equal(labels[r, : n - 1], tokens[r, 1:n]) and labels[r, n - 1] == 0
            on = np.flatnonzero(weights[r])
            start = on[0] + 1  # the first target token is the label of the last prompt token
            prompt, target = tuple(tokens[r, :start]), tuple(labels[r, on])
            assert np.array_equal(on, np.arange(start - 1, n - 1)), "weights must be contiguous over the target"
            assert target[-1] == eos and (prompt, target) in examples[superni_mix[batch["task_index"][r]]]
            assert weights[r, n:].sum() == 0 and tokens[r, n:].sum() == 0


def test_packing_restarts_segments_and_never_predicts_across_them(superni_mix):
    examples = set().union(*(_examples(name) for name in superni_mix))
    width = 512
    run = build_mixture_batches("test_batches_superni", batch_size=4, max_input_len=448, max_target_len=64,
                          buckets=(width,), pack=True, seed=2)
    segments_seen = 0
    for batch in _take(run, 3):
        assert "task_index" not in batch and batch["decoder_input_tokens"].shape == (4, width)
        for r in range(4):
            seg = batch["decoder_segment_ids"][r]
            ids = [s for s in np.unique(seg) if s]
            assert ids == list(range(1, len(ids) + 1))
            for s in ids:
                where = np.flatnonzero(seg == s)
                a, n = where[0], len(where)
                assert np.array_equal(where, np.arange(a, a + n)), "a segment is contiguous"
                assert np.array_equal(batch["decoder_positions"][r, where], np.arange(n))
                toks, labels = batch["decoder_input_tokens"][r, where], batch["decoder_target_tokens"][r, where]
                w = batch["decoder_loss_weights"][r, where]
                assert np.array_equal(labels[:-1], toks[1:]) and labels[-1] == 0 and w[-1] == 0
                start = np.flatnonzero(w)[0] + 1
                assert (tuple(toks[:start]), tuple(labels[w > 0])) in examples
                segments_seen += 1
    assert segments_seen > 12  # several short Super-NI examples per 512-token row


def test_encoder_decoder_layout(superni_mix, smollm2_vocab):
    examples = set().union(*(_examples(name) for name in superni_mix))
    batch = next(build_mixture_batches("test_batches_superni", batch_size=4, layout="encoder_decoder",
                                 max_input_len=4096, max_target_len=512, seed=0))
    for r in range(4):
        ne = int(batch["encoder_segment_ids"][r].sum())
        nd = int(batch["decoder_segment_ids"][r].sum())
        target = batch["decoder_target_tokens"][r, :nd]
        assert batch["decoder_input_tokens"][r, 0] == 0 and np.array_equal(batch["decoder_input_tokens"][r, 1:nd], target[:-1])
        assert np.array_equal(batch["decoder_loss_weights"][r], (batch["decoder_segment_ids"][r] > 0).astype(np.float32))
        assert (tuple(batch["encoder_input_tokens"][r, :ne]), tuple(target)) in examples
        assert target[-1] == smollm2_vocab.eos_id


def test_truncation_policy_is_applied_and_counted(superni_mix, smollm2_vocab):
    run = build_mixture_batches("test_batches_superni", batch_size=8, max_input_len=64, max_target_len=8,
                          buckets=(16, 32, 64, 128), seed=4)
    tasks = [materialize_task(n, "train") for n in superni_mix]
    batches = _take(run, 4)
    counts = run.state()["truncation"]
    assert counts["examples"] == 32
    # recount from the raw lengths of the examples the stream consumed (same seed, fresh sampler)
    probe = build_mixture_batches("test_batches_superni", batch_size=1, max_input_len=64, max_target_len=8, seed=4)
    consumed = [probe._consume() for _ in range(32)]
    long_in = sum(len(tasks[t].inputs(e)) > 64 for t, e in consumed)
    long_tgt = sum(len(tasks[t].targets(e)) > 8 for t, e in consumed)
    assert (counts["inputs"], counts["targets"]) == (long_in, long_tgt) and long_in > 0 and long_tgt > 0
    for batch, (t, e) in zip(batches[0]["decoder_input_tokens"], consumed[:8]):
        full_in, full_tgt = tasks[t].inputs(e), tasks[t].targets(e)
        kept_in = full_in[-64:]
        kept_tgt = np.concatenate([full_tgt[:7], full_tgt[-1:]]) if len(full_tgt) > 8 else full_tgt
        row = np.concatenate([kept_in, kept_tgt])
        assert np.array_equal(batch[: len(row)], row)  # the END of the prompt and the target's EOS survive
        assert kept_tgt[-1] == smollm2_vocab.eos_id


@pytest.mark.parametrize("scheme", ["proportional_cap", "uniform", "temperature", "explicit"])
def test_empirical_task_rates_follow_the_mixture(bbh_tasks, scheme):
    sizes = np.array([materialize_task(n, "train").num_examples for n in bbh_tasks], float)
    assert sizes.tolist() == [250, 187, 146, 178]
    if scheme == "proportional_cap":
        rates = mixture_rates(bbh_tasks, "proportional", cap=180)
        expected = np.minimum(sizes, 180)
    elif scheme == "uniform":
        rates = mixture_rates(bbh_tasks, "uniform")
        expected = np.ones(4)
    elif scheme == "temperature":
        rates = mixture_rates(bbh_tasks, "temperature", temperature=0.25)  # sharpens: n^4
        expected = sizes ** 4
    else:
        weights = dict(zip(bbh_tasks, [5.0, 1.0, 3.0, 1.0]))
        rates = mixture_rates(bbh_tasks, weights)
        expected = np.array([5.0, 1.0, 3.0, 1.0])
    expected = expected / expected.sum()
    np.testing.assert_allclose([rates[n] for n in bbh_tasks], expected, rtol=1e-12)
    mixture_from_tasks(f"test_rates_{scheme}", bbh_tasks, rates)
    run = build_mixture_batches(f"test_rates_{scheme}", batch_size=64, max_input_len=64, max_target_len=16, seed=11)
    counts = np.bincount(np.concatenate([b["task_index"] for b in _take(run, 150)]), minlength=4)
    empirical = counts / counts.sum()
    # 9600 draws: binomial std <= 0.005; allow 4 sigma
    np.testing.assert_allclose(empirical, expected, atol=0.02)


def test_iterator_rejects_a_foreign_state(bbh_tasks):
    tasks = [materialize_task(n, "train") for n in bbh_tasks]
    run = MixtureBatches(tasks, [1, 1, 1, 1], batch_size=2, seed=0)
    with pytest.raises(UsageError, match="seed"):
        run.restore({**run.state(), "seed": 1})
    with pytest.raises(UsageError, match="counters"):
        run.restore({**run.state(), "counters": [0, 0]})


def test_rewrite_batches_for_the_tiny_from_scratch_model():
    from jaxlm.data.mixtures import rewrite_batches
    from jaxlm.data.string_rewrite import RewriteConfig, apply_rule

    config = RewriteConfig(num_rules=50, examples_per_rule=4, num_heldout_rules=5, frequency="power_law", seed=3)
    kw = dict(batch_size=16, max_input_len=64, max_target_len=32, buckets=(32, 64, 128), seed=5)
    run = rewrite_batches(config, **kw)
    assert len(run.tasks) == 50 and sum(t.num_examples for t in run.tasks) == 200
    vocab = byte_vocabulary()
    batch = next(run)
    assert batch["decoder_input_tokens"].max() < vocab.vocab_size == 259
    for r in range(16):
        w = batch["decoder_loss_weights"][r] > 0
        start = np.flatnonzero(w)[0] + 1
        prompt = vocab.decode(batch["decoder_input_tokens"][r, :start].tolist())
        x, y, z = prompt.removesuffix("=").split("|")
        target = batch["decoder_target_tokens"][r, w]
        assert target[-1] == vocab.eos_id and vocab.decode(target.tolist()) == apply_rule(x, y, z)
    state = run.state()
    expected = _take(run, 3)
    fresh = rewrite_batches(config, **kw)
    fresh.restore(state)
    assert _equal(_take(fresh, 3), expected)


def test_decoder_only_rows_start_with_bos_when_the_tokenizer_adds_one(shared_data, smollm2):
    import dataclasses

    with_bos = TokenizerVocabulary(dataclasses.replace(smollm2.tokenizer, add_bos=True), name="smollm2_bos")
    (name,) = register_tasks("superni", shared_data / "superni", vocabulary=with_bos,
                             names=["task648_answer_generation"], max_instances=8)
    examples = _examples(name)
    batch = next(build_mixture_batches(name, batch_size=4, max_input_len=4096, max_target_len=512, seed=0))
    assert with_bos.bos_id == 1 and (batch["decoder_input_tokens"][:, 0] == 1).all()
    for r in range(4):
        w = batch["decoder_loss_weights"][r] > 0
        start = np.flatnonzero(w)[0] + 1
        assert (tuple(batch["decoder_input_tokens"][r, 1:start]), tuple(batch["decoder_target_tokens"][r, w])) in examples
    enc = next(build_mixture_batches(name, batch_size=4, layout="encoder_decoder", max_input_len=4096, max_target_len=512, seed=0))
    assert (enc["encoder_input_tokens"][:, 0] != 1).all()  # BOS is a decoder-only prompt convention


def test_tokenized_cache_on_disk_is_keyed_by_registration(shared_data, tmp_path):
    def register(max_instances):
        (name,) = register_tasks("bbh", shared_data / "bbh", vocabulary=byte_vocabulary(), names=["web_of_lies"],
                                 max_instances=max_instances)
        return name

    first = materialize_task(register(30), "train", cache_dir=tmp_path)
    files = sorted(tmp_path.glob("*.npz"))
    assert len(files) == 1 and first.num_examples == 30
    again = materialize_task(register(30), "train", cache_dir=tmp_path)  # a fresh Task object: read from disk
    assert sorted(tmp_path.glob("*.npz")) == files
    assert np.array_equal(again.inputs_flat, first.inputs_flat) and np.array_equal(again.targets_offsets, first.targets_offsets)
    other = materialize_task(register(20), "train", cache_dir=tmp_path)  # other examples: another file
    assert other.num_examples == 20 and len(list(tmp_path.glob("*.npz"))) == 2
