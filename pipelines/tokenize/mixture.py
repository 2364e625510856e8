"""Mixture weights -> how many times each language's training sequences are used per epoch.

A language with weight w should make up w / sum(w) of the training tokens. Its repeat factor is
that target share of the corpus's total tokens divided by the tokens it has: above 1 means
upsampling, below 1 subsampling. Upsampling is capped (the report repeats a source at most 5
times), so a scarce language may stay under its target; the realised tokens say so.
"""

from __future__ import annotations


class MixtureError(ValueError):
    """The weights do not cover the data (a language present but unweighted)."""


def repeat_factors(tokens_by_domain: dict[str, int], weights: dict[str, float],
                   max_repeats: float) -> dict[str, dict[str, float]]:
    """Per domain ("lang/source"): tokens, repeat factor and realised tokens.

    Empty ``weights`` keep natural proportions (factor 1). Weights of languages absent from the
    data are ignored; a language present without a weight is an error rather than silently dropped.
    """
    tokens_by_lang: dict[str, int] = {}
    for domain, tokens in tokens_by_domain.items():
        lang = domain.split("/", 1)[0]
        tokens_by_lang[lang] = tokens_by_lang.get(lang, 0) + tokens
    if weights:
        unweighted = sorted(lang for lang in tokens_by_lang if lang not in weights)
        if unweighted:
            raise MixtureError(f"tokenize.mixture.weights has no weight for {unweighted} (present in the data)")
    present = {lang: weights[lang] for lang in tokens_by_lang} if weights else {}
    total_weight = sum(present.values())
    total_tokens = sum(tokens_by_lang.values())
    plan = {}
    for domain, tokens in sorted(tokens_by_domain.items()):
        lang = domain.split("/", 1)[0]
        if present and tokens_by_lang[lang]:
            factor = min(present[lang] / total_weight * total_tokens / tokens_by_lang[lang], max_repeats)
        else:
            factor = 1.0
        plan[domain] = {"tokens": tokens, "repeat": round(factor, 6), "realised_tokens": round(factor * tokens)}
    return plan
