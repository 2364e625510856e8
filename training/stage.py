"""The train stage: token shards -> dense model -> MoE (upcycled and/or from scratch) -> Hugging Face export,
under the stage contract (``<root>/train/<fingerprint>/``, a done-record per finished run, manifest last).

Runs, in order, each resumable from its latest checkpoint:
1. ``dense`` - trained from scratch on the shards, or imported from a Hugging Face Llama folder
   (``train.dense_source``; then ``dense.steps`` more steps continue it, 0 = import only);
2. ``upcycled`` - the MoE upcycled from the dense run's final weights;
3. ``scratch`` - the same MoE from random weights with its own budget, for comparison.
The ``export`` run's final weights become ``hf/``, a folder ``AutoModelForCausalLM`` loads.

A continuing output (an incremental generation) has one run, ``continued``: the previous
output's exported MoE trained further on the appended token shards.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import tempfile
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

from skymoe.config import PLACEMENT_FIELDS, PipelineConfig, TokenizeConfig, TrainConfig, describe_path
from skymoe.stage import (Continuation, DoneRecords, Plan, Stage, StageOutput, StageRef, file_problem,
                          folder_entries, read_manifest)
from skymoe.storage import Storage, join
from skymoe.training.export import export_hf
from skymoe.training.hf_import import SequenceLengthError, checkpoint_args, import_checkpoint
from skymoe.training.flops import peak_override
from skymoe.training.model import ModelArgs, parameter_counts
from skymoe.training.plots import comparison_plot, run_plots
from skymoe.training.presets import dense_shape, with_moe
from skymoe.training.runs import RUN_LIBRARIES, RUN_MODULES, PlannedRun, execute_run
from skymoe.training.spec import RunInit
from skymoe.training.weights import save_args, save_part

log = logging.getLogger("skymoe.train")
T = TypeVar("T")


class TrainError(ValueError):
    """The train stage cannot start: missing tokens, a bad dense source, a model that does not fit the data."""


@dataclass(frozen=True)
class TrainWork:
    tokens_ref: StageRef
    dense_args: ModelArgs
    moe_args: ModelArgs
    runs: tuple[PlannedRun, ...]
    export: str  # the run whose final weights become hf/


class TrainStage(Stage):
    """Token shards -> dense model -> MoE runs -> a Hugging Face export."""

    name = "train"
    upstream = ("tokenize",)
    section = "train"
    # Everything that changes the weights or the exported files; the plots module is left out.
    code = RUN_MODULES + tuple(f"skymoe.training.{module}" for module in (
        "stage", "export", "hf_import", "hf.modeling_skymoe"))
    libraries = RUN_LIBRARIES

    def check(self, config: PipelineConfig, storage: Storage) -> None:
        """Besides the devices: a dense checkpoint that cannot be imported, or that does not fit the
        tokenizer or the sequence length, fails here, before cleaning starts."""
        _check_devices(config.train)
        _check_peak_override()
        if config.train.dense_source:
            try:
                dense = _import_dense(storage, config.train, config.tokenize.seq_len, checkpoint_args)
            except TrainError as err:
                raise TrainError(f"{err}; written as {describe_path(config, 'train.dense_source')}") from None
            ids, field = _tokenizer_ids(storage, config.tokenize)
            _check_vocab(ids, field, dense.vocab_size, f"train.dense_source ({config.train.dense_source})")
            if ids < dense.vocab_size:
                log.warning("train: %s gives %d token ids, train.dense_source's vocab_size is %d: the last %d "
                            "embedding rows are never an input (as in a vocabulary padded to a round size; "
                            "otherwise check that this is the checkpoint's own tokenizer)",
                            field, ids, dense.vocab_size, dense.vocab_size - ids)

    def plan(self, config: PipelineConfig, storage: Storage, upstream: Mapping[str, StageRef],
             continues: Continuation | None = None) -> list[Plan]:
        """Shapes, runs and the fingerprint; fails before any work on a config that cannot train."""
        if continues is not None:
            return [_continued_plan(self, config, storage, upstream["tokenize"], continues.previous["train"])]
        train, tokens_ref = config.train, upstream["tokenize"]
        seq_len, vocab = _token_shape(storage, tokens_ref)
        _check_devices(train)
        _check_peak_override()
        settings = _weight_settings(train)
        if train.dense_source:
            dense = _import_dense(storage, train, seq_len, checkpoint_args)
            settings["dense_source"] = [storage.checksum(uri) for uri in storage.expand(train.dense_source)
                                        if uri.endswith((".json", ".safetensors"))]
        else:
            dense = dense_shape(train, seq_len, vocab)
        moe = with_moe(dense, train.moe)
        _check_vocab(vocab, _tokenizer_field(config.tokenize), dense.vocab_size,
                     f"train.dense_source ({train.dense_source})" if train.dense_source else "train.model.vocab_size")
        if dense.dim % dense.n_heads or dense.head_dim % 2:
            raise TrainError(f"train.model: dim {dense.dim} must split into {dense.n_heads} heads of even size")
        plan = self.make_plan(config, settings, {"tokenize": tokens_ref.fingerprint}, {"tokenize": tokens_ref})
        dense_weights = join(plan.ref.path("runs", "dense"), "final", "weights")
        runs = [PlannedRun("dense", train.dense, RunInit("weights", plan.ref.path("import", "weights"))
                           if train.dense_source else RunInit("random"), moe=False)]
        if train.upcycled is not None:
            runs.append(PlannedRun("upcycled", train.upcycled, RunInit("upcycle", dense_weights), moe=True))
        if train.scratch is not None:
            runs.append(PlannedRun("scratch", train.scratch, RunInit("random"), moe=True))
        return [dataclasses.replace(plan, work=TrainWork(tokens_ref, dense, moe, tuple(runs), train.export))]

    def run(self, plan: Plan, storage: Storage) -> StageOutput:
        return _run(plan.config, storage, plan.ref, plan.work)


def _continued_plan(stage: TrainStage, config: PipelineConfig, storage: Storage, tokens_ref: StageRef,
                    previous: StageRef) -> Plan:
    """Continue ``previous``'s exported MoE for ``incremental.train_tokens`` on ``tokens_ref`` (which
    must use the same tokenizer: an appended tokenize output). The optimizer starts afresh (the phase
    warms it up); the aux-loss coefficients restart at ``aux_loss.alpha`` and re-adapt within
    ~1/(1-beta) steps."""
    earlier = read_manifest(storage, previous)
    if earlier is None:
        raise TrainError(f"cannot continue {previous.uri}: it has no manifest.json")
    seq_len, vocab = _token_shape(storage, tokens_ref)
    _check_devices(config.train)
    moe = dataclasses.replace(ModelArgs(**earlier.extra["moe_args"]), max_seq_len=seq_len)
    if moe.vocab_size < vocab:
        raise TrainError(f"{previous.uri}: its model's vocabulary ({moe.vocab_size}) is smaller than the "
                         f"tokenizer's ({vocab}); continue only on shards made with the same tokenizer")
    phase = config.incremental.phase(config.train, seq_len)
    settings = _weight_settings(config.train) | {"continued": phase.model_dump(mode="json")}
    start = join(previous.uri, "runs", earlier.extra["exported_run"], "final", "weights")
    run = PlannedRun("continued", phase, RunInit("weights", start), moe=True)
    work = TrainWork(tokens_ref, ModelArgs(**earlier.extra["dense_args"]), moe, (run,), "continued")
    return stage.make_plan(config, settings, {"tokenize": tokens_ref.fingerprint, "previous": previous.fingerprint},
                           {"tokenize": tokens_ref, "previous": previous}, work=work)


def _token_shape(storage: Storage, tokens_ref: StageRef) -> tuple[int, int]:
    """Sequence length and vocabulary size of a complete tokenize output."""
    tokens = read_manifest(storage, tokens_ref)
    if tokens is None:
        raise TrainError(f"no complete tokenize output at {tokens_ref.uri} (manifest.json missing)")
    return int(tokens.extra["seq_len"]), int(tokens.extra["vocab_size"])


def _weight_settings(train: TrainConfig) -> dict:
    """Everything in the train config that changes the trained weights; logging and the launcher do not."""
    return train.model_dump(mode="json", exclude={"log_every": True, "keep_checkpoints": True,
                                                  "parallel": set(PLACEMENT_FIELDS)})


def _run(config: PipelineConfig, storage: Storage, ref: StageRef, work: TrainWork) -> StageOutput:
    """Every planned run in order, each skipped when its done-record exists, then the export."""
    train = config.train
    started = time.monotonic()
    imports = any(run.init.uri == ref.path("import", "weights") for run in work.runs)
    if imports and not DoneRecords(storage, ref, "import").get("dense"):
        _, state = _import_dense(storage, train, work.dense_args.max_seq_len, import_checkpoint)
        save_part(storage, ref.path("import", "weights"), "shared", state)
        save_args(storage, ref.path("import", "weights"), work.dense_args)
        DoneRecords(storage, ref, "import").mark("dense", {"source": train.dense_source})

    # The evaluate stage reads the exported run's checkpoints at these steps: retention keeps them.
    protect = train.checkpoint_every * config.evaluate.checkpoint_every if config.evaluate.checkpoint_every else None
    done = DoneRecords(storage, ref, "runs")
    exported = DoneRecords(storage, ref, "export")
    with tempfile.TemporaryDirectory(prefix="skymoe-train-") as scratch:
        for run in work.runs:
            record = done.get(run.name)
            if record is not None and run.name == work.export and exported.get("hf") is None \
                    and not _unchanged(storage, ref, record["files"]):
                # Reuse checks a large output by size: a same-size change must not be exported and vouched for.
                log.warning("train: the final weights of %s changed since the run wrote them; resuming the run "
                            "from its last checkpoint to write them again", run.name)
                record = None
            if record is None:
                args = work.moe_args if run.moe else work.dense_args
                summary = execute_run(train, config.storage, work.tokens_ref.uri, ref.path("runs", run.name), args,
                                      run, Path(scratch),
                                      protect_every_steps=protect if run.name == work.export else None)
                done.mark(run.name, summary | {"files": folder_entries(storage, ref, _final(ref, run.name))})
    summaries = {run.name: done.get(run.name) for run in work.runs}
    timings = {"runs": round(time.monotonic() - started, 3)}

    export_uri = ref.path("hf")
    if exported.get("hf") is None:
        source = summaries[work.export]["files"]
        export_hf(storage, join(_final(ref, work.export), "weights"), join(work.tokens_ref.uri, "tokenizer"),
                  export_uri)
        exported.mark("hf", {"run": work.export, "source": [entry["path"] for entry in source],
                             "files": folder_entries(storage, ref, export_uri)})
    # What later stages and generations read, as the done-records vouch for it: each run's final
    # weights and the export. A damaged file drops only the records that name it: its run's (the run
    # resumes from its last checkpoint and writes the same weights again) and, for the exported run's
    # weights or the export itself, the export's (which is redone).
    served = [entry for summary in summaries.values() for entry in summary["files"]] + exported.get("hf")["files"]
    counts = {"dense_params": parameter_counts(work.dense_args)["total"],
              "moe_params_total": parameter_counts(work.moe_args)["total"],
              "moe_params_activated": parameter_counts(work.moe_args)["activated"]}
    for name, summary in summaries.items():
        counts[f"{name}_steps"] = summary["steps"]
        counts[f"{name}_tokens"] = summary["tokens"]
        if summary.get("final_loss") is not None:
            counts[f"{name}_final_loss"] = round(summary["final_loss"], 4)
        for key in ("mfu", "mfu_vs_measured_matmul"):
            if summary.get(key) is not None:
                counts[f"{name}_{key}"] = round(summary[key], 4)
    log.info("train: %s exported to %s", work.export, export_uri)
    return StageOutput(counts=counts, timings=timings, extra={
        "runs": summaries, "export": "hf", "exported_run": work.export, "files": served,
        "plots": _plots(storage, ref, work),
        "dense_args": work.dense_args.to_dict(), "moe_args": work.moe_args.to_dict(),
        "summary": {"export": export_uri}})


def _final(ref: StageRef, run: str) -> str:
    return ref.path("runs", run, "final")


def _unchanged(storage: Storage, ref: StageRef, entries: list[dict]) -> bool:
    """Whether the files are the bytes a done-record lists (size, then checksum)."""
    return not any(file_problem(storage, ref.path(entry["path"]), entry["bytes"], entry["checksum"], deep=True)
                   for entry in entries)


def _check_devices(train: TrainConfig) -> None:
    import torch

    parallel = train.parallel
    if torch.cuda.is_available() and parallel.ranks_per_node > torch.cuda.device_count():
        raise TrainError(f"train.parallel: {parallel.ranks_per_node} ranks per node (world_size {parallel.world_size} "
                         f"over {parallel.nodes} nodes) exceed the {torch.cuda.device_count()} GPUs of this machine "
                         "(one rank per GPU)")


def _check_peak_override() -> None:
    """A malformed ``SKYMOE_PEAK_TFLOPS`` fails at plan time, not in every rank after start-up."""
    try:
        peak_override()
    except ValueError as err:
        raise TrainError(f"{err} (read from the environment)") from None


def _import_dense(storage: Storage, train: TrainConfig, seq_len: int, read: Callable[[Storage, str, int], T]) -> T:
    """``read`` (the shape only, or shape and weights) with errors that name the config fields."""
    try:
        return read(storage, train.dense_source, seq_len)
    except SequenceLengthError as err:
        raise TrainError(f"tokenize.seq_len {seq_len} is too long for train.dense_source: {err}") from None
    except ValueError as err:
        raise TrainError(f"train.dense_source: {err}") from None


def _tokenizer_field(tokenize: TokenizeConfig) -> str:
    """The field that decides the tokenizer's size: a given tokenizer, or the size to train."""
    return "tokenize.tokenizer.path" if tokenize.tokenizer.path else "tokenize.tokenizer.vocab_size"


