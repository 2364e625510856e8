"""Checkpoints of a run in the configured storage, resumable after a kill.

DeepSpeed writes its own checkpoint (module, ZeRO optimizer partitions, expert files) to a local
folder; a remote root gets a copy uploaded, and a resume downloads it, file by file through
fsspec's ``put_file``/``get_file`` (multipart and ranged on S3) with at most
``TRANSFER_CONCURRENCY`` parts of ``TRANSFER_PART_BYTES`` in flight, whatever the files' size.
Next to it each rank saves its RNG state (DeepSpeed does not) and its share of the plain weights
(``weights/``: what export and upcycling read).
A checkpoint exists only once rank 0 has written ``COMPLETE`` after every rank finished, so a
kill in the middle of a save leaves the previous checkpoint as the latest.

Resume never unpickles: the RNG files hold tensors and plain values, DeepSpeed's files are read
weights-only (tensors, containers and three allow-listed DeepSpeed data classes), and every ``.pt``
file must match the checksum ``COMPLETE`` recorded at save. Checkpoints from before this format are
refused; ``python -m skymoe.training.checkpoint upgrade-legacy FOLDER`` converts one you trust.

Retention (:func:`prune`) keeps the newest ``train.keep_checkpoints`` complete checkpoints and
those the evaluate stage reads; it deletes only after a newer checkpoint is complete, and removes
``COMPLETE`` first, so a kill at any moment leaves a complete checkpoint to resume from and never
a half-deleted one that looks complete.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import math
import os
import pickle
import random
import re
import shutil
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from deepspeed.runtime.fp16.loss_scaler import LossScaler
from deepspeed.runtime.zero.config import ZeroStageEnum
from deepspeed.utils.tensor_fragment import fragment_address

from skymoe.storage import Storage, join
from skymoe.training.parallel import plain_state_parts
from skymoe.training.weights import save_args, save_part

COMPLETE = "COMPLETE"
RNG_FORMAT = "skymoe-rng-1"
# What DeepSpeed 0.19's ZeRO optimizer files hold besides tensors and containers (found with
# torch.serialization.get_unsafe_globals_in_checkpoint): a static loss scaler, an int enum and a
# two-int dataclass, none with code that runs when rebuilt. A file asking for anything else is refused.
DEEPSPEED_SAFE_GLOBALS: list[Callable] = [LossScaler, ZeroStageEnum, fragment_address]
# s3fs's own defaults keep up to 10 parts of 50 MiB per file in memory; these bound a transfer to
# 4 x 8 MiB in flight (about twice that in process memory: the HTTP client holds a copy of each
# part). S3 allows 10,000 parts per object, so a file over 80 GB gets larger parts.
TRANSFER_PART_BYTES = 8 << 20
TRANSFER_CONCURRENCY = 4
S3_MAX_PARTS = 10_000


class CheckpointError(RuntimeError):
    """A checkpoint resume refuses: a file changed since the save, needs unpickling, or predates both checks."""


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
            _upload(storage, os.path.join(staged, file), join(uri, file))
        shutil.rmtree(staged)  # the store holds it now; a long run must not fill the local disk
    dist.barrier()
    if dist.get_rank() == 0:
        checksums = _checksums(storage, uri)
        storage.write_text(join(uri, COMPLETE), json.dumps({"step": step, **record, "checksums": checksums}))
    dist.barrier()


def load(storage: Storage, run_uri: str, local_dir: str, engine, step: int) -> dict[str, Any]:
    """Restore engine, optimizer and this rank's RNG from the checkpoint at ``step``; returns its record.

    Every rank checks the checksums itself (no collective: a rank that refuses must not leave the
    others waiting) and reads its RNG file before DeepSpeed's, so a refused checkpoint fails fast.
    """
    name = tag(step)
    uri = join(checkpoints_uri(run_uri), name)
    record = complete_record(storage, run_uri, step)
    _verify_checksums(storage, uri, record)
    rng = _read_rng_state(storage, join(uri, f"rng-rank{dist.get_rank()}.pt"))
    deepspeed_dir = _deepspeed_dir(storage, run_uri, local_dir)
    staged = os.path.join(deepspeed_dir, name)
    remote = deepspeed_dir != checkpoints_uri(run_uri)
    first_on_node = int(os.environ.get("LOCAL_RANK", "0")) == 0
    if remote:  # one download per node, into the folder DeepSpeed reads
        if first_on_node:
            os.makedirs(staged, exist_ok=True)
            for file_uri in storage.listdir(uri):
                if file_uri.endswith(".pt"):
                    _download(storage, file_uri, os.path.join(staged, file_uri.rsplit("/", 1)[1]))
        dist.barrier()
    engine.checkpoint_engine.load = _load_deepspeed_file  # DeepSpeed's own unpickles; its saving is untouched
    engine.load_checkpoint(deepspeed_dir, tag=name, load_module_strict=True)
    _set_rng_state(rng)
    if remote:
        dist.barrier()
        if first_on_node:
            shutil.rmtree(staged)
    return record


def upgrade_legacy(storage: Storage, folder: str) -> None:
    """Convert a complete checkpoint written before resume stopped unpickling: its RNG files to the
    weights-only format, and the checksums of its ``.pt`` files into ``COMPLETE``.

    This unpickles the old RNG files, which runs any code they hold: it is the explicit opt-in for
    checkpoints you wrote yourself into a root nobody else can write to. Running it twice is harmless.
    """
    if not storage.exists(join(folder, COMPLETE)):
        raise CheckpointError(f"{folder}: no {COMPLETE}; name a complete checkpoint folder (.../checkpoints/step-N)")
    for uri in storage.listdir(folder):
        if uri.rsplit("/", 1)[1].startswith("rng-rank"):
            state = torch.load(io.BytesIO(storage.read_bytes(uri)), weights_only=False)  # the opt-in unpickle
            if state.get("format") != RNG_FORMAT:
                storage.write_bytes(uri, _rng_file(state["python"], state["numpy"], state["torch"], state["cuda"]))
    record = json.loads(storage.read_text(join(folder, COMPLETE)))
    storage.write_text(join(folder, COMPLETE), json.dumps({**record, "checksums": _checksums(storage, folder)}))


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


def _legacy_advice(folder: str) -> str:
    return (f"Resume never unpickles. If you wrote this checkpoint yourself and nobody else can write to its root, "
            f"convert it once with `python -m skymoe.training.checkpoint upgrade-legacy {folder}` (that unpickles "
            f"its RNG files); otherwise delete {folder.rsplit('/', 1)[0]} to start the run over.")


def _checksums(storage: Storage, folder: str) -> dict[str, str]:
    """Content checksums (xxh3 locally, the store's ETag on S3) of the ``.pt`` files a resume
    loads: DeepSpeed's and the RNG files. ``weights/`` (safetensors) and the metrics are data only."""
    return {uri.rsplit("/", 1)[1]: storage.checksum(uri) for uri in storage.listdir(folder) if uri.endswith(".pt")}


def _verify_checksums(storage: Storage, folder: str, record: dict[str, Any]) -> None:
    """Every ``.pt`` file must be one the save recorded, unchanged: a file swapped, corrupted or
    added since then is refused before anything reads it. This catches corruption and a file
    replaced on its own; whoever can rewrite ``COMPLETE`` too gets past it, which is why nothing
    that follows unpickles either."""
    recorded = record.get("checksums")
    if recorded is None:
        raise CheckpointError(f"{join(folder, COMPLETE)}: no file checksums; the checkpoint was written before resume "
                              f"checked them (and with a pickled RNG state). {_legacy_advice(folder)}")
    for uri in storage.listdir(folder):
        name = uri.rsplit("/", 1)[1]
        if not name.endswith(".pt"):
            continue
        if name not in recorded:
            raise CheckpointError(f"{uri}: not a file of this checkpoint ({COMPLETE} records no checksum for it); "
                                  f"it was added after the save: remove it")
        found = storage.checksum(uri)
        if found != recorded[name]:
            raise CheckpointError(f"{uri}: checksum {found} differs from {recorded[name]} recorded at save; the file "
                                  f"changed after the checkpoint was written (corruption or tampering). Find out why; "
                                  f"deleting {folder} resumes from the checkpoint before it, if any.")


def _load_weights_only(source: str | io.BytesIO, name: str, advice: str, safe_globals: Sequence[Callable] = (),
                       map_location: Any = None) -> Any:
    """``torch.load`` that rebuilds only tensors, containers and ``safe_globals``; a file that asks
    for anything else (a planted pickle's ``os.system``) is refused, naming the file and the global."""
    try:
        with torch.serialization.safe_globals(list(safe_globals)):
            return torch.load(source, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as error:
        reason = _unpickler_reason(error)
        raise CheckpointError(f"{name}: refused by the weights-only load ({reason}). {advice}") from None


def _unpickler_reason(error: pickle.UnpicklingError) -> str:
    """What the file asked for, from torch's message; the rest of that message suggests
    ``weights_only=False``, just what a planted file wants, so it is not passed on."""
    found = re.search(r"GLOBAL ([\w.]+)|Unsupported operand (\d+)", str(error))
    if found is None:
        return "not a weights-only torch file"
    return f"it asks for the global {found[1]}" if found[1] else f"unsupported pickle opcode {found[2]}"


def _load_deepspeed_file(path: str, map_location: Any = None) -> Any:
    """Stands in for DeepSpeed's ``TorchCheckpointEngine.load``, which passes ``weights_only=False``."""
    advice = ("skymoe's DeepSpeed files need only tensors and DEEPSPEED_SAFE_GLOBALS (training/checkpoint.py); if a "
              "DeepSpeed upgrade writes another class, check it holds plain data before adding it there.")
    return _load_weights_only(path, path, advice, DEEPSPEED_SAFE_GLOBALS, map_location)


def _rng_file(python: tuple, numpy: tuple, cpu: torch.Tensor, cuda: list[torch.Tensor] | None) -> bytes:
    """The RNG states as tensors and plain values, so a weights-only load reads them: numpy's
    legacy state ``(algorithm, uint32 keys, pos, has_gauss, cached_gaussian)`` keeps its keys as
    int64 (every uint32 fits), Python's ``random`` state is a tuple of ints."""
    algorithm, keys, pos, has_gauss, cached_gaussian = numpy
    numpy_state = {"algorithm": algorithm, "keys": torch.from_numpy(np.asarray(keys).astype(np.int64)),
                   "pos": int(pos), "has_gauss": int(has_gauss), "cached_gaussian": float(cached_gaussian)}
    buffer = io.BytesIO()
    torch.save({"format": RNG_FORMAT, "python": python, "numpy": numpy_state, "torch": cpu, "cuda": cuda}, buffer)
    return buffer.getvalue()


def _rng_state() -> bytes:
    return _rng_file(random.getstate(), np.random.get_state(), torch.get_rng_state(),
                     torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None)


def _read_rng_state(storage: Storage, uri: str) -> dict[str, Any]:
    advice = ("An older skymoe pickled numpy's RNG state like this; a planted file looks the same. "
              + _legacy_advice(uri.rsplit("/", 1)[0]))
    state = _load_weights_only(io.BytesIO(storage.read_bytes(uri)), uri, advice)
    if not isinstance(state, dict) or state.get("format") != RNG_FORMAT:
        raise CheckpointError(f"{uri}: not a skymoe RNG state (format {RNG_FORMAT!r})")
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    numpy = state["numpy"]
    random.setstate(state["python"])
    np.random.set_state((numpy["algorithm"], numpy["keys"].numpy().astype(np.uint32), numpy["pos"],
                         numpy["has_gauss"], numpy["cached_gaussian"]))
    torch.set_rng_state(state["torch"])
    if state["cuda"] is not None:
        torch.cuda.set_rng_state_all(state["cuda"])


def _upload(storage: Storage, local_path: str, uri: str) -> None:
    """Stream a local file to ``uri``; on S3 a multipart upload, visible only once complete."""
    fs, path = storage.fs(uri)
    part = max(TRANSFER_PART_BYTES, math.ceil(os.path.getsize(local_path) / S3_MAX_PARTS))
    fs.put_file(local_path, path, **_transfer_options(fs, part))


def _download(storage: Storage, uri: str, local_path: str) -> None:
    """Stream ``uri`` to a local file; on S3 ranged reads of ``TRANSFER_PART_BYTES``."""
    fs, path = storage.fs(uri)
    fs.get_file(path, local_path, **_transfer_options(fs, TRANSFER_PART_BYTES))


def _transfer_options(fs, part_bytes: int) -> dict[str, int]:
    """s3fs's part size and concurrency (other filesystems stream on their own and take no such options)."""
    protocols = (fs.protocol,) if isinstance(fs.protocol, str) else fs.protocol
    if "s3" not in protocols:
        return {}
    return {"chunksize": part_bytes, "max_concurrency": TRANSFER_CONCURRENCY}


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m skymoe.training.checkpoint",
                                     description="Convert checkpoints written before resume stopped unpickling. "
                                                 "This unpickles their RNG files: only for checkpoints you trust.")
    parser.add_argument("command", choices=["upgrade-legacy"])
    parser.add_argument("folders", nargs="+", help="complete checkpoint folders (.../checkpoints/step-NNNNNNN)")
    args = parser.parse_args(argv)
    for folder in args.folders:
        upgrade_legacy(Storage(), folder)
        print(f"upgraded {folder}")


if __name__ == "__main__":
    main()
