"""TensorFlow in its corner: the seqio data path imports TF quietly and hides accelerators from it."""

import os
import subprocess
import sys

CODE = (
    "import os, sys\n"
    "import jaxlm.data.mixtures\n"  # imports seqio (and TensorFlow) at module level
    "from jaxlm.data.tf_corner import import_tensorflow\n"
    "tf = import_tensorflow()\n"
    "kinds = sorted({d.device_type for d in tf.config.get_visible_devices()})\n"
    "print('KINDS', kinds, os.environ['TF_CPP_MIN_LOG_LEVEL'])\n"
    "print('AFTER', file=sys.stderr)\n"  # stderr works again after the import
)


def _run(env_extra):
    env = {k: v for k, v in os.environ.items() if k != "TF_CPP_MIN_LOG_LEVEL"}
    env.update(env_extra)
    return subprocess.run([sys.executable, "-c", CODE], capture_output=True, text=True, timeout=300, env=env)


def test_tensorflow_import_is_quiet_and_cpu_only():
    proc = _run({})
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "KINDS ['CPU'] 2" in proc.stdout  # no GPU/TPU visible to TF; log level defaulted
    assert proc.stderr.strip() == "AFTER", proc.stderr[-2000:]  # no oneDNN / CUDA-driver lines


def test_log_level_zero_shows_tensorflow_logs():
    proc = _run({"TF_CPP_MIN_LOG_LEVEL": "0"})
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "KINDS ['CPU'] 0" in proc.stdout and proc.stderr.strip() != "AFTER"  # TF's own lines shown
