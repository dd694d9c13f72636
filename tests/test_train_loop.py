"""The loop: gin experiment end to end (metrics, config, TensorBoard, checkpoint resume), NaN policies,
gin typos failing before any compute."""

import json
import time
from pathlib import Path

import gin
import jax
import numpy as np
import pytest

from jaxlm.cli import main
from jaxlm.errors import ConfigError
from jaxlm.models.llama import LlamaConfig
from jaxlm.experiment.gin_config import parse_config
from jaxlm.train.loop import NonFiniteLossError, train
from jaxlm.train.metrics import read_metrics
from jaxlm.train.objectives import CausalLM
from jaxlm.train.optim import make_optimizer
from jaxlm.train.synthetic import SyntheticBatches

REPO = Path(__file__).resolve().parents[1]
TINY = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_layers=1, num_heads=4, num_kv_heads=2)


@pytest.fixture(autouse=True)
def clean_gin():
    yield
    gin.clear_config()


def test_tiny_experiment_logs_every_step_and_resumes_from_its_checkpoint(tmp_path):
    parse_config(["jaxlm/configs/tests/tiny_lm.gin"], ["NUM_STEPS = 30", "train.checkpoint_every = 10"])
    first = train(workdir=tmp_path)
    assert first["step"] == 30 and first["resumed_from"] is None
    records = read_metrics(tmp_path / "metrics.jsonl")
    assert [r["step"] for r in records] == list(range(1, 31))
    for key in ("loss", "learning_rate", "grad_norm", "tokens_per_s", "mfu"):
        assert all(np.isfinite(r[key]) and r[key] >= 0 for r in records), key
    assert np.mean([r["loss"] for r in records[-3:]]) < records[0]["loss"] - 0.5
    config = (tmp_path / "config.gin").read_text()
    assert "LlamaConfig.hidden_size = 32" in config and "train.num_steps = %NUM_STEPS" in config
    assert list((tmp_path / "tensorboard").glob("events.out.tfevents.*"))

    # A longer run in the same workdir continues from step 30 (schedule as configured for 40 steps).
    parse_config(["jaxlm/configs/tests/tiny_lm.gin"], ["NUM_STEPS = 40", "train.checkpoint_every = 10"])
    second = train(workdir=tmp_path)
    assert second["resumed_from"] == 30 and sorted(second["losses"]) == list(range(31, 41))
    assert [r["step"] for r in read_metrics(tmp_path / "metrics.jsonl")] == list(range(1, 41))


class PoisonedBatches(SyntheticBatches):
    """Synthetic batches whose batch `bad_index` has NaN loss weights (a corrupt input)."""

    def __init__(self, bad_index: int, **kwargs):
        super().__init__(batch_size=8, seq_len=16, vocab_size=64, **kwargs)
        self.bad_index = bad_index

    def __next__(self):
        index = self.index
        batch = super().__next__()
        if index == self.bad_index:
            batch["decoder_loss_weights"] = np.full_like(batch["decoder_loss_weights"], np.nan)
        return batch


def _run_poisoned(workdir, policy):
    return train(workdir=workdir, objective=CausalLM(TINY), optimizer=make_optimizer(learning_rate=1e-2, total_steps=6),
                 data=lambda **shard: PoisonedBatches(3, **shard), num_steps=6, nan_policy=policy, progress=False)


def test_nan_policy_stop_names_the_step_and_the_batch(tmp_path):
    with pytest.raises(NonFiniteLossError, match=r"at step 4 \(batch: data state \{'index': 3"):
        _run_poisoned(tmp_path, "stop")
    assert [r["step"] for r in read_metrics(tmp_path / "metrics.jsonl")] == [1, 2, 3]


def test_nan_policy_skip_counts_logs_and_does_not_apply_the_update(tmp_path):
    summary = _run_poisoned(tmp_path, "skip")
    assert summary["step"] == 6 and summary["skipped_steps"] == 1
    records = {r["step"]: r for r in read_metrics(tmp_path / "metrics.jsonl")}
    assert records[4].get("nonfinite") is True and records[6]["skipped_steps"] == 1
    assert all(np.isfinite(records[s]["loss"]) for s in (1, 2, 3, 5, 6))
    params = jax.tree_util.tree_leaves(summary["state"].params)
    assert all(bool(np.isfinite(np.asarray(p)).all()) for p in params)


