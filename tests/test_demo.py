"""`jaxlm demo` end to end at miniature size (jaxlm/configs/tests/tiny_demo.gin): every stage runs, the
run directory holds what the README promises, and a rerun resumes instead of redoing work."""

from __future__ import annotations

import json

import gin
import pytest

from jaxlm.jsonl import read_jsonl

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory, shared_data):
    from jaxlm.cli import main

    run = tmp_path_factory.mktemp("demo") / "run"
    assert main(["demo", "--workdir", str(run), "--gin_file", "jaxlm/configs/tests/tiny_demo.gin",
                 f"--gin.eval_sweep.data_dir='{shared_data}'"]) == 0
    yield run
    gin.clear_config()  # the demo's last parse binds configurables (CrossTask.sources, ...) other tests build


def test_demo_writes_every_stage_output(demo_run):
    rules = [json.loads(line) for line in (demo_run / "rules" / "train.jsonl").read_text().splitlines()]
    heldout = [json.loads(line) for line in (demo_run / "rules" / "heldout.jsonl").read_text().splitlines()]
    assert len(rules) == 40 and len(heldout) == 4
    assert not {(r["x"], r["y"]) for r in rules} & {(r["x"], r["y"]) for r in heldout}  # unseen rules
    assert (demo_run / "base_hf" / "config.json").is_file()
    for stage in ("teachers", "stage1", "stage2"):
        assert (demo_run / "tagi" / stage / "config.gin").is_file(), stage
    assert (demo_run / "tagi" / "stage2" / "hypernet" / "hypernet.json").is_file()
    for plot in ("rewrite_methods.png", "smollm2_bigbench.png", "smollm2_superni.png", "training_loss.png"):
        assert (demo_run / "plots" / plot).read_bytes()[:4] == b"\x89PNG", plot


def test_demo_results_match_predictions(demo_run):
    rows = read_jsonl(demo_run / "results.jsonl")
    rewrite = {r["method"]: r for r in rows if r["study"] == "rewrite"}
    assert list(rewrite) == ["no_instruction", "in_context", "icil", "hypernet"]
    for method, row in rewrite.items():
        preds = read_jsonl(demo_run / "rewrite" / "predictions" / f"{method}.jsonl")
        assert len(preds) == row["examples"] == 16
        assert row["exact_match"] == pytest.approx(100.0 * sum(p["prediction"] == p["gold"] for p in preds) / 16, abs=0.01)
        assert 0.0 < row["target_nll"] < 10.0
    assert len(rewrite["icil"]["icil_demos"]) == 2  # ICIL_DEMOS in tiny_demo.gin
    fit = [r for r in rows if r["study"] == "teachers"]  # the L_ins teachers on own rows vs new inputs
    assert len(fit) == 1 and fit[0]["teachers"] == 8 and fit[0]["examples"] == 5
    assert all(0.0 <= fit[0][k] <= 100.0 for k in ("own_rows_em", "fresh_inputs_em", "fresh_inputs_in_context_em"))
    smol = [r for r in rows if r["study"] == "smollm2"]
    methods = {"zero_shot", "def_pos2", "icil", "crosstask", "crosstask:mean", "crosstask:best"}
    mc = [r for r in smol if r["kind"] == "bigbench"]
    gen = [r for r in smol if r["kind"] == "superni"]
    assert {r["method"] for r in mc} == {r["method"] for r in gen} == methods and len(mc) + len(gen) == len(smol)
    assert all(r["task"] == "general_knowledge" and r["metric"] == "acc_norm % (per byte)" for r in mc)
    assert all(r["task"] == "task645_summarization" and r["metric"] == "ROUGE-L" for r in gen)
    assert all(0.0 <= r["score"] <= 100.0 for r in smol)
    sweep = {(r["method"], r["task"]): r for r in read_jsonl(demo_run / "smollm2" / "results.jsonl")}
    for r in smol:  # the demo's rows are the sweep's own metrics: acc under per-byte scores, ROUGE-L
        if ":" not in r["method"]:
            metrics = sweep[(r["method"], r["task"])]["metrics"]
            assert r["score"] == pytest.approx(metrics["score" if r["kind"] == "bigbench" else "rougeL"], abs=0.01)
    table = (demo_run / "table.md").read_text()
    assert "Unseen string-rewrite rules (4 held-out rules, 16 examples)" in table
    assert f"LoRA teachers of 8 training rules (the L_ins targets): exact match {fit[0]['own_rows_em']:.2f}%" in table
    assert f"| {rewrite['icil']['exact_match']:.2f} | {rewrite['icil']['target_nll']:.3f} |" in table
    assert "SmolLM2-135M-Instruct, BIG-bench multiple choice (acc_norm % (per byte))" in table
    assert "SmolLM2-135M-Instruct, Super-NI test tasks, generation (ROUGE-L)" in table and "| zero_shot |" in table


def test_demo_rerun_resumes_without_redoing(demo_run, capsys):
    from jaxlm.cli import main

    before = (demo_run / "results.jsonl").read_text()
    assert main(["demo", "--workdir", str(demo_run), "--gin_file", "jaxlm/configs/tests/tiny_demo.gin",
                 "--stages", "base,tagi,rewrite,smollm2"]) == 0
    out = capsys.readouterr().out
    assert "base: exists" in out and "tagi: exists" in out and "8 cells (0 run)" in out
    assert (demo_run / "results.jsonl").read_text() == before  # nothing re-evaluated or duplicated
    assert f"run directory: {demo_run.resolve()}" in out
