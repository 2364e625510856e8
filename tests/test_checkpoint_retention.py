"""Checkpoint retention: the rule on constructed steps, deletion on local and S3 storage (a kill
mid-delete included), and a real 2-rank MoE run that keeps only what it must and still resumes."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest

from conftest import SMALL_TRAIN, random_tokens_output
from skymoe.config import ParallelConfig, PhaseConfig, load_config
from skymoe.storage import Storage, join
from skymoe.training.checkpoint import COMPLETE, checkpoints_uri, latest_step, prune, steps_to_delete, tag
from skymoe.training.launch import launch
from skymoe.training.presets import dense_shape, with_moe
from skymoe.training.spec import RunInit, RunSpec


# ------------------------------------------------------------------------------ the rule
def test_keeps_the_newest_and_the_protected():
    assert steps_to_delete([2, 4, 6, 8, 10, 12], [], keep=2, protect_every=8) == [2, 4, 6]
    assert steps_to_delete([2, 4, 6, 8, 10, 12], [], keep=2, protect_every=4) == [2, 6]
    assert steps_to_delete([2, 4, 6, 8, 10, 12], [], keep=2, protect_every=None) == [2, 4, 6, 8]
    assert steps_to_delete([12, 2, 8, 10], [], keep=1, protect_every=None) == [2, 8, 10]  # any order


def test_keeps_everything_within_the_limit():
    assert steps_to_delete([], [], keep=2, protect_every=None) == []
    assert steps_to_delete([5], [], keep=1, protect_every=None) == []
    assert steps_to_delete([5, 10], [], keep=3, protect_every=None) == []


def test_the_final_checkpoint_off_the_interval_counts_as_newest():
    """A 25-step run checkpointing every 10 saves 10, 20 and 25: 25 is simply the newest."""
    assert steps_to_delete([10, 20, 25], [], keep=2, protect_every=None) == [10]
    assert steps_to_delete([10, 20, 25], [], keep=1, protect_every=20) == [10]


def test_incomplete_folders_go_only_when_older_than_a_complete_checkpoint():
    # 6: a delete cut short; 3: a killed save long superseded; 14: a killed save the resume redoes.
    assert steps_to_delete([8, 10, 12], [3, 6, 14], keep=2, protect_every=None) == [3, 6, 8]
    assert steps_to_delete([8, 10, 12], [6], keep=2, protect_every=2) == [6]  # no use to the evaluate stage
    assert steps_to_delete([], [4], keep=2, protect_every=None) == []  # nothing complete: maybe a first save


def test_keep_below_one_is_refused():
    with pytest.raises(ValueError, match="keep must be at least 1"):
        steps_to_delete([2, 4], [], keep=0, protect_every=None)


def test_a_spec_without_protect_every_steps_still_reads(tmp_path):
    spec = RunSpec(name="dense", run_uri="r", tokens_uri="t", model={}, init=RunInit("random"), phase={}, train={},
                   storage={}, local_dir="l")
    spec.write(tmp_path / "spec.json")
    raw = json.loads((tmp_path / "spec.json").read_text(encoding="utf-8"))
    assert raw.pop("protect_every_steps") is None
    (tmp_path / "old.json").write_text(json.dumps(raw), encoding="utf-8")
    assert RunSpec.read(tmp_path / "old.json") == RunSpec.read(tmp_path / "spec.json") == spec


# ------------------------------------------------------------------------------ deleting
def fake_checkpoint(storage: Storage, run_uri: str, step: int, complete: bool = True) -> None:
    folder = join(checkpoints_uri(run_uri), tag(step))
    storage.write_bytes(join(folder, "mp_rank_00_model_states.pt"), b"x" * 100)
    storage.write_bytes(join(folder, "weights", "shared.safetensors"), b"y" * 100)
    if complete:
        storage.write_text(join(folder, COMPLETE), json.dumps({"step": step}))


def steps_on_disk(storage: Storage, run_uri: str) -> list[int]:
    return [int(uri.rsplit("step-", 1)[1]) for uri in storage.listdir(checkpoints_uri(run_uri))]


@pytest.mark.parametrize("where", ["local", "s3"])
def test_prune_finishes_a_delete_cut_short(where, tmp_path, request):
    """A kill mid-delete left step 4 without COMPLETE but with files: no resume picks it, the next
    pass deletes it (and the expired ones), and a second pass has nothing left to do."""
    if where == "s3":
        client, bucket = request.getfixturevalue("bucket")
        run_uri = f"s3://{bucket}/retention/{tmp_path.name}/run"
    else:
        run_uri = str(tmp_path / "run")
    storage = Storage()
    for step in (2, 6, 8, 10):
        fake_checkpoint(storage, run_uri, step)
    fake_checkpoint(storage, run_uri, 4, complete=False)
    fake_checkpoint(storage, run_uri, 12, complete=False)  # a save in progress (or one a resume redoes)
    storage.write_bytes(join(run_uri, "final", "weights", "shared.safetensors"), b"z")
    assert latest_step(storage, run_uri) == 10

    assert prune(storage, run_uri, keep=2, protect_every=3) == [2, 4]
    assert steps_on_disk(storage, run_uri) == [6, 8, 10, 12]
    assert prune(storage, run_uri, keep=2, protect_every=3) == []
    assert latest_step(storage, run_uri) == 10
    assert storage.exists(join(run_uri, "final", "weights", "shared.safetensors"))


# ------------------------------------------------------------------------------ a real run
SEQ_LEN, VOCAB = 32, 512


@pytest.fixture(scope="module")
def tokens_uri(tmp_path_factory) -> str:
    """A tokenize output as the stage writes it (Arrow rows of seq_len + 1 ids, manifest last), of
    seeded random ids: retention needs real training, not real text."""
    return random_tokens_output(tmp_path_factory.mktemp("retention-tokens"), "retention", VOCAB, SEQ_LEN, rows=256)


def run_spec(tokens_uri: str, run_uri: Path, steps: int) -> tuple[RunSpec, ParallelConfig]:
    """A from-scratch MoE run (2 ranks, ep_size 2) checkpointing every 2 steps, keeping 2, protecting multiples of 8."""
    train = load_config(None, {"train": {**SMALL_TRAIN, "checkpoint_every": 2, "keep_checkpoints": 2}}).train
    args = with_moe(dense_shape(train, SEQ_LEN, VOCAB), train.moe)
    phase = PhaseConfig(steps=steps, lr=2e-3, warmup_steps=1)
    spec = RunSpec(name="scratch", run_uri=str(run_uri), tokens_uri=tokens_uri, model=args.to_dict(),
                   init=RunInit("random"), phase=phase.model_dump(mode="json"), train=train.model_dump(mode="json"),
                   storage={}, local_dir=str(run_uri.parent / "local"), protect_every_steps=8)
    return spec, train.parallel


def step_folders(checkpoints: Path) -> list[str]:
    """Checkpoint folders only: DeepSpeed also copies its recovery scripts (zero_to_fp32.py) next to them."""
    return sorted(p.name for p in checkpoints.glob("step-*"))


def folder_bytes(folder: Path) -> int:
    return sum(path.stat().st_size for path in folder.rglob("*") if path.is_file())


def test_a_run_keeps_the_newest_and_protected_checkpoints_and_resumes(tokens_uri, tmp_path, caplog):
    run_uri = tmp_path / "run"
    spec, parallel = run_spec(tokens_uri, run_uri, steps=12)
    launch(spec, parallel, tmp_path / "specs")
    checkpoints = run_uri / "checkpoints"
    assert step_folders(checkpoints) == [tag(8), tag(10), tag(12)]
    assert all((checkpoints / tag(step) / COMPLETE).exists() for step in (8, 10, 12))
    assert (run_uri / "final" / "weights").is_dir()
    storage = Storage()
    assert latest_step(storage, str(run_uri)) == 12
    sizes = {name: folder_bytes(checkpoints / name) for name in step_folders(checkpoints)}
    print(f"\ncheckpoints kept: {sizes}; {folder_bytes(checkpoints) / 1e6:.2f} MB for 3 of the 6 saved "
          f"(about {sum(sizes.values()) / len(sizes) * 6 / 1e6:.2f} MB without retention)")

    # A kill mid-delete of step 6 left a folder without COMPLETE; the longer rerun resumes from step 12
    # (not from it), and its first save's retention pass deletes it.
    half_deleted = checkpoints / tag(6)
    (half_deleted / "weights").mkdir(parents=True)
    (half_deleted / "weights" / "shared.safetensors").write_bytes(b"partial")
    caplog.set_level(logging.INFO, logger="skymoe.train")
    longer, _ = run_spec(tokens_uri, run_uri, steps=16)
    launch(longer, parallel, tmp_path / "specs")
    assert "resumed from step 12" in caplog.text
    assert step_folders(checkpoints) == [tag(8), tag(14), tag(16)]
    rows = [json.loads(line) for line in (run_uri / "metrics.jsonl").read_text().splitlines()]
    assert [row["step"] for row in rows if "loss" in row] == list(range(1, 17))
