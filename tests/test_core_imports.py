"""The core (models, train, eval), the experiment layer and the commands that need no data never
import TensorFlow/seqio: only jaxlm/data may."""

import subprocess
import sys

CORE_MODULES = [
    "jaxlm.models.llama", "jaxlm.models.t5", "jaxlm.models.bert", "jaxlm.models.lora", "jaxlm.models.decoding",
    "jaxlm.train.steps", "jaxlm.train.loop", "jaxlm.train.objectives", "jaxlm.experiment.gin_config", "jaxlm.train.plan",
    "jaxlm.distributed", "jaxlm.train.embedder_tuning", "jaxlm.checkpoints.train_state",
    "jaxlm.eval.engine", "jaxlm.eval.metrics", "jaxlm.eval.methods", "jaxlm.eval.sweep", "jaxlm.eval.report",
    "jaxlm.commands.eval", "jaxlm.commands.train", "jaxlm.commands.export", "jaxlm.commands.plan",
    "jaxlm.experiment.runner", "jaxlm.experiment.export", "jaxlm.models.hypernet", "jaxlm.train.tagi", "jaxlm.checkpoints.hypernet", "jaxlm.cli",
]


def test_core_modules_and_gin_parsing_do_not_import_tensorflow():
    code = (
        "import sys, importlib\n"
        f"for m in {CORE_MODULES!r}: importlib.import_module(m)\n"
        "from jaxlm.experiment.gin_config import parse_config\n"
        "parse_config(['jaxlm/configs/smollm2_lora_superni.gin'])\n"  # names seqio data, must not load it
        "bad = sorted(m for m in sys.modules if m.split('.')[0] in ('tensorflow', 'seqio'))\n"
        "print('LOADED', bad[:5])\n"
        "sys.exit(1 if bad else 0)\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
