"""End to end through the CLI and a real (ephemeral) Prefect API: clean, then the rest of the pipeline - tokenize,
train (2 DeepSpeed ranks, expert parallel), evaluate (lm-eval offline) - on the bundled demo corpus."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from conftest import CORPUS, write_config


_LIST_ARTIFACTS = """
import asyncio, json
from prefect.client.orchestration import get_client

async def main():
    async with get_client() as client:
        print(json.dumps(sorted(a.key for a in await client.read_artifacts() if a.key)))

asyncio.run(main())
"""


def _skymoe(*args: str, env: dict) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "skymoe.flows.cli", *args], capture_output=True, text=True, env=env,
                          timeout=900)


def test_run_until_clean_then_the_whole_pipeline_on_demo_corpus(tmp_path, prefect_env):
    env = dict(os.environ)
    root = tmp_path / "out"
    config = write_config(tmp_path / "c.yaml", str(root), [str(CORPUS)],
                          classifier={"enabled": True, "positive": [str(CORPUS.parent / "quality" / "positive.jsonl")],
                                      "negative": [str(CORPUS.parent / "quality" / "negative.jsonl")]})
    first = _skymoe("run", "--config", str(config), "--until", "clean", env=env)
    assert first.returncode == 0, first.stderr[-3000:]
    summary = json.loads(first.stdout[first.stdout.index("{"):])
    clean = summary["stages"]["clean"]
    assert clean["counts"]["docs_out"] > 300
    assert clean["counts"]["docs_out_by_lang"]["en"] > 50 and clean["counts"]["docs_out_by_lang"]["zh"] > 200
    assert clean["counts"]["rejects_by_reason"]["quality_classifier:bucket_tail"] > 0
    assert "Finished in state Completed" in first.stderr
    assert "clean/filter" in first.stderr  # stage progress lines reach the run's log

    second = _skymoe("run", "--config", str(config), env=env)
    assert second.returncode == 0, second.stderr[-3000:]
    assert "Cached" in second.stderr  # clean is not redone
    stages = json.loads(second.stdout[second.stdout.index("{"):])["stages"]
    assert stages["clean"]["uri"] == clean["uri"]
    assert stages["tokenize"]["counts"]["train_sequences"] > 100
    train = stages["train"]
    assert train["runs"]["upcycled"]["steps"] == 30 and train["runs"]["upcycled"]["final_val_loss"]
    assert (Path(train["export"]) / "config.json").exists()
    assert "[rank 0] upcycled step 30/30" in second.stderr  # rank logs reach the run's log
    evaluation = stages["evaluate"]
    assert {row["suite"] for row in evaluation["table"]} == {"mmlu", "hellaswag", "gsm8k"}
    checkpoints = json.loads(second.stdout[second.stdout.index("{"):])["checkpoint_evaluations"]
    assert [e["label"] for e in checkpoints] == ["step-0000010", "step-0000020"]

    artifacts = subprocess.run([sys.executable, "-c", _LIST_ARTIFACTS], capture_output=True, text=True, env=env,
                               timeout=600)
    keys = json.loads(artifacts.stdout.strip().splitlines()[-1])
    assert keys.count("clean-summary") == 2 and keys.count("clean-report") == 2  # both runs published
    assert keys.count("tokenize-summary") == 1 and keys.count("tokenize-report") == 1
    assert keys.count("train-summary") == 1 and keys.count("train-report") == 1
    assert {"evaluate-final", "evaluate-step-0000010", "evaluate-report", "evaluate-progress"} <= set(keys)

    shown = _skymoe("show", "--root", str(root), "--json", env=env)
    listed = json.loads(shown.stdout)["stages"]
    assert listed[0] == {"name": "clean", "fingerprint": clean["uri"].rsplit("/", 1)[-1], "uri": clean["uri"],
                         "complete": True,
                         "counts": {k: v for k, v in clean["counts"].items() if not isinstance(v, dict)}}
    assert [(s["name"], s["uri"], s["complete"]) for s in listed[1:]] == [
        ("evaluate", uri, True) for uri in sorted(e["uri"] for e in [evaluation, *checkpoints])] + [
        ("tokenize", stages["tokenize"]["uri"], True), ("train", train["uri"], True)]


def test_bad_config_fails_before_work(tmp_path, prefect_env):
    bad = tmp_path / "bad.yaml"
    bad.write_text("storage:\n  root: %s\nclean:\n  language:\n    min_confidence: 2\n" % (tmp_path / "out"))
    result = _skymoe("run", "--config", str(bad), env=dict(os.environ))
    assert result.returncode == 2
    assert "clean.language.min_confidence" in result.stderr and str(bad) in result.stderr
    assert not (tmp_path / "out").exists()
