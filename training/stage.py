"""The train stage: token shards -> dense model -> MoE (upcycled and/or from scratch) -> Hugging Face export,
under the stage contract (``<root>/train/<fingerprint>/``, a done-record per finished run, manifest last).

Runs, in order, each resumable from its latest checkpoint:
1. ``dense`` - trained from scratch on the shards, or imported from a Hugging Face Llama folder
   (``train.dense_source``; then ``dense.steps`` more steps continue it, 0 = import only);
2. ``upcycled`` - the MoE upcycled from the dense run's final weights;
3. ``scratch`` - the same MoE from random weights with its own budget, for comparison.
The ``export`` run's final weights become ``hf/``, a folder ``AutoModelForCausalLM`` loads.

A continuing output (:func:`plan_continued_train`, used by incremental reruns) has one run,
``continued``: the previous output's exported MoE trained further on (appended) token shards.
"""

from __future__ import annotations

import dataclasses
import importlib.metadata
import json
import logging
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

from skymoe.config import PhaseConfig, PipelineConfig, StorageConfig, TrainConfig
from skymoe.stage import (
    DoneRecords,
    Manifest,
    StageRef,
    canonical_json,
    fingerprint,
    read_manifest,
    source_digest,
    write_manifest,
)
from skymoe.storage import Storage, join
from skymoe.training.export import export_hf
from skymoe.training.hf_import import import_llama, llama_args
from skymoe.training.launch import launch
from skymoe.training.model import ModelArgs, parameter_counts
from skymoe.training.plots import comparison_plot, run_plots
from skymoe.training.presets import dense_shape, with_moe
from skymoe.training.spec import RunInit, RunSpec
from skymoe.training.weights import save_args, save_part

STAGE = "train"
CODE_VERSION = "train-{}+{}".format(
    source_digest(Path(__file__).resolve().parent),
    ",".join(f"{name}={importlib.metadata.version(name)}" for name in ("torch", "deepspeed")),
)
log = logging.getLogger("skymoe.train")
T = TypeVar("T")


class TrainError(ValueError):
    """The train stage cannot start: missing tokens, a bad dense source, a model that does not fit the data."""


@dataclass(frozen=True)
class PlannedRun:
    name: str
    phase: PhaseConfig
    init: RunInit
    moe: bool


@dataclass(frozen=True)
class TrainPlan:
    ref: StageRef
    tokens_ref: StageRef
    dense_args: ModelArgs
    moe_args: ModelArgs
    runs: tuple[PlannedRun, ...]
    export: str  # the run whose final weights become hf/


@dataclass(frozen=True)
class TrainResult:
    ref: StageRef
    manifest: Manifest
    cached: bool


def plan_train(config: PipelineConfig, storage: Storage, root: str, tokens_ref: StageRef) -> TrainPlan:
    """Shapes, runs and the fingerprint; fails before any work on a config that cannot train."""
    train = config.train
    seq_len, vocab = _token_shape(storage, tokens_ref)
    _check_devices(train)
    settings = _weight_settings(train)
    if train.dense_source:
        dense = dataclasses.replace(_import_dense(storage, train, llama_args), max_seq_len=seq_len)
        settings["dense_source"] = [storage.checksum(uri) for uri in storage.expand(train.dense_source)
                                    if uri.endswith((".json", ".safetensors"))]
    else:
        dense = dense_shape(train, seq_len, vocab)
    moe = with_moe(dense, train.moe)
    if dense.vocab_size < vocab:
        raise TrainError(f"train.model: vocab_size {dense.vocab_size} is smaller than the tokenizer's {vocab}")
    if dense.dim % dense.n_heads or dense.head_dim % 2:
        raise TrainError(f"train.model: dim {dense.dim} must split into {dense.n_heads} heads of even size")
    fp = fingerprint(STAGE, CODE_VERSION, settings, {"tokenize": tokens_ref.fingerprint})
    ref = StageRef(root, STAGE, fp)
    dense_weights = join(ref.path("runs", "dense"), "final", "weights")
    runs = [PlannedRun("dense", train.dense,
                       RunInit("weights", ref.path("import", "weights")) if train.dense_source else RunInit("random"),
                       moe=False)]
    if train.upcycled is not None:
        runs.append(PlannedRun("upcycled", train.upcycled, RunInit("upcycle", dense_weights), moe=True))
    if train.scratch is not None:
        runs.append(PlannedRun("scratch", train.scratch, RunInit("random"), moe=True))
    return TrainPlan(ref, tokens_ref, dense, moe, tuple(runs), train.export)


