"""Structured-text detection, the tagging step and the share cap (issue 14, item 4).

Positives are real-looking documents of each kind (an API response, an RSS feed, a web page from
the bundled WARC, an app config, a docker-compose file, ...); negatives are real prose from the
bundled corpora (C4 English pages, Chinese Wikipedia lines) and prose that quotes a little
structure: an inline tag, a few "Note:" lines, a short code or config block.
"""

from __future__ import annotations

import json
import random
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
from datatrove.data import Document

from skymoe.pipelines.clean.steps import REJECT, reject
from skymoe.pipelines.clean.structured import (
    SCAN_CHARS,
    StructuredTagger,
    keep_probability,
    share_draws,
    structured_kind,
)

REPO = Path(__file__).resolve().parent.parent
CORPUS = REPO / "examples" / "corpus"


def _c4() -> list[str]:
    return [json.loads(line)["text"] for line in (CORPUS / "c4" / "c4_demo.jsonl").open(encoding="utf-8")]


def _zhwiki() -> list[str]:
    return (CORPUS / "zhwiki" / "zhwiki_part1.txt").read_text(encoding="utf-8").splitlines()


def _records(n: int) -> list[dict]:
    rng = random.Random(7)
    return [
        {"id": i, "name": f"user{i}", "email": f"user{i}@example.com", "active": i % 3 != 0,
         "score": round(rng.random() * 100, 2), "tags": ["alpha", "beta"][: i % 3],
         "address": {"city": rng.choice(["Berlin", "Lyon", "Austin"]), "zip": f"{10000 + i}"}}
        for i in range(n)
    ]


# --- JSON ------------------------------------------------------------------------------------------

API_RESPONSE = json.dumps({
    "status": "ok", "page": 1, "per_page": 3, "total": 214,
    "data": _records(3), "links": {"next": "https://api.example.com/users?page=2", "prev": None},
}, indent=2)


def test_json_object_and_array():
    assert structured_kind(API_RESPONSE) == "json"
    assert structured_kind(json.dumps(_records(20))) == "json"
    assert structured_kind("\ufeff  " + json.dumps({"name": "Zoë", "城市": "北京", "n": -1.5e3})) == "json"


def test_json_larger_than_the_scan_bound():
    big = json.dumps(_records(3000), indent=1)
    assert len(big) > 20 * SCAN_CHARS
    assert structured_kind(big) == "json"
    # Only the head is read: garbage past the bound does not change the answer ...
    assert structured_kind(big + "\nnot json at all {{{") == "json"
    # ... and JSON past the bound does not make a prose page JSON.
    prose = "\n".join(_c4()[:40])
    assert len(prose) > SCAN_CHARS
    assert structured_kind(prose + "\n" + big) is None


