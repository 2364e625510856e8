"""The stage contract in code: a :class:`Stage` plans its outputs, one runner (:func:`run_plan`)
does the rest - cache hit, writable root, timing, the manifest written last - for every stage.

A stage's output lives at ``<root>/<stage>/<fingerprint>/``. The fingerprint hashes the stage's
name and code version, its canonical config and the checksums of its inputs, so an unchanged rerun
lands in the same place (a cache hit) and any upstream change moves every downstream output.

Inside a stage, work is split into shards with stable ids. A finished shard leaves a small
done-record (written after its data), so a rerun after a crash redoes only unfinished shards. The
manifest is written last: no manifest means not done, and readers consume only what it lists.

Reuse is verified: a manifest is trusted only while every file it lists is there with its
recorded size (and checksum, see :func:`check_output`); a damaged output is rebuilt from the
done-records that do not name a damaged file.

A :class:`Plan` is made once, from one loaded config, and carries that config with it: whoever
runs the plan (this process, a Prefect task, a cluster job) runs exactly what was fingerprinted,
never a config re-read from a file that may have changed since. The manifest schema is the same
for every stage (``docs/stage-contract.md``).
"""

from __future__ import annotations

import functools
import hashlib
import importlib.metadata
import importlib.util
import json
import logging
import re
import time
from abc import ABC, abstractmethod
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from skymoe import __version__
from skymoe.config import PipelineConfig
from skymoe.storage import Storage, join

MANIFEST = "manifest.json"
DONE_DIR = "_done"
# Outputs whose listed files add up to less than this are checksummed on every reuse (a second or
# so of reading); larger ones only with ``verify`` (``skymoe run --verify``), their sizes always.
SMALL_OUTPUT_BYTES = 64 * 2**20
# What ``Storage.write_bytes``/``open_write`` leave behind when killed between write and rename.
STALE_TEMP = re.compile(r"\.tmp-\d+$")


log = logging.getLogger("skymoe.stage")


def code_digest(modules: tuple[str, ...], libraries: tuple[str, ...] = ()) -> str:
    """A code version from the source of the modules that decide a stage's bytes, and the versions of
    the libraries that do. Hand-bumped strings go stale; a digest of whole folders would rerun a
    stage when only its plots changed. Modules are found without importing them.
    """
    digest = hashlib.sha256()
    for name in sorted(modules):
        spec = importlib.util.find_spec(name)
        if spec is None or spec.origin is None:
            raise ImportError(f"code_digest: no module {name}")
        digest.update(name.encode())
        digest.update(Path(spec.origin).read_bytes())
    versions = ",".join(f"{lib}={importlib.metadata.version(lib)}" for lib in libraries)
    return f"{digest.hexdigest()[:12]}+{versions}" if versions else digest.hexdigest()[:12]


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
    """The record that makes a stage output complete; one schema for every stage."""

    stage: str
    fingerprint: str
    code_version: str
    config: dict[str, Any]  # the config slice as fingerprinted (resource files by checksum)
    inputs: dict[str, str]  # what else was fingerprinted: input name -> checksum or upstream fingerprint
    upstream: dict[str, str] = field(default_factory=dict)  # upstream stage -> the output URI it read
    label: str = ""  # the output's name in logs and the UI ("clean", "evaluate-final")
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


class ManifestError(ValueError):
    """A manifest that cannot be read (truncated, not JSON, another schema): named by its path."""

    def __init__(self, uri: str, reason: str):
        super().__init__(f"unreadable manifest {uri}: {reason}")
        self.uri, self.reason = uri, reason


class DamagedOutputError(ValueError):
    """A damaged output this run cannot rebuild (files of another output it builds on)."""


def write_manifest(storage: Storage, ref: StageRef, manifest: Manifest) -> None:
    storage.write_text(ref.path(MANIFEST), manifest.to_json())


def read_manifest(storage: Storage, ref: StageRef) -> Manifest | None:
    """The output's manifest, None when there is none; :class:`ManifestError` naming the file when
    it is unreadable (a bare JSON error would not say which of many manifests is broken)."""
    uri = ref.path(MANIFEST)
    if not storage.exists(uri):
        return None
    try:
        return Manifest.from_json(storage.read_text(uri))
    except (ValueError, TypeError) as err:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise ManifestError(uri, str(err)) from None


