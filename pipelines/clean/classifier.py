"""SkyPile's quality classifier: how likely a page is to be Wikipedia-like (reference quality).

A logistic regression over hashed character n-grams (1-3, within word boundaries), so Chinese and
English need no tokenizer. It is trained offline from positive and negative example files and
saved as a stage artifact: the weights as ``.npz`` and the feature settings as JSON (no pickles),
enough to rebuild the scorer anywhere. Scores are bucketed per language later, from the corpus's
own score distribution (as CCNet buckets head / middle / tail per language).
"""

from __future__ import annotations

import json
import io
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import numpy as np
from datatrove.data import Document
from datatrove.pipeline.base import PipelineStep

from skymoe.pipelines.clean.steps import is_rejected
from skymoe.config import ClassifierConfig
from skymoe.storage import Storage

MAX_CHARS = 4000
NGRAM_RANGE = (1, 3)


def _vectorizer(n_features: int):
    from sklearn.feature_extraction.text import HashingVectorizer

    return HashingVectorizer(analyzer="char_wb", ngram_range=NGRAM_RANGE, n_features=n_features,
                             alternate_sign=False, norm="l2", lowercase=True)


def read_examples(storage: Storage, uri: str) -> list[str]:
    """Texts of an example file: JSONL with a ``text`` field, or plain text one per line."""
    raw = storage.read_bytes(uri)
    if uri.endswith(".gz"):
        import gzip

        raw = gzip.decompress(raw)
    texts = []
    is_jsonl = uri.endswith((".jsonl", ".jsonl.gz", ".json"))
    for number, line in enumerate(raw.decode("utf-8").splitlines()):
        if not line.strip():
            continue
        if is_jsonl:
            try:
                text = json.loads(line).get("text")
            except (json.JSONDecodeError, AttributeError):
                raise ValueError(f"{uri}: line {number + 1} is not a JSON object with a text field") from None
            if isinstance(text, str) and text.strip():
                texts.append(text)
        else:
            texts.append(line)
    return texts


@dataclass(frozen=True)
class QualityModel:
    weights: np.ndarray
    bias: float
    n_features: int
    metrics: dict

    def score(self, texts: list[str]) -> np.ndarray:
        features = _vectorizer(self.n_features).transform([t[:MAX_CHARS] for t in texts])
        logits = features @ self.weights + self.bias
        return 1.0 / (1.0 + np.exp(-logits))

    def save(self, storage: Storage, uri_prefix: str) -> list[str]:
        buffer = io.BytesIO()
        np.savez(buffer, weights=self.weights, bias=np.float64(self.bias))  # float64: loading changes no score
        storage.write_bytes(f"{uri_prefix}.npz", buffer.getvalue())
        meta = {"kind": "hashed-char-ngram-logreg", "n_features": self.n_features, "ngram_range": NGRAM_RANGE,
                "analyzer": "char_wb", "max_chars": MAX_CHARS, "metrics": self.metrics}
        storage.write_text(f"{uri_prefix}.json", json.dumps(meta, indent=2))
        return [f"{uri_prefix}.npz", f"{uri_prefix}.json"]

    @classmethod
    def load(cls, storage: Storage, uri_prefix: str) -> "QualityModel":
        meta = json.loads(storage.read_text(f"{uri_prefix}.json"))
        arrays = np.load(io.BytesIO(storage.read_bytes(f"{uri_prefix}.npz")))
        return cls(arrays["weights"].astype(np.float64), float(arrays["bias"]), int(meta["n_features"]),
                   meta["metrics"])


def train_quality_model(storage: Storage, config: ClassifierConfig) -> QualityModel:
    """Fit on all examples; report held-out accuracy from a deterministic 80/20 split."""
    from sklearn.linear_model import LogisticRegression

    positives = [t for uri in config.positive for t in read_examples(storage, uri)]
    negatives = [t for uri in config.negative for t in read_examples(storage, uri)]
    if not positives or not negatives:
        raise ValueError("quality classifier: positive and negative example files must hold documents "
                         f"(got {len(positives)} positive, {len(negatives)} negative)")
    texts = [t[:MAX_CHARS] for t in positives + negatives]
    labels = np.array([1] * len(positives) + [0] * len(negatives))
    features = _vectorizer(config.n_features).transform(texts)
    def fit(mask: np.ndarray) -> LogisticRegression:
        return LogisticRegression(C=4.0, max_iter=2000, class_weight="balanced").fit(features[mask], labels[mask])

    # A stratified 80/20 probe: each class keeps at least one example on both sides (when it has two).
    rng = np.random.default_rng(config.seed)
    held_out = np.zeros(len(texts), dtype=bool)
    for label in (0, 1):
        members = np.flatnonzero(labels == label)
        if len(members) >= 2:
            count = min(max(1, round(0.2 * len(members))), len(members) - 1)
            held_out[rng.choice(members, size=count, replace=False)] = True
    recall: dict[str, float | None] = {"positive": None, "negative": None}
    if held_out.any() and len(set(labels[~held_out])) == 2:
        predicted, truth = fit(~held_out).predict(features[held_out]), labels[held_out]
        # Per-class recall: plain accuracy says little when one class dominates the seed.
        recall = {name: float((predicted[truth == label] == label).mean()) if (truth == label).any() else None
                  for name, label in (("positive", 1), ("negative", 0))}
    model = fit(np.ones(len(texts), dtype=bool))
    metrics = {"positive_docs": len(positives), "negative_docs": len(negatives),
               "held_out_recall": recall,
               "held_out_balanced_accuracy": None if None in recall.values() else sum(recall.values()) / 2}
    return QualityModel(model.coef_[0].astype(np.float64), float(model.intercept_[0]), config.n_features, metrics)


class QualityScorer(PipelineStep):
    """Attaches ``quality_score`` to every kept document, in batches (vectorizing is per batch)."""

    type = "⭐ skymoe"
    name = "quality_classifier"

    def __init__(self, model: QualityModel, batch_size: int = 256):
        super().__init__()
        self.model = model
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
        kept = [doc for doc in batch if not is_rejected(doc)]
        if kept:
            with self.track_time():
                scores = self.model.score([doc.text for doc in kept])
            for doc, score in zip(kept, scores):
                doc.metadata["quality_score"] = round(float(score), 6)
        yield from batch
