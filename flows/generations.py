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
again and finds its stages cached or resumable. Nothing here imports Prefect.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

from skymoe.pipelines.clean.stage import CleanPlan, plan_clean
from skymoe.pipelines.tokenize.stage import TokenizePlan, plan_tokenize
from skymoe.config import PipelineConfig
from skymoe.stage import StageRef, canonical_json, fingerprint, read_manifest
from skymoe.storage import Storage, join

if TYPE_CHECKING:
    from skymoe.training.stage import TrainPlan

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
    """The next generation, known before any work: its number, and the files it will clean."""

    number: int
    clean: CleanPlan
    previous: GenerationRecord | None  # None for generation 0 (a full run)


def series_uri(config: PipelineConfig) -> str:
    """One series per inputs and data/model settings: changing them starts a new series (a new
    full run), because the earlier outputs would no longer be what this config makes."""
    settings = config.model_dump(mode="json", include={"clean", "tokenize", "train"}, exclude={"clean": {"executor"}})
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
    root = config.storage.root
    if not ledger.generations:
        return GenerationPlan(0, plan_clean(config.clean, storage, root), None)
    clean = plan_clean(config.clean, storage, root, prior=ledger.refs(root, "clean"), seen=ledger.seen())
    if not clean.shards:
        return None
    return GenerationPlan(len(ledger.generations), clean, ledger.generations[-1])


def plan_appended_tokens(config: PipelineConfig, storage: Storage, generation: GenerationPlan) -> TokenizePlan:
    """Tokenize the generation's cleaned shards onto the previous generation's shards."""
    root = config.storage.root
    base = StageRef(root, "tokenize", generation.previous.outputs["tokenize"])
    return plan_tokenize(config.tokenize, storage, root, generation.clean.ref, base=base)


def plan_continued_training(config: PipelineConfig, storage: Storage, generation: GenerationPlan,
                            tokens_ref: StageRef) -> TrainPlan:
    """Continue the previous generation's exported MoE on the appended shards."""
    from skymoe.training.stage import plan_continued_train  # torch loads only when training is planned

    root = config.storage.root
    seq_len = int(read_manifest(storage, tokens_ref).extra["seq_len"])
    previous = StageRef(root, "train", generation.previous.outputs["train"])
    return plan_continued_train(config, storage, root, tokens_ref, previous,
                                config.incremental.phase(config.train, seq_len))


def new_record(generation: GenerationPlan, outputs: dict[str, str], counts: dict[str, Any]) -> GenerationRecord:
    return GenerationRecord(generation.number, {shard.uri: shard.checksum for shard in generation.clean.shards},
                            outputs, counts, time.time())
