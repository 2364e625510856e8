"""The whole pipeline on S3 (moto's server on 127.0.0.1), and the cleaning stage through a proxy
that fails requests the way a struggling object store does."""

from __future__ import annotations

import http.client
import json
import os
import subprocess
import sys
import threading
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from conftest import REPO, SMALL_TRAIN, run_stage, upload_folder, write_config
from skymoe.config import load_config
from skymoe.storage import Storage

SECRET = "not-a-real-secret-4e1f"  # moto accepts any credentials; this one must appear in no artifact

_ARTIFACTS = """
import asyncio, json
from prefect.client.orchestration import get_client

async def main():
    async with get_client() as client:
        print(json.dumps([{"key": a.key, "type": a.type, "data": a.data} for a in await client.read_artifacts()]))

asyncio.run(main())
"""


def _keys(client, bucket: str, prefix: str) -> set[str]:
    keys, token = set(), None
    while True:
        page = client.list_objects_v2(Bucket=bucket, Prefix=prefix, **({"ContinuationToken": token} if token else {}))
        keys |= {item["Key"] for item in page.get("Contents", [])}
        token = page.get("NextContinuationToken")
        if not token:
            return keys


@pytest.mark.slow  # ~2.5 min; the local end-to-end test, test_s3 and the flaky-store test cover S3 by default
def test_whole_pipeline_on_s3_with_presigned_links(tmp_path, small_corpus, bucket, prefect_env, monkeypatch):
    client, name = bucket
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", SECRET)
    upload_folder(client, name, small_corpus, "landing")
    root = f"s3://{name}/skymoe"
    short = {"steps": 10, "lr": 3e-3, "min_lr": 3e-4, "warmup_steps": 2}
    config = write_config(tmp_path / "c.yaml", root, [f"s3://{name}/landing"],
                          train={**SMALL_TRAIN, "dense": short, "upcycled": short, "eval_every": 10},
                          evaluate={"suites": {"hellaswag": {"limit": 20}}, "max_gen_tokens": 16})
    env = dict(os.environ)
    run = subprocess.run([sys.executable, "-m", "skymoe.flows.cli", "run", "--config", str(config), "--json"],
                         capture_output=True, text=True, env=env, timeout=900, cwd=REPO)
    assert run.returncode == 0, run.stderr[-4000:]
    summary = json.loads(run.stdout)
    assert summary["root"] == root
    results = summary["results"]
    # The export and every checkpoint the evaluate config asks for (SMALL_EVALUATE: every one; the
    # exported run saves at step 10, its last: the export itself).
    assert [(r["stage"], r["label"]) for r in results] == [
        ("clean", "clean"), ("tokenize", "tokenize"), ("train", "train"), ("evaluate", "evaluate-final")]

    keys = _keys(client, name, "skymoe/")
    for result in results:
        stage = result["stage"]
        assert result["uri"] == f"{root}/{stage}/{result['fingerprint']}" and not result["cached"]
        assert result["uri"][len(f"s3://{name}/"):] + "/manifest.json" in keys
    assert any(key.startswith("skymoe/train/") and key.endswith("/hf/config.json") for key in keys)
    assert summary["export"] == f"{results[2]['uri']}/hf"
    assert results[2]["export"][len(f"s3://{name}/"):] + "/config.json" in keys

    shown = subprocess.run([sys.executable, "-m", "skymoe.flows.cli", "show", "--root", root, "--json"],
                           capture_output=True, text=True, env=env, check=True, cwd=REPO)
    listed = json.loads(shown.stdout)["stages"]
    assert {item["name"] for item in listed} == {"clean", "tokenize", "train", "evaluate"}
    assert all(item["complete"] and item["uri"].startswith(root) for item in listed)

    artifacts = json.loads(subprocess.run([sys.executable, "-c", _ARTIFACTS], capture_output=True, text=True,
                                          env=env, check=True).stdout)
    # Prefect stores a link artifact as markdown: [text](url).
    links = {a["key"]: a["data"].rsplit("](", 1)[1].rstrip(")") for a in artifacts if (a["key"] or "").endswith("-output")}
    assert {"clean-output", "tokenize-output", "train-output", "evaluate-final-output"} <= set(links)
    # A presigned link opens with a plain HTTP GET, no credentials needed.
    link = links["train-output"]
    assert "Signature=" in link
    with urllib.request.urlopen(link) as response:
        assert json.loads(response.read())["stage"] == "train"
    for key in keys:
        if key.endswith((".json", ".jsonl", ".md")):
            assert SECRET not in client.get_object(Bucket=name, Key=key)["Body"].read().decode("utf-8", "replace")
    assert SECRET not in json.dumps(artifacts)