def plan_continued_train(config: PipelineConfig, storage: Storage, root: str, tokens_ref: StageRef,
                         previous: StageRef, phase: PhaseConfig) -> TrainPlan:
    """Continue ``previous``'s exported MoE for ``phase`` on ``tokens_ref`` (which must use the
    same tokenizer: an appended tokenize output). The optimizer starts afresh (``phase`` warms
    it up); the aux-loss coefficients restart at ``aux_loss.alpha`` and re-adapt within ~1/(1-beta) steps."""
    earlier = read_manifest(storage, previous)
    if earlier is None:
        raise TrainError(f"cannot continue {previous.uri}: it has no manifest.json")
    seq_len, vocab = _token_shape(storage, tokens_ref)
    _check_devices(config.train)
    moe = dataclasses.replace(ModelArgs(**earlier.extra["moe_args"]), max_seq_len=seq_len)
    if moe.vocab_size < vocab:
        raise TrainError(f"{previous.uri}: its model's vocabulary ({moe.vocab_size}) is smaller than the "
                         f"tokenizer's ({vocab}); continue only on shards made with the same tokenizer")
    settings = _weight_settings(config.train) | {"continued": phase.model_dump(mode="json")}
    fp = fingerprint(STAGE, CODE_VERSION, settings, {"tokenize": tokens_ref.fingerprint, "previous": previous.fingerprint})
    start = join(previous.uri, "runs", earlier.extra["exported_run"], "final", "weights")
    run = PlannedRun("continued", phase, RunInit("weights", start), moe=True)
    return TrainPlan(StageRef(root, STAGE, fp), tokens_ref, ModelArgs(**earlier.extra["dense_args"]), moe, (run,),
                     "continued")


def _token_shape(storage: Storage, tokens_ref: StageRef) -> tuple[int, int]:
    """Sequence length and vocabulary size of a complete tokenize output."""
    tokens = read_manifest(storage, tokens_ref)
    if tokens is None:
        raise TrainError(f"no complete tokenize output at {tokens_ref.uri} (manifest.json missing)")
    return int(tokens.extra["seq_len"]), int(tokens.extra["vocab_size"])


def _weight_settings(train: TrainConfig) -> dict:
    """Everything in the train config that changes the trained weights; logging and the launcher do not."""
    return train.model_dump(mode="json", exclude={"log_every": True, "keep_checkpoints": True, "parallel": {"launcher"}})


def run_train(config: PipelineConfig, storage: Storage, root: str, tokens_ref: StageRef,
              plan: TrainPlan | None = None) -> TrainResult:
    """Run (or resume, or reuse) the train stage."""
    plan = plan or plan_train(config, storage, root, tokens_ref)
    ref = plan.ref
    existing = read_manifest(storage, ref)
    if existing is not None:
        log.info("train: cache hit at %s", ref.uri)
        return TrainResult(ref, existing, cached=True)
    train = config.train
    started = time.monotonic()
    imports = any(run.init.uri == ref.path("import", "weights") for run in plan.runs)
    if imports and not DoneRecords(storage, ref, "import").get("dense"):
        _, state = _import_dense(storage, train, import_llama)
        save_part(storage, ref.path("import", "weights"), "shared", state)
        save_args(storage, ref.path("import", "weights"), plan.dense_args)
        DoneRecords(storage, ref, "import").mark("dense", {"source": train.dense_source})

    done = DoneRecords(storage, ref, "runs")
    with tempfile.TemporaryDirectory(prefix="skymoe-train-") as scratch:
        for run in plan.runs:
            if done.get(run.name) is None:
                args = plan.moe_args if run.moe else plan.dense_args
                done.mark(run.name, execute_run(config.train, config.storage, plan.tokens_ref.uri,
                                                plan.ref.path("runs", run.name), args, run, Path(scratch)))
    summaries = {run.name: done.get(run.name) for run in plan.runs}
    timings = {"runs": round(time.monotonic() - started, 3)}

    export_uri = ref.path("hf")
    export_hf(storage, join(ref.path("runs", plan.export), "final", "weights"), join(tokens_ref.uri, "tokenizer"),
              export_uri)
    plots = _plots(storage, ref, plan)
    timings["total"] = round(time.monotonic() - started, 3)
    counts = {"dense_params": parameter_counts(plan.dense_args)["total"],
              "moe_params_total": parameter_counts(plan.moe_args)["total"],
              "moe_params_activated": parameter_counts(plan.moe_args)["activated"]}
    for name, summary in summaries.items():
        counts[f"{name}_steps"] = summary["steps"]
        counts[f"{name}_tokens"] = summary["tokens"]
        if summary.get("final_loss") is not None:
            counts[f"{name}_final_loss"] = round(summary["final_loss"], 4)
    manifest = Manifest(
        stage=STAGE, fingerprint=ref.fingerprint, code_version=CODE_VERSION,
        config=canonical_json(train.model_dump(mode="json")), inputs={"tokenize": tokens_ref.uri},
        counts=counts, timings=timings,
        extra={"runs": summaries, "export": "hf", "exported_run": plan.export, "plots": plots,
               "dense_args": plan.dense_args.to_dict(), "moe_args": plan.moe_args.to_dict()},
    )
    write_manifest(storage, ref, manifest)
    log.info("train: %s exported to %s", plan.export, export_uri)
    return TrainResult(ref, manifest, cached=False)


