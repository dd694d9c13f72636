"""generation_config.json: its EOS list ends `jaxlm generate` exactly where transformers stops;
fields that change greedy output are refused by name; export_hf writes the file."""

import json

import numpy as np
import pytest
import torch

import jaxlm
from jaxlm.checkpoints.hf import CheckpointError
from jaxlm.checkpoints.pretrained import export_hf
from jaxlm.cli import main

PROMPT = [5, 6, 7]


def _tiny_llama(path, eos):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
                      num_key_value_heads=2, bos_token_id=0, eos_token_id=1, pad_token_id=0)
    model = LlamaForCausalLM(cfg).eval()
    model.generation_config.eos_token_id = eos
    model.save_pretrained(path)
    return model


def _hf_greedy(model, max_new_tokens=8):
    with torch.no_grad():
        out = model.generate(torch.tensor([PROMPT]), max_new_tokens=max_new_tokens, do_sample=False,
                             attention_mask=torch.ones(1, len(PROMPT), dtype=torch.long))
    return out[0, len(PROMPT):].tolist()


def _jaxlm_generate(model_dir, tmp_path, max_new_tokens=8):
    inp, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    inp.write_text(json.dumps({"input_ids": PROMPT}) + "\n")
    assert main(["generate", "--model", str(model_dir), "--input", str(inp), "--output", str(out),
                 "--max_new_tokens", str(max_new_tokens)]) == 0
    return json.loads(out.read_text())["output_ids"]


def test_eos_list_from_generation_config_stops_like_transformers(tmp_path):
    free = _hf_greedy(_tiny_llama(tmp_path / "free", 1))  # only config.json's EOS 1
    assert 1 not in free[:2] and free[1] != free[0]
    stop = free[1]  # the token greedy emits second becomes an EOS id
    model = _tiny_llama(tmp_path / "m", [1, stop])
    assert json.loads((tmp_path / "m" / "config.json").read_text())["eos_token_id"] == 1
    hf = _hf_greedy(model)
    assert hf == free[:2]  # transformers stops at the generation config's EOS (and emits it)
    ours = _jaxlm_generate(tmp_path / "m", tmp_path)
    assert ours == hf[:-1]  # jaxlm excludes the EOS from output_ids
    assert len(_jaxlm_generate(tmp_path / "free", tmp_path)) == 8


def test_export_writes_generation_config_transformers_reads(tmp_path):
    from transformers import LlamaForCausalLM

    _tiny_llama(tmp_path / "m", [1, 9])
    pre = jaxlm.load_pretrained(tmp_path / "m")
    assert pre.eos_ids == (1, 9)
    out = export_hf(pre, tmp_path / "exported")
    assert LlamaForCausalLM.from_pretrained(out).generation_config.eos_token_id == [1, 9]
    assert jaxlm.load_pretrained(out).eos_ids == (1, 9)
    # A model with no generation_config.json gets one from its config's ids.
    (tmp_path / "exported" / "generation_config.json").unlink()
    bare = jaxlm.load_pretrained(tmp_path / "exported")
    assert bare.generation is None and bare.eos_ids == (1,)
    out2 = export_hf(bare, tmp_path / "exported2")
    assert json.loads((out2 / "generation_config.json").read_text()) == {"bos_token_id": 0, "eos_token_id": 1,
                                                                         "pad_token_id": 0}


@pytest.mark.parametrize("field,value", [("repetition_penalty", 1.3), ("num_beams", 4), ("no_repeat_ngram_size", 2),
                                         ("suppress_tokens", [3]), ("min_new_tokens", 2)])
def test_fields_that_change_greedy_output_are_refused(tmp_path, capsys, field, value):
    _tiny_llama(tmp_path / "m", 1)
    file = tmp_path / "m" / "generation_config.json"
    cfg = json.loads(file.read_text())
    file.write_text(json.dumps({**cfg, field: value, "do_sample": True, "temperature": 0.6}))
    inp = tmp_path / "in.jsonl"
    inp.write_text(json.dumps({"input_ids": PROMPT}) + "\n")
    capsys.readouterr()
    assert main(["generate", "--model", str(tmp_path / "m"), "--input", str(inp), "--output",
                 str(tmp_path / "o.jsonl")]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and f"generation_config.json: field {field!r} = {value!r} is not supported" in err
    # Scoring does not decode: the same model scores.
    inp.write_text(json.dumps({"input_ids": PROMPT, "target_ids": [9]}) + "\n")
    assert main(["score", "--model", str(tmp_path / "m"), "--input", str(inp), "--output", str(tmp_path / "s.jsonl")]) == 0


def test_neutral_values_and_bad_eos_type(tmp_path):
    _tiny_llama(tmp_path / "m", 1)
    file = tmp_path / "m" / "generation_config.json"
    file.write_text(json.dumps({"eos_token_id": 1, "repetition_penalty": 1.0, "num_beams": 1}))
    jaxlm.load_pretrained(tmp_path / "m").generation.check_greedy()  # neutral values pass
    file.write_text(json.dumps({"eos_token_id": "1"}))
    with pytest.raises(CheckpointError, match=r"generation_config.json: field 'eos_token_id' = '1' must be an int"):
        jaxlm.load_pretrained(tmp_path / "m")
    file.write_text("{not json")
    with pytest.raises(CheckpointError, match=r"generation_config.json: invalid JSON"):
        jaxlm.load_pretrained(tmp_path / "m")
