"""Input discovery and record reading for the cleaning stage.

Each input file is one shard with a stable id (a hash of its URI), so reruns and added files map
to the same shard ids. Readers turn records into datatrove ``Document``s; a record that cannot be
read (malformed JSON, invalid UTF-8, a missing text field, an oversized record, a WARC payload that
is not HTML, the readable part of a truncated gzip) becomes a rejected document that carries its
original bytes and reason, so nothing read is lost.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import zlib
from collections.abc import Iterator
from dataclasses import dataclass

import xxhash
from datatrove.data import Document
from datatrove.pipeline.base import PipelineStep

from skymoe.pipelines.clean.steps import ORIGINAL, reject
from skymoe.config import ReaderConfig
from skymoe.storage import Storage

FORMATS = {
    ".jsonl": "jsonl", ".jsonl.gz": "jsonl", ".ndjson": "jsonl", ".ndjson.gz": "jsonl",
    ".parquet": "parquet",
    ".warc": "warc", ".warc.gz": "warc",
    ".txt": "text", ".txt.gz": "text",
}
READ_STEP = "read"
# Files that travel with data but are not data: licenses and attributions stay beside the corpus.
_NOT_DATA = frozenset({"license", "licence", "copying", "notice", "readme", "source", "attribution"})


class InputError(ValueError):
    """A stage-level input problem (missing path, unknown format): stops before any work."""


@dataclass(frozen=True)
class InputShard:
    shard_id: str
    uri: str
    format: str
    source: str
    checksum: str


def detect_format(uri: str) -> str | None:
    name = uri.lower()
    for suffix in sorted(FORMATS, key=len, reverse=True):
        if name.endswith(suffix):
            return FORMATS[suffix]
    return None


def expand_input(storage: Storage, pattern: str) -> list[str]:
    """The files an input pattern names; an error when it names none or cannot be listed."""
    try:
        files = storage.expand(pattern)
    except FileNotFoundError:
        files = []
    except Exception as err:  # an unreachable endpoint or a missing bucket
        raise InputError(f"cannot list input {pattern}: {err}") from None
    if not files:
        raise InputError(f"input path does not exist or holds no files: {pattern}")
    return files


def discover_inputs(storage: Storage, patterns: list[str], text_field: str = "text",
                    ) -> tuple[list[InputShard], list[dict[str, str]]]:
    """Expand files, folders and globs into shards, failing early on anything unusable.

    Returns the shards and the files found but not read (licenses, READMEs, unknown formats),
    each with the reason, so that nothing is left out without a record of it.
    """
    if not patterns:
        raise InputError("no inputs given (clean.inputs in the config, or --input)")
    shards: dict[str, InputShard] = {}
    skipped: list[dict[str, str]] = []
    for pattern in patterns:
        files = expand_input(storage, pattern)
        base = pattern.rstrip("/") if "://" in pattern else os.path.abspath(pattern)
        for uri in files:
            if uri in shards:
                continue  # named twice (a folder and a file in it): the first naming decides its id
            if uri != base and _is_not_data(uri):
                skipped.append({"uri": uri, "why": "license/readme/attribution file"})
                continue
            fmt = detect_format(uri)
            if fmt is None:
                if uri == base:
                    raise InputError(f"unsupported input format: {uri} (known: {', '.join(sorted(FORMATS))})")
                skipped.append({"uri": uri, "why": "unknown format"})
                continue
            if fmt == "parquet":
                _check_parquet_schema(storage, uri, text_field)
            shard_id = hashlib.sha1(_location_free_name(uri, base).encode("utf-8")).hexdigest()[:12]
            shards[uri] = InputShard(shard_id, uri, fmt, _source_name(uri, base), storage.checksum(uri))
    ids = [shard.shard_id for shard in shards.values()]
    if len(set(ids)) != len(ids):
        raise InputError(f"two inputs share a folder and file name; give them distinct names: {patterns}")
    if not shards:
        raise InputError(f"no readable input files (known formats: {', '.join(sorted(FORMATS))}) in {patterns}")
    return [shards[uri] for uri in sorted(shards)], skipped


def _check_parquet_schema(storage: Storage, uri: str, text_field: str) -> None:
    """Read a Parquet footer now, so a corrupt file or a missing column stops the stage before work."""
    import pyarrow.parquet as pq

    fs, path = storage.fs(uri)
    try:
        with fs.open(path, "rb") as handle:
            names = pq.read_schema(handle).names
    except Exception as err:  # pyarrow raises ArrowInvalid / OSError for a damaged footer
        raise InputError(f"{uri}: not a readable Parquet file: {err}") from None
    if text_field not in names:
        raise InputError(f"{uri}: no column '{text_field}' (columns: {names}); set clean.reader.text_field")


def _is_not_data(uri: str) -> bool:
    """LICENSE, README.md, SOURCE.txt, ...: the stem, not a prefix, decides (sources.jsonl is data)."""
    stem = uri.rsplit("/", 1)[-1].lower().split(".", 1)[0]
    return stem in _NOT_DATA


def _location_free_name(uri: str, base: str) -> str:
    """The file's name below its input folder, with that folder's own name ("corpus/c4/x.jsonl").

    Shard ids (and so document ids and the validation split) come from this, not from the full
    URI, so the same corpus gives the same output wherever it is checked out or mounted.
    """
    if uri == base:
        return uri.rsplit("/", 1)[-1]
    magic = [i for i, ch in enumerate(base) if ch in "*?["]
    folder = base[: magic[0]].rsplit("/", 1)[0] if magic else base  # a glob's fixed leading folder
    parent = folder.rstrip("/").rsplit("/", 1)[0]
    return uri[len(parent):].lstrip("/")


def _source_name(uri: str, base: str) -> str:
    """The folder a file sits in below the input root, else the file's stem."""
    rel = uri[len(base):].strip("/") if uri.startswith(base) and uri != base else uri.rsplit("/", 1)[-1]
    parts = rel.split("/")
    return parts[0] if len(parts) > 1 else parts[0].split(".", 1)[0]


