"""Input discovery and record reading for the cleaning stage.

Each input file is one shard with a stable id (a hash of its URI), so reruns and added files map
to the same shard ids. An uncompressed JSONL or text file larger than ``reader.split_bytes`` is cut
into several shards (byte ranges ending at line ends, found in the one pass that checksums the file
at planning), so one big file is spread over the workers; its documents keep the ids and order they
have when the file is read whole. Readers turn records into datatrove ``Document``s; a record that cannot be
read (malformed JSON, invalid UTF-8 or Unicode, nesting too deep to parse, a missing text field, an
oversized record, a WARC payload that is not HTML, the partial last line of a truncated gzip) becomes
a rejected document that carries its original bytes and reason, so nothing read is lost.

Every file found is either read or listed with why not. At discovery, a file that is hidden,
not data, of an unknown or unsupported format, or not UTF-8 text (UTF-16, GB18030, ...) is listed in
``skipped_inputs``. While reading, damage to a file as a whole (a gzip that fails its CRC or ends
early, bytes of a WARC that hold no readable record) is recorded per shard in ``ShardReader.damaged``
(the stage's ``damaged_inputs``); what could be read of such a file is kept.

Readers stream: a file is never held whole. JSONL and text are read line by line (gzip decompressed
as it is read), Parquet a record batch at a time, WARC a record at a time, so a worker's memory is
bounded by a record or a batch, not by the file. A line or WARC payload longer than the read limit
(:func:`read_limit`, 8x ``max_doc_bytes`` and at least 64 MiB) is not read whole: it is rejected as
``too_large`` with its first bytes as the original, and the rest is skipped.
"""

from __future__ import annotations

import codecs
import gzip
import hashlib
import io
import json
import os
import re
import struct
import zlib
from collections.abc import Generator, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from itertools import accumulate
from typing import IO

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
# Streaming: records longer than the read limit are not read whole (see read_limit).
READ_LIMIT_FACTOR = 8
MIN_READ_LIMIT = 64 << 20
OVERSIZED_ORIGINAL_BYTES = 1 << 16  # what an over-limit record keeps of itself as its original
CHUNK_BYTES = 1 << 20  # read, decompression-output and skip size
# Compressed bytes given to zlib at a time: a member's output before a data error in a later slice is
# kept, and small members (a WARC record each) are not copied around with a megabyte of their followers.
INFLATE_BYTES = 1 << 16
PARQUET_BATCH_ROWS = 1024
# Files that travel with data but are not data: licenses and attributions stay beside the corpus.
_NOT_DATA = frozenset({"license", "licence", "copying", "notice", "readme", "source", "attribution"})
# Formats recognised but not read, with what to do instead (longest suffix first wins).
_UNSUPPORTED = {
    ".json": "one JSON document per file, not JSON lines: convert it to .jsonl (e.g. jq -c '.[]')",
    ".json.gz": "one JSON document per file, not JSON lines: convert it to .jsonl.gz (e.g. jq -c '.[]')",
    **{f"{data}{packed}": f"{name}-compressed: only gzip is read; recompress it with gzip ({data}.gz)"
       for data in (".jsonl", ".ndjson", ".txt", ".warc", ".json")
       for packed, name in ((".bz2", "bzip2"), (".xz", "xz"), (".zst", "zstd"), (".lz4", "lz4"))},
    **{suffix: "an archive of files: unpack it into a folder of inputs"
       for suffix in (".zip", ".tar", ".tar.gz", ".tgz", ".7z")},
    ".arc.gz": "an ARC archive: only WARC is read (convert it, e.g. warcio's arc2warc)",
    ".csv": "a table: export its text column as .jsonl or .parquet",
    ".tsv": "a table: export its text column as .jsonl or .parquet",
}
# How much of each JSON lines or text file is looked at, at discovery, to tell whether it is UTF-8.
SNIFF_BYTES = 1 << 16
_BOMS = ((codecs.BOM_UTF32_LE, "UTF-32LE"), (codecs.BOM_UTF32_BE, "UTF-32BE"),
         (codecs.BOM_UTF16_LE, "UTF-16LE"), (codecs.BOM_UTF16_BE, "UTF-16BE"))
# JSON nested deeper than this is rejected before parsing (the parser recurses once per level; a
# fixed bound, not the interpreter's recursion limit, so every executor decides alike).
MAX_JSON_DEPTH = 200
_JSON_STRING = re.compile(r'"[^"\\]*(?:\\.[^"\\]*)*"')
_JSON_BRACKETS = re.compile(r"[\[\]{}]")


class InputError(ValueError):
    """A stage-level input problem (missing path, unknown format): stops before any work."""


@dataclass(frozen=True)
class Piece:
    """A byte range of a split file: ``[start, end)``, starting at line ``first_line`` (0-based), with the
    range's own checksum, so a worker checks the bytes it reads without reading the rest of the file."""

    start: int
    end: int
    first_line: int
    checksum: str


