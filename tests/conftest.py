"""Shared fixtures: a small real corpus, configs written to disk, and a real S3 server (moto)."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parent.parent
CORPUS = REPO / "examples" / "corpus"
QUALITY = REPO / "examples" / "quality"


@pytest.fixture(scope="session")
def small_corpus(tmp_path_factory) -> Path:
    """Real documents from the bundled corpus, cut into six shards of several formats."""
    folder = tmp_path_factory.mktemp("corpus")
    c4 = (CORPUS / "c4" / "c4_demo.jsonl").read_text(encoding="utf-8").splitlines()
    zh = (CORPUS / "zhwiki" / "zhwiki_part1.txt").read_text(encoding="utf-8").splitlines()
    for i in range(3):
        (folder / "c4").mkdir(exist_ok=True)
        (folder / "c4" / f"part{i}.jsonl").write_text("\n".join(c4[i * 60 : (i + 1) * 60]) + "\n", encoding="utf-8")
    for i in range(2):
        (folder / "zhwiki").mkdir(exist_ok=True)
        (folder / "zhwiki" / f"part{i}.txt").write_text("\n".join(zh[i * 200 : (i + 1) * 200]) + "\n", encoding="utf-8")
    # Planted exact and near duplicates of real documents, so dedup has known work to do.
    first = json.loads(c4[0])["text"]
    (folder / "c4" / "copies.jsonl").write_text(
        json.dumps({"text": first}) + "\n" + json.dumps({"text": first.replace(".", "!", 1)}) + "\n", encoding="utf-8"
    )
    shutil.copy(CORPUS / "dolma" / "sample-0000.warc.gz", folder / "sample.warc.gz")
    return folder


# A train section small enough for tests: a real 2-layer MoE on 2 DeepSpeed ranks, seconds per run.
SMALL_TRAIN = {
    "model": {"dim": 64, "n_layers": 2, "n_heads": 4, "ffn_dim": 128},
    "moe": {"num_experts": 4, "top_k": 2, "capacity_factor": 1.25},
    "dense": {"steps": 30, "lr": 3e-3, "min_lr": 3e-4, "warmup_steps": 3},
    "upcycled": {"steps": 30, "lr": 2e-3, "min_lr": 3e-4, "warmup_steps": 3},
    "scratch": None,
    "micro_batch_size": 4,
    "checkpoint_every": 10,
    "eval_every": 15,
    "eval_batches": 2,
    "similarity_every": 5,
    "log_every": 10,
}


# Evaluation small enough for tests: a few items of three bundled suites, every checkpoint evaluated.
SMALL_EVALUATE = {"suites": {"mmlu": {"limit": 4}, "hellaswag": {"limit": 30}, "gsm8k": {"limit": 2}},
                  "max_gen_tokens": 16, "checkpoint_every": 1}


def quality_classifier(threshold: float | None = None) -> dict:
    """The tiny preset's quality models (examples/quality/train/), optionally with a fixed threshold."""
    return {"enabled": True, "languages": {
        lang: {"positive": [str(QUALITY / "train" / f"{lang}_positive.jsonl")],
               "negative": [str(QUALITY / "train" / f"{lang}_negative.jsonl")],
               **({"threshold": threshold} if threshold is not None else {})} for lang in ("zh", "en")}}


def write_config(path: Path, root: str, inputs: list[str], train: dict | None = None, evaluate: dict | None = None,
                 **clean_overrides) -> Path:
    """A config for tests: the tiny preset's settings with a small corpus and one worker."""
    clean = {
        "inputs": inputs,
        "executor": {"kind": "datatrove", "workers": 1},
        # Score every document but keep them all (a threshold of almost 0), so the planted duplicates reach dedup.
        "classifier": quality_classifier(threshold=1e-6),
        # A few partitions are enough for a few hundred documents (and save S3 round trips).
        "dedup": {"partitions": 4, "recurring": {"min_docs": 3}},
    }
    for key, value in clean_overrides.items():
        clean[key] = value
    config = {"name": "test", "storage": {"root": root}, "clean": clean, "train": train or SMALL_TRAIN,
              "evaluate": evaluate or SMALL_EVALUATE}
    path.write_text(yaml.safe_dump(config), encoding="utf-8")
    return path


def run_stage(name: str, config, storage=None, upstream: dict | None = None, continues=None) -> list:
    """Plan one stage and run every plan with the one runner, as ``run_pipeline`` does for each stage:
    a list of ``StageResult``, the output downstream stages read first."""
    from skymoe.pipeline import load_stage
    from skymoe.stage import run_plan
    from skymoe.storage import Storage

    storage = storage if storage is not None else Storage.from_config(config.storage)
    stage = load_stage(name)
    return [run_plan(stage, plan, storage) for plan in stage.plan(config, storage, upstream or {}, continues)]


def with_root(config, root):
    """``config`` with another storage root (stages read the root from the config alone)."""
    return config.model_copy(update={"storage": config.storage.model_copy(update={"root": str(root)})})


