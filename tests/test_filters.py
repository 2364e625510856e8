"""The cleaning filters on real text.

Every filter is shown keeping a real document and rejecting one with the expected reason. The
rejected documents are real corpus documents where the corpus has one, otherwise real text
changed in one obvious way (a real C4 page with its lines doubled, a real Python module joined
onto one line, ...). The English rules are also checked against datatrove's own filters, which
they claim to reproduce, on all 300 C4 documents.

Data: ``examples/corpus`` (C4 English web pages, Chinese Wikipedia lines, CMRC paragraphs, Dolma
CCNet pages) and ``examples/quality`` (the classifier seed); see the SOURCE.md files there.
"""

from __future__ import annotations

import json
import re
import textwrap
from pathlib import Path

import numpy as np
import pytest
from datatrove.data import Document

from skymoe.pipelines.clean.heuristics import (
    C4Lines,
    ChineseQuality,
    CodeQuality,
    FineWebQuality,
    GopherQuality,
    GopherRepetition,
    WordGrams,
    heuristic_steps,
)
from skymoe.pipelines.clean.langid import LanguageId
from skymoe.pipelines.clean.steps import REJECT, reject
from skymoe.config import HeuristicsConfig, LanguageConfig
from skymoe.storage import Storage

REPO = Path(__file__).resolve().parent.parent
CORPUS = REPO / "examples" / "corpus"

C4_TEXTS = [json.loads(line)["text"] for line in (CORPUS / "c4" / "c4_demo.jsonl").read_text("utf-8").splitlines()]
ZHWIKI = (CORPUS / "zhwiki" / "zhwiki_part1.txt").read_text("utf-8").splitlines()
CMRC = [json.loads(line)["text"] for line in (CORPUS / "cmrc2018" / "cmrc2018_contexts.jsonl").read_text("utf-8").splitlines()]
DOLMA = [json.loads(line)["text"] for line in (CORPUS / "dolma" / "cc_en_head-0091.jsonl").read_text("utf-8").splitlines()]

CFG = HeuristicsConfig()
ZH = CFG.chinese

# Real documents used below (0-based line numbers in the corpus files).
C4_GOOD = 0  # "Don't think you need all the bells and whistles? ..." (air cleaners), kept by every rule
C4_LONG_GOOD = 3  # a 6.7k-character, 18-line page, kept by every rule
ZH_GOOD = 12  # 乌尾阿南鱼 (a fish species), a complete 318-character article
ZH_STUB = 1  # 宫娥 (委拉斯开兹): a title-only stub
ZH_FEW_SENTENCES = 560  # 阿德莱德巨人: 282 characters in two sentences
ZH_LOW_HAN = 598  # Kubectl: an article that is mostly a list of English command names
ZH_CURLY = 79  # Game Gear: keeps MediaWiki -{zh:...;zh-tw:...}- conversion markup in its text
ZH_OLYMPICS = 533  # 2016年夏季奥林匹克运动会轻艇男子200公尺单人爱斯基摩艇比赛 (a complete article)

# Real snippets that are not in the corpus.
FRENCH = ("La Révolution française est une période de bouleversements politiques et sociaux en France, "
          "dans ses colonies et en Europe à la fin du XVIIIe siècle.")  # fr.wikipedia, "Révolution française"
JAPANESE = "吾輩は猫である。名前はまだ無い。どこで生れたかとんと見当がつかぬ。"  # Natsume Soseki, 1905 (public domain)
LOREM = "Lorem ipsum dolor sit amet, consectetur adipiscing elit, sed do eiusmod tempor incididunt ut labore."
DISQUS = "Please enable JavaScript to view the comments powered by Disqus."


def doc(text: str, lang: str | None = "en", doc_id: str = "d") -> Document:
    return Document(text=text, id=doc_id, metadata={} if lang is None else {"lang": lang})


def run_one(step, document: Document) -> Document:
    out = list(step.run([document]))
    assert len(out) == 1 and out[0] is document, "a step yields every document it is given, kept or not"
    return out[0]


def reason(document: Document) -> str | None:
    mark = document.metadata.get(REJECT)
    return None if mark is None else mark["reason"]


def rejected_by(document: Document) -> str | None:
    mark = document.metadata.get(REJECT)
    return None if mark is None else mark["step"]


def en_repetition() -> GopherRepetition:
    c = CFG.gopher_repetition
    return GopherRepetition(c, "en", c.top_n_grams, c.dup_n_grams)


