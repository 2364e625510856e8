"""The cleaning stage and the catalog against a real S3-compatible server (moto on 127.0.0.1)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from conftest import run_stage, upload_folder, write_config
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
