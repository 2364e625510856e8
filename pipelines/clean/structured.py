"""Structured text (JSON, XML, HTML, YAML, delimited tables): detected, tagged, and capped at a share.

SkyPile neither drops structured documents nor lets them through unchecked: it keeps them in a
controlled proportion. Some are worth having (a model that has seen JSON, configs and markup reads
and writes them better, which code and tool use need), but left unlimited, machine-generated dumps
crowd out the prose the corpus is for, since one crawler can emit millions of near-identical feeds.

So the work is split in three, none of which holds the corpus:

* :func:`structured_kind` looks at one document and names its kind, or says it is prose;
* :class:`StructuredTagger` writes that kind into every document's metadata and counts kinds in
  its stats, rejecting nothing;
* :func:`keep_probability` turns the totals of those counts into the probability of keeping each
  structured document, and :func:`share_draws` gives each document a draw from a hash of its id
  (kept when below that probability), so every worker, and every rerun, decides the same for the
  same document.

Detection runs on every document of corpora of 10^8 documents, so it looks at most at the first
:data:`SCAN_CHARS` characters, uses character counts, one tag regex and line-shape statistics,
gives up on a kind as soon as too many lines disagree, and parses JSON only when the text opens
with ``{`` or ``[`` (and fully only when the whole text fits in the scan window).
"""

from __future__ import annotations

import json
import re
from collections import Counter
from collections.abc import Iterable, Iterator, Sequence

import numpy as np
import xxhash
from datatrove.data import Document
from datatrove.pipeline.base import PipelineStep

from skymoe.pipelines.clean.steps import is_rejected

# Work per document is bounded by this many characters from the start: a document is judged by its
# head. Structured dumps are uniform, so 16K characters (a few hundred lines) decide as well as the
# whole, and a 50 MB JSON blob costs no more than a tweet.
SCAN_CHARS = 16_384
# Line statistics read at most this many lines of the head.
MAX_LINES = 400

KINDS = ("json", "xml", "html", "yaml", "csv", "markdown_table")
METADATA_KEY = "structured"

# --- JSON -------------------------------------------------------------------------------------------
# A run of JSON tokens (punctuation and whitespace in runs, for speed); strings may not hold raw
# control characters, so a newline ends a bad string.
_JSON_STRING = r'"(?:[^"\\\x00-\x1f]|\\.)*"'
_JSON_TOKENS = re.compile(
    r"(?:" + _JSON_STRING + r"|[\s{}\[\],:]+|-?\d+(?:\.\d+)?(?:[eE][+-]?\d+)?|true|false|null)*"
)
# What may be left when the window cut a token in half: an open string, a number, a literal's start.
_JSON_CUT = re.compile(r'"(?:[^"\\\x00-\x1f]|\\.)*\\?|-?[\d.eE+-]*|t(?:r(?:u)?)?|f(?:a(?:l(?:s)?)?)?|n(?:u(?:l)?)?')
_JSON_STRINGS = re.compile(_JSON_STRING)
_BRACKETS = re.compile(r"[^{}\[\]]+")
_PAIRS = {"}": "{", "]": "["}


def _is_json(head: str, whole: bool) -> bool:
    """The head parses to an object/array (tried only when it is the ``whole`` text); otherwise
    it is a run of JSON tokens (a last token cut by the window allowed) whose brackets nest,
    which also accepts JSON Lines and a JSON document cut short."""
    if whole:
        try:
            if isinstance(json.loads(head), (dict, list)):
                return True
        except (ValueError, RecursionError):  # RecursionError: thousands of nested brackets
            pass
    end = _JSON_TOKENS.match(head).end()
    if end < len(head) and not _JSON_CUT.fullmatch(head, end):
        return False
    skeleton = _JSON_STRINGS.sub('""', head[:end])
    if skeleton.count(":") + skeleton.count(",") < 1:
        return False  # "[1]" or "{}": brackets, no data
    depth: list[str] = []
    for char in _BRACKETS.sub("", skeleton):
        if char in "{[":
            depth.append(char)
        elif not depth or depth.pop() != _PAIRS[char]:
            return False
    return True


