"""Incremental reruns through the real flow and a real (ephemeral) Prefect API: a full first
generation, a no-op rerun, then a new file that is cleaned against everything kept before,
appended to the token shards, trained on from the previous model and evaluated."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
import yaml

from conftest import CORPUS, REPO, write_config
from skymoe.training.data import TokenReader
from skymoe.storage import Storage

TRAIN_TOKENS = 20_480  # continued training per new batch: 10 steps (tiny's 102,400 is 50)
_RUN = ("import json, sys; from skymoe.flows.incremental import incremental_flow; "
        "print('RESULT ' + json.dumps(incremental_flow(root=sys.argv[2], config_path=sys.argv[1])))")


def _incremental(config: Path, env: dict) -> dict:
    """One run of the flow, with the config's own storage root (the flow requires a root)."""
    root = yaml.safe_load(config.read_text(encoding="utf-8"))["storage"]["root"]
    done = subprocess.run([sys.executable, "-c", _RUN, str(config), root], capture_output=True, text=True, env=env,
                          timeout=900, cwd=REPO)
    assert done.returncode == 0, done.stderr[-4000:]
    return json.loads(next(line for line in done.stdout.splitlines() if line.startswith("RESULT "))[7:])


def _c4_lines() -> list[str]:
    return (CORPUS / "c4" / "c4_demo.jsonl").read_text(encoding="utf-8").splitlines()


def test_new_files_are_cleaned_against_history_appended_and_trained_on(tmp_path, prefect_env):
    landing = tmp_path / "landing"
    (landing / "web").mkdir(parents=True)
    c4, zh = _c4_lines(), (CORPUS / "zhwiki" / "zhwiki_part1.txt").read_text(encoding="utf-8").splitlines()
    for i in range(3):
        (landing / "web" / f"c4-{i}.jsonl").write_text("\n".join(c4[i * 60:(i + 1) * 60]) + "\n", encoding="utf-8")
    (landing / "web" / "zh-0.txt").write_text("\n".join(zh[:300]) + "\n", encoding="utf-8")
    config = write_config(tmp_path / "c.yaml", str(tmp_path / "out"), [str(landing)],
                          evaluate={"suites": {"hellaswag": {"limit": 20}}, "max_gen_tokens": 16})
    settings = yaml.safe_load(config.read_text(encoding="utf-8"))
    config.write_text(yaml.safe_dump({**settings, "incremental": {"train_tokens": TRAIN_TOKENS}}), encoding="utf-8")
    env = dict(os.environ)

    first = _incremental(config, env)
    assert first["generation"] == 0 and first["new_files"] == 4
    assert first["counts"]["docs_kept"] > 100

    nothing = _incremental(config, env)
    assert nothing == {"generation": None, "new_files": 0, "series": first["series"]}

    # New data lands: fresh documents, an exact copy and a near copy of a document kept before.
    first_clean = tmp_path / "out" / "clean" / first["outputs"]["clean"]
    kept = [row for path in sorted((first_clean / "data").glob("*.parquet")) for row in pq.read_table(path).to_pylist()]
    kept_text = next(row["text"] for row in kept if row["lang"] == "en" and row["text"].count(".") > 3)
    fresh = c4[180:240]
    copies = [json.dumps({"text": kept_text}), json.dumps({"text": kept_text.replace(".", "!", 1)})]
    (landing / "web" / "c4-3.jsonl").write_text("\n".join(fresh + copies) + "\n", encoding="utf-8")
    old_tokens = tmp_path / "out" / "tokenize" / first["outputs"]["tokenize"]
    old_files = {p: p.stat().st_mtime_ns for p in old_tokens.rglob("*.arrow")}

    second = _incremental(config, env)
    counts = second["counts"]
    assert second["generation"] == 1 and second["new_files"] == 1
    assert counts["docs_in"] == 62
    assert counts["duplicates_of_earlier"] >= 2  # the exact and the near copy
    assert counts["train_tokens_appended"] > 0
    assert counts["train_tokens_in_shards"] == first["counts"]["train_tokens_in_shards"] + counts["train_tokens_appended"]
    assert counts["training_steps_added"] == -(-TRAIN_TOKENS // (4 * 2 * 256))  # at 2 ranks x 4 x 256 tokens
    assert set(counts["evaluation_delta"]) == {"hellaswag"} and counts["evaluation_delta"]["hellaswag"] is not None

    # The copies were rejected as duplicates of the first generation's documents, named by key.
    clean_dir = tmp_path / "out" / "clean" / second["outputs"]["clean"]
    rejects = [row for path in (clean_dir / "rejects").glob("*-dedup.parquet") for row in pq.read_table(path).to_pylist()]
    earlier = [r for r in rejects if r["reason"].split(": ", 1)[1].startswith(first["outputs"]["clean"])]
    assert {r["step"] for r in earlier} >= {"exact_dedup", "near_dedup"}

    # Appended, not rewritten: the old shards are untouched and one reader sees old and new.
    assert {p: p.stat().st_mtime_ns for p in old_tokens.rglob("*.arrow")} == old_files
    new_tokens = str(tmp_path / "out" / "tokenize" / second["outputs"]["tokenize"])
    reader = TokenReader(Storage(), new_tokens, "train")
    old_reader = TokenReader(Storage(), str(old_tokens), "train")
    assert reader.num_sequences > old_reader.num_sequences
    assert reader.sequence(0).tolist() == old_reader.sequence(0).tolist()
    tokens_manifest = json.loads(Path(new_tokens, "manifest.json").read_text())
    assert tokens_manifest["inputs"] == {"clean": second["outputs"]["clean"], "base": first["outputs"]["tokenize"]}
    clean_manifest = json.loads((clean_dir / "manifest.json").read_text())
    assert clean_manifest["inputs"][f"prior:{first_clean}"] == first["outputs"]["clean"]
    assert [item["uri"] for item in clean_manifest["extra"]["input_files"]] == [str(landing / "web" / "c4-3.jsonl")]

    # Training continued from the first generation's exported model.
    train = json.loads((tmp_path / "out" / "train" / second["outputs"]["train"] / "manifest.json").read_text())
    assert list(train["extra"]["runs"]) == ["continued"]
    assert train["inputs"]["previous"] == first["outputs"]["train"]
    assert train["upstream"] == {"tokenize": new_tokens, "previous": str(tmp_path / "out" / "train" /
                                                                         first["outputs"]["train"])}
    assert train["extra"]["runs"]["continued"]["steps"] == counts["training_steps_added"]

    ledger = json.loads(Path(second["series"]).read_text())
    assert [g["number"] for g in ledger["generations"]] == [0, 1]
    assert _incremental(config, env)["generation"] is None
