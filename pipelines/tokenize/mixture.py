"""Mixture weights -> how many times each domain's training sequences are used per epoch.

A domain is a language and a source ("zh/zhwiki"). Weights are given per language ("zh") or per
domain ("zh/zhwiki"); a language's weight is shared by its domains that have no weight of their
own, in proportion to their tokens. A domain with weight w should make up w / sum(w) of the
training tokens: its repeat factor is that target share of the corpus's tokens divided by the
tokens it has (above 1 upsamples, below 1 subsamples). Upsampling is capped (the report repeats a
source at most 5 times), so a scarce domain may stay under its target; the realised tokens say so.
"""

from __future__ import annotations


class MixtureError(ValueError):
    """The weights do not cover the data (a domain present but unweighted)."""


def repeat_factors(tokens_by_domain: dict[str, int], weights: dict[str, float],
                   max_repeats: float) -> dict[str, dict[str, float]]:
    """Per domain: tokens, repeat factor and realised tokens.

    Empty ``weights`` keep natural proportions (factor 1). Weights naming nothing in the data are
    ignored; data that no weight covers is an error rather than silently dropped.
    """
    if not weights:
        return {d: {"tokens": t, "repeat": 1.0, "realised_tokens": t} for d, t in sorted(tokens_by_domain.items())}
    shared: dict[str, list[str]] = {}  # language -> its domains without a weight of their own
    for domain in tokens_by_domain:
        if domain not in weights:
            shared.setdefault(domain.split("/", 1)[0], []).append(domain)
    uncovered = sorted(d for lang, domains in shared.items() if lang not in weights for d in domains)
    if uncovered:
        raise MixtureError(f"tokenize.mixture.weights covers neither the language nor the domain of {uncovered}")
    domain_weight = {d: weights[d] for d in tokens_by_domain if d in weights}
    for lang, domains in shared.items():
        lang_tokens = sum(tokens_by_domain[d] for d in domains)
        for d in domains:
            domain_weight[d] = weights[lang] * tokens_by_domain[d] / lang_tokens if lang_tokens else 0.0
    total_weight = sum(domain_weight.values())
    total_tokens = sum(tokens_by_domain.values())
    plan = {}
    for domain, tokens in sorted(tokens_by_domain.items()):
        factor = min(domain_weight[domain] / total_weight * total_tokens / tokens, max_repeats) if tokens else 0.0
        plan[domain] = {"tokens": tokens, "repeat": round(factor, 6), "realised_tokens": round(factor * tokens)}
    return plan
