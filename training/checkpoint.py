"""Checkpoints of a run in the configured storage, resumable after a kill.

DeepSpeed writes its own checkpoint (module, ZeRO optimizer partitions, expert files) to a local
folder; a remote root gets a copy uploaded. Next to it each rank saves its RNG state (DeepSpeed
does not) and its share of the plain weights (``weights/``: what export and upcycling read).
A checkpoint exists only once rank 0 has written ``COMPLETE`` after every rank finished, so a
kill in the middle of a save leaves the previous checkpoint as the latest.

Retention (:func:`prune`) keeps the newest ``train.keep_checkpoints`` complete checkpoints and
those the evaluate stage reads; it deletes only after a newer checkpoint is complete, and removes
``COMPLETE`` first, so a kill at any moment leaves a complete checkpoint to resume from and never
a half-deleted one that looks complete.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import random
import shutil
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from skymoe.storage import Storage, join
from skymoe.training.parallel import plain_state_parts
from skymoe.training.weights import save_args, save_part

COMPLETE = "COMPLETE"


def tag(step: int) -> str:
    return f"step-{step:07d}"


def checkpoints_uri(run_uri: str) -> str:
    return join(run_uri, "checkpoints")


def latest_step(storage: Storage, run_uri: str) -> int | None:
    """The last step with a complete checkpoint, or None. A folder without ``COMPLETE`` (a save or
    a deletion cut short) never counts."""
    return max(_complete_steps(storage, _step_folders(storage, run_uri)), default=None)


def steps_to_delete(complete_steps: Sequence[int], incomplete_steps: Sequence[int], keep: int,
                    protect_every: int | None) -> list[int]:
    """The checkpoint folders retention deletes, by step.

    Complete checkpoints go unless they are among the newest ``keep`` or their step is a multiple
    of ``protect_every`` (the evaluate stage reads those later). Incomplete folders older than the
    newest complete checkpoint are leftovers of a kill mid-save or mid-delete that no resume will
    use; newer ones are a save a resume redoes in place, so they stay.
    """
    if keep < 1:
        raise ValueError(f"keep must be at least 1 (a run must keep a checkpoint to resume from), got {keep}")
    newest = set(sorted(complete_steps)[-keep:])
    expired = [step for step in complete_steps
               if step not in newest and not (protect_every and step % protect_every == 0)]
    leftovers = [step for step in incomplete_steps if step < max(complete_steps, default=0)]
    return sorted(expired + leftovers)


def prune(storage: Storage, run_uri: str, keep: int, protect_every: int | None) -> list[int]:
    """Delete the run's checkpoints :func:`steps_to_delete` names and return their steps. Rank 0
    only, after a save's last barrier: no rank reads an old checkpoint then, and the newest one,
    the only one a resume reads, is complete and kept. Rerunning it finishes an interrupted pass."""
    folders = _step_folders(storage, run_uri)
    complete = _complete_steps(storage, folders)
    doomed = steps_to_delete(complete, [step for step in folders if step not in complete], keep, protect_every)
    for step in doomed:
        _delete_folder(storage, folders[step])
    return doomed


def complete_record(storage: Storage, run_uri: str, step: int) -> dict[str, Any]:
    return json.loads(storage.read_text(join(checkpoints_uri(run_uri), tag(step), COMPLETE)))


def save_weights(storage: Storage, folder: str, model: torch.nn.Module) -> None:
    """Every rank writes its share of the plain weights; rank 0 adds the model shape."""
    for name, state in plain_state_parts(model).items():
        save_part(storage, join(folder, "weights"), name, state)
    if dist.get_rank() == 0:
        save_args(storage, join(folder, "weights"), model.args)


def save(storage: Storage, run_uri: str, local_dir: str, engine, model: torch.nn.Module, step: int,
         record: dict[str, Any]) -> None:
    """A collective call: every rank must enter it at the same step."""
    name = tag(step)
    uri = join(checkpoints_uri(run_uri), name)
    deepspeed_dir = _deepspeed_dir(storage, run_uri, local_dir)
    engine.save_checkpoint(deepspeed_dir, tag=name, save_latest=False)
    storage.write_bytes(join(uri, f"rng-rank{dist.get_rank()}.pt"), _rng_state())
    save_weights(storage, uri, model)
    dist.barrier()
    if deepspeed_dir != checkpoints_uri(run_uri) and int(os.environ.get("LOCAL_RANK", "0")) == 0:
        staged = os.path.join(deepspeed_dir, name)
        for file in sorted(os.listdir(staged)):
            storage.write_bytes(join(uri, file), _read(os.path.join(staged, file)))
        shutil.rmtree(staged)  # the store holds it now; a long run must not fill the local disk
    dist.barrier()
    if dist.get_rank() == 0:
        storage.write_text(join(uri, COMPLETE), json.dumps({"step": step, **record}))
    dist.barrier()


def load(storage: Storage, run_uri: str, local_dir: str, engine, step: int) -> dict[str, Any]:
    """Restore engine, optimizer and this rank's RNG from the checkpoint at ``step``; returns its record."""
    name = tag(step)
    uri = join(checkpoints_uri(run_uri), name)
    deepspeed_dir = _deepspeed_dir(storage, run_uri, local_dir)
    staged = os.path.join(deepspeed_dir, name)
    remote = deepspeed_dir != checkpoints_uri(run_uri)
    first_on_node = int(os.environ.get("LOCAL_RANK", "0")) == 0
    if remote:  # one download per node, into the folder DeepSpeed reads
        if first_on_node:
            os.makedirs(staged, exist_ok=True)
            for file_uri in storage.listdir(uri):
                if file_uri.endswith(".pt"):
                    with open(os.path.join(staged, file_uri.rsplit("/", 1)[1]), "wb") as handle:
                        handle.write(storage.read_bytes(file_uri))
        dist.barrier()
    engine.load_checkpoint(deepspeed_dir, tag=name, load_module_strict=True)
    _set_rng_state(storage.read_bytes(join(uri, f"rng-rank{dist.get_rank()}.pt")))
    if remote:
        dist.barrier()
        if first_on_node:
            shutil.rmtree(staged)
    return complete_record(storage, run_uri, step)


