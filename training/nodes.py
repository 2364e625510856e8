"""Training across machines: the head publishes each run on a board in storage, the other nodes join.

The pipeline runs on one machine, the head (node 0): it plans, cleans, tokenizes and, for each
training run, starts its own ranks. With ``train.parallel.nodes > 1`` every other machine runs
``skymoe train-node --node-rank i`` (``serve_node`` here), which watches the board under the storage
root every node shares and starts its ranks for each run the head publishes. All nodes' ranks
meet at torchrun's static rendezvous on ``master_addr:master_port`` (node 0 hosts it), so rank
``node_rank * ranks_per_node + local_rank`` is the same rank on every attempt, and a run resumed
after a node died sees the same expert placement and data slices as before.

A node that dies takes the run down with it (the survivors' collectives fail), the head's stage
then fails naming the run, and rerunning the same command resumes from the newest checkpoint once
the node's ``train-node`` is back. The board is plain JSON: ``launch.json`` (the current run and its
state) and ``<launch id>/node-<i>.json`` (how each node's ranks ended).
"""

from __future__ import annotations

import json
import logging
import tempfile
import time
import uuid
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

from skymoe.config import ConfigError
from skymoe.storage import Storage, join

log = logging.getLogger("skymoe.train")

BOARD = "_nodes"
LAUNCH_FILE = "launch.json"
State = Literal["running", "finished", "failed"]


@dataclass(frozen=True)
class Launch:
    """One run's rendezvous, as the head publishes it: the spec every rank reads, and where to meet."""

    id: str
    spec: dict[str, Any]  # RunSpec as JSON
    nodes: int
    ranks_per_node: int
    master_addr: str
    master_port: int
    join_timeout_s: int
    state: State = "running"

    @classmethod
    def new(cls, spec: dict[str, Any], nodes: int, ranks_per_node: int, master_addr: str, master_port: int,
            join_timeout_s: int) -> "Launch":
        return cls(f"{spec['name']}-{uuid.uuid4().hex[:12]}", spec, nodes, ranks_per_node, master_addr, master_port,
                   join_timeout_s)


class NodeBoard:
    """The launch board under ``<root>/_nodes``: written by the head, read by the other nodes."""

    def __init__(self, storage: Storage, root: str):
        self.storage = storage
        self.uri = join(root, BOARD)

    def publish(self, launch: Launch) -> None:
        self.storage.write_text(join(self.uri, LAUNCH_FILE), json.dumps(asdict(launch), indent=1))

    def close(self, launch: Launch, state: State) -> None:
        """Mark the run ended so a node that starts later does not join a rendezvous nobody hosts."""
        self.publish(Launch(**{**asdict(launch), "state": state}))

    def current(self) -> Launch | None:
        """The latest published run; None before the first, or while the file is being replaced."""
        uri = join(self.uri, LAUNCH_FILE)
        try:
            return Launch(**json.loads(self.storage.read_text(uri)))
        except (FileNotFoundError, json.JSONDecodeError, TypeError):
            return None

    def report(self, launch: Launch, node_rank: int, returncode: int) -> None:
        self.storage.write_text(join(self.uri, launch.id, f"node-{node_rank}.json"),
                                json.dumps({"node_rank": node_rank, "returncode": returncode}))


def serve_node(storage: Storage, root: str, node_rank: int, poll_s: float = 1.0, runs: int | None = None) -> int:
    """Join every run the head publishes under ``root`` as node ``node_rank``, one after another,
    until stopped (Ctrl-C, SIGTERM) or after ``runs`` runs; returns how many were joined. A run
    whose ranks fail here is reported on the board and the node waits for the next one: the head
    decides whether the stage failed, and its rerun publishes a new launch."""
    from skymoe.training.launch import TrainLaunchError, run_ranks
    from skymoe.training.spec import RunSpec

    if node_rank < 1:
        raise ConfigError(f"--node-rank must be >= 1 (node 0 is the head, which runs the pipeline), got {node_rank}")
    board, joined, seen = NodeBoard(storage, root), 0, set()
    log.info("train-node %d: watching %s for runs", node_rank, board.uri)
    while runs is None or joined < runs:
        launch = board.current()
        if launch is None or launch.state != "running" or launch.id in seen:
            time.sleep(poll_s)
            continue
        seen.add(launch.id)
        if node_rank >= launch.nodes:
            log.warning("train-node %d: run %s has %d nodes; not joining", node_rank, launch.id, launch.nodes)
            continue
        with tempfile.TemporaryDirectory(prefix="skymoe-node-") as work:
            spec = RunSpec.from_dict(launch.spec)
            log.info("train-node %d: joining %s (%d nodes x %d ranks, rendezvous %s:%d)", node_rank, launch.id,
                     launch.nodes, launch.ranks_per_node, launch.master_addr, launch.master_port)
            try:
                run_ranks(spec, Path(work), rendezvous(launch, node_rank))
                returncode = 0
            except TrainLaunchError as err:
                returncode = err.returncode
                log.warning("train-node %d: ranks of %s exited with status %d; waiting for the next run",
                            node_rank, launch.id, returncode)
        board.report(launch, node_rank, returncode)
        joined += 1
    return joined


@dataclass(frozen=True)
class Rendezvous:
    """Where this node's ranks meet the others: torchrun's static rendezvous arguments."""

    nodes: int
    node_rank: int
    ranks_per_node: int
    master_addr: str
    master_port: int
    join_timeout_s: int

    def torchrun_args(self) -> list[str]:
        return ["--nnodes", str(self.nodes), "--node_rank", str(self.node_rank), "--nproc_per_node",
                str(self.ranks_per_node), "--master_addr", self.master_addr, "--master_port", str(self.master_port),
                "--rdzv-conf", f"timeout={self.join_timeout_s}"]


def rendezvous(launch: Launch, node_rank: int) -> Rendezvous:
    return Rendezvous(launch.nodes, node_rank, launch.ranks_per_node, launch.master_addr, launch.master_port,
                      launch.join_timeout_s)