def zh_repetition() -> GopherRepetition:
    return GopherRepetition(CFG.gopher_repetition, "zh", ZH.top_char_ngram, ZH.dup_char_ngram)


def zh_c4() -> C4Lines:
    return C4Lines(CFG.c4, "zh", min_chars_per_line=ZH.min_chars_per_line, min_sentences=ZH.min_sentences)


@pytest.fixture(scope="module")
def datatrove_filters():
    """datatrove's own implementations of the English rules (spaCy's blank English tokenizer, offline)."""
    from datatrove.pipeline.filters import (
        C4QualityFilter,
        FineWebQualityFilter,
        GopherQualityFilter,
        GopherRepetitionFilter,
    )

    return {
        "gopher_repetition": GopherRepetitionFilter(),
        "gopher_quality": GopherQualityFilter(),
        "c4": C4QualityFilter(),
        "fineweb": FineWebQualityFilter(),
    }


def datatrove_reason(flt, text: str) -> str | None:
    """None when datatrove keeps the text, else its reason."""
    result = flt.filter(Document(text=text, id="ref"))
    if result is True:
        return None
    return result[1]


# --------------------------------------------------------------------------- the step protocol
def core_steps() -> list:
    """The rule filters under test, in the stage's order (the stage's spam-term blocklist aside)."""
    c = CFG
    return [en_repetition(), zh_repetition(), GopherQuality(c.gopher_quality), C4Lines(c.c4, "en"), zh_c4(),
            ChineseQuality(ZH), FineWebQuality(c.fineweb), CodeQuality(c.code)]


def test_the_stage_chain_holds_these_filters():
    names = [s.name for s in heuristic_steps(CFG)]
    assert [n for n in names if n in {s.name for s in core_steps()}] == [s.name for s in core_steps()]


def test_filters_pass_rejected_and_other_language_docs_untouched():
    steps = core_steps()
    already = doc(C4_TEXTS[C4_GOOD] * 3)  # would fail the repetition rules, but is already rejected upstream
    reject(already, "language", "low_confidence")
    chinese_short = doc(ZHWIKI[ZH_STUB], "zh")
    english_short = doc(C4_TEXTS[137])  # "Y.M. Molding Industry Mfg. Inc.": far too short for every English rule
    for step in (s for s in steps if "en" not in s.languages):
        run_one(step, english_short)
    assert reason(english_short) is None, "Chinese/code filters must not judge an English document"
    for step in (s for s in steps if "zh" not in s.languages):
        run_one(step, chinese_short)
    assert reason(chinese_short) is None, "English/code filters must not judge a Chinese document"
    for step in steps:
        run_one(step, already)
    assert already.metadata[REJECT] == {"step": "language", "reason": "low_confidence"}
    assert already.text == C4_TEXTS[C4_GOOD] * 3


def test_real_pages_pass_the_whole_chain_unchanged():
    english, chinese = doc(C4_TEXTS[C4_LONG_GOOD]), doc(ZHWIKI[ZH_GOOD], "zh")
    for step in core_steps():
        run_one(step, english)
        run_one(step, chinese)
    assert reason(english) is None and reason(chinese) is None
    assert english.text == C4_TEXTS[C4_LONG_GOOD]  # every line of this C4 page ends in punctuation
    assert chinese.text == ZHWIKI[ZH_GOOD]


# --------------------------------------------------------------------------- Gopher repetition
def test_gopher_repetition_keeps_a_real_page_and_rejects_it_with_its_lines_doubled(datatrove_filters):
    step = en_repetition()
    kept = run_one(step, doc(C4_TEXTS[C4_GOOD]))
    assert reason(kept) is None

    lines = C4_TEXTS[C4_GOOD].splitlines()
    doubled = "\n".join(line for line in lines for _ in range(2))  # each line twice: half the lines repeat
    out = run_one(step, doc(doubled))
    assert out.metadata[REJECT] == {"step": "gopher_repetition", "reason": "dup_line_frac"}
    assert datatrove_reason(datatrove_filters["gopher_repetition"], doubled) == "dup_line_frac"

    twice = C4_TEXTS[C4_GOOD] + "\n\n" + C4_TEXTS[C4_GOOD]  # the page pasted twice as two paragraphs
    assert reason(run_one(step, doc(twice))) == "dup_para_frac"
    assert datatrove_reason(datatrove_filters["gopher_repetition"], twice) == "dup_para_frac"


