"""CLI details: help shows defaults, `generate --help` offers only language models, `train --mesh`."""

from __future__ import annotations

import gin
import pytest

from jaxlm.cli import main


def _help(capsys, *argv):
    with pytest.raises(SystemExit) as exit_info:
        main([*argv, "--help"])
    assert exit_info.value.code == 0
    return " ".join(capsys.readouterr().out.split())  # argparse wraps lines


def test_help_shows_defaults_and_only_language_models(capsys):
    text = _help(capsys, "generate")
    assert "--batch_size BATCH_SIZE examples per forward pass (default: 8)" in text
    assert "(default: 64)" in text and "(default: float32)" in text
    assert "all-minilm" not in text and "smollm2-135m-instruct" in text
    train = _help(capsys, "train")
    assert "--mesh MESH" in train and "--data_dir DATA_DIR" in train and "(default: None)" not in train


def test_train_mesh_flag_binds_the_mesh(tmp_path, capsys):
    try:
        assert main(["train", "--gin_file", "jaxlm/configs/tests/tiny_lm.gin", "--workdir", str(tmp_path),
                     "--mesh", "data=2,fsdp=4", "--gin.NUM_STEPS=2", "--gin.train.checkpoint_every=None"]) == 0
    finally:
        gin.clear_config()
    assert "train.mesh_shape = 'data=2,fsdp=4'" in (tmp_path / "config.gin").read_text()


def test_eval_mesh_splits_batches_and_gives_the_same_predictions(shared_data, tmp_path):
    import json

    args = ["eval", "--gin_file", "jaxlm/configs/tests/tiny_eval.gin", f"--gin.eval_sweep.data_dir='{shared_data}'",
            "--gin.eval_sweep.max_cells=2", "--gin.eval_sweep.progress=False", "--gin.eval_sweep.batch_size=8"]
    try:
        assert main([*args, "--workdir", str(tmp_path / "one")]) == 0
        gin.clear_config()
        assert main([*args, "--workdir", str(tmp_path / "mesh"), "--mesh", "data=8"]) == 0
        assert "eval_sweep.mesh_shape = 'data=8'" in (tmp_path / "mesh" / "config.gin").read_text()
        gin.clear_config()
        assert main([*args[:-1], "--workdir", str(tmp_path / "bad"), "--mesh", "data=8"]) == 2  # batch 4, 8 devices
    finally:
        gin.clear_config()

    def predictions(run):
        rows = [json.loads(line) for line in (run / "results.jsonl").read_text().splitlines()]
        return [(r["cell"], r["metrics"]) for r in rows]

    assert predictions(tmp_path / "mesh") == predictions(tmp_path / "one")
