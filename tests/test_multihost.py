"""Multi-process training: 2 processes x 4 CPU devices (gloo) train exactly like 1 process x 8 devices,
and their checkpoint (written by both processes) resumes on a single process."""

import json
import os
import subprocess
import sys
from pathlib import Path

import gin
import jax
import numpy as np
import pytest

from jaxlm.checkpoints.train_state import TrainCheckpointer
from jaxlm.errors import UsageError
from jaxlm.experiment.gin_config import parse_config
from jaxlm.distributed import data_shard, detect_cluster, global_batch, initialize_distributed

REPO = Path(__file__).resolve().parents[1]
TINY = "jaxlm/configs/tests/tiny_lm.gin"
MESH = "data=2,fsdp=4"  # fsdp spans both processes: every step all-gathers params across them
BINDINGS = [f"train.mesh_shape = '{MESH}'", "train.log_every = 1", "train.num_steps = 4"]


def losses_in(workdir: Path) -> dict[int, float]:
    lines = (workdir / "metrics.jsonl").read_text().splitlines()
    return {r["step"]: r["loss"] for r in map(json.loads, lines)}


@pytest.mark.slow
def test_two_processes_match_one_process_and_checkpoint_together(tmp_path):
    multi = tmp_path / "two_procs"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    cmd = [sys.executable, "tpu_gpu_launch/local_multiprocess.py", "--num_processes", "2", "--devices_per_process", "4",
           "--timeout", "400", "--", "jaxlm", "train", "--gin_file", TINY, "--workdir", str(multi),
           "--gin.train.checkpoint_every=2"] + [f"--gin_bindings={b}" for b in BINDINGS]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=450)
    assert proc.returncode == 0, proc.stderr[-4000:]
    summaries = [json.loads(line.removeprefix("[p1] ")) for line in proc.stderr.splitlines()
                 if line.removeprefix("[p1] ").startswith('{"step"')]
    assert len(summaries) == 2 and {s["step"] for s in summaries} == {4}  # both processes ran every step

    from jaxlm.train.loop import train  # the same run in this pytest process: 8 devices, one process

    parse_config([TINY], BINDINGS + ["train.checkpoint_every = None"])
    try:
        single = train(workdir=tmp_path / "one_proc", progress=False)
    finally:
        gin.clear_config()
    multi_losses = losses_in(multi)
    assert sorted(multi_losses) == [1, 2, 3, 4] and single["losses"][4] < single["losses"][1]
    np.testing.assert_allclose([multi_losses[s] for s in (1, 2, 3, 4)], [single["losses"][s] for s in (1, 2, 3, 4)],
                               rtol=0, atol=1e-5)

    # the step-4 checkpoint both processes wrote (each its own shards) restores on one process
    # and holds the state the single-process run ended with
    abstract = jax.tree_util.tree_map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding),
                                      single["state"])
    with TrainCheckpointer(multi / "checkpoints") as ckpt:
        assert ckpt.all_steps() == [2, 4]
        restored, data_state, at = ckpt.restore(abstract)
    assert at == 4 and data_state["index"] == 4 and int(restored.step) == 4
    for got, want in zip(jax.tree_util.tree_leaves(restored), jax.tree_util.tree_leaves(single["state"])):
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=0, atol=1e-5)


def test_single_process_is_a_noop_and_global_batch_places_rows(monkeypatch):
    for name in ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID", "SLURM_JOB_ID", "SLURM_NTASKS",
                 "TPU_WORKER_HOSTNAMES", "OMPI_COMM_WORLD_SIZE"):
        monkeypatch.delenv(name, raising=False)
    info = initialize_distributed()
    assert (info.process_index, info.process_count, info.source) == (0, 1, "single process")
    assert data_shard() == {"shard_index": 0, "num_shards": 1}
    mesh = jax.make_mesh((2, 4), ("data", "fsdp"))
    sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(("data", "fsdp")))
    rows = {"decoder_input_tokens": np.arange(8 * 3, dtype=np.int32).reshape(8, 3)}
    batch = global_batch(rows, sharding)
    assert batch["decoder_input_tokens"].sharding == sharding
    np.testing.assert_array_equal(np.asarray(batch["decoder_input_tokens"]), rows["decoder_input_tokens"])
    assert [s.data.shape for s in batch["decoder_input_tokens"].addressable_shards] == [(1, 3)] * 8


def test_cluster_detection_and_bad_env(monkeypatch):
    monkeypatch.setenv("SLURM_JOB_ID", "17")
    monkeypatch.setenv("SLURM_NTASKS", "4")
    assert detect_cluster() == "slurm"
    monkeypatch.setenv("SLURM_NTASKS", "1")
    monkeypatch.setenv("TPU_WORKER_HOSTNAMES", "10.0.0.1,10.0.0.2")
    assert detect_cluster() == "tpu pod"
    monkeypatch.delenv("TPU_WORKER_HOSTNAMES")
    assert detect_cluster() is None
    monkeypatch.setenv("JAX_COORDINATOR_ADDRESS", "127.0.0.1:1234")
    monkeypatch.setenv("JAX_NUM_PROCESSES", "two")
    with pytest.raises(UsageError, match="JAX_NUM_PROCESSES"):
        initialize_distributed()
    monkeypatch.setenv("JAX_NUM_PROCESSES", "2")
    monkeypatch.setenv("JAX_PROCESS_ID", "5")
    with pytest.raises(UsageError, match="JAX_PROCESS_ID"):
        initialize_distributed()