def test_gopher_repetition_rejects_a_real_repetitive_c4_page(datatrove_filters):
    # C4 line 11 lists hiking trails as "Description: ... Comments: ..." records: repeated 5-grams.
    text = C4_TEXTS[10]
    assert reason(run_one(en_repetition(), doc(text))) == "duplicated_5_n_grams"
    assert datatrove_reason(datatrove_filters["gopher_repetition"], text) == "duplicated_5_n_grams"


def test_word_grams_measure_what_gophers_string_loops_measure():
    """WordGrams counts with integer gram ids; the reference is datatrove's own duplicate scan
    (it joins words without a separator, so words here never glue into each other's grams) and
    Counter's top n-gram, on real C4 word lists and constructed repetitive ones."""
    from collections import Counter

    from datatrove.pipeline.filters.gopher_repetition_filter import find_all_duplicate

    from skymoe.pipelines.clean.text import latin_words

    def top_chars(words: list[str], n: int) -> int:
        grams = Counter(" ".join(words[i : i + n]) for i in range(len(words) - n + 1))
        gram, count = grams.most_common(1)[0] if grams else ("", 0)
        return len(gram) * count

    rng = np.random.default_rng(0)
    constructed = [[f"w{k}" for k in rng.integers(0, vocab, size)] for vocab, size in
                   [(2, 50), (3, 200), (5, 7), (50, 400), (1000, 300), (1, 12)]]
    word_lists = [latin_words(text) for text in C4_TEXTS[:60]] + constructed + [[], ["one"], ["a", "b", "a", "b"]]
    for words in word_lists:
        grams = WordGrams(words)
        for n in (1, 2, 3, 4):
            assert grams.top_chars(n, " ") == top_chars(words, n), (words[:8], n)
        for n in (2, 5, 7, 10):
            assert grams.repeated_chars(n) == find_all_duplicate(words, n), (words[:8], n)


def test_chinese_repetition_keeps_a_real_article_and_rejects_it_repeated():
    step = zh_repetition()
    assert step.name == "zh_repetition" and step.languages == ("zh",)
    assert reason(run_one(step, doc(ZHWIKI[ZH_GOOD], "zh"))) is None
    tripled = "\n".join([ZHWIKI[ZH_GOOD]] * 3)
    out = run_one(step, doc(tripled, "zh"))
    assert out.metadata[REJECT] == {"step": "zh_repetition", "reason": "dup_line_frac"}
    # The English filter leaves the Chinese document alone.
    assert reason(run_one(en_repetition(), doc(tripled, "zh"))) is None


def test_chinese_repetition_keeps_a_real_article_that_mentions_a_year():
    document = doc(ZHWIKI[ZH_OLYMPICS], "zh")
    assert reason(run_one(zh_repetition(), document)) is None


# --------------------------------------------------------------------------- Gopher quality
def test_gopher_quality_keeps_a_real_page_and_rejects_real_short_and_bulleted_ones(datatrove_filters):
    step = GopherQuality(CFG.gopher_quality)
    assert reason(run_one(step, doc(C4_TEXTS[C4_GOOD]))) is None

    short = C4_TEXTS[26]  # a kennel page's last four lines: 30-odd words
    out = run_one(step, doc(short))
    assert out.metadata[REJECT] == {"step": "gopher_quality", "reason": "gopher_short_doc"}
    assert datatrove_reason(datatrove_filters["gopher_quality"], short) == "gopher_short_doc"

    bulleted = "\n".join("• " + line for line in C4_TEXTS[C4_LONG_GOOD].splitlines())
    assert reason(run_one(step, doc(bulleted))) == "gopher_too_many_bullets"
    assert datatrove_reason(datatrove_filters["gopher_quality"], bulleted) == "gopher_too_many_bullets"

    # Gopher quality is English-only: a Chinese article is not judged by English word rules.
    assert reason(run_one(step, doc(ZHWIKI[ZH_GOOD], "zh"))) is None


