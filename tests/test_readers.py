"""Input discovery and record reading on bad and odd input.

Every file is built in ``tmp_path`` from real text (the bundled corpus) with one defect planted,
and every test checks the reader's promise: each record read comes out either as a kept document
or as a rejected one that carries a reason and its original bytes. Nothing is silently lost.
"""

from __future__ import annotations

import gzip
import io
import json
import bz2
import codecs
import lzma
import random
import re
import shutil
import struct
import tracemalloc
import zlib
from pathlib import Path

import pytest
from datatrove.data import Document

from skymoe.pipelines.clean import readers
from skymoe.pipelines.clean.readers import InputError, ShardReader, detect_format, discover_inputs
from skymoe.pipelines.clean.steps import ORIGINAL, REJECT
from skymoe.config import ReaderConfig
from skymoe.storage import Storage

REPO = Path(__file__).resolve().parent.parent
CORPUS = REPO / "examples" / "corpus"
C4_LINES = (CORPUS / "c4" / "c4_demo.jsonl").read_text("utf-8").splitlines()
C4_TEXTS = [json.loads(line)["text"] for line in C4_LINES]
ZHWIKI = (CORPUS / "zhwiki" / "zhwiki_part1.txt").read_text("utf-8").splitlines()
WARC = CORPUS / "dolma" / "sample-0000.warc.gz"
STORAGE = Storage()


def read(paths: list[str | Path], config: ReaderConfig | None = None,
         code_sources: frozenset[str] = frozenset()) -> list[Document]:
    """Discover the inputs and read every shard, as the stage does (one task per shard)."""
    return read_reporting(paths, config, code_sources)[0]


def read_reporting(paths: list[str | Path], config: ReaderConfig | None = None,
                   code_sources: frozenset[str] = frozenset(), split_bytes: int | None = None,
                   ) -> tuple[list[Document], dict[str, list[str]]]:
    """``read``, and what the reader found wrong with each file as a whole (by file name; none: absent)."""
    config = config or ReaderConfig()
    shards, _ = discover_inputs(STORAGE, [str(p) for p in paths], config.text_field, split_bytes)
    reader = ShardReader(shards, config, STORAGE, code_sources)
    docs = [doc for rank in range(len(shards)) for doc in reader.run(rank=rank, world_size=len(shards))]
    damaged: dict[str, list[str]] = {}
    for shard in shards:
        if reader.damaged[shard.shard_id]:
            damaged.setdefault(Path(shard.uri).name, []).extend(reader.damaged[shard.shard_id])
    return docs, damaged


def split(docs: list[Document]) -> tuple[list[Document], list[Document]]:
    """(kept, rejected), checking that every rejected document says why and carries its record."""
    kept = [d for d in docs if REJECT not in d.metadata]
    rejected = [d for d in docs if REJECT in d.metadata]
    for d in rejected:
        assert d.metadata[REJECT]["step"] in {"read", "extract"} and d.metadata[REJECT]["reason"]
        assert ORIGINAL in d.metadata
    for d in kept:
        assert d.text.strip() and ORIGINAL in d.metadata
    return kept, rejected


def reasons(docs: list[Document]) -> list[str]:
    return [d.metadata[REJECT]["reason"] for d in docs if REJECT in d.metadata]


def write_lines(path: Path, lines: list[bytes]) -> Path:
    path.write_bytes(b"\n".join(lines) + b"\n")
    return path


def c4_record(i: int, **extra) -> bytes:
    return json.dumps({"text": C4_TEXTS[i], **extra}, ensure_ascii=False).encode("utf-8")


# --------------------------------------------------------------------------- JSONL
def test_malformed_json_lines_are_rejected_with_their_original(tmp_path):
    records = [
        c4_record(0, id="c4-0", url="https://example.org/air-cleaners"),
        c4_record(1)[:-40],  # cut mid-string
        b"[" + c4_record(2) + b"]",  # a JSON array, not an object
        json.dumps({"id": "no-text", "content": C4_TEXTS[3]}).encode(),  # no "text" field
        json.dumps({"text": 42}).encode(),  # text is not a string
        b"",  # a blank line between records is not a record
        c4_record(4),
    ]
    docs = read([write_lines(tmp_path / "mixed.jsonl", records)])
    kept, rejected = split(docs)
    assert len(docs) == 6  # every non-blank line is accounted for
    assert [d.text for d in kept] == [C4_TEXTS[0], C4_TEXTS[4]]
    assert kept[0].id == "c4-0" and kept[0].metadata["url"] == "https://example.org/air-cleaners"
    assert kept[1].id.endswith(":6")  # no id field: shard id and line number
    got = reasons(docs)
    assert got[0].startswith("malformed_json: Unterminated string")
    assert got[1] == "malformed_json: record is not an object"
    assert got[2] == got[3] == "missing_text_field: 'text'"
    assert rejected[0].metadata[ORIGINAL] == c4_record(1)[:-40].decode()
    assert rejected[2].metadata[ORIGINAL] == records[3].decode()
    assert all(d.metadata["source"] == "mixed" for d in docs)


def test_invalid_utf8_is_rejected_in_jsonl_and_text(tmp_path):
    bad = ZHWIKI[12].encode("utf-8")[:30] + b"\xff\xfe" + ZHWIKI[12].encode("utf-8")[30:]
    jsonl = write_lines(tmp_path / "zh.jsonl", [json.dumps({"text": ZHWIKI[5]}, ensure_ascii=False).encode(),
                                                 b'{"text": "' + bad + b'"}'])
    text = write_lines(tmp_path / "zh.txt", [ZHWIKI[5].encode(), bad, ZHWIKI[23].encode()])
    docs = read([jsonl, text])
    kept, rejected = split(docs)
    assert len(docs) == 5 and len(kept) == 3 and len(rejected) == 2
    for d in rejected:
        assert d.metadata[REJECT]["reason"].startswith("invalid_utf8: invalid start byte at byte ")
        assert "\\xff\\xfe" in d.metadata[ORIGINAL]  # the bad bytes are kept, escaped
        assert ZHWIKI[12][:10] in d.metadata[ORIGINAL]


def test_lone_surrogates_are_rejected_with_their_line(tmp_path):
    """An escaped lone surrogate is valid JSON, but no UTF-8 can hold it: the record is rejected at read
    time (it used to end the run with a UnicodeEncodeError), wherever it is; a proper pair is kept."""
    text = C4_TEXTS[1]
    lines = [
        c4_record(0),
        json.dumps({"text": text[:20] + "\ud800" + text[20:]}).encode(),  # json.dumps escapes it as \ud800
        json.dumps({"id": "\udc00-7", "text": C4_TEXTS[2]}).encode(),
        json.dumps({"url": "https://example.org/\udfff", "text": C4_TEXTS[3]}).encode(),
        json.dumps({"text": C4_TEXTS[4] + " \U0001F600"}).encode(),  # an escaped surrogate pair: one character
    ]
    assert b"\\ud800" in lines[1]
    path = write_lines(tmp_path / "surrogates.jsonl", lines)
    docs = read([path])
    kept, rejected = split(docs)
    assert [d.text for d in kept] == [C4_TEXTS[0], C4_TEXTS[4] + " \U0001F600"]
    assert reasons(docs) == ["invalid_unicode: lone surrogate U+D800 in 'text' at character 20",
                             "invalid_unicode: lone surrogate U+DC00 in 'id' at character 0",
                             "invalid_unicode: lone surrogate U+DFFF in 'url' at character 20"]
    assert [d.metadata[ORIGINAL] for d in rejected] == [line.decode() for line in lines[1:4]]
    assert [d.id.rsplit(":", 1)[1] for d in rejected] == ["1", "2", "3"]


