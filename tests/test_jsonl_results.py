"""`jaxlm.jsonl.ResultsLog`, the resumable results file of sweeps, the demo and the study drivers: a torn
last line is dropped (and cut before the next append), finished keys are skipped, appends are flushed
and fsynced so they survive the writer's death."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from jaxlm.jsonl import InputError, ResultsLog, drop_torn_tail


def _log(path):
    return ResultsLog(path, key=lambda r: (r["cell"], r.get("settings", "")))


def test_missing_file_is_an_empty_log_and_append_creates_it(tmp_path):
    log = _log(tmp_path / "deep" / "results.jsonl")
    assert log.rows() == [] and log.done_keys() == set() and log.latest() == {}
    log.append([{"cell": "a", "score": 1.5}, {"cell": "b", "settings": "x", "score": "é"}])
    assert (tmp_path / "deep" / "results.jsonl").read_text(encoding="utf-8") == (
        '{"cell": "a", "score": 1.5}\n{"cell": "b", "settings": "x", "score": "é"}\n')
    assert log.done_keys() == {("a", ""), ("b", "x")}
    ascii_log = ResultsLog(tmp_path / "ascii.jsonl", ensure_ascii=True)
    ascii_log.append([{"t": "é"}])
    assert (tmp_path / "ascii.jsonl").read_text() == '{"t": "\\u00e9"}\n'


@pytest.mark.parametrize("torn", ['{"cell": "c", "sco', '{"cell": "c"}', '{"cell": "c", "sco\n', '\x00garbage\n'])
def test_torn_last_line_is_dropped_on_read_and_cut_before_the_next_append(tmp_path, torn):
    path = tmp_path / "results.jsonl"
    complete = '{"cell": "a", "score": 1}\n{"cell": "b", "score": 2}\n'
    path.write_text(complete + torn)
    log = _log(path)
    assert [r["cell"] for r in log.rows()] == ["a", "b"]
    assert log.done_keys() == {("a", ""), ("b", "")}
    assert path.read_text() == complete + torn  # reading never changes the file
    log.append([{"cell": "c", "score": 3}])
    assert path.read_text() == complete + '{"cell": "c", "score": 3}\n'
    assert [r["score"] for r in _log(path).rows()] == [1, 2, 3]


def test_torn_line_longer_than_the_tail_search_block(tmp_path):
    path = tmp_path / "results.jsonl"
    head = json.dumps({"cell": "a", "blob": "x" * 70_000}) + "\n"
    path.write_text(head + '{"cell": "b", "blob": "' + "y" * 150_000)  # torn, 2+ blocks long
    assert drop_torn_tail(path) is True
    assert path.read_text() == head
    assert drop_torn_tail(path) is False  # a clean file is left alone
    path.write_text('{"cell": "only", "blob": "' + "z" * 100_000)  # torn, and the only line
    assert drop_torn_tail(path) is True and path.read_bytes() == b""


def test_damage_before_the_last_line_is_an_error_not_a_silent_truncation(tmp_path):
    path = tmp_path / "results.jsonl"
    path.write_text('{"cell": "a"}\n{"cell": \n{"cell": "b"}\n')
    with pytest.raises(InputError, match=r"results.jsonl:2: not valid JSON"):
        _log(path).rows()
    path.write_text('{"cell": "a"}\n[1, 2]\n')
    with pytest.raises(InputError, match=r"results.jsonl:2: expected a JSON object, got list"):
        _log(path).rows()


def test_finished_keys_are_skipped_and_the_latest_row_per_key_wins(tmp_path):
    log = ResultsLog(tmp_path / "results.jsonl", key=lambda r: r["method"])
    log.append([{"method": "a", "em": 1}, {"method": "b", "em": 2}])
    log.append(log.pending([{"method": "a", "em": 9}, {"method": "c", "em": 3}]))
    assert [(r["method"], r["em"]) for r in log.rows()] == [("a", 1), ("b", 2), ("c", 3)]
    log.append([{"method": "b", "em": 20}])  # a redone key: its last line counts
    assert {k: r["em"] for k, r in log.latest().items()} == {"a": 1, "b": 20, "c": 3}
    assert list(log.latest()) == ["a", "b", "c"]
    with pytest.raises(ValueError, match="key="):
        ResultsLog(tmp_path / "results.jsonl").done_keys()


def test_sweep_results_log_keys_cells_by_settings(tmp_path):
    from jaxlm.eval.sweep import results_log

    results_log(tmp_path).append([{"cell": "m__def__0.t__s0", "settings": "abc"}, {"cell": "m__icil__0.t__s0"}])
    assert results_log(tmp_path).done_keys() == {("m__def__0.t__s0", "abc"), ("m__icil__0.t__s0", "")}


def test_each_append_is_fsynced_and_survives_the_writer_dying(tmp_path, monkeypatch):
    path = tmp_path / "results.jsonl"
    synced = []
    real_fsync = os.fsync

    def spy(fd):
        synced.append(os.fstat(fd).st_size)
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", spy)
    log = _log(path)
    log.append([{"cell": "a"}])
    log.append([{"cell": "b"}, {"cell": "c"}])
    assert synced == [len('{"cell": "a"}\n'), len('{"cell": "a"}\n{"cell": "b"}\n{"cell": "c"}\n')]
    # A writer killed right after append returns (no close, no interpreter shutdown) loses nothing.
    code = ("import os, sys\nfrom jaxlm.jsonl import ResultsLog\n"
            "log = ResultsLog(sys.argv[1])\nlog.append([{'cell': 'd', 'score': 4}])\nos._exit(9)\n")
    proc = subprocess.run([sys.executable, "-c", code, str(path)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 9, proc.stderr[-2000:]
    reopened = _log(path)
    assert [r["cell"] for r in reopened.rows()] == ["a", "b", "c", "d"]
    assert reopened.done_keys() == {("a", ""), ("b", ""), ("c", ""), ("d", "")}
