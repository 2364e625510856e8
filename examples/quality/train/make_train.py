#!/usr/bin/env python3
"""Rebuild the per-language training data of the quality classifier.

Writes, next to this script:

    zh_positive.jsonl  zh_negative.jsonl  en_positive.jsonl  en_negative.jsonl

from the permissively licensed files in ``../shared/data`` (CC BY-SA Wikipedia text,
ODC-BY C4, Apache-2.0 Dolma) and from files already in ``examples/``
(``examples/quality/negative.jsonl``: the Dolma WARC pages; ``en_moved_from_eval.jsonl``
in this folder: the human labels of the English documents moved out of the evaluation
set). Standard library only; deterministic (fixed seeds): running it twice gives
byte-identical files. See SOURCE.md for what each file holds and why.

Usage (from the repository root):

    python examples/quality/train/make_train.py [--data ../shared/data] [--check]

``--check`` rebuilds in memory and exits non-zero if a file on disk differs.

The evaluation set ``examples/quality/eval/{zh,en}.jsonl`` is never trained on. This
script reads it only to keep its documents out: candidates that share a
(source, line) with an eval entry are never used, candidates whose 30-character
shingles overlap an eval document by more than 50% (of the smaller shingle set) are
dropped, and a final check fails loudly (SystemExit) if any output document has the
same text, the same (source, line) or such a near-duplicate in the eval set.

Text of the non-copyable sources (web/chinesewebtext, web/clue, web/skywork) is read only
through the eval set's references, to check for overlap; none of it goes into the output.
bench/cmmlu and bench/ceval (non-commercial) are never read.
"""
from __future__ import annotations

import argparse
import collections
import json
import random
import re
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO_ROOT = HERE.parents[2]
QUALITY = HERE.parent
EVAL_DIR = QUALITY / "eval"
DEFAULT_DATA = REPO_ROOT.parent / "shared" / "data"

SEED = 14
SHINGLE = 30
NEAR_DUP = 0.5

ZHWIKI = "web/zhwiki/zhwiki_sampled.txt"
CMRC = "web/cmrc2018/cmrc2018_contexts.jsonl"
C4 = "web/c4/c4_demo.jsonl"
DOLMA_CC = "web/dolma/cc_en_head-0091.jsonl"
WARC = "web/dolma/sample-0000.warc.gz"

# Chinese positives: the same selection as examples/quality/positive.jsonl.
ZHWIKI_POS_LINES = (1501, 2500)   # 1-based, inclusive
MIN_POS_CHARS = 200
CMRC_POS_ROWS = (601, 1104)
# Chinese real negatives: zhwiki stubs. Lines 60-199 chars long are left out of both
# classes (short but often complete articles: ambiguous).
STUB_MAX_CHARS = 60
# Raw material for the constructed Chinese negatives: the demo-corpus part of the
# Wikipedia samples (zhwiki lines 1-1500, cmrc2018 rows 1-600) minus every eval entry,
# so constructed documents never share a source document with the positives.
ZHWIKI_RAW_LINES = (1, 1500)
CMRC_RAW_ROWS = (1, 600)

# How many constructed Chinese negatives of each (kind, method).
CONSTRUCTED_PLAN = [
    ("spun_text", "synonym_spin", 60),
    ("spun_text", "brand_swap", 25),
    ("gambling_spam", "brand_title", 25),
    ("machine_garbled", "sentence_stitch", 30),
    ("keyword_stuffing", "keyword_salad", 25),
    ("keyword_stuffing", "keyword_glued", 25),
    ("page_furniture", "nav_headlines", 30),
    ("page_furniture", "teaser_list", 20),
    ("listing", "product_listing", 15),
    ("listing", "name_list", 15),
]