class ShardReader(PipelineStep):
    """Reads shard ``rank`` of a fixed shard list (datatrove's task = one input file)."""

    type = "📖 skymoe"
    name = "read"

    def __init__(self, shards: list[InputShard], config: ReaderConfig, storage: Storage,
                 code_sources: frozenset[str] = frozenset()):
        super().__init__()
        self.shards = shards
        self.config = config
        self.storage = storage
        self.code_sources = code_sources

    def run(self, data=None, rank: int = 0, world_size: int = 1) -> Iterator[Document]:
        shard = self.shards[rank]
        raw = self.storage.read_bytes(shard.uri)
        if shard.checksum.startswith("xxh3:") and f"xxh3:{xxhash.xxh3_128_hexdigest(raw)}" != shard.checksum:
            raise InputError(f"{shard.uri} changed after the stage was planned; rerun to pick up the new content")
        records = {"jsonl": self._jsonl, "text": self._text, "parquet": self._parquet, "warc": self._warc}
        for doc in records[shard.format](shard, raw):
            doc.metadata.setdefault("source", shard.source)
            doc.metadata["shard"] = shard.shard_id
            if shard.source in self.code_sources and "_reject" not in doc.metadata:
                doc.metadata["lang"] = "code"
            self.stat_update("read")
            yield doc

    # ---------------------------------------------------------------------------- formats
    def _decoded_lines(self, shard: InputShard, raw: bytes) -> Iterator[tuple[int, str | Document]]:
        """(line number, text) per line - or a rejected document for a line that cannot be decoded
        and, last, for the partial record of a truncated gzip."""
        problem, tail = None, b""
        if shard.uri.endswith(".gz"):
            raw, tail, problem = _gunzip_prefix(raw)
        lines = raw.split(b"\n")
        if lines and lines[-1] == b"":
            lines.pop()
        for number, line in enumerate(lines):
            try:
                yield number, line.decode("utf-8").rstrip("\r")
            except UnicodeDecodeError as err:
                yield number, self._rejected(shard, number, f"invalid_utf8: {err.reason} at byte {err.start}",
                                             line.decode("utf-8", errors="backslashreplace"))
        if problem:
            yield len(lines), self._rejected(shard, len(lines), problem,
                                             tail.decode("utf-8", errors="backslashreplace"))

    def _rejected(self, shard: InputShard, number: int, reason: str, original: str) -> Document:
        doc = Document(text="", id=f"{shard.shard_id}:{number}", metadata={ORIGINAL: original})
        reject(doc, READ_STEP, reason)
        return doc

    def _checked_text(self, shard: InputShard, number: int, text: str, original: str, fields: dict) -> Document:
        cfg = self.config
        doc_id = fields.get(cfg.id_field) if cfg.id_field else None
        doc = Document(
            text=text,
            id=str(doc_id) if doc_id not in (None, "") else f"{shard.shard_id}:{number}",
            metadata={ORIGINAL: original},
        )
        url = fields.get(cfg.url_field) if cfg.url_field else None
        if isinstance(url, str) and url:
            doc.metadata["url"] = url
        if len(text.encode("utf-8")) > cfg.max_doc_bytes:
            reject(doc, READ_STEP, f"too_large: {len(text.encode('utf-8'))} bytes > {cfg.max_doc_bytes}")
        elif not text.strip():
            reject(doc, READ_STEP, "empty")
        return doc

    def _jsonl(self, shard: InputShard, raw: bytes) -> Iterator[Document]:
        field = self.config.text_field
        for number, line in self._decoded_lines(shard, raw):
            if isinstance(line, Document):
                yield line
            elif not line.strip():
                continue  # a blank line between records is not a record
            else:
                yield self._json_record(shard, number, line, field)

    def _json_record(self, shard: InputShard, number: int, line: str, field: str) -> Document:
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            return self._rejected(shard, number, f"malformed_json: {err.msg} at column {err.colno}", line)
        if not isinstance(record, dict):
            return self._rejected(shard, number, "malformed_json: record is not an object", line)
        text = record.get(field)
        if not isinstance(text, str):
            return self._rejected(shard, number, f"missing_text_field: '{field}'", line)
        return self._checked_text(shard, number, text, line, record)

    def _text(self, shard: InputShard, raw: bytes) -> Iterator[Document]:
        for number, line in self._decoded_lines(shard, raw):
            yield line if isinstance(line, Document) else self._checked_text(shard, number, line, line, {})

    def _parquet(self, shard: InputShard, raw: bytes) -> Iterator[Document]:
        import pyarrow.parquet as pq

        field = self.config.text_field  # its presence was checked when the inputs were discovered
        table = pq.read_table(io.BytesIO(raw))
        for number, record in enumerate(table.to_pylist()):
            original = json.dumps(record, ensure_ascii=False, default=str)
            text = record.get(field)
            if not isinstance(text, str):
                yield self._rejected(shard, number, f"missing_text_field: '{field}'", original)
                continue
            yield self._checked_text(shard, number, text, original, record)

    def _warc(self, shard: InputShard, raw: bytes) -> Iterator[Document]:
        from warcio.archiveiterator import ArchiveIterator
        from warcio.exceptions import ArchiveLoadFailed

        from skymoe.pipelines.clean.extract import extract_main_text

        number = 0
        try:
            for record in ArchiveIterator(io.BytesIO(raw), check_digests=True):
                if record.rec_type != "response":
                    continue
                number += 1
                url = record.rec_headers.get_header("WARC-Target-URI") or ""
                record_id = record.rec_headers.get_header("WARC-Record-ID") or f"{shard.shard_id}:{number}"
                content_type = (record.http_headers.get_header("Content-Type") or "") if record.http_headers else ""
                payload = record.content_stream().read()
                original = json.dumps({"url": url, "content_type": content_type,
                                       "payload": payload.decode("utf-8", errors="backslashreplace")},
                                      ensure_ascii=False)
                missing = getattr(record.raw_stream, "limit", 0)  # bytes the header promised but the file lacks
                if missing or record.digest_checker.passed is False:
                    problems = f"{missing} bytes missing" if missing else "; ".join(record.digest_checker.problems)
                    doc = self._rejected(shard, number, f"truncated_or_corrupt_warc: {problems}", original)
                    doc.id = record_id
                    yield doc
                    continue
                if "html" not in content_type.lower():
                    doc = self._rejected(shard, number, f"not_html: {content_type or 'no content type'}", original)
                    doc.id = record_id
                    yield doc
                    continue
                text = extract_main_text(payload)
                doc = self._checked_text(shard, number, text, original, {"url": url})
                doc.id = record_id
                if not text.strip():
                    reject(doc, "extract", "no_main_text")
                yield doc
        except (ArchiveLoadFailed, EOFError, zlib.error, OSError) as err:
            yield self._rejected(shard, number + 1, f"truncated_or_corrupt_warc: {err}", "")


def _gunzip_prefix(raw: bytes) -> tuple[bytes, bytes, str | None]:
    """Decompress as much of a gzip stream as is readable: (whole lines, partial tail, problem)."""
    try:
        return gzip.decompress(raw), b"", None
    except (EOFError, zlib.error, OSError, gzip.BadGzipFile) as err:
        parts, rest = [], raw
        while rest:  # a gzip file may hold several members: read on into each of them
            decompressor = zlib.decompressobj(16 + zlib.MAX_WBITS)
            try:
                parts.append(decompressor.decompress(rest))
            except zlib.error:
                break
            rest = decompressor.unused_data if decompressor.eof else b""
        data = b"".join(parts)
        cut = data.rfind(b"\n") + 1  # the last partial line is not a whole record
        return data[:cut], data[cut:], f"truncated_gzip: {type(err).__name__}: {err}"
