"""Offline language identification (lingua's bundled models; nothing is downloaded).

The detector knows the kept languages plus the languages most common on the web, so that a
French page is called French rather than a low-confidence "English". A document is kept when its
best language is one of the configured ones with at least the configured confidence.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

from datatrove.data import Document
from datatrove.pipeline.base import PipelineStep

from skymoe.pipelines.clean.steps import is_rejected, reject
from skymoe.config import LanguageConfig

_WEB_LANGUAGES = ("ENGLISH", "CHINESE", "JAPANESE", "KOREAN", "FRENCH", "GERMAN", "SPANISH", "RUSSIAN",
                  "PORTUGUESE", "ITALIAN", "ARABIC", "VIETNAMESE", "INDONESIAN", "DUTCH", "TURKISH", "POLISH")
_ISO = {"ENGLISH": "en", "CHINESE": "zh"}


_detector = None  # per process, built on first use: the Rust object neither pickles nor loads for free


def detect_language(text: str, max_chars: int = 2000) -> tuple[str, float]:
    """The best language of ``text`` (ISO code) and lingua's confidence in it."""
    global _detector
    if _detector is None:
        from lingua import Language, LanguageDetectorBuilder

        _detector = LanguageDetectorBuilder.from_languages(*(getattr(Language, name) for name in _WEB_LANGUAGES)).build()
    values = _detector.compute_language_confidence_values(text[:max_chars])
    # Ties (e.g. text with no letters) come back in arbitrary order: break them by name.
    best = min(values, key=lambda v: (-v.value, v.language.name))
    if best.value <= 0.0:
        return "unknown", 0.0  # no letters to go by (numbers, symbols)
    name = best.language.name
    return _ISO.get(name, best.language.iso_code_639_1.name.lower()), float(best.value)


class LanguageId(PipelineStep):
    type = "🌐 skymoe"
    name = "language"

    def __init__(self, config: LanguageConfig):
        super().__init__()
        self.config = config

    def run(self, data: Iterable[Document], rank: int = 0, world_size: int = 1) -> Iterator[Document]:
        keep = set(self.config.keep)
        for doc in data:
            if is_rejected(doc) or doc.metadata.get("lang") == "code":
                yield doc
                continue
            with self.track_time():
                lang, score = detect_language(doc.text, self.config.max_chars)
            doc.metadata["lang"] = lang
            doc.metadata["lang_score"] = round(score, 4)
            if lang not in keep:
                reject(doc, self.name, f"language_{lang}")
            elif score < self.config.min_confidence:
                reject(doc, self.name, "low_confidence")
            self.stat_update("kept" if not is_rejected(doc) else "dropped")
            yield doc
