"""The key table (jaxlm.checkpoints.fields): every key of the installed transformers configs, peft's
LoraConfig, transformers' GenerationConfig and the gguf package's metadata keys is marked used,
ignored (with why) or refused; refused keys really fail at load; config.json / tokenizer.json
values of the wrong type fail in one line naming the file and field."""

import dataclasses
import json

import pytest

import jaxlm
from jaxlm.checkpoints import fields as F
from jaxlm.checkpoints.hf import CheckpointError
from tests.gguf_tiny import write_llama_gguf
from tests.hf_tiny import tiny_llama_dir


def _hf_keys(cls):
    return set(cls().to_dict()) | set(cls.attribute_map)


def _library_keys():
    import gguf
    import peft
    from transformers import BertConfig, GenerationConfig, LlamaConfig, MistralConfig, T5Config

    groups = ["LLM", "Attention", "Rope", "SSM", "WKV", "PosNet", "ConvNext", "Classifier", "ShortConv", "KDA",
              "Split", "Adapter", "General", "Tokenizer"]
    gguf_keys = {v for g in groups for k, v in vars(getattr(gguf.Keys, g)).items()
                 if not k.startswith("_") and isinstance(v, str)}
    return {
        "LlamaConfig": _hf_keys(LlamaConfig),
        "MistralConfig": _hf_keys(MistralConfig),
        "T5Config": _hf_keys(T5Config),
        "BertConfig": _hf_keys(BertConfig),
        "adapter_config.json": {f.name for f in dataclasses.fields(peft.LoraConfig)},
        "generation_config.json": set(GenerationConfig().to_dict()),
        "gguf": gguf_keys,
    }


def test_every_library_key_is_in_the_table():
    for table, keys in _library_keys().items():
        missing = sorted(keys - set(F.TABLES[table]))
        assert not missing, f"{table}: keys of the installed library not in jaxlm.checkpoints.fields: {missing}"


def test_every_entry_is_marked_with_a_reason():
    for table, entries in F.TABLES.items():
        for key, field in entries.items():
            assert field.status in (F.USED, F.IGNORED, F.REFUSED), (table, key)
            if field.status != F.USED:
                assert len(field.reason) > 10, (table, key)


def test_architectures_have_tables():
    from jaxlm.checkpoints.pretrained import ARCHITECTURES

    assert set(F.CONFIG_TABLES) == set(ARCHITECTURES)


_VALUES = {"init_lora_weights": "pissa", "bias": "all", "peft_type": "LOHA", "general.type": "adapter",
           "split.count": 3, "hidden_act": "gelu", "position_embedding_type": "relative_key"}


def _non_neutral(key, field):
    if key in _VALUES:
        return _VALUES[key]
    if True in field.neutral and any(n is True for n in field.neutral):
        return False
    if any(n is False for n in field.neutral):
        return True
    return 7


def _refused(table):
    return [(k, f) for k, f in F.TABLES[table].items() if f.status == F.REFUSED]


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    return tiny_llama_dir(tmp_path_factory.mktemp("keys") / "llama")


@pytest.mark.parametrize("table,arch", [("LlamaConfig", "LlamaForCausalLM"), ("MistralConfig", "MistralForCausalLM"),
                                        ("BertConfig", "BertModel"), ("T5Config", "T5ForConditionalGeneration")])
def test_refused_config_keys_fail_at_load(tmp_path, llama_dir, table, arch):
    base = json.loads((llama_dir / "config.json").read_text())
    for key, field in _refused(table):
        (tmp_path / "config.json").write_text(json.dumps({**base, "architectures": [arch], key: _non_neutral(key, field)}))
        with pytest.raises(CheckpointError, match=rf"config.json: field '{key}' = .* is not supported"):
            jaxlm.load_pretrained(tmp_path)


def test_refused_adapter_and_generation_keys_fail(tmp_path, llama_dir):
    from jaxlm.checkpoints.generation import read_generation_config
    from jaxlm.checkpoints.peft import load_peft_adapter
    from jaxlm.models.lora import LoraSpec, init_lora
    from jaxlm.checkpoints.peft import export_peft_adapter

    pre = jaxlm.load_pretrained(llama_dir)
    adapter = export_peft_adapter(init_lora(LoraSpec(("q_proj",), 4), pre.params), pre, tmp_path / "adapter")
    cfg = json.loads((adapter / "adapter_config.json").read_text())
    for key, field in _refused("adapter_config.json"):
        (adapter / "adapter_config.json").write_text(json.dumps({**cfg, key: _non_neutral(key, field)}))
        with pytest.raises(CheckpointError, match=rf"adapter_config.json: field '{key}' = .* is not supported"):
            load_peft_adapter(adapter, pre)
    gen_dir = tmp_path / "gen"
    gen_dir.mkdir()
    for key, field in _refused("generation_config.json"):
        (gen_dir / "generation_config.json").write_text(json.dumps({key: _non_neutral(key, field)}))
        with pytest.raises(CheckpointError, match=rf"generation_config.json: field '{key}' = .* is not supported"):
            read_generation_config(gen_dir).check_greedy()


