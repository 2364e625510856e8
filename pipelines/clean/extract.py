"""Structural extraction: the main content of a web page, without navigation and boilerplate.

SkyPile keeps contiguous passages and drops navigation bars, contact blocks and title fragments;
trafilatura's main-content extraction does that offline and is what datatrove uses for WARC.
"""

from __future__ import annotations


def extract_main_text(html: bytes) -> str:
    import trafilatura

    text = trafilatura.extract(
        html, include_comments=False, include_tables=False, favor_precision=True, deduplicate=False
    )
    return text or ""