# --- Markup ----------------------------------------------------------------------------------------
# A tag, doctype or processing instruction. Attribute runs are bounded so that a stray "<" in prose
# cannot make the regex scan far.
_TAG = re.compile(
    r"<(?:![A-Za-z][^<>]{0,2000}>|\?[^<>]{0,2000}\?>|/?([A-Za-z][\w:.-]{0,40})(?:\s[^<>]{0,2000})?/?>)"
)
# Blocks whose bodies are markup or code, not text: comments, CDATA, script and style. Their ends
# are found by a forward search from the opening, never by a lazy ".*?" (which would rescan the
# rest of the head at every unclosed "<!--").
_BLOCK = re.compile(r"<(!--|!\[CDATA\[|(?i:script|style)\b)")
_BLOCK_END = {"!--": re.compile("-->"), "![CDATA[": re.compile(r"\]\]>"),
              "script": re.compile("(?=</script)", re.I), "style": re.compile("(?=</style)", re.I)}
_HTML_TAGS = frozenset(
    "html head body title meta link base script style noscript div span p a b i u s em strong small big "
    "sub sup br hr img picture source video audio iframe embed object canvas svg path ul ol li dl dt dd "
    "table caption thead tbody tfoot tr td th col colgroup form input button label select option "
    "textarea fieldset legend nav header footer section article aside main figure figcaption h1 h2 h3 "
    "h4 h5 h6 pre code blockquote q cite abbr time mark font center address details summary "
    "template".split()
)
MIN_TAGS = 5
# Share of the head's non-space characters inside markup: the bar for a document that opens with a
# tag, and for one that does not (prose quoting a tag or two stays far below either).
MARKUP_SHARE_OPENING = 0.15
MARKUP_SHARE = 0.30


def _nonspace(text: str) -> int:
    return len(text) - text.count(" ") - text.count("\n") - text.count("\t") - text.count("\r")


def _without_blocks(head: str) -> str:
    """The head with comment, CDATA, script and style bodies cut out (an unclosed one runs to the
    end). Each search either jumps past its block or ends the scan, so this stays linear."""
    pieces: list[str] = []
    pos = 0
    while (match := _BLOCK.search(head, pos)) is not None:
        opener = match.group(1)
        if opener in _BLOCK_END:  # comment or CDATA: cut from its "<"
            body, end = match.start(), _BLOCK_END[opener]
        else:  # script or style: keep the tags (they count as tags), cut what lies between
            body = head.find(">", match.end()) + 1
            if body == 0:
                break
            end = _BLOCK_END[opener.lower()]
        pieces.append(head[pos:body])
        found = end.search(head, body)
        pos = len(head) if found is None else found.end()
    pieces.append(head[pos:])
    return "".join(pieces)


def _markup_kind(head: str) -> str | None:
    """Markup when the head is tag-dominated: enough tags, and enough of its non-space characters
    inside markup (tags, comments, CDATA, script and style bodies; those bodies are code, not
    text). A head that opens with ``<?xml`` or an HTML doctype/root needs only a few tags. The
    tags are found and cut by two C-level regex passes: no Python loop over tags."""
    rest = _without_blocks(head) if "<!" in head or "<s" in head or "<S" in head else head
    tags = [name.lower() for name in _TAG.findall(rest) if name]
    if len(tags) < 3:
        return None
    # Only a document that opens with markup can declare itself: prose may quote "<html>".
    opening = head[:1024].lower() if head.startswith("<") else ""
    html_root = "<!doctype html" in opening or "<html" in opening
    prolog = opening.startswith("<?xml")
    if not (html_root or prolog):
        if len(tags) < MIN_TAGS:
            return None
        nonspace = _nonspace(head)
        markup = nonspace - _nonspace(_TAG.sub("", rest))
        bar = MARKUP_SHARE_OPENING if head.startswith("<") else MARKUP_SHARE
        if markup < bar * nonspace:
            return None
    if html_root:
        return "html"
    if prolog:
        return "xml"
    html = sum(1 for name in tags if name in _HTML_TAGS)
    return "html" if 2 * html >= len(tags) else "xml"