def kill_after_done_records(code: str, done_dir: Path, count: int = 2) -> set[str]:
    """Run ``code`` in a fresh Python process, SIGKILL its whole process group as soon as
    ``done_dir`` holds ``count`` done-records, and return the records that existed at the kill."""
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            start_new_session=True)
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline and proc.poll() is None:
        if done_dir.exists() and len(list(done_dir.glob("*.json"))) >= count:
            break
        time.sleep(0.01)
    assert proc.poll() is None, f"the run ended before it could be killed: {proc.stderr.read()[-2000:]}"
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    return {p.name for p in done_dir.glob("*.json")}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="session")
def s3_server():
    """A real S3-compatible HTTP server (moto) on 127.0.0.1, stopped after the session."""
    from moto.server import ThreadedMotoServer

    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port)
    server.start()
    endpoint = f"http://127.0.0.1:{port}"
    saved = {k: os.environ.get(k) for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION",
                                            "AWS_ENDPOINT_URL")}
    os.environ.update({"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
                       "AWS_DEFAULT_REGION": "us-east-1", "AWS_ENDPOINT_URL": endpoint})
    yield endpoint
    server.stop()
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


@pytest.fixture()
def bucket(s3_server):
    """A bucket on the moto server, and a boto3 client to look inside it."""
    import boto3

    client = boto3.client("s3", endpoint_url=s3_server)
    name = "skymoe-test"
    if name not in [b["Name"] for b in client.list_buckets().get("Buckets", [])]:
        client.create_bucket(Bucket=name)
    return client, name


def upload_folder(client, bucket: str, folder: Path, prefix: str) -> None:
    for path in sorted(folder.rglob("*")):
        if path.is_file():
            client.upload_file(str(path), bucket, f"{prefix}/{path.relative_to(folder).as_posix()}")


@pytest.fixture()
def prefect_env(tmp_path, monkeypatch):
    """An isolated Prefect home: a fresh ephemeral API database per test."""
    monkeypatch.setenv("PREFECT_HOME", str(tmp_path / "prefect-home"))
    monkeypatch.setenv("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    monkeypatch.setenv("DO_NOT_TRACK", "1")
    monkeypatch.setenv("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "180")
    return tmp_path


def is_verdict(status: str) -> bool:
    """One of the report's verdicts, or "not decided (<why>)" (one seed, a diverged run)."""
    from skymoe.ablations.report import NOT_DECIDED, STATUSES

    return status in STATUSES or (status.startswith(f"{NOT_DECIDED} (") and status.endswith(")"))


def run_two_ranks(worker: str, folder: Path, *args: str, timeout: float = 120) -> None:
    """``python -c worker folder *args`` as ranks 0 and 1 of a gloo world on 127.0.0.1 (DeepSpeed on CPU,
    one thread each); fails with the tail of a rank's output if either exits non-zero."""
    port = str(free_port())
    procs = []
    for rank in range(2):
        env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port, "RANK": str(rank), "WORLD_SIZE": "2",
               "LOCAL_RANK": str(rank), "DS_ACCELERATOR": "cpu", "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
        procs.append(subprocess.Popen([sys.executable, "-c", worker, str(folder), *args], cwd=REPO, env=env,
                                      stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    try:
        logs = [proc.communicate(timeout=timeout)[0] for proc in procs]
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    for proc, log in zip(procs, logs):
        assert proc.returncode == 0, log[-3000:]


def random_tokens_output(root: Path, name: str, vocab: int, seq_len: int, rows: int) -> str:
    """A tokenize output as the stage writes it (Arrow rows of seq_len + 1 ids, manifest last) of seeded
    random ids, for training tests that need real steps, not real text; its URI."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.ipc as ipc

    from skymoe.stage import Manifest, StageRef, write_manifest
    from skymoe.storage import Storage

    ref = StageRef(str(root), "tokenize", name)
    ids = np.random.default_rng(0).integers(0, vocab, size=(rows, seq_len + 1)).tolist()
    table = pa.table({"input_ids": pa.array(ids, type=pa.list_(pa.uint16())),
                      "doc_starts": pa.array([[0]] * len(ids), type=pa.list_(pa.int32())),
                      "lang": pa.array(["en"] * len(ids)), "source": pa.array(["random"] * len(ids))})
    Path(ref.path("train")).mkdir(parents=True)
    with ipc.new_file(ref.path("train", "random-0000.arrow"), table.schema) as writer:
        writer.write_table(table)
    index = [{"path": "train/random-0000.arrow", "split": "train", "lang": "en", "source": "random",
              "sequences": len(ids), "tokens": len(ids) * (seq_len + 1)}]
    extra = {"index": index, "mixture": {"en/random": {"repeat": 1.0}}, "seq_len": seq_len, "token_dtype": "uint16"}
    write_manifest(Storage(), ref, Manifest(stage="tokenize", fingerprint=ref.fingerprint, code_version="test",
                                            config={}, inputs={}, extra=extra))
    return ref.uri
