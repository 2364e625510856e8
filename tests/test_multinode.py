"""Training over two "nodes" on 127.0.0.1: node 0 runs the train stage, node 1 is a real
``skymoe train-node`` process; 1 rank each, experts split across the nodes (ep_size 2, gloo).
Killing node 1 mid-run fails the stage; with node 1 back, the rerun resumes from the checkpoint
and gives the same losses as the same run on one node."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil
import pytest

from conftest import free_port
from skymoe.config import load_config
from skymoe.storage import Storage
from skymoe.training.launch import TrainLaunchError
from skymoe.training.nodes import NodeBoard
from test_train_stage import config_for, demo_tokens, metrics, plan_train, resume_tokens, run_train  # noqa: F401

REPO = Path(__file__).resolve().parent.parent
TRAIN = {"dense": {"steps": 4, "warmup_steps": 1}, "upcycled": {"steps": 16, "lr": 2e-3, "warmup_steps": 2},
         "checkpoint_every": 8, "eval_every": 100, "seed": 7}


def _start_node(root: Path, log: Path) -> subprocess.Popen:
    """``skymoe train-node --node-rank 1`` in its own process group, so the test can kill it whole."""
    return subprocess.Popen([sys.executable, "-m", "skymoe.flows.cli", "train-node", "--node-rank", "1",
                             "--root", str(root)], cwd=REPO, stdout=subprocess.DEVNULL,
                            stderr=log.open("ab"), start_new_session=True)


def _stop(node: subprocess.Popen) -> None:
    """kill -9 of the whole "machine": the node process, its torchrun and the ranks, which torchrun
    starts in sessions of their own (by PID, found as the node's descendants)."""
    try:
        processes = [psutil.Process(node.pid), *psutil.Process(node.pid).children(recursive=True)]
    except psutil.NoSuchProcess:
        processes = []
    for process in processes:
        with contextlib.suppress(psutil.NoSuchProcess):
            process.send_signal(signal.SIGKILL)
    node.wait()


def _share_tokens(root: Path, tokens_ref) -> None:
    """Give another root the same tokenize output (a link), so its train stage reads the same shards."""
    (root / "tokenize").mkdir(parents=True)
    os.symlink(tokens_ref.uri, root / "tokenize" / tokens_ref.fingerprint)


def test_two_nodes_train_like_one_and_resume_after_a_node_dies(demo_tokens, tmp_path):
    _, tokens_ref = demo_tokens
    single_root, multi_root = tmp_path / "one-node", tmp_path / "two-nodes"
    for root in (single_root, multi_root):
        _share_tokens(root, tokens_ref)

    single = config_for(single_root, **TRAIN)
    storage = Storage.from_config(single.storage)
    reference = run_train(single, storage, resume_tokens(single))
    reference_losses = [row["loss"] for row in metrics(f"{reference.ref.uri}/runs/upcycled") if "loss" in row]

    parallel = {"world_size": 2, "ep_size": 2, "nodes": 2, "master_port": free_port(), "join_timeout_s": 120}
    multi = config_for(multi_root, **TRAIN, parallel=parallel)
    plan = plan_train(multi, storage, resume_tokens(multi))
    assert plan.ref.fingerprint == reference.ref.fingerprint  # where ranks run is not what they compute
    run_uri = Path(plan.ref.uri, "runs", "upcycled")
    node_log = tmp_path / "node-1.log"

    # Node 1 dies once the upcycled run's step-8 checkpoint is complete: node 0's stage fails.
    node = _start_node(multi_root, node_log)
    marker = run_uri / "checkpoints" / "step-0000008" / "COMPLETE"

    def kill_node_after_checkpoint() -> None:
        deadline = time.monotonic() + 300
        while not marker.exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        _stop(node)

    killer = threading.Thread(target=kill_node_after_checkpoint, daemon=True)
    killer.start()
    try:
        with pytest.raises(TrainLaunchError, match="upcycled"):
            run_train(multi, storage, resume_tokens(multi))
    finally:
        killer.join(timeout=330)
        _stop(node)
    assert marker.exists(), node_log.read_text()[-3000:]
    board = NodeBoard(storage, str(multi_root)).current()
    assert board.spec["name"] == "upcycled" and board.state == "failed"

    # Node 1 back, the same command on node 0: resumes at step 8 and matches the one-node run.
    node = _start_node(multi_root, node_log)
    try:
        resumed = run_train(multi, storage, resume_tokens(multi))
    finally:
        _stop(node)
    losses = [row["loss"] for row in metrics(str(run_uri)) if "loss" in row]
    assert len(losses) == len(reference_losses) == 16
    assert losses == reference_losses, node_log.read_text()[-3000:]
    assert NodeBoard(storage, str(multi_root)).current().state == "finished"
    assert resumed.manifest.counts["upcycled_steps"] == 16


def test_multi_node_settings_are_checked_before_any_work():
    def parallel(**fields):
        return load_config(None, {"train": {"parallel": fields}}).train.parallel

    assert parallel(world_size=4, ep_size=2, nodes=2, master_port=29500).ranks_per_node == 2
    for fields, message in (({"world_size": 3, "ep_size": 1, "nodes": 2, "master_port": 29500}, "must divide"),
                            ({"nodes": 2}, "master_port is required"),
                            ({"nodes": 2, "master_port": 29500, "launcher": "deepspeed"}, "use launcher: torchrun")):
        with pytest.raises(Exception, match=message):
            parallel(**fields)