@dataclass(frozen=True)
class InputShard:
    """One unit of reading: a whole file, or one ``piece`` of a split file.

    ``file_id`` names the file (document ids without an id field are ``<file_id>:<line>``, whether or
    not it is split); ``shard_id`` names the unit (``<file_id>`` or ``<file_id>-<piece index>``);
    ``checksum`` is always the whole file's, which is what a continuing run compares.
    """

    shard_id: str
    uri: str
    format: str
    source: str
    checksum: str
    file_id: str
    piece: Piece | None = None


def detect_format(uri: str) -> str | None:
    name = uri.lower()
    for suffix in sorted(FORMATS, key=len, reverse=True):
        if name.endswith(suffix):
            return FORMATS[suffix]
    return None


def _unsupported(uri: str) -> str | None:
    """Why a recognised format is not read (and what to do), or None for a format not recognised."""
    name = uri.lower()
    for suffix in sorted(_UNSUPPORTED, key=len, reverse=True):
        if name.endswith(suffix):
            return _UNSUPPORTED[suffix]
    return None


def expand_input(storage: Storage, pattern: str) -> list[str]:
    """Every file an input pattern names, hidden ones included; an error when it names none or cannot
    be listed."""
    try:
        files = storage.expand(pattern, hidden=True)
    except FileNotFoundError:
        files = []
    except Exception as err:  # an unreachable endpoint or a missing bucket
        raise InputError(f"cannot list input {pattern}: {err}") from None
    if not files:
        raise InputError(f"input path does not exist or holds no files: {pattern}")
    return files


def discover_inputs(storage: Storage, patterns: list[str], text_field: str = "text",
                    split_bytes: int | None = None,
                    read_hidden: bool = False) -> tuple[list[InputShard], list[dict[str, str]]]:
    """Expand files, folders and globs into shards, failing early on anything unusable.

    Returns the shards (a split file's pieces in file order) and the files found but not read, each
    as ``{"uri", "reason"}`` (the reason a key, then ``: `` and what to do): ``hidden`` (a name below
    the input starting with '.' or '_', unless ``read_hidden``), ``not_data`` (licenses, READMEs),
    ``unknown_format``, ``unsupported_format`` and ``not_utf8``, so that nothing is left out without a
    record of it.
    """
    if not patterns:
        raise InputError("no inputs given (clean.inputs in the config, or --input)")
    files_found: dict[str, tuple[str, str, str]] = {}  # uri -> (file id, format, source)
    skipped: list[dict[str, str]] = []
    for pattern in patterns:
        files = expand_input(storage, pattern)
        base = pattern.rstrip("/") if "://" in pattern else os.path.abspath(pattern)
        for uri in files:
            if uri in files_found or uri in {item["uri"] for item in skipped}:
                continue  # named twice (a folder and a file in it): the first naming decides its id
            if not read_hidden and storage.is_hidden(uri, pattern):
                skipped.append({"uri": uri, "reason": "hidden"})
                continue
            if uri != base and _is_not_data(uri):
                skipped.append({"uri": uri, "reason": "not_data: license/readme/attribution file"})
                continue
            fmt = detect_format(uri)
            if fmt is None:
                advice = _unsupported(uri)
                if uri == base:
                    raise InputError(f"unsupported input format: {uri} "
                                     f"({advice or 'known: ' + ', '.join(sorted(FORMATS))})")
                skipped.append({"uri": uri, "reason": f"unsupported_format: {advice}" if advice else
                                f"unknown_format: known formats are {', '.join(sorted(FORMATS))}"})
                continue
            if fmt == "parquet":
                _check_parquet_schema(storage, uri, text_field)
            elif (problem := _encoding_problem(storage, uri)) is not None:
                skipped.append({"uri": uri, "reason": f"not_utf8: {problem}; convert it to UTF-8 "
                                                      "(e.g. iconv -f <encoding> -t UTF-8)"})
                continue
            file_id = hashlib.sha1(_location_free_name(uri, base).encode("utf-8")).hexdigest()[:12]
            files_found[uri] = (file_id, fmt, _source_name(uri, base))
    ids = [file_id for file_id, _, _ in files_found.values()]
    if len(set(ids)) != len(ids):
        raise InputError(f"two inputs share a folder and file name; give them distinct names: {patterns}")
    if not files_found:
        not_read = "; ".join(f"{item['uri']}: {item['reason']}" for item in skipped[:10])
        raise InputError(f"no readable input files (known formats: {', '.join(sorted(FORMATS))}) in {patterns}"
                         + (f"; not read: {not_read}" if not_read else ""))
    shards = []
    for uri in sorted(files_found):
        file_id, fmt, source = files_found[uri]
        if split_bytes and _splittable(uri, fmt) and storage.size(uri) > split_bytes:
            checksum, pieces = split_file(storage, uri, split_bytes)
        else:
            checksum, pieces = storage.checksum(uri), []
        if len(pieces) < 2:
            shards.append(InputShard(file_id, uri, fmt, source, checksum, file_id))
        else:
            shards += [InputShard(f"{file_id}-{index:04d}", uri, fmt, source, checksum, file_id, piece)
                       for index, piece in enumerate(pieces)]
    return shards, skipped


