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

# English words follow spaCy's tokenizer (which datatrove's filters use) closely enough that the
# rules' decisions agree: abbreviations ending in "." stay whole, contractions split ("do" "n't"),
# URLs stay whole, and other punctuation marks are tokens of their own.
_ABBREVIATIONS = (
    "Mt Ak Ala Apr Ariz Ark Aug Calif Colo Conn Dec Del Feb Fla Ga Ia Id Ill Ind Jan Jul Jun Kan Kans Ky La "
    "Mar Mass Mich Minn Miss Neb Nebr Nev Nov Oct Okla Ore Pa Sep Sept Tenn Va Wash Wis "
    "Adm Bros co Co Corp Dr Gen Gov Inc Jr Ltd Md Messrs Mo Mont Mr Mrs Ms Prof Rep Rev Sen St vs"
).split()
_LATIN_WORD = re.compile(
    r"(?:https?://|www\.)[^\s<>\"]*[^\s<>\".,;:!?)\]'’]"             # a URL
    r"|(?:[^\W\d_]\.){2,}"                                             # U.S.  e.g.  a.m.
    r"|\b(?=[^\W\d_]{2,7}\.)(?:" + "|".join(_ABBREVIATIONS) + r")\.(?!\w)"  # Dr.  Inc.  vs.
    r"|\b[^\W\d_]\.(?![^\W_])"                                          # an initial: J.
    r"|\d+(?:[.,:/]\d+)+|@\w+|and/or"                                  # 5,000  1.4  @handle
    r"|[^\W_]+(?=n['’]t\b)|n['’]t\b"                                   # do | n't
    r"|[^\W_]+(?:(?:[&@]|\.(?![A-Z])|['’](?!(?:[sSdDmM]|re|ve|ll)\b))[^\W\d_][^\W_]*"
    r"|(?<=[^\W\d_])-\d[^\W_]*)*"                                       # AT&T  o'clock  IL-3
    r"|['’](?:[sSdDmM]|re|ve|ll)\b"                                     # 's 're 've 'll 'm 'd
    r"|\.{2,}|-{2,}|[^\w\s]|_+"                                          # ...  --  other marks
)
# A Chinese "word" is one Han character; runs of Latin letters/digits stay whole.
_HAN_CLASS = r"\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff\U00020000-\U0002ebef"
_HAN = re.compile(f"[{_HAN_CLASS}]")
_ZH_TOKEN = re.compile(rf"[{_HAN_CLASS}]|(?:(?![{_HAN_CLASS}])[^\W_])+|[^\w\s]")
_ZH_SENTENCE_END = re.compile(r"[。！？!?；;]+[”’」』）)]*|\.{3,}|…+")
_PARAGRAPH = re.compile(r"\n{2,}")
_LINES = re.compile(r"\n+")

VIEW = "_view"
TERMINAL_PUNCTUATION_EN = (".", "?", "!", '"', "'")
TERMINAL_PUNCTUATION_ZH = ("。", "！", "？", "!", "?", "…", "”", "」", "』", "；", ".", '"')


def count_han(text: str) -> int:
    return len(_HAN.findall(text))


def latin_words(text: str) -> list[str]:
    return _LATIN_WORD.findall(text)


def zh_tokens(text: str) -> list[str]:
    return _ZH_TOKEN.findall(text)


def count_sentences(text: str, lang: str) -> int:
    """Sentence count. English counts as spaCy's sentencizer does: a new sentence starts at the
    first word after a standalone ".", "!" or "?" token (so "Dr." or "U.S." end none). Chinese
    counts terminal marks, plus a trailing unterminated run of text."""
    if lang == "zh":
        ends = [m.end() for m in _ZH_SENTENCE_END.finditer(text)]
        tail = text[ends[-1]:] if ends else text
        return len(ends) + (1 if tail.strip() else 0)
    tokens = latin_words(text)
    count, after_end = (1 if tokens else 0), False
    for token in tokens:
        if token in (".", "!", "?"):
            after_end = True
        elif after_end and any(c.isalnum() for c in token):
            count += 1
            after_end = False
    return count


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
