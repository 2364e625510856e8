"""The evaluate stage on a real (briefly) trained model: lm-eval offline on the bundled suites, every
saved checkpoint as its own cached output, comparisons, and clear errors."""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
from pathlib import Path

import pytest

from conftest import CORPUS, SMALL_EVALUATE, SMALL_TRAIN, run_stage, write_config
from skymoe.config import ConfigError, load_config
from skymoe.evaluation.stage import STAGE as EVALUATE
from skymoe.evaluation.stage import EvaluateError, check_inputs
from skymoe.stage import Manifest, check_output, run_plan
from skymoe.storage import Storage
from skymoe.training.stage import STAGE as TRAIN_STAGE

TRAIN = {**SMALL_TRAIN, "dense": {"steps": 6, "warmup_steps": 1},
         "upcycled": {"steps": 9, "lr": 2e-3, "warmup_steps": 1}, "checkpoint_every": 3, "eval_every": 100}


def config_for(root: Path, **evaluate):
    """A config file beside ``root`` (its evaluate section replaces, not merges into, the defaults)."""
    section = {**SMALL_EVALUATE, **evaluate}
    name = hashlib.sha1(json.dumps(section, sort_keys=True).encode()).hexdigest()[:8]
    path = write_config(root.parent / f"config-{name}.yaml", str(root), [str(CORPUS)], train=TRAIN, evaluate=section)
    return load_config(path, {"clean": {"executor": {"workers": 2}}, "tokenize": {"seq_len": 128}})


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """The demo corpus cleaned, tokenized and trained for a few steps (checkpoints at steps 3, 6 and 9)."""
    root = tmp_path_factory.mktemp("eval-root")
    config = config_for(root)
    storage = Storage.from_config(config.storage)
    (clean,) = run_stage("clean", config, storage)
    (tokens,) = run_stage("tokenize", config, storage, {"clean": clean.ref})
    (train,) = run_stage("train", config, storage, {"tokenize": tokens.ref})
    return root, train.ref


def plan_evaluate(config, storage: Storage, train_ref):
    """One plan per evaluated model: the export first, then the evaluated checkpoints."""
    return EVALUATE.plan(config, storage, {"train": train_ref})


def test_final_model_and_checkpoints_are_evaluated_and_cached(trained):
    root, train_ref = trained
    config = config_for(root)
    storage = Storage.from_config(config.storage)
    plans = plan_evaluate(config, storage, train_ref)
    targets = [plan.work for plan in plans]
    assert [t.label for t in targets] == ["final", "step-0000003", "step-0000006"]  # step 9 is the final model
    assert [p.label for p in plans] == ["evaluate-final", "evaluate-step-0000003", "evaluate-step-0000006"]
    assert targets[1].tokens < targets[2].tokens < targets[0].tokens
    assert len({p.ref for p in plans}) == 3 and all(p.ref.root == str(root) for p in plans)
    results = [run_plan(EVALUATE, plan, storage) for plan in plans]
    assert [r.label for r in results] == [r.manifest.label for r in results] == [p.label for p in plans]
    assert all(r.manifest.upstream == {"train": train_ref.uri} for r in results)
    final = results[0].manifest
    assert results[0].summary()["scores"] == final.extra["table"]  # what the run summary shows
    assert set(final.extra["scores"]) == {"mmlu", "hellaswag", "gsm8k"}
    for row in final.extra["table"]:
        assert 0 <= row["score"] <= 100 and row["chance"] is not None
    assert {row["suite"]: row["skywork_moe_report"] for row in final.extra["table"]}["mmlu"] == 77.4
    out = Path(results[0].ref.uri)
    raw = json.loads((out / "results.json").read_text())
    assert "skymoe_mmlu" in raw["results"] and raw["n-shot"]
    assert final.counts["items"] == 5 * 4 + 30 + 2  # MMLU subjects x limit, HellaSwag, GSM8K
    assert {p.stem for p in (out / "samples").glob("*.jsonl")} >= {"skymoe_hellaswag", "skymoe_gsm8k",
                                                                   "skymoe_mmlu_anatomy"}
    assert (out / "scores.png").stat().st_size > 1000
    # A checkpoint compares with the run's previous evaluated checkpoint; the first final model with nothing.
    assert final.extra["previous"] is None and results[1].manifest.extra["previous"] is None
    assert results[2].manifest.extra["previous"] == results[1].ref.uri
    assert all(row["delta_vs_previous"] is not None for row in results[2].manifest.extra["table"])
    # Each output scored its own weights: the per-sample loglikelihoods differ between models.
    def hellaswag_scores(result) -> list:
        rows = Path(result.ref.uri, "samples", "skymoe_hellaswag.jsonl").read_text().splitlines()
        return [json.loads(row)["filtered_resps"] for row in rows]
    assert hellaswag_scores(results[0]) != hellaswag_scores(results[1]) != hellaswag_scores(results[2])
    # A second call is a cache hit for every model.
    assert all(run_plan(EVALUATE, plan, storage).cached for plan in plans)
    assert [p.ref for p in plan_evaluate(config, storage, train_ref)] == [p.ref for p in plans]


