"""Export to a HF directory and a PEFT adapter; transformers/peft load them and agree with jaxlm."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

import jaxlm
from jaxlm.checkpoints.hf import CheckpointError
from jaxlm.checkpoints.peft import export_peft_adapter, load_peft_adapter
from jaxlm.checkpoints.pretrained import export_hf
from jaxlm.models import lora as lora_lib
from tests.hf_tiny import tiny_llama_dir

IDS = np.array([[5, 17, 99, 3, 42, 8, 61, 7]])


def _hf_logits(model, ids=IDS):
    with torch.no_grad():
        return model(input_ids=torch.tensor(ids)).logits.numpy()


@pytest.mark.parametrize("tie", [False, True])
def test_export_hf_dir_loads_in_transformers(tmp_path, tie):
    from transformers import LlamaForCausalLM

    pre = jaxlm.load_pretrained(tiny_llama_dir(tmp_path / "src", tie=tie))
    params = jax.tree_util.tree_map(lambda x: x * 1.01, pre.params)  # make sure we write *our* params
    out = export_hf(pre, tmp_path / "exported", params=params)
    reloaded = LlamaForCausalLM.from_pretrained(out).eval()
    ours = np.asarray(pre.model.apply({"params": params}, jnp.asarray(IDS)))
    assert np.abs(_hf_logits(reloaded) - ours).max() <= 1e-4
    assert jaxlm.load_pretrained(out).config == pre.config


def test_peft_round_trip_nonzero_lora(tmp_path):
    from peft import PeftModel
    from transformers import LlamaForCausalLM

    pre = jaxlm.load_pretrained(tiny_llama_dir(tmp_path / "src"))
    base_dir = export_hf(pre, tmp_path / "base")
    spec = lora_lib.LoraSpec(("q_proj", "v_proj", "gate_proj"), rank=4, alpha=16.0)
    lora = lora_lib.init_lora(spec, pre.params, jax.random.PRNGKey(3))
    lora = lora.replace(params=jax.tree_util.tree_map(
        lambda x: x + 0.1 * jax.random.normal(jax.random.PRNGKey(x.size), x.shape), lora.params))
    adapter_dir = export_peft_adapter(lora, pre, tmp_path / "adapter", base_model_name_or_path=str(base_dir))

    peft_model = PeftModel.from_pretrained(LlamaForCausalLM.from_pretrained(base_dir), adapter_dir).eval()
    ours = np.asarray(pre.model.apply({"params": pre.params}, jnp.asarray(IDS), lora=lora))
    base = np.asarray(pre.model.apply({"params": pre.params}, jnp.asarray(IDS)))
    assert np.abs(ours - base).max() > 1e-2  # the adapter really changes the model
    assert np.abs(_hf_logits(peft_model) - ours).max() <= 1e-4

    back = load_peft_adapter(adapter_dir, pre)
    assert (back.rank, back.alpha) == (4, 16.0)
    jax.tree_util.tree_map(np.testing.assert_array_equal, back.params, jax.tree_util.tree_map(np.asarray, lora.params))


def test_bad_inputs_name_the_file(tmp_path):
    with pytest.raises(CheckpointError, match="config.json"):
        jaxlm.load_pretrained(tmp_path)
    (tmp_path / "config.json").write_text('{"architectures": ["GPTNeoXForCausalLM"]}')
    with pytest.raises(CheckpointError, match="GPTNeoXForCausalLM"):
        jaxlm.load_pretrained(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({
        "architectures": ["LlamaForCausalLM"], "vocab_size": 8, "hidden_size": 8, "intermediate_size": 8,
        "num_hidden_layers": 1, "num_attention_heads": 2, "rope_scaling": {"rope_type": "longrope", "factor": 4.0}}))
    with pytest.raises(CheckpointError, match=r"config.json: rope scaling rope_type='longrope' is not supported"):
        jaxlm.load_pretrained(tmp_path)
    (tmp_path / "config.json").write_text('{"architectures": ["LlamaForCausalLM"], "vocab_size": 8}')
    with pytest.raises(CheckpointError, match="config.json: field 'hidden_size' is missing"):
        jaxlm.load_pretrained(tmp_path)
    with pytest.raises(CheckpointError, match="no such file"):
        jaxlm.load_pretrained(tmp_path / "missing.gguf")
    (tmp_path / "broken.gguf").write_bytes(b"not a gguf file at all")
    with pytest.raises(CheckpointError, match="broken.gguf: not a readable GGUF"):
        jaxlm.load_pretrained(tmp_path / "broken.gguf")
    (tmp_path / "adapter").mkdir()
    pre = jaxlm.load_pretrained(tiny_llama_dir(tmp_path / "src"))
    with pytest.raises(CheckpointError, match="adapter_config.json"):
        load_peft_adapter(tmp_path / "adapter", pre)


def test_peft_round_trip_t5_seq2seq(tmp_path):
    from peft import PeftModel
    from transformers import T5ForConditionalGeneration

    from tests.hf_tiny import tiny_t5_dir

    tiny_t5_dir(tmp_path / "src", "v1_1")
    pre = jaxlm.load_pretrained(tmp_path / "src")
    base_dir = export_hf(pre, tmp_path / "base")
    lora = lora_lib.init_lora(lora_lib.LoraSpec(("q", "v", "wi_0"), rank=2, alpha=8.0), pre.params, jax.random.PRNGKey(5))
    lora = lora.replace(params=jax.tree_util.tree_map(lambda x: x + 0.2, lora.params))
    adapter_dir = export_peft_adapter(lora, pre, tmp_path / "adapter", base_model_name_or_path=str(base_dir))
    assert json.loads((adapter_dir / "adapter_config.json").read_text())["task_type"] == "SEQ_2_SEQ_LM"

    enc, dec = np.array([[5, 9, 14, 3, 1]]), np.array([[0, 7, 8]])
    peft_model = PeftModel.from_pretrained(T5ForConditionalGeneration.from_pretrained(base_dir), adapter_dir).eval()
    with torch.no_grad():
        ref = peft_model(input_ids=torch.tensor(enc), decoder_input_ids=torch.tensor(dec)).logits.numpy()
    ours = np.asarray(pre.model.apply({"params": pre.params}, jnp.asarray(enc), jnp.ones_like(enc), jnp.asarray(dec), lora=lora))
    base = np.asarray(pre.model.apply({"params": pre.params}, jnp.asarray(enc), jnp.ones_like(enc), jnp.asarray(dec)))
    assert np.abs(ours - base).max() > 1e-2
    assert np.abs(ref - ours).max() <= 1e-4 * max(1.0, np.abs(ref).max())
