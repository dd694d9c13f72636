"""Four LoRA teachers (one per synthetic task) trained in ONE run beat the base on their own task,
are exported as PEFT adapter dirs with a teachers.json index, and reload to the same numbers."""

import json

import gin
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxlm.experiment.gin_config import parse_config
from jaxlm.train.loop import train
from jaxlm.checkpoints.teachers import load_teachers
from jaxlm.train.synthetic import SyntheticBatches


@pytest.fixture(scope="module")
def teachers_run(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("teachers")
    parse_config(["jaxlm/configs/tests/tiny_teachers.gin"], ["train.checkpoint_every = None", "train.log_every = 10"])
    try:
        summary = train(workdir=workdir)
        objective = gin.query_parameter("train.objective").scoped_configurable_fn()
    finally:
        gin.clear_config()
    return workdir, summary, objective


def per_task_batches(num_tasks=4, rows=16):
    """Held-out batches (an index the run never drew) of the same task maps, `rows` rows per task."""
    stream = SyntheticBatches(batch_size=256, seq_len=16, vocab_size=64, num_tasks=num_tasks, seed=0)
    batch = stream.global_batch(10_000)
    return [{k: jnp.asarray(v[batch["task_index"] == t][:rows]) for k, v in batch.items()} for t in range(num_tasks)]


def test_each_teacher_beats_the_base_on_its_own_task(teachers_run):
    _, summary, objective = teachers_run
    teachers, base = summary["state"].params, summary["frozen"]
    untrained = jax.tree_util.tree_map(jnp.zeros_like, teachers)  # B = 0: exactly the base model
    loss = jax.jit(lambda t, b: objective.loss(t, base, b, None)[0])
    for task, batch in enumerate(per_task_batches()):
        own = float(loss(teachers, batch))
        base_loss = float(loss(untrained, batch))
        other = float(loss(teachers, {**batch, "task_index": (batch["task_index"] + 1) % 4}))
        assert own < base_loss - 1.0, (task, own, base_loss)
        print(f"task {task}: teacher {own:.3f}, base {base_loss:.3f}, other teacher {other:.3f}")
        assert own < other, (task, own, other)  # the adapter learned its task, not the mixture


def test_teachers_reload_from_their_peft_dirs(teachers_run):
    workdir, summary, objective = teachers_run
    index = json.loads((workdir / "teachers" / "teachers.json").read_text())
    assert [t["task"] for t in index["teachers"]] == ["task_0", "task_1", "task_2", "task_3"]
    config = json.loads((workdir / "teachers" / "task_2" / "adapter_config.json").read_text())
    assert config["r"] == 8 and "lm_head" in config["target_modules"]
    names, reloaded = load_teachers(workdir / "teachers", objective.export_target(summary["frozen"]))
    assert names == ["task_0", "task_1", "task_2", "task_3"] and reloaded.rank == 8
    jax.tree_util.tree_map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)),
                           reloaded.params, jax.device_get(summary["state"].params))
    batch = per_task_batches()[1]
    loss = jax.jit(lambda t: objective.loss(t, summary["frozen"], batch, None)[0])
    assert float(loss(reloaded.params)) == float(loss(jax.device_get(summary["state"].params)))
