"""Evaluation sweeps (jaxlm/configs/tests/tiny_eval.gin: a tiny random Llama with SmolLM2's tokenizer on real
Super-NI and BBH tasks): a partial sweep plus a torn results line, rerun, equals one uninterrupted
run; predictions, summary tables, plots and the operative config are written; `jaxlm eval` works."""

from __future__ import annotations

import csv
import json
from collections import defaultdict
from pathlib import Path

import pytest

from jaxlm.eval import report

REPO = Path(__file__).resolve().parents[1]
TINY = str(REPO / "jaxlm/configs/tests/tiny_eval.gin")


def _parse(shared_data, *extra):
    from jaxlm.eval import sweep  # noqa: F401  (registers the eval configurables)
    from jaxlm.experiment.gin_config import parse_config

    parse_config([TINY], [f"eval_sweep.data_dir = '{shared_data}'", "eval_sweep.progress = False", *extra])


def _run(workdir, **kw):
    from jaxlm.eval.sweep import eval_sweep

    return eval_sweep(workdir, **kw)


def _results(workdir):
    rows = [json.loads(line) for line in (workdir / "results.jsonl").read_text().splitlines()]
    for r in rows:
        r.pop("seconds")
    return rows


@pytest.fixture(scope="module")
def full_run(shared_data, tmp_path_factory):
    _parse(shared_data)
    workdir = tmp_path_factory.mktemp("full")
    return workdir, _run(workdir)


@pytest.mark.slow
def test_partial_sweep_resumes_to_the_same_results(full_run, shared_data, tmp_path):
    full_dir, full_summary = full_run
    # 4 methods x (2 Super-NI + 1 BBH task), one seed (none of the methods is seeded except ICIL: seeds=(0,))
    assert full_summary["cells"] == 12 and full_summary["ran"] == 12 and full_summary["num_compiles"] > 0
    _parse(shared_data)
    first = _run(tmp_path, max_cells=5)
    assert first["ran"] == 5 and len(_results(tmp_path)) == 5
    with open(tmp_path / "results.jsonl", "a") as f:
        f.write('{"cell": "tiny__def__0.task')  # killed mid-write: a torn last line
    second = _run(tmp_path)
    assert second["ran"] == 7 and second["skipped"] == 5
    assert _results(tmp_path) == _results(full_dir)  # same cells, same order, same numbers
    third = _run(tmp_path)
    assert third["ran"] == 0 and third["skipped"] == 12 and len(_results(tmp_path)) == 12


