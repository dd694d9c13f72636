"""PEFT adapter conventions against peft itself: rank/alpha patterns, rsLoRA, regex target_modules,
modules_to_save, bf16 files, shape validation and refused config keys."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

import jaxlm
from jaxlm.checkpoints.hf import CheckpointError
from jaxlm.checkpoints.peft import export_peft_adapter, load_peft_adapter, load_peft_model
from tests.hf_tiny import tiny_llama_dir

IDS = np.array([[5, 17, 99, 3, 42, 8, 61, 7]])


def _hf_logits(model):
    with torch.no_grad():
        return model(input_ids=torch.tensor(IDS)).logits.float().numpy()


def _ours(pre, lora):
    return np.asarray(pre.model.apply({"params": pre.params}, jnp.asarray(IDS), lora=lora))


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory):
    return tiny_llama_dir(tmp_path_factory.mktemp("peft") / "base")


def _peft_adapter(base_dir, out, dtype=torch.float32, **kwargs):
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaForCausalLM

    torch.manual_seed(1)
    model = get_peft_model(LlamaForCausalLM.from_pretrained(base_dir), LoraConfig(init_lora_weights=False, **kwargs))
    with torch.no_grad():  # peft's init_lora_weights=False draws B like A; make B large enough to matter
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.mul_(5.0)
    model.to(dtype).save_pretrained(out)
    return out


def _peft_reference(base_dir, adapter_dir):
    from peft import PeftModel
    from transformers import LlamaForCausalLM

    return _hf_logits(PeftModel.from_pretrained(LlamaForCausalLM.from_pretrained(base_dir), adapter_dir).eval())


CASES = {
    "alpha_pattern": dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], alpha_pattern={"q_proj": 32}),
    "rank_pattern_regex_targets": dict(r=4, lora_alpha=8, target_modules=r".*\.(q_proj|v_proj|down_proj)",
                                       rank_pattern={"layers.1.self_attn.v_proj": 2, "down_proj": 6},
                                       alpha_pattern={r"layers\.0\..*q_proj": 3}),
    "rslora": dict(r=4, lora_alpha=8, target_modules=["q_proj", "o_proj"], use_rslora=True,
                   rank_pattern={"o_proj": 2}, alpha_pattern={"q_proj": 16}),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_patterns_match_peft_and_export_round_trips(tmp_path, base_dir, case):
    adapter = _peft_adapter(base_dir, tmp_path / "adapter", **CASES[case])
    pre = jaxlm.load_pretrained(base_dir)
    lora = load_peft_adapter(adapter, pre)
    ref = _peft_reference(base_dir, adapter)
    ours = _ours(pre, lora)
    plain = _ours(pre, None)
    assert np.abs(ref - plain).max() > 1e-2  # the adapter matters
    assert np.abs(ours - ref).max() <= 1e-4
    # Export (the scale folded into B, rank_pattern/alpha_pattern written where ranks differ): peft agrees.
    out = export_peft_adapter(lora, pre, tmp_path / "exported", base_model_name_or_path=str(base_dir))
    assert np.abs(_peft_reference(base_dir, out) - ours).max() <= 1e-4
    back = load_peft_adapter(out, pre)
    jax.tree_util.tree_map(np.testing.assert_array_equal, back.params, lora.params)


def test_issue_example_alpha_pattern_scale(tmp_path, base_dir):
    """r=4, lora_alpha=8, alpha_pattern={'q_proj': 32}: q_proj's update is scaled by 8, not 2."""
    adapter = _peft_adapter(base_dir, tmp_path / "a", **CASES["alpha_pattern"])
    pre = jaxlm.load_pretrained(base_dir)
    lora = load_peft_adapter(adapter, pre)
    from safetensors.numpy import load_file

    raw = load_file(str(adapter / "adapter_model.safetensors"))
    key = "base_model.model.model.layers.0.self_attn.{}.lora_B.weight"
    q, v = lora.params["layers_0"]["self_attn"]["q_proj"]["b"], lora.params["layers_0"]["self_attn"]["v_proj"]["b"]
    assert lora.scale == 2.0
    np.testing.assert_allclose(lora.scale * np.asarray(q), 8.0 * raw[key.format("q_proj")].T, rtol=1e-6)
    np.testing.assert_array_equal(np.asarray(v), raw[key.format("v_proj")].T)