# Synonym-spinning table ("伪原创" tools): a common word -> the odd near-synonym such
# tools put in its place. Written for this script from general knowledge of spun
# Chinese web text (the eval notes name 公司→企业, 介绍→先容, 文化→学问).
SPIN = {
    "公司": "企业", "介绍": "先容", "文化": "学问", "很多": "良多", "尽量": "只管即便",
    "通过": "经由过程", "目前": "今朝", "非常": "很是", "问题": "题目", "因此": "是以",
    "特别": "出格", "时候": "时辰", "开始": "起头", "最后": "末了", "出现": "泛起",
    "使用": "利用", "其实": "实在", "方法": "要领", "重要": "紧张", "知道": "晓得",
    "所有": "全部", "联系": "接洽", "工作": "事情", "环境": "情况", "部分": "部门",
    "作用": "感化", "现在": "此刻", "原因": "缘故原由", "保持": "连结", "能够": "可以或许",
    "注意": "留意", "发现": "发明", "一直": "始终", "经过": "颠末", "消费者": "花费者",
    "价格": "代价", "觉得": "感觉", "比较": "对照", "大家": "各人", "提高": "进步",
    "成功": "乐成", "进行": "举行", "发展": "成长", "经验": "履历", "研究": "钻研",
    "成立": "建立", "设计": "计划", "包括": "包罗", "提供": "供给", "需要": "必要",
    "生产": "出产", "电影": "影戏", "历史": "汗青", "主要": "重要", "其中": "此中",
    "地区": "区域", "认为": "以为", "之后": "以后", "成为": "成了", "一些": "一些",
}
SPIN = {k: v for k, v in SPIN.items() if k != v}
SPIN_RE = re.compile("|".join(sorted(map(re.escape, SPIN), key=len, reverse=True)))

# Invented gambling-style brand names: generic auspicious prefix + a generic suffix of
# gambling sites. No brand is taken from the non-copyable web data.
BRAND_PREFIX = ["鸿运", "金鼎", "盛世", "聚宝", "富源", "恒通", "鼎丰", "百盛", "星河", "宏发",
                "天成", "瑞祥", "福临", "嘉和", "汇丰源", "金樽", "玉龙", "紫金"]
BRAND_SUFFIX = ["贵宾会", "娱乐", "娱乐城", "体育", "国际", "彩票", "棋牌"]
NAV = ["首页", "新闻", "资讯", "体育", "财经", "娱乐", "科技", "教育", "汽车", "房产", "旅游",
       "健康", "图片", "视频", "专题", "论坛", "产品中心", "关于我们", "联系我们"]
FOOTER = ["关于我们", "联系我们", "网站地图", "免责声明", "广告服务", "友情链接", "招聘信息"]
SEO_SUFFIX = ["价格", "多少钱", "哪家好", "排名", "官网", "下载", "图片", "视频", "怎么样",
              "最新", "大全", "推荐", "报价", "厂家", "批发", "加盟", "电话", "地址"]
CITIES = ["北京", "上海", "广州", "深圳", "杭州", "成都", "武汉", "西安", "南京", "重庆",
          "天津", "苏州", "长沙", "郑州", "济南", "青岛", "沈阳", "合肥"]

# The 22 WARC pages of examples/quality/negative.jsonl, labelled by the eval-set
# guideline (examples/quality/eval/SOURCE.md). Blog posts and essays are good prose there,
# so they are positives here; list-dominated homepages are negatives; short personal
# profile pages (bio paragraph + links) are ambiguous and left out.
WARC_LABELS = {
    "https://www.semanticscholar.org/research/research-team": ("bad", "page_furniture", "team roster: names, roles, years, alumni list"),
    "https://soldaini.net/lineage/": ("bad", "listing", "table of academic ancestors (names, fields, dissertations)"),
    "https://kyleclo.com/research/": ("bad", "page_furniture", "homepage research section: bulleted project/paper list with one-line blurbs"),
    "https://joe.cat/": ("bad", "listing", "publication list: titles, awards, venues with abstracts"),
    "https://maria-antoniak.github.io/": ("bad", "page_furniture", "short bio then a long dated table of talks and news items"),
    "https://www.jonathanbragg.com/": ("bad", "listing", "short bio then publication and mentee lists"),
    "https://dwadden.github.io/": ("bad", "listing", "publication list (titles, authors, venues)"),
    "https://homes.cs.washington.edu/~axz/": ("bad", "page_furniture", "dated news items and blog-post teaser list"),
    "https://maria-antoniak.github.io/2023/07/04/notes-on-mastodon.html": ("good", "blog", "long personal blog post with advice on Mastodon"),
    "https://maria-antoniak.github.io/2023/04/11/paperpile-to-zotero.html": ("good", "explanatory", "how-to blog post (Paperpile to Zotero)"),
    "https://maria-antoniak.github.io/2022/07/27/topic-modeling-for-the-people.html": ("good", "explanatory", "practical guide to topic modelling"),
    "https://maria-antoniak.github.io/2020/03/25/pip.html": ("good", "explanatory", "short how-to on packaging a Python project"),
    "https://maria-antoniak.github.io/2018/11/19/data-science-crash-course.html": ("good", "blog", "blog post on preparing for ML interviews with commented resources"),
    "https://amyxzhang.wordpress.com/": ("good", "blog", "republished research blog post on group chat summarisation"),
    "https://tomhoper.github.io/research/": ("good", "essay", "research statement in running prose"),
}
WARC_LEFT_OUT = [
    "https://www.cs.washington.edu/people/faculty/weld", "https://soldaini.net/",
    "https://soldaini.net/facts/", "https://kyleclo.com/", "https://talaugust.github.io/",
    "https://tomhoper.github.io/", "https://www.cs.cmu.edu/~anaik/",
]


