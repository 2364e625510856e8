"""Resume never unpickles: the RNG files round-trip without pickle, planted pickles (as RNG state
or as a DeepSpeed file) are refused without running, files changed since the save are refused by
checksum, and old checkpoints are refused until converted on purpose. One process, a stand-in for
the DeepSpeed engine, no launch."""

from __future__ import annotations

import io
import json
import os
import pickle
import random
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
from deepspeed.runtime.checkpoint_engine import TorchCheckpointEngine

from skymoe.storage import Storage, join
from skymoe.training.checkpoint import (COMPLETE, CheckpointError, checkpoints_uri, load, main, save, tag,
                                        upgrade_legacy)
from skymoe.training.model import ModelArgs, Transformer

MODEL_STATES = "mp_rank_00_model_states.pt"
STEP = 3


class FakeEngine:
    """The two calls checkpoint.save/load make on a DeepSpeed engine. Like DeepSpeed's
    ``load_checkpoint``, loading reads the model states through ``self.checkpoint_engine``."""

    def __init__(self):
        self.checkpoint_engine = TorchCheckpointEngine()
        self.loaded: dict | None = None

    def save_checkpoint(self, save_dir: str, tag: str, save_latest: bool) -> None:
        os.makedirs(os.path.join(save_dir, tag), exist_ok=True)
        state = {"module": {"w": torch.arange(4.0)}, "ds_version": "0.19.8"}
        torch.save(state, os.path.join(save_dir, tag, MODEL_STATES))

    def load_checkpoint(self, load_dir: str, tag: str, load_module_strict: bool) -> None:
        self.loaded = self.checkpoint_engine.load(os.path.join(load_dir, tag, MODEL_STATES), map_location="cpu")


class Planted:
    """Unpickling this runs a shell command that creates ``marker``: what a planted checkpoint file would do."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


@pytest.fixture(scope="module", autouse=True)
def one_rank(tmp_path_factory):
    """save/load are collective calls: a one-process gloo group gives them a rank and barriers."""
    started = not dist.is_initialized()
    if started:
        store = tmp_path_factory.mktemp("dist") / "store"
        dist.init_process_group("gloo", init_method=f"file://{store}", rank=0, world_size=1)
    yield
    if started:
        dist.destroy_process_group()


@pytest.fixture(params=["local", "s3"])
def run_uri(request, tmp_path) -> str:
    if request.param == "local":
        return str(tmp_path / "run")
    _, bucket = request.getfixturevalue("bucket")
    return f"s3://{bucket}/safety/{tmp_path.name}/run"


def tiny_model() -> Transformer:
    return Transformer(ModelArgs(vocab_size=32, dim=16, n_layers=1, n_heads=2, ffn_dim=32, max_seq_len=8))


def draws() -> tuple:
    """The next values of every stream a resume must restore."""
    return random.random(), np.random.rand(3).tolist(), torch.rand(3).tolist()


def save_checkpoint(run_uri: str, tmp_path: Path) -> tuple[str, tuple]:
    """A checkpoint at STEP; returns its folder and the draws that follow the save."""
    random.seed(1), np.random.seed(2), torch.manual_seed(3)
    save(Storage(), run_uri, str(tmp_path / "local"), FakeEngine(), tiny_model(), STEP, {"consumed_samples": 12})
    return join(checkpoints_uri(run_uri), tag(STEP)), draws()


def resume(run_uri: str, tmp_path: Path) -> FakeEngine:
    engine = FakeEngine()
    load(Storage(), run_uri, str(tmp_path / "local"), engine, STEP)
    return engine


def plant(folder: str, name: str, data: bytes, update_checksum: bool) -> None:
    """Replace a file of the checkpoint, and (as anyone who can write COMPLETE can) its checksum."""
    storage = Storage()
    storage.write_bytes(join(folder, name), data)
    if update_checksum:
        record = json.loads(storage.read_text(join(folder, COMPLETE)))
        record["checksums"][name] = storage.checksum(join(folder, name))
        storage.write_text(join(folder, COMPLETE), json.dumps(record))


def torch_bytes(obj) -> bytes:
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return buffer.getvalue()


def legacy_rng_bytes() -> bytes:
    """The RNG file as skymoe wrote it before: numpy's state pickled as numpy objects."""
    return torch_bytes({"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate(),
                        "cuda": None})


# ------------------------------------------------------------------------------ the new format
def test_a_resume_restores_identical_random_streams(run_uri, tmp_path):
    folder, after_save = save_checkpoint(run_uri, tmp_path)
    draws()  # training moves the streams on before the kill
    engine = resume(run_uri, tmp_path)
    assert draws() == after_save
    assert engine.loaded["module"]["w"].tolist() == [0.0, 1.0, 2.0, 3.0]
    record = json.loads(Storage().read_text(join(folder, COMPLETE)))
    assert record["consumed_samples"] == 12
    assert sorted(record["checksums"]) == [MODEL_STATES, "rng-rank0.pt"]


