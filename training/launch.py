"""Start a run's DeepSpeed ranks (torchrun or the deepspeed launcher) and relay their output.

On one node the ranks rendezvous on 127.0.0.1 only; over several, at ``train.parallel.master_addr``
(``training/nodes.py``). Their log lines reach the ``skymoe.train`` logger, which
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
from dataclasses import asdict
from pathlib import Path

from skymoe.config import ParallelConfig
from skymoe.training.nodes import Launch, NodeBoard, Rendezvous, rendezvous
from skymoe.training.spec import RunSpec

log = logging.getLogger("skymoe.train")


class TrainLaunchError(RuntimeError):
    """A training run's ranks exited with an error."""

    def __init__(self, message: str, returncode: int):
        super().__init__(message)
        self.returncode = returncode


def launch(spec: RunSpec, parallel: ParallelConfig, work_dir: Path, board: NodeBoard | None = None) -> None:
    """Run ``spec`` on ``parallel.world_size`` ranks: all here, or with ``parallel.nodes > 1`` this
    machine's share as node 0 after publishing the run on ``board`` for the other nodes to join
    (``training/nodes.py``)."""
    if parallel.nodes == 1:
        run_ranks(spec, work_dir, Rendezvous(1, 0, parallel.world_size, "127.0.0.1", _free_port(),
                                             parallel.join_timeout_s), parallel.launcher)
        return
    if board is None:
        raise ValueError("a run over several nodes needs the node board to publish it on")
    record = Launch.new(asdict(spec), parallel.nodes, parallel.ranks_per_node, parallel.master_addr,
                        parallel.master_port, parallel.join_timeout_s)
    board.publish(record)
    log.info("train/%s: published on %s; waiting up to %d s for nodes 1-%d (run `skymoe train-node --node-rank <i>` "
             "with the same config on each)", spec.name, board.uri, parallel.join_timeout_s, parallel.nodes - 1)
    try:
        run_ranks(spec, work_dir, rendezvous(record, 0))
    except BaseException as err:
        board.close(record, "failed")
        if isinstance(err, TrainLaunchError):
            raise TrainLaunchError(f"{err}\n(a run over {parallel.nodes} nodes fails when a node never joins or dies: "
                                   f"check `skymoe train-node` on each and that {parallel.master_addr}:"
                                   f"{parallel.master_port} is reachable from them, then rerun to resume)",
                                   err.returncode) from None
        raise
    board.close(record, "finished")


def run_ranks(spec: RunSpec, work_dir: Path, rdzv: Rendezvous, launcher: str = "torchrun") -> None:
    """This machine's ranks of ``spec``, their output relayed to the ``skymoe.train`` logger; raises
    TrainLaunchError with the tail of their output when they fail."""
    work_dir.mkdir(parents=True, exist_ok=True)
    spec_path = work_dir / f"{spec.name}.json"
    spec.write(spec_path)
    log.info("train/%s: starting %d ranks on node %d of %d (%s)", spec.name, rdzv.ranks_per_node, rdzv.node_rank,
             rdzv.nodes, launcher)
    tail: collections.deque[str] = collections.deque(maxlen=60)
    with subprocess.Popen(_command(launcher, rdzv, spec_path), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                          text=True, env=_env(rdzv.ranks_per_node), cwd=work_dir) as proc:
        try:
            for line in proc.stdout:
                line = line.rstrip()
                tail.append(line)
                (log.info if line.startswith("[rank ") else log.debug)(line)
        except BaseException:  # Ctrl-C, SIGTERM turned into an exception: the launcher stops its ranks
            proc.terminate()
            raise
    if proc.returncode != 0:
        raise TrainLaunchError(f"train/{spec.name}: ranks exited with status {proc.returncode}; last output:\n"
                               + "\n".join(tail), proc.returncode)


def _command(launcher: str, rdzv: Rendezvous, spec_path: Path) -> list[str]:
    if launcher == "deepspeed":  # one node only (config.py refuses more): its multi-node path is ssh/pdsh
        runner = shutil.which("deepspeed", path=str(Path(sys.executable).parent)) or "deepspeed"
        return [runner, "--num_nodes", "1", "--num_accelerators", str(rdzv.ranks_per_node), "--master_addr",
                rdzv.master_addr, "--master_port", str(rdzv.master_port), "--module", "skymoe.training.trainer",
                str(spec_path)]
    return [sys.executable, "-m", "torch.distributed.run", *rdzv.torchrun_args(), "-m", "skymoe.training.trainer",
            str(spec_path)]


def _env(ranks_per_node: int) -> dict[str, str]:
    env = dict(os.environ)
    env.setdefault("DS_ACCELERATOR", "cuda" if _has_cuda() else "cpu")
    env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // ranks_per_node)))
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
