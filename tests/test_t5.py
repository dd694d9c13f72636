"""T5 parity with transformers (fp32, CPU) for v1.1-style (gated-gelu, untied) and original (relu, tied)
configs: logits with padding, cached decoding, LoRA (zero, merged, batched), HF export round trip."""

import functools
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

import jaxlm
from jaxlm.checkpoints.pretrained import export_hf, family
from jaxlm.models import lora as lora_lib
from jaxlm.models import t5
from tests.hf_tiny import T5_VOCAB as VOCAB
from tests.hf_tiny import tiny_t5_dir

hf_name = family("t5").hf_name


@pytest.fixture(scope="module", params=["v1_1", "original"])
def tiny(request, tmp_path_factory):
    path = tmp_path_factory.mktemp(f"t5_{request.param}")
    hf_model = tiny_t5_dir(path, request.param)
    return request.param, jaxlm.load_pretrained(path), hf_model


def _batch():
    """Right-padded encoder inputs of lengths 12, 7, 3 and decoder inputs of lengths 6, 4, 6."""
    rng = np.random.default_rng(0)
    enc_ids, enc_mask = np.zeros((3, 12), np.int64), np.zeros((3, 12), np.int64)
    for i, n in enumerate([12, 7, 3]):
        enc_ids[i, :n], enc_mask[i, :n] = rng.integers(2, VOCAB, n), 1
    dec_ids, dec_mask = np.zeros((3, 6), np.int64), np.zeros((3, 6), np.int64)
    for i, n in enumerate([6, 4, 6]):
        dec_ids[i, 1:n], dec_mask[i, :n] = rng.integers(2, VOCAB, n - 1), 1  # slot 0: decoder start (pad) token
    return enc_ids, enc_mask, dec_ids, dec_mask


def _rel_err(a, b):
    """max |a - b| relative to the logit scale (untied heads give logits ~10; float32 rounding ~1e-6 of that)."""
    return np.abs(a - b).max() / max(1.0, np.abs(b).max())


def _ours(pre, *batch, lora=None, params=None):
    args = [jnp.asarray(x) for x in batch]
    return np.asarray(pre.model.apply({"params": params or pre.params}, *args, lora=lora))


def test_config_and_params(tiny):
    kind, pre, _ = tiny
    c = pre.config
    assert pre.family == "t5" and c.family == "t5"
    assert (c.tie_word_embeddings, c.scale_decoder_outputs) == ((False, False) if kind == "v1_1" else (True, True))
    assert ("lm_head" in pre.params) == (kind == "v1_1")
    assert c.num_decoder_layers == (3 if kind == "v1_1" else 2) and c.decoder_start_token_id == 0
    ff = pre.params["decoder"]["block_0"]["layer_2"]["DenseReluDense"]
    assert set(ff) == ({"wi_0", "wi_1", "wo"} if kind == "v1_1" else {"wi", "wo"})
    assert "relative_attention_bias" not in pre.params["encoder"]["block_1"]["layer_0"]["SelfAttention"]
    axes = pre.logical_axes()
    rel = axes["encoder"]["block_0"]["layer_0"]["SelfAttention"]["relative_attention_bias"]["embedding"]
    assert tuple(rel) == ("relpos_buckets", "heads")
    assert tuple(axes["decoder"]["block_0"]["layer_1"]["EncDecAttention"]["o"]["kernel"]) == ("heads", "embed")


def test_hf_names():
    assert hf_name(("shared", "embedding")) == "shared.weight"
    assert hf_name(("lm_head", "kernel")) == "lm_head.weight"
    assert hf_name(("encoder", "block_0", "layer_0", "SelfAttention", "q", "kernel")) == (
        "encoder.block.0.layer.0.SelfAttention.q.weight"
    )
    assert hf_name(("decoder", "block_1", "layer_0", "layer_norm", "weight")) == "decoder.block.1.layer.0.layer_norm.weight"
    assert hf_name(("encoder", "final_layer_norm", "weight")) == "encoder.final_layer_norm.weight"