GGUF_BASE = {"llama.context_length": 16, "llama.embedding_length": 8, "llama.block_count": 1,
             "llama.feed_forward_length": 8, "llama.attention.head_count": 2,
             "llama.attention.layer_norm_rms_epsilon": 1e-5}


def test_refused_gguf_keys_fail_at_load(tmp_path):
    from tests.gguf_tiny import byte_level_vocab

    for template, field in _refused("gguf"):
        key = template.replace("{arch}", "llama").replace("{dense}", "dense_2").replace("{id}", "0")
        value = _non_neutral(template, field)
        path = write_llama_gguf(tmp_path / "m.gguf", None, {**GGUF_BASE, key: value}, byte_level_vocab(8))
        with pytest.raises(CheckpointError, match=rf"m.gguf: metadata key {key} = .* is not supported"):
            jaxlm.load_pretrained(path)


@pytest.mark.parametrize("key,value,kind", [("hidden_size", "16", "an integer"), ("rms_norm_eps", "1e-5", "a number"),
                                            ("tie_word_embeddings", "no", "true or false"),
                                            ("eos_token_id", [2, "3"], "an integer or a list of integers")])
def test_config_field_of_the_wrong_type(tmp_path, llama_dir, capsys, key, value, kind):
    from jaxlm.cli import main

    cfg = json.loads((llama_dir / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**cfg, key: value}))
    with pytest.raises(CheckpointError, match=rf"config.json: field '{key}' = .* must be {kind}"):
        jaxlm.load_pretrained(tmp_path)
    inp = tmp_path / "in.jsonl"
    inp.write_text('{"input_ids": [1, 2], "target_ids": [3]}\n')
    assert main(["score", "--model", str(tmp_path), "--input", str(inp), "--output", str(tmp_path / "o.jsonl")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("jaxlm: error: ") and "\n" not in err and f"'{key}'" in err


def test_t5_attribute_map_aliases_are_read(tmp_path):
    from tests.hf_tiny import tiny_t5_dir

    tiny_t5_dir(tmp_path / "t5", "v1_1")
    cfg_file = tmp_path / "t5" / "config.json"
    cfg = json.loads(cfg_file.read_text())
    want = jaxlm.load_pretrained(tmp_path / "t5").config
    cfg["hidden_size"] = cfg.pop("d_model")
    cfg["num_attention_heads"] = cfg.pop("num_heads")
    cfg_file.write_text(json.dumps(cfg))
    assert jaxlm.load_pretrained(tmp_path / "t5").config == want


@pytest.mark.parametrize("content,match", [
    ("{not json", r"tokenizer.json: invalid JSON"),
    ('{"version": "1.0", "model": {"type": "Nonsense"}}', r"tokenizer.json: not a tokenizers file"),
    ('[1, 2, 3]', r"tokenizer.json: not a tokenizers file"),
])
def test_malformed_tokenizer_json(tmp_path, llama_dir, content, match):
    import shutil

    shutil.copytree(llama_dir, tmp_path / "m")
    (tmp_path / "m" / "tokenizer.json").write_text(content)
    with pytest.raises(CheckpointError, match=match) as e:
        jaxlm.load_pretrained(tmp_path / "m")
    assert "\n" not in str(e.value)


def test_tokenizer_config_field_of_the_wrong_type(tmp_path, llama_dir):
    import shutil

    from tokenizers import Tokenizer, models

    shutil.copytree(llama_dir, tmp_path / "m")
    Tokenizer(models.BPE(vocab={"a": 0, "b": 1}, merges=[])).save(str(tmp_path / "m" / "tokenizer.json"))
    (tmp_path / "m" / "tokenizer_config.json").write_text(json.dumps({"eos_token": 5}))
    with pytest.raises(CheckpointError, match=r"tokenizer_config.json: field 'eos_token' = 5 must be a token string"):
        jaxlm.load_pretrained(tmp_path / "m")
