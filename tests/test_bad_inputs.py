"""Bad inputs through the real CLI: each case is its own `python -m jaxlm.cli ...` process and must end
with exit status 2 and exactly one stderr line `jaxlm: error: ...` that names the file/line, field,
flag or binding at fault, never a traceback.

The cases run once per module, two processes at a time (a case costs 0.1-4 s, mostly imports and the
tiny model's load); each test then checks one case's recorded result.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from tests.hf_tiny import tiny_llama_dir, tiny_t5_dir

ROOT = Path(__file__).resolve().parents[1]
VOCAB, POSITIONS = 128, 256  # the tiny Llama of tests/hf_tiny.py
TINY_LM = "jaxlm/configs/tests/tiny_lm.gin"


def run_cli(args: list[str], cwd: Path = ROOT, timeout: float = 300, **kw) -> subprocess.CompletedProcess:
    """`python -m jaxlm.cli ARGS` with this checkout on PYTHONPATH, on CPU."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "JAX_PLATFORMS": "cpu"}
    return subprocess.run([sys.executable, "-m", "jaxlm.cli", *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=timeout, **kw)


def _jsonl(path: Path, rows: list) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def _cases(d: Path, model: str) -> dict[str, tuple[list[str], list[str]]]:
    """{case id: (argv, substrings the one error line must contain)}; files are written under `d`."""
    ok = {"input_ids": [5, 6, 7], "target_ids": [8, 9]}
    nonutf = d / "nonutf.jsonl"
    nonutf.write_bytes(b'{"input_ids": [5], "target_ids": [6]}\n{"inputs": "caf\xe9", "targets": "x"}\n')
    preds_nonutf = d / "preds_nonutf.jsonl"
    preds_nonutf.write_bytes(b'{"prediction": "a", "references": ["a"], "task": "t"}\n{"prediction": "\xff"}\n')
    bad_json = d / "bad_json.jsonl"
    bad_json.write_text('{"input_ids": [5], "target_ids": [6]}\n{"input_ids": [5,\n')
    a_file = d / "a_file"
    a_file.write_text("not a directory\n")
    fake_hypernet = d / "hypernet_run"
    fake_hypernet.mkdir()

    def score(rows, *extra):
        name = f"in{len(list(d.glob('in*.jsonl')))}.jsonl"
        return ["score", "--model", model, "--input", _jsonl(d / name, rows), "--output", str(d / "out.jsonl"), *extra]

    def generate(rows, *extra):
        name = f"in{len(list(d.glob('in*.jsonl')))}.jsonl"
        return ["generate", "--model", model, "--input", _jsonl(d / name, rows), "--output", str(d / "gen.jsonl"),
                *extra]

    def metrics(rows):
        name = f"in{len(list(d.glob('in*.jsonl')))}.jsonl"
        return ["metrics", "--input", _jsonl(d / name, rows)]

    def train(*extra, workdir=str(d / "run")):
        return ["train", "--gin_file", TINY_LM, "--workdir", workdir, *extra]

    pred = {"prediction": "a", "references": ["a"], "task": "t"}
    long_input = [5, 6, 7, 8] * 100  # 400 tokens > 256 positions
    return {
        # -------- JSONL inputs
        "score_non_utf8": (["score", "--model", model, "--input", str(nonutf), "--output", str(d / "o.jsonl")],
                           ["nonutf.jsonl:2", "not UTF-8"]),
        "generate_non_utf8": (["generate", "--model", model, "--input", str(nonutf), "--output", str(d / "o.jsonl")],
                              ["nonutf.jsonl:2", "not UTF-8"]),
        "metrics_non_utf8": (["metrics", "--input", str(preds_nonutf)], ["preds_nonutf.jsonl:2", "not UTF-8"]),
        "score_bad_json": (["score", "--model", model, "--input", str(bad_json), "--output", str(d / "o.jsonl")],
                           ["bad_json.jsonl:2", "not valid JSON"]),
        "score_not_object": (score([ok, [1, 2]]), [":2", "expected a JSON object"]),
        "score_missing_input": (["score", "--model", model, "--input", str(d / "nope.jsonl"), "--output",
                                 str(d / "o.jsonl")], ["nope.jsonl", "no such input file"]),
        "score_input_is_dir": (["score", "--model", model, "--input", str(d), "--output", str(d / "o.jsonl")],
                               [str(d), "no such input file"]),
        # -------- token ids
        "score_id_beyond_vocab": (score([ok, {"input_ids": [5, VOCAB], "target_ids": [6]}]),
                                  [":2", "'input_ids'", f"token id {VOCAB}", f"{VOCAB} ids"]),
        "score_target_id_beyond_vocab": (score([{"input_ids": [5], "target_ids": [6, 5000]}]),
                                         [":1", "'target_ids'", "token id 5000"]),
        "generate_id_beyond_vocab": (generate([{"input_ids": [5, 999]}]), [":1", "'input_ids'", "token id 999"]),
        "score_bool_id": (score([{"input_ids": [5, True], "target_ids": [6]}]), [":1", "'input_ids'", "non-negative ints"]),
        "generate_bool_id": (generate([{"input_ids": [True]}]), [":1", "'input_ids'", "non-negative ints"]),
        "score_negative_id": (score([{"input_ids": [-1], "target_ids": [6]}]), [":1", "'input_ids'"]),
        "score_float_id": (score([{"input_ids": [5.0], "target_ids": [6]}]), [":1", "'input_ids'"]),
        "score_ids_not_list": (score([{"input_ids": "5 6", "target_ids": [6]}]), [":1", "'input_ids'"]),
        "score_no_fields": (score([{"text": "x"}]), [":1", "'inputs'", "'input_ids'"]),
        "score_empty_target": (score([{"input_ids": [5], "target_ids": []}]), [":1", "empty target"]),
        "score_text_not_string": (score([{"inputs": 5, "target_ids": [6]}]), [":1", "'inputs'", "string"]),
        "score_text_without_tokenizer": (score([{"inputs": "hi", "target_ids": [6]}]), [":1", "no tokenizer"]),
        "generate_empty_input": (generate([{"input_ids": []}]), [":1", "empty input"]),
        # -------- context length
        "score_too_long": (score([ok, {"input_ids": long_input, "target_ids": [6]}]),
                           [":2", "input + target", "--truncate"]),
        "score_target_too_long": (score([{"input_ids": [5], "target_ids": [7] * POSITIONS}], "--truncate", "left"),
                                  [":1", "target", f"max_position_embeddings={POSITIONS}"]),
        "generate_too_long": (generate([{"input_ids": [5] * 250}]), [":1", "--max_new_tokens 64", "--truncate"]),
        "generate_max_new_tokens_1000": (generate([{"input_ids": [5]}], "--max_new_tokens", "1000"),
                                         ["--max_new_tokens 1000", f"{POSITIONS} positions"]),
        "generate_max_new_tokens_1e8": (generate([{"input_ids": [5]}], "--max_new_tokens", "100000000"),
                                        ["--max_new_tokens 100000000"]),
        "generate_t5_max_new_tokens_1e8": (["generate", "--model", str(d / "t5"), "--input",
                                            _jsonl(d / "t5_in.jsonl", [{"input_ids": [5, 6]}]), "--output",
                                            str(d / "t5_gen.jsonl"), "--max_new_tokens", "100000000"],
                                           ["--max_new_tokens 100000000", "KV cache"]),
        "generate_max_new_tokens_zero": (generate([{"input_ids": [5]}], "--max_new_tokens", "0"),
                                         ["--max_new_tokens", "positive"]),
        "generate_truncate_bad_side": (generate([{"input_ids": [5]}], "--truncate", "middle"),
                                       ["--truncate", "invalid choice"]),
        # -------- flags, outputs
        "score_batch_size_zero": (score([ok], "--batch_size", "0"), ["--batch_size", "positive"]),
        "score_batch_size_not_int": (score([ok], "--batch_size", "abc"), ["--batch_size", "invalid int"]),
        "score_unknown_flag": (score([ok], "--temperature", "2"), ["unrecognized arguments", "--temperature"]),
        "score_missing_model": (["score", "--model", str(d / "no_model"), "--input", _jsonl(d / "okin.jsonl", [ok]),
                                 "--output", str(d / "o.jsonl")], ["no_model"]),
        "score_output_is_dir": (["score", "--model", model, "--input", str(d / "okin.jsonl"), "--output", str(d)],
                                ["--output", "is a directory"]),
        "score_output_under_file": (["score", "--model", model, "--input", str(d / "okin.jsonl"), "--output",
                                     str(a_file / "o.jsonl")], ["--output", "a_file", "is a file"]),
        "unknown_command": (["bogus"], ["invalid choice", "'bogus'"]),
        # -------- metrics
        "metrics_prediction_not_string": (metrics([pred, {**pred, "prediction": 3}]), [":2", "'prediction'"]),
        "metrics_empty_references": (metrics([{**pred, "references": []}]), [":1", "'references'"]),
        "metrics_no_task": (metrics([{"prediction": "a", "references": ["a"]}]), [":1", "'task'"]),
        "metrics_category_not_string": (metrics([{**pred, "category": 1}]), [":1", "'category'"]),
        "metrics_no_lines": (["metrics", "--input", _jsonl(d / "empty.jsonl", [])], ["empty.jsonl", "no prediction lines"]),
        "metrics_bad_track": (["metrics", "--input", str(d / "empty.jsonl"), "--track", "klingon"], ["--track"]),
        # -------- gin
        "gin_num_steps_string": (train("--gin.train.num_steps='ten'"), ["train.num_steps = 'ten'", "expected int"]),
        "gin_hidden_size_string": (train("--gin.LlamaConfig.hidden_size='big'"),
                                   ["LlamaConfig.hidden_size = 'big'", "expected int"]),
        "gin_log_every_bool": (train("--gin.train.log_every=True"), ["train.log_every = True", "expected int"]),
        "gin_learning_rate_macro_string": (train("--gin_bindings", "LEARNING_RATE = 'fast'"),
                                     ["make_optimizer.learning_rate = 'fast'", "expected"]),
        "gin_unknown_parameter": (train("--gin.train.num_step=3"), ["train.num_step"]),
        "gin_unknown_configurable": (train("--gin.Trainr.num_steps=3"), ["Trainr"]),
        "gin_missing_file": (["train", "--gin_file", "nope.gin", "--workdir", str(d / "run")], ["--gin_file nope.gin"]),
        "gin_bad_override_syntax": (train("--gin.train.num_steps"), ["--gin.train.num_steps", "KEY=value"]),
        "gin_nan_policy_inside_train": (train("--gin.train.nan_policy='maybe'", workdir=str(d / "run_nan")),
                                        ["train.nan_policy='maybe'"]),
        # -------- workdirs
        "train_workdir_is_file": (train(workdir=str(a_file)), ["--workdir", "a_file", "is a file"]),
        "train_workdir_under_file": (train(workdir=str(a_file / "run")), ["--workdir", "lies under", "a_file"]),
        "eval_workdir_is_file": (["eval", "--gin_file", "jaxlm/configs/tests/tiny_eval.gin", "--workdir", str(a_file)],
                                 ["--workdir", "is a file"]),
        "demo_workdir_is_file": (["demo", "--workdir", str(a_file)], ["--workdir", "is a file"]),
        "demo_workdir_under_file": (["demo", "--workdir", str(a_file / "x")], ["--workdir", "lies under"]),
        "demo_unknown_stage": (["demo", "--workdir", str(d / "demo"), "--stages", "rules,bogus"], ["--stages", "bogus"]),
        "export_output_is_file": (["export", "--workdir", str(d / "run"), "--output", str(a_file)],
                                  ["--output", "is a file"]),
        # -------- adapter
        "adapter_empty_instruction": (["adapter", "--hypernet", str(fake_hypernet), "--instruction", "", "--output",
                                       str(d / "adapter")], ["--instruction", "empty"]),
        "adapter_blank_instruction": (["adapter", "--hypernet", str(fake_hypernet), "--instruction", "  \n ",
                                       "--output", str(d / "adapter")], ["--instruction", "empty"]),
        "adapter_output_is_file": (["adapter", "--hypernet", str(fake_hypernet), "--instruction", "x", "--output",
                                    str(a_file)], ["--output", "is a file"]),
        "adapter_output_under_file": (["adapter", "--hypernet", str(fake_hypernet), "--instruction", "x", "--output",
                                       str(a_file / "adapter")], ["--output", "lies under"]),
        "adapter_not_a_hypernet": (["adapter", "--hypernet", str(fake_hypernet), "--instruction", "x", "--output",
                                    str(d / "adapter")], ["hypernet_run", "hypernet.json"]),
        # -------- other commands
        "align_output_dir_is_file": (["align-encoder", "--data_dir", str(d), "--output_dir", str(a_file)],
                                     ["--output_dir", "is a file"]),
        "align_output_dir_under_file": (["align-encoder", "--data_dir", str(d), "--output_dir", str(a_file / "enc")],
                                        ["--output_dir", "lies under"]),
        "train_without_gin_file": (["train", "--workdir", str(d / "run")], ["--gin_file"]),
        "eval_without_gin_file": (["eval", "--workdir", str(d / "sweep")], ["--gin_file"]),
        "gin_search_path_missing": (train("--gin_search_paths", str(d / "no_dir")), ["--gin_search_paths", "no_dir"]),
        # -------- eval sweep
        "eval_unknown_task_beside_real": (["eval", "--gin_file", "jaxlm/configs/tests/tiny_eval.gin", "--workdir",
                                           str(d / "sweep"), "--gin.eval_sweep.tasks=[@bbh/TaskSet()]",
                                           "--gin.bbh/TaskSet.names=('sports_understanding', "
                                           "'no_such_task')"], ["bbh", "no_such_task", "do not exist"]),
    }


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    d = tmp_path_factory.mktemp("bad_inputs")
    model = str(tiny_llama_dir(d / "llama"))
    tiny_t5_dir(d / "t5", "v1_1")  # no position limit: --max_new_tokens is bounded by the cache's memory
    cases = _cases(d, model)
    with ThreadPoolExecutor(max_workers=2) as pool:
        done = dict(zip(cases, pool.map(lambda argv: run_cli(argv), [argv for argv, _ in cases.values()])))
    return {name: (cases[name][1], done[name]) for name in cases}


def _case_names() -> list[str]:
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        return list(_cases(Path(tmp), "MODEL"))


@pytest.mark.parametrize("case", _case_names())
def test_bad_input_is_one_line_error(results, case):
    expected, proc = results[case]
    lines = proc.stderr.strip().splitlines()
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert proc.returncode == 2, (proc.returncode, proc.stderr[-2000:])
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("jaxlm: error: "), lines[0]
    for part in expected:
        assert part in lines[0], (part, lines[0])


def test_at_least_forty_cases():
    assert len(_case_names()) >= 40