def test_deeply_nested_json_is_rejected_before_parsing(tmp_path):
    """200,000 nested arrays used to end the run with a RecursionError; brackets inside strings do not
    count, and nesting up to the bound is parsed as usual."""
    deep = b'{"text": "' + C4_TEXTS[1][:100].encode() + b'", "a": ' + b"[" * 200_000 + b"]" * 200_000 + b"}"
    at_bound = json.dumps({"text": C4_TEXTS[2], "a": json.loads("[" * 199 + "]" * 199)}).encode()
    over = json.dumps({"text": C4_TEXTS[3], "a": json.loads("[" * 200 + "]" * 200)}).encode()
    brackets = json.dumps({"text": C4_TEXTS[4] + " [{" * 5000}).encode()
    path = write_lines(tmp_path / "deep.jsonl", [c4_record(0), deep, at_bound, over, brackets])
    docs = read([path])
    kept, rejected = split(docs)
    assert [d.text for d in kept] == [C4_TEXTS[0], C4_TEXTS[2], C4_TEXTS[4] + " [{" * 5000]
    assert reasons(docs) == ["too_deeply_nested: 200001 levels > 200", "too_deeply_nested: 201 levels > 200"]
    assert rejected[0].metadata[ORIGINAL] == deep.decode() and rejected[1].metadata[ORIGINAL] == over.decode()


def test_a_utf8_byte_order_mark_is_dropped_at_the_start_of_a_file_only(tmp_path):
    """The first record of a file written with a BOM is read (it used to be malformed JSON); a BOM at the
    start of a later line is not a file's mark, so that line stays a reject; a split file's later
    pieces start mid-file and keep their bytes."""
    bom = b"\xef\xbb\xbf"
    records = [c4_record(i) for i in range(40)]
    jsonl = tmp_path / "bom.jsonl"
    jsonl.write_bytes(bom + b"\n".join(records[:20] + [bom + records[20]] + records[21:]) + b"\n")
    text = tmp_path / "bom.txt"
    text.write_bytes(bom + "\n".join(ZHWIKI[:5]).encode() + b"\n")
    gz = tmp_path / "bom.jsonl.gz"
    gz.write_bytes(gzip.compress(bom + b"\n".join(records[:5]) + b"\n"))
    docs = read([jsonl, text, gz])
    kept, rejected = split(docs)
    assert [d.text for d in kept] == C4_TEXTS[:20] + C4_TEXTS[21:40] + C4_TEXTS[:5] + ZHWIKI[:5]  # files by name
    assert [d.metadata[ORIGINAL] for d in kept[:1]] == [records[0].decode()]  # the mark is not part of it
    assert len(rejected) == 1 and reasons(docs)[0].startswith("malformed_json: Unexpected UTF-8 BOM")
    pieces, _ = read_reporting([jsonl], split_bytes=16_384)
    assert len(discover_inputs(STORAGE, [str(jsonl)], split_bytes=16_384)[0]) > 2
    assert [(d.id, d.text, reasons([d])) for d in pieces] == [(d.id, d.text, reasons([d])) for d in docs[:40]]


def test_empty_and_whitespace_only_documents(tmp_path):
    jsonl = write_lines(tmp_path / "blank.jsonl", [
        c4_record(0), json.dumps({"text": ""}).encode(), json.dumps({"text": " \n\t\u3000 "}).encode(), b"   ",
    ])
    text = tmp_path / "blank.txt"
    text.write_bytes(f"{ZHWIKI[12]}\n\n   \t\n{ZHWIKI[23]}\r\n".encode())
    docs = read([jsonl, text])
    kept, rejected = split(docs)
    # JSONL: 3 records (the whitespace-only line is not a record); text: 4 lines, each a document.
    assert len(docs) == 3 + 4
    assert [d.text for d in kept] == [C4_TEXTS[0], ZHWIKI[12], ZHWIKI[23]]  # "\r" of CRLF dropped
    assert reasons(docs) == ["empty"] * 4


def test_a_20_mb_document_is_rejected_as_too_large(tmp_path):
    huge = "\n".join(C4_TEXTS * 40)[: 20_000_000]  # 20 MB of real C4 text in one record
    path = write_lines(tmp_path / "big.jsonl", [c4_record(0), json.dumps({"text": huge}).encode(), c4_record(1)])
    docs = read([path])
    kept, rejected = split(docs)
    assert len(docs) == 3 and [d.text for d in kept] == [C4_TEXTS[0], C4_TEXTS[1]]
    size = len(huge.encode("utf-8"))
    assert reasons(docs) == [f"too_large: {size} bytes > 5000000"]
    assert json.loads(rejected[0].metadata[ORIGINAL])["text"] == huge
    # The limit is configurable.
    small = read([path], ReaderConfig(max_doc_bytes=len(C4_TEXTS[0].encode()) - 1))
    assert [r.split(":")[0] for r in reasons(small)] == ["too_large"] * 3


def test_text_field_id_field_and_url_field_are_configurable(tmp_path):
    rows = [{"doc": "a", "body": C4_TEXTS[0], "link": "https://a.example"},
            {"doc": "b", "body": C4_TEXTS[1], "text": "not this field"},
            {"doc": "c", "text": C4_TEXTS[2]}]
    path = write_lines(tmp_path / "custom.ndjson", [json.dumps(r).encode() for r in rows])
    config = ReaderConfig(text_field="body", id_field="doc", url_field="link")
    docs = read([path], config)
    kept, rejected = split(docs)
    assert [(d.id, d.text) for d in kept] == [("a", C4_TEXTS[0]), ("b", C4_TEXTS[1])]
    assert kept[0].metadata["url"] == "https://a.example" and "url" not in kept[1].metadata
    assert reasons(docs) == ["missing_text_field: 'body'"]


def test_real_dolma_jsonl_with_its_own_ids():
    path = CORPUS / "dolma" / "cc_en_head-0091.jsonl"
    records = [json.loads(line) for line in path.read_text("utf-8").splitlines()]
    docs = read([path])
    kept, rejected = split(docs)
    assert not rejected and [d.id for d in kept] == [r["id"] for r in records]
    assert [d.text for d in kept] == [r["text"] for r in records]


