"""One shared segmentation of a document, computed once and read by every filter.

datatrove's quality filters each re-tokenize a document with spaCy (~6-10 ms per filter per
document). Here a document is split once, with plain regular expressions, into lines,
paragraphs, words and sentences; every filter reads the same lazily-built view. English words
follow spaCy's convention closely enough (punctuation marks are their own tokens) that the
keep/drop decisions of equivalent rules agree; Chinese, which has no spaces, is segmented into
characters, so its rules count characters where the English rules count words.
"""

from __future__ import annotations

import re
from functools import cached_property

from datatrove.data import Document

# A word is a number with inner separators ("1.4", "5,000"), or a run of letters/digits with inner
# apostrophes or slashes ("don't", "and/or"); a run of the same punctuation mark ("...") is one
# token, any other visible character a token of its own - spaCy's conventions, closely enough.
_LATIN_WORD = re.compile(r"\d+(?:[.,:/]\d+)+|[^\W_]+(?:['’][^\W_]+)*(?:/[^\W_]+)*|([^\w\s])\1*|_+")
# A Chinese "word" is one Han character; runs of Latin letters/digits stay whole.
_HAN_CLASS = r"\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff\U00020000-\U0002ebef"
_HAN = re.compile(f"[{_HAN_CLASS}]")
_ZH_TOKEN = re.compile(rf"[{_HAN_CLASS}]|(?:(?![{_HAN_CLASS}])[^\W_])+|[^\w\s]")
_EN_SENTENCE_END = re.compile(r"[.!?]+[\"'”’)\]]*(?=\s|$)")
_ZH_SENTENCE_END = re.compile(r"[。！？!?；;]+[”’」』）)]*|\.{3,}|…+")
_PARAGRAPH = re.compile(r"\n{2,}")
_LINES = re.compile(r"\n+")

VIEW = "_view"
TERMINAL_PUNCTUATION_EN = (".", "?", "!", '"', "'")
TERMINAL_PUNCTUATION_ZH = ("。", "！", "？", "!", "?", "…", "”", "」", "』", "；", ".", '"')


def is_han(char: str) -> bool:
    return _HAN.match(char) is not None


def count_han(text: str) -> int:
    return len(_HAN.findall(text))


def latin_words(text: str) -> list[str]:
    return [m.group(0) for m in _LATIN_WORD.finditer(text)]


def zh_tokens(text: str) -> list[str]:
    return _ZH_TOKEN.findall(text)


def count_sentences(text: str, lang: str) -> int:
    """Sentence count: terminal marks, plus a trailing unterminated run of text."""
    pattern = _ZH_SENTENCE_END if lang == "zh" else _EN_SENTENCE_END
    ends = [m.end() for m in pattern.finditer(text)]
    tail = text[ends[-1]:] if ends else text
    return len(ends) + (1 if tail.strip() else 0)


class TextView:
    """Lazily computed segmentations of one text; cheap to build, each part computed once."""

    __slots__ = ("text", "lang", "__dict__")

    def __init__(self, text: str, lang: str):
        self.text = text
        self.lang = lang

    @cached_property
    def lines(self) -> list[str]:
        """Lines as ``str.splitlines`` gives them (C4 and Gopher's bullet/ellipsis rules)."""
        return self.text.splitlines()

    @cached_property
    def line_runs(self) -> list[str]:
        """Lines split on runs of newlines (Gopher's duplicate-line rule)."""
        return _LINES.split(self.text)

    @cached_property
    def nonempty_lines(self) -> list[str]:
        return [line for line in self.text.split("\n") if line.strip()]

    @cached_property
    def paragraphs(self) -> list[str]:
        return _PARAGRAPH.split(self.text.strip())

    @cached_property
    def words(self) -> list[str]:
        """English: words and punctuation tokens. Chinese: Han characters and Latin runs."""
        return zh_tokens(self.text) if self.lang == "zh" else latin_words(self.text)

    @cached_property
    def han_chars(self) -> int:
        return count_han(self.text)

    @cached_property
    def non_space_chars(self) -> int:
        return len(self.text) - sum(1 for c in self.text if c.isspace())


def view_of(doc: Document) -> TextView:
    """The shared view of a document, rebuilt only when a step has changed the text."""
    view: TextView | None = doc.metadata.get(VIEW)
    lang = doc.metadata.get("lang", "en")
    if view is None or view.text is not doc.text or view.lang != lang:
        view = TextView(doc.text, lang)
        doc.metadata[VIEW] = view  # never written out: writers pick the fields they store
    return view
