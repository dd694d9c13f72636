"""`jaxlm export` of a trained run: transformers / peft load what it writes and agree with jaxlm."""

from __future__ import annotations

import json

import gin
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from jaxlm.cli import main

IDS = [[3, 17, 42, 9, 57, 5, 12, 60]]
SCORE_ROWS = [{"input_ids": [3, 17, 42, 9], "target_ids": [57, 5, 12, 60]},  # ids < vocab 64
              {"input_ids": [8, 1, 39], "target_ids": [4, 4, 30, 2, 11]}]


def _train(tmp_path, gin_file, name, steps=6):
    workdir = tmp_path / name
    assert main(["train", f"--gin_file=jaxlm/configs/tests/{gin_file}", f"--gin.NUM_STEPS={steps}",
                 "--gin.train.checkpoint_every=3", "--workdir", str(workdir)]) == 0
    return workdir


def _hf_logits(model, ids=IDS):
    with torch.no_grad():
        return model(input_ids=torch.tensor(ids)).logits.numpy()


def _peft_logprobs(model, rows):
    out = []
    with torch.no_grad():
        for r in rows:
            ids = torch.tensor([r["input_ids"] + r["target_ids"]])
            logp = torch.log_softmax(model(input_ids=ids).logits.double(), dim=-1)[0]
            n = len(r["input_ids"])
            out.append([float(logp[n - 1 + j, t]) for j, t in enumerate(r["target_ids"])])
    return out


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory):
    return _train(tmp_path_factory.mktemp("lora"), "tiny_lora.gin", "run")


def test_lora_run_exports_a_peft_dir_that_peft_and_jaxlm_score_agree_on(lora_run, tmp_path, capsys):
    from peft import PeftModel
    from transformers import LlamaForCausalLM

    out = tmp_path / "adapter"
    assert main(["export", "--workdir", str(lora_run), "--output", str(out)]) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary == {"output": str(out), "step": 6, "objective": "CausalLM"}
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["r"] == 4 and config["lora_alpha"] == 16.0
    assert config["base_model_name_or_path"] == str((out / "base").resolve())  # random-init base written beside it

    inp, scored = tmp_path / "in.jsonl", tmp_path / "scores.jsonl"
    inp.write_text("".join(json.dumps(r) + "\n" for r in SCORE_ROWS))
    assert main(["score", "--model", str(out / "base"), "--adapter", str(out), "--input", str(inp),
                 "--output", str(scored)]) == 0
    ours = [json.loads(line)["token_logprobs"] for line in scored.read_text().splitlines()]

    model = PeftModel.from_pretrained(LlamaForCausalLM.from_pretrained(out / "base"), out).eval()
    ref = _peft_logprobs(model, SCORE_ROWS)
    for a, b in zip(ours, ref):
        np.testing.assert_allclose(a, b, atol=1e-4, rtol=1e-4)
    base_only = _peft_logprobs(LlamaForCausalLM.from_pretrained(out / "base").eval(), SCORE_ROWS)
    assert max(abs(x - y) for a, b in zip(ref, base_only) for x, y in zip(a, b)) > 1e-3  # the adapter matters


def test_merged_export_equals_the_adapter_and_an_earlier_step_differs(lora_run, tmp_path):
    from peft import PeftModel
    from transformers import LlamaForCausalLM

    assert main(["export", "--workdir", str(lora_run), "--output", str(tmp_path / "a")]) == 0
    assert main(["export", "--workdir", str(lora_run), "--merged", "--output", str(tmp_path / "m")]) == 0
    assert main(["export", "--workdir", str(lora_run), "--step", "3", "--output", str(tmp_path / "s3")]) == 0
    adapted = PeftModel.from_pretrained(LlamaForCausalLM.from_pretrained(tmp_path / "a" / "base"), tmp_path / "a").eval()
    merged = LlamaForCausalLM.from_pretrained(tmp_path / "m").eval()
    assert not (tmp_path / "m" / "adapter_config.json").exists()
    np.testing.assert_allclose(_hf_logits(merged), _hf_logits(adapted), atol=1e-4)
    early = PeftModel.from_pretrained(LlamaForCausalLM.from_pretrained(tmp_path / "s3" / "base"), tmp_path / "s3").eval()
    assert np.abs(_hf_logits(early) - _hf_logits(adapted)).max() > 1e-4