def test_truncated_json_and_json_lines():
    big = json.dumps(_records(3000))
    assert structured_kind(big[: 3 * SCAN_CHARS + 17]) == "json"   # cut far beyond the window
    small = json.dumps(_records(20))
    for cut in (len(small) // 2, len(small) // 2 + 1, len(small) - 3):
        assert structured_kind(small[:cut]) == "json", cut         # cut inside the window, mid-token
    assert structured_kind("\n".join(json.dumps(r) for r in _records(30))) == "json"


def test_bracketed_prose_is_not_json():
    assert structured_kind("[Verse 1]\nI walked along the river, and the city lights were burning low.\n"
                           "[Chorus]\nOh, take me home tonight.") is None
    assert structured_kind("[1] Smith, J. and Lee, K. (2019). Structured data on the web. "
                           "Journal of Web Studies, 12(3), 45-67.") is None
    assert structured_kind("{{Infobox settlement | name = Lyon | country = France}} Lyon is a city.") is None
    assert structured_kind('{"unbalanced": [1, 2}') is None
    assert structured_kind('[2, 3, 5, 7] are the first primes, and {"a": 1} is a JSON object.') is None
    assert structured_kind("[1]") is None  # no data in it


# --- Markup ----------------------------------------------------------------------------------------

RSS = textwrap.dedent("""\
    <?xml version="1.0" encoding="UTF-8"?>
    <rss version="2.0" xmlns:atom="http://www.w3.org/2005/Atom">
      <channel>
        <title>City Council News</title>
        <link>https://council.example.org/news</link>
        <description>Announcements from the city council</description>
        <atom:link href="https://council.example.org/feed.xml" rel="self" type="application/rss+xml"/>
        <item>
          <title>Budget hearing moved to March 14</title>
          <link>https://council.example.org/news/budget-hearing</link>
          <description>The public hearing on the 2024 budget will now take place on March 14 at 6 pm in the
          main chamber. Residents may submit written comments until March 12.</description>
          <pubDate>Mon, 04 Mar 2024 09:00:00 GMT</pubDate>
          <guid isPermaLink="true">https://council.example.org/news/budget-hearing</guid>
        </item>
        <item>
          <title>Road closures for the spring marathon</title>
          <link>https://council.example.org/news/marathon</link>
          <description><![CDATA[Several streets downtown will be closed on <b>Sunday</b> morning.]]></description>
          <pubDate>Fri, 01 Mar 2024 15:30:00 GMT</pubDate>
        </item>
      </channel>
    </rss>
""")

POM = textwrap.dedent("""\
    <project xmlns="http://maven.apache.org/POM/4.0.0">
      <modelVersion>4.0.0</modelVersion>
      <groupId>org.example</groupId>
      <artifactId>demo</artifactId>
      <version>1.0.0</version>
      <dependencies>
        <dependency>
          <groupId>junit</groupId>
          <artifactId>junit</artifactId>
          <version>4.13.2</version>
          <scope>test</scope>
        </dependency>
      </dependencies>
    </project>
""")

HTML_PAGE = textwrap.dedent("""\
    <!DOCTYPE html>
    <html lang="en">
    <head>
      <meta charset="utf-8">
      <title>Riverside Bakery - Opening Hours</title>
      <link rel="stylesheet" href="/css/site.css">
      <style>body { font-family: sans-serif; } .hours td { padding: 4px 8px; }</style>
      <script>window.dataLayer = window.dataLayer || []; function gtag(){dataLayer.push(arguments);}</script>
    </head>
    <body>
      <nav><ul><li><a href="/">Home</a></li><li><a href="/menu">Menu</a></li><li><a href="/contact">Contact</a></li></ul></nav>
      <main>
        <h1>Opening hours</h1>
        <p>We bake fresh bread every morning. Come early for the best choice!</p>
        <table class="hours"><tr><td>Mon-Fri</td><td>7:00-18:00</td></tr><tr><td>Sat</td><td>8:00-14:00</td></tr></table>
      </main>
      <footer><p>&copy; 2024 Riverside Bakery</p></footer>
    </body>
    </html>
""")

HTML_FRAGMENT = textwrap.dedent("""\
    <div class="product-card" data-id="1842">
      <img src="/img/kettle.jpg" alt="Steel kettle">
      <h3 class="title">Steel kettle 1.7 l</h3>
      <span class="price">$39.90</span>
      <button class="add-to-cart" type="button">Add to cart</button>
    </div>
    <div class="product-card" data-id="1843">
      <img src="/img/toaster.jpg" alt="Toaster">
      <h3 class="title">Two-slot toaster</h3>
      <span class="price">$24.50</span>
      <button class="add-to-cart" type="button">Add to cart</button>
    </div>
""")


def test_xml_feed_and_xml_without_prolog():
    assert structured_kind(RSS) == "xml"
    assert structured_kind(POM) == "xml"


def test_html_page_and_fragment():
    assert structured_kind(HTML_PAGE) == "html"
    assert structured_kind(HTML_FRAGMENT) == "html"


def test_real_web_pages_from_the_warc_are_html():
    from warcio.archiveiterator import ArchiveIterator

    pages = []
    with (CORPUS / "dolma" / "sample-0000.warc.gz").open("rb") as handle:
        for record in ArchiveIterator(handle):
            if record.rec_type == "response":
                pages.append(record.content_stream().read().decode("utf-8", "replace"))
    assert len(pages) >= 10
    assert all(structured_kind(page) == "html" for page in pages)


def test_prose_quoting_tags_is_not_markup():
    assert structured_kind(
        "Our new menu is out. The <b>seasonal soup</b> is back, and we added two vegan desserts.\n"
        "Opening hours stay the same through the summer, and the terrace opens on the first warm day."
    ) is None
    assert structured_kind(
        "Every page starts with the <html> element, which holds a <head> and a <body>. The head "
        "carries the title and metadata that browsers and search engines read; the body holds "
        "what the visitor sees. Inside the body, paragraphs go in <p> elements and links in <a> "
        "elements with an href attribute. Keep the structure simple and indent nested elements "
        "so that the page stays readable when you come back to it months later."
    ) is None
    assert structured_kind("If a < b and b > c, nothing follows about a and c. " * 20) is None


# --- YAML ------------------------------------------------------------------------------------------

APP_CONFIG = textwrap.dedent("""\
    # Service configuration
    server:
      host: 0.0.0.0
      port: 8080
      tls:
        enabled: true
        cert_file: /etc/ssl/server.crt
    database:
      url: postgres://app@db:5432/app
      pool_size: 10
    logging:
      level: info
      handlers:
        - console
        - file
    motd: |
      Welcome to the staging server.
      Please do not run load tests here.
""")

COMPOSE = textwrap.dedent("""\
    version: "3.8"
    services:
      web:
        image: nginx:1.25-alpine
        ports:
          - "80:80"
          - "443:443"
        volumes:
          - ./nginx.conf:/etc/nginx/nginx.conf:ro
        depends_on:
          - app
      app:
        build: .
        environment:
          - DATABASE_URL=postgres://app:secret@db:5432/app
          - REDIS_URL=redis://cache:6379/0
        restart: unless-stopped
      db:
        image: postgres:16
        volumes:
          - db-data:/var/lib/postgresql/data
    volumes:
      db-data:
""")

WORKFLOW = textwrap.dedent("""\
    name: CI
    on:
      push:
        branches: [main]
    jobs:
      test:
        runs-on: ubuntu-latest
        steps:
          - uses: actions/checkout@v4
          - name: Run tests
            run: |
              pip install -e .[dev]
              pytest -x -q
""")


def test_yaml_configs():
    assert structured_kind(APP_CONFIG) == "yaml"
    assert structured_kind(COMPOSE) == "yaml"
    assert structured_kind(WORKFLOW) == "yaml"
    assert structured_kind(COMPOSE.replace("\n", "\r\n")) == "yaml"


def test_prose_with_key_value_lines_is_not_yaml():
    assert structured_kind(
        "We moved the workshop to the main hall because the registrations doubled last week.\n"
        "Note: bring your own laptop, the hall has no spare machines.\n"
        "Parking: the east lot is closed for repairs until Friday.\n"
        "Lunch is included, and there will be coffee in the afternoon break as well.\n"
        "We look forward to seeing all of you there, and thank you for your patience."
    ) is None
    # A flat spec sheet and a recipe's headings over bullet lists are YAML-shaped but read as text.
    assert structured_kind("Brand: Acme\nModel: X200\nColor: Black\nWeight: 1.2 kg\nWarranty: 2 years\n") is None
    assert structured_kind("Ingredients:\n- 2 cups flour\n- 1 cup sugar\n- 2 eggs\nSteps:\n- Mix everything\n"
                           "- Bake for 30 minutes\n") is None


MARKDOWN_ARTICLE = textwrap.dedent("""\
    # Running the app behind a reverse proxy

    Most deployments put the app behind nginx or a cloud load balancer. The app itself does not
    need to know about it, but it must trust the forwarded headers, or every request will look as
    if it came from the proxy's own address.

    Set the trusted proxies in the config file:

    ```yaml
    server:
      trusted_proxies:
        - 10.0.0.0/8
      forwarded_headers: true
      proxy_timeout: 30s
    ```

    Then restart the service and check the access log: client addresses should now show up
    instead of the proxy's. If they do not, the proxy is probably not sending the headers; see
    the nginx documentation for `proxy_set_header`.

    ```python
    print(request.remote_addr)
    ```

    That is all; the rest of the setup is unchanged.
""")


def test_markdown_article_with_short_code_blocks_is_prose():
    assert structured_kind(MARKDOWN_ARTICLE) is None


# --- Tables ----------------------------------------------------------------------------------------


def test_delimited_tables():
    csv = "date,station,temp_c,rain_mm\n" + "".join(
        f"2024-03-{d:02d},\"Lyon, St-Exupery\",{10 + d % 7}.{d % 10},{d % 4}\n" for d in range(1, 31)
    )
    assert structured_kind(csv) == "csv"
    assert structured_kind(csv.replace(",", "\t")) == "csv"
    table = "Results\n\n| Team | P | W | D | L | Pts |\n|---|---|---|---|---|---|\n" + "".join(
        f"| Team {c} | 10 | {i} | 2 | {8 - i} | {3 * i + 2} |\n" for i, c in enumerate("ABCDEFGH")
    )
    assert structured_kind(table) == "markdown_table"


def test_lines_with_a_steady_comma_count_are_not_always_tables():
    verse = ("Shall I compare thee, to a summer's day, my love?\n"
             "Thou art more lovely, and more temperate, and kind:\n"
             "Rough winds do shake, the darling buds of May,\n"
             "And summer's lease, hath all too short, a date;\n"
             "Sometime too hot, the eye of heaven shines,\n"
             "And often is, his gold complexion, dimm'd;\n")
    assert {line.count(",") for line in verse.splitlines()} == {2}
    assert structured_kind(verse) is None
    assert structured_kind("Home | About us | Services | Contact\nWelcome to our site. We build websites for "
                           "small businesses, and we have done so for twenty years.") is None


# --- Prose from the bundled corpora ----------------------------------------------------------------


def test_real_prose_is_not_structured():
    c4, zh = _c4(), _zhwiki()
    # A few by hand (an English page, a long Chinese article), then every document of both files.
    assert structured_kind(c4[0]) is None and structured_kind(c4[1]) is None
    longest = max(zh, key=len)
    assert len(longest) > 4000 and structured_kind(longest) is None
    assert [i for i, text in enumerate(c4) if structured_kind(text)] == []
    assert [i for i, text in enumerate(zh) if structured_kind(text)] == []
    # Chinese prose with ASCII colons on its lines is still prose.
    assert structured_kind("\n".join(f"注意: {line[:60]}" for line in zh[2:12])) is None


# --- Cost ------------------------------------------------------------------------------------------


def test_adversarial_inputs_stay_cheap():
    """Unclosed comments/scripts, stray "<", deep brackets, open strings: no regex rescans the head
    per occurrence, and nothing reads past the scan bound (each case is a few ms at most)."""
    cases = ["<!--" * 5000, "<script>" * 3000, "<![CDATA[" * 2000, "<a " * 6000, "a <b c " * 3000,
             "[" * 8000 + "]" * 8000, "[" * 20_000, '{"a": "' + "x\\\"" * 9000, "[" + "1," * 10_000,
             "- \n" * 9000, "a:\n  b: c\n" * 3000, '"' * 20_000 + ",,,\n", "<b>x</b>" * 3000]
    started = time.perf_counter()
    kinds = [structured_kind(text) for text in cases]
    huge = structured_kind(json.dumps(_records(200)) * 500)  # 5 MB
    assert time.perf_counter() - started < 1.0
    assert kinds[5] is None and huge == "json"  # brackets without data are not JSON


# --- The tagging step ------------------------------------------------------------------------------


def test_tagger_tags_kept_documents_and_skips_rejected_ones():
    c4 = _c4()
    docs = [
        Document(text=c4[0], id="prose"),
        Document(text=API_RESPONSE, id="json"),
        Document(text=COMPOSE, id="yaml"),
        Document(text=HTML_PAGE, id="html-rejected", metadata={"lang": "en"}),
        Document(text=RSS, id="xml"),
    ]
    reject(docs[3], "language", "language_fr")
    before = dict(docs[3].metadata)
    step = StructuredTagger()
    out = list(step.run(iter(docs)))
    assert [doc.id for doc in out] == [doc.id for doc in docs]  # nothing dropped, order kept
    assert [doc.metadata.get("structured", "absent") for doc in out] == [None, "json", "yaml", "absent", "xml"]
    # Structured documents go the code path (no prose language id or rules); prose and rejects keep theirs.
    assert [doc.metadata.get("lang") for doc in out] == [None, "code", "code", "en", "code"]
    assert out[3].metadata == before and REJECT in out[3].metadata
    assert not any(REJECT in doc.metadata for i, doc in enumerate(out) if i != 3)  # never rejects
    assert {label: step.stats[label].total for label in ("prose", "json", "yaml", "xml")} == {
        "prose": 1, "json": 1, "yaml": 1, "xml": 1}
    assert step.stats["html"].total == 0
    assert step.name == "structured_text"


# --- The cap ---------------------------------------------------------------------------------------


def test_keep_probability():
    assert keep_probability(10, 1000, 0.1) == 1.0                 # 1% structured: under the cap
    assert keep_probability(0, 1000, 0.0) == 1.0                  # nothing to cap
    assert keep_probability(500, 500, 0.0) == 0.0                 # share 0 drops them all
    assert keep_probability(500, 0, 0.2) == 0.0                   # no prose: any kept one is over
    assert keep_probability(100, 900, 0.1) == pytest.approx(1.0)  # exactly at the cap
    p = keep_probability(400, 600, 0.1)                           # 40% structured, cap 10%
    assert p * 400 / (p * 400 + 600) == pytest.approx(0.1)
    assert p == pytest.approx(600 * 0.1 / (0.9 * 400))
    for bad in (-0.1, 1.0, 1.5):
        with pytest.raises(ValueError):
            keep_probability(1, 1, bad)
    with pytest.raises(ValueError):
        keep_probability(-1, 1, 0.1)


def test_share_draws_are_deterministic_order_independent_and_uniform():
    ids = [f"crawl-2024-10/part-{i // 1000:05d}.jsonl.gz:{i}" for i in range(20_000)]
    draws = share_draws(ids)
    assert draws.dtype == np.float64 and draws.shape == (len(ids),) and ((0 <= draws) & (draws < 1)).all()
    for probability in (0.05, 0.3, 0.75):
        assert abs((draws < probability).mean() - probability) < 0.02
    assert np.array_equal(draws, share_draws(ids))                                    # a rerun decides the same
    order = np.random.default_rng(0).permutation(len(ids))
    assert np.array_equal(share_draws([ids[i] for i in order]), draws[order])          # order does not matter
    assert np.array_equal(np.concatenate([share_draws(ids[:7000]), share_draws(ids[7000:])]), draws)  # nor the worker
    other = share_draws(ids, seed=1)
    assert abs((other < 0.3).mean() - 0.3) < 0.02 and not np.array_equal(other, draws)
    assert share_draws([]).shape == (0,)


def test_cap_end_to_end_keeps_the_configured_share():
    """Tag, count, turn the counts into a probability, and keep by id: the share lands on target."""
    c4 = _c4()
    structured = [API_RESPONSE, COMPOSE, RSS, HTML_PAGE]
    docs = [Document(text=structured[i % 4] if i % 2 else c4[i % len(c4)], id=f"doc-{i}") for i in range(8000)]
    step = StructuredTagger()
    docs = list(step.run(docs))
    counts = {kind: step.stats[kind].total for kind in ("json", "yaml", "xml", "html", "prose")}
    n_structured = sum(v for k, v in counts.items() if k != "prose")
    assert n_structured == 4000 and counts["prose"] == 4000
    p = keep_probability(n_structured, counts["prose"], max_share=0.2)
    flagged = [doc for doc in docs if doc.metadata["structured"]]
    kept = share_draws([doc.id for doc in flagged]) < p
    share = kept.sum() / (kept.sum() + counts["prose"])
    assert abs(share - 0.2) < 0.02