# --------------------------------------------------------------------------- C4 lines
def test_c4_lines_keeps_a_real_page_and_cuts_its_boilerplate_lines():
    step = C4Lines(CFG.c4, "en")
    page = C4_TEXTS[C4_GOOD]
    with_boilerplate = page + "\n" + DISQUS + "\nShare this:\nTwitter\nFacebook"
    out = run_one(step, doc(with_boilerplate))
    assert reason(out) is None
    assert out.text == page.strip()  # the javascript line and the unpunctuated share buttons are cut

    # A real Dolma CCNet page has unpunctuated heading/navigation lines: those go, the prose stays.
    dolma = DOLMA[8]
    out = run_one(step, doc(dolma))
    assert reason(out) is None
    kept_lines = out.text.splitlines()
    assert 0 < len(kept_lines) < len(dolma.splitlines())
    assert all(line.endswith((".", "?", "!", '"', "'")) and len(line.split()) >= 3 for line in kept_lines)
    assert all(line in dolma for line in kept_lines)


def test_c4_lines_rejects_real_pages(datatrove_filters):
    step = C4Lines(CFG.c4, "en")
    # C4 line 6 is one keyword-stuffed line that ends mid-sentence: no line survives.
    out = run_one(step, doc(C4_TEXTS[5]))
    assert out.metadata[REJECT] == {"step": "c4", "reason": "too_few_sentences"}
    assert out.text == C4_TEXTS[5], "a rejected document keeps its original text"
    assert datatrove_reason(datatrove_filters["c4"], C4_TEXTS[5]) == "too_few_sentences"

    placeholder = C4_TEXTS[C4_GOOD] + "\n" + LOREM
    assert reason(run_one(step, doc(placeholder))) == "lorem_ipsum"
    assert datatrove_reason(datatrove_filters["c4"], placeholder) == "lorem_ipsum"

    code_line = C4_TEXTS[C4_GOOD] + "\nThe settings file contains {\"filter\": \"HEPA\"} for this model."
    assert reason(run_one(step, doc(code_line))) == "curly_bracket"
    assert datatrove_reason(datatrove_filters["c4"], code_line) == "curly_bracket"


def test_chinese_c4_lines_keeps_real_paragraphs_and_rejects_real_stubs_and_markup():
    step = zh_c4()
    assert step.name == "zh_c4_lines" and step.languages == ("zh",)
    out = run_one(step, doc(ZHWIKI[ZH_GOOD], "zh"))
    assert reason(out) is None and out.text == ZHWIKI[ZH_GOOD].strip()

    # A real CMRC paragraph (广茂铁路) under its unpunctuated title: the title line is cut, the prose kept.
    page = "广茂铁路\n" + CMRC[2]
    out = run_one(step, doc(page, "zh"))
    assert reason(out) is None
    assert out.text == CMRC[2].strip()
    # CMRC row 1 (锣鼓经) is one line that ends in a heading, "...口诀用字：": the heading goes, the
    # paragraph's finished sentences stay (C4's whole-line rule would drop them all).
    out = run_one(step, doc(CMRC[1], "zh"))
    assert reason(out) is None
    assert out.text.endswith("作为打拍子的主要乐器。") and "口诀用字" not in out.text
    # A news digest whose items end in a "read more" link keeps each item's sentence, not the link.
    digest = "\n".join(f"第{n}条消息说明了当天发生的事情。详情点击>>" for n in range(1, 4))
    out = run_one(step, doc(digest, "zh"))
    assert reason(out) is None and out.text.count("。") == 3 and ">>" not in out.text

    stub = ZHWIKI[8]  # 二酉乡: one sentence, then a heading that ends with "："
    assert reason(run_one(step, doc(stub, "zh"))) == "too_few_sentences"
    assert reason(run_one(step, doc(ZHWIKI[ZH_CURLY], "zh"))) == "curly_bracket"
    # The English C4 filter ignores Chinese documents and vice versa.
    assert reason(run_one(C4Lines(CFG.c4, "en"), doc(stub, "zh"))) is None
    assert reason(run_one(step, doc(C4_TEXTS[5]))) is None


# --------------------------------------------------------------------------- FineWeb
def test_fineweb_keeps_a_real_page_and_rejects_duplicated_and_list_like_ones(datatrove_filters):
    step = FineWebQuality(CFG.fineweb)
    assert reason(run_one(step, doc(C4_TEXTS[C4_GOOD]))) is None

    lines = C4_TEXTS[C4_GOOD].splitlines()
    longest = max(lines, key=len)
    repeated = C4_TEXTS[C4_GOOD] + "\n" + longest  # one real line said twice
    out = run_one(step, doc(repeated))
    assert out.metadata[REJECT] == {"step": "fineweb", "reason": "char_dup_ratio"}
    assert datatrove_reason(datatrove_filters["fineweb"], repeated) == "char_dup_ratio"

    as_list = "\n".join(C4_TEXTS[C4_GOOD].replace(".", "").split())  # the page's words, one per line
    assert reason(run_one(step, doc(as_list))) == "line_punct_ratio"
    assert datatrove_reason(datatrove_filters["fineweb"], as_list) == "line_punct_ratio"

    assert reason(run_one(step, doc(as_list, "zh"))) is None  # English-only rule