@dataclass(frozen=True)
class ListedFile:
    """One file a manifest lists, with what the manifest recorded of it."""

    path: str  # as the manifest names it: relative to its output folder
    uri: str
    bytes: int
    checksum: str
    own: bool  # under this output's folder (an appending tokenize output also lists its base's files)


def listed_files(manifest: Manifest, ref: StageRef) -> list[ListedFile]:
    """Every file the manifest records a size and checksum for: ``shards``, and entry lists in
    ``extra`` (clean's rejects and dedup index). An entry with ``output`` lives in that sibling
    output's folder (the base an appending tokenize output extends)."""
    entries = [*manifest.shards, *(item for value in manifest.extra.values() if isinstance(value, list)
                                   for item in value)]
    files = []
    for entry in entries:
        if not (isinstance(entry, dict) and {"path", "bytes", "checksum"} <= entry.keys()):
            continue
        owner = StageRef(ref.root, ref.stage, entry.get("output", ref.fingerprint))
        files.append(ListedFile(entry["path"], owner.path(entry["path"]), int(entry["bytes"]), entry["checksum"],
                                owner == ref))
    return files


@dataclass(frozen=True)
class OutputCheck:
    """What reuse found at an output: its manifest, and what is wrong with it.

    ``damaged`` maps a listed file's path to why it cannot be served (missing, another size, another
    checksum); ``error`` says why the manifest itself could not be read."""

    manifest: Manifest | None
    damaged: dict[str, str] = field(default_factory=dict)
    foreign: tuple[str, ...] = ()  # URIs of damaged files of another output (an appended base)
    error: str = ""
    checksummed: bool = False

    @property
    def intact(self) -> bool:
        return self.manifest is not None and not self.damaged

    @property
    def state(self) -> str:
        if self.error:
            return "unreadable manifest"
        if self.manifest is None:
            return "incomplete"
        return "damaged" if self.damaged else "complete"

    def problems(self) -> list[str]:
        """One line per problem, for logs and ``skymoe show``: the manifest's path and error, or
        each damaged file's path and why."""
        return [self.error] if self.error else [f"{path}: {why}" for path, why in self.damaged.items()]


def check_output(storage: Storage, ref: StageRef, verify: bool = False) -> OutputCheck:
    """Whether the output at ``ref`` can be reused: every listed file present with its recorded size,
    and its recorded checksum when ``verify`` is set or the output is under :data:`SMALL_OUTPUT_BYTES`.
    Sizes catch deleted and truncated files for one listing call per file; a flipped byte needs
    the checksum, which reads every byte."""
    try:
        manifest = read_manifest(storage, ref)
    except ManifestError as err:
        return OutputCheck(None, error=f"{err.uri}: {err.reason}")
    if manifest is None:
        return OutputCheck(None)
    files = listed_files(manifest, ref)
    deep = verify or sum(f.bytes for f in files) < SMALL_OUTPUT_BYTES
    damaged = {listed.path: problem for listed in files
               if (problem := file_problem(storage, listed.uri, listed.bytes, listed.checksum, deep))}
    foreign = tuple(f.uri for f in files if not f.own and f.path in damaged)
    return OutputCheck(manifest, damaged, foreign, checksummed=deep)


def file_problem(storage: Storage, uri: str, size: int, checksum: str, deep: bool) -> str | None:
    """What is wrong with a file against its recorded size and, when ``deep``, checksum; None if nothing.
    The size first: one listing call catches a deleted or truncated file without reading it."""
    try:
        found = storage.size(uri)
    except FileNotFoundError:
        return "missing"
    if found != size:
        return f"{found:,} bytes, the manifest says {size:,}"
    if deep and storage.checksum(uri) != checksum:
        return f"checksum differs from the manifest's ({checksum})"
    return None


def shard_entry(storage: Storage, uri: str, ref: StageRef, **extra: Any) -> dict[str, Any]:
    """A manifest line for one output object: path relative to the stage folder, size, checksum."""
    return {
        "path": uri[len(ref.uri) + 1 :] if uri.startswith(ref.uri) else uri,
        "bytes": storage.size(uri),
        "checksum": storage.checksum(uri),
        **extra,
    }


def folder_entries(storage: Storage, ref: StageRef, folder_uri: str) -> list[dict[str, Any]]:
    """Manifest lines for every file under a folder of the output (a tokenizer, trained weights,
    evaluation results): what a stage serves besides its shards, listed so reuse checks it too."""
    return [shard_entry(storage, uri, ref) for uri in storage.files(folder_uri)]


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


