"""What a run tells about itself: eval during training (LM and TAGI held-out tasks) in metrics.jsonl and
TensorBoard, the gin config and hparams in the event file, lr / grad norm / tokens/s / MFU scalars,
the jax.profiler trace of `train.profile_steps`."""

from __future__ import annotations

from pathlib import Path

import gin
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxlm.errors import ConfigError
from jaxlm.experiment.gin_config import parse_config
from jaxlm.train.loop import train
from jaxlm.train.metrics import gin_hparams, read_metrics
from tests.tb_events import plugin_values, scalars

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def clean_gin():
    yield
    gin.clear_config()


def _weighted_eval(objective, params, frozen, batches):
    """Token-weighted mean of the objective's loss and metrics over host batches (the reference)."""
    totals, weight = {}, 0.0
    for host in batches:
        batch = {k: jnp.asarray(v) for k, v in host.items()}
        loss, aux = jax.jit(objective.loss)(params, frozen, batch, jax.random.PRNGKey(0))
        w = float(np.sum(host["decoder_loss_weights"]))
        for k, v in {"loss": loss, **aux}.items():
            totals[k] = totals.get(k, 0.0) + float(v) * w
        weight += w
    return {k: v / weight for k, v in totals.items()}


def test_lm_eval_every_writes_eval_lines_and_the_event_file_tells_the_whole_story(tmp_path):
    parse_config(["jaxlm/configs/tests/tiny_lm.gin"], [
        "NUM_STEPS = 10", "train.checkpoint_every = 5", "train.log_every = 1",  # eval and checkpoint at one step
        "train.eval_data = @eval/SyntheticBatches", "eval/SyntheticBatches.seed = 1", "eval/SyntheticBatches.task_seed = 0", "WARMUP_STEPS = 2",
        "train.eval_every = 5", "train.eval_batches = 2",
    ])
    result = train(workdir=tmp_path)
    records = read_metrics(tmp_path / "metrics.jsonl")
    evals = [r for r in records if "eval/loss" in r]
    assert [r["step"] for r in evals] == [5, 10] and sorted(result["evals"]) == [5, 10]
    assert [r["step"] for r in records if "loss" in r] == list(range(1, 11))
    assert sorted(int(p.name) for p in (tmp_path / "checkpoints").iterdir() if p.name.isdigit()) == [5, 10]
    # the eval line of a step follows its train line
    assert [r["step"] for r in records].index(5) + 1 == records.index(evals[0])
    assert all(r["eval/batches"] == 2 and r["eval/num_tokens"] > 0 for r in evals)
    assert evals[1]["eval/loss"] < evals[0]["eval/loss"]  # the model learns the synthetic tasks

    # eval/* equals the objective's loss recomputed on the same two eval batches with the final params
    from jaxlm.train.objectives import CausalLM
    from jaxlm.train.synthetic import SyntheticBatches

    with gin.config_scope("eval"):
        source = SyntheticBatches(shard_index=0, num_shards=1)
    objective = CausalLM()
    want = _weighted_eval(objective, result["state"].params, result["frozen"], [next(source), next(source)])
    assert evals[1]["eval/loss"] == pytest.approx(want["loss"], rel=1e-5)
    assert evals[1]["eval/accuracy"] == pytest.approx(want["accuracy"], rel=1e-5)

    tb = tmp_path / "tensorboard"
    values = scalars(tb)
    assert values["eval/loss"] == pytest.approx({5: evals[0]["eval/loss"], 10: evals[1]["eval/loss"]}, rel=1e-6)
    assert set(values["eval/accuracy"]) == {5, 10}
    for tag in ("train/loss", "train/learning_rate", "train/grad_norm", "train/tokens_per_s", "train/mfu"):
        assert sorted(values[tag]) == list(range(1, 11)), tag
    assert values["train/learning_rate"][10] < values["train/learning_rate"][3]  # cosine decay
    assert values["train/loss"][10] == pytest.approx(next(r["loss"] for r in records if r["step"] == 10), rel=1e-6)

    (text,) = plugin_values(tb, "text")
    config = text.tensor.string_val[0].decode()
    assert text.tag.startswith("config/gin") and "    MODEL/LlamaConfig.hidden_size = 32" in config
    hparams = plugin_values(tb, "hparams")
    assert len(hparams) == 3  # experiment, session start, session end
    from tensorboardX.proto.plugin_hparams_pb2 import HParamsPluginData

    data = [HParamsPluginData.FromString(v.metadata.plugin_data.content) for v in hparams]
    start = next(d.session_start_info for d in data if d.HasField("session_start_info"))
    experiment = next(d.experiment for d in data if d.HasField("experiment"))
    assert start.hparams["make_optimizer.learning_rate"].number_value == pytest.approx(3e-3)  # %LEARNING_RATE
    assert start.hparams["MODEL/LlamaConfig.hidden_size"].number_value == 32
    assert start.hparams["train.eval_data"].string_value == "@eval/SyntheticBatches"
    assert {m.name.tag for m in experiment.metric_infos} == {"train/loss", "eval/loss"}


