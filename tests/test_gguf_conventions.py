"""GGUF metadata: RoPE scaling (linear, yarn) honoured against transformers, other keys that change
the numbers refused by name, SentencePiece ('llama') tokenizers built as transformers builds them."""

import jax.numpy as jnp
import numpy as np
import pytest
import torch

import jaxlm
from jaxlm.checkpoints.hf import CheckpointError
from tests.gguf_tiny import write_llama_gguf

MAX_POS = 16


def _hf_model(rope_scaling=None, tie=False):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=64, hidden_size=64, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                      num_key_value_heads=1, max_position_embeddings=MAX_POS, rope_theta=500.0,
                      rope_scaling=rope_scaling, initializer_range=0.3, tie_word_embeddings=tie)
    return LlamaForCausalLM(cfg).eval()


def _compare(tmp_path, hf_scaling, fields):
    model = _hf_model(hf_scaling)
    path = write_llama_gguf(tmp_path / "m.gguf", model, fields)
    ids = np.random.default_rng(0).integers(0, 64, (1, 4 * MAX_POS))
    pre = jaxlm.load_pretrained(path)
    ours = np.asarray(pre.model.apply({"params": pre.params}, jnp.asarray(ids)))
    with torch.no_grad():
        ref = model(input_ids=torch.tensor(ids)).logits.numpy()
    return pre, ours, ref


def test_plain_gguf_matches_transformers(tmp_path):
    pre, ours, ref = _compare(tmp_path, None, {})
    assert pre.config.rope_scaling is None
    assert np.abs(ours - ref).max() <= 1e-4 * np.abs(ref).max()


@pytest.mark.parametrize("kind,hf,fields", [
    ("linear", {"rope_type": "linear", "factor": 4.0},
     {"llama.rope.scaling.type": "linear", "llama.rope.scaling.factor": 4.0}),
    ("yarn", {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 8, "beta_fast": 16.0},
     {"llama.rope.scaling.type": "yarn", "llama.rope.scaling.factor": 4.0,
      "llama.rope.scaling.original_context_length": 8, "llama.rope.scaling.yarn_beta_fast": 16.0}),
])
def test_gguf_rope_scaling_matches_transformers(tmp_path, kind, hf, fields):
    pre, ours, ref = _compare(tmp_path, hf, fields)
    assert pre.config.rope_scaling.rope_type == kind
    assert np.abs(ours - ref).max() <= 1e-4 * np.abs(ref).max()
    (tmp_path / "plain").mkdir()
    _, unscaled, _ = _compare(tmp_path / "plain", hf, {})  # the same file without the scaling keys
    assert np.abs(unscaled - ref)[:, MAX_POS:].max() > 0.1  # the scaling key changes the numbers


@pytest.mark.parametrize("key,value,match", [
    ("llama.rope.scaling.type", "longrope", "llama.rope.scaling.type = 'longrope' is not supported"),
    ("llama.expert_count", 8, "llama.expert_count = 8 is not supported"),
    ("llama.attention.causal", False, "llama.attention.causal = False is not supported"),
    ("llama.final_logit_softcapping", 30.0, "llama.final_logit_softcapping = 30.0 is not supported"),
    ("llama.rope.dimension_count", 16, r"llama.rope.dimension_count = 16 is not supported \(partial rotary"),
    ("llama.brand_new_key", 1, "llama.brand_new_key is not known to jaxlm"),
    ("tokenizer.ggml.add_sep_token", True, "tokenizer.ggml.add_sep_token = True is not supported"),
])
def test_gguf_keys_that_change_numbers_are_refused(tmp_path, key, value, match):
    path = write_llama_gguf(tmp_path / "m.gguf", _hf_model(), {key: value})
    with pytest.raises(CheckpointError, match=rf"m.gguf: metadata key {match}"):
        jaxlm.load_pretrained(path)


def test_neutral_values_of_refused_keys_load(tmp_path):
    path = write_llama_gguf(tmp_path / "m.gguf", _hf_model(), {
        "llama.expert_count": 0, "llama.attention.causal": True, "llama.rope.scaling.type": "none",
        "general.name": "tiny", "general.sampling.temp": 0.7})
    assert jaxlm.load_pretrained(path).config.rope_scaling is None


SPM_PIECES = ["\u2581", "t", "h", "e", "l", "o", "w", "r", "d", "a", "n", "i", "s", "he", "\u2581t", "\u2581th",
              "\u2581the", "lo", "ll", "llo", "\u2581he", "\u2581hel", "\u2581hello", "or", "\u2581w", "\u2581wor",
              "ld", "\u2581world", "in", "\u2581a", "an", "\u2581an", "is", "\u2581is", "<think>"]


def _spm_fields():
    tokens = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)] + SPM_PIECES
    types = [2, 3, 3] + [6] * 256 + [1] * (len(SPM_PIECES) - 1) + [4]
    scores = [0.0, 0.0, 0.0] + [0.0] * 256 + [-float(i) for i in range(len(SPM_PIECES))]
    return {"tokenizer.ggml.model": "llama", "tokenizer.ggml.tokens": tokens, "tokenizer.ggml.scores": scores,
            "tokenizer.ggml.token_type": types, "tokenizer.ggml.bos_token_id": 1, "tokenizer.ggml.eos_token_id": 2,
            "tokenizer.ggml.unknown_token_id": 0, "tokenizer.ggml.eot_token_id": 4}


SPM_CONFIG = {"llama.context_length": 16, "llama.embedding_length": 8, "llama.block_count": 1,
              "llama.feed_forward_length": 8, "llama.attention.head_count": 2, "llama.attention.head_count_kv": 2,
              "llama.attention.layer_norm_rms_epsilon": 1e-5}
TEXTS = ["hello world", "the hello", " the  world\n", "Héllo wörld 😀", "an is a the", "<think>hello</think>", ""]


def test_sentencepiece_gguf_tokenizer_matches_transformers(tmp_path):
    from transformers import AutoTokenizer

    from jaxlm.checkpoints.pretrained import read_tokenizer

    write_llama_gguf(tmp_path / "spm.gguf", None, SPM_CONFIG, _spm_fields())
    ours = read_tokenizer(tmp_path / "spm.gguf")
    ref = AutoTokenizer.from_pretrained(tmp_path, gguf_file="spm.gguf")
    assert ours.bos_id == 1 and ours.add_bos and ours.eos_ids == (2, 4)  # eos + eot (llama.cpp's end of generation)
    for text in TEXTS:
        ids = ours.encode(text)
        assert ids == ref.encode(text), text
        assert ours.decode(ids) == ref.decode(ids, skip_special_tokens=True), text
    assert len(ours.encode("hello world")) == 3  # <s> ▁hello ▁world
    # a character outside the vocabulary falls back to its UTF-8 bytes: <0xC3> <0xA9>
    assert ours.encode("é", add_special_tokens=False)[-2:] == [3 + 0xC3, 3 + 0xA9]


def test_sentencepiece_without_space_prefix_is_refused(tmp_path):
    from jaxlm.checkpoints.pretrained import read_tokenizer

    write_llama_gguf(tmp_path / "spm.gguf", None, {"llama.context_length": 16},
                     {**_spm_fields(), "tokenizer.ggml.add_space_prefix": False})
    with pytest.raises(CheckpointError, match="spm.gguf: tokenizer.ggml.add_space_prefix=False is not supported"):
        read_tokenizer(tmp_path / "spm.gguf")