def test_logits_match_transformers_with_padding(tiny):
    _, pre, hf_model = tiny
    enc_ids, enc_mask, dec_ids, dec_mask = _batch()
    with torch.no_grad():
        ref = hf_model(
            input_ids=torch.tensor(enc_ids), attention_mask=torch.tensor(enc_mask),
            decoder_input_ids=torch.tensor(dec_ids), decoder_attention_mask=torch.tensor(dec_mask),
        ).logits.numpy()
    ours = _ours(pre, enc_ids, enc_mask, dec_ids, dec_mask)
    assert ours.dtype == np.float32 and ours.shape == (3, 6, VOCAB)
    real = dec_mask.astype(bool)
    assert np.abs(ours[real] - ref[real]).max() <= 1e-4


def test_cached_decode_matches_full_sequence(tiny):
    _, pre, _ = tiny
    enc_ids, enc_mask, dec_ids, _ = _batch()
    variables, model = {"params": pre.params}, pre.model
    enc_ids, enc_mask, dec_ids = jnp.asarray(enc_ids), jnp.asarray(enc_mask), jnp.asarray(dec_ids)
    # Eager (not jitted): op-by-op dispatch reuses compiled ops across tests; whole-model compiles cost more here.
    hidden = model.apply(variables, enc_ids, enc_mask, method=t5.T5.encode)
    decode = functools.partial(model.apply, method=t5.T5.decode)
    full = np.asarray(decode(variables, dec_ids, hidden, enc_mask))
    assert np.abs(full - _ours(pre, enc_ids, enc_mask, dec_ids)).max() <= 1e-5

    cache = t5.init_cache(pre.config, 3, 6)
    assert "cross" not in cache
    # Prefill two tokens (adds the cross-attention keys/values), then one token per step at a traced index.
    logits, cache = decode(variables, dec_ids[:, :2], hidden, enc_mask, cache=cache, cache_index=0)
    steps = [np.asarray(logits)]
    for i in range(2, 6):
        logits, new_cache = decode(variables, dec_ids[:, i : i + 1], hidden, enc_mask, cache=cache, cache_index=jnp.int32(i))
        assert jax.tree_util.tree_structure(new_cache) == jax.tree_util.tree_structure(cache)
        cache = new_cache
        steps.append(np.asarray(logits))
    assert np.abs(np.concatenate(steps, axis=1) - full).max() <= 1e-4


def _random_lora(params, seed, batch_size=None):
    """init_lora's A plus a nonzero B (numpy noise: eager jax.random per leaf is slow to compile)."""
    lora = lora_lib.init_lora(lora_lib.LoraSpec(("q", "v"), rank=4), params, jax.random.PRNGKey(seed), batch_size)
    rng = np.random.default_rng(seed)
    noisy = jax.tree_util.tree_map(lambda x: x + 0.1 * rng.standard_normal(x.shape, np.float32), lora.params)
    return lora.replace(params=noisy)


def test_lora_zero_merged_and_batched(tiny):
    _, pre, _ = tiny
    batch = _batch()
    base = _ours(pre, *batch)

    zero = lora_lib.init_lora(lora_lib.LoraSpec(("q", "v"), rank=4), pre.params)
    assert set(zero.params) == {"encoder", "decoder"}
    assert set(zero.params["decoder"]["block_0"]["layer_1"]["EncDecAttention"]) == {"q", "v"}
    np.testing.assert_array_equal(_ours(pre, *batch, lora=zero), base)

    single = _random_lora(pre.params, 1)
    adapted = _ours(pre, *batch, lora=single)
    assert np.abs(adapted - base).max() > 1e-3
    merged = _ours(pre, *batch, params=lora_lib.merge(pre.params, single))
    assert _rel_err(adapted, merged) <= 1e-5

    batched = _random_lora(pre.params, 2, batch_size=3)
    together = _ours(pre, *batch, lora=batched)
    for i in range(3):  # row i depends only on example i, so run the whole batch with adapter i alone
        alone = _ours(pre, *batch, lora=lora_lib.select(batched, i))
        assert _rel_err(together[i], alone[i]) <= 1e-5


