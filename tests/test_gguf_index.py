"""The GGUF header index (jaxlm.checkpoints.gguf): a second load reads the parsed header from the
per-user index instead of gguf.GGUFReader, gives the same config, tokenizer and tensors (quantized
ones included), and is ignored whenever the file's header bytes changed."""

import os

import numpy as np
import pytest

from jaxlm.checkpoints import gguf as jgguf
from jaxlm.checkpoints.hf import CheckpointError
from jaxlm.checkpoints.pretrained import resolve_path
from tests.gguf_tiny import write_llama_gguf


@pytest.fixture
def index_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("JAXLM_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.delenv("JAXLM_GGUF_INDEX", raising=False)
    return tmp_path / "cache" / "gguf_index"


def _no_reader(monkeypatch):
    import gguf

    def refuse(*a, **k):
        raise AssertionError("gguf.GGUFReader was called although the index matches")

    monkeypatch.setattr(gguf, "GGUFReader", refuse)


def _tiny_model(eps=1e-5):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=2,
                      num_key_value_heads=1, max_position_embeddings=32, rms_norm_eps=eps)
    return LlamaForCausalLM(cfg).eval()


def _same(a, b):
    (ca, ta, ka), (cb, tb, kb) = a, b
    assert ca == cb
    assert sorted(ta) == sorted(tb)
    for name in ta:
        np.testing.assert_array_equal(ta[name], tb[name])
    text = "Hello world, 12 + 30 = 42."
    assert ka.encode(text) == kb.encode(text) and ka.eos_ids == kb.eos_ids and ka.bos_id == kb.bos_id


def test_second_load_reads_the_index_and_matches(tmp_path, index_dir, monkeypatch):
    path = write_llama_gguf(tmp_path / "m.gguf", _tiny_model())
    first = jgguf.load_gguf(path)
    assert len(list(index_dir.glob("*.json"))) == 1
    _no_reader(monkeypatch)
    second = jgguf.load_gguf(path)
    assert isinstance(next(iter(second[1].entries.values())), jgguf.IndexedTensor)
    _same(first, second)


def test_changed_header_bytes_are_not_read_from_a_stale_index(tmp_path, index_dir):
    """Same path, same size, same mtime, one metadata value changed: the header hash catches it."""
    path = tmp_path / "m.gguf"
    write_llama_gguf(path, _tiny_model(1e-5))
    stat = os.stat(path)
    assert jgguf.load_gguf(path)[0].rms_norm_eps == pytest.approx(1e-5)
    write_llama_gguf(path, _tiny_model(1e-6))
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert os.stat(path).st_size == stat.st_size
    assert jgguf.load_gguf(path)[0].rms_norm_eps == pytest.approx(1e-6)
    assert jgguf.load_gguf(path)[0].rms_norm_eps == pytest.approx(1e-6)  # and the index was rewritten


def test_corrupt_index_is_rebuilt_and_switch_off(tmp_path, index_dir, monkeypatch):
    path = write_llama_gguf(tmp_path / "m.gguf", _tiny_model())
    reference = jgguf.load_gguf(path)
    (index,) = index_dir.glob("*.json")
    index.write_text('{"format": 1, "truncated')
    _same(reference, jgguf.load_gguf(path))  # read from the file again
    _no_reader(monkeypatch)
    _same(reference, jgguf.load_gguf(path))  # and indexed again
    monkeypatch.setenv("JAXLM_GGUF_INDEX", "0")
    other = write_llama_gguf(tmp_path / "other.gguf", _tiny_model())
    with pytest.raises(CheckpointError, match="GGUFReader was called"):
        jgguf.load_gguf(other)  # off: always parsed, never indexed
    assert len(list(index_dir.glob("*.json"))) == 1


def test_quantized_package_through_the_index(index_dir, monkeypatch):
    """SmolLM2's Q4_1/Q8_0 tensors: the index's byte views dequantize to the reader's values."""
    path = resolve_path("smollm2-135m-instruct")
    first = jgguf.load_gguf(path)
    kinds = {t.tensor_type.name for t in first[1].entries.values()}
    assert {"Q4_1", "Q8_0"} <= kinds
    _no_reader(monkeypatch)
    second = jgguf.load_gguf(path)
    for name in ("model.embed_tokens.weight", "model.layers.0.self_attn.q_proj.weight",
                 "model.layers.29.mlp.down_proj.weight", "model.norm.weight"):
        np.testing.assert_array_equal(first[1][name], second[1][name])
    assert first[0] == second[0]
    assert first[2].apply_chat_template([{"role": "user", "content": "hi"}]) == \
        second[2].apply_chat_template([{"role": "user", "content": "hi"}])