def test_hf_model_class_gives_the_same_multiple_choice_scores(trained):
    """lm-eval's own hf model on the exported folder agrees with skymoe's class."""
    root, train_ref = trained
    suites = {"mmlu": {"limit": 4}, "hellaswag": {"limit": 30}}
    scores = {}
    for model in ("skymoe", "hf"):
        config = config_for(root, model=model, suites=suites, checkpoint_every=None)
        storage = Storage.from_config(config.storage)
        (plan,) = plan_evaluate(config, storage, train_ref)
        scores[model] = run_plan(EVALUATE, plan, storage).manifest.extra["scores"]
    assert scores["skymoe"] == scores["hf"]


def test_damaged_train_and_evaluate_outputs_are_rebuilt_from_what_is_intact(trained, caplog, monkeypatch):
    """Verified reuse covers what train and evaluate serve (each run's final weights, the export,
    the results): a damaged file is not served, and is remade from the done-records that do not
    name it, with the same bytes."""
    root, train_ref = trained
    config = config_for(root)
    storage = Storage.from_config(config.storage)
    out = Path(train_ref.uri)
    listed = {entry["path"]: entry["checksum"] for entry in _manifest(out).extra["files"]}
    runs, exported = sorted(_manifest(out).extra["runs"]), _manifest(out).extra["exported_run"]
    assert runs == ["dense", "upcycled"] and exported == "upcycled"
    assert {path.split("/")[0] for path in listed} == {"runs", "hf"}
    assert {path.split("/")[1] for path in listed if path.startswith("runs/")} == set(runs)
    records = {**{name: out / "_done" / "runs" / f"{name}.json" for name in runs},
               "export": out / "_done" / "export" / "hf.json"}

    def weights(folder: str) -> str:
        return next(path for path in listed if path.startswith(folder) and path.endswith(".safetensors"))

    def rebuild(*, verify: bool = False) -> set[str]:
        """Train again; the done-records it rewrote."""
        written = {name: record.stat().st_mtime_ns for name, record in records.items()}
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="skymoe"):
            [plan] = TRAIN_STAGE.plan(config, storage, {"tokenize": _tokens_ref(config, storage)})
            train = run_plan(TRAIN_STAGE, plan, storage, verify=verify)
        assert not train.cached and train.ref == train_ref
        assert {entry["path"]: entry["checksum"] for entry in train.manifest.extra["files"]} == listed
        assert check_output(storage, train_ref, verify=True).intact
        return {name for name, record in records.items() if record.stat().st_mtime_ns != written[name]}

    # A deleted export is exported again; no run is trained or resumed.
    (out / weights("hf/")).unlink()
    assert check_output(storage, train_ref).problems() == [f"{weights('hf/')}: missing"]
    assert rebuild() == {"export"} and f"{weights('hf/')}: missing" in caplog.text
    # One run's deleted final weights: that run resumes from its last checkpoint and writes them again.
    (out / weights("runs/dense/final/")).unlink()
    assert rebuild() == {"dense"}
    # A same-size change to the exported run's weights, in an output checked by size (as a large one
    # is): found by checksum with verify, or before the export is redone; never exported and vouched for.
    monkeypatch.setattr("skymoe.stage.SMALL_OUTPUT_BYTES", 0)
    flip(out / weights(f"runs/{exported}/final/"))
    assert check_output(storage, train_ref).intact and not check_output(storage, train_ref, verify=True).intact
    assert rebuild(verify=True) == {exported, "export"}
    flip(out / weights(f"runs/{exported}/final/"))
    (out / "hf" / "config.json").unlink()
    assert rebuild() == {exported, "export"} and "changed since the run wrote them" in caplog.text
    monkeypatch.undo()

    (plan,) = plan_evaluate(config_for(root, suites={"mmlu": {"limit": 1}}, checkpoint_every=None), storage,
                            train_ref)
    first = run_plan(EVALUATE, plan, storage)
    results = {entry["path"] for entry in first.manifest.extra["files"]}
    assert {"results.json", "scores.png"} < results and any(path.startswith("samples/") for path in results)
    flip(Path(plan.ref.uri, "results.json"))
    assert check_output(storage, plan.ref).state == "damaged"  # a small output: checksummed on every reuse
    again = run_plan(EVALUATE, plan, storage)
    assert not again.cached and again.manifest.extra["scores"] == first.manifest.extra["scores"]
    assert run_plan(EVALUATE, plan, storage).cached


