"""What is stored under a root: every stage output, complete or not, with its counts."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from skymoe.stage import DONE_DIR, MANIFEST, Manifest
from skymoe.storage import Storage, join


@dataclass(frozen=True)
class StageListing:
    name: str
    fingerprint: str
    uri: str
    complete: bool
    counts: dict[str, Any]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def list_stage_outputs(storage: Storage, root: str) -> list[StageListing]:
    """Every ``<root>/<stage>/<fingerprint>/`` folder. A folder without a manifest is incomplete;
    its counts then say how many shards each phase has finished."""
    listings = []
    for stage_uri in storage.listdir(root):
        stage = stage_uri.rsplit("/", 1)[-1]
        for output_uri in storage.listdir(stage_uri):
            manifest_uri = join(output_uri, MANIFEST)
            if storage.exists(manifest_uri):
                manifest = Manifest.from_json(storage.read_text(manifest_uri))
                counts = {k: v for k, v in manifest.counts.items() if not isinstance(v, dict)}
                listings.append(StageListing(stage, manifest.fingerprint, output_uri, True, counts))
            else:
                phases = storage.listdir(join(output_uri, DONE_DIR))
                counts = {f"{p.rsplit('/', 1)[-1]}_shards_done": len(storage.listdir(p)) for p in phases}
                listings.append(StageListing(stage, output_uri.rsplit("/", 1)[-1], output_uri, False, counts))
    return listings