def _step_folders(storage: Storage, run_uri: str) -> dict[int, str]:
    """Every ``step-*`` folder of the run, complete or not, by step."""
    return {int(uri.rsplit("step-", 1)[1]): uri for uri in storage.listdir(checkpoints_uri(run_uri))
            if uri.rsplit("/", 1)[-1].startswith("step-")}


def _complete_steps(storage: Storage, folders: dict[int, str]) -> list[int]:
    return sorted(step for step, uri in folders.items() if storage.exists(join(uri, COMPLETE)))


def _delete_folder(storage: Storage, uri: str) -> None:
    """``COMPLETE`` first: a kill mid-delete then leaves a folder that no resume or evaluation
    picks up and that the next prune deletes. Whatever is already gone was deleted by an earlier,
    interrupted pass."""
    fs, path = storage.fs(uri)
    with contextlib.suppress(FileNotFoundError):
        fs.rm(join(path, COMPLETE))
    with contextlib.suppress(FileNotFoundError):
        fs.rm(path, recursive=True)


def _deepspeed_dir(storage: Storage, run_uri: str, local_dir: str) -> str:
    """A local root takes DeepSpeed's files in place; a remote one stages them in ``local_dir``."""
    target = checkpoints_uri(run_uri)
    return target if "://" not in target else os.path.join(local_dir, "deepspeed")


def _rng_state() -> bytes:
    buffer = io.BytesIO()
    torch.save({"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate(),
                "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}, buffer)
    return buffer.getvalue()


def _set_rng_state(data: bytes) -> None:
    state = torch.load(io.BytesIO(data), weights_only=False)
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if state["cuda"] is not None:
        torch.cuda.set_rng_state_all(state["cuda"])


def _read(path: str) -> bytes:
    with open(path, "rb") as handle:
        return handle.read()