# --------------------------------------------------------------------------- gzip
def test_truncated_gzip_reads_the_readable_records_and_rejects_the_partial_one(tmp_path):
    whole = gzip.compress(("\n".join(C4_LINES) + "\n").encode("utf-8"))
    path = tmp_path / "c4.jsonl.gz"
    path.write_bytes(whole[: len(whole) // 2])  # cut in the middle
    docs = read([path])
    kept, rejected = split(docs)
    assert 50 < len(kept) < 300
    assert [d.text for d in kept] == C4_TEXTS[: len(kept)]  # the readable records, in order
    assert len(rejected) == 1 and rejected[0] is docs[-1]
    reason = rejected[0].metadata[REJECT]["reason"]
    assert reason.startswith("truncated_gzip: EOFError")
    partial = rejected[0].metadata[ORIGINAL]
    assert partial and C4_LINES[len(kept)].startswith(partial)  # the partial record's bytes
    # Nothing lost: the kept records and the partial bytes are the whole decompressible prefix.
    prefix = gzip.decompress(whole)[: sum(len(line.encode()) + 1 for line in C4_LINES[: len(kept)]) + len(partial.encode())]
    assert "\n".join(C4_LINES[: len(kept)]) + "\n" + partial == prefix.decode("utf-8")


def test_whole_gzip_files_read_like_plain_ones(tmp_path):
    (tmp_path / "a.jsonl.gz").write_bytes(gzip.compress(("\n".join(C4_LINES[:20]) + "\n").encode()))
    (tmp_path / "b.txt.gz").write_bytes(gzip.compress(("\n".join(ZHWIKI[:20]) + "\n").encode()))
    docs = read([tmp_path])
    kept, rejected = split(docs)
    assert [d.text for d in docs[:20]] == C4_TEXTS[:20]
    assert [d.text for d in docs[20:]] == ZHWIKI[:20]
    assert len(docs) == 40 and not rejected


def test_truncated_multi_member_gzip_loses_nothing(tmp_path):
    first = gzip.compress(("\n".join(C4_LINES[:100]) + "\n").encode())
    second = gzip.compress(("\n".join(C4_LINES[100:]) + "\n").encode())
    path = tmp_path / "concatenated.jsonl.gz"
    path.write_bytes(first + second[: len(second) // 2])
    docs = read([path])
    kept, rejected = split(docs)
    assert len(kept) > 100
    assert [d.text for d in kept] == C4_TEXTS[: len(kept)]
    assert rejected[0].metadata[ORIGINAL] and C4_LINES[len(kept)].startswith(rejected[0].metadata[ORIGINAL])


def _whole_file_gunzip(raw: bytes) -> tuple[bytes, bytes, str | None]:
    """The reader's gzip decoding before it streamed (the whole file at once): the oracle that the
    streaming decoder must match, record for record. (whole lines, partial tail, problem)"""
    try:
        return gzip.decompress(raw), b"", None
    except (EOFError, zlib.error, OSError, gzip.BadGzipFile) as err:
        parts, rest = [], raw
        while rest:
            decompressor = zlib.decompressobj(16 + zlib.MAX_WBITS)
            try:
                parts.append(decompressor.decompress(rest))
            except zlib.error:
                break
            rest = decompressor.unused_data if decompressor.eof else b""
        data = b"".join(parts)
        cut = data.rfind(b"\n") + 1
        return data[:cut], data[cut:], f"truncated_gzip: {type(err).__name__}: {err}"


def _gzip_member(data: bytes, name: bytes = b"", extra: bytes = b"", comment: bytes = b"", header_crc: bool = False) -> bytes:
    """One gzip member with the optional header fields that gzip.compress never writes."""
    flags = (4 if extra else 0) | (8 if name else 0) | (16 if comment else 0) | (2 if header_crc else 0)
    header = b"\x1f\x8b\x08" + bytes([flags]) + b"\0\0\0\0\0\xff"
    header += (struct.pack("<H", len(extra)) + extra if extra else b"") + (name + b"\0" if name else b"")
    header += comment + b"\0" if comment else b""
    header += struct.pack("<H", zlib.crc32(header) & 0xFFFF) if header_crc else b""
    deflate = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
    return header + deflate.compress(data) + deflate.flush() + struct.pack("<II", zlib.crc32(data), len(data))


def test_streamed_gzip_reads_exactly_what_whole_file_decompression_read(tmp_path):
    """Cut anywhere (in a header, the deflate data, a trailer, between members), padded with NULs,
    followed by garbage, with file names, comments and extra fields in the headers: every line and
    the rejected tail and its reason are what decompressing the whole file gave."""
    text = ("\n".join(ZHWIKI[:400]) + "\n").encode("utf-8")
    whole = gzip.compress(text)
    first, second = gzip.compress(text[:60_000]), gzip.compress(text[60_000:])
    fancy = (_gzip_member(text[:50_000], name=b"n" * 1_500_000, extra=b"e" * 60_000, comment=b"c", header_crc=True)
             + _gzip_member(text[50_000:], name=b"part-2.txt"))
    rng = random.Random(13)
    cases = {"whole": whole, "members": first + second, "padded": first + b"\0" * 5000 + second + b"\0" * 3,
             "garbage": whole + b"garbage", "nul+garbage": whole + b"\0\0xy", "leading nul": b"\0" + whole,
             "not gzip": text[:500], "one byte": whole[:1], "empty": b"", "empty member": gzip.compress(b""),
             "fancy": fancy, "bad method": first + b"\x1f\x8b\x07" + second[3:]}
    for cut in [2, 9, 10, 11, len(whole) - 8, len(whole) - 1, *rng.sample(range(12, len(whole) - 8), 12)]:
        cases[f"cut {cut}"] = whole[:cut]
    for cut in [len(first) + 1, len(first) + 5, len(first) + 10, len(first) + 300, len(first) + len(second) - 4]:
        cases[f"members cut {cut}"] = (first + second)[:cut]
    for cut in [5, 30_000, 1_000_000, len(fancy) // 2, len(fancy) - 3]:
        cases[f"fancy cut {cut}"] = fancy[:cut]
    for name, raw in cases.items():
        path = tmp_path / f"{len(list(tmp_path.iterdir()))}.txt.gz"
        path.write_bytes(raw)
        data, tail, problem = _whole_file_gunzip(raw)
        expected = [(line, None) for line in data.decode("utf-8").split("\n")]
        if expected[-1][0] == "":
            expected.pop()
        if problem and tail:  # a partial last line is a rejected record; the problem is the file's damage
            expected.append((tail.decode("utf-8", errors="backslashreplace"), problem))
        docs, damaged = read_reporting([path])
        got = [(d.metadata[ORIGINAL], d.metadata[REJECT]["reason"] if d.metadata[REJECT]["step"] == "read"
                and d.metadata[REJECT]["reason"].startswith("truncated_gzip") else None)
               if REJECT in d.metadata else (d.text, None) for d in docs]
        assert got == expected, name
        assert [problem.split(" (after")[0] for problem in damaged.get(path.name, [])] == (
            [problem.replace("truncated_gzip: ", "gzip: ")] if problem else []), name
        assert [d.id.rsplit(":", 1)[1] for d in docs] == [str(i) for i in range(len(docs))], name


@pytest.mark.parametrize("byte, problem", [(-8, "CRC check failed"), (-1, "Incorrect length of data produced")])
def test_a_gzip_whose_trailer_is_damaged_keeps_every_record_and_names_the_file(tmp_path, byte, problem):
    """Only the CRC or length trailer damaged: every record decompressed is read (decompressing the
    whole file lost them all), no record is rejected, and the file is listed as damaged with the reason."""
    whole = bytearray(gzip.compress(("\n".join(C4_LINES[:30]) + "\n").encode("utf-8")))
    whole[byte] ^= 1
    path = tmp_path / "trailer.jsonl.gz"
    path.write_bytes(bytes(whole))
    docs, damaged = read_reporting([path])
    kept, rejected = split(docs)
    assert [d.text for d in kept] == C4_TEXTS[:30] and not rejected
    assert damaged == {path.name: [f"gzip: BadGzipFile: {problem} (after 30 lines, which are read)"]}


# --------------------------------------------------------------------------- WARC
def _first_html_response() -> tuple[str, bytes]:
    from warcio.archiveiterator import ArchiveIterator

    with open(WARC, "rb") as handle:
        for record in ArchiveIterator(handle):
            if record.rec_type == "response":
                return record.rec_headers.get_header("WARC-Target-URI"), record.content_stream().read()
    raise AssertionError("no response record in the sample WARC")


def test_warc_payloads_that_are_not_html_are_rejected(tmp_path):
    from warcio.statusandheaders import StatusAndHeaders
    from warcio.warcwriter import WARCWriter

    import matplotlib

    url, html = _first_html_response()  # a real page (semanticscholar.org research team)
    png = (Path(matplotlib.get_data_path()) / "images" / "hand.png").read_bytes()  # a real PNG
    buffer = io.BytesIO()
    writer = WARCWriter(buffer, gzip=True)
    writer.write_record(writer.create_warc_record(url, "request", payload=io.BytesIO(b"GET / HTTP/1.1\r\n\r\n")))
    for target, content_type, payload in [(url, "text/html; charset=utf-8", html),
                                          ("https://example.org/hand.png", "image/png", png)]:
        headers = StatusAndHeaders("200 OK", [("Content-Type", content_type)], protocol="HTTP/1.1")
        writer.write_record(writer.create_warc_record(target, "response", payload=io.BytesIO(payload),
                                                      http_headers=headers))
    path = tmp_path / "tiny.warc.gz"
    path.write_bytes(buffer.getvalue())

    docs = read([path])
    kept, rejected = split(docs)
    assert len(docs) == 2  # two responses; the request record is not a document
    page, image = docs
    assert page is kept[0] and page.metadata["url"] == url
    assert "Semantic Scholar" in page.text and "<" not in page.text[:200]
    assert page.id.startswith("<urn:uuid:")
    assert image.metadata[REJECT] == {"step": "read", "reason": "not_html: image/png"}
    original = json.loads(image.metadata[ORIGINAL])
    assert original["url"] == "https://example.org/hand.png" and original["content_type"] == "image/png"
    assert original["payload"].startswith("\\x89PNG")


def test_real_warc_extraction_gives_documents_with_text():
    from warcio.archiveiterator import ArchiveIterator

    with open(WARC, "rb") as handle:
        responses = [r.rec_headers.get_header("WARC-Record-ID") for r in ArchiveIterator(handle)
                     if r.rec_type == "response"]
    docs = read([WARC])
    kept, rejected = split(docs)
    assert len(responses) == 22 and [d.id for d in docs] == responses
    assert not rejected
    # Measured with trafilatura 2.3.1 (favor_precision): 601 to 13,140 characters per page.
    assert all(len(d.text) > 300 and d.metadata["url"].startswith("https://") for d in kept)
    assert all("<html" not in d.text.lower() and "</div>" not in d.text for d in kept)


def test_a_truncated_warc_keeps_its_whole_records_and_rejects_the_cut_one(tmp_path):
    from warcio.archiveiterator import ArchiveIterator

    raw = WARC.read_bytes()
    cut = raw[: len(raw) // 2]
    complete = []  # response records whose bytes are all inside the cut
    iterator = ArchiveIterator(io.BytesIO(raw))
    for record in iterator:
        if record.rec_type == "response":
            record.content_stream().read()
            iterator.read_to_end(record)
            if iterator.get_record_offset() + iterator.get_record_length() <= len(cut):
                complete.append(record.rec_headers.get_header("WARC-Record-ID"))
    path = tmp_path / "cut.warc.gz"
    path.write_bytes(cut)
    docs = read([path])
    kept, rejected = split(docs)
    assert [d.id for d in kept] == complete  # measured: 13 whole responses before the cut
    assert len(rejected) == 1 and rejected[0] is docs[-1]
    assert rejected[0].metadata[REJECT]["reason"].startswith("truncated_or_corrupt_warc")



def test_a_warc_cut_inside_a_record_header_is_a_rejected_record_not_a_crash(tmp_path):
    """Cut where warcio reads a header block without its target URI: the records before are read and
    the cut one is rejected (warcio's AttributeError used to escape the reader)."""
    raw = WARC.read_bytes()
    for cut in range(500, len(raw), 20_000):
        path = tmp_path / f"cut{cut}.warc.gz"
        path.write_bytes(raw[:cut])
        read([path])  # no exception, wherever the cut falls
    for cut, whole_records in [(30707, 3), (153899, 21)]:  # cuts that fall in a response's header block
        path = tmp_path / f"cut{cut}.warc.gz"
        path.write_bytes(raw[:cut])
        docs = read([path])
        assert len(docs) == whole_records + 1 and not reasons(docs[:-1])
        assert reasons(docs[-1:]) == ["truncated_or_corrupt_warc: unreadable record headers (AttributeError: "
                                      "'NoneType' object has no attribute 'startswith')"]

def _flipped_warc(path: Path, positions: list[int]) -> Path:
    raw = bytearray(WARC.read_bytes())
    for position in positions:
        raw[position] ^= 0xFF
    path.write_bytes(bytes(raw))
    return path


def _warc_members() -> list[tuple[str, int, int, str]]:
    """(type, offset, length, record id) of each record (= gzip member) of the sample WARC."""
    from warcio.archiveiterator import ArchiveIterator

    members = []
    iterator = ArchiveIterator(io.BytesIO(WARC.read_bytes()))
    for record in iterator:
        record.content_stream().read()
        iterator.read_to_end(record)
        members.append((record.rec_type, iterator.get_record_offset(), iterator.get_record_length(),
                        record.rec_headers.get_header("WARC-Record-ID")))
    return members


def test_a_warc_with_flipped_bytes_reads_on_at_the_next_record(tmp_path):
    """Eight flipped bytes (9 of 22 responses used to vanish unrecorded): every record whose member is
    intact is read exactly as from the intact file; every other response is a reject with its reason
    or inside a damaged member or skipped range that the file's damage names; nothing damaged is kept."""
    flips = [10612, 67873, 100989, 106151, 110250, 127383, 134027, 198693]
    path = _flipped_warc(tmp_path / "flipped.warc.gz", flips)
    intact = {d.id: d.text for d in read([WARC])}
    docs, damaged = read_reporting([path])
    kept, rejected = split(docs)
    responses = [(offset, length, rid) for kind, offset, length, rid in _warc_members() if kind == "response"]
    untouched = [rid for offset, length, rid in responses if not any(offset <= f < offset + length for f in flips)]
    assert set(untouched) <= {d.id for d in kept} and len(untouched) == 15
    assert all(intact[d.id] == d.text for d in kept)  # nothing read from a damaged member is kept
    assert all(r.metadata[REJECT]["reason"].startswith("truncated_or_corrupt_warc: ") for r in rejected)
    problems = damaged[path.name]
    named = {int(p.split(" ")[4].rstrip(":")) for p in problems if p.startswith("gzip member at byte ")}
    seen = {d.id for d in docs}
    lost = [(offset, rid) for offset, _, rid in responses if rid not in seen]
    assert lost and all(offset in named for offset, _ in lost)  # each response not read is named by its member
    assert problems[0] == ("gzip member at byte 865: BadGzipFile: CRC check failed; read on at the next record, "
                           "byte 15477")
    assert len(kept) == 15 and len(rejected) == 5 and len(lost) == 2  # measured: 15 + 5 + 2 = 22 responses


def test_an_uncompressed_warc_that_cannot_be_parsed_keeps_what_came_before_and_says_the_rest_was_not_read(tmp_path):
    raw = gzip.decompress(WARC.read_bytes())  # every member: the plain WARC
    fifth = [m.start() for m in re.finditer(rb"WARC/1\.\d\r\nWARC-Type: response", raw)][4]
    path = tmp_path / "plain.warc"
    path.write_bytes(raw[:fifth] + b"XARC" + raw[fifth + 4:])
    docs, damaged = read_reporting([path])
    kept, rejected = split(docs)
    assert [d.id for d in kept] == [d.id for d in read([WARC])][:4]
    assert reasons(docs) == ["truncated_or_corrupt_warc: Invalid WARC record, first line: XARC/1.0\r\n"]
    assert damaged == {path.name: ["the WARC records after the unreadable one were not read (an uncompressed WARC "
                                   "cannot be resynchronised; gzip it record by record, e.g. warcio recompress)"]}


# --------------------------------------------------------------------------- parquet and text
def test_parquet_with_a_configurable_text_field(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pa.table({"content": [C4_TEXTS[0], None, ZHWIKI[12], "  "],
                      "doc_id": ["p0", "p1", "p2", "p3"],
                      "page": ["https://a.example", None, None, None]})
    path = tmp_path / "rows.parquet"
    pq.write_table(table, path)
    docs = read([path], ReaderConfig(text_field="content", id_field="doc_id", url_field="page"))
    kept, rejected = split(docs)
    assert len(docs) == 4
    assert [(d.id, d.text) for d in kept] == [("p0", C4_TEXTS[0]), ("p2", ZHWIKI[12])]
    assert kept[0].metadata["url"] == "https://a.example"
    assert reasons(docs) == ["missing_text_field: 'content'", "empty"]
    assert json.loads(rejected[0].metadata[ORIGINAL]) == {"content": None, "doc_id": "p1", "page": None}
    with pytest.raises(InputError, match="no column 'text'"):
        read([path])  # the default field is not there: a stage-level error, found when planning
    broken = tmp_path / "broken.parquet"
    broken.write_bytes(path.read_bytes()[:-20])  # a damaged footer
    with pytest.raises(InputError, match="not a readable Parquet file"):
        discover_inputs(STORAGE, [str(broken)], "content")


def test_plain_text_is_one_document_per_line():
    docs = read([CORPUS / "zhwiki" / "zhwiki_part1.txt"])
    kept, rejected = split(docs)
    assert len(docs) == 1500 and not rejected
    assert [d.text for d in docs] == ZHWIKI
    shard = discover_inputs(STORAGE, [str(CORPUS / "zhwiki" / "zhwiki_part1.txt")])[0][0]
    assert [d.id for d in docs[:2]] == [f"{shard.shard_id}:0", f"{shard.shard_id}:1"]


# --------------------------------------------------------------------------- streaming
def _peak_python_bytes(action) -> int:
    tracemalloc.start()
    try:
        action()
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def test_a_file_is_read_as_a_stream_not_whole(tmp_path):
    """24 MB of real records: the reader holds a buffer and a record at a time, not the file."""
    lines = [line.encode("utf-8") for line in C4_LINES]
    plain = write_lines(tmp_path / "big.jsonl", lines * 32)
    packed = tmp_path / "big.jsonl.gz"
    packed.write_bytes(gzip.compress(plain.read_bytes(), compresslevel=1))
    for path in (plain, packed):
        shards, _ = discover_inputs(STORAGE, [str(path)])
        reader = ShardReader(shards, ReaderConfig(), STORAGE)
        counted = []
        peak = _peak_python_bytes(lambda: counted.append(sum(1 for _ in reader.run(rank=0))))
        assert counted == [len(lines) * 32]
        assert plain.stat().st_size > 20_000_000 and peak < 8_000_000, (path.name, peak)


def test_a_line_over_the_read_limit_is_rejected_without_being_read_whole(tmp_path, monkeypatch):
    """A line longer than the read limit (8x max_doc_bytes, at least MIN_READ_LIMIT) is never held:
    it is rejected as too large with its first bytes as the original, and the next lines read on."""
    monkeypatch.setattr(readers, "MIN_READ_LIMIT", 1 << 18)
    monkeypatch.setattr(readers, "CHUNK_BYTES", 1 << 16)
    config = ReaderConfig(max_doc_bytes=10_000)  # read limit: 256 KiB
    huge = json.dumps({"text": "\n".join(C4_TEXTS * 15)}).encode("utf-8")  # 11 MB in one line
    lines = [c4_record(0), huge, c4_record(1), huge[:-1]]  # the last one also has no newline
    plain = tmp_path / "huge.jsonl"
    plain.write_bytes(b"\n".join(lines))
    packed = tmp_path / "huge.jsonl.gz"
    packed.write_bytes(gzip.compress(plain.read_bytes()))
    text = tmp_path / "huge.txt"
    text.write_bytes(b"\n".join([ZHWIKI[0].encode(), huge, ZHWIKI[1].encode()]) + b"\n")
    for path in (plain, packed, text):
        shards, _ = discover_inputs(STORAGE, [str(path)])
        reader, docs = ShardReader(shards, config, STORAGE), []
        peak = _peak_python_bytes(lambda: docs.extend(reader.run(rank=0)))
        assert peak < 2_000_000, (path.name, peak)  # the line is 11 MB
        kept, rejected = split(docs)
        oversized = [d for d in rejected if d.metadata[REJECT]["reason"].startswith("too_large")]
        assert len(docs) == (4 if path != text else 3) and len(oversized) == len(docs) - 2
        assert kept[1].id.endswith(":2") and oversized[0].id.endswith(":1")
        assert oversized[0].metadata[REJECT]["reason"] == f"too_large: {len(huge)} bytes > read limit {1 << 18}, not read"
        assert oversized[0].metadata[ORIGINAL] == huge[: readers.OVERSIZED_ORIGINAL_BYTES].decode("utf-8")
        if path != text:
            assert oversized[1].metadata[REJECT]["reason"].startswith(f"too_large: {len(huge) - 1} bytes")
    # The partial last record of a truncated gzip is cut the same way, and still carries the gzip's problem.
    cut = tmp_path / "cut.jsonl.gz"
    cut.write_bytes(gzip.compress(b"\n".join([c4_record(0), huge]))[:-100])
    docs = read([cut], config)
    assert [d.text for d in docs[:1]] == [C4_TEXTS[0]] and len(docs) == 2
    assert reasons(docs) == ["truncated_gzip: EOFError: Compressed file ended before the end-of-stream marker was reached"]
    assert docs[1].metadata[ORIGINAL] == huge[: readers.OVERSIZED_ORIGINAL_BYTES].decode("utf-8")


def test_a_warc_payload_over_the_read_limit_is_not_extracted(monkeypatch):
    monkeypatch.setattr(readers, "MIN_READ_LIMIT", 0)
    config = ReaderConfig(max_doc_bytes=5_000)  # read limit: 40,000 bytes of payload
    from warcio.archiveiterator import ArchiveIterator

    with open(WARC, "rb") as handle:
        payloads = {r.rec_headers.get_header("WARC-Record-ID"): r.content_stream().read()
                    for r in ArchiveIterator(handle) if r.rec_type == "response"}
    docs = read([WARC], config)
    assert [d.id for d in docs] == list(payloads)
    big = {i for i, p in payloads.items() if len(p) > 40_000}
    assert 0 < len(big) < len(payloads)
    for doc in docs:
        reason = doc.metadata.get(REJECT, {}).get("reason", "")
        original = json.loads(doc.metadata[ORIGINAL])["payload"]
        if doc.id in big:
            size = len(payloads[doc.id])
            assert reason == f"too_large: {size} bytes > read limit 40000, not read" and doc.text == ""
            assert original == payloads[doc.id][: readers.OVERSIZED_ORIGINAL_BYTES].decode("utf-8", "backslashreplace")
        else:
            assert "read limit" not in reason
            assert original == payloads[doc.id].decode("utf-8", "backslashreplace")


def test_parquet_is_read_in_batches_in_row_order(tmp_path, monkeypatch):
    import pyarrow as pa
    import pyarrow.parquet as pq

    monkeypatch.setattr(readers, "PARQUET_BATCH_ROWS", 50)
    texts = C4_TEXTS + ZHWIKI[:200]
    table = pa.table({"text": texts, "id": [f"r{i}" if i % 7 else None for i in range(len(texts))],
                      "n": list(range(len(texts)))})
    path = tmp_path / "groups.parquet"
    pq.write_table(table, path, row_group_size=77)  # batches never span row groups: 77 = 50 + 27
    docs = read([path])
    assert [d.text for d in docs] == texts
    assert [json.loads(d.metadata[ORIGINAL]) for d in docs] == table.to_pylist()
    assert [d.id for d in docs[:8]] == [docs[0].id, "r1", "r2", "r3", "r4", "r5", "r6", docs[7].id]
    assert docs[0].id.endswith(":0") and docs[7].id.endswith(":7")


def test_an_input_changed_after_planning_fails_the_shard(tmp_path):
    """The checksum taken when the stage was planned is checked against the bytes read (hashed as
    they stream; Parquet, read out of order, is hashed before its records are read)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    paths = [write_lines(tmp_path / "a.jsonl", [c4_record(0), c4_record(1)]),
             tmp_path / "b.txt.gz", tmp_path / "c.parquet", tmp_path / "d.warc.gz"]
    paths[1].write_bytes(gzip.compress("\n".join(ZHWIKI[:5]).encode()))
    pq.write_table(pa.table({"text": C4_TEXTS[:3]}), paths[2])
    shutil.copy(WARC, paths[3])
    for path in paths:
        shards, _ = discover_inputs(STORAGE, [str(path)])
        reader = ShardReader(shards, ReaderConfig(), STORAGE)
        assert list(reader.run(rank=0))  # unchanged: reads
        raw = bytearray(path.read_bytes())
        raw[-1] ^= 1  # one bit, in the last byte (the stream readers hash to the end of the file)
        path.write_bytes(bytes(raw))
        with pytest.raises(InputError, match="changed after the stage was planned"):
            list(reader.run(rank=0))


# --------------------------------------------------------------------------- split files
def _read_all(shards, config: ReaderConfig = ReaderConfig()) -> list[tuple]:
    reader = ShardReader(shards, config, STORAGE)
    return [(d.id, d.text, d.metadata.get(ORIGINAL), d.metadata.get(REJECT, {}).get("reason"))
            for rank in range(len(shards)) for d in reader.run(rank=rank, world_size=len(shards))]


@pytest.mark.parametrize("name", ["big.jsonl", "big.txt"])
def test_a_big_file_read_in_pieces_gives_what_reading_it_whole_gives(tmp_path, name):
    """Pieces hold whole lines, cover the file in order, and keep line-number ids and the rejects."""
    good = [c4_record(i) if name.endswith(".jsonl") else ZHWIKI[i].encode() for i in range(120)]
    lines = good[:40] + [b"", b'{"text": "cut', b"\xff\xfe not utf-8"] + good[40:] + [good[0][:-1]]
    path = tmp_path / name
    path.write_bytes(b"\n".join(lines))  # the last line has no newline
    whole, _ = discover_inputs(STORAGE, [str(path)])
    size = path.stat().st_size
    for split_bytes in (1 << 10, 7_777, size // 2, size - 1):
        pieces, _ = discover_inputs(STORAGE, [str(path)], split_bytes=split_bytes)
        assert 1 < len(pieces) <= -(-size // split_bytes)  # fewer where a piece runs on to a line end
        assert {s.checksum for s in pieces} == {whole[0].checksum}
        assert [s.piece.start for s in pieces] == [0] + [s.piece.end for s in pieces[:-1]]
        assert pieces[-1].piece.end == size
        assert all(path.read_bytes()[s.piece.end - 1] == ord("\n") for s in pieces[:-1])
        assert len({s.shard_id for s in pieces}) == len(pieces)
        assert _read_all(pieces) == _read_all(whole)
    # rejected: the cut record, the bytes that are not UTF-8 and (JSONL) the cut last line or (text) the empty one
    assert sum(1 for row in _read_all(whole) if row[3]) == (3 if name.endswith(".jsonl") else 2)


def test_gzip_parquet_and_small_files_are_not_split(tmp_path):
    plain = write_lines(tmp_path / "a.jsonl", [c4_record(i) for i in range(50)])
    packed = tmp_path / "b.jsonl.gz"
    packed.write_bytes(gzip.compress(plain.read_bytes()))
    small = write_lines(tmp_path / "c.jsonl", [c4_record(0)])
    shards, _ = discover_inputs(STORAGE, [str(tmp_path)], split_bytes=1 << 10)
    assert [(s.uri.rsplit("/", 1)[-1], s.piece is None) for s in shards].count(("a.jsonl", False)) > 1
    assert [s.uri.rsplit("/", 1)[-1] for s in shards if s.piece is None] == ["b.jsonl.gz", "c.jsonl"]
    assert {s.checksum for s in shards if s.uri == str(small)} == {STORAGE.checksum(str(small))}


def test_a_piece_changed_after_planning_stops_its_read(tmp_path):
    path = write_lines(tmp_path / "a.jsonl", [c4_record(i) for i in range(50)])
    shards, _ = discover_inputs(STORAGE, [str(path)], split_bytes=20_000)
    raw = bytearray(path.read_bytes())
    raw[shards[1].piece.start + 20] ^= 1  # inside the second piece's first record
    path.write_bytes(bytes(raw))
    reader = ShardReader(shards, ReaderConfig(), STORAGE)
    assert len(list(reader.run(rank=0))) > 0  # the first piece's bytes are unchanged
    with pytest.raises(InputError, match="changed after the stage was planned"):
        list(reader.run(rank=1))


# --------------------------------------------------------------------------- discovery
def test_a_missing_input_path_fails_early_with_the_path(tmp_path):
    missing = tmp_path / "nowhere" / "data.jsonl"
    with pytest.raises(InputError, match="does not exist") as err:
        discover_inputs(STORAGE, [str(missing)])
    assert str(missing) in str(err.value)
    with pytest.raises(InputError, match="does not exist"):
        discover_inputs(STORAGE, [str(tmp_path / "*.jsonl")])  # a glob that matches nothing
    with pytest.raises(InputError, match="no inputs"):
        discover_inputs(STORAGE, [])


def test_an_unsupported_format_fails_early(tmp_path):
    csv = tmp_path / "table.csv"
    csv.write_text("text\nhello\n")
    with pytest.raises(InputError, match="unsupported input format") as err:
        discover_inputs(STORAGE, [str(csv)])
    assert str(csv) in str(err.value)
    folder = tmp_path / "only_csv"
    folder.mkdir()
    (folder / "table.csv").write_text("text\nhello\n")
    with pytest.raises(InputError, match="no readable input files"):
        discover_inputs(STORAGE, [str(folder)])
    assert detect_format("x.JSONL.GZ") == "jsonl" and detect_format("x.warc.gz") == "warc"
    assert detect_format("x.tar.gz") is None


C4_JSONL = ("\n".join(C4_LINES[:30]) + "\n")
ZH_TEXT = "\n".join(ZHWIKI[:30]) + "\n"


@pytest.mark.parametrize("name, data, reason", [
    ("utf16.jsonl", C4_JSONL.encode("utf-16"), "UTF-16LE (byte order mark FF FE)"),
    ("utf16be.jsonl", codecs.BOM_UTF16_BE + C4_JSONL.encode("utf-16-be"), "UTF-16BE (byte order mark FE FF)"),
    ("utf32.txt", ZH_TEXT.encode("utf-32"), "UTF-32LE (byte order mark FF FE 00 00)"),
    ("utf16.jsonl.gz", gzip.compress(C4_JSONL.encode("utf-16")), "UTF-16LE (byte order mark FF FE)"),
    ("utf16-no-mark.jsonl", C4_JSONL.encode("utf-16-le"),
     "32710 of its first 65536 bytes are NUL (looks like UTF-16LE without a byte order mark)"),
    ("gb18030.txt", ZH_TEXT.encode("gb18030"),
     "26 of its first 30 lines are not UTF-8 (another encoding, e.g. GB18030 or Latin-1?)"),
])
def test_a_file_that_is_not_utf8_is_listed_not_read_line_by_line(tmp_path, name, data, reason):
    """A UTF-16 file used to give a reject per line and no word about the file: it is listed instead, with
    what it looks like; a UTF-8 file beside it is read, and so is one with a few bad lines (rejects)."""
    (tmp_path / name).write_bytes(data)
    (tmp_path / "good.jsonl").write_text(C4_JSONL, encoding="utf-8")
    latin1 = C4_JSONL.replace("\u2019", "'").encode("latin-1", errors="replace")  # bad bytes in a few lines only
    (tmp_path / "few-bad-lines.jsonl").write_bytes(latin1.replace(b"air", b"\xe6ir", 2))
    shards, skipped = discover_inputs(STORAGE, [str(tmp_path)])
    assert sorted(Path(s.uri).name for s in shards) == ["few-bad-lines.jsonl", "good.jsonl"]
    assert skipped == [{"uri": str(tmp_path / name),
                        "reason": f"not_utf8: {reason}; convert it to UTF-8 (e.g. iconv -f <encoding> -t UTF-8)"}]


def test_recognised_but_unsupported_formats_are_listed_with_what_to_do(tmp_path):
    records = C4_JSONL.encode()
    (tmp_path / "c4.jsonl").write_bytes(records)
    (tmp_path / "c4.json").write_text(json.dumps([json.loads(line) for line in C4_LINES[:5]]))
    (tmp_path / "c4.json.gz").write_bytes(gzip.compress((tmp_path / "c4.json").read_bytes()))
    (tmp_path / "c4.jsonl.bz2").write_bytes(bz2.compress(records))
    (tmp_path / "c4.jsonl.xz").write_bytes(lzma.compress(records))
    (tmp_path / "c4.csv").write_text("text\n" + "\n".join(json.dumps(t) for t in C4_TEXTS[:5]))
    (tmp_path / "c4.docx").write_bytes(b"PK\x03\x04")
    shards, skipped = discover_inputs(STORAGE, [str(tmp_path)])
    assert [Path(s.uri).name for s in shards] == ["c4.jsonl"]
    json_doc = "unsupported_format: one JSON document per file, not JSON lines: convert it to .jsonl"
    assert {Path(s["uri"]).name: s["reason"] for s in skipped} == {
        "c4.json": f"{json_doc} (e.g. jq -c '.[]')",
        "c4.json.gz": f"{json_doc}.gz (e.g. jq -c '.[]')",
        "c4.jsonl.bz2": "unsupported_format: bzip2-compressed: only gzip is read; recompress it with gzip (.jsonl.gz)",
        "c4.jsonl.xz": "unsupported_format: xz-compressed: only gzip is read; recompress it with gzip (.jsonl.gz)",
        "c4.csv": "unsupported_format: a table: export its text column as .jsonl or .parquet",
        "c4.docx": "unknown_format: known formats are .jsonl, .jsonl.gz, .ndjson, .ndjson.gz, .parquet, .txt, "
                   ".txt.gz, .warc, .warc.gz",
    }
    with pytest.raises(InputError, match=r"c4\.jsonl\.bz2 \(bzip2-compressed: only gzip is read"):
        discover_inputs(STORAGE, [str(tmp_path / "c4.jsonl.bz2")])


def test_hidden_files_and_folders_are_listed_or_read_as_configured(tmp_path):
    """Names below the input starting with '.' or '_' were dropped without a word (10 of 30 documents
    read): they are listed as hidden, or read with clean.reader.hidden: read; a file named outright is read."""
    for i, name in enumerate(["a.jsonl", "_staging/b.jsonl", ".cache/c.jsonl", "_d.jsonl", "zh/.e.txt"]):
        (tmp_path / name).parent.mkdir(exist_ok=True)
        (tmp_path / name).write_text("\n".join(C4_LINES[10 * i:10 * i + 10]) + "\n")
    (tmp_path / "_SUCCESS").write_text("")
    hidden = [".cache/c.jsonl", "_SUCCESS", "_d.jsonl", "_staging/b.jsonl", "zh/.e.txt"]

    def discover(*patterns: str, read_hidden: bool = False) -> tuple[list[str], list[tuple[str, str]]]:
        shards, skipped = discover_inputs(STORAGE, list(patterns), read_hidden=read_hidden)
        return ([Path(s.uri).relative_to(tmp_path).as_posix() for s in shards],
                sorted((Path(s["uri"]).relative_to(tmp_path).as_posix(), s["reason"].split(":")[0]) for s in skipped))

    assert discover(str(tmp_path)) == (["a.jsonl"], [(name, "hidden") for name in hidden])
    assert discover(str(tmp_path / "*.jsonl")) == (["a.jsonl"], [("_d.jsonl", "hidden")])
    assert discover(str(tmp_path), read_hidden=True) == (
        [".cache/c.jsonl", "_d.jsonl", "_staging/b.jsonl", "a.jsonl", "zh/.e.txt"], [("_SUCCESS", "unknown_format")])
    assert discover(str(tmp_path / "_staging" / "b.jsonl")) == (["_staging/b.jsonl"], [])
    docs = read_reporting([tmp_path])[0]
    assert [d.text for d in docs] == C4_TEXTS[:10]


def _corpus_copy(root: Path) -> Path:
    """A corpus folder laid out like examples/corpus: data next to licenses, READMEs and sources."""
    (root / "c4").mkdir(parents=True)
    (root / "zhwiki").mkdir()
    shutil.copy(CORPUS / "c4" / "c4_demo.jsonl", root / "c4" / "c4_demo.jsonl")
    shutil.copy(CORPUS / "c4" / "LICENSE.Apache-2.0.txt", root / "c4" / "LICENSE.Apache-2.0.txt")
    shutil.copy(CORPUS / "c4" / "SOURCE.md", root / "c4" / "SOURCE.md")
    (root / "zhwiki" / "part1.txt").write_text("\n".join(ZHWIKI[:30]) + "\n", encoding="utf-8")
    shutil.copy(CORPUS / "zhwiki" / "LICENSE.CC-BY-SA-4.0.txt", root / "zhwiki" / "LICENSE.CC-BY-SA-4.0.txt")
    shutil.copy(CORPUS / "zhwiki" / "SOURCE.md", root / "zhwiki" / "SOURCE.md")
    shutil.copy(CORPUS / "README.md", root / "README.md")
    (root / "README.txt").write_text("notes\n")
    (root / "zhwiki" / ".part1.txt.swp").write_text("editor swap file\n")
    (root / "_SUCCESS").write_text("")
    return root


def test_folder_and_glob_discovery_skip_license_readme_and_source_files(tmp_path):
    root = _corpus_copy(tmp_path / "corpus")
    shards, skipped = discover_inputs(STORAGE, [str(root)])
    assert [(Path(s.uri).relative_to(root).as_posix(), s.format, s.source) for s in shards] == [
        ("c4/c4_demo.jsonl", "jsonl", "c4"), ("zhwiki/part1.txt", "text", "zhwiki")]
    # What was not read is reported, with the reason.
    not_data = "not_data: license/readme/attribution file"
    assert sorted((Path(s["uri"]).relative_to(root).as_posix(), s["reason"]) for s in skipped) == [
        ("README.md", not_data), ("README.txt", not_data), ("_SUCCESS", "hidden"),
        ("c4/LICENSE.Apache-2.0.txt", not_data), ("c4/SOURCE.md", not_data),
        ("zhwiki/.part1.txt.swp", "hidden"), ("zhwiki/LICENSE.CC-BY-SA-4.0.txt", not_data),
        ("zhwiki/SOURCE.md", not_data)]
    again, _ = discover_inputs(STORAGE, [str(root) + "/", str(root / "c4" / "c4_demo.jsonl")])
    assert [s.shard_id for s in again] == [s.shard_id for s in shards]  # stable ids, no duplicates
    assert all(s.checksum.startswith("xxh3:") for s in shards)

    glob, _ = discover_inputs(STORAGE, [str(root / "*" / "*.txt")])
    assert [Path(s.uri).name for s in glob] == ["part1.txt"]  # LICENSE.*.txt skipped

    docs = read([root], code_sources=frozenset({"zhwiki"}))
    kept, rejected = split(docs)
    assert len(docs) == 300 + 30 and not rejected
    assert {d.metadata["source"] for d in docs} == {"c4", "zhwiki"}
    assert all(d.metadata.get("lang") == "code" for d in docs if d.metadata["source"] == "zhwiki")
    assert not any("lang" in d.metadata for d in docs if d.metadata["source"] == "c4")


def test_the_bundled_corpus_reads_without_loss():
    shards, _ = discover_inputs(STORAGE, [str(CORPUS)])
    assert [Path(s.uri).relative_to(CORPUS).as_posix() for s in shards] == [
        "c4/c4_demo.jsonl", "cmrc2018/cmrc2018_contexts.jsonl", "dolma/cc_en_head-0091.jsonl",
        "dolma/sample-0000.warc.gz", "zhwiki/zhwiki_part1.txt"]
    assert [s.source for s in shards] == ["c4", "cmrc2018", "dolma", "dolma", "zhwiki"]
    docs = read([CORPUS])
    kept, rejected = split(docs)
    # Records in the files: 300 + 600 + 10 JSONL lines, 22 WARC responses, 1500 text lines.
    assert len(docs) == 300 + 600 + 10 + 22 + 1500
    assert not rejected


def test_relative_input_paths_give_the_same_sources(tmp_path, monkeypatch):
    root = _corpus_copy(tmp_path / "corpus")
    absolute = [s.source for s in discover_inputs(STORAGE, [str(root)])[0]]
    monkeypatch.chdir(tmp_path)
    relative = [s.source for s in discover_inputs(STORAGE, ["corpus"])[0]]
    assert relative == absolute
