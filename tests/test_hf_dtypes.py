"""Safetensors in their stored dtype: bf16/fp16 checkpoints load tensor by tensor into param_dtype
(bitwise the stored values), export_hf writes a chosen dtype and shards with an index file."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

import jaxlm
from jaxlm.checkpoints.hf import CheckpointError, read_safetensors
from jaxlm.checkpoints.pretrained import export_hf

IDS = np.array([[5, 17, 99, 3, 42, 8, 61, 7]])


def _tiny(path, dtype):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, max_position_embeddings=64)
    model = LlamaForCausalLM(cfg).eval().to(dtype)
    model.save_pretrained(path)
    return model


@pytest.mark.parametrize("stored", [torch.bfloat16, torch.float16])
def test_half_precision_checkpoint_loads_in_its_dtype(tmp_path, stored):
    model = _tiny(tmp_path / "m", stored)
    name = {torch.bfloat16: "bfloat16", torch.float16: "float16"}[stored]
    tensors = read_safetensors(tmp_path / "m")
    assert str(tensors["model.embed_tokens.weight"].dtype) == name  # memory-mapped, not upcast
    half = jaxlm.load_pretrained(tmp_path / "m", param_dtype=name)
    assert {x.dtype for x in jax.tree_util.tree_leaves(half.params)} == {jnp.dtype(name)}
    ref = model.model.layers[0].self_attn.q_proj.weight.detach().float().numpy()
    np.testing.assert_array_equal(np.asarray(half.params["layers_0"]["self_attn"]["q_proj"]["kernel"], np.float32), ref.T)
    full = jaxlm.load_pretrained(tmp_path / "m")
    assert {x.dtype for x in jax.tree_util.tree_leaves(full.params)} == {jnp.dtype("float32")}
    np.testing.assert_array_equal(np.asarray(full.params["layers_0"]["self_attn"]["q_proj"]["kernel"]), ref.T)
    with torch.no_grad():
        want = model.float()(input_ids=torch.tensor(IDS)).logits.numpy()
    got = np.asarray(full.model.apply({"params": full.params}, jnp.asarray(IDS)))
    assert np.abs(got - want).max() <= 1e-4


def test_export_dtype_and_shards(tmp_path):
    from transformers import LlamaForCausalLM

    _tiny(tmp_path / "m", torch.float32)
    pre = jaxlm.load_pretrained(tmp_path / "m")
    out = export_hf(pre, tmp_path / "bf16", dtype="bfloat16", max_shard_bytes=40_000)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 1 and all((out / s).is_file() for s in shards) and not (out / "model.safetensors").exists()
    assert json.loads((out / "config.json").read_text())["torch_dtype"] == "bfloat16"
    reloaded = LlamaForCausalLM.from_pretrained(out)
    w = reloaded.model.layers[1].mlp.down_proj.weight
    assert w.dtype == torch.bfloat16
    ours = pre.params["layers_1"]["mlp"]["down_proj"]["kernel"].astype(jnp.bfloat16)
    np.testing.assert_array_equal(w.detach().float().numpy(), np.asarray(ours, np.float32).T)  # round-to-nearest-even, as torch
    back = jaxlm.load_pretrained(out, param_dtype="bfloat16")
    jax.tree_util.tree_map(lambda a, b: np.testing.assert_array_equal(np.asarray(a, np.float32), np.asarray(b, np.float32)),
                           back.params, jax.tree_util.tree_map(lambda x: x.astype(jnp.bfloat16), pre.params))
    with pytest.raises(ValueError, match="export dtype 'int8'"):
        export_hf(pre, tmp_path / "bad", dtype="int8")


def test_truncated_safetensors_named(tmp_path):
    _tiny(tmp_path / "m", torch.float32)
    f = tmp_path / "m" / "model.safetensors"
    f.write_bytes(f.read_bytes()[:-100])
    with pytest.raises(CheckpointError, match=r"model.safetensors: tensor '.*' byte range .* does not fit"):
        jaxlm.load_pretrained(tmp_path / "m")