def test_export_roundtrip_loads_in_transformers(tiny, tmp_path):
    from transformers import T5ForConditionalGeneration

    kind, pre, _ = tiny
    out = export_hf(pre, tmp_path / "export")
    config = json.loads((out / "config.json").read_text())
    assert config["architectures"] == ["T5ForConditionalGeneration"]
    hf_model, info = T5ForConditionalGeneration.from_pretrained(out, output_loading_info=True)
    hf_model.eval()
    tied = {"encoder.embed_tokens.weight", "decoder.embed_tokens.weight", "lm_head.weight"}
    assert set(info["missing_keys"]) <= tied and not info["unexpected_keys"] and not info["mismatched_keys"]
    assert (hf_model.lm_head.weight is hf_model.shared.weight) == (kind == "original")
    enc_ids, enc_mask, dec_ids, dec_mask = _batch()
    with torch.no_grad():
        ref = hf_model(
            input_ids=torch.tensor(enc_ids), attention_mask=torch.tensor(enc_mask), decoder_input_ids=torch.tensor(dec_ids)
        ).logits.numpy()
    assert np.abs(_ours(pre, enc_ids, enc_mask, dec_ids) - ref).max() <= 1e-4
    again = jaxlm.load_pretrained(out)
    assert again.config == pre.config


@pytest.mark.parametrize(
    "fields, tie, scale",
    [
        ({"tie_word_embeddings": False, "feed_forward_proj": "gated-gelu"}, False, False),  # v1.1 / Flan (transformers 4)
        ({}, True, True),  # original T5 config.json: no tie key, tied and scaled
        ({"tie_word_embeddings": True, "scale_decoder_outputs": False}, False, False),  # v1.1 re-saved by transformers 5
        ({"tie_word_embeddings": True, "scale_decoder_outputs": True}, True, True),
    ],
)
def test_config_from_hf_tying(fields, tie, scale):
    base = {"vocab_size": 10, "d_model": 8, "d_kv": 4, "d_ff": 16, "num_layers": 1, "num_heads": 2}
    c = t5.config_from_hf({**base, **fields})
    assert (c.tie_word_embeddings, c.scale_decoder_outputs) == (tie, scale)
    assert c.num_decoder_layers == 1 and c.decoder_start_token_id == 0 and c.eos_token_ids == (1,)
    assert c.activation == ("gelu_new" if fields.get("feed_forward_proj") == "gated-gelu" else "relu")
    assert t5.config_from_hf(t5.config_to_hf(c)) == c


def test_greedy_matches_transformers_generate(tiny):
    from jaxlm.models import decoding

    _, pre, hf_model = tiny
    enc_ids, enc_mask, _, _ = _batch()
    tokens, lengths = decoding.greedy_generate(
        pre.model, pre.params, jnp.asarray(enc_ids), jnp.asarray(enc_mask), max_new_tokens=8, eos_ids=(), pad_id=0
    )
    # Reference: transformers' full (uncached) forward, argmax appended step by step. (Its generate()
    # cache breaks when num_decoder_layers != num_layers, as in the v1.1-style config.)
    dec = torch.zeros((3, 1), dtype=torch.long)
    with torch.no_grad():
        for _ in range(8):
            logits = hf_model(input_ids=torch.tensor(enc_ids), attention_mask=torch.tensor(enc_mask), decoder_input_ids=dec).logits
            dec = torch.cat([dec, logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    np.testing.assert_array_equal(np.asarray(tokens), dec[:, 1:].numpy())
    assert np.all(np.asarray(lengths) == 8)


def test_engine_scores_and_generates_t5(tiny):
    from jaxlm.eval.engine import Engine

    _, pre, hf_model = tiny
    engine = Engine(pre, batch_size=2)
    examples = [([5, 6, 7, 8, 1], [9, 10, 1]), ([11, 12, 1], [13, 1])]
    for (inp, tgt), res in zip(examples, engine.score(examples)):
        with torch.no_grad():
            logits = hf_model(input_ids=torch.tensor([inp]), labels=torch.tensor([tgt])).logits
        ref = torch.log_softmax(logits, -1)[0, torch.arange(len(tgt)), torch.tensor(tgt)].sum().item()
        assert res.num_tokens == len(tgt) and abs(res.logprob - ref) < 1e-4
    out = engine.generate([inp for inp, _ in examples], max_new_tokens=4)
    assert all(len(r.output_ids) <= 4 for r in out)
