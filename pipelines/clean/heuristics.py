"""Heuristic quality filters: Gopher repetition and quality, C4 lines, FineWeb, their Chinese
character-based equivalents, and SkyPile's code heuristics.

The English rules and thresholds are those of datatrove's GopherRepetitionFilter,
GopherQualityFilter, C4QualityFilter and FineWebQualityFilter (the published recipes); what
differs is that all of them read one shared segmentation (:mod:`skymoe.pipelines.clean.text`) instead of
re-tokenizing the document each.
"""

from __future__ import annotations

import re
from collections import Counter

import numpy as np

from datatrove.data import Document
from datatrove.utils.text import TERMINAL_PUNCTUATION

from skymoe.pipelines.clean.steps import DocFilter
from skymoe.pipelines.clean.text import (
    TERMINAL_PUNCTUATION_EN,
    TERMINAL_PUNCTUATION_ZH,
    count_sentences,
    view_of,
)
from skymoe.config import (
    BlocklistConfig,
    C4Config,
    ChineseConfig,
    CodeConfig,
    FineWebConfig,
    GopherQualityConfig,
    GopherRepetitionConfig,
    HeuristicsConfig,
)
from skymoe.storage import Storage

_PUNCTUATION = set(
    "!/—”:％１〈&(、━\\【#%「」，】；+^]~“《„';’{|∶´[=-`*．（–？！：$～«〉,><》)?）。…@_.\"}►»"
) | {chr(c) for c in [*range(0, 9), *range(11, 32), *range(127, 160)]}
_STOP_WORDS = frozenset(["the", "be", "to", "of", "and", "that", "have", "with"])
_CITATION = re.compile(r"\[\d*]|\[edit]|\[citation needed]")
# A "read more" link after a news digest's item ("……。详情点击>>", "……。[详细]"): page furniture,
# cut before the line's end is judged, so the sentence it follows still counts.
_MORE_LINK_WORDS = "详情点击|点击查看|查看详情|详情|详细|阅读全文|全文|更多"
_MORE_LINK_ZH = re.compile(rf"\s*(?:[\[【(（](?:{_MORE_LINK_WORDS})[\]】)）]|(?:{_MORE_LINK_WORDS})?\s*(?:>>|＞＞|》》|»|→))\s*$")
_POLICY = ("terms of use", "privacy policy", "cookie policy", "uses cookies", "use of cookies", "use cookies")


def _duplicates(items: list[str]) -> tuple[int, int]:
    """(duplicate elements, characters in duplicate elements), first occurrences not counted."""
    seen: set[str] = set()
    dup_elements = dup_chars = 0
    for item in items:
        if item in seen:
            dup_elements += 1
            dup_chars += len(item)
        else:
            seen.add(item)
    return dup_elements, dup_chars


class WordGrams:
    """The n-grams of one word list, as integer ids: gram ``n`` at position ``i`` gets the rank of
    the pair (gram ``a`` at ``i``, gram ``n - a`` at ``i + a``), so equal word tuples get equal ids
    with no hashing and no n-gram strings built. Gopher's repetition measures are then a few numpy
    passes per n instead of a Python loop over tuples (the filter's costliest rule before)."""

    def __init__(self, words: list[str]):
        vocabulary = {word: i for i, word in enumerate(dict.fromkeys(words))}
        self.size = len(words)
        ids = np.fromiter(map(vocabulary.__getitem__, words), np.int64, self.size)
        # _ids[n]: gram ids by start position; _first[n][g]: where gram id g first occurs
        self._ids = {1: ids}
        self._first = {1: np.unique(ids, return_index=True)[1]}
        # chars[i] = characters in words[:i]
        self._chars = np.concatenate(([0], np.cumsum(np.fromiter(map(len, words), np.int64, self.size))))

    def _grams(self, n: int) -> np.ndarray:
        """Gram ids for every start position (``size - n + 1`` of them; ``n <= size``)."""
        if n not in self._ids:
            a = n // 2
            left, right = self._grams(a)[: self.size - n + 1], self._grams(n - a)[a:]
            keys = left * (self.size + 1) + right  # exact: both ids are below size + 1
            _, self._first[n], self._ids[n] = np.unique(keys, return_index=True, return_inverse=True)
        return self._ids[n]

    def top_chars(self, n: int, sep: str) -> int:
        """Characters of the most frequent n-gram (joined by ``sep``) times its count; among equally
        frequent ones the first to occur, as ``Counter.most_common`` picks (Gopher's top n-gram)."""
        if self.size < n:
            return 0
        grams = self._grams(n)
        counts = np.bincount(grams)
        top = np.flatnonzero(counts == counts.max())
        start = int(self._first[n][top].min())
        return (int(self._chars[start + n] - self._chars[start]) + (n - 1) * len(sep)) * int(counts.max())

    def repeated_chars(self, n: int) -> int:
        """Characters of n-grams that repeat an earlier one, scanning as Gopher does: after a repeat
        the scan jumps past it, and grams jumped over are not remembered. Up to the first repeat the
        scan remembers every gram, so only the rest is walked in Python (nothing, for most pages)."""
        if self.size < n:
            return 0
        grams = self._grams(n)
        repeats = np.flatnonzero(self._first[n][grams] != np.arange(len(grams)))
        if not len(repeats):
            return 0
        start = int(repeats[0])
        seen = set(grams[:start].tolist())
        ids, chars = grams.tolist(), self._chars.tolist()
        repeated, idx = 0, start
        while idx < len(ids):
            if ids[idx] in seen:
                repeated += chars[idx + n] - chars[idx]
                idx += n
            else:
                seen.add(ids[idx])
                idx += 1
        return repeated