def _splittable(uri: str, fmt: str) -> bool:
    """Line formats whose bytes can be entered anywhere: not gzip (a stream), not Parquet or WARC."""
    return fmt in ("jsonl", "text") and not uri.endswith(".gz")


def split_file(storage: Storage, uri: str, split_bytes: int) -> tuple[str, list[Piece]]:
    """One pass over a file: its checksum (as ``Storage.checksum`` gives it) and its pieces.

    The file is cut into ``ceil(size / split_bytes)`` pieces of about equal size, each ending just
    after a newline (a piece holds whole lines; a line longer than a piece makes that piece longer),
    with the line number it starts at and the xxh3 of its bytes.
    """
    size = storage.size(uri)
    count = -(-size // split_bytes)
    step = -(-size // count)
    whole, part = xxhash.xxh3_128(), xxhash.xxh3_128()
    pieces: list[Piece] = []
    start = first_line = lines = position = 0
    with storage.open_read(uri) as handle:
        while block := handle.read(CHUNK_BYTES * 4):
            whole.update(block)
            done = 0  # bytes of this block already hashed into a piece
            while (cut := block.find(b"\n", max(start + step - 1 - position, done))) >= 0:
                part.update(block[done:cut + 1])
                lines += block.count(b"\n", done, cut + 1)
                pieces.append(Piece(start, position + cut + 1, first_line, f"xxh3:{part.hexdigest()}"))
                start, first_line, part, done = position + cut + 1, lines, xxhash.xxh3_128(), cut + 1
            part.update(block[done:])
            lines += block.count(b"\n", done)
            position += len(block)
    if position > start:
        pieces.append(Piece(start, position, first_line, f"xxh3:{part.hexdigest()}"))
    # an object store's checksum is its ETag (no second read); a local file's is the xxh3 just taken
    checksum = storage.checksum(uri) if "://" in uri else f"xxh3:{whole.hexdigest()}"
    return checksum, pieces


def _encoding_problem(storage: Storage, uri: str) -> str | None:
    """Why a JSON lines or text file is not UTF-8 text, judged from its first ``SNIFF_BYTES`` (after
    gunzip): a UTF-16 or UTF-32 byte order mark, NUL bytes in a quarter of the bytes or more (UTF-16
    or UTF-32 without a mark), or most lines not decodable as UTF-8 (GB18030, Latin-1, ...). None
    for UTF-8, or a file too damaged to tell (its reader then says what is wrong)."""
    fs, path = storage.fs(uri)
    head = fs.cat_file(path, start=0, end=SNIFF_BYTES)
    if uri.endswith(".gz"):
        try:
            head = zlib.decompressobj(16 + zlib.MAX_WBITS).decompress(head, SNIFF_BYTES)
        except zlib.error:
            return None
    for bom, name in _BOMS:
        if head.startswith(bom):
            return f"{name} (byte order mark {bom.hex(' ').upper()})"
    if len(head) >= 16 and head.count(0) * 4 >= len(head):
        odd, even = head[1::2].count(0), head[0::2].count(0)
        guess = "UTF-16LE" if odd > 2 * even else "UTF-16BE" if even > 2 * odd else "UTF-32 or binary"
        return f"{head.count(0)} of its first {len(head)} bytes are NUL (looks like {guess} without a byte order mark)"
    *lines, last = head.split(b"\n")
    decoder = codecs.getincrementaldecoder("utf-8")()
    bad = 0
    for line, final in [(line, True) for line in lines] + [(last, False)]:  # the last may end mid-character
        try:
            decoder.reset()
            decoder.decode(line, final=final)
        except UnicodeDecodeError:
            bad += 1
    count = sum(1 for line in [*lines, last] if line.strip())
    if count >= 4 and bad * 2 > count:
        return f"{bad} of its first {count} lines are not UTF-8 (another encoding, e.g. GB18030 or Latin-1?)"
    return None


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


def read_limit(max_doc_bytes: int) -> int:
    """The longest line or WARC payload read whole: well above ``max_doc_bytes``, so that every record
    whose text could be within it (JSON escapes, other fields) is parsed and judged as before; a longer
    one is rejected as too large without being held in memory."""
    return max(READ_LIMIT_FACTOR * max_doc_bytes, MIN_READ_LIMIT)


class ShardReader(PipelineStep):
    """Reads shard ``rank`` of a fixed shard list (datatrove's task = one input file).

    ``damaged[shard_id]`` lists, once the shard is read, what was wrong with its file as a whole (a
    gzip that fails its CRC or ends early, bytes of a WARC skipped to reach the next readable
    record): problems no single record carries, which the stage lists in ``damaged_inputs``.
    """

    type = "📖 skymoe"
    name = "read"

    def __init__(self, shards: list[InputShard], config: ReaderConfig, storage: Storage,
                 code_sources: frozenset[str] = frozenset()):
        super().__init__()
        self.shards = shards
        self.config = config
        self.storage = storage
        self.code_sources = code_sources
        self.damaged: dict[str, list[str]] = {}

    def run(self, data=None, rank: int = 0, world_size: int = 1) -> Iterator[Document]:
        shard = self.shards[rank]
        self.damaged[shard.shard_id] = []
        records = {"jsonl": self._jsonl, "text": self._text, "parquet": self._parquet, "warc": self._warc}
        for doc in records[shard.format](shard):
            doc.metadata.setdefault("source", shard.source)
            doc.metadata["shard"] = shard.shard_id
            if shard.source in self.code_sources and "_reject" not in doc.metadata:
                doc.metadata["lang"] = "code"
            self.stat_update("read")
            yield doc

    # ---------------------------------------------------------------------------- input bytes
    @contextmanager
    def _stream(self, shard: InputShard) -> Iterator["_CheckedStream"]:
        """The shard's bytes in order (a piece's range only), hashed as they are read; once every record
        is read, the rest of the shard is hashed too and checked against the checksum taken when the
        stage was planned."""
        piece = shard.piece
        with self.storage.open_read(shard.uri) as handle:
            if piece is None:
                source = _CheckedStream(handle, shard.checksum)
            else:
                handle.seek(piece.start)
                source = _CheckedStream(handle, piece.checksum, size=piece.end - piece.start)
            yield source
            source.verify(shard.uri)

    def _check_unchanged(self, shard: InputShard) -> None:
        """For a file read out of order (Parquet): its checksum again, before any record is read."""
        if shard.checksum.startswith("xxh3:") and self.storage.checksum(shard.uri) != shard.checksum:
            raise InputError(_CHANGED.format(uri=shard.uri))

    # ---------------------------------------------------------------------------- formats
    def _decoded_lines(self, shard: InputShard, source: "_CheckedStream") -> Iterator[tuple[int, str | Document]]:
        """(line number, text) per line - or a rejected document for a line that cannot be decoded or is
        longer than the read limit and, last, for the partial record of a truncated gzip (whose damage
        is also recorded for the file). A UTF-8 byte order mark at the start of the file is dropped."""
        limit = read_limit(self.config.max_doc_bytes)
        gunzip = _GunzipStream(source) if shard.uri.endswith(".gz") else None
        lines = io.BufferedReader(source if gunzip is None else gunzip, CHUNK_BYTES)
        number, line = (shard.piece.first_line if shard.piece else 0), b""
        at_file_start = shard.piece is None or shard.piece.start == 0
        for line, size, whole in _bounded_lines(lines, limit):
            if at_file_start and line.startswith(codecs.BOM_UTF8):
                line, size = line[len(codecs.BOM_UTF8):], size - len(codecs.BOM_UTF8)
            at_file_start = False
            if not whole and gunzip is not None and gunzip.problem is not None:
                break  # the partial record before the problem: rejected below
            if size > limit:
                yield number, self._rejected(shard, number, f"too_large: {size} bytes > read limit {limit}, not read",
                                             line.decode("utf-8", errors="backslashreplace"))
            else:
                try:
                    yield number, line.decode("utf-8").rstrip("\r")
                except UnicodeDecodeError as err:
                    yield number, self._rejected(shard, number, f"invalid_utf8: {err.reason} at byte {err.start}",
                                                 line.decode("utf-8", errors="backslashreplace"))
            number += 1
            line = b""
        if gunzip is not None and gunzip.problem is not None:
            err = gunzip.problem
            self._damage(shard, f"gzip: {type(err).__name__}: {err} (after {number} lines, which are read"
                                f"{'; the partial line after them is rejected' if line else ''})")
            if line:
                yield number, self._rejected(shard, number, f"truncated_gzip: {type(err).__name__}: {err}",
                                             line.decode("utf-8", errors="backslashreplace"))

    def _damage(self, shard: InputShard, problem: str) -> None:
        self.damaged[shard.shard_id].append(problem)

    def _rejected(self, shard: InputShard, number: int, reason: str, original: str) -> Document:
        doc = Document(text="", id=f"{shard.file_id}:{number}", metadata={ORIGINAL: original})
        reject(doc, READ_STEP, reason)
        return doc

    def _checked_text(self, shard: InputShard, number: int, text: str, original: str, fields: dict) -> Document:
        """A document of ``text`` with the record's id and url, rejected when one of them is not valid
        Unicode (a lone surrogate escaped in JSON: no UTF-8 encodes it, so no output could hold it),
        when the text is too large, or when it is blank."""
        cfg = self.config
        doc_id = fields.get(cfg.id_field) if cfg.id_field else None
        url = fields.get(cfg.url_field) if cfg.url_field else None
        doc_id = str(doc_id) if doc_id not in (None, "") else f"{shard.file_id}:{number}"
        url = url if isinstance(url, str) and url else None
        invalid = _lone_surrogate({"text": text, "id": doc_id, "url": url or ""})
        if invalid is not None:
            return self._rejected(shard, number, f"invalid_unicode: {invalid}", original)
        doc = Document(text=text, id=doc_id, metadata={ORIGINAL: original})
        if url is not None:
            doc.metadata["url"] = url
        size = len(text.encode("utf-8"))
        if size > cfg.max_doc_bytes:
            reject(doc, READ_STEP, f"too_large: {size} bytes > {cfg.max_doc_bytes}")
        elif not text.strip():
            reject(doc, READ_STEP, "empty")
        return doc

    def _jsonl(self, shard: InputShard) -> Iterator[Document]:
        field = self.config.text_field
        with self._stream(shard) as source:
            for number, line in self._decoded_lines(shard, source):
                if isinstance(line, Document):
                    yield line
                elif not line.strip():
                    continue  # a blank line between records is not a record
                else:
                    yield self._json_record(shard, number, line, field)

    def _json_record(self, shard: InputShard, number: int, line: str, field: str) -> Document:
        depth = _json_depth(line)
        if depth > MAX_JSON_DEPTH:
            return self._rejected(shard, number, f"too_deeply_nested: {depth} levels > {MAX_JSON_DEPTH}", line)
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

    def _text(self, shard: InputShard) -> Iterator[Document]:
        with self._stream(shard) as source:
            for number, line in self._decoded_lines(shard, source):
                yield line if isinstance(line, Document) else self._checked_text(shard, number, line, line, {})

    def _parquet(self, shard: InputShard) -> Iterator[Document]:
        """A record batch at a time (a row group's column chunks are read as they are needed). Every
        column is read: a record's original, kept for the rejects, is the whole row."""
        import pyarrow.parquet as pq

        field = self.config.text_field  # its presence was checked when the inputs were discovered
        self._check_unchanged(shard)
        number = 0
        with self.storage.open_read(shard.uri) as handle:
            for batch in pq.ParquetFile(handle).iter_batches(batch_size=PARQUET_BATCH_ROWS):
                for record in batch.to_pylist():
                    original = json.dumps(record, ensure_ascii=False, default=str)
                    text = record.get(field)
                    if not isinstance(text, str):
                        yield self._rejected(shard, number, f"missing_text_field: '{field}'", original)
                    else:
                        yield self._checked_text(shard, number, text, original, record)
                    number += 1

    def _warc(self, shard: InputShard) -> Iterator[Document]:
        """A WARC's records; a ``.warc.gz`` one gzip member at a time (a member holds one record, as the
        WARC standard recommends and warcio expects), so that a damaged member costs its own record
        only: the reader skips to the next member that decompresses to a WARC record, and the skipped
        bytes and the member's gzip error are recorded for the file. An uncompressed WARC has no such
        boundaries: after a record that cannot be parsed, the rest of the file is not read (recorded)."""
        with self._stream(shard) as source:
            if not shard.uri.endswith(".gz"):
                _, failed = yield from self._warc_records(shard, io.BufferedReader(source, CHUNK_BYTES), 0)
                if failed:
                    self._damage(shard, "the WARC records after the unreadable one were not read (an "
                                        "uncompressed WARC cannot be resynchronised; gzip it record by record, "
                                        "e.g. warcio recompress)")
                return
            gunzip = _GunzipStream(source, by_member=True)
            members = io.BufferedReader(gunzip, CHUNK_BYTES)  # one for all: closing a reader closes gunzip
            number, damage = 0, None  # damage: the last member's gzip error, told with where reading went on
            while True:
                found, skipped = gunzip.next_member(_WARC_START)
                if damage is not None:
                    self._damage(shard, f"{damage}; " + (f"read on at the next record, byte {gunzip.member_start}"
                                                         if found else "no readable WARC record after it"))
                elif skipped:
                    self._damage(shard, f"bytes {gunzip.member_start - skipped} to {gunzip.member_start} skipped: "
                                        "no readable WARC record starts there")
                if not found:
                    break
                start = gunzip.member_start
                number, _ = yield from self._warc_records(shard, members, number, gunzip)
                err = gunzip.problem
                damage = f"gzip member at byte {start}: {type(err).__name__}: {err}" if err else None

    def _warc_records(self, shard: InputShard, stream: IO[bytes], number: int,
                      member: "_GunzipStream | None" = None) -> Generator[Document, None, tuple[int, bool]]:
        """The response records of an uncompressed WARC stream (a gzip ``member``'s data, or a whole
        file), numbered on from ``number``; returns (the last number, whether a record could not be
        parsed, which ends the stream). Garbage that follows a record inside a member that then fails
        its gzip check is that member's damage (recorded for the file), not a record of its own."""
        from warcio.archiveiterator import ArchiveIterator
        from warcio.exceptions import ArchiveLoadFailed

        from skymoe.pipelines.clean.extract import extract_main_text

        limit = read_limit(self.config.max_doc_bytes)
        records = 0
        try:
            for record in _warc_iterator(ArchiveIterator(stream, check_digests=True)):
                records += 1
                if record.rec_type != "response":
                    continue
                number += 1
                url = record.rec_headers.get_header("WARC-Target-URI") or ""
                record_id = record.rec_headers.get_header("WARC-Record-ID") or f"{shard.file_id}:{number}"
                content_type = (record.http_headers.get_header("Content-Type") or "") if record.http_headers else ""
                payload, size = _bounded_read(record.content_stream(), limit)
                original = json.dumps({"url": url, "content_type": content_type,
                                       "payload": payload.decode("utf-8", errors="backslashreplace")},
                                      ensure_ascii=False)
                missing = getattr(record.raw_stream, "limit", 0)  # bytes the header promised but the file lacks
                if missing or record.digest_checker.passed is False:
                    problems = f"{missing} bytes missing" if missing else "; ".join(record.digest_checker.problems)
                    doc = self._rejected(shard, number, f"truncated_or_corrupt_warc: {problems}", original)
                elif "html" not in content_type.lower():
                    doc = self._rejected(shard, number, f"not_html: {content_type or 'no content type'}", original)
                elif size > limit:
                    doc = self._rejected(shard, number, f"too_large: {size} bytes > read limit {limit}, not read",
                                         original)
                else:
                    text = extract_main_text(payload)
                    doc = self._checked_text(shard, number, text, original, {"url": url})
                    if not text.strip():
                        reject(doc, "extract", "no_main_text")
                doc.id = record_id
                yield doc
        except (ArchiveLoadFailed, EOFError, zlib.error, OSError) as err:
            if member is not None:
                while stream.read(CHUNK_BYTES):  # the member read to its end, where its gzip check runs
                    pass
            if not (records and member is not None and member.problem is not None):
                number += 1
                yield self._rejected(shard, number, f"truncated_or_corrupt_warc: {err}", "")
            return number, True
        return number, False


_CHANGED = "{uri} changed after the stage was planned; rerun to pick up the new content"
_WARC_START = b"WARC/"  # what a WARC record's first line starts with


def _lone_surrogate(fields: dict[str, str]) -> str | None:
    """Where the first field holding a lone surrogate (U+D800 to U+DFFF, which JSON can escape but no
    UTF-8 can encode) has it, or None when every field is valid Unicode."""
    for name, value in fields.items():
        try:
            value.encode("utf-8")
        except UnicodeEncodeError as err:
            return f"lone surrogate U+{ord(value[err.start]):04X} in '{name}' at character {err.start}"
    return None


def _json_depth(line: str) -> int:
    """How deep a JSON line nests arrays and objects (brackets inside strings left out), or 0 when
    it has too few brackets to nest deeper than ``MAX_JSON_DEPTH``: counting them (C speed) settles
    almost every line, and only a line with more is measured."""
    if line.count("[") + line.count("{") <= MAX_JSON_DEPTH:
        return 0
    brackets = _JSON_BRACKETS.findall(_JSON_STRING.sub('""', line))
    return max(accumulate(1 if bracket in "[{" else -1 for bracket in brackets), default=0)


def _warc_iterator(records: Iterator) -> Iterator:
    """warcio's records, with a header block cut short (warcio fails on it with AttributeError or
    ValueError, e.g. a response without its target URI) raised as ``ArchiveLoadFailed``."""
    from warcio.exceptions import ArchiveLoadFailed

    while True:
        try:
            record = next(records)
        except StopIteration:
            return
        except (AttributeError, ValueError, IndexError, KeyError) as err:
            raise ArchiveLoadFailed(f"unreadable record headers ({type(err).__name__}: {err})") from err
        yield record


def _bounded_lines(lines: IO[bytes], limit: int) -> Iterator[tuple[bytes, int, bool]]:
    """(line, size, whole) per line of a stream, without its newline: ``whole`` is false for a last line
    with no newline. A line longer than ``limit`` bytes is not held: its first
    ``OVERSIZED_ORIGINAL_BYTES`` come with its full ``size``, and the rest is skipped."""
    while line := lines.readline(limit + 1):
        whole = line.endswith(b"\n")
        if whole or len(line) <= limit:
            yield (line[:-1] if whole else line), len(line) - whole, whole
            continue
        size, head = len(line), line[:OVERSIZED_ORIGINAL_BYTES]
        del line
        while not whole and (rest := lines.readline(CHUNK_BYTES)):
            whole = rest.endswith(b"\n")
            size += len(rest) - whole
        yield head, size, whole


def _bounded_read(stream, limit: int) -> tuple[bytes, int]:
    """(payload, size) of a WARC record's content: the whole payload up to ``limit`` bytes; past it,
    only its first ``OVERSIZED_ORIGINAL_BYTES`` and the size, the rest read and dropped (so that the
    record's digest and truncation are still checked)."""
    parts, size = [], 0
    while size <= limit and (part := stream.read(CHUNK_BYTES)):
        parts.append(part)
        size += len(part)
    if size <= limit:
        return b"".join(parts), size
    head = b"".join(parts)[:OVERSIZED_ORIGINAL_BYTES]
    parts.clear()
    while part := stream.read(CHUNK_BYTES):
        size += len(part)
    return head, size


class _CheckedStream(io.RawIOBase):
    """A file's bytes from where its handle stands (to the end, or the next ``size`` bytes), in order,
    with the xxh3 checksum of everything read so far (for an ``xxh3:`` checksum; an object store's
    ETag is not recomputed)."""

    def __init__(self, handle: IO[bytes], checksum: str, size: int | None = None):
        super().__init__()
        self._handle = handle
        self._checksum = checksum
        self._digest = xxhash.xxh3_128() if checksum.startswith("xxh3:") else None
        self._position = 0
        self._size = size

    def readable(self) -> bool:
        return True

    def read(self, size: int = -1) -> bytes:
        if self._size is not None:
            left = self._size - self._position
            size = left if size is None or size < 0 else min(size, left)
        data = self._handle.read(size)
        if self._digest is not None:
            self._digest.update(data)
        self._position += len(data)
        return data

    def readinto(self, buffer) -> int:
        data = self.read(len(buffer))
        buffer[: len(data)] = data
        return len(data)

    def tell(self) -> int:
        return self._position

    def verify(self, uri: str) -> None:
        """Hash what the readers left unread and compare with the checksum."""
        if self._digest is None:
            return
        while self.read(CHUNK_BYTES):  # read() hashes
            pass
        if f"xxh3:{self._digest.hexdigest()}" != self._checksum:
            raise InputError(_CHANGED.format(uri=uri))


_GZIP_EOF = "Compressed file ended before the end-of-stream marker was reached"


class _NeedMore(Exception):
    """A gzip header runs past the bytes buffered so far."""


class _GunzipStream(io.RawIOBase):
    """The decompressed bytes of a gzip file as a stream, member after member, as far as they are readable.

    It reads as ``gzip.decompress`` does and stops where that fails, with the same exception (kept in
    ``problem``; the stream then ends): a member cut short or corrupt, a bad CRC or length, a header
    that is not gzip. NUL padding between members is skipped. Unlike decompressing the whole file,
    what a member gave before its problem was found has already been read.

    ``by_member``: the stream ends after each member instead, and :meth:`next_member` moves on to the
    next one - past a damaged member or unreadable bytes too, by finding the next gzip header whose
    data starts as expected.
    """

    def __init__(self, raw: IO[bytes], by_member: bool = False):
        super().__init__()
        self._raw = raw
        self._raw_read = 0  # compressed bytes read from ``raw`` so far
        self._input = b""  # compressed bytes read but not yet given to zlib
        self._raw_eof = False
        self._inflate = None  # the current member's raw-deflate decompressor; None between members
        self._crc = self._size = self._members = 0
        self._out = memoryview(b"")
        self._by_member = by_member
        self._ended = by_member  # by member: nothing to read before the first next_member()
        self.problem: Exception | None = None
        self.member_start = 0  # where the current member starts in the compressed file

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        while not self._out and not self._ended:
            try:
                self._advance()
            except (EOFError, zlib.error, gzip.BadGzipFile) as err:
                self.problem, self._ended = err, True
        size = min(len(buffer), len(self._out))
        buffer[:size] = self._out[:size]
        self._out = self._out[size:]
        return size

    def next_member(self, starts_with: bytes) -> tuple[bool, int]:
        """By member: start reading the next member whose data starts with ``starts_with``, skipping
        whatever is left of the current one and any bytes before it that are not such a member.
        Returns (whether one was found, compressed bytes skipped to reach it or the end of the file:
        NUL padding after a member that ended well does not count); ``member_start`` is then where it
        starts (or the file's size)."""
        clean = self.problem is None and self._inflate is None
        if self._inflate is not None:  # left unfinished: its unread compressed bytes are skipped
            self._input = self._inflate.unconsumed_tail + self._input
            self._inflate = None
        self.problem, self._out, self._ended = None, memoryview(b""), False
        while clean and not self._input.strip(b"\x00") and not self._raw_eof:
            self._input = b""
            self._fill(1)
        if clean:
            self._input = self._input.lstrip(b"\x00")
        skipped = 0
        while True:
            self._fill(INFLATE_BYTES)
            found = self._input.find(b"\037\213\010")
            if found < 0:  # keep a tail that may be the start of a magic number cut by the buffer
                keep = 0 if self._raw_eof else min(2, len(self._input))
                skipped += len(self._input) - keep
                self._input = self._input[len(self._input) - keep:]
                if self._raw_eof:
                    break
                continue
            skipped += found
            self._input = self._input[found:]
            if self._member_starts_with(starts_with):
                break
            skipped, self._input = skipped + 1, self._input[1:]
        self.member_start = self._position()
        if not self._input:
            self._ended = True
            return False, skipped
        self._start_member()
        return True, skipped

    def _member_starts_with(self, expected: bytes) -> bool:
        """Whether the bytes buffered at ``_input`` begin a gzip member whose data starts with ``expected``
        (or an empty member, which some writers append: not a gap)."""
        inflate = zlib.decompressobj(-zlib.MAX_WBITS)
        try:
            header = _gzip_header_length(self._input, complete=True)
            head = inflate.decompress(memoryview(self._input)[header:], len(expected))
        except (EOFError, zlib.error, gzip.BadGzipFile):
            return False
        return head == expected or (head == b"" and inflate.eof)

    def _position(self) -> int:
        """Where ``_input`` starts in the compressed file (between members)."""
        return self._raw_read - len(self._input)

    def _read_raw(self, size: int) -> bytes:
        data = self._raw.read(size)
        self._raw_read += len(data)
        return data

    def _fill(self, size: int) -> None:
        """At least ``size`` compressed bytes buffered, unless the file ends first."""
        while len(self._input) < size and not self._raw_eof:
            data = self._read_raw(max(INFLATE_BYTES, size - len(self._input)))
            if data:
                self._input += data
            else:
                self._raw_eof = True

    def _advance(self) -> None:
        if self._inflate is None:
            self._start_member()
            return
        data = self._inflate.unconsumed_tail or self._input
        self._input = b""
        if not data and not self._raw_eof:
            data = self._read_raw(INFLATE_BYTES)
            self._raw_eof = not data
        try:
            out = self._inflate.decompress(data, CHUNK_BYTES)  # bounded output: no bomb fills memory
        except zlib.error:
            self._input, self._inflate = data, None  # next_member looks on from the bytes that failed
            raise
        self._crc = zlib.crc32(out, self._crc)
        self._size += len(out)
        self._out = memoryview(out)
        if self._inflate.eof:
            self._input = self._inflate.unused_data
            self._end_member()
        elif not data and not out:
            raise EOFError(_GZIP_EOF)

    def _start_member(self) -> None:
        while True:
            if self._members:
                self._input = self._input.lstrip(b"\x00")
            if self._input or self._raw_eof:
                break
            self._fill(1)
        if not self._input:
            self._ended = True  # a clean end after the last member (or an empty file)
            return
        wanted = INFLATE_BYTES
        while True:
            self._fill(wanted)
            try:
                header = _gzip_header_length(self._input, complete=self._raw_eof)
                break
            except _NeedMore:
                wanted = len(self._input) + CHUNK_BYTES
        self.member_start = self._position()
        self._input = self._input[header:]
        self._inflate = zlib.decompressobj(-zlib.MAX_WBITS)
        self._crc = self._size = 0
        self._members += 1

    def _end_member(self) -> None:
        self._fill(8)
        if len(self._input) < 8:
            self._inflate = None
            raise EOFError(_GZIP_EOF)
        crc, length = struct.unpack("<II", self._input[:8])
        self._input, self._inflate = self._input[8:], None  # the trailer is the member's, checked or not
        if crc != self._crc:
            raise gzip.BadGzipFile("CRC check failed")
        if length != self._size & 0xFFFFFFFF:
            raise gzip.BadGzipFile("Incorrect length of data produced")
        self._ended = self._by_member


def _gzip_header_length(data: bytes, complete: bool) -> int:
    """The length of the gzip member header at the start of ``data``, read as ``gzip._read_gzip_header``
    reads it (same checks, same errors); ``_NeedMore`` when ``data`` ends inside it and is not
    ``complete``."""
    handle = io.BytesIO(data)

    def exact(size: int) -> bytes:
        got = handle.read(size)
        if len(got) < size:
            if not complete:
                raise _NeedMore
            raise EOFError(_GZIP_EOF)
        return got

    magic = handle.read(2)
    if len(magic) < 2 and not complete:
        raise _NeedMore
    if magic != b"\037\213":
        raise gzip.BadGzipFile("Not a gzipped file (%r)" % magic)
    method, flag, _mtime = struct.unpack("<BBIxx", exact(8))
    if method != 8:
        raise gzip.BadGzipFile("Unknown compression method")
    if flag & gzip.FEXTRA:
        extra, = struct.unpack("<H", exact(2))
        exact(extra)
    for present in (flag & gzip.FNAME, flag & gzip.FCOMMENT):
        if present:  # a NUL-terminated file name / comment
            while True:
                byte = handle.read(1)
                if not byte and not complete:
                    raise _NeedMore
                if not byte or byte == b"\0":
                    break
    if flag & gzip.FHCRC:
        exact(2)
    return handle.tell()
