"""Checkpoints on S3 travel file by file in bounded parts: saving and resuming a checkpoint with a
256 MiB DeepSpeed file against a real S3 server (moto on 127.0.0.1) grows the process's memory by
at most three times the parts in flight (a part's bytes, the HTTP client's buffer and the copy being
written; measured: save 68 MiB, load 79-87 MiB), whatever the file's size; the round trip is byte-identical and the upload was multipart. The same measurement around a
whole-file read shows it would catch the old way.

The client runs in its own process (the moto server lives in this one), with a stand-in for the
DeepSpeed engine that writes and hashes its file a block at a time, so only the transfer shows."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from skymoe.training.checkpoint import TRANSFER_CONCURRENCY, TRANSFER_PART_BYTES

MiB = 1 << 20
SIZE = 256 * MiB

CLIENT = r"""
import hashlib, json, os, sys, threading, types
import numpy as np
import psutil
import torch.distributed as dist
from skymoe.storage import Storage, join
from skymoe.training import checkpoint
from skymoe.training.model import ModelArgs, Transformer

out, run_uri, size = sys.argv[1], sys.argv[2], int(sys.argv[3])
dist.init_process_group("gloo", init_method=f"file://{out}/store", rank=0, world_size=1)
BLOCK = 1 << 20
FILE = "mp_rank_00_model_states.pt"


class BlockEngine:
    # checkpoint.save/load's two engine calls, on one file of pseudo-random bytes written and read a block at a time.
    def __init__(self, size):
        self.size, self.checkpoint_engine, self.written, self.loaded = size, types.SimpleNamespace(), None, None

    def save_checkpoint(self, save_dir, tag, save_latest):
        os.makedirs(os.path.join(save_dir, tag), exist_ok=True)
        digest, rng = hashlib.sha256(), np.random.default_rng(self.size)
        with open(os.path.join(save_dir, tag, FILE), "wb") as handle:
            for _ in range(self.size // BLOCK):
                block = rng.bytes(BLOCK)
                digest.update(block)
                handle.write(block)
        self.written = digest.hexdigest()

    def load_checkpoint(self, load_dir, tag, load_module_strict):
        digest = hashlib.sha256()
        with open(os.path.join(load_dir, tag, FILE), "rb") as handle:
            for block in iter(lambda: handle.read(BLOCK), b""):
                digest.update(block)
        self.loaded = digest.hexdigest()


class PeakRss:
    # The highest resident set size above the one on entry, sampled every millisecond.
    def __enter__(self):
        self.process, self.stop = psutil.Process(), threading.Event()
        self.base = self.peak = self.process.memory_info().rss
        self.thread = threading.Thread(target=self._sample)
        self.thread.start()
        return self

    def _sample(self):
        while not self.stop.wait(0.001):
            self.peak = max(self.peak, self.process.memory_info().rss)

    def __exit__(self, *exc):
        self.stop.set()
        self.thread.join()
        self.growth = self.peak - self.base


storage, model, local = Storage(), Transformer(ModelArgs(vocab_size=32, dim=16, n_layers=1, n_heads=2, ffn_dim=32,
                                                          max_seq_len=8)), os.path.join(out, "local")
warm = BlockEngine(BLOCK)  # imports, connections and code paths warmed up on a small checkpoint
checkpoint.save(storage, run_uri, local, warm, model, 1, {})
checkpoint.load(storage, run_uri, local, warm, 1)
engine = BlockEngine(size)
with PeakRss() as save:
    checkpoint.save(storage, run_uri, local, engine, model, 2, {})
with PeakRss() as load:
    checkpoint.load(storage, run_uri, local, engine, 2)
with PeakRss() as whole:
    data = storage.read_bytes(join(checkpoint.checkpoints_uri(run_uri), checkpoint.tag(2), FILE))
    del data
print(json.dumps({"save": save.growth, "load": load.growth, "whole_read": whole.growth, "written": engine.written,
                  "loaded": engine.loaded}))
dist.destroy_process_group()
"""


def test_s3_checkpoints_stream_with_flat_memory(bucket, tmp_path):
    client, name = bucket
    run_uri = f"s3://{name}/streaming/{tmp_path.name}/run"
    done = subprocess.run([sys.executable, "-c", CLIENT, str(tmp_path), run_uri, str(SIZE)], capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    print({key: f"{value / MiB:.1f} MiB" for key, value in result.items() if isinstance(value, int)})

    assert result["loaded"] == result["written"]  # the file DeepSpeed reads on resume is the one it wrote
    bound = 3 * TRANSFER_CONCURRENCY * TRANSFER_PART_BYTES + 16 * MiB
    assert bound < SIZE // 2
    for phase in ("save", "load"):
        assert result[phase] < bound, (phase, result)
    assert result["whole_read"] > SIZE * 0.9, result  # the measurement sees a whole-file read

    key = f"streaming/{tmp_path.name}/run/checkpoints/step-0000002/mp_rank_00_model_states.pt"
    head = client.head_object(Bucket=name, Key=key)
    assert head["ContentLength"] == SIZE
    assert head["ETag"].strip('"').endswith(f"-{SIZE // TRANSFER_PART_BYTES}")  # uploaded in parts
    assert not list(Path(tmp_path, "local", "deepspeed").glob("step-*"))  # staged copies are removed