class GopherRepetition(DocFilter):
    """Gopher's repetition rules: duplicate lines/paragraphs and repeated n-grams.

    For Chinese the n-grams are of characters (``ChineseConfig.top_char_ngram`` /
    ``dup_char_ngram``) because there are no words to count.
    """

    name = "gopher_repetition"

    def __init__(self, config: GopherRepetitionConfig, lang: str, top_n_grams: dict[int, float],
                 dup_n_grams: dict[int, float]):
        super().__init__()
        self.config = config
        self.name = "gopher_repetition" if lang == "en" else f"{lang}_repetition"
        self.languages = (lang,)
        self.top_n_grams = sorted(top_n_grams.items())
        self.dup_n_grams = sorted(dup_n_grams.items())
        self.sep = "" if lang == "zh" else " "

    def check(self, doc: Document) -> str | None:
        c, view, text = self.config, view_of(doc), doc.text
        if not text:
            return "empty"
        dup, dup_chars = _duplicates(view.paragraphs)
        if dup / len(view.paragraphs) > c.dup_para_frac:
            return "dup_para_frac"
        if dup_chars / len(text) > c.dup_para_char_frac:
            return "dup_para_char_frac"
        dup, dup_chars = _duplicates(view.line_runs)
        if dup / len(view.line_runs) > c.dup_line_frac:
            return "dup_line_frac"
        if dup_chars / len(text) > c.dup_line_char_frac:
            return "dup_line_char_frac"
        grams = WordGrams(view.words)
        for n, frac in self.top_n_grams:
            if grams.top_chars(n, self.sep) / len(text) > frac:
                return f"top_{n}_gram"
        for n, frac in self.dup_n_grams:
            if grams.repeated_chars(n) / len(text) > frac:
                return f"duplicated_{n}_n_grams"
        return None


class GopherQuality(DocFilter):
    """Gopher's quality rules for English (length, word length, symbols, bullets, stop words)."""

    name = "gopher_quality"
    languages = ("en",)

    def __init__(self, config: GopherQualityConfig):
        super().__init__()
        self.config = config

    def check(self, doc: Document) -> str | None:
        c, view, text = self.config, view_of(doc), doc.text
        words = view.words
        content_words = [w for w in words if not _PUNCTUATION.issuperset(w)]
        if len(content_words) < c.min_doc_words:
            return "gopher_short_doc"
        if len(content_words) > c.max_doc_words:
            return "gopher_long_doc"
        if not content_words:
            return "gopher_short_doc"
        mean_len = sum(len(w) for w in content_words) / len(content_words)
        if mean_len < c.min_avg_word_length:
            return "gopher_below_avg_threshold"
        if mean_len > c.max_avg_word_length:
            return "gopher_above_avg_threshold"
        if text.count("#") / len(words) > c.max_symbol_word_ratio:
            return "gopher_too_many_hashes"
        if (text.count("...") + text.count("…")) / len(words) > c.max_symbol_word_ratio:
            return "gopher_too_many_ellipsis"
        lines = view.lines
        if sum(s.lstrip().startswith(("•", "-")) for s in lines) / len(lines) > c.max_bullet_lines_ratio:
            return "gopher_too_many_bullets"
        if sum(s.rstrip().endswith(("...", "…")) for s in lines) / len(lines) > c.max_ellipsis_lines_ratio:
            return "gopher_too_many_end_ellipsis"
        if sum(any(ch.isalpha() for ch in w) for w in words) / len(words) < c.min_alpha_words_ratio:
            return "gopher_below_alpha_threshold"
        if len(_STOP_WORDS.intersection(words)) < c.min_stop_words:
            return "gopher_enough_stop_words"
        return None


