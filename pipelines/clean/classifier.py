"""SkyPile's quality classifier, one model per language, each with an absolute score threshold.

Each model is a logistic regression over hashed n-grams, so Chinese and English need no tokenizer,
trained on positives and negatives *of its own language*: a model that sees Chinese positives
against English negatives learns language, not quality. Which n-grams (:data:`FEATURE_SETS`) is
chosen per language by cross-validation on the training split: short character n-grams suit
Chinese, where a character is nearly a word; English separates better on longer character
n-grams and word pairs, which carry its phrasing (boilerplate, sales copy). A stratified share of the examples is held out; the threshold is calibrated there (the
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
# name -> the hashed n-gram vectorizers whose features are concatenated (analyzer, n-gram range)
FEATURE_SETS: dict[str, tuple[tuple[str, tuple[int, int]], ...]] = {
    "char1-3": (("char_wb", (1, 3)),),
    "char2-5": (("char", (2, 5)),),
    "char2-5+word1-2": (("char", (2, 5)), ("word", (1, 2))),
}
SELECTION_FOLDS = 5
# A richer feature set replaces the first (smallest) one only when it wins by this much mean fold AUC:
# smaller gaps are within fold-to-fold noise on a few hundred examples, and the small set is then kept.
SELECTION_MARGIN = 0.01
MIN_EXAMPLES = 10  # per class: fewer leaves nothing to hold out and calibrate on
LANGUAGE_CHECK_DOCS = 50  # examples per file whose language is checked (lingua: a few ms each)
MIN_LANGUAGE_SHARE = 0.5  # of them, at least this share must be in the model's language


class ClassifierError(ValueError):
    """Example files or a stored model that cannot make a quality model; raised before any shard is read."""


def featurize(texts: list[str], feature_set: str, n_features: int):
    """Sparse features of the texts' first MAX_CHARS characters: each vectorizer of the set, L2-normed, side by side."""
    from scipy.sparse import hstack
    from sklearn.feature_extraction.text import HashingVectorizer

    texts = [t[:MAX_CHARS] for t in texts]
    blocks = [HashingVectorizer(analyzer=analyzer, ngram_range=ngrams, n_features=n_features, alternate_sign=False,
                                norm="l2", lowercase=True).transform(texts)
              for analyzer, ngrams in FEATURE_SETS[feature_set]]
    return hstack(blocks, format="csr") if len(blocks) > 1 else blocks[0]


def _logistic_regression():
    from sklearn.linear_model import LogisticRegression

    return LogisticRegression(C=4.0, max_iter=2000, class_weight="balanced")


def select_features(texts: list[str], labels: np.ndarray, n_features: int, seed: int) -> tuple[str, dict[str, float]]:
    """The feature set with the best mean ROC AUC over stratified folds of the training texts (the first
    set unless another beats it by SELECTION_MARGIN), and every candidate's AUC for the manifest."""
    from sklearn.model_selection import StratifiedKFold, cross_val_score

    folds = StratifiedKFold(min(SELECTION_FOLDS, int(np.bincount(labels).min())), shuffle=True, random_state=seed)
    aucs = {name: round(float(cross_val_score(_logistic_regression(), featurize(texts, name, n_features), labels,
                                              cv=folds, scoring="roc_auc").mean()), 4)
            for name in FEATURE_SETS}
    default = next(iter(FEATURE_SETS))
    best = max(aucs, key=aucs.get)
    return (best if aucs[best] >= aucs[default] + SELECTION_MARGIN else default), aucs


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
    feature_set: str
    n_features: int
    metrics: dict

    def score(self, texts: list[str]) -> np.ndarray:
        logits = featurize(texts, self.feature_set, self.n_features) @ self.weights + self.bias
        return 1.0 / (1.0 + np.exp(-logits))

    def save(self, storage: Storage, folder: str) -> dict[str, str]:
        """Writes the two files; returns their checksums by name (for the done-record)."""
        buffer = io.BytesIO()
        np.savez(buffer, weights=self.weights, bias=np.float64(self.bias))  # float64: loading changes no score
        meta = {"kind": "hashed-ngram-logreg", "lang": self.lang, "threshold": self.threshold,
                "feature_set": self.feature_set, "vectorizers": FEATURE_SETS[self.feature_set],
                "n_features": self.n_features, "max_chars": MAX_CHARS, "metrics": self.metrics}
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
        if meta.get("feature_set") not in FEATURE_SETS:
            raise ClassifierError(f"quality model {folder}/{lang}.json was written by an older skymoe (no known "
                                  "feature_set); delete the classifier folder and its done-record to retrain it")
        return cls(lang, arrays["weights"].astype(np.float64), float(arrays["bias"]), float(meta["threshold"]),
                   meta["feature_set"], int(meta["n_features"]), meta["metrics"])


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
    """Choose the features and fit on the examples minus the held-out share; calibrate the threshold and
    measure on that share, which neither the choice nor the fit has seen."""
    from sklearn.metrics import roc_auc_score

    positives = [t for uri in examples.positive for t in read_examples(storage, uri)]
    negatives = [t for uri in examples.negative for t in read_examples(storage, uri)]
    _check_examples(lang, "positive", examples.positive, positives)
    _check_examples(lang, "negative", examples.negative, negatives)
    shared = set(positives) & set(negatives)
    if len(shared) > 0.5 * min(len(positives), len(negatives)):
        raise ClassifierError(f"classifier.languages.{lang}: {len(shared)} documents are both positive and "
                              "negative; the two sides must be different pages")
    texts = positives + negatives
    labels = np.array([1] * len(positives) + [0] * len(negatives))
    held_out = _held_out_mask(labels, config.held_out, config.seed)
    training = [text for text, out in zip(texts, held_out) if not out]
    if config.features == "auto":
        feature_set, selection = select_features(training, labels[~held_out], config.n_features, config.seed)
    else:
        feature_set, selection = config.features, {}
    features = featurize(texts, feature_set, config.n_features)
    model = _logistic_regression()
    model.fit(features[~held_out], labels[~held_out])
    scores = model.predict_proba(features[held_out])[:, 1]
    truth = labels[held_out]
    calibrated = calibrated_threshold(scores[truth == 1], config.target_recall)
    threshold = examples.threshold if examples.threshold is not None else calibrated
    metrics = {
        "positive_docs": len(positives), "negative_docs": len(negatives), "held_out_docs": int(held_out.sum()),
        "held_out_auc": round(float(roc_auc_score(truth, scores)), 4),
        "feature_set": feature_set, "feature_selection_cv_auc": selection,
        "threshold_source": "config" if examples.threshold is not None else f"held-out recall {config.target_recall}",
        "held_out_positive_kept": round(float((scores[truth == 1] >= threshold).mean()), 4),
        "held_out_negative_kept": round(float((scores[truth == 0] >= threshold).mean()), 4),
    }
    return QualityModel(lang, model.coef_[0].astype(np.float64), float(model.intercept_[0]), round(threshold, 6),
                        feature_set, config.n_features, metrics)


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