def flip(path: Path) -> None:
    """Change one byte of a file, keeping its size."""
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 1
    path.write_bytes(bytes(data))


def _manifest(folder: Path) -> Manifest:
    return Manifest.from_json((folder / "manifest.json").read_text(encoding="utf-8"))


def _tokens_ref(config, storage: Storage):
    """The tokenize output the fixture made (a cache hit, as is the clean output under it)."""
    (clean,) = run_stage("clean", config, storage)
    (tokens,) = run_stage("tokenize", config, storage, {"clean": clean.ref})
    assert clean.cached and tokens.cached
    return tokens.ref


def test_bad_inputs_fail_clearly(trained, tmp_path):
    root, train_ref = trained
    storage = Storage.from_config(config_for(root).storage)
    with pytest.raises(EvaluateError, match="evaluate.data_dir: no gsm8k files at .*nowhere"):
        plan_evaluate(config_for(root, data_dir=str(tmp_path / "nowhere")), storage, train_ref)
    with pytest.raises(ConfigError, match="evaluate.suites.*unknown suites \\['arc'\\]"):
        config_for(root, suites={"arc": {}})
    with pytest.raises(ConfigError, match="run_code"):
        config_for(root, suites={"humaneval": {}})
    missing = type(train_ref)(str(tmp_path), "train", "nothing")
    with pytest.raises(EvaluateError, match="manifest.json missing"):
        plan_evaluate(config_for(root), storage, missing)
    with pytest.raises(EvaluateError, match="math: num_fewshot 9"):
        check_inputs(config_for(root, suites={"math": {"num_fewshot": 9}}))
    # A checkpoint whose weights are gone is named in the error (this runs last: it breaks the fixture).
    config = config_for(root, suites={"mmlu": {"limit": 1}})
    plan = plan_evaluate(config, storage, train_ref)[1]
    target = plan.work
    shutil.rmtree(target.weights_uri)
    with pytest.raises(ValueError, match=target.weights_uri):
        run_plan(EVALUATE, plan, storage)
    assert not Path(plan.ref.uri, "manifest.json").exists()