def _tokenizer_ids(storage: Storage, tokenize: TokenizeConfig) -> tuple[int, str]:
    """The ids the tokenize stage's tokenizer will have, known before it runs (a trained one has at
    most ``vocab_size``), and the field that decides it. The tokenize stage's own check has refused a
    tokenizer it cannot load."""
    path = tokenize.tokenizer.path
    if not path:
        return tokenize.tokenizer.vocab_size, _tokenizer_field(tokenize)
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_str(storage.read_text(path if path.endswith(".json") else join(path, "tokenizer.json")))
    return tokenizer.get_vocab_size(), _tokenizer_field(tokenize)


def _check_vocab(tokenizer_ids: int, tokenizer_field: str, model_vocab: int, model_field: str) -> None:
    """A token id past the embedding would fail the first batch that holds it. (A tokenizer smaller
    than the embedding only leaves rows unused.)"""
    if tokenizer_ids > model_vocab:
        raise TrainError(f"{tokenizer_field}: the tokenizer has {tokenizer_ids} token ids, more than the vocab_size "
                         f"{model_vocab} of {model_field}; use a tokenizer whose ids fit the model (for an imported "
                         "checkpoint its own, with no tokens added)")


def _plots(storage: Storage, ref: StageRef, work: TrainWork) -> list[str]:
    """Per-run panels and the loss curves of all runs against tokens, as PNGs in ``plots/``."""
    histories = {}
    for run in work.runs:
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


STAGE = TrainStage()