# ------------------------------------------------------------------------------ stages and the runner
@dataclass(frozen=True)
class Continuation:
    """What an incremental generation builds on: the previous generation's outputs, every earlier
    cleaning output (new documents are deduplicated against all of them) and the inputs read before."""

    previous: dict[str, StageRef]  # stage -> the last generation's output
    prior_clean: tuple[StageRef, ...]  # oldest first
    seen: dict[str, str]  # input URI -> the checksum it had when read


@dataclass(frozen=True)
class Plan:
    """One stage output before any work: where it goes, what it was fingerprinted from, and the
    stage's own detail (``work``: shards, units, runs, the model to evaluate)."""

    stage: str
    ref: StageRef
    config: PipelineConfig  # the config the fingerprint was made from; the run reads no other
    settings: dict[str, Any]  # the config slice as fingerprinted
    inputs: dict[str, str]  # the other fingerprinted inputs (file checksums, upstream fingerprints)
    upstream: dict[str, StageRef] = field(default_factory=dict)
    work: Any = None
    label: str = ""

    @property
    def name(self) -> str:
        return self.label or self.stage


@dataclass(frozen=True)
class StageOutput:
    """What a stage's ``run`` hands the runner; the runner adds everything the contract owns."""

    counts: dict[str, Any]
    shards: list[dict[str, Any]] = field(default_factory=list)
    timings: dict[str, float] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class StageResult:
    """One planned output after the runner: made now, or found complete (``cached``)."""

    stage: str
    label: str
    ref: StageRef
    manifest: Manifest
    cached: bool
    seconds: float

    def summary(self) -> dict[str, Any]:
        """The small, JSON-ready record flows return and the CLI prints (no shard lists or indexes)."""
        summary = {"stage": self.stage, "label": self.label, "fingerprint": self.ref.fingerprint,
                   "uri": self.ref.uri, "cached": self.cached, "seconds": self.seconds,
                   "counts": self.manifest.counts}
        return summary | self.manifest.extra.get("summary", {})


class Stage(ABC):
    """A pipeline stage declared as data plus two methods, in the manner of Marin's executor steps:
    ``plan`` is cheap and fails early (bad config, missing inputs); ``run`` does the work, resumable
    through done-records. Neither knows about Prefect."""

    name: ClassVar[str]
    upstream: ClassVar[tuple[str, ...]] = ()  # the stages whose outputs ``plan`` reads
    section: ClassVar[str]  # the config section the stage is configured by
    code: ClassVar[tuple[str, ...]]  # modules whose source changes the output's bytes (not its plots)
    libraries: ClassVar[tuple[str, ...]] = ()  # distributions whose versions change them

    @property
    def code_version(self) -> str:
        return _code_version(type(self))

    def check(self, config: PipelineConfig, storage: Storage) -> None:
        """Checks that need no upstream output, run for every wanted stage before any stage works."""

    @abstractmethod
    def plan(self, config: PipelineConfig, storage: Storage, upstream: Mapping[str, StageRef],
             continues: Continuation | None = None) -> list[Plan]:
        """The outputs to make; the first is the one downstream stages read. ``continues`` is set for
        an incremental generation."""

    @abstractmethod
    def run(self, plan: Plan, storage: Storage) -> StageOutput:
        """Make (or resume) the output of ``plan`` under ``plan.ref``; the runner writes the manifest."""

    def make_plan(self, config: PipelineConfig, settings: dict[str, Any], inputs: dict[str, str],
                  upstream: Mapping[str, StageRef] | None = None, work: Any = None, label: str = "") -> Plan:
        """A plan whose location is the fingerprint of exactly what it carries."""
        ref = StageRef(config.storage.root, self.name, fingerprint(self.name, self.code_version, settings, inputs))
        return Plan(self.name, ref, config, settings, inputs, dict(upstream or {}), work, label)


@functools.cache
def _code_version(stage_type: type[Stage]) -> str:
    return f"{stage_type.name}-{code_digest(stage_type.code, stage_type.libraries)}"


