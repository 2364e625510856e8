"""End to end through the CLI and a real (ephemeral) Prefect API: clean, then the rest of the pipeline - tokenize,
train (2 DeepSpeed ranks, expert parallel), evaluate (lm-eval offline) - on the bundled demo corpus."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from conftest import CORPUS, quality_classifier, write_config


_PREFECT_RECORDS = """
import asyncio, json, sys
from prefect.client.orchestration import get_client

async def main():
    async with get_client() as client:
        flow_runs = await client.read_flow_runs()
        task_runs = await client.read_task_runs()
        logs = []
        while page := await client.read_logs(limit=200, offset=len(logs)):  # the API answers 200 at most
            logs += [log.message for log in page]
        print(json.dumps({
            "artifacts": sorted(a.key for a in await client.read_artifacts() if a.key),
            "flow_runs": sorted([run.state.name, run.created.isoformat()] for run in flow_runs),
            "task_runs": sorted([run.name, run.state.name, run.created.isoformat()] for run in task_runs),
            "logged": {needle: any(needle in message for message in logs) for needle in sys.argv[1:]},
        }))

asyncio.run(main())
"""


def _skymoe(*args: str, env: dict) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "skymoe.flows.cli", *args], capture_output=True, text=True, env=env,
                          timeout=900)


def _prefect_records(env: dict, *needles: str) -> dict:
    """What the Prefect API recorded: artifact keys, flow and task run states (oldest first), and
    whether each needle appears in the runs' logs."""
    done = subprocess.run([sys.executable, "-c", _PREFECT_RECORDS, *needles], capture_output=True, text=True,
                          env=env, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    records = json.loads(done.stdout.strip().splitlines()[-1])
    records["flow_runs"] = [state for state, _ in sorted(records["flow_runs"], key=lambda run: run[1])]
    records["task_runs"] = [(name, state) for name, state, _ in sorted(records["task_runs"], key=lambda run: run[2])]
    return records


def test_run_until_clean_then_the_whole_pipeline_on_demo_corpus(tmp_path, prefect_env):
    env = dict(os.environ)
    root = tmp_path / "out"
    config = write_config(tmp_path / "c.yaml", str(root), [str(CORPUS)], classifier=quality_classifier())
    first = _skymoe("run", "--config", str(config), "--until", "clean", "--json", env=env)
    assert first.returncode == 0, first.stderr[-3000:]
    summary = json.loads(first.stdout)  # with --json, stdout is the summary alone
    assert summary["root"] == str(root) and summary["export"] is None
    [clean] = summary["results"]
    assert (clean["stage"], clean["label"], clean["cached"]) == ("clean", "clean", False)
    assert clean["uri"] == str(root / "clean" / clean["fingerprint"])
    assert clean["counts"]["docs_out"] > 300
    assert clean["counts"]["docs_out_by_lang"]["en"] > 50 and clean["counts"]["docs_out_by_lang"]["zh"] > 200
    assert clean["counts"]["rejects_by_reason"]["quality_classifier:below_threshold"] > 0
    records = _prefect_records(env, "clean/filter")
    assert records["flow_runs"] == ["Completed"]
    assert records["task_runs"] == [("clean", "Completed")]
    assert records["logged"]["clean/filter"]  # stage progress lines reach the run's log

    second = _skymoe("run", "--config", str(config), "--json", env=env)
    assert second.returncode == 0, second.stderr[-3000:]
    summary = json.loads(second.stdout)
    results = summary["results"]
    assert [(r["stage"], r["label"]) for r in results] == [
        ("clean", "clean"), ("tokenize", "tokenize"), ("train", "train"), ("evaluate", "evaluate-final"),
        ("evaluate", "evaluate-step-0000010"), ("evaluate", "evaluate-step-0000020")]
    stages = {r["label"]: r for r in results}
    assert stages["clean"]["uri"] == clean["uri"] and stages["clean"]["cached"]  # clean is not redone
    assert not any(r["cached"] for r in results[1:])
    assert stages["tokenize"]["counts"]["train_sequences"] > 100
    train = stages["train"]
    assert summary["export"] == train["export"] == f"{train['uri']}/hf"
    assert train["counts"]["upcycled_steps"] == 30
    runs = json.loads((Path(train["uri"]) / "manifest.json").read_text())["extra"]["runs"]
    assert runs["upcycled"]["steps"] == 30 and runs["upcycled"]["final_val_loss"]
    assert (Path(train["export"]) / "config.json").exists()
    evaluation = stages["evaluate-final"]
    assert {row["suite"] for row in evaluation["scores"]} == {"mmlu", "hellaswag", "gsm8k"}
    checkpoints = [stages["evaluate-step-0000010"], stages["evaluate-step-0000020"]]
    assert all({row["suite"] for row in c["scores"]} == {"mmlu", "hellaswag", "gsm8k"} for c in checkpoints)
    records = _prefect_records(env, "[rank 0] upcycled step 30/30")
    assert records["flow_runs"] == ["Completed", "Completed"]
    # clean is a Prefect cache hit: the stage does not even start.
    assert records["task_runs"][1:] == [("clean", "Cached"), ("tokenize", "Completed"), ("train", "Completed"),
                                        ("evaluate-final", "Completed"), ("evaluate-step-0000010", "Completed"),
                                        ("evaluate-step-0000020", "Completed")]
    assert records["logged"]["[rank 0] upcycled step 30/30"]  # rank logs reach the run's log

    keys = records["artifacts"]
    assert keys.count("clean-summary") == 2 and keys.count("clean-report") == 2  # both runs published
    assert keys.count("clean-output") == 2
    assert keys.count("tokenize-summary") == 1 and keys.count("tokenize-report") == 1
    assert keys.count("train-summary") == 1 and keys.count("train-report") == 1
    assert {"evaluate-final-summary", "evaluate-final-output", "evaluate-step-0000010-summary",
            "evaluate-step-0000020-summary", "evaluate-report", "evaluate-progress"} <= set(keys)
    assert keys.count("evaluate-report") == 1  # checkpoints go into the progress plot, not reports of their own

    shown = _skymoe("show", "--root", str(root), "--json", env=env)
    assert shown.returncode == 0, shown.stderr[-3000:]
    listed = json.loads(shown.stdout)["stages"]
    manifest = json.loads((Path(clean["uri"]) / "manifest.json").read_text())
    assert listed[0]["bytes"] > 0
    assert {k: v for k, v in listed[0].items() if k != "bytes"} == {
        "name": "clean", "fingerprint": clean["fingerprint"], "uri": clean["uri"], "complete": True,
        "state": "complete", "problems": [],
        "counts": {k: v for k, v in clean["counts"].items() if not isinstance(v, dict)},
        "created_at": manifest["created_at"], "label": "", "scores": []}
    # Pipeline order, and within a stage the order the outputs were made in.
    assert [(s["name"], s["uri"], s["complete"], s["label"]) for s in listed[1:]] == [
        ("tokenize", stages["tokenize"]["uri"], True, ""), ("train", train["uri"], True, ""),
        *[("evaluate", e["uri"], True, e["label"].removeprefix("evaluate-")) for e in [evaluation, *checkpoints]]]
    assert [s["scores"] for s in listed[3:]] == [e["scores"] for e in [evaluation, *checkpoints]]


def test_bad_config_fails_before_work(tmp_path, prefect_env):
    bad = tmp_path / "bad.yaml"
    bad.write_text("storage:\n  root: %s\nclean:\n  language:\n    min_confidence: 2\n" % (tmp_path / "out"))
    for args in ((), ("--json",)):
        result = _skymoe("run", "--config", str(bad), *args, env=dict(os.environ))
        assert result.returncode == 2
        assert "clean.language.min_confidence" in result.stderr and str(bad) in result.stderr
        assert result.stdout == ""
    assert not (tmp_path / "out").exists()
