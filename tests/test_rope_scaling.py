"""HF rope_scaling (linear, dynamic, yarn, llama3) matches transformers past the original context;
other types are refused by name; export writes the scaling back."""

import dataclasses

import jax.numpy as jnp
import numpy as np
import pytest
import torch

import jaxlm
from jaxlm.checkpoints.hf import CheckpointError
from jaxlm.checkpoints.pretrained import export_hf

MAX_POS = 16
SCALINGS = {
    "linear": {"rope_type": "linear", "factor": 4.0},
    "dynamic": {"rope_type": "dynamic", "factor": 2.0},
    "yarn": {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": MAX_POS},
    "yarn_mscale": {"rope_type": "yarn", "factor": 3.0, "original_max_position_embeddings": 8, "mscale": 0.8,
                    "mscale_all_dim": 0.5, "beta_fast": 16, "beta_slow": 2, "truncate": False},
    "llama3": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 8},
}


def _model_dir(path, scaling, theta=500.0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=64, hidden_size=64, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                      num_key_value_heads=1, max_position_embeddings=MAX_POS, rope_theta=theta, rope_scaling=scaling,
                      initializer_range=0.3)  # large weights: attention (and so RoPE) moves the logits
    model = LlamaForCausalLM(cfg).eval()
    model.save_pretrained(path)
    return model


def _logits(model, ids):
    with torch.no_grad():
        return model(input_ids=torch.tensor(ids)).logits.numpy()


@pytest.mark.parametrize("name", sorted(SCALINGS))
def test_rope_scaling_matches_transformers_past_the_context(tmp_path, name):
    from transformers import LlamaForCausalLM

    model = _model_dir(tmp_path / "m", dict(SCALINGS[name]))
    ids = np.random.default_rng(0).integers(0, 64, (1, 4 * MAX_POS))
    pre = jaxlm.load_pretrained(tmp_path / "m")
    assert pre.config.rope_scaling is not None and pre.config.rope_scaling.rope_type == SCALINGS[name]["rope_type"]
    ours = np.asarray(pre.model.apply({"params": pre.params}, jnp.asarray(ids)))
    ref = _logits(model, ids)
    assert np.abs(ours - ref).max() <= 1e-4 * np.abs(ref).max()
    plain = dataclasses.replace(pre.config, rope_scaling=None)
    unscaled = np.asarray(type(pre.model)(plain).apply({"params": pre.params}, jnp.asarray(ids)))
    assert np.abs(unscaled[:, MAX_POS:] - ref[:, MAX_POS:]).max() > 0.1  # the scaling matters out there
    out = export_hf(pre, tmp_path / "exported")
    reloaded = LlamaForCausalLM.from_pretrained(out).eval()
    assert np.abs(_logits(reloaded, ids) - ref).max() <= 1e-6 * np.abs(ref).max()
    assert jaxlm.load_pretrained(out).config == pre.config


@pytest.mark.parametrize("scaling,match", [
    ({"rope_type": "longrope", "short_factor": [1.0], "long_factor": [1.0]}, "rope scaling rope_type=.longrope. is not supported"),
    ({"rope_type": "linear", "factor": 2.0, "mystery": 1}, "rope scaling key 'mystery' is not supported"),
])
def test_other_rope_scalings_are_refused_by_name(tmp_path, scaling, match):
    import json

    _model_dir(tmp_path / "m", None)
    cfg_file = tmp_path / "m" / "config.json"
    cfg = json.loads(cfg_file.read_text())
    cfg.pop("rope_parameters", None)
    cfg_file.write_text(json.dumps({**cfg, "rope_scaling": scaling}))
    with pytest.raises(CheckpointError, match=rf"config.json: {match}"):
        jaxlm.load_pretrained(tmp_path / "m")
