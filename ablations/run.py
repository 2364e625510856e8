"""Planning and running one ablation, without Prefect: tokens, then one training run per (variant, seed).

Tokens come from the clean and tokenize stages (cached under the same root, so shared with
``skymoe run``). Each variant's runs live at ``<root>/ablate/<ablation>/<fingerprint>/seed-<s>/``;
the fingerprint covers what changes the trained weights (the variant's train settings, phase,
initialisation, model shape, the tokens and the code a run executes, ``RUN_CODE_VERSION``) but not
the seed, so asking for more seeds adds folders next to the finished ones. A finished run leaves a
done-record (``_done/seeds/seed-<s>.json``) after its weights and metrics: a rerun skips it, and an
interrupted run resumes from its last checkpoint (``skymoe.training.runs.execute_run``).
"""

from __future__ import annotations

import dataclasses
import logging
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from skymoe.ablations.gates import gate_profile
from skymoe.ablations.variants import SIZES, Size, Variant, sized_train, variants
from skymoe.config import PLACEMENT_FIELDS, ConfigError, PipelineConfig, StorageConfig, TrainConfig
from skymoe.pipeline import run_pipeline
from skymoe.progress import Progress
from skymoe.stage import DoneRecords, StageRef, canonical_json, fingerprint, read_manifest
from skymoe.storage import Storage, join
from skymoe.training.checkpoint import checkpoints_uri, tag
from skymoe.training.model import ModelArgs, training_flops_per_token
from skymoe.training.presets import dense_shape, with_moe
from skymoe.training.spec import RunInit
from skymoe.training.runs import RUN_CODE_VERSION, PlannedRun, execute_run

log = logging.getLogger("skymoe.ablate")

STEPPED = ("gating-norm", "aux-coef")  # the ablations whose runs all share the size's MoE budget (--steps)

# Train fields that cannot change a run's weights, or that the variant's phase replaces.
_NOT_FINGERPRINTED = {"seed": True, "log_every": True, "keep_checkpoints": True, "parallel": set(PLACEMENT_FIELDS),
                      "dense": True, "upcycled": True, "scratch": True, "export": True, "dense_source": True}


@dataclass(frozen=True)
class AblationRun:
    """One (variant, seed) training run and everything ``execute_run`` needs for it."""

    ablation: str
    variant: Variant
    seed: int
    ref: StageRef  # the variant's folder: <root>/ablate/<ablation>/<fingerprint>
    train: TrainConfig
    args: ModelArgs
    tokens_uri: str
    init_uri: str | None
    protect_every_steps: int | None = None  # checkpoints other runs start from outlive checkpoint retention

    @property
    def key(self) -> str:
        return f"seed-{self.seed}"

    @property
    def uri(self) -> str:
        return self.ref.path(self.key)

    @property
    def label(self) -> str:
        return f"{self.variant.name} seed {self.seed}"

    def planned(self) -> PlannedRun:
        init = RunInit("upcycle", self.init_uri) if self.variant.init == "upcycle" else RunInit("random")
        return PlannedRun(f"{self.variant.name.replace('/', '-')}-{self.key}", self.variant.phase, init,
                          self.variant.moe)


@dataclass(frozen=True)
class AblationPlan:
    ablation: str
    size: str
    seeds: int
    tokens_ref: StageRef
    variants: tuple[Variant, ...]
    runs: tuple[AblationRun, ...]  # sources (the init ablation's dense runs) before the runs that read them
    tokens_per_step: int
    flops: tuple[float, float]  # training FLOPs per token of the MoE and of the dense shape

    @property
    def report_uri(self) -> str:
        return join(self.tokens_ref.root, "ablate", self.ablation, f"report-{self.size}")


def size_of(smoke: bool, preset: str | None) -> str:
    """The size name from the CLI's flags: ``--smoke`` wins, then ``--preset``, else ``cpu``."""
    name = "smoke" if smoke else preset or "cpu"
    if name not in SIZES:
        raise ConfigError(f"unknown ablation preset {name!r}: expected one of {', '.join(SIZES)}")
    return name


def size_for(ablation: str, size: str, steps: int | None) -> tuple[Size, str]:
    """The size ``size`` with its MoE budget set to ``steps`` (None: the size's own), and its label for
    the report (``cpu``, or ``cpu-960steps`` when the budget was changed: a separate report)."""
    if steps is None:
        return SIZES[size], size
    if ablation not in STEPPED:
        raise ConfigError(f"--steps sets the MoE budget of {' and '.join(STEPPED)}; {ablation} has its own budgets")
    if steps < 1:
        raise ConfigError(f"--steps must be >= 1, got {steps}")
    return dataclasses.replace(SIZES[size], moe_steps=steps), f"{size}-{steps}steps"


def seeds_for(seeds: int | None, size: str) -> int:
    """The seeds per variant: as asked, or the size's default (8 for ``cpu``) when None."""
    return SIZES[size].seeds if seeds is None else seeds


def check_ablation(config: PipelineConfig, ablation: str, seeds: int | None, size: str,
                   steps: int | None = None) -> None:
    """Everything that can fail before tokens exist: the ablation name, seeds, steps, and every variant's config."""
    seeds = seeds_for(seeds, size)
    if seeds < 1:
        raise ConfigError(f"--seeds must be >= 1, got {seeds}")
    sized, _ = size_for(ablation, size, steps)
    train = sized_train(config.train, sized)
    for variant in variants(ablation, train, sized):
        variant.train_config(train, 0)


