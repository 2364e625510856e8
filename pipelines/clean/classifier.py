"""SkyPile's quality classifier, one model per language, each with an absolute score threshold.

Each model is a logistic regression over hashed character n-grams (1-3, within word boundaries),
so Chinese and English need no tokenizer, trained on positives and negatives *of its own
language*: a model that sees Chinese positives against English negatives learns language, not
quality. A stratified share of the examples is held out; the threshold is calibrated there (the
highest score that still keeps ``target_recall`` of the held-out positives) and the model's ROC AUC
measured there, so the threshold means the same on every corpus instead of cutting a fixed share.

A model is a stage artifact, ``classifier/<lang>.npz`` (weights) + ``<lang>.json`` (features,
threshold, metrics): no pickles, checked against the checksums recorded when it was written.
"""

from __future__ import annotations

import gzip
import io
import json
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import numpy as np
from datatrove.data import Document
from datatrove.pipeline.base import PipelineStep

from skymoe.pipelines.clean.steps import is_rejected, reject
from skymoe.config import ClassifierConfig, QualityExamples
from skymoe.storage import Storage

MAX_CHARS = 4000
NGRAM_RANGE = (1, 3)
MIN_EXAMPLES = 10  # per class: fewer leaves nothing to hold out and calibrate on
LANGUAGE_CHECK_DOCS = 50  # examples per file whose language is checked (lingua: a few ms each)
MIN_LANGUAGE_SHARE = 0.5  # of them, at least this share must be in the model's language


class ClassifierError(ValueError):
    """Example files or a stored model that cannot make a quality model; raised before any shard is read."""


def _vectorizer(n_features: int):
    from sklearn.feature_extraction.text import HashingVectorizer

    return HashingVectorizer(analyzer="char_wb", ngram_range=NGRAM_RANGE, n_features=n_features,
                             alternate_sign=False, norm="l2", lowercase=True)


def read_examples(storage: Storage, uri: str) -> list[str]:
    """Texts of an example file: JSONL with a ``text`` field, or plain text one per line."""
    if not storage.exists(uri):
        raise ClassifierError(f"example file not found: {uri}")
    raw = storage.read_bytes(uri)
    if uri.endswith(".gz"):
        raw = gzip.decompress(raw)
    texts = []
    is_jsonl = uri.endswith((".jsonl", ".jsonl.gz", ".json"))
    for number, line in enumerate(raw.decode("utf-8", errors="replace").splitlines()):
        if not line.strip():
            continue
        if is_jsonl:
            try:
                text = json.loads(line).get("text")
            except (json.JSONDecodeError, AttributeError):
                raise ClassifierError(f"{uri}: line {number + 1} is not a JSON object with a text field") from None
            if isinstance(text, str) and text.strip():
                texts.append(text)
        else:
            texts.append(line)
    return texts


@dataclass(frozen=True)
class QualityModel:
    """One language's scorer and the threshold its documents must reach."""

    lang: str
    weights: np.ndarray
    bias: float
    threshold: float
    n_features: int
    metrics: dict

    def score(self, texts: list[str]) -> np.ndarray:
        features = _vectorizer(self.n_features).transform([t[:MAX_CHARS] for t in texts])
        logits = features @ self.weights + self.bias
        return 1.0 / (1.0 + np.exp(-logits))

    def save(self, storage: Storage, folder: str) -> dict[str, str]:
        """Writes the two files; returns their checksums by name (for the done-record)."""
        buffer = io.BytesIO()
        np.savez(buffer, weights=self.weights, bias=np.float64(self.bias))  # float64: loading changes no score
        meta = {"kind": "hashed-char-ngram-logreg", "lang": self.lang, "threshold": self.threshold,
                "n_features": self.n_features, "ngram_range": NGRAM_RANGE, "analyzer": "char_wb",
                "max_chars": MAX_CHARS, "metrics": self.metrics}
        files = {f"{self.lang}.npz": buffer.getvalue(), f"{self.lang}.json": json.dumps(meta, indent=2).encode()}
        for name, data in files.items():
            storage.write_bytes(f"{folder}/{name}", data)
        return {name: storage.checksum(f"{folder}/{name}") for name in files}

    @classmethod
    def load(cls, storage: Storage, folder: str, lang: str, checksums: dict[str, str]) -> "QualityModel":
        """The model as saved, or a :class:`ClassifierError` naming the file that is missing or changed."""
        for name, expected in checksums.items():
            uri = f"{folder}/{name}"
            if not storage.exists(uri):
                raise ClassifierError(f"quality model file missing: {uri}; delete {folder} and its done-record "
                                      "folder (_done/classifier) to retrain it")
            if storage.checksum(uri) != expected:
                raise ClassifierError(f"quality model file changed since it was written: {uri}")
        meta = json.loads(storage.read_text(f"{folder}/{lang}.json"))
        arrays = np.load(io.BytesIO(storage.read_bytes(f"{folder}/{lang}.npz")), allow_pickle=False)
        return cls(lang, arrays["weights"].astype(np.float64), float(arrays["bias"]), float(meta["threshold"]),
                   int(meta["n_features"]), meta["metrics"])


