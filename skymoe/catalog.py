"""What is stored under a root: every stage output, complete or not, with its counts and size, and
whether a complete one is still intact (the check ``skymoe run`` makes before reusing it)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from skymoe import PIPELINE_STAGES
from skymoe.stage import DONE_DIR, StageRef, check_output
from skymoe.storage import Storage, join


@dataclass(frozen=True)
class StageListing:
    name: str
    fingerprint: str
    uri: str
    complete: bool
    counts: dict[str, Any]
    bytes: int = 0  # on disk, everything under the output folder
    created_at: float | None = None  # when the manifest was written (Unix time); None while incomplete
    label: str = ""  # an evaluation's model: "final" (the export) or a checkpoint ("step-0000040")
    scores: list[dict[str, Any]] = field(default_factory=list)  # an evaluation's table: suite, score, chance, ...
    state: str = ""  # complete, incomplete, damaged (listed files missing or changed), unreadable manifest
    problems: list[str] = field(default_factory=list)  # damaged files with why, or the manifest's path and error

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def list_stage_outputs(storage: Storage, root: str, verify: bool = False) -> list[StageListing]:
    """Every ``<root>/<stage>/<fingerprint>/`` folder, in pipeline order, oldest first within a stage.

    A folder without a manifest is incomplete; its counts then say how many shards each phase has
    finished. A manifest is checked as a rerun would check it before reuse (``check_output``: sizes,
    checksums of small outputs or with ``verify``); an unreadable one is listed with its error, and
    the other outputs still are. Under a folder that is not a pipeline stage (``ablate/``,
    ``incremental/``) only children that hold a manifest or done-records are outputs; see
    :func:`other_folders`.
    """
    listings = []
    for stage_uri in _stage_folders(storage, root):
        found = [_listing(storage, root, _name(stage_uri), uri, verify) for uri in storage.listdir(stage_uri)]
        listings += sorted((item for item in found if item is not None),
                           key=lambda item: (item.created_at is None, item.created_at or 0.0, item.fingerprint))
    return listings


def other_folders(storage: Storage, root: str, listings: list[StageListing]) -> list[str]:
    """The root's non-empty folders that hold none of ``listings`` (ablation runs, an incremental ledger)."""
    listed = {item.name for item in listings} | set(PIPELINE_STAGES)
    return [_name(uri) for uri in storage.listdir(root) if _name(uri) not in listed and storage.listdir(uri)]


def _stage_folders(storage: Storage, root: str) -> list[str]:
    """The root's folders, pipeline stages first in their order, then any others by name."""
    folders = storage.listdir(root)
    order = {stage: i for i, stage in enumerate(PIPELINE_STAGES)}
    return sorted(folders, key=lambda uri: (order.get(_name(uri), len(order)), _name(uri)))


def _listing(storage: Storage, root: str, stage: str, output_uri: str, verify: bool) -> StageListing | None:
    found = check_output(storage, StageRef(root, stage, _name(output_uri)), verify)
    if found.manifest is not None:
        manifest = found.manifest
        counts = {k: v for k, v in manifest.counts.items() if not isinstance(v, dict)}
        return StageListing(stage, manifest.fingerprint, output_uri, found.intact, counts,
                            storage.disk_usage(output_uri), manifest.created_at, str(manifest.extra.get("label", "")),
                            list(manifest.extra.get("table", [])), found.state, found.problems())
    phases = storage.listdir(join(output_uri, DONE_DIR))
    if stage not in PIPELINE_STAGES and not phases and not found.error:
        return None  # a folder of another kind (an ablation, a ledger): not a stage output
    counts = {f"{_name(p)}_shards_done": len(storage.listdir(p)) for p in phases}
    return StageListing(stage, _name(output_uri), output_uri, False, counts, storage.disk_usage(output_uri),
                        state=found.state, problems=found.problems())


def _name(uri: str) -> str:
    return uri.rstrip("/").rsplit("/", 1)[-1]