def prepare_tokens(config: PipelineConfig, storage: Storage) -> StageRef:
    """The clean and tokenize stages' output for ``config`` (cache hits when ``skymoe run`` made them)."""
    return run_pipeline(config, storage, ("clean", "tokenize"))[-1].ref


def plan_ablation(config: PipelineConfig, storage: Storage, ablation: str, tokens_ref: StageRef, seeds: int | None,
                  size_name: str, steps: int | None = None) -> AblationPlan:
    """Every run of ``ablation`` with its fingerprinted folder; cheap, touches no weights.

    Runs are paired by seed: run (variant, s) trains with seed s - the initial weights and the data
    order - and an upcycled run starts from the dense run of seed s, so the report can test the
    per-seed differences between variants. ``seeds`` None = the size's default; ``steps`` None = the
    size's MoE budget."""
    size, label = size_for(ablation, size_name, steps)
    seeds = seeds_for(seeds, size_name)
    tokens = read_manifest(storage, tokens_ref)
    if tokens is None:
        raise ConfigError(f"no complete tokenize output at {tokens_ref.uri}")
    seq_len, vocab = int(tokens.extra["seq_len"]), int(tokens.extra["vocab_size"])
    base = sized_train(config.train, size)
    dense = dense_shape(base, seq_len, vocab)
    flops = (training_flops_per_token(with_moe(dense, base.moe), seq_len), training_flops_per_token(dense, seq_len))
    grid = variants(ablation, base, size, *flops)
    refs: dict[str, StageRef] = {}
    runs: list[AblationRun] = []
    read_steps = {v.source: v.source_step for v in grid if v.source is not None and v.source_step is not None}
    for variant in grid:
        train = variant.train_config(base, 0)
        args = with_moe(dense_shape(train, seq_len, vocab), train.moe) if variant.moe else dense_shape(train, seq_len,
                                                                                                       vocab)
        settings = {"train": train.model_dump(mode="json", exclude=_NOT_FINGERPRINTED),
                    "phase": variant.phase.model_dump(mode="json"), "moe": variant.moe, "model": args.to_dict(),
                    "init": variant.init, "source_step": variant.source_step}
        inputs = {"tokenize": tokens_ref.fingerprint}
        if variant.source is not None:
            inputs["source"] = refs[variant.source].fingerprint
        refs[variant.name] = StageRef(tokens_ref.root, f"ablate/{ablation}",
                                      fingerprint(f"ablate-{ablation}", RUN_CODE_VERSION, settings, inputs))
        for seed in range(seeds):
            init_uri = None
            if variant.source is not None:
                source = refs[variant.source].path(f"seed-{seed}")
                init_uri = join(checkpoints_uri(source), tag(variant.source_step), "weights") \
                    if variant.source_step is not None else join(source, "final", "weights")
            runs.append(AblationRun(ablation, variant, seed, refs[variant.name], variant.train_config(base, seed),
                                    args, tokens_ref.uri, init_uri, read_steps.get(variant.name)))
    tokens_per_step = base.micro_batch_size * base.grad_accum * base.parallel.world_size * seq_len
    return AblationPlan(ablation, label, seeds, tokens_ref, tuple(grid), tuple(runs), tokens_per_step, flops)


def done_record(storage: Storage, run: AblationRun) -> dict[str, Any] | None:
    return DoneRecords(storage, run.ref, "seeds").get(run.key)


def train_run(run: AblationRun, storage_config: StorageConfig) -> dict[str, Any]:
    """Train one (variant, seed) run unless its done-record exists; its record (summary, gate profile)."""
    storage = Storage.from_config(storage_config)
    record = done_record(storage, run)
    if record is not None:
        return record
    storage.write_text(run.ref.path("variant.json"), canonical_json(
        {"ablation": run.ablation, "variant": run.variant.name, "phase": run.variant.phase.model_dump(mode="json"),
         "settings": run.variant.settings, "init": run.variant.init, "source_step": run.variant.source_step}))
    with tempfile.TemporaryDirectory(prefix="skymoe-ablate-") as scratch:
        summary = execute_run(run.train, storage_config, run.tokens_uri, run.uri, run.args, run.planned(),
                              Path(scratch), protect_every_steps=run.protect_every_steps)
    gates = gate_profile(storage, join(run.uri, "final", "weights"), run.tokens_uri) if run.variant.moe else None
    record = {**summary, "variant": run.variant.name, "seed": run.seed, "gates": gates}
    DoneRecords(storage, run.ref, "seeds").mark(run.key, record)
    return record


Runner = Callable[[AblationRun], dict[str, Any]]


def execute_plan(plan: AblationPlan, storage: Storage, runner: Runner) -> tuple[dict[tuple[str, int], dict], list[str]]:
    """Every run of the plan through ``runner`` (``train_run``, or the flow's Prefect task around it),
    in order; the records by (variant, seed) and the labels of the runs that had to train."""
    pending = [run.label for run in plan.runs if done_record(storage, run) is None]
    log.info("ablate %s (%s, %d seeds): %d runs, %d cached, %d to train", plan.ablation, plan.size, plan.seeds,
             len(plan.runs), len(plan.runs) - len(pending), len(pending))
    progress = Progress(f"ablate/{plan.ablation}", len(pending), "runs", log, every_s=0)
    records = {}
    for run in plan.runs:
        fresh = run.label in pending
        records[(run.variant.name, run.seed)] = runner(run)
        if fresh:
            progress.update()
    progress.close()
    return records, pending
