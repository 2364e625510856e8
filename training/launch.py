"""Start a run's DeepSpeed ranks (torchrun or the deepspeed launcher) and relay their output.

The ranks rendezvous on 127.0.0.1 only. Their log lines reach the ``skymoe.train`` logger, which
the Prefect flow forwards to the run's logs; the tail of everything they printed is kept for the
error message when a rank fails.
"""

from __future__ import annotations

import collections
import logging
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

from skymoe.config import ParallelConfig
from skymoe.training.spec import RunSpec

log = logging.getLogger("skymoe.train")


class TrainLaunchError(RuntimeError):
    """A training run's ranks exited with an error."""


def launch(spec: RunSpec, parallel: ParallelConfig, work_dir: Path) -> None:
    work_dir.mkdir(parents=True, exist_ok=True)
    spec_path = work_dir / f"{spec.name}.json"
    spec.write(spec_path)
    command = _command(parallel, spec_path)
    log.info("train/%s: starting %d ranks (%s, ep_size %d)", spec.name, parallel.world_size, parallel.launcher,
             parallel.ep_size)
    tail: collections.deque[str] = collections.deque(maxlen=60)
    with subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=_env(parallel),
                          cwd=work_dir) as proc:
        for line in proc.stdout:
            line = line.rstrip()
            tail.append(line)
            (log.info if line.startswith("[rank ") else log.debug)(line)
    if proc.returncode != 0:
        raise TrainLaunchError(f"train/{spec.name}: ranks exited with status {proc.returncode}; last output:\n"
                               + "\n".join(tail))


def _command(parallel: ParallelConfig, spec_path: Path) -> list[str]:
    port = str(_free_port())
    if parallel.launcher == "deepspeed":
        runner = shutil.which("deepspeed", path=str(Path(sys.executable).parent)) or "deepspeed"
        return [runner, "--num_nodes", "1", "--num_accelerators", str(parallel.world_size), "--master_addr",
                "127.0.0.1", "--master_port", port, "--module", "skymoe.training.trainer", str(spec_path)]
    return [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc_per_node",
            str(parallel.world_size), "--master_addr", "127.0.0.1", "--master_port", port,
            "-m", "skymoe.training.trainer", str(spec_path)]


def _env(parallel: ParallelConfig) -> dict[str, str]:
    env = dict(os.environ)
    env.setdefault("DS_ACCELERATOR", "cuda" if _has_cuda() else "cpu")
    env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // parallel.world_size)))
    env["PYTHONUNBUFFERED"] = "1"
    # Project modules must import in the ranks even when skymoe runs from a source checkout.
    root = str(Path(__file__).resolve().parent.parent)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [root, env.get("PYTHONPATH")]))
    return env


def _has_cuda() -> bool:
    """The ranks' own test (trainer.py), so launcher and ranks never disagree."""
    import torch

    return torch.cuda.is_available()


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]