def _check_examples(lang: str, side: str, uris: list[str], texts: list[str]) -> None:
    if len(texts) < MIN_EXAMPLES:
        raise ClassifierError(f"classifier.languages.{lang}.{side}: {len(texts)} documents in {uris}; "
                              f"at least {MIN_EXAMPLES} are needed")
    if lang == "code":
        return
    from skymoe.pipelines.clean.langid import detect_language

    sample = texts[:: max(1, len(texts) // LANGUAGE_CHECK_DOCS)][:LANGUAGE_CHECK_DOCS]
    share = sum(detect_language(text)[0] == lang for text in sample) / len(sample)
    if share < MIN_LANGUAGE_SHARE:
        raise ClassifierError(f"classifier.languages.{lang}.{side}: only {share:.0%} of the documents in {uris} "
                              f"are in {lang!r}; a model must learn quality within one language")


def _held_out_mask(labels: np.ndarray, share: float, seed: int) -> np.ndarray:
    """A stratified held-out share: each class keeps at least one example on both sides."""
    rng = np.random.default_rng(seed)
    held_out = np.zeros(len(labels), dtype=bool)
    for label in (0, 1):
        members = np.flatnonzero(labels == label)
        count = min(max(1, round(share * len(members))), len(members) - 1)
        held_out[rng.choice(members, size=count, replace=False)] = True
    return held_out


def calibrated_threshold(positive_scores: np.ndarray, target_recall: float) -> float:
    """The highest threshold that keeps at least ``target_recall`` of the positives (score >= it)."""
    ranked = np.sort(positive_scores)[::-1]
    keep = max(1, int(np.ceil(target_recall * len(ranked))))
    return float(ranked[keep - 1])


def train_quality_model(storage: Storage, lang: str, examples: QualityExamples,
                        config: ClassifierConfig) -> QualityModel:
    """Fit on the examples minus the held-out share; calibrate the threshold and measure on that share."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import roc_auc_score

    positives = [t for uri in examples.positive for t in read_examples(storage, uri)]
    negatives = [t for uri in examples.negative for t in read_examples(storage, uri)]
    _check_examples(lang, "positive", examples.positive, positives)
    _check_examples(lang, "negative", examples.negative, negatives)
    shared = set(positives) & set(negatives)
    if len(shared) > 0.5 * min(len(positives), len(negatives)):
        raise ClassifierError(f"classifier.languages.{lang}: {len(shared)} documents are both positive and "
                              "negative; the two sides must be different pages")
    texts = [t[:MAX_CHARS] for t in positives + negatives]
    labels = np.array([1] * len(positives) + [0] * len(negatives))
    features = _vectorizer(config.n_features).transform(texts)
    held_out = _held_out_mask(labels, config.held_out, config.seed)
    model = LogisticRegression(C=4.0, max_iter=2000, class_weight="balanced")
    model.fit(features[~held_out], labels[~held_out])
    scores = model.predict_proba(features[held_out])[:, 1]
    truth = labels[held_out]
    calibrated = calibrated_threshold(scores[truth == 1], config.target_recall)
    threshold = examples.threshold if examples.threshold is not None else calibrated
    metrics = {
        "positive_docs": len(positives), "negative_docs": len(negatives), "held_out_docs": int(held_out.sum()),
        "held_out_auc": round(float(roc_auc_score(truth, scores)), 4),
        "threshold_source": "config" if examples.threshold is not None else f"held-out recall {config.target_recall}",
        "held_out_positive_kept": round(float((scores[truth == 1] >= threshold).mean()), 4),
        "held_out_negative_kept": round(float((scores[truth == 0] >= threshold).mean()), 4),
    }
    return QualityModel(lang, model.coef_[0].astype(np.float64), float(model.intercept_[0]), round(threshold, 6),
                        config.n_features, metrics)


class QualityScorer(PipelineStep):
    """Scores every kept document of a language with a model and rejects those below its threshold.

    Scoring is per batch (vectorizing is) and per language; documents of other languages pass unscored.
    """

    type = "⭐ skymoe"
    name = "quality_classifier"

    def __init__(self, models: dict[str, QualityModel], batch_size: int = 256):
        super().__init__()
        self.models = models
        self.batch_size = batch_size

    def run(self, data: Iterable[Document], rank: int = 0, world_size: int = 1) -> Iterator[Document]:
        batch: list[Document] = []
        for doc in data:
            batch.append(doc)
            if len(batch) >= self.batch_size:
                yield from self._score(batch)
                batch = []
        yield from self._score(batch)

    def _score(self, batch: list[Document]) -> Iterator[Document]:
        for lang, model in self.models.items():
            docs = [doc for doc in batch if not is_rejected(doc) and doc.metadata.get("lang") == lang]
            if not docs:
                continue
            with self.track_time():
                scores = model.score([doc.text for doc in docs])
            for doc, score in zip(docs, scores):
                doc.metadata["quality_score"] = round(float(score), 6)
                if score < model.threshold:
                    reject(doc, self.name, f"below_threshold:{score:.4f}<{model.threshold:.4f}")
                    self.stat_update(f"dropped_{lang}")
                else:
                    self.stat_update(f"kept_{lang}")
        yield from batch