# ----------------------------------------------------------------------------- helpers

def read_lines(path: Path) -> list[str]:
    """1-based file lines as `sed -n Np` sees them (split on \\n only)."""
    parts = path.read_text(encoding="utf-8").split("\n")
    if parts and parts[-1] == "":
        parts.pop()
    return [p[:-1] if p.endswith("\r") else p for p in parts]


def shingles(text: str) -> set[str]:
    if len(text) <= SHINGLE:
        return {text}
    return {text[i:i + SHINGLE] for i in range(len(text) - SHINGLE + 1)}


SENT_RE = re.compile(r"[^。！？]*[。！？]")


def sentences(text: str) -> list[str]:
    return [s.strip() for s in SENT_RE.findall(text) if len(s.strip()) >= 8]


class EvalIndex:
    """Everything of the evaluation set that training data must not touch."""

    def __init__(self, data: Path):
        sys.path.insert(0, str(EVAL_DIR))
        import check_eval_set  # noqa: E402  (stdlib-only module beside the eval files)

        self.texts: dict[str, str] = {}
        self.refs: dict[tuple, str] = {}
        self.sh: dict[str, set] = {}
        self.sh_size: dict[str, int] = {}
        self.index: dict[str, list[str]] = collections.defaultdict(list)
        for lang in ("zh", "en"):
            for e, text in check_eval_set.iter_documents(lang, shared=data, skip_missing=False):
                eid = e["id"]
                self.texts[text] = eid
                self.refs[(e["source"], e.get("line"), e.get("record"))] = eid
                s = shingles(text)
                self.sh_size[eid] = len(s)
                for x in s:
                    self.index[x].append(eid)
        self.n = len(self.sh_size)

    def near_dup(self, text: str) -> tuple[str, float] | None:
        s = shingles(text)
        hits: collections.Counter = collections.Counter()
        for x in s:
            for eid in self.index.get(x, ()):
                hits[eid] += 1
        best = None
        for eid, n in hits.items():
            frac = n / min(len(s), self.sh_size[eid])
            if frac > NEAR_DUP and (best is None or frac > best[1]):
                best = (eid, frac)
        return best

    def ref_used(self, source: str, line: int | None = None, record: str | None = None) -> str | None:
        return self.refs.get((source, line, record))