def test_modules_to_save_load_and_export(tmp_path, base_dir):
    adapter = _peft_adapter(base_dir, tmp_path / "a", r=4, lora_alpha=8, target_modules=["q_proj"],
                            modules_to_save=["lm_head"])
    pre = jaxlm.load_pretrained(base_dir)
    with pytest.raises(CheckpointError, match=r"adapter_config.json: field 'modules_to_save' replaces base modules"):
        load_peft_adapter(adapter, pre)
    # peft's saved copy of lm_head is the (unchanged) base head: change it so the test sees it applied.
    from safetensors.numpy import load_file, save_file

    tensors = load_file(str(adapter / "adapter_model.safetensors"))
    tensors["base_model.model.lm_head.weight"] = tensors["base_model.model.lm_head.weight"] * 1.5
    save_file(tensors, str(adapter / "adapter_model.safetensors"))
    ref = _peft_reference(base_dir, adapter)
    model, lora = load_peft_model(adapter, pre)
    assert model is not pre and pre.params["lm_head"] is not model.params["lm_head"]
    ours = _ours(model, lora)
    assert np.abs(ours - ref).max() <= 1e-4
    out = export_peft_adapter(lora, model, tmp_path / "exported", base_model_name_or_path=str(base_dir),
                              modules_to_save=["lm_head"])
    assert json.loads((out / "adapter_config.json").read_text())["modules_to_save"] == ["lm_head"]
    assert np.abs(_peft_reference(base_dir, out) - ours).max() <= 1e-4


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_adapter_files(tmp_path, base_dir, dtype):
    adapter = _peft_adapter(base_dir, tmp_path / "a", dtype=dtype, r=4, lora_alpha=8, target_modules=["q_proj", "up_proj"])
    pre = jaxlm.load_pretrained(base_dir)
    lora = load_peft_adapter(adapter, pre)
    assert all(x.dtype == jnp.float32 for x in jax.tree_util.tree_leaves(lora.params))
    assert np.abs(_ours(pre, lora) - _peft_reference(base_dir, adapter)).max() <= 1e-4


def test_adapter_for_another_base_shape_fails_in_one_line(tmp_path, base_dir):
    from transformers import LlamaConfig, LlamaForCausalLM

    adapter = _peft_adapter(base_dir, tmp_path / "a", r=4, lora_alpha=8, target_modules=["q_proj"])
    cfg = LlamaConfig(vocab_size=128, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2)
    LlamaForCausalLM(cfg).save_pretrained(tmp_path / "small")
    small = jaxlm.load_pretrained(tmp_path / "small")
    with pytest.raises(CheckpointError) as e:
        load_peft_adapter(adapter, small)
    msg = str(e.value)
    assert "\n" not in msg and "adapter_model.safetensors: tensor 'base_model.model.model.layers.0.self_attn.q_proj.lora_A" in msg
    assert "has shape (4, 64), expected (4, 32)" in msg
    # A rank that differs from the config's is named too.
    cfg_file = adapter / "adapter_config.json"
    cfg_file.write_text(json.dumps({**json.loads(cfg_file.read_text()), "r": 8}))
    with pytest.raises(CheckpointError, match=r"has shape \(4, 64\), expected \(8, 64\) \(r=8"):
        load_peft_adapter(adapter, jaxlm.load_pretrained(base_dir))


@pytest.mark.parametrize("key,value", [("use_dora", True), ("init_lora_weights", "pissa"), ("lora_bias", True),
                                       ("bias", "all"), ("layer_replication", [[0, 1]]), ("peft_type", "LOHA")])
def test_refused_adapter_keys(tmp_path, base_dir, key, value):
    adapter = _peft_adapter(base_dir, tmp_path / "a", r=4, lora_alpha=8, target_modules=["q_proj"])
    cfg_file = adapter / "adapter_config.json"
    cfg_file.write_text(json.dumps({**json.loads(cfg_file.read_text()), key: value}))
    with pytest.raises(CheckpointError, match=rf"adapter_config.json: field '{key}' = .* is not supported"):
        load_peft_adapter(adapter, jaxlm.load_pretrained(base_dir))
