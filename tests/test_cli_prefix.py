"""CLI: the prefix cache is on by default and `--no_prefix_cache` gives the same numbers; sampling flags;
the persistent compilation cache writes its entries where it is told."""

import json
import os
import subprocess
import sys

import pytest

from jaxlm.cli import main
from tests.hf_tiny import tiny_llama_dir

HEAD = list(range(3, 40))  # 37 shared tokens
ROWS = [{"input_ids": HEAD + [50 + i, 60 + i], "target_ids": [70 + i, 71]} for i in range(5)] + [
    {"input_ids": [5, 6, 7], "target_ids": [9]}
]


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return tiny_llama_dir(tmp_path_factory.mktemp("cli_prefix_llama"), seed=2)


def _write(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _read(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_prefix_cache_on_and_off_agree(tiny_dir, tmp_path, capsys):
    inp = _write(tmp_path / "in.jsonl", ROWS)
    outs = {}
    for flag in ([], ["--no_prefix_cache"]):
        out = tmp_path / f"score{len(flag)}.jsonl"
        assert main(["score", "--model", str(tiny_dir), "--input", str(inp), "--output", str(out),
                     "--batch_size", "4", *flag]) == 0
        outs[len(flag)] = _read(out)
    for a, b in zip(outs[0], outs[1]):
        assert a["logprob"] == pytest.approx(b["logprob"], rel=1e-5)
    gens = {}
    for flag in ([], ["--no_prefix_cache"]):
        out = tmp_path / f"gen{len(flag)}.jsonl"
        assert main(["generate", "--model", str(tiny_dir), "--input", str(inp), "--output", str(out),
                     "--batch_size", "4", "--max_new_tokens", "4", *flag]) == 0
        gens[len(flag)] = [o["output_ids"] for o in _read(out)]
    assert gens[0] == gens[1]


def test_sampling_flags(tiny_dir, tmp_path, capsys):
    inp = _write(tmp_path / "in.jsonl", [{"input_ids": r["input_ids"]} for r in ROWS])
    runs = []
    for seed in ("1", "1", "2"):
        out = tmp_path / f"s{len(runs)}.jsonl"
        assert main(["generate", "--model", str(tiny_dir), "--input", str(inp), "--output", str(out),
                     "--batch_size", "4", "--max_new_tokens", "6", "--temperature", "2.0", "--seed", seed]) == 0
        runs.append([o["output_ids"] for o in _read(out)])
    assert runs[0] == runs[1] and runs[0] != runs[2]
    assert main(["generate", "--model", str(tiny_dir), "--input", str(inp), "--output", str(tmp_path / "x.jsonl"),
                 "--temperature", "1", "--top_p", "1.5"]) == 2
    assert "jaxlm: error: --temperature/--top_k/--top_p: top_p must lie in (0, 1]" in capsys.readouterr().err


def test_compilation_cache_is_written_to_the_given_directory(tiny_dir, tmp_path):
    inp = _write(tmp_path / "in.jsonl", ROWS[:2])
    cache = tmp_path / "xla_cache"
    env = {k: v for k, v in os.environ.items() if k not in ("JAXLM_COMPILATION_CACHE", "JAX_COMPILATION_CACHE_DIR")}
    cmd = [sys.executable, "-m", "jaxlm.cli", "--compilation_cache_dir", str(cache), "score", "--model", str(tiny_dir),
           "--input", str(inp), "--output", str(tmp_path / "o.jsonl"), "--no_prefix_cache"]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    assert proc.returncode == 0, proc.stderr
    assert any(cache.iterdir())  # the compiled scorer was persisted
    off = subprocess.run([*cmd[:3], "--no_compilation_cache", *cmd[5:-2], str(tmp_path / "p.jsonl")],
                         capture_output=True, text=True, env={**env, "XDG_CACHE_HOME": str(tmp_path / "home")})
    assert off.returncode == 0, off.stderr
    assert not (tmp_path / "home").exists()
