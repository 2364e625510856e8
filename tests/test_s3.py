"""The cleaning stage and the catalog against a real S3-compatible server (moto on 127.0.0.1)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from conftest import free_port, run_stage, upload_folder, write_config
from skymoe.pipelines.clean.readers import InputError
from skymoe.catalog import list_stage_outputs
from skymoe.config import load_config
from skymoe.storage import Storage, StorageError


def test_clean_reads_and_writes_s3(tmp_path, small_corpus, bucket):
    client, name = bucket
    upload_folder(client, name, small_corpus, "raw")
    config_path = write_config(tmp_path / "c.yaml", f"s3://{name}/runs", [f"s3://{name}/raw"],
                               executor={"kind": "datatrove", "workers": 2})  # done-records come from other processes
    config = load_config(config_path)
    storage = Storage.from_config(config.storage)
    (result,) = run_stage("clean", config, storage)

    assert result.ref.uri == f"s3://{name}/runs/clean/{result.ref.fingerprint}"
    keys = {o["Key"] for o in client.list_objects_v2(Bucket=name, Prefix="runs/")["Contents"]}
    prefix = f"runs/clean/{result.ref.fingerprint}/"
    assert prefix + "manifest.json" in keys
    assert all(prefix + entry["path"] in keys for entry in result.manifest.shards)
    manifest_text = client.get_object(Bucket=name, Key=prefix + "manifest.json")["Body"].read().decode()
    assert "testing" not in manifest_text  # the access key never reaches an artifact
    assert all(e["checksum"].startswith("etag:") for e in json.loads(manifest_text)["shards"])

    (again,) = run_stage("clean", config, storage)
    assert again.cached

    # Resume on S3: drop the manifest and half of the last phase's done-records, as a crash would.
    data_before = {key: client.get_object(Bucket=name, Key=key)["Body"].read()
                   for key in keys if key.startswith(prefix + "data/")}
    client.delete_object(Bucket=name, Key=prefix + "manifest.json")
    done = sorted(k for k in keys if k.startswith(prefix + "_done/apply/"))
    for key in done[: len(done) // 2]:
        client.delete_object(Bucket=name, Key=key)
    (resumed,) = run_stage("clean", config, storage)
    assert not resumed.cached and resumed.manifest.counts == result.manifest.counts
    assert data_before == {key: client.get_object(Bucket=name, Key=key)["Body"].read() for key in data_before}

    listings = list_stage_outputs(storage, config.storage.root)
    assert [(item.name, item.fingerprint, item.complete) for item in listings] == [
        ("clean", result.ref.fingerprint, True)
    ]

    shown = subprocess.run([sys.executable, "-m", "skymoe.flows.cli", "show", "--root", f"s3://{name}/runs", "--json"],
                           capture_output=True, text=True, check=True)
    assert json.loads(shown.stdout)["stages"][0]["counts"]["docs_out"] == result.manifest.counts["docs_out"]


def test_missing_bucket_fails_before_work(tmp_path, small_corpus, s3_server):
    config = load_config(write_config(tmp_path / "c.yaml", "s3://no-such-bucket/x", [str(small_corpus)]))
    storage = Storage.from_config(config.storage)
    with pytest.raises(StorageError, match="no-such-bucket"):
        run_stage("clean", config, storage)
    missing_input = load_config(write_config(tmp_path / "d.yaml", str(tmp_path / "out"), ["s3://no-such-bucket/raw/"]))
    with pytest.raises(InputError, match="no-such-bucket"):
        run_stage("clean", missing_input, storage)


def test_an_unreachable_store_is_one_clear_error_that_says_how_to_go_on(tmp_path, small_corpus, s3_server,
                                                                         monkeypatch):
    """An S3 outage (nothing listens on the endpoint): at the start, `run` names the bucket and the
    endpoint problem in one line, exit 2, no traceback; mid-run, a storage call fails with an error
    that says a rerun resumes, not botocore's EndpointConnectionError."""
    dead = f"http://127.0.0.1:{free_port()}"
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "1")  # botocore's own retries: keep the test short
    env = {**os.environ, "AWS_ENDPOINT_URL": dead}
    ran = subprocess.run([sys.executable, "-m", "skymoe.flows.cli", "run", "--root", "s3://skymoe-test/runs",
                          "--input", str(small_corpus)], capture_output=True, text=True, env=env, timeout=300)
    assert ran.returncode == 2
    assert "cannot reach s3 bucket 'skymoe-test'" in ran.stderr and "Traceback" not in ran.stderr

    storage = Storage(s3_endpoint_url=dead, retries=1)
    with pytest.raises(StorageError, match="did not answer .* run the same command again to resume"):
        storage.read_bytes("s3://skymoe-test/runs/clean/manifest.json")