class C4Lines(DocFilter):
    """C4's line rules: keep lines that end in terminal punctuation and have enough words; drop
    lines about javascript or cookie policies; drop the page on "lorem ipsum", a curly bracket, or
    too few sentences. Chinese lines count characters, end in Chinese punctuation, lose a trailing
    "read more" link, and keep their sentences up to the last one that ends (see _terminated_part)."""

    name = "c4"

    def __init__(self, config: C4Config, lang: str, min_chars_per_line: int = 0, min_sentences: int | None = None):
        super().__init__()
        self.config = config
        self.name = "c4" if lang == "en" else f"{lang}_c4_lines"
        self.languages = (lang,)
        self.lang = lang
        self.terminal = TERMINAL_PUNCTUATION_ZH if lang == "zh" else TERMINAL_PUNCTUATION_EN
        self.min_chars_per_line = min_chars_per_line
        self.min_sentences = config.min_sentences if min_sentences is None else min_sentences

    def check(self, doc: Document) -> str | None:
        c = self.config
        kept: list[str] = []
        sentences = 0
        for raw in view_of(doc).lines:
            line = raw.strip()
            words = line.split()
            if max(map(len, words), default=0) > c.max_word_length:
                continue
            line = _CITATION.sub("", line)
            if self.lang == "zh":
                line = _terminated_part(_MORE_LINK_ZH.sub("", line), self.terminal)
            if not line.endswith(self.terminal) or (self.lang == "en" and line.endswith("...")):
                continue
            if self.lang == "zh":
                if len(line) < self.min_chars_per_line:
                    continue
            elif len(words) < c.min_words_per_line:
                continue
            lower = line.lower()
            if "lorem ipsum" in lower:
                return "lorem_ipsum"
            if "javascript" in lower:
                continue
            if "{" in line:
                return "curly_bracket"
            if any(p in lower for p in _POLICY):
                continue
            sentences += count_sentences(line, self.lang)
            kept.append(line)
        if sentences < self.min_sentences:
            return "too_few_sentences"
        doc.text = "\n".join(kept).strip()
        return None


def _terminated_part(line: str, terminal: tuple[str, ...]) -> str:
    """A Chinese line up to its last sentence end. Chinese pages often hold a whole paragraph, or a
    whole article, on one line, so C4's rule of dropping a line that does not end in punctuation would
    drop every sentence of a paragraph cut off mid-sentence; only the unfinished tail goes."""
    return line[: max(line.rfind(mark) for mark in terminal) + 1]


class FineWebQuality(DocFilter):
    """FineWeb's rules: share of lines ending in punctuation, short lines, duplicated line
    characters, and newlines per word (list-like pages)."""

    name = "fineweb"
    languages = ("en",)

    def __init__(self, config: FineWebConfig):
        super().__init__()
        self.config = config
        self.stops = tuple(TERMINAL_PUNCTUATION)  # FineWeb's own set, for equal decisions

    def check(self, doc: Document) -> str | None:
        c, view = self.config, view_of(doc)
        lines = view.nonempty_lines
        if not lines:
            return "empty"
        if sum(line.endswith(self.stops) for line in lines) / len(lines) < c.line_punct_thr:
            return "line_punct_ratio"
        if sum(len(line) <= c.short_line_length for line in lines) / len(lines) > c.short_line_thr:
            return "short_line_ratio"
        chars = len(doc.text) - doc.text.count("\n")
        if chars == 0 or _duplicates(lines)[1] / chars > c.char_duplicates_ratio:
            return "char_dup_ratio"
        if not view.words or doc.text.count("\n") / len(view.words) > c.new_line_ratio:
            return "list_ratio"
        return None