def test_gin_hparams_resolves_macros_and_names_scopes():
    text = "RATE = 0.5\nNAMES = ('a', %RATE)\nf.x = %RATE\nscope/f.y = @g()\nf.z = None\nf.w = %NAMES\n"
    assert gin_hparams(text) == {"RATE": 0.5, "NAMES": "('a', %RATE)", "f.x": 0.5, "scope/f.y": "@g()",
                                 "f.z": "None", "f.w": "('a', %RATE)"}


def test_tagi_stage2_reports_heldout_task_metrics(tmp_path):
    from jaxlm.data.string_rewrite import RewriteConfig, rewrite_tasks
    from jaxlm.experiment.data_sources import tagi_data
    from jaxlm.experiment.runner import run_parsed_config
    from jaxlm.train.tagi import TAGIDistillation

    parse_config(["jaxlm/configs/tests/tiny_tagi.gin"], [
        "tagi_pipeline.stages = ('stage2',)", "NUM_STEPS = 4", "stage2/TAGIDistillation.w_ins = 0.0",
        "stage2/train.eval_data = @eval/tagi_data", "stage2/train.eval_every = 2", "train.eval_batches = 2",
        # a scoped reference runs in its own scope (not nested in stage2/): bind eval/tagi_data.*
        "eval/tagi_data.part = 'test'", "eval/tagi_data.tasks_per_batch = 2", "eval/tagi_data.batch_size = 4",
    ])
    result = run_parsed_config(tmp_path)
    evals = [r for r in read_metrics(tmp_path / "stage2" / "metrics.jsonl") if "eval/loss" in r]
    assert [r["step"] for r in evals] == [2, 4]
    assert {"eval/loss", "eval/loss_ce", "eval/loss_kl", "eval/accuracy"} <= set(evals[0])
    assert scalars(tmp_path / "stage2" / "tensorboard")["eval/loss_kl"][4] == pytest.approx(evals[1]["eval/loss_kl"])

    with gin.config_scope("eval"):
        source = tagi_data(shard_index=0, num_shards=1)
    start = source.state()
    heldout = {t.name for t in rewrite_tasks(gin.get_configurable(RewriteConfig)(), part="test")}
    batches = [next(source), next(source)]
    assert set(source.batch_tasks(start)) == heldout  # the eval batches hold the held-out rules only
    with gin.config_scope("stage2"):
        objective = TAGIDistillation()
    want = _weighted_eval(objective, result["state"].params, result["frozen"], batches)
    for key in ("loss", "loss_ce", "loss_kl", "accuracy"):
        assert evals[1][f"eval/{key}"] == pytest.approx(want[key], rel=1e-5), key


def test_profile_steps_writes_a_trace_and_bad_fields_are_refused(tmp_path):
    parse_config(["jaxlm/configs/tests/tiny_lm.gin"], ["NUM_STEPS = 4", "train.checkpoint_every = None",
                                                       "train.profile_steps = (2, 4)"])
    train(workdir=tmp_path)
    traces = list((tmp_path / "profile").rglob("*.xplane.pb"))
    assert len(traces) == 1 and traces[0].stat().st_size > 0
    for binding, match in (("train.profile_steps = (3, 3)", "train.profile_steps"),
                           ("train.profile_steps = (0, 2)", "train.profile_steps"),
                           ("train.eval_every = 2", "train.eval_every and train.eval_data"),
                           ("train.eval_data = @SyntheticBatches", "train.eval_every and train.eval_data")):
        gin.clear_config()
        parse_config(["jaxlm/configs/tests/tiny_lm.gin"], ["NUM_STEPS = 4", "train.checkpoint_every = None", binding])
        with pytest.raises(ConfigError, match=match):
            train(workdir=tmp_path / "bad")


def test_a_url_workdir_is_refused_in_one_line_and_nothing_is_written(tmp_path, monkeypatch, capsys):
    from jaxlm.cli import main
    from jaxlm.errors import UsageError
    from jaxlm.files import local_dir

    monkeypatch.chdir(tmp_path)
    code = main(["train", "--gin_file", f"{REPO}/jaxlm/configs/tests/tiny_lm.gin", "--workdir", "gs://bucket/run"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and err[0].startswith("jaxlm: error: --workdir gs://bucket/run: gs://")
    assert not list(tmp_path.iterdir())  # no ./gs:/bucket/run
    with pytest.raises(UsageError, match=r"--workdir fake\+scheme://x/y: fake\+scheme:// locations"):
        local_dir("fake+scheme://x/y", "--workdir")
    assert local_dir(tmp_path / "a:b", "--workdir") == tmp_path / "a:b"  # a colon alone is a local name