def test_full_finetune_exports_a_hf_dir_matching_the_trained_params(tmp_path):
    from transformers import LlamaForCausalLM

    import jaxlm

    run = _train(tmp_path, "tiny_lm.gin", "full", steps=3)
    assert main(["export", "--workdir", str(run), "--output", str(tmp_path / "hf")]) == 0
    pre = jaxlm.load_pretrained(tmp_path / "hf")
    ours = np.asarray(pre.model.apply({"params": pre.params}, np.asarray(IDS)))
    ref = _hf_logits(LlamaForCausalLM.from_pretrained(tmp_path / "hf").eval())
    np.testing.assert_allclose(ours, ref, atol=1e-4)


def test_export_dtype_flag_writes_that_dtype(lora_run, tmp_path, capsys):
    """--dtype float16 writes the adapter (and the random-init base beside it) in float16, the same
    values as the float32 export rounded; --merged --dtype bfloat16 a bf16 HF dir transformers loads."""
    from transformers import LlamaForCausalLM

    from jaxlm.checkpoints.hf import read_safetensors, read_safetensors_file

    assert main(["export", "--workdir", str(lora_run), "--output", str(tmp_path / "f32")]) == 0
    assert main(["export", "--workdir", str(lora_run), "--output", str(tmp_path / "f16"), "--dtype", "float16"]) == 0
    full, half = (read_safetensors_file(tmp_path / d / "adapter_model.safetensors") for d in ("f32", "f16"))
    assert full.keys() == half.keys() and len(half) > 0
    for name in half:
        assert half[name].dtype == np.float16 and full[name].dtype == np.float32, name
        np.testing.assert_array_equal(half[name], full[name].astype(np.float16))
    assert {str(t.dtype) for t in read_safetensors(tmp_path / "f16" / "base").values()} == {"float16"}

    assert main(["export", "--workdir", str(lora_run), "--merged", "--output", str(tmp_path / "m"), "--dtype",
                 "bfloat16"]) == 0
    assert json.loads((tmp_path / "m" / "config.json").read_text())["torch_dtype"] == "bfloat16"
    assert {str(t.dtype) for t in read_safetensors(tmp_path / "m").values()} == {"bfloat16"}
    assert LlamaForCausalLM.from_pretrained(tmp_path / "m").model.layers[0].self_attn.q_proj.weight.dtype == torch.bfloat16
    capsys.readouterr()
    assert main(["export", "--workdir", str(lora_run), "--output", str(tmp_path / "x"), "--dtype", "int8"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "argument --dtype: invalid choice: 'int8'" in err[0], err


def test_train_param_dtype_flag_trains_in_that_dtype(tmp_path, capsys):
    """`jaxlm train --param_dtype bfloat16` = train.param_dtype: the checkpointed params are bf16 (the
    float32 export holds bf16-representable values only); a bad value is one line, exit 2."""
    import jaxlm
    from jaxlm.experiment.gin_config import parse_config
    from jaxlm.train.loop import restore_trained

    workdir = tmp_path / "bf16"
    assert main(["train", "--gin_file=jaxlm/configs/tests/tiny_lm.gin", "--gin.NUM_STEPS=2",
                 "--gin.train.checkpoint_every=2", "--param_dtype", "bfloat16", "--workdir", str(workdir)]) == 0
    assert "train.param_dtype = 'bfloat16'" in (workdir / "config.gin").read_text()
    assert main(["export", "--workdir", str(workdir), "--output", str(tmp_path / "hf")]) == 0
    leaves = jax.tree_util.tree_leaves(jaxlm.load_pretrained(tmp_path / "hf").params)
    assert all(np.array_equal(np.asarray(x), np.asarray(x.astype(jnp.bfloat16), np.float32)) for x in leaves)
    parse_config([str(workdir / "config.gin")], [])
    bound = gin.get_bindings("train")
    state, _, _ = restore_trained(workdir, objective=bound["objective"], optimizer=bound["optimizer"],
                                  param_dtype=bound["param_dtype"])
    assert {x.dtype for x in jax.tree_util.tree_leaves(state.params)} == {jnp.dtype("bfloat16")}
    capsys.readouterr()
    assert main(["train", "--gin_file=jaxlm/configs/tests/tiny_lm.gin", "--param_dtype", "fp8",
                 "--workdir", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "argument --param_dtype: invalid choice: 'fp8'" in err[0], err


def test_export_errors_are_one_line(tmp_path, capsys):
    assert main(["export", "--workdir", str(tmp_path), "--output", str(tmp_path / "x")]) == 2
    assert "no config.gin" in capsys.readouterr().err
    run = _train(tmp_path, "tiny_lm.gin", "full", steps=3)
    assert main(["export", "--workdir", str(run), "--merged", "--output", str(tmp_path / "x")]) == 2
    assert "merged=True needs a LoRA run" in capsys.readouterr().err
    assert main(["export", "--workdir", str(run), "--step", "99", "--output", str(tmp_path / "x")]) == 2
    assert "no checkpoint for step 99" in capsys.readouterr().err


def test_an_eval_sweep_model_accepts_a_run_dir_and_a_peft_dir(lora_run, tmp_path):
    """EvalModel(pretrained=RUN) exports the run; a PEFT dir is merged into its base: both give the
    merged export's logits."""
    import jaxlm
    from jaxlm.eval.sweep import EvalModel

    assert main(["export", "--workdir", str(lora_run), "--merged", "--output", str(tmp_path / "m")]) == 0
    assert main(["export", "--workdir", str(lora_run), "--output", str(tmp_path / "a")]) == 0
    merged = jaxlm.load_pretrained(tmp_path / "m")
    want = np.asarray(merged.model.apply({"params": merged.params}, np.asarray(IDS)))
    for source in (lora_run, tmp_path / "a"):
        pre = EvalModel("m", pretrained=str(source)).load()
        got = np.asarray(pre.model.apply({"params": pre.params}, np.asarray(IDS)))
        np.testing.assert_allclose(got, want, atol=1e-5)


def test_an_eval_sweep_model_holds_its_weights_in_param_dtype(lora_run, tmp_path):
    """EvalModel.param_dtype (`jaxlm eval`'s equivalent of --param_dtype): a PEFT dir is merged into its
    base read in bf16; the merged weights are bf16 with the float32 merge's values rounded."""
    from jaxlm.errors import ConfigError
    from jaxlm.eval.sweep import EvalModel

    assert main(["export", "--workdir", str(lora_run), "--output", str(tmp_path / "a")]) == 0
    full = EvalModel("m", pretrained=str(tmp_path / "a")).load()
    half = EvalModel("m", pretrained=str(tmp_path / "a"), param_dtype="bfloat16").load()
    assert {x.dtype for x in jax.tree_util.tree_leaves(full.params)} == {jnp.dtype("float32")}
    assert {x.dtype for x in jax.tree_util.tree_leaves(half.params)} == {jnp.dtype("bfloat16")}
    norm = lambda pre: np.asarray(pre.params["norm"]["weight"], np.float32)  # not adapted: rounding only
    np.testing.assert_array_equal(norm(half), np.asarray(full.params["norm"]["weight"].astype(jnp.bfloat16), np.float32))
    q = lambda pre: np.asarray(pre.params["layers_0"]["self_attn"]["q_proj"]["kernel"], np.float32)
    np.testing.assert_allclose(q(half), q(full), rtol=0, atol=2 ** -7 * np.abs(q(full)).max())  # merged in bf16
    assert not np.array_equal(q(half), q(full))
    with pytest.raises(ConfigError, match="param_dtype is not supported with hypernet"):
        EvalModel("h", hypernet=str(tmp_path), param_dtype="bfloat16").load()
    with pytest.raises(ConfigError, match="param_dtype='int8', expected one of"):
        EvalModel("m", pretrained=str(tmp_path / "a"), param_dtype="int8").load()


def test_a_tagi_stage_dir_exports_its_hypernetwork(tmp_path, capsys):
    """RUN/stage2 of a TAGI pipeline (bindings recorded under the stage's gin scope) exports the
    hypernetwork its last checkpoint holds: the same params as the run's own end-of-run export."""
    from jaxlm.checkpoints.hf import flatten
    from jaxlm.checkpoints.hypernet import read_params

    run = tmp_path / "tagi"
    assert main(["train", "--gin_file=jaxlm/configs/tests/tiny_tagi.gin", "--gin.train.checkpoint_every=10",
                 "--workdir", str(run)]) == 0
    assert main(["export", "--workdir", str(run), "--output", str(tmp_path / "x")]) == 2
    assert "its stages are" in capsys.readouterr().err
    assert main(["export", "--workdir", str(run / "stage2"), "--output", str(tmp_path / "b"), "--dtype", "bfloat16"]) == 2
    assert "export dtype 'bfloat16' is not supported; a hypernetwork export is written in float32" in capsys.readouterr().err
    assert main(["export", "--workdir", str(run / "stage2"), "--output", str(tmp_path / "h")]) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["objective"] == "TAGIDistillation"
    ours, theirs = flatten(read_params(tmp_path / "h")), flatten(read_params(run / "stage2" / "hypernet"))
    assert ours.keys() == theirs.keys()
    for key in ours:
        np.testing.assert_array_equal(ours[key], theirs[key])