def test_gin_typos_fail_before_any_compute_naming_the_binding(tmp_path, capsys):
    with pytest.raises(ConfigError, match="num_stepz"):
        parse_config(["jaxlm/configs/tests/tiny_lm.gin"], ["train.num_stepz = 3"])
    with pytest.raises(ConfigError, match="trian"):
        parse_config(["jaxlm/configs/tests/tiny_lm.gin"], ["trian.num_steps = 3"])
    bad_file = tmp_path / "bad.gin"
    bad_file.write_text("include 'jaxlm/configs/tests/tiny_lm.gin'\nmake_optimizer.learning_rat = 0.1\n")
    with pytest.raises(ConfigError, match="learning_rat"):
        parse_config([str(bad_file)])
    with pytest.raises(ConfigError, match="no_such.gin"):
        parse_config(["experiments/no_such.gin"])

    start = time.perf_counter()
    status = main(["train", "--gin_file=jaxlm/configs/tests/tiny_lm.gin", "--gin.LoraSpec.rnak=4",
                   "--workdir", str(tmp_path / "run")])
    err = capsys.readouterr().err.strip().splitlines()
    assert status == 2 and err[-1].startswith("jaxlm: error:") and "rnak" in err[-1]
    assert time.perf_counter() - start < 5 and not (tmp_path / "run").exists()  # nothing was built or written


def test_missing_required_binding_is_a_config_error(tmp_path, capsys):
    status = main(["train", "--gin_file=jaxlm/configs/models/tiny_llama.gin", "--workdir", str(tmp_path / "run")])
    err = capsys.readouterr().err
    assert status == 2 and "train.objective" in err and "train.data" in err


def test_mfu_peaks_and_metrics_truncation(tmp_path):
    from types import SimpleNamespace

    from jaxlm.train.metrics import mfu, peak_flops_per_device, truncate_metrics

    kinds = {"NVIDIA H100 80GB HBM3": 989e12, "NVIDIA A100-SXM4-40GB": 312e12, "TPU v4": 275e12,
             "TPU v5 lite": 197e12, "cpu": 1e11}
    for kind, peak in kinds.items():
        assert peak_flops_per_device(SimpleNamespace(device_kind=kind)) == peak
    assert peak_flops_per_device(SimpleNamespace(device_kind="mystery chip")) is None
    assert mfu(1e12, steps=10, seconds=2.0, peak=1e13) == 0.5
    path = tmp_path / "metrics.jsonl"
    path.write_text("".join(json.dumps({"step": s, "loss": 1.0 / s}) + "\n" for s in range(1, 8)) + '{"step": 8, "lo')
    assert truncate_metrics(path, 5) == 5
    assert [r["step"] for r in read_metrics(path)] == [1, 2, 3, 4, 5]


def _bound(name: str) -> bool:
    try:
        return gin.query_parameter(name) is not None
    except ValueError:
        return False


RUN_FILE_MACROS = ["NUM_STEPS = 1", "LEARNING_RATE = 1e-3", "WARMUP_STEPS = 0", "NUM_TASKS = 2"]


def test_every_experiment_file_parses():
    """Experiments (model file + run file + macros) parse on their own; run files need a model's macros;
    fragments (data sources, TAGI stage and ablation switches) are included by experiments; eval
    sweeps bind `eval_sweep` instead of `train`."""
    files = sorted(REPO.glob("jaxlm/configs/**/*.gin")) + sorted(REPO.glob("experiments/studies/**/*.gin"))
    assert len(files) >= 30
    tagi_fragments = {"stages.gin", "rewrite_data.gin", "rewrite_model.gin"}
    # Demo settings and the test-size override are parsed with every demo stage, not run alone.
    demo_fragments = {"setting.gin", "tiny_demo.gin"}
    for f in files:
        fragment = (
            "data" in f.parts or f.name == "synthetic_data.gin" or "ablations" in f.parts
            or ("tagi" in f.parts and f.name in tagi_fragments) or f.name in demo_fragments
        )
        if "runs" in f.parts:  # run files declare their budget macros %gin.REQUIRED
            with pytest.raises(ConfigError, match="REQUIRED"):
                parse_config(["jaxlm/configs/models/tiny_llama.gin", str(f)])
            parse_config(["jaxlm/configs/models/tiny_llama.gin", str(f)], RUN_FILE_MACROS)
        elif fragment:
            parse_config(["jaxlm/configs/models/tiny_llama.gin", str(f)])
        else:
            parse_config([str(f)])  # unknown names, parameters or macros would raise ConfigError
        if "models" in f.parts or fragment:
            continue
        # Every experiment runs something: a training run, an eval sweep or a rewrite evaluation.
        runs = [name for name in ("train.optimizer", "eval_sweep.methods", "RewriteEval.methods")
                if _bound(name)]
        assert runs, f
    with pytest.raises(ConfigError, match="MODEL"):
        parse_config(["jaxlm/configs/runs/finetune.gin"])  # a run file without a model file
