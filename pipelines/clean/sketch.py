"""A mergeable quantile sketch: quality-bucket thresholds without a corpus-sized score array.

Each shard summarizes its scores per language; the summaries merge in any order, and the merged
one answers quantiles. A sketch holds at most ``capacity`` (value, weight) points. Below that it
holds every score with weight 1 and answers exactly what ``numpy.quantile`` answers on all scores
(the demo corpus and any run of fewer than ``capacity`` documents per language). Above it, sorted
points are folded into ``capacity`` groups of equal weight, each kept as its weighted mean: the
rank of a quantile is then off by at most about ``total / capacity`` per fold, i.e. a threshold
moves by a fraction of a percentile.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

CAPACITY = 8192


@dataclass(frozen=True)
class QuantileSketch:
    values: np.ndarray  # float64, sorted
    weights: np.ndarray  # float64, same length

    @classmethod
    def of(cls, scores: np.ndarray, capacity: int = CAPACITY) -> "QuantileSketch":
        values = np.sort(np.asarray(scores, dtype=np.float64))
        return cls(values, np.ones(len(values)))._folded(capacity)

    @property
    def exact(self) -> bool:
        return bool(np.all(self.weights == 1.0))

    def merge(self, other: "QuantileSketch", capacity: int = CAPACITY) -> "QuantileSketch":
        values = np.concatenate([self.values, other.values])
        weights = np.concatenate([self.weights, other.weights])
        order = np.argsort(values, kind="stable")
        return QuantileSketch(values[order], weights[order])._folded(capacity)

    def quantile(self, q: float) -> float:
        """``numpy.quantile(scores, q)`` (linear interpolation) while exact; the weighted analogue after."""
        if not len(self.values):
            raise ValueError("quantile of an empty sketch")
        if self.exact:
            return float(np.quantile(self.values, q))
        # Each point stands at the middle of the ranks it represents; interpolate between them.
        cumulative = np.cumsum(self.weights)
        centers = (cumulative - self.weights / 2) / cumulative[-1]
        return float(np.interp(q, centers, self.values))

    def _folded(self, capacity: int) -> "QuantileSketch":
        if len(self.values) <= capacity:
            return self
        cumulative = np.cumsum(self.weights)
        # Group g takes the points whose cumulative weight falls in the g-th equal slice of the total.
        group = np.minimum((cumulative - self.weights / 2) * capacity // cumulative[-1], capacity - 1).astype(np.int64)
        weights = np.bincount(group, weights=self.weights, minlength=capacity)
        sums = np.bincount(group, weights=self.values * self.weights, minlength=capacity)
        used = weights > 0
        return QuantileSketch(sums[used] / weights[used], weights[used])
