"""Verified cache hits (issue 15): a deleted, truncated or altered output file, or an unreadable
manifest, is reported by ``run`` and ``show`` and rebuilt from the done-records that do not name it;
stale temporary files go on resume; flow runs of a killed ``skymoe run`` are marked Crashed.

One real clean + tokenize run through the CLI and an ephemeral Prefect API (the module's expensive
part) is copied back into place before each test, so every test damages a fresh copy of it.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import kill_after_done_records, write_config

from skymoe.config import load_config
from skymoe.flows.cli import main
from skymoe.pipeline import load_stage, run_pipeline
from skymoe.stage import Manifest
from skymoe.storage import Storage


def _env(prefect_home: Path) -> dict[str, str]:
    return {**os.environ, "PREFECT_HOME": str(prefect_home), "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
            "DO_NOT_TRACK": "1", "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "180"}


def _skymoe(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "skymoe.flows.cli", *args], capture_output=True, text=True, env=env,
                          timeout=900)


@pytest.fixture(scope="module")
def built(tmp_path_factory, small_corpus) -> dict[str, Path]:
    """clean + tokenize of the small corpus under ``root`` (made through the CLI, so the Prefect home
    holds cache records for both), and pristine copies of the root and the Prefect home."""
    base = tmp_path_factory.mktemp("built")
    root, home = base / "out", base / "prefect-home"
    config = write_config(base / "c.yaml", str(root), [str(small_corpus)])
    done = _skymoe("run", "--config", str(config), "--until", "tokenize", "--json", env=_env(home))
    assert done.returncode == 0, done.stderr[-3000:]
    shutil.copytree(root, base / "pristine-out")
    shutil.copytree(home, base / "pristine-home")
    return {"config": config, "root": root, "home": home, "pristine": base / "pristine-out",
            "pristine_home": base / "pristine-home"}


@pytest.fixture()
def out(built) -> dict[str, Path]:
    """The built root and Prefect home, restored to what the build left (at the same path: done-records
    hold the URIs they were written with)."""
    for live, pristine in ((built["root"], built["pristine"]), (built["home"], built["pristine_home"])):
        shutil.rmtree(live, ignore_errors=True)
        shutil.copytree(pristine, live)
    return built


def _output(root: Path, stage: str) -> Path:
    [folder] = (root / stage).iterdir()
    return folder


def _manifest(folder: Path) -> Manifest:
    return Manifest.from_json((folder / "manifest.json").read_text(encoding="utf-8"))


def _listed(folder: Path) -> list[tuple]:
    """Every file the manifest lists with its recorded size and checksum (what a fresh run wrote)."""
    manifest = _manifest(folder)
    entries = [*manifest.shards, *manifest.extra["rejects"], *manifest.extra["dedup_index"]] \
        if manifest.stage == "clean" else manifest.shards
    return sorted((entry["path"], entry["bytes"], entry["checksum"]) for entry in entries)


def _on_disk(folder: Path) -> list[tuple]:
    """The same files as they are now: sizes and checksums read from disk."""
    storage = Storage()
    return sorted((path, (folder / path).stat().st_size, storage.checksum(str(folder / path)))
                  for path, _, _ in _listed(folder))


def _run(out: dict[str, Path], verify: bool = False, **tokenize) -> dict[str, bool]:
    """clean + tokenize in this process with the one runner; which stage was a cache hit."""
    config = load_config(str(out["config"]), {"tokenize": tokenize} if tokenize else None)
    results = run_pipeline(config, Storage(), ("clean", "tokenize"), verify=verify)
    return {result.stage: result.cached for result in results}


def _show(*args: str) -> str:
    from contextlib import redirect_stdout
    from io import StringIO

    printed = StringIO()
    with redirect_stdout(printed):
        assert main(["show", *args]) == 0
    return printed.getvalue()


def test_deleted_clean_shard_is_shown_damaged_and_rebuilt_through_prefect(out):
    clean, tokens = _output(out["root"], "clean"), _output(out["root"], "tokenize")
    fresh_clean, fresh_tokens = _listed(clean), _listed(tokens)
    victim = next(path for path, _, _ in fresh_clean if path.startswith("data/"))
    (clean / victim).unlink()

    shown = _show("--root", str(out["root"]))
    assert f"{clean.name}  DAMAGED" in shown and f"clean/{clean.name} damaged: {victim}: missing" in shown
    [listed_clean, listed_tokens] = json.loads(_show("--root", str(out["root"]), "--json"))["stages"]
    assert (listed_clean["state"], listed_clean["complete"], listed_clean["problems"]) == (
        "damaged", False, [f"{victim}: missing"])
    assert listed_tokens["state"] == "complete"

    # The same Prefect home as the build: its cache records for both outputs must not be trusted blindly.
    rerun = _skymoe("run", "--config", str(out["config"]), "--until", "tokenize", "--json", env=_env(out["home"]))
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert "WARNING" in rerun.stderr and f"{victim}: missing" in rerun.stderr
    assert [(r["stage"], r["cached"]) for r in json.loads(rerun.stdout)["results"]] == [
        ("clean", False), ("tokenize", True)]
    assert _on_disk(clean) == _listed(clean) == fresh_clean  # the same bytes as the fresh run's
    assert _listed(tokens) == fresh_tokens
    assert "1 of" in rerun.stderr and "done-records dropped" in rerun.stderr  # only that shard's apply redone
    assert json.loads(_show("--root", str(out["root"]), "--json"))["stages"][0]["state"] == "complete"


def test_deleted_token_file_is_rebuilt_from_its_unit_alone(out, caplog):
    tokens = _output(out["root"], "tokenize")
    fresh = _listed(tokens)
    victim = fresh[0][0]
    (tokens / victim).unlink()
    with caplog.at_level(logging.INFO, logger="skymoe"):
        assert _run(out) == {"clean": True, "tokenize": False}
    assert _on_disk(tokens) == _listed(tokens) == fresh
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any(f"{victim}: missing" in message for message in warnings)
    encode_records = len(list((tokens / "_done" / "encode").glob("*.json")))
    assert any(f"(1 of {encode_records + 1} done-records dropped)" in message for message in warnings)
    assert any("tokenize/encode: 1 of" in r.getMessage() for r in caplog.records)


def test_a_damaged_tokenizer_reruns_the_whole_tokenize_stage(out, caplog):
    """Every token file was encoded with that tokenizer, so no unit's done-record vouches for it: the
    stage reruns, and training the tokenizer again on the same text gives the same files."""
    tokens = _output(out["root"], "tokenize")
    fresh = _listed(tokens)
    tokenizer = {entry["path"]: entry["checksum"] for entry in _manifest(tokens).extra["files"]}
    assert "tokenizer/tokenizer.json" in tokenizer
    (tokens / "tokenizer" / "tokenizer.json").unlink()
    with caplog.at_level(logging.WARNING, logger="skymoe"):
        assert _run(out) == {"clean": True, "tokenize": False}
    assert "tokenizer/tokenizer.json: missing" in caplog.text and "the stage reruns" in caplog.text
    assert _on_disk(tokens) == _listed(tokens) == fresh
    assert {entry["path"]: entry["checksum"] for entry in _manifest(tokens).extra["files"]} == tokenizer


def test_a_flipped_byte_of_the_same_size_is_caught_by_checksums(out, monkeypatch, caplog):
    tokens = _output(out["root"], "tokenize")
    fresh = _listed(tokens)
    victim = tokens / fresh[-1][0]
    data = bytearray(victim.read_bytes())
    data[len(data) // 2] ^= 0xFF
    victim.write_bytes(bytes(data))

    # As if the output were large: sizes only, unless verified. The size matches, so it would be served.
    monkeypatch.setattr("skymoe.stage.SMALL_OUTPUT_BYTES", 0)
    assert _run(out) == {"clean": True, "tokenize": True}
    assert _on_disk(tokens) != fresh
    with caplog.at_level(logging.WARNING, logger="skymoe"):
        assert _run(out, verify=True) == {"clean": True, "tokenize": False}
    assert any(f"{fresh[-1][0]}: checksum differs" in r.getMessage() for r in caplog.records)
    assert _on_disk(tokens) == fresh

    # A small output is checksummed on every reuse, without --verify.
    victim.write_bytes(bytes(data))
    monkeypatch.undo()
    assert _run(out) == {"clean": True, "tokenize": False}
    assert _on_disk(tokens) == fresh


def test_truncated_manifest_is_named_by_show_and_rebuilt_by_run(out):
    clean, tokens = _output(out["root"], "clean"), _output(out["root"], "tokenize")
    fresh = _listed(clean)
    manifest = clean / "manifest.json"
    manifest.write_bytes(manifest.read_bytes()[:200])

    shown = _show("--root", str(out["root"]))
    assert "UNREADABLE MANIFEST" in shown and f"{tokens.name}  complete" in shown  # the others still listed
    assert f"clean/{clean.name} unreadable manifest: {manifest}: Unterminated string" in shown
    listed = json.loads(_show("--root", str(out["root"]), "--json"))["stages"]
    assert [(item["name"], item["state"]) for item in listed] == [("clean", "unreadable manifest"),
                                                                   ("tokenize", "complete")]
    assert listed[0]["problems"][0].startswith(f"{manifest}: ")

    assert _run(out) == {"clean": False, "tokenize": True}  # resumed from its done-records: nothing redone
    assert _listed(clean) == _on_disk(clean) == fresh


def test_clean_shard_deleted_under_a_finished_tokenize_output(out):
    """The tokenize output that read the deleted shard is intact; a new tokenize output (another seed)
    must read the shard again, so clean is rebuilt first instead of failing with FileNotFoundError."""
    clean = _output(out["root"], "clean")
    fresh = _listed(clean)
    (clean / next(path for path, _, _ in fresh if path.startswith("data/"))).unlink()
    assert _run(out, seed=7) == {"clean": False, "tokenize": False}
    assert _on_disk(clean) == fresh
    assert len(list((out["root"] / "tokenize").iterdir())) == 2


def test_stale_temporary_files_are_removed_on_resume(out, caplog):
    clean = _output(out["root"], "clean")
    stale = clean / "data" / "x-0000.parquet.tmp-4194304"
    stale.write_bytes(b"half a shard")
    (clean / "manifest.json").unlink()  # a run killed before its manifest: the next one resumes
    with caplog.at_level(logging.INFO, logger="skymoe"):
        assert _run(out) == {"clean": False, "tokenize": True}
    assert not stale.exists()
    assert any("removed 1 stale temporary files" in r.getMessage() for r in caplog.records)


_FLOW_RUNS = """
from prefect.client.orchestration import get_client
with get_client(sync_client=True) as client:
    for run in sorted(client.read_flow_runs(), key=lambda run: run.created):
        print(run.state.name, run.state.message or "")