class Builder:
    def __init__(self, data: Path):
        self.data = data
        self.eval = EvalIndex(data)
        self.dropped: collections.Counter = collections.Counter()
        self.drop_log: list[str] = []

    def usable(self, what: str, text: str, source: str | None, line: int | None = None,
               record: str | None = None) -> bool:
        """False (and logged) when a candidate is an eval document or a near-duplicate."""
        if source is not None and self.eval.ref_used(source, line, record):
            self.dropped[(what, "eval_ref")] += 1
            return False
        if text in self.eval.texts:
            self.dropped[(what, "eval_text")] += 1
            self.drop_log.append(f"{what}: {source}:{line} same text as {self.eval.texts[text]}")
            return False
        nd = self.eval.near_dup(text)
        if nd:
            self.dropped[(what, "eval_near_dup")] += 1
            self.drop_log.append(f"{what}: {source}:{line} {nd[1]:.0%} of shingles shared with {nd[0]}")
            return False
        return True

    # ------------------------------------------------------------------------- zh
    def zh(self):
        zhwiki = read_lines(self.data / ZHWIKI)
        cmrc = [json.loads(l) for l in read_lines(self.data / CMRC)]

        pos = []
        lo, hi = ZHWIKI_POS_LINES
        for n in range(lo, hi + 1):
            t = zhwiki[n - 1]
            if len(t) >= MIN_POS_CHARS and self.usable("zh_positive", t, ZHWIKI, n):
                pos.append({"text": t, "source": ZHWIKI, "line": n, "id": f"zhwiki_sampled.txt:{n}",
                            "kind": "encyclopedic"})
        lo, hi = CMRC_POS_ROWS
        for n in range(lo, hi + 1):
            r = cmrc[n - 1]
            if self.usable("zh_positive", r["text"], CMRC, n):
                pos.append({"text": r["text"], "source": CMRC, "line": n, "id": r["id"],
                            "title": r["title"], "kind": "encyclopedic"})

        neg = []
        lo, hi = ZHWIKI_POS_LINES
        for n in range(lo, hi + 1):
            t = zhwiki[n - 1]
            if not t.strip() or len(t) >= STUB_MAX_CHARS:
                continue
            if t.rstrip().endswith(("：", ":")):
                form = "disambiguation_header"
            elif not re.search(r"[。！？]", t):
                form = "title_only"
            else:
                form = "short_stub"
            if self.usable("zh_negative_stub", t, ZHWIKI, n):
                neg.append({"text": t, "source": ZHWIKI, "line": n, "id": f"zhwiki_sampled.txt:{n}",
                            "kind": "stub", "form": form})

        # raw material for constructed negatives (never positives, never eval)
        raw = []
        lo, hi = ZHWIKI_RAW_LINES
        for n in range(lo, hi + 1):
            t = zhwiki[n - 1]
            if len(t) >= MIN_POS_CHARS and self.usable("zh_raw", t, ZHWIKI, n):
                title = re.split(r"[ （(，,。是]", t, 1)[0][:20]
                raw.append({"text": t, "source": ZHWIKI, "line": n, "title": title})
        lo, hi = CMRC_RAW_ROWS
        for n in range(lo, hi + 1):
            r = cmrc[n - 1]
            if self.usable("zh_raw", r["text"], CMRC, n):
                raw.append({"text": r["text"], "source": CMRC, "line": n, "title": r["title"]})
        neg.extend(self.constructed_zh(raw))
        return pos, neg

    def constructed_zh(self, raw: list[dict]) -> list[dict]:
        out = []
        for kind, method, count in CONSTRUCTED_PLAN:
            rng = random.Random(f"{SEED}-{method}")
            order = list(range(len(raw)))
            rng.shuffle(order)
            cursor = [0]

            def take(k: int = 1) -> list[dict]:
                picked = []
                for _ in range(k):
                    picked.append(raw[order[cursor[0] % len(order)]])
                    cursor[0] += 1
                return picked

            made = attempts = 0
            while made < count:
                attempts += 1
                if attempts > count * 20:
                    raise SystemExit(f"could not construct {count} {method} documents")
                res = getattr(self, "_c_" + method)(rng, take)
                if res is None:
                    continue
                text, used = res
                if not self.usable(f"zh_constructed_{method}", text, None):
                    continue
                out.append({"text": text, "constructed": True, "kind": kind, "method": method,
                            "source": "constructed",
                            "from": [{"source": u["source"], "line": u["line"]} for u in used]})
                made += 1
        return out

    @staticmethod
    def _head(text: str, max_chars: int) -> str:
        if len(text) <= max_chars:
            return text
        cut = text.rfind("。", 0, max_chars)
        return text[:cut + 1] if cut > max_chars // 3 else text[:max_chars]

    @staticmethod
    def _brand(rng: random.Random) -> str:
        return rng.choice(BRAND_PREFIX) + rng.choice(BRAND_SUFFIX)

    def _c_synonym_spin(self, rng, take):
        d = take()[0]
        text = self._head(d["text"], 1500)
        n = [0]

        def sub(m):
            if rng.random() < 0.9:
                n[0] += 1
                return SPIN[m.group(0)]
            return m.group(0)

        spun = SPIN_RE.sub(sub, text)
        if n[0] < 3:
            return None
        return spun, [d]

    def _c_brand_swap(self, rng, take):
        d = take()[0]
        title = d["title"]
        text = self._head(d["text"], 1500)
        if len(title) < 2 or text.count(title) < 2:
            return None
        brand = self._brand(rng)
        return text.replace(title, brand), [d]

    def _c_brand_title(self, rng, take):
        d = take()[0]
        brand = self._brand(rng)
        body = self._head(d["text"], 1200)
        head = rng.choice([f"{brand}_{brand}官网", f"{brand}-{brand}登录", f"{brand}官方网站-首页"])
        links = " ".join(f"{brand}{s}" for s in rng.sample(["官网", "登录", "注册", "app下载", "网址", "开户", "平台", "手机版"], 5))
        return f"{head}\n{body}\n{links}", [d]

    def _c_sentence_stitch(self, rng, take):
        docs = take(3)
        pool = []
        for d in docs:
            ss = sentences(d["text"])
            if len(ss) < 3:
                return None
            pool.extend(rng.sample(ss, min(len(ss), rng.randint(3, 5))))
        rng.shuffle(pool)
        return "".join(pool), docs

    def _keywords(self, rng, docs, k):
        kws = []
        for _ in range(k):
            t = rng.choice(docs)["title"]
            r = rng.random()
            if r < 0.4:
                kws.append(t + rng.choice(SEO_SUFFIX))
            elif r < 0.7:
                kws.append(rng.choice(CITIES) + t + rng.choice(SEO_SUFFIX))
            else:
                kws.append(t)
        return kws

    def _c_keyword_salad(self, rng, take):
        docs = take(rng.randint(2, 4))
        kws = self._keywords(rng, docs, rng.randint(20, 50))
        sep = rng.choice([" ", "，", "、", " | ", "\n"])
        return sep.join(kws), docs

    def _c_keyword_glued(self, rng, take):
        docs = take(3)
        body = self._head(docs[0]["text"], 600)
        kws = self._keywords(rng, docs, rng.randint(10, 25))
        label = rng.choice(["相关搜索：", "热门关键词：", "标签：", "关键词："])
        if rng.random() < 0.5:
            return f"{label}{' '.join(kws)}\n{body}", docs
        return f"{body}\n{label}{' '.join(kws)}", docs

    def _c_nav_headlines(self, rng, take):
        docs = take(rng.randint(8, 20))
        nav = " | ".join(rng.sample(NAV, rng.randint(6, 10)))
        lines = [nav, rng.choice(["当前位置：首页 > 新闻", "最新文章", "热门推荐", "相关阅读"])]
        for d in docs:
            date = f"{rng.randint(2015, 2021)}-{rng.randint(1, 12):02d}-{rng.randint(1, 28):02d}"
            lines.append(rng.choice([f"{d['title']} {date}", f"· {d['title']}", f"[{date}] {d['title']}"]))
        lines.append(" | ".join(rng.sample(FOOTER, 5)))
        lines.append(f"Copyright © {rng.randint(2010, 2021)} 版权所有")
        return "\n".join(lines), docs

    def _c_teaser_list(self, rng, take):
        docs = take(rng.randint(5, 10))
        lines = [" | ".join(rng.sample(NAV, rng.randint(5, 8)))]
        for d in docs:
            lead = d["text"][len(d["title"]):].lstrip(" ，,")[:rng.randint(25, 50)]
            lines.append(f"{d['title']}\n{lead}…{rng.choice(['[详细]', '阅读全文', '更多>>'])}")
        lines.append("上一页 1 2 3 4 5 下一页")
        return "\n".join(lines), docs

    def _c_product_listing(self, rng, take):
        docs = take(rng.randint(4, 8))
        lines = [rng.choice(["产品列表", "商品报价", "最新供应"])]
        for d in docs:
            model = f"{rng.choice('ABCDEFGHKMST')}{rng.choice('ABCDEFGHKMST')}-{rng.randint(100, 9999)}"
            price = rng.choice([f"￥{rng.randint(10, 9999)}.00", "价格面议", f"{rng.randint(1, 500)}元/件"])
            lines.append(f"{d['title']} 型号：{model} 价格：{price} 库存：{rng.randint(0, 999)}件")
        lines.append(f"联系电话：1{rng.randint(3, 8)}{rng.randint(0, 9)}****{rng.randint(1000, 9999)}")
        return "\n".join(lines), docs

    def _c_name_list(self, rng, take):
        docs = take(rng.randint(15, 35))
        sep = rng.choice(["、", " ", "\n", "；"])
        return sep.join(d["title"] for d in docs), docs

    # ------------------------------------------------------------------------- en
    def en(self):
        c4 = read_lines(self.data / C4)
        dolma = read_lines(self.data / DOLMA_CC)
        files = {C4: c4, DOLMA_CC: dolma}
        pos, neg = [], []
        for e in (json.loads(l) for l in read_lines(HERE / "en_moved_from_eval.jsonl")):
            text = json.loads(files[e["source"]][e["line"] - 1])[e["field"]]
            row = {"text": text, "source": e["source"], "line": e["line"], "field": e["field"],
                   "eval_id": e["id"], "kind": e["kind"], "borderline": e.get("borderline", False),
                   "reason": e["reason"], "moved_from_eval": True}
            if not self.usable("en_moved", text, e["source"], e["line"]):
                raise SystemExit(f"moved document {e['id']} is still in the eval set")
            (pos if e["label"] == "good" else neg).append(row)
        seen = set()
        for l in read_lines(QUALITY / "negative.jsonl"):
            r = json.loads(l)
            seen.add(r["url"])
            if r["url"] in WARC_LEFT_OUT:
                continue
            label, kind, reason = WARC_LABELS[r["url"]]
            if not self.usable("en_warc", r["text"], WARC, None, r["id"]):
                continue
            row = {"text": r["text"], "source": WARC, "record": r["id"], "url": r["url"],
                   "via": "examples/quality/negative.jsonl", "kind": kind, "reason": reason}
            (pos if label == "good" else neg).append(row)
        missing = (set(WARC_LABELS) | set(WARC_LEFT_OUT)) - seen
        if missing:
            raise SystemExit(f"WARC pages not found in negative.jsonl: {sorted(missing)}")
        return pos, neg

    # ------------------------------------------------------------------------- checks
    def final_check(self, files: dict[str, list[dict]]) -> None:
        errors = []
        where: dict[str, str] = {}
        for name, rows in files.items():
            for i, r in enumerate(rows, 1):
                t = r["text"]
                tag = f"{name}:{i}"
                if not t.strip():
                    errors.append(f"{tag}: empty text")
                if t in self.eval.texts:
                    errors.append(f"{tag}: same text as eval {self.eval.texts[t]}")
                if r.get("source") not in (None, "constructed"):
                    hit = self.eval.ref_used(r["source"], r.get("line"), r.get("record"))
                    if hit:
                        errors.append(f"{tag}: {r['source']} line {r.get('line')} is eval {hit}")
                nd = self.eval.near_dup(t)
                if nd:
                    errors.append(f"{tag}: near-duplicate of eval {nd[0]} ({nd[1]:.0%} shingles)")
                if t in where:
                    errors.append(f"{tag}: same text as {where[t]}")
                where[t] = tag
                for f in r.get("from", ()):
                    hit = self.eval.ref_used(f["source"], f["line"])
                    if hit:
                        errors.append(f"{tag}: constructed from eval document {hit}")
        if errors:
            print("\n".join("OVERLAP ERROR: " + e for e in errors[:50]), file=sys.stderr)
            raise SystemExit(f"{len(errors)} overlap error(s) with the evaluation set or between files")