def execute_run(train: TrainConfig, storage_config: StorageConfig, tokens_uri: str, run_uri: str, args: ModelArgs,
                run: PlannedRun, scratch: Path) -> dict:
    """One DeepSpeed training run into ``run_uri`` (resumed from its latest checkpoint there), and
    its summary. Plain enough for other callers (the ablations) to run variants of one run."""
    storage = Storage.from_config(storage_config)
    spec = RunSpec(name=run.name, run_uri=run_uri, tokens_uri=tokens_uri, model=args.to_dict(),
                   init=run.init, phase=run.phase.model_dump(mode="json"),
                   train=train.model_dump(mode="json"), storage=storage_config.s3.model_dump(mode="json"),
                   local_dir=str(scratch / run.name))
    started = time.monotonic()
    if run.phase.steps == 0:  # import only: the starting weights are the run's result
        _copy_weights(storage, run.init.uri, join(run_uri, "final", "weights"))
        rows = []
    else:
        launch(spec, train.parallel, scratch / "specs")
        rows = [json.loads(line) for line in storage.read_text(join(run_uri, "metrics.jsonl")).splitlines()]
    losses = [row["loss"] for row in rows if "loss" in row]
    last_val = next((row["val_loss"] for row in reversed(rows) if "val_loss" in row), None)
    tokens = max((row["tokens"] for row in rows), default=0)
    return {"steps": run.phase.steps, "tokens": tokens, "final_loss": losses[-1] if losses else None,
            "final_val_loss": last_val, "seconds": round(time.monotonic() - started, 1), "uri": run_uri}


def _check_devices(train: TrainConfig) -> None:
    import torch

    if torch.cuda.is_available() and train.parallel.world_size > torch.cuda.device_count():
        raise TrainError(f"train.parallel.world_size {train.parallel.world_size} exceeds the "
                         f"{torch.cuda.device_count()} GPUs of this machine (one rank per GPU)")


def _copy_weights(storage: Storage, source: str, target: str) -> None:
    for uri in storage.listdir(source):
        storage.write_bytes(join(target, uri.rsplit("/", 1)[1]), storage.read_bytes(uri))


def _import_dense(storage: Storage, train: TrainConfig, read: Callable[[Storage, str], T]) -> T:
    """``read`` (the shape only, or shape and weights) with errors that name the config field."""
    try:
        return read(storage, train.dense_source)
    except ValueError as err:
        raise TrainError(f"train.dense_source: {err}") from None


def _plots(storage: Storage, ref: StageRef, plan: TrainPlan) -> list[str]:
    """Per-run panels and the loss curves of all runs against tokens, as PNGs in ``plots/``."""
    histories = {}
    for run in plan.runs:
        metrics_uri = join(ref.path("runs", run.name), "metrics.jsonl")
        if storage.exists(metrics_uri):
            histories[run.name] = [json.loads(line) for line in storage.read_text(metrics_uri).splitlines()]
    written = []
    for name, rows in histories.items():
        for plot_name, png in run_plots(name, rows).items():
            storage.write_bytes(ref.path("plots", plot_name), png)
            written.append(f"plots/{plot_name}")
    if histories:
        storage.write_bytes(ref.path("plots", "loss_curves.png"), comparison_plot(histories))
        written.insert(0, "plots/loss_curves.png")
    return written