"""


def test_flow_run_of_a_killed_run_command_is_marked_crashed_on_the_next_start(out, small_corpus, tmp_path,
                                                                             monkeypatch):
    env = _env(tmp_path / "prefect-home")
    for key in ("PREFECT_HOME", "PREFECT_SERVER_ANALYTICS_ENABLED", "DO_NOT_TRACK"):
        monkeypatch.setenv(key, env[key])  # the killed command inherits this process's environment
    config = write_config(tmp_path / "c.yaml", str(tmp_path / "other"), [str(small_corpus)])
    loaded = load_config(str(config))
    [plan] = load_stage("clean").plan(loaded, Storage(), {})
    code = (f"import sys; sys.argv = ['skymoe', 'run', '--config', {str(config)!r}, '--until', 'clean']\n"
            "from skymoe.flows.cli import main; main()")
    kill_after_done_records(code, Path(plan.ref.path("_done", "filter")), count=1)
    before = subprocess.run([sys.executable, "-c", _FLOW_RUNS], capture_output=True, text=True, env=env, timeout=300)
    assert before.stdout.split()[:1] == ["Running"], before.stderr[-2000:]

    rerun = _skymoe("run", "--config", str(out["config"]), "--until", "clean", env=env)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert "marked Crashed" in rerun.stderr
    after = subprocess.run([sys.executable, "-c", _FLOW_RUNS], capture_output=True, text=True, env=env, timeout=300)
    lines = after.stdout.strip().splitlines()
    assert [line.split()[0] for line in lines] == ["Crashed", "Completed"]
    assert "the skymoe command running it is gone" in lines[0]