class _FlakyProxy(ThreadingHTTPServer):
    """Forwards to the S3 server; every ``fail_every``-th request gets a 503 SlowDown, and every
    ``drop_every``-th has its connection closed without an answer."""

    daemon_threads = True

    def __init__(self, upstream: str, fail_every: int, drop_every: int):
        super().__init__(("127.0.0.1", 0), _ProxyHandler)
        self.upstream = upstream.split("://", 1)[1]
        self.fail_every, self.drop_every = fail_every, drop_every
        self.requests = self.failed = self.dropped = 0
        self.lock = threading.Lock()


class _ProxyHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, *args) -> None:  # quiet
        pass

    def _forward(self) -> None:
        server: _FlakyProxy = self.server
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        with server.lock:
            server.requests += 1
            n = server.requests
        if n % server.drop_every == 0:
            server.dropped += 1
            self.close_connection = True
            self.connection.close()
            return
        if n % server.fail_every == 0:
            server.failed += 1
            error = b"<Error><Code>SlowDown</Code><Message>Please reduce your request rate.</Message></Error>"
            self.send_response(503)
            self.send_header("Content-Type", "application/xml")
            self.send_header("Content-Length", str(len(error)))
            self.end_headers()
            self.wfile.write(error)
            return
        upstream = http.client.HTTPConnection(server.upstream, timeout=60)
        upstream.request(self.command, self.path, body=body, headers=dict(self.headers))
        answer = upstream.getresponse()
        payload = answer.read()
        self.send_response(answer.status)
        for key, value in answer.getheaders():
            if key.lower() not in ("content-length", "transfer-encoding", "connection"):
                self.send_header(key, value)
        # A HEAD answer carries the object's length, not its own (empty) body's.
        self.send_header("Content-Length", answer.getheader("Content-Length", "0") if self.command == "HEAD"
                         else str(len(payload)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(payload)
        upstream.close()

    do_GET = do_PUT = do_POST = do_HEAD = do_DELETE = _forward


def test_transient_store_errors_are_retried_and_leave_no_partial_output(tmp_path, small_corpus, bucket, s3_server):
    client, name = bucket
    upload_folder(client, name, small_corpus / "c4", "flaky-in")
    proxy = _FlakyProxy(s3_server, fail_every=12, drop_every=97)  # a dropped connection costs ~6 s of retries
    threading.Thread(target=proxy.serve_forever, daemon=True).start()
    endpoint = f"http://127.0.0.1:{proxy.server_address[1]}"
    try:
        config = load_config(write_config(tmp_path / "c.yaml", f"s3://{name}/flaky", [f"s3://{name}/flaky-in"]),
                             {"storage": {"s3": {"endpoint_url": endpoint}}})
        storage = Storage.from_config(config.storage)
        (result,) = run_stage("clean", config, storage)
    finally:
        proxy.shutdown()
        proxy.server_close()
    assert proxy.failed > 3 and proxy.dropped > 1  # the faults did happen

    direct = load_config(write_config(tmp_path / "d.yaml", f"s3://{name}/direct", [f"s3://{name}/flaky-in"]))
    (reference,) = run_stage("clean", direct, Storage.from_config(direct.storage))
    assert result.ref.fingerprint == reference.ref.fingerprint
    assert result.manifest.counts == reference.manifest.counts
    # Every object the manifest lists is whole: its stored checksum matches, and so do its bytes.
    for entry, same in zip(result.manifest.shards, reference.manifest.shards, strict=True):
        assert Storage().checksum(f"{result.ref.uri}/{entry['path']}") == entry["checksum"]
        assert client.get_object(Bucket=name, Key=f"flaky/clean/{result.ref.fingerprint}/{entry['path']}")["Body"].read() \
            == client.get_object(Bucket=name, Key=f"direct/clean/{reference.ref.fingerprint}/{same['path']}")["Body"].read()
