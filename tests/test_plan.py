"""`jaxlm plan`: abstract compile of a gin run for a mesh, per-device memory, FLOPs, HBM fit."""

import os
import subprocess
import sys
from pathlib import Path

import gin
import pytest

from jaxlm.cli import main
from jaxlm.errors import ConfigError
from jaxlm.experiment.gin_config import parse_config
from jaxlm.train.plan import GIB, abstract_batch, plan_run

REPO = Path(__file__).resolve().parents[1]
TINY = "jaxlm/configs/tests/tiny_lm.gin"


@pytest.fixture(scope="module")
def tiny_report():
    parse_config([TINY])
    try:
        return plan_run("data=2,fsdp=4", "cpu", hbm_gib=1.0)
    finally:
        gin.clear_config()


def test_tiny_plan_numbers(tiny_report):
    r = tiny_report
    assert r.num_devices == 8 and r.mesh == {"data": 2, "fsdp": 4, "tensor": 1}
    assert r.batch_shapes["decoder_input_tokens"] == [8, 16]  # SyntheticBatches of tiny_lm.gin
    # every param is a function of the LlamaConfig in tiny_llama.gin: embed/lm_head 64x32, per layer
    # q,o 32x32, k,v 32x16 (2 kv heads of 8), gate/up/down 3 x 32x64, two norms; final norm
    per_layer = 2 * 32 * 32 + 2 * 32 * 16 + 3 * 32 * 64 + 2 * 32
    assert r.param_count == 2 * 64 * 32 + 2 * per_layer + 32
    total_bytes = 4 * r.param_count
    # every param (norm scales too) has an `embed` axis of 32, split over fsdp=4; data=2 replicates
    assert r.param_bytes == total_bytes // 4
    assert r.optimizer_bytes >= 2 * r.param_bytes  # Adam: two moments in the params' sharding
    assert r.argument_bytes >= r.param_bytes + r.optimizer_bytes
    assert r.alias_bytes > 0 and r.output_bytes > 0 and r.temp_bytes > 0  # state donated, activations
    assert r.dense_flops_estimate == 6 * r.param_count * 8 * 16  # 6 N D, D = 8 rows x 16 tokens
    assert 0.8 < r.flops_per_device * 8 / r.dense_flops_estimate < 1.5  # + attention, softmax, Adam
    assert r.fits and "FITS in 1 GiB HBM" in r.format()


def test_param_dtype_binding_is_planned(tiny_report):
    """train.param_dtype (what `jaxlm train --param_dtype` binds) sizes the params: bf16 halves them."""
    parse_config([TINY], ["train.param_dtype = 'bfloat16'"])
    try:
        r = plan_run("data=2,fsdp=4", "cpu", hbm_gib=1.0)
    finally:
        gin.clear_config()
    assert r.param_count == tiny_report.param_count
    assert r.param_bytes == 2 * r.param_count // 4 == tiny_report.param_bytes // 2


def test_plan_param_dtype_flag(capsys):
    """`jaxlm plan --param_dtype` binds train.param_dtype: the printed per-device params halve in bf16."""
    sizes = {}
    for dtype in ("float32", "bfloat16"):
        assert main(["plan", "--gin_file", TINY, "--mesh", "data=2,fsdp=4", "--param_dtype", dtype]) == 0
        line = next(l for l in capsys.readouterr().out.splitlines() if l.strip().startswith("trainable params  "))
        sizes[dtype] = line.split()[-2:]
    assert sizes["float32"][1] == sizes["bfloat16"][1]  # same unit
    assert float(sizes["float32"][0]) == pytest.approx(2 * float(sizes["bfloat16"][0]), rel=1e-3)  # 3 decimals printed
    assert main(["plan", "--gin_file", TINY, "--param_dtype", "int4"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "argument --param_dtype: invalid choice: 'int4'" in err[0], err


def test_hbm_verdict_and_default(tiny_report):
    r = tiny_report
    small = type(r)(**{**r.__dict__, "hbm_gib": r.peak_bytes / GIB / 2})
    assert not small.fits and "DOES NOT FIT in" in small.format()


def test_cli_plans_a_mesh_bigger_than_this_process_in_a_subprocess(tmp_path):
    """16 devices > the 8 this test process has: the plan runs in a child with 16 fake CPU devices."""
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.run(
        [sys.executable, "-m", "jaxlm.cli", "plan", "--gin_file", TINY, "--mesh", "data=2,fsdp=8",
         "--platform", "tpu", "--gin.BATCH_SIZE=16"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = proc.stdout
    assert "plan for TPU, mesh data=2,fsdp=8,tensor=1 (16 devices)" in out
    assert "16 fake devices" in out  # says which platform the numbers are really for
    assert "FITS in 16 GiB HBM" in out  # the TPU v5e default
    assert "decoder_input_tokens(16, 16)" in out


def test_bad_inputs_name_the_flag_or_binding(capsys):
    assert main(["plan", "--gin_file", TINY, "--gin.train.num_stepz=3"]) == 2
    assert "train.num_stepz" in capsys.readouterr().err
    assert main(["plan", "--gin_file", TINY, "--mesh", "data=-1,fsdp=3"]) == 2
    assert "--mesh 'data=-1,fsdp=3'" in capsys.readouterr().err
    assert main(["plan", "--gin_file", TINY, "--hbm_gib", "-1"]) == 2
    assert "--hbm_gib" in capsys.readouterr().err
    assert main(["plan"]) == 2
    assert "--gin_file" in capsys.readouterr().err
    with pytest.raises(ConfigError, match="train.data"):
        abstract_batch(None)
    gin.clear_config()
