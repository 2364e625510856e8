"""The stage contract every stage uses: fingerprints, done-records and the manifest.

A stage's output lives at ``<root>/<stage>/<fingerprint>/``. The fingerprint hashes the stage's
name and code version, its canonical config and the checksums of its inputs, so an unchanged rerun
lands in the same place (a cache hit) and any upstream change moves every downstream output.

Inside a stage, work is split into shards with stable ids. A finished shard leaves a small
done-record (written after its data), so a rerun after a crash redoes only unfinished shards. The
manifest is written last: no manifest means not done, and readers consume only what it lists.
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from skymoe import __version__
from skymoe.storage import Storage, join

MANIFEST = "manifest.json"
DONE_DIR = "_done"


def source_digest(*folders: Path) -> str:
    """A code version that changes whenever a stage's source changes: a hash of its ``.py`` files.

    Hand-bumped version strings go stale; this cannot, so an edited filter never reuses outputs
    made by the old one.
    """
    digest = hashlib.sha256()
    for folder in folders:
        for path in sorted(folder.rglob("*.py")):
            digest.update(path.relative_to(folder).as_posix().encode())
            digest.update(path.read_bytes())
    return digest.hexdigest()[:12]


def canonical_json(value: Any) -> str:
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False, default=str)


def fingerprint(stage: str, code_version: str, config: Any, inputs: dict[str, str]) -> str:
    """16 hex chars over stage name, code version, canonical config and input checksums.

    ``inputs`` maps a stable input name (a file URI, or an upstream stage's name) to its content
    checksum (or upstream fingerprint); the input's location is part of the key on purpose: the
    same bytes under another name are other data for provenance.
    """
    payload = canonical_json(
        {"stage": stage, "code": f"{__version__}/{code_version}", "config": config, "inputs": inputs}
    )
    return hashlib.sha256(payload.encode("utf-8")).hexdigest()[:16]


@dataclass(frozen=True)
class StageRef:
    """Where a stage's output lives; what one stage hands the next."""

    root: str
    stage: str
    fingerprint: str

    @property
    def uri(self) -> str:
        return join(self.root, self.stage, self.fingerprint)

    def path(self, *parts: str) -> str:
        return join(self.uri, *parts)


@dataclass
class Manifest:
    """The record that makes a stage output complete."""

    stage: str
    fingerprint: str
    code_version: str
    config: Any
    inputs: dict[str, str]
    shards: list[dict[str, Any]] = field(default_factory=list)
    counts: dict[str, Any] = field(default_factory=dict)
    timings: dict[str, float] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)
    created_at: float = field(default_factory=time.time)

    def to_json(self) -> str:
        return json.dumps(self.__dict__, indent=2, sort_keys=True, ensure_ascii=False, default=str)

    @classmethod
    def from_json(cls, text: str) -> "Manifest":
        return cls(**json.loads(text))


def write_manifest(storage: Storage, ref: StageRef, manifest: Manifest) -> None:
    storage.write_text(ref.path(MANIFEST), manifest.to_json())


def read_manifest(storage: Storage, ref: StageRef) -> Manifest | None:
    uri = ref.path(MANIFEST)
    if not storage.exists(uri):
        return None
    return Manifest.from_json(storage.read_text(uri))


def shard_entry(storage: Storage, uri: str, ref: StageRef, **extra: Any) -> dict[str, Any]:
    """A manifest line for one output object: path relative to the stage folder, size, checksum."""
    return {
        "path": uri[len(ref.uri) + 1 :] if uri.startswith(ref.uri) else uri,
        "bytes": storage.size(uri),
        "checksum": storage.checksum(uri),
        **extra,
    }


class DoneRecords:
    """Per-shard completion records of one phase of a stage (``_done/<phase>/<shard>.json``)."""

    def __init__(self, storage: Storage, ref: StageRef, phase: str):
        self.storage = storage
        self.folder = ref.path(DONE_DIR, phase)

    def _uri(self, shard_id: str) -> str:
        return join(self.folder, f"{shard_id}.json")

    def get(self, shard_id: str) -> dict[str, Any] | None:
        uri = self._uri(shard_id)
        if not self.storage.exists(uri):
            return None
        return json.loads(self.storage.read_text(uri))

    def mark(self, shard_id: str, record: dict[str, Any]) -> None:
        self.storage.write_text(self._uri(shard_id), canonical_json(record))

    def ids(self) -> set[str]:
        """Finished shard ids, from the listing alone (cheap enough to poll for progress)."""
        return {uri.rsplit("/", 1)[-1][: -len(".json")] for uri in self.storage.listdir(self.folder)
                if uri.endswith(".json")}

    def all(self) -> dict[str, dict[str, Any]]:
        records = {}
        for uri in self.storage.listdir(self.folder):
            if uri.endswith(".json"):
                records[uri.rsplit("/", 1)[-1][: -len(".json")]] = json.loads(self.storage.read_text(uri))
        return records