def test_sweep_writes_predictions_summary_plots_and_config(full_run):
    workdir, _ = full_run
    rows = _results(workdir)
    assert {r["method"] for r in rows} == {"def", "def_pos2", "icil", "crosstask"}
    assert {r["group"] for r in rows} == {"Cause Effect Classification", "Keyword Tagging", "bbh"}
    for r in rows:
        preds = [json.loads(x) for x in (workdir / "predictions" / f"{r['cell']}.jsonl").read_text().splitlines()]
        assert len(preds) == r["num_instances"] == 3 and all(p["task"] == r["task"] for p in preds)
        if r["source"] == "bbh":  # multiple choice: ranked options, accuracy
            assert all(p["prediction"] in p["options"] for p in preds)
            assert r["metrics"]["accuracy"] == pytest.approx(
                100 * sum(p["prediction"] in p["references"] for p in preds) / 3)
        if r["method"] == "crosstask":
            assert set(r["by_source"]) == {"task227_clariq_classification", "task1289_trec_classification"}
        if r["method"] == "icil":
            assert r["info"]["k_used"] < 8 and r["info"]["k_asked"] == 8
    # summary.csv: the mean over a group's tasks of each cell's metric
    expected = defaultdict(list)
    for r in rows:
        for metric, value in r["metrics"].items():
            if metric in report.TABLE_METRICS:
                expected[(r["method"], r["group"], metric)].append(value)
                expected[(r["method"], "all", metric)].append(value)
    with open(workdir / "summary.csv") as f:
        table = list(csv.DictReader(f))
    plain = [t for t in table if ":" not in t["method"]]
    assert len(plain) == len(expected)
    for t in plain:
        values = expected[(t["method"], t["group"], t["metric"])]
        assert float(t["value"]) == pytest.approx(sum(values) / len(values), abs=0.006)
        assert int(t["num_tasks"]) == len(values)
    assert {t["method"] for t in table} >= {"crosstask:mean", "crosstask:best"}
    md = (workdir / "summary.md").read_text()
    assert "| model | method | Cause Effect Classification | Keyword Tagging | bbh | all |" in md
    assert "| tiny | icil |" in md
    pngs = sorted(p.name for p in (workdir / "plots").glob("*.png"))
    assert pngs == ["tiny_exact_match.png", "tiny_rougeL.png", "tiny_score.png"]
    assert all((workdir / "plots" / p).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" for p in pngs)
    config = (workdir / "config.gin").read_text()
    assert "eval_sweep.batch_size = 4" in config and "CrossTask.sources" in config


def test_results_json_is_shaped_like_lm_evaluation_harness_output(full_run):
    from jaxlm.eval import harness

    workdir, _ = full_run
    doc = json.loads((workdir / "results.json").read_text())
    rows = _results(workdir)
    assert set(doc) >= {"results", "configs", "versions", "n-shot", "higher_is_better", "n-samples", "config",
                        "git_hash", "date", "package_versions"}
    assert len(doc["results"]) == len(rows) == 12
    assert doc["package_versions"]["jax"] and doc["config"]["bootstrap_iters"] == harness.BOOTSTRAP_ITERS
    for r in rows:
        key = f"{r['model']}/{r['method']}/{r['task']}"
        got, preds = doc["results"][key], [json.loads(x) for x in
                                           (workdir / "predictions" / f"{r['cell']}.jsonl").read_text().splitlines()]
        assert doc["n-samples"][key] == {"original": 3, "effective": 3}
        if r["source"] == "bbh":
            assert got["acc,none"] == pytest.approx(r["metrics"]["accuracy"])
            if r["method"] != "crosstask":  # a vote over sources keeps no option scores
                assert {"acc_norm,none", "acc_norm_stderr,none", "acc_mean,none"} <= set(got)
                assert all(len(p["option_logprobs_per_byte"]) == len(p["options"]) for p in preds)
        else:
            assert got["rougeL,none"] == pytest.approx(r["metrics"]["rougeL"], abs=1e-6)
            per = harness.instance_scores(preds)["rougeL"]
            assert got["rougeL_stderr,none"] == pytest.approx(harness.bootstrap_stderr(per))


def test_bootstrap_stderr_and_per_byte_accuracy():
    from jaxlm.eval import harness

    values = [0.0, 100.0] * 50
    # the bootstrap estimate of the mean's standard error is close to std / sqrt(n) = 50 / 10
    assert harness.bootstrap_stderr(values) == pytest.approx(5.0, rel=0.1)
    assert harness.bootstrap_stderr(values) == harness.bootstrap_stderr(values)  # seeded
    assert harness.bootstrap_stderr([3.0]) == 0.0
    rec = {"options": ["a", "bbbb"], "prediction": "a", "references": ["bbbb"], "option_logprobs": [-1.0, -2.0],
           "option_logprobs_mean": [-1.0, -1.0], "option_logprobs_per_byte": [-1.0, -0.5]}
    got = harness.instance_scores([rec])
    assert got == {"acc": [0.0], "acc_mean": [0.0], "acc_norm": [100.0]}  # a tie goes to the first option


def test_report_expands_sources_into_vote_mean_and_best():
    rows = [{"model": "m", "method": "x", "group": "g", "task": "t1", "seed": 0,
             "metrics": {"score": 50.0}, "by_source": {"a": {"score": 20.0}, "b": {"score": 60.0}}},
            {"model": "m", "method": "x", "group": "h", "task": "t2", "seed": 0,
             "metrics": {"score": 10.0}, "by_source": {"a": {"score": 30.0}, "b": {"score": 0.0}}}]
    got = {(s["method"], s["group"]): s["value"] for s in report.summarize(rows)}
    assert got == {("x", "g"): 50.0, ("x", "h"): 10.0, ("x", "all"): 30.0,
                   ("x:mean", "g"): 40.0, ("x:mean", "h"): 15.0, ("x:mean", "all"): 27.5,
                   ("x:best", "g"): 60.0, ("x:best", "h"): 30.0, ("x:best", "all"): 45.0}


def test_jaxlm_eval_command(shared_data, tmp_path, capsys):
    from jaxlm.cli import main

    args = ["eval", "--gin_file", TINY, f"--gin.eval_sweep.data_dir='{shared_data}'",
            "--gin.eval_sweep.methods=[@def/Prompted()]", "--gin.eval_sweep.progress=False",
            "--gin.superni/TaskSet.names=('task645_summarization',)", "--workdir", str(tmp_path)]
    assert main(args + ["--gin.bbh/TaskSet.max_instances=2"]) == 0
    out = json.loads(capsys.readouterr().err.strip().splitlines()[-1])
    assert out["cells"] == out["ran"] == 2 and (tmp_path / "summary.md").is_file()
    assert main(args) == 0  # another instance cap redoes the BBH cell only
    assert json.loads(capsys.readouterr().err.strip().splitlines()[-1])["ran"] == 1
    assert main(args) == 0
    assert json.loads(capsys.readouterr().err.strip().splitlines()[-1])["ran"] == 0
    lines = (tmp_path / "results.jsonl").read_text().splitlines()
    assert len(lines) == 3 and "| tiny | def |" in (tmp_path / "summary.md").read_text()
    assert main(args + ["--no_prefix_cache"]) == 0  # exact either way: the cells stay done
    assert json.loads(capsys.readouterr().err.strip().splitlines()[-1])["ran"] == 0
    assert main(["eval", "--gin_file", "nope.gin", "--workdir", str(tmp_path)]) == 2
    assert "--gin_file nope.gin: no such file" in capsys.readouterr().err
