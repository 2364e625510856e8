"""One training run, as the train stage and the ablations both execute it: a DeepSpeed launch into
a run folder (resumed from its latest checkpoint there), and the summary read back from its metrics.

The ablations key their cached runs on :data:`RUN_CODE_VERSION`, the code that decides a run's
bytes, rather than on the whole train stage's code: how the stage lists, exports and records its
output changes no run, and must not discard hours of cached ablation runs.
"""

from __future__ import annotations

import json
import shutil
import statistics
import time
from dataclasses import dataclass
from pathlib import Path

from skymoe.config import PhaseConfig, StorageConfig, TrainConfig
from skymoe.stage import code_digest
from skymoe.storage import Storage, join
from skymoe.training.launch import launch
from skymoe.training.model import ModelArgs
from skymoe.training.nodes import NodeBoard
from skymoe.training.spec import RunInit, RunSpec

# The modules whose source decides a run's weights and metrics, and the libraries that do.
RUN_MODULES = tuple(f"skymoe.training.{module}" for module in (
    "runs", "checkpoint", "data", "launch", "metrics", "model", "parallel", "presets", "schedule", "spec",
    "trainer", "upcycle", "weights"))
RUN_LIBRARIES = ("torch", "deepspeed")
RUN_CODE_VERSION = f"run-{code_digest(RUN_MODULES, RUN_LIBRARIES)}"


@dataclass(frozen=True)
class PlannedRun:
    name: str
    phase: PhaseConfig
    init: RunInit
    moe: bool


def execute_run(train: TrainConfig, storage_config: StorageConfig, tokens_uri: str, run_uri: str, args: ModelArgs,
                run: PlannedRun, scratch: Path, protect_every_steps: int | None = None) -> dict:
    """One DeepSpeed training run into ``run_uri`` (resumed from its latest checkpoint there), and
    its summary. Plain enough for other callers (the ablations) to run variants of one run.
    Checkpoints at multiples of ``protect_every_steps`` outlive ``train.keep_checkpoints`` (the
    evaluate stage reads them)."""
    storage = Storage.from_config(storage_config)
    spec = RunSpec(name=run.name, run_uri=run_uri, tokens_uri=tokens_uri, model=args.to_dict(),
                   init=run.init, phase=run.phase.model_dump(mode="json"),
                   train=train.model_dump(mode="json"), storage=storage_config.s3.model_dump(mode="json"),
                   local_dir=str(scratch / run.name), protect_every_steps=protect_every_steps)
    started = time.monotonic()
    if run.phase.steps == 0:  # import only: the starting weights are the run's result
        _copy_weights(storage, run.init.uri, join(run_uri, "final", "weights"))
        rows = []
    else:
        launch(spec, train.parallel, scratch / "specs", NodeBoard(storage, storage_config.root))
        rows = [json.loads(line) for line in storage.read_text(join(run_uri, "metrics.jsonl")).splitlines()]
    losses = [row["loss"] for row in rows if "loss" in row]
    last_val = next((row["val_loss"] for row in reversed(rows) if "val_loss" in row), None)
    tokens = max((row["tokens"] for row in rows), default=0)
    return {"steps": run.phase.steps, "tokens": tokens, "final_loss": losses[-1] if losses else None,
            "final_val_loss": last_val, "seconds": round(time.monotonic() - started, 1), "uri": run_uri,
            **utilisation_summary(rows)}


def utilisation_summary(rows: list[dict]) -> dict:
    """Median MFU (data-sheet peak; None without one) and ``mfu_vs_measured_matmul`` over a run's
    steps, leaving out the first, which pays for warm-up; with the peak per device they were taken
    against. Empty for a run without steps."""
    steps = [row for row in rows if "mfu_vs_measured_matmul" in row]
    steps = steps[1:] or steps
    if not steps:
        return {}
    spec = [row["mfu"] for row in steps if row["mfu"] is not None]
    return {"mfu": statistics.median(spec) if spec else None, "peak_tflops": steps[-1]["peak_tflops"],
            "mfu_vs_measured_matmul": statistics.median(row["mfu_vs_measured_matmul"] for row in steps)}


def _copy_weights(storage: Storage, source: str, target: str) -> None:
    """Streamed file by file: an imported checkpoint can be larger than memory."""
    for uri in storage.listdir(source):
        with storage.open_read(uri) as reader, storage.open_write(join(target, uri.rsplit("/", 1)[1])) as writer:
            shutil.copyfileobj(reader, writer, 1 << 24)