# --- YAML ------------------------------------------------------------------------------------------
# ASCII keys only (a Chinese sentence with an ASCII colon is not a mapping); quoted keys allowed.
_YAML_KEY = re.compile(
    r"""( *)(?:- +)?(?:[A-Za-z0-9_$@][\w.\-/$@]{0,80}|"[^"\n]{1,80}"|'[^'\n]{1,80}') *:(?: +(.*))?""", re.A
)
_YAML_ITEM = re.compile(r"( *)-(?: +(.*))?")
_YAML_BLOCK = re.compile(r"[|>][-+0-9]*\s*(?:#.*)?")
MIN_YAML_LINES = 4
# A few headings over bullet lists ("Ingredients:" / "- flour") are YAML-shaped too: a config also
# has several keys, some of them with values on the line.
MIN_YAML_KEYS = 3
YAML_SHARE = 0.8


def _is_yaml(lines: list[str]) -> bool:
    """Most lines are ``key: value``, ``key:`` or ``- item`` (block scalars' bodies, comments and
    ``---`` markers count with them), with at least three keys, two of them with values, and at
    least one nested block: a key with no value followed by deeper lines or items. The nesting
    separates a config from a page of "Note: ..." lines or a flat spec sheet ("Brand: X",
    "Price: Y"), which read as prose; the keys with values separate it from headings over
    bullet lists ("Ingredients:" then "- 2 cups flour")."""
    content = [line for line in lines if line.strip() and not line.lstrip().startswith("#")]
    if len(content) < MIN_YAML_LINES:
        return False
    misses_allowed = int(len(content) * (1 - YAML_SHARE))
    misses = keys = valued = 0
    nested = False
    opener: int | None = None  # indentation of the last "key:" with no value, awaiting a child
    block: int | None = None  # indentation of the last "key: |", whose deeper lines are its text
    for line in content:
        indent = len(line) - len(line.lstrip(" "))
        if block is not None:
            if indent > block:
                continue
            block = None
        if line.rstrip() in ("---", "..."):
            continue
        item = line.startswith("-", indent)
        key = _YAML_KEY.fullmatch(line.rstrip())
        if key is not None:
            # A child is deeper than its key; a sequence may sit at its key's own indentation.
            if opener is not None and (indent > opener or (item and indent == opener)):
                nested = True
            keys += 1
            value = key.group(2)
            valued += bool(value)
            opener = indent if not value else None
            if value and _YAML_BLOCK.fullmatch(value):
                block = indent
            continue
        if _YAML_ITEM.fullmatch(line.rstrip()) is not None:
            if opener is not None and indent >= opener:
                nested = True
            opener = None
            continue
        misses += 1
        if misses > misses_allowed:
            return False
    return nested and keys >= MIN_YAML_KEYS and valued >= 2


# --- Delimited tables ------------------------------------------------------------------------------
_QUOTED = re.compile(r'"(?:[^"]|"")*"')
MIN_TABLE_LINES = 5
TABLE_SHARE = 0.9
# Tables hold short fields; prose lines with a steady comma count have long clauses between them.
MAX_MEAN_FIELD = 40


def _table_kind(lines: list[str]) -> str | None:
    """Lines with the same number (2 or more) of one delimiter, for at least 90% of the lines:
    CSV/TSV (``,`` ``\\t`` ``;``) or a markdown/pipe table (``|``)."""
    rows = [line for line in lines if line.strip()]
    if len(rows) < MIN_TABLE_LINES:
        return None
    candidates = [d for d in (",", "\t", ";", "|") if rows[0].count(d) >= 2 or rows[1].count(d) >= 2]
    if not candidates:
        return None
    unquoted = [_QUOTED.sub("", row) if '"' in row else row for row in rows]
    for delimiter in candidates:
        counts = Counter(row.count(delimiter) for row in unquoted)
        fields, matching = counts.most_common(1)[0]
        if fields < 2 or matching < TABLE_SHARE * len(rows):
            continue
        mean_field = sum(map(len, rows)) / (len(rows) * (fields + 1))
        if mean_field > MAX_MEAN_FIELD:
            continue
        if delimiter in ",;" and _reads_as_prose(unquoted, delimiter):
            continue
        return "markdown_table" if delimiter == "|" else "csv"
    return None