# --------------------------------------------------------------------------- Chinese quality
def test_chinese_quality_keeps_a_real_article_and_rejects_real_weak_ones():
    step = ChineseQuality(ZH)
    assert reason(run_one(step, doc(ZHWIKI[ZH_GOOD], "zh"))) is None
    assert all(reason(run_one(step, doc(text, "zh"))) is None for text in CMRC[:20] if len(text) > 400)
    cases = {ZH_STUB: "zh_short_doc", ZH_LOW_HAN: "zh_low_han_ratio", ZH_FEW_SENTENCES: "zh_too_few_sentences"}
    for line, expected in cases.items():
        out = run_one(step, doc(ZHWIKI[line], "zh"))
        assert out.metadata[REJECT] == {"step": "zh_quality", "reason": expected}, ZHWIKI[line][:40]
    assert reason(run_one(step, doc(ZHWIKI[ZH_STUB], "en"))) is None  # only documents identified as zh


def test_chinese_quality_on_the_zhwiki_sample_rejects_mostly_stubs():
    step = ChineseQuality(ZH)
    results = [step.check(doc(text, "zh")) for text in ZHWIKI]
    kept = [text for text, r in zip(ZHWIKI, results) if r is None]
    # Measured: 302 of 1500 kept, 1194 zh_short_doc; the sample is mostly title-only stubs
    # (1,107 lines under 200 characters, see examples/corpus/zhwiki/SOURCE.md).
    assert 250 <= len(kept) <= 350
    assert results.count("zh_short_doc") >= 1100
    assert all(len(text) >= ZH.min_doc_chars for text in kept)


# --------------------------------------------------------------------------- code
def test_code_quality_on_real_python_source():
    step = CodeQuality(CFG.code)
    source = Path(textwrap.__file__).read_text("utf-8")  # the standard library's textwrap module
    assert reason(run_one(step, doc(source, "code"))) is None
    own = (REPO / "pipelines" / "clean" / "heuristics.py").read_text("utf-8")
    assert reason(run_one(step, doc(own, "code"))) is None

    minified = "; ".join(line.strip() for line in source.splitlines() if line.strip())
    out = run_one(step, doc(minified, "code"))
    assert out.metadata[REJECT] == {"step": "code", "reason": "code_long_line"}

    lines = source.splitlines()
    packed = "\n".join(" ".join(lines[i : i + 8]) for i in range(0, len(lines), 8))  # 8 lines per line
    assert max(map(len, packed.splitlines())) <= CFG.code.max_line_length
    assert reason(run_one(step, doc(packed, "code"))) == "code_mean_line_length"

    symbols_only = re.sub(r"[^\W_]", "", source)  # the module's punctuation and layout without its names
    assert reason(run_one(step, doc(symbols_only, "code"))) == "code_low_alnum"

    # Code rules apply only to code; the English rules do not judge code.
    assert reason(run_one(step, doc(minified, "en"))) is None
    assert reason(run_one(GopherQuality(CFG.gopher_quality), doc(source, "code"))) is None


# --------------------------------------------------------------------------- language id
@pytest.fixture(scope="module")
def language_id():
    return LanguageId(LanguageConfig())


def test_language_id_keeps_real_english_and_chinese(language_id):
    english = run_one(language_id, doc(C4_TEXTS[C4_GOOD], None))
    chinese = run_one(language_id, doc(ZHWIKI[ZH_GOOD], None))
    assert reason(english) is None and english.metadata["lang"] == "en" and english.metadata["lang_score"] >= 0.65
    assert reason(chinese) is None and chinese.metadata["lang"] == "zh" and chinese.metadata["lang_score"] >= 0.65