class ChineseQuality(DocFilter):
    """Character-based counterparts of Gopher's quality rules for Chinese pages."""

    name = "zh_quality"
    languages = ("zh",)

    def __init__(self, config: ChineseConfig):
        super().__init__()
        self.config = config

    def check(self, doc: Document) -> str | None:
        c, view, text = self.config, view_of(doc), doc.text
        if view.han_chars < c.min_doc_chars:
            return "zh_short_doc"
        if view.han_chars > c.max_doc_chars:
            return "zh_long_doc"
        if not view.non_space_chars or view.han_chars / view.non_space_chars < c.min_han_ratio:
            return "zh_low_han_ratio"
        if (text.count("#") + text.count("...") + text.count("…")) / view.han_chars > c.max_symbol_ratio:
            return "zh_too_many_symbols"
        if count_sentences(text, "zh") < c.min_sentences:
            return "zh_too_few_sentences"
        return None


class CodeQuality(DocFilter):
    """SkyPile's code heuristics: line-length limits and the alphanumeric fraction."""

    name = "code"
    languages = ("code",)

    def __init__(self, config: CodeConfig):
        super().__init__()
        self.config = config

    def check(self, doc: Document) -> str | None:
        c, lines = self.config, view_of(doc).lines
        if not lines or not doc.text.strip():
            return "empty"
        if max(len(line) for line in lines) > c.max_line_length:
            return "code_long_line"
        if sum(len(line) for line in lines) / len(lines) > c.max_mean_line_length:
            return "code_mean_line_length"
        if sum(ch.isalnum() for ch in doc.text) / len(doc.text) < c.min_alnum_frac:
            return "code_low_alnum"
        return None


class Blocklist(DocFilter):
    """Rejects pages full of spam vocabulary (gambling, adult, pills) from per-language term lists.

    The terms are read once, at construction, so the step carries them to every worker.
    """

    name = "blocklist"

    def __init__(self, config: BlocklistConfig, terms: dict[str, list[str]]):
        super().__init__()
        self.min_hits = config.min_hits
        self.languages = tuple(sorted(terms))
        self.patterns = {lang: re.compile("|".join(_term_pattern(t) for t in sorted(words, key=len, reverse=True)))
                         for lang, words in terms.items() if words}

    def check(self, doc: Document) -> str | None:
        pattern = self.patterns.get(doc.metadata["lang"])
        if pattern is None:
            return None
        hits = Counter(pattern.findall(doc.text.lower()))
        if sum(hits.values()) >= self.min_hits:
            return f"spam_terms: {', '.join(term for term, _ in hits.most_common(3))}"
        return None


def _term_pattern(term: str) -> str:
    """Latin terms match whole words only ("cialis" must not match "specialist"), also when glued
    to Chinese text ("yabo手机版"); CJK terms have no word boundaries and match as substrings."""
    escaped = re.escape(term)
    return rf"(?<![a-z0-9]){escaped}(?![a-z0-9])" if term.isascii() else escaped


def read_terms(storage: Storage, uri: str) -> list[str]:
    """A term list: one term per line; blank lines and '#' comments ignored; lower-cased."""
    lines = storage.read_text(uri).splitlines()
    return [line.strip().lower() for line in lines if line.strip() and not line.lstrip().startswith("#")]


def heuristic_steps(config: HeuristicsConfig, storage: Storage = Storage()) -> list[DocFilter]:
    """The heuristic chain: spam terms, repetition, then quality. English follows datatrove's
    Gopher -> C4 -> FineWeb order, so decisions can be compared rule for rule."""
    if not config.enabled:
        return []
    zh = config.chinese
    blocklist = ([Blocklist(config.blocklist, {lang: read_terms(storage, uri) for lang, uri in config.blocklist.files.items()})]
                 if config.blocklist.enabled else [])
    return [
        *blocklist,
        GopherRepetition(config.gopher_repetition, "en", config.gopher_repetition.top_n_grams,
                         config.gopher_repetition.dup_n_grams),
        GopherRepetition(config.gopher_repetition, "zh", zh.top_char_ngram, zh.dup_char_ngram),
        GopherQuality(config.gopher_quality),
        C4Lines(config.c4, "en"),
        C4Lines(config.c4, "zh", min_chars_per_line=zh.min_chars_per_line, min_sentences=zh.min_sentences),
        # Chinese length and sentence rules judge what the line rules left, not the raw page.
        ChineseQuality(zh),
        FineWebQuality(config.fineweb),
        CodeQuality(config.code),
    ]