def _reads_as_prose(rows: list[str], delimiter: str) -> bool:
    """Verse or clause lists with a steady comma count: commas followed by a space, as in writing,
    and few numbers. Data rows mostly carry a digit (dates, amounts, codes) or use bare commas."""
    delimiters = sum(row.count(delimiter) for row in rows)
    spaced = sum(row.count(delimiter + " ") for row in rows)
    with_digits = sum(1 for row in rows if any(char.isdigit() for char in row))
    return spaced >= 0.8 * delimiters and with_digits < 0.5 * len(rows)


def structured_kind(text: str) -> str | None:
    """The kind of machine-structured data or markup the whole document is: ``"json"``, ``"xml"``,
    ``"html"``, ``"yaml"``, ``"csv"`` or ``"markdown_table"``; ``None`` for prose (including prose
    that quotes a tag, a snippet of code or a few ``key: value`` lines).

    Only the first :data:`SCAN_CHARS` characters are read. Kinds are tried cheapest-exit first:
    JSON only when the text opens with ``{``/``[``, markup only when the head holds a ``<``, and
    the line tests stop at the first lines that rule them out.
    """
    head = text[:SCAN_CHARS].lstrip("\ufeff \t\r\n")
    if len(head) < 8:
        return None
    if head[0] in "{[" and _is_json(head.rstrip(), whole=len(text) <= SCAN_CHARS):
        return "json"
    if "<" in head:
        kind = _markup_kind(head)
        if kind is not None:
            return kind
    lines = head.split("\n", MAX_LINES)
    if len(lines) > MAX_LINES or len(text) > SCAN_CHARS:
        lines.pop()  # the last line is cut by a bound; judge whole lines only
    if len(lines) < MIN_YAML_LINES:
        return None
    lines = [line.rstrip("\r") for line in lines]
    if ":" in head and _is_yaml(lines):
        return "yaml"
    return _table_kind(lines)


class StructuredTagger(PipelineStep):
    """Tags each kept document with its structured kind (``doc.metadata["structured"]``; ``None``
    for prose; a structured one also gets language ``code``) and counts kinds. Never rejects:
    structured text is capped, not banned."""

    type = "🧹 skymoe"
    name = "structured_text"

    def run(self, data: Iterable[Document], rank: int = 0, world_size: int = 1) -> Iterator[Document]:
        for doc in data:
            if is_rejected(doc):
                yield doc
                continue
            with self.track_time():
                kind = structured_kind(doc.text)
            doc.metadata[METADATA_KEY] = kind
            if kind is not None:
                # Data and markup go the code path: prose language id and prose rules would only
                # reject them; SkyPile's code heuristics judge them, and the share caps them.
                doc.metadata["lang"] = "code"
            self.stat_update(kind or "prose")
            yield doc


def keep_probability(structured_docs: int, other_docs: int, max_share: float) -> float:
    """The probability of keeping each structured document so that, in expectation, structured
    documents are at most ``max_share`` of the kept ones: the largest ``p`` with
    ``p*S / (p*S + O) <= max_share``, i.e. ``max_share*O / ((1 - max_share)*S)``, capped at 1.

    Computed from two counts (the tagger's stats summed over workers), so the cap needs no pass
    that holds the corpus. With no other documents any structured one would exceed the share, so
    all are dropped unless there are none; ``max_share`` 0 drops them all.
    """
    if not 0.0 <= max_share < 1.0:
        raise ValueError(f"max_share must be in [0, 1), got {max_share}")
    if structured_docs < 0 or other_docs < 0:
        raise ValueError("document counts must not be negative")
    if structured_docs == 0:
        return 1.0
    return min(1.0, max_share * other_docs / ((1.0 - max_share) * structured_docs))


def share_draws(doc_ids: Sequence[str], seed: int = 0) -> np.ndarray:
    """Each document's draw in [0, 1): the top 53 bits of ``xxh64(utf8(id), seed)`` as a fraction. A
    structured document is kept when its draw is below the keep probability.

    The draw depends on the id alone, never on order or on which worker sees the document, so
    shards are capped independently and a rerun keeps exactly the same documents; hashes are
    uniform, so the kept fraction converges to the probability. Another ``seed`` draws another sample."""
    hashes = np.fromiter(
        (xxhash.xxh64_intdigest(doc_id.encode("utf-8"), seed) for doc_id in doc_ids), np.uint64, len(doc_ids)
    )
    return (hashes >> np.uint64(11)).astype(np.float64) * 2.0**-53