def run_plan(stage: Stage, plan: Plan, storage: Storage, verify: bool = False) -> StageResult:
    """The one runner: reuse a complete, intact output, else run (or resume, or repair) the stage and
    write its manifest last. ``verify`` checksums every listed file of a large output too."""
    found = check_output(storage, plan.ref, verify)
    if found.intact:
        log.info("%s: cache hit at %s (%s checked)", plan.name, plan.ref.uri,
                 "sizes and checksums" if found.checksummed else "sizes")
        return StageResult(plan.stage, plan.name, plan.ref, found.manifest, cached=True, seconds=0.0)
    storage.check_writable_root(plan.ref.root)
    if found.error or found.damaged:
        prepare_rebuild(storage, plan, found)
    remove_stale_temp_files(storage, plan.ref)
    started = time.monotonic()
    output = stage.run(plan, storage)
    seconds = round(time.monotonic() - started, 3)
    manifest = Manifest(
        stage=plan.stage, fingerprint=plan.ref.fingerprint, code_version=stage.code_version,
        config=json.loads(canonical_json(plan.settings)), inputs=plan.inputs,
        upstream={name: ref.uri for name, ref in plan.upstream.items()}, label=plan.name, shards=output.shards,
        counts=output.counts, timings={**output.timings, "total": seconds}, extra=output.extra)
    write_manifest(storage, plan.ref, manifest)
    log.info("%s: done in %.1fs, manifest at %s", plan.name, seconds, plan.ref.path(MANIFEST))
    return StageResult(plan.stage, plan.name, plan.ref, manifest, cached=False, seconds=seconds)


def prepare_rebuild(storage: Storage, plan: Plan, found: OutputCheck) -> None:
    """Make a damaged output (or one whose manifest is unreadable) resumable: drop its manifest, the
    damaged files and every done-record that names one of them, so the stage's own resume redoes
    exactly those units. A damaged file no done-record names (clean's rejects, say) drops every
    done-record: the stage reruns. Files of another output (an appended base) cannot be remade
    from this one's records: that is an error naming them."""
    if found.foreign:
        raise DamagedOutputError(f"{plan.name}: files of the output it appends to are damaged: "
                                 f"{', '.join(found.foreign)}; rebuild that output (or start a new series)")
    log.warning("%s: not reusing %s (%s): %s", plan.name, plan.ref.uri, found.state, "; ".join(found.problems()))
    _remove(storage, plan.ref.path(MANIFEST))
    if found.error:
        return  # the done-records are intact: the stage resumes from them
    records = {uri: json.loads(storage.read_text(uri)) for phase in storage.listdir(plan.ref.path(DONE_DIR))
               for uri in storage.listdir(phase) if uri.endswith(".json")}
    naming = {uri: [path for path in found.damaged if _names(record, plan.ref, path)]
              for uri, record in records.items()}
    if {path for paths in naming.values() for path in paths} == found.damaged.keys():
        stale = [uri for uri, paths in naming.items() if paths]
    else:
        log.warning("%s: a damaged file is named by no done-record: the stage reruns", plan.name)
        stale = list(records)
    for uri in stale:  # records first: a record never outlives the file it vouches for
        _remove(storage, uri)
    for path in found.damaged:
        _remove(storage, plan.ref.path(path))
    log.warning("%s: rebuilding %d damaged files (%d of %d done-records dropped)", plan.name, len(found.damaged),
                len(stale), len(records))


def _names(value: Any, ref: StageRef, path: str) -> bool:
    """Whether a done-record names ``path`` (relative to the output): as that path, or as a URI
    ending in ``<stage>/<fingerprint>/<path>`` (a record keeps the URI it was written with, which
    names the root of that time)."""
    if isinstance(value, dict):
        return any(_names(key, ref, path) or _names(item, ref, path) for key, item in value.items())
    if isinstance(value, list):
        return any(_names(item, ref, path) for item in value)
    return isinstance(value, str) and (value == path or value.endswith(f"/{ref.stage}/{ref.fingerprint}/{path}"))


def remove_stale_temp_files(storage: Storage, ref: StageRef) -> int:
    """Remove the ``*.tmp-<pid>`` files a killed run left under the output (local storage writes a
    temporary name, then renames it; object stores write whole objects and leave none)."""
    fs, path = storage.fs(ref.uri)
    protocols = fs.protocol if isinstance(fs.protocol, tuple) else (fs.protocol,)
    if "file" not in protocols or not fs.exists(path):
        return 0
    stale = [found for found in fs.find(path) if STALE_TEMP.search(found)]
    for found in stale:
        fs.rm(found)
    if stale:
        log.info("%s: removed %d stale temporary files left by a killed run", ref.stage, len(stale))
    return len(stale)


def _remove(storage: Storage, uri: str) -> None:
    fs, path = storage.fs(uri)
    if fs.exists(path):
        fs.rm(path)