def dump(rows: list[dict]) -> bytes:
    return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows).encode("utf-8")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data", type=Path, default=DEFAULT_DATA, help="shared data folder")
    ap.add_argument("--check", action="store_true", help="only verify the files on disk")
    args = ap.parse_args(argv)
    b = Builder(args.data)
    zh_pos, zh_neg = b.zh()
    en_pos, en_neg = b.en()
    files = {"zh_positive.jsonl": zh_pos, "zh_negative.jsonl": zh_neg,
             "en_positive.jsonl": en_pos, "en_negative.jsonl": en_neg}
    b.final_check(files)
    status = 0
    for name, rows in files.items():
        data = dump(rows)
        path = HERE / name
        if args.check:
            same = path.exists() and path.read_bytes() == data
            status |= not same
            print(f"{name}: {'OK' if same else 'DIFFERS'}")
        else:
            path.write_bytes(data)
        kinds = collections.Counter((r.get("source"), r.get("kind"), r.get("method") or r.get("form"))
                                    for r in rows)
        print(f"{name}: {len(rows)} documents")
        for (src, kind, sub), n in sorted(kinds.items(), key=lambda x: tuple(map(str, x[0]))):
            print(f"    {n:5d}  {kind:18} {sub or '':22} {src}")
    print(f"eval documents indexed: {b.eval.n}")
    for (what, why), n in sorted(b.dropped.items()):
        print(f"dropped {n:4d}  {what:32} {why}")
    for line in b.drop_log:
        print("   ", line)
    return status


if __name__ == "__main__":
    sys.exit(main())
