"""Exact resume: `jaxlm train` killed with SIGKILL after a checkpoint, rerun, gives bit-identical losses."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
EXPERIMENT = "jaxlm/configs/tests/tiny_lm.gin"


def _env() -> dict:
    env = dict(os.environ)
    env.pop("XLA_FLAGS", None)  # one CPU device, as a user's run would have
    env["JAX_PLATFORMS"] = "cpu"
    return env


def _train(workdir: Path, *extra: str) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "jaxlm.cli", "train", f"--gin_file={EXPERIMENT}", "--workdir", str(workdir), *extra]
    return subprocess.Popen(cmd, cwd=REPO, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _losses(workdir: Path) -> list[tuple[int, float]]:
    lines = (workdir / "metrics.jsonl").read_text().splitlines()
    return [(r["step"], r["loss"]) for r in map(json.loads, lines)]


def _committed_steps(workdir: Path) -> list[int]:
    root = workdir / "checkpoints"
    if not root.is_dir():
        return []
    return sorted(int(p.name) for p in root.iterdir() if p.name.isdigit() and (p / "_CHECKPOINT_METADATA").is_file())


@pytest.mark.slow
def test_kill_minus_9_then_resume_reproduces_the_uninterrupted_losses_bitwise(tmp_path):
    reference_dir, killed_dir = tmp_path / "reference", tmp_path / "killed"
    reference = _train(reference_dir)
    # The victim reads batches slowly (same values), so the kill lands mid-run, after a checkpoint.
    victim = _train(killed_dir, "--gin.SyntheticBatches.delay_s=0.02")
    deadline = time.time() + 240
    while time.time() < deadline and victim.poll() is None:
        done = len((killed_dir / "metrics.jsonl").read_text().splitlines()) if (killed_dir / "metrics.jsonl").exists() else 0
        if _committed_steps(killed_dir) and done >= 70:
            break
        time.sleep(0.05)
    assert victim.poll() is None, f"training ended before the kill: {victim.communicate()[1][-2000:]}"
    os.kill(victim.pid, signal.SIGKILL)
    victim.wait()
    steps_before = [s for s, _ in _losses(killed_dir)]
    committed_at_kill = _committed_steps(killed_dir)
    assert 50 <= steps_before[-1] < 200 and committed_at_kill

    resumed = _train(killed_dir)
    _, err = resumed.communicate(timeout=240)
    assert resumed.returncode == 0, err[-3000:]
    summary = json.loads(err.strip().splitlines()[-1])
    assert summary["resumed_from"] == committed_at_kill[-1] >= 50
    _, ref_err = reference.communicate(timeout=240)
    assert reference.returncode == 0, ref_err[-3000:]

    expected, got = _losses(reference_dir), _losses(killed_dir)
    assert [s for s, _ in got] == list(range(1, 201))  # no duplicated or missing steps after the resume
    assert got == expected  # bitwise: floats round-trip exactly through JSON
    assert expected[-1][1] < expected[0][1] - 2.0  # and the run really learned
