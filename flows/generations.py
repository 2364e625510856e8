"""Incremental reruns over an input prefix: which files are new, and the record of each generation.

A *series* is the pipeline applied again and again to one set of inputs (``clean.inputs``, e.g. a
prefix files land in). Generation 0 is an ordinary full run: the same outputs as ``skymoe run``
on those inputs, so it is a cache hit when that already ran. Each later generation
- cleans only the files not seen before, deduplicated against everything earlier generations kept;
- tokenizes them with the first generation's tokenizer, appending their shards to the previous index;
- continues the previous generation's exported MoE for ``incremental.train_tokens`` tokens;
- evaluates the continued model, compared with the previous evaluation.

The ledger ``<root>/incremental/<series>/ledger.json`` lists finished generations and is written
last: a run that dies mid-generation leaves no record, so the next run plans the same generation
again and finds its stages cached or resumable. A generation runs the same declared pipeline as
``skymoe run``, with a :class:`~skymoe.stage.Continuation` that each stage reads in its own plan.
Nothing here imports Prefect.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from typing import Any

from skymoe.config import PipelineConfig
from skymoe.pipeline import load_stage
from skymoe.stage import Continuation, Plan, StageRef, StageResult, canonical_json, fingerprint
from skymoe.storage import Storage, join

SERIES_DIR = "incremental"
LEDGER = "ledger.json"


@dataclass(frozen=True)
class GenerationRecord:
    """One finished generation: the files it read and the stage outputs it made."""

    number: int
    inputs: dict[str, str]  # input URI -> checksum
    outputs: dict[str, str]  # stage -> fingerprint
    counts: dict[str, Any] = field(default_factory=dict)
    finished_at: float = 0.0


@dataclass(frozen=True)
class Ledger:
    uri: str
    generations: tuple[GenerationRecord, ...]

    def seen(self) -> dict[str, str]:
        """Every input file read by a finished generation, with the checksum it had then."""
        return {uri: checksum for record in self.generations for uri, checksum in record.inputs.items()}

    def refs(self, root: str, stage: str) -> tuple[StageRef, ...]:
        return tuple(StageRef(root, stage, record.outputs[stage]) for record in self.generations)


@dataclass(frozen=True)
class GenerationPlan:
    """The next generation, known before any work: its number, the cleaning plan of its new files,
    and what it continues (None for generation 0, a full run)."""

    number: int
    clean: Plan
    continues: Continuation | None

    @property
    def new_inputs(self) -> dict[str, str]:
        return {shard.uri: shard.checksum for shard in self.clean.work.shards}


def series_uri(config: PipelineConfig) -> str:
    """One series per inputs and data/model settings: changing them starts a new series (a new
    full run), because the earlier outputs would no longer be what this config makes."""
    settings = config.model_dump(mode="json", include={"clean", "tokenize", "train"},
                                 exclude={"clean": {"executor"}, "tokenize": {"executor"}})
    key = fingerprint(SERIES_DIR, "1", settings, {})
    return join(config.storage.root, SERIES_DIR, f"{config.name}-{key[:12]}")


def load_ledger(storage: Storage, config: PipelineConfig) -> Ledger:
    uri = join(series_uri(config), LEDGER)
    if not storage.exists(uri):
        return Ledger(uri, ())
    raw = json.loads(storage.read_text(uri))
    return Ledger(uri, tuple(GenerationRecord(**record) for record in raw["generations"]))


def record_generation(storage: Storage, ledger: Ledger, record: GenerationRecord) -> Ledger:
    """Append a finished generation (one whole-object write: the ledger is never half-updated)."""
    updated = Ledger(ledger.uri, (*ledger.generations, record))
    storage.write_text(ledger.uri, canonical_json({"generations": [asdict(r) for r in updated.generations]}))
    return updated


def plan_generation(config: PipelineConfig, storage: Storage, ledger: Ledger) -> GenerationPlan | None:
    """The next generation, or None when no input is new since the last one."""
    clean = load_stage("clean")
    if not ledger.generations:
        return GenerationPlan(0, clean.plan(config, storage, {})[0], None)
    root = config.storage.root
    last = ledger.generations[-1]
    continues = Continuation(previous={stage: StageRef(root, stage, fp) for stage, fp in last.outputs.items()},
                             prior_clean=ledger.refs(root, "clean"), seen=ledger.seen())
    plan = clean.plan(config, storage, {}, continues)[0]
    if not plan.work.shards:
        return None
    return GenerationPlan(len(ledger.generations), plan, continues)


def generation_counts(results: list[StageResult]) -> dict[str, Any]:
    """What a generation added, from its stage results (the exported model's evaluation only)."""
    by_stage = {result.stage: result.manifest for result in reversed(results)}  # the first of each stage wins
    clean, tokens, train = by_stage["clean"].counts, by_stage["tokenize"].counts, by_stage["train"].counts
    table = by_stage["evaluate"].extra["table"]
    counts = {"docs_in": clean["docs_in"], "docs_kept": clean["docs_out"],
              "duplicates_of_earlier": clean["duplicates_of_earlier"],
              "train_tokens_in_shards": tokens["train_tokens"],
              "evaluation": {row["suite"]: row["score"] for row in table}}
    if "continued_steps" in train:
        counts |= {"train_tokens_appended": tokens["appended_train_tokens"],
                   "training_steps_added": train["continued_steps"],
                   "training_tokens_added": train["continued_tokens"],
                   "evaluation_delta": {row["suite"]: row["delta_vs_previous"] for row in table}}
    return counts


def new_record(generation: GenerationPlan, results: list[StageResult]) -> GenerationRecord:
    outputs = {result.stage: result.ref.fingerprint for result in reversed(results)}
    return GenerationRecord(generation.number, generation.new_inputs, outputs, generation_counts(results),
                            time.time())
