"""The gate output distribution of a trained MoE (the report's Figure 2), from its final weights.

Training logs only per-step means of the gate ratios; the shape of the distribution - is the top
gate value sharp or close to 1/k - needs the gate probabilities themselves. They are recomputed
here on validation tokens with the plain local model (no DeepSpeed: one process, eval routing).
"""

from __future__ import annotations

import numpy as np
import torch

from skymoe.training.data import TokenReader, TokenReaderError
from skymoe.storage import Storage
from skymoe.training.model import Transformer
from skymoe.training.weights import load_args, load_state

BINS = 25  # histogram bins of the top-1 gate probability over [0, 1]
SEQUENCES = 16  # validation sequences the distribution is measured on


@torch.no_grad()
def gate_profile(storage: Storage, weights_uri: str, tokens_uri: str, sequences: int = SEQUENCES,
                 batch: int = 4) -> list[dict[str, list[float]]]:
    """Per MoE layer: the histogram (densities over ``BINS`` bins of [0, 1]) of each token's top-1
    gate probability, and the mean gate distribution sorted from the largest to the smallest value."""
    model = Transformer(load_args(storage, weights_uri))
    model.load_state_dict(load_state(storage, weights_uri))
    model.eval()
    reader = _reader(storage, tokens_uri)
    ids = torch.from_numpy(np.stack([reader.sequence(i % reader.num_sequences)
                                     for i in range(sequences)]).astype(np.int64))
    probs: list[list[torch.Tensor]] = [[] for _ in model.moe_layers()]
    for start in range(0, sequences, batch):
        model(ids[start:start + batch, :-1])
        for layer, moe in enumerate(model.moe_layers()):
            probs[layer].append(moe.last_routing.probs)
    profile = []
    for chunks in probs:
        gate = torch.cat(chunks)
        ranked = gate.sort(dim=-1, descending=True).values
        hist, _ = np.histogram(ranked[:, 0].numpy(), bins=BINS, range=(0.0, 1.0), density=True)
        profile.append({"top1_hist": hist.tolist(), "sorted_mean": ranked.mean(0).tolist()})
    return profile


def _reader(storage: Storage, tokens_uri: str) -> TokenReader:
    """Validation tokens; the training split only when the corpus held none out (tiny test corpora)."""
    try:
        return TokenReader(storage, tokens_uri, "validation")
    except TokenReaderError:
        return TokenReader(storage, tokens_uri, "train")
