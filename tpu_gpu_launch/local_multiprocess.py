#!/usr/bin/env python
"""Run a jaxlm command as N cooperating JAX processes on this machine (CPU devices, gloo collectives).

The same code path as a TPU pod or a SLURM GPU job, on a laptop: each process gets
JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES / JAX_PROCESS_ID, its own
--xla_force_host_platform_device_count fake CPU devices, and calls
`jaxlm.distributed.initialize_distributed()` before the command runs.

    python tpu_gpu_launch/local_multiprocess.py --num_processes 2 --devices_per_process 4 -- \\
        jaxlm train --gin_file jaxlm/configs/tests/tiny_lm.gin --gin.train.mesh_shape="'data=2,fsdp=4'" \\
        --gin.train.num_steps=20 --workdir /tmp/tiny_2proc

`-- jaxlm ARGS...` runs `python -m jaxlm.launch ARGS...` (initialise, then the jaxlm CLI)
in each process; `-- python script.py ARGS...` (or any other
command) runs it with the environment set, and the script calls `initialize_distributed()` itself.
Process 0's output is shown as is, the others' lines are prefixed `[pN]`. Exits with the first
non-zero status; if one process fails the others are stopped (they would wait for it forever).
"""

from __future__ import annotations

import argparse
import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def worker_env(process_id: int, num_processes: int, devices_per_process: int, port: int) -> dict[str, str]:
    env = dict(os.environ)
    flags = [f for f in env.get("XLA_FLAGS", "").split() if not f.startswith("--xla_force_host_platform_device_count")]
    env.update({
        "JAX_PLATFORMS": "cpu",
        "XLA_FLAGS": " ".join(flags + [f"--xla_force_host_platform_device_count={devices_per_process}"]),
        "JAX_COORDINATOR_ADDRESS": f"127.0.0.1:{port}",
        "JAX_NUM_PROCESSES": str(num_processes),
        "JAX_PROCESS_ID": str(process_id),
        "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH", "")])),
    })
    return env


def worker_command(command: list[str]) -> list[str]:
    if command[0] == "jaxlm":
        return [sys.executable, "-m", "jaxlm.launch", *command[1:]]
    if command[0] in ("python", "python3"):
        return [sys.executable, *command[1:]]
    return command


def _relay(stream, prefix: str, sink) -> None:
    for line in iter(stream.readline, ""):
        sink.write(prefix + line)
        sink.flush()


def launch(command: list[str], num_processes: int, devices_per_process: int, timeout: float | None = None) -> int:
    """Start the processes, relay their output, return the first non-zero exit status (or 0)."""
    port = free_port()
    procs, threads = [], []
    for pid in range(num_processes):
        proc = subprocess.Popen(worker_command(command), env=worker_env(pid, num_processes, devices_per_process, port),
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=os.getcwd())
        prefix = "" if pid == 0 else f"[p{pid}] "
        for stream, sink in ((proc.stdout, sys.stdout), (proc.stderr, sys.stderr)):
            t = threading.Thread(target=_relay, args=(stream, prefix, sink), daemon=True)
            t.start()
            threads.append(t)
        procs.append(proc)
    deadline = None if timeout is None else time.monotonic() + timeout
    status = 0
    try:
        while any(p.poll() is None for p in procs):
            failed = [p.returncode for p in procs if p.returncode not in (None, 0)]
            if failed or (deadline is not None and time.monotonic() > deadline):
                status = failed[0] if failed else 124
                break
            time.sleep(0.1)
    finally:
        for p in procs:
            if p.poll() is None:
                p.terminate()
        for p in procs:
            try:
                p.wait(timeout=10)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
        for t in threads:
            t.join(timeout=5)
    if status == 0:
        status = next((p.returncode for p in procs if p.returncode != 0), 0)
    return status


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if "--" not in argv:
        print("usage: local_multiprocess.py [--num_processes N] [--devices_per_process D] -- COMMAND ...", file=sys.stderr)
        return 2
    split = argv.index("--")
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--num_processes", type=int, default=2)
    parser.add_argument("--devices_per_process", type=int, default=4)
    parser.add_argument("--timeout", type=float, default=None, help="seconds before every process is stopped")
    args = parser.parse_args(argv[:split])
    command = argv[split + 1:]
    if not command or args.num_processes < 1 or args.devices_per_process < 1:
        parser.error("need a command after -- and positive --num_processes / --devices_per_process")
    return launch(command, args.num_processes, args.devices_per_process, args.timeout)


if __name__ == "__main__":
    sys.exit(main())
