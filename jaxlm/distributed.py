"""Multi-process (multi-host) JAX: start the distributed runtime and build global batches.

One process runs per host (TPU VM worker, SLURM task, or a local CPU process from
`tpu_gpu_launch/local_multiprocess.py`); each sees only its local devices, reads only its own rows
of every global batch (`BatchIterator(shard_index=process_index, num_shards=process_count)`), and
`global_batch` stitches the rows into one sharded `jax.Array`. The jitted train step is the same
program as on one host: XLA inserts the cross-host collectives.

Where the coordinates come from, first match wins:
  1. explicit arguments to `initialize_distributed` (or `jaxlm train` flags that pass them);
  2. env `JAX_COORDINATOR_ADDRESS` + `JAX_NUM_PROCESSES` + `JAX_PROCESS_ID` (the local launcher,
     or any launcher that sets them);
  3. a cluster JAX detects itself: SLURM (`srun`, SLURM_NTASKS > 1), Cloud TPU pod slices
     (several TPU_WORKER_HOSTNAMES), Open MPI, Kubernetes JobSets;
  4. none of these: a single process, nothing to initialise.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from typing import Any, Mapping, Sequence

import jax
import numpy as np
from jax.sharding import Sharding

from jaxlm.errors import UsageError

log = logging.getLogger(__name__)

ENV_COORDINATOR, ENV_NUM_PROCESSES, ENV_PROCESS_ID = "JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID"
ENV_LOCAL_DEVICE_IDS = "JAX_LOCAL_DEVICE_IDS"
CPU_COLLECTIVES = "gloo"  # jax 0.10's CPU cross-process collectives (TCP); "mpi" needs an MPI install


@dataclasses.dataclass(frozen=True)
class DistributedInfo:
    process_index: int
    process_count: int
    source: str  # "single process", "arguments", "environment", "auto-detected cluster"


def detect_cluster() -> str | None:
    """Name of a multi-process cluster environment JAX can auto-configure from, or None."""
    if int(os.environ.get("SLURM_NTASKS", os.environ.get("SLURM_STEP_NUM_TASKS", "1")) or 1) > 1 and "SLURM_JOB_ID" in os.environ:
        return "slurm"
    hosts = [h for h in os.environ.get("TPU_WORKER_HOSTNAMES", "").split(",") if h]
    if len(hosts) > 1:
        return "tpu pod"
    if int(os.environ.get("OMPI_COMM_WORLD_SIZE", "1")) > 1:
        return "open mpi"
    return None


def _int_env(name: str) -> int | None:
    value = os.environ.get(name)
    if value in (None, ""):
        return None
    try:
        return int(value)
    except ValueError:
        raise UsageError(f"environment variable {name}={value!r}: expected an integer") from None


def initialize_distributed(
    coordinator_address: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
    local_device_ids: Sequence[int] | None = None,
    *,
    initialization_timeout: int = 300,
) -> DistributedInfo:
    """Start `jax.distributed` when this is one process of several; a no-op for a single process.

    Call before any other JAX call (it must precede backend start). Safe to call twice."""
    if jax.distributed.is_initialized():
        return DistributedInfo(jax.process_index(), jax.process_count(), "already initialized")
    explicit = any(v is not None for v in (coordinator_address, num_processes, process_id))
    if not explicit and os.environ.get(ENV_COORDINATOR) and _int_env(ENV_NUM_PROCESSES):
        coordinator_address = os.environ[ENV_COORDINATOR]
        num_processes, process_id = _int_env(ENV_NUM_PROCESSES), _int_env(ENV_PROCESS_ID)
        if local_device_ids is None and os.environ.get(ENV_LOCAL_DEVICE_IDS):
            local_device_ids = [int(i) for i in os.environ[ENV_LOCAL_DEVICE_IDS].split(",")]
        source = "environment"
    elif explicit:
        source = "arguments"
    else:
        cluster = detect_cluster()
        if cluster is None:
            return DistributedInfo(0, 1, "single process")
        log.info("initializing jax.distributed from the %s environment", cluster)
        jax.distributed.initialize(initialization_timeout=initialization_timeout)
        return DistributedInfo(jax.process_index(), jax.process_count(), f"auto-detected {cluster}")
    if coordinator_address is None or num_processes is None or process_id is None:
        raise UsageError(
            f"multi-process run needs all of coordinator address ({ENV_COORDINATOR}), number of processes "
            f"({ENV_NUM_PROCESSES}) and process id ({ENV_PROCESS_ID}); got {coordinator_address!r}, "
            f"{num_processes!r}, {process_id!r}"
        )
    if not 0 <= process_id < num_processes:
        raise UsageError(f"process id {process_id} ({ENV_PROCESS_ID}) must be in [0, {num_processes})")
    if num_processes == 1:
        return DistributedInfo(0, 1, "single process")
    # cross-process collectives of the CPU backend (the only ones a CPU-only run has; harmless on TPU/GPU)
    jax.config.update("jax_cpu_collectives_implementation", CPU_COLLECTIVES)
    jax.distributed.initialize(
        coordinator_address=coordinator_address, num_processes=num_processes, process_id=process_id,
        local_device_ids=local_device_ids, initialization_timeout=initialization_timeout,
    )
    log.info("process %d of %d (%d local devices, %d global)", jax.process_index(), jax.process_count(),
             jax.local_device_count(), jax.device_count())
    return DistributedInfo(jax.process_index(), jax.process_count(), source)


def global_batch(local_batch: Mapping[str, np.ndarray], sharding: Sharding | Mapping[str, Sharding]) -> dict[str, jax.Array]:
    """This process's rows of each feature -> one global `jax.Array` per feature, sharded by `sharding`
    (one for all features, or one per feature name). Every process calls it with its own rows, the
    same number on each; on a single process this is a plain `device_put`."""
    out = {}
    for name, rows in local_batch.items():
        sh = sharding[name] if isinstance(sharding, Mapping) else sharding
        out[name] = jax.make_array_from_process_local_data(sh, np.asarray(rows))
    return out


def data_shard() -> dict[str, Any]:
    """The `BatchIterator` arguments that give this process its rows of the global batch."""
    return {"shard_index": jax.process_index(), "num_shards": jax.process_count()}