def test_the_rng_file_needs_no_unpickling(tmp_path):
    folder, _ = save_checkpoint(str(tmp_path / "run"), tmp_path)
    state = torch.load(os.path.join(folder, "rng-rank0.pt"), weights_only=True)
    assert set(state) == {"format", "python", "numpy", "torch", "cuda"}
    assert state["numpy"]["keys"].dtype == torch.int64 and state["numpy"]["keys"].shape == (624,)


# ------------------------------------------------------------------------------ planted pickles
def test_the_planted_object_runs_its_command_when_unpickled(tmp_path):
    """The control for the tests below: unpickled the way resume used to, it does create the marker."""
    marker = tmp_path / "pwned"
    torch.load(io.BytesIO(torch_bytes({"python": Planted(marker)})), weights_only=False)
    assert marker.exists()


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")  # torch's note on the raw protocol-5 pickle
@pytest.mark.parametrize("wrap", [lambda obj: pickle.dumps(obj, protocol=2), pickle.dumps, torch_bytes],
                         ids=["pickle-2", "pickle-5", "torch-save"])
def test_a_planted_pickle_as_rng_state_is_refused_without_running(run_uri, tmp_path, wrap):
    folder, _ = save_checkpoint(run_uri, tmp_path)
    marker = tmp_path / "pwned"
    plant(folder, "rng-rank0.pt", wrap({"python": Planted(marker)}), update_checksum=True)
    engine = FakeEngine()
    # protocol 2 reaches os.system's global; protocol 5 stops earlier, at its framing opcode
    reason = r"(it asks for the global posix\.system|unsupported pickle opcode 149)"
    with pytest.raises(CheckpointError, match=rf"rng-rank0\.pt: refused by the weights-only load \({reason}\)\. "
                                              r".*upgrade-legacy"):
        load(Storage(), run_uri, str(tmp_path / "local"), engine, STEP)
    assert not marker.exists()
    assert engine.loaded is None  # refused before DeepSpeed read anything


def test_a_planted_pickle_as_a_deepspeed_file_is_refused_without_running(run_uri, tmp_path):
    folder, _ = save_checkpoint(run_uri, tmp_path)
    marker = tmp_path / "pwned"
    plant(folder, MODEL_STATES, torch_bytes({"module": Planted(marker)}), update_checksum=True)
    with pytest.raises(CheckpointError,
                       match=rf"{MODEL_STATES}: refused .*global posix\.system.*DEEPSPEED_SAFE_GLOBALS"):
        resume(run_uri, tmp_path)
    assert not marker.exists()


# ------------------------------------------------------------------------------ checksums
def test_a_file_changed_after_the_save_is_refused(run_uri, tmp_path):
    folder, _ = save_checkpoint(run_uri, tmp_path)
    plant(folder, MODEL_STATES, torch_bytes({"module": {"w": torch.zeros(4)}}), update_checksum=False)
    with pytest.raises(CheckpointError, match=rf"{MODEL_STATES}: checksum .* differs .* recorded at save"):
        resume(run_uri, tmp_path)


def test_a_file_added_after_the_save_is_refused(tmp_path):
    run_uri = str(tmp_path / "run")
    folder, _ = save_checkpoint(run_uri, tmp_path)
    plant(folder, "layer_0_expert_0_mp_rank_00_model_states.pt", torch_bytes({}), update_checksum=False)
    with pytest.raises(CheckpointError, match=r"layer_0_expert_0_mp_rank_00_model_states\.pt: not a file of this"):
        resume(run_uri, tmp_path)


# ------------------------------------------------------------------------------ old checkpoints
def test_an_old_checkpoint_is_refused_until_upgraded_on_purpose(tmp_path):
    """Before: a pickled RNG file and no checksums. Resume refuses, naming COMPLETE and the way
    out; after ``upgrade-legacy`` it resumes with the streams the old file held."""
    run_uri = str(tmp_path / "run")
    folder, _ = save_checkpoint(run_uri, tmp_path)
    storage = Storage()
    plant(folder, "rng-rank0.pt", legacy_rng_bytes(), update_checksum=False)
    expected = draws()
    record = json.loads(storage.read_text(join(folder, COMPLETE)))
    del record["checksums"]
    storage.write_text(join(folder, COMPLETE), json.dumps(record))

    with pytest.raises(CheckpointError, match=rf"{COMPLETE}: no file checksums.*upgrade-legacy {folder}"):
        resume(run_uri, tmp_path)
    main(["upgrade-legacy", folder])
    draws()
    resume(run_uri, tmp_path)
    assert draws() == expected
    upgrade_legacy(storage, folder)  # a second pass changes nothing
    resume(run_uri, tmp_path)
    assert draws() == expected


def test_an_old_rng_file_behind_new_checksums_is_still_refused(tmp_path):
    run_uri = str(tmp_path / "run")
    folder, _ = save_checkpoint(run_uri, tmp_path)
    plant(folder, "rng-rank0.pt", legacy_rng_bytes(), update_checksum=True)
    with pytest.raises(CheckpointError,
                       match=r"rng-rank0\.pt: refused .*global numpy\..*pickled numpy's RNG state"):
        resume(run_uri, tmp_path)