def test_language_id_on_the_corpus(language_id):
    c4 = [run_one(language_id, doc(text, None, str(i))) for i, text in enumerate(C4_TEXTS)]
    cmrc = [run_one(language_id, doc(text, None, str(i))) for i, text in enumerate(CMRC[:200])]
    # Measured: 299/300 C4 pages kept as en (the other is the 31-character line 138, low confidence);
    # CMRC: 195/200 kept as zh, the rest are articles on Japanese subjects that lingua calls ja.
    assert sum(reason(d) is None and d.metadata["lang"] == "en" for d in c4) >= 295
    assert sum(reason(d) is None and d.metadata["lang"] == "zh" for d in cmrc) >= 190
    assert {reason(d) for d in cmrc} <= {None, "language_ja"}


def test_language_id_rejects_french_and_japanese(language_id):
    french = run_one(language_id, doc(FRENCH, None))
    assert french.metadata[REJECT] == {"step": "language", "reason": "language_fr"}
    assert french.metadata["lang"] == "fr" and french.metadata["lang_score"] > 0.9
    japanese = run_one(language_id, doc(JAPANESE, None))
    assert reason(japanese) == "language_ja" and japanese.metadata["lang"] == "ja"


def test_language_id_rejects_low_confidence(language_id):
    # C4 line 138 is only a company name, "Y.M. Molding Industry Mfg. Inc.": English, but unsure.
    out = run_one(language_id, doc(C4_TEXTS[137], None))
    assert out.metadata["lang"] == "en"
    assert out.metadata["lang_score"] < LanguageConfig().min_confidence
    assert out.metadata[REJECT] == {"step": "language", "reason": "low_confidence"}


def test_language_id_respects_keep_and_skips_code_and_rejected_docs(language_id):
    english_only = LanguageId(LanguageConfig(keep=["en"]))
    assert reason(run_one(english_only, doc(ZHWIKI[ZH_GOOD], None))) == "language_zh"
    code = doc(Path(textwrap.__file__).read_text("utf-8"), "code")
    assert reason(run_one(language_id, code)) is None and code.metadata["lang"] == "code"
    earlier = doc(FRENCH, None)
    reject(earlier, "read", "empty")
    assert run_one(language_id, earlier).metadata[REJECT]["step"] == "read"
    assert "lang" not in earlier.metadata


# --------------------------------------------------------------------------- agreement with datatrove
def test_english_rules_agree_with_datatrove_on_c4(datatrove_filters):
    c = CFG
    pairs = {
        "gopher_repetition": en_repetition(),
        "gopher_quality": GopherQuality(c.gopher_quality),
        "c4": C4Lines(c.c4, "en"),
        "fineweb": FineWebQuality(c.fineweb),
    }
    agree: dict[str, int] = {}
    same_reason = {name: 0 for name in pairs}
    both_rejected = {name: 0 for name in pairs}
    chain_agree = 0
    for i, text in enumerate(C4_TEXTS):
        ours_keep_all = theirs_keep_all = True
        for name, ours in pairs.items():
            ours_doc = doc(text, "en", str(i))
            mine = ours.check(ours_doc)
            theirs_doc = Document(text=text, id=str(i))
            result = datatrove_filters[name].filter(theirs_doc)
            theirs = None if result is True else result[1]
            agree[name] = agree.get(name, 0) + ((mine is None) == (theirs is None))
            if mine is not None and theirs is not None:
                both_rejected[name] += 1
                same_reason[name] += mine == theirs
            if mine is None and theirs is None and name == "c4":
                assert ours_doc.text == theirs_doc.text, f"C4 line cutting differs on document {i}"
            ours_keep_all &= mine is None
            theirs_keep_all &= theirs is None
        chain_agree += ours_keep_all == theirs_keep_all
    n = len(C4_TEXTS)
    rates = {name: count / n for name, count in agree.items()}
    # Measured on the 300 C4 pages (keep/reject agreement): gopher_repetition 299/300,
    # gopher_quality 287/300 (all 13 differences: ours rejects gopher_below_alpha_threshold where
    # datatrove keeps, because the regex splits numbers like "1.4"/"5,000", "..." and "and/or" into
    # more non-alphabetic tokens than spaCy), c4 298/300, fineweb 300/300; the four rules together 288/300.
    assert rates["gopher_repetition"] >= 0.98
    assert rates["gopher_quality"] >= 0.94
    assert rates["c4"] >= 0.98
    assert rates["fineweb"] >= 0.98
    assert chain_agree / n >= 0.92
    # Where both reject, the reason is the same (measured: 14/15, 57/58, 43/43, fineweb none).
    for name in pairs:
        if both_rejected[name]:
            assert same_reason[name] / both_rejected[name] >= 0.9, name
