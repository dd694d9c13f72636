"""The task-data root: --data_dir (= gin data_root.directory) > $JAXLM_DATA_DIR > ../shared/data, used by
every reader given no folder; `jaxlm demo` skips its real-data stage in one line when the data is absent."""

from __future__ import annotations

from pathlib import Path

import gin
import pytest

from jaxlm.errors import DataError
from jaxlm.files import DATA_DIR_ENV, data_root


@pytest.fixture(autouse=True)
def clean_gin():
    yield
    gin.clear_config()


def test_precedence_flag_then_environment_then_default(shared_data, tmp_path, monkeypatch):
    from jaxlm.commands.gin_flags import gin_bindings
    from jaxlm.data.sources import load_tasks
    from jaxlm.experiment.gin_config import parse_config

    monkeypatch.delenv(DATA_DIR_ENV, raising=False)
    assert data_root() == Path("../shared/data")
    monkeypatch.setenv(DATA_DIR_ENV, str(shared_data))
    assert data_root() == shared_data
    # a reader given no folder reads the root (here: the environment variable's)
    assert list(load_tasks("bbh", None, names=["date_understanding"])) == ["date_understanding"]

    class Args:  # what argparse gives `jaxlm train --data_dir DIR --gin.X=...`
        gin_bindings, gin_overrides, data_dir = [], ["--gin.NUM_STEPS=3"], str(tmp_path / "flag")

    bindings = gin_bindings(Args)
    assert bindings[0] == f"data_root.directory = {str(tmp_path / 'flag')!r}"
    parse_config(["jaxlm/configs/tests/tiny_lm.gin"], bindings)
    assert data_root() == tmp_path / "flag"  # the flag beats the environment
    with pytest.raises(DataError, match="flag: data directory does not exist"):
        load_tasks("bbh", None)


def test_demo_skips_the_real_data_stage_in_one_line(tmp_path, monkeypatch, capsys):
    from jaxlm.cli import main

    monkeypatch.delenv(DATA_DIR_ENV, raising=False)
    assert main(["demo", "--workdir", str(tmp_path / "run"), "--stages", "smollm2",
                 "--data_dir", str(tmp_path / "nodata")]) == 0
    lines = [line for line in capsys.readouterr().out.splitlines() if "smollm2:" in line]
    assert len(lines) == 1 and "skipped" in lines[0] and f"{tmp_path / 'nodata' / 'bigbench'}" in lines[0]
    assert "JAXLM_DATA_DIR" in lines[0] and "--data_dir" in lines[0]


def test_data_commands_read_the_root_and_split_means_the_split_directory(shared_data, monkeypatch, capsys):
    import json

    from jaxlm.cli import main

    monkeypatch.setenv(DATA_DIR_ENV, str(shared_data))
    assert main(["data", "show", "--source", "bbh", "--task", "navigate", "--n", "1"]) == 0  # no --data_dir
    assert json.loads(capsys.readouterr().out)["task"] == "navigate"
    assert main(["data", "stats", "--source", "superni", "--split", "default", "--part", "test"]) == 0
    summary = json.loads(capsys.readouterr().out.splitlines()[-1])
    assert summary["tasks"] == 16 and summary["missing"]["count"] == 119 - 16  # the default split's test tasks
    assert main(["data", "stats", "--source", "superni", "--split", "test"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("jaxlm: error: --split test: ") and "--part test" in err and len(err.splitlines()) == 1
