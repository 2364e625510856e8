"""Mixture weights -> repeat factors."""

import pytest

from skymoe.pipelines.tokenize.mixture import MixtureError, repeat_factors

TOKENS = {"en/c4": 600, "en/dolma": 200, "zh/zhwiki": 1000, "code/github": 200}


def realised_share(plan: dict, prefix: str) -> float:
    total = sum(v["realised_tokens"] for v in plan.values())
    return sum(v["realised_tokens"] for k, v in plan.items() if k.startswith(prefix)) / total


def test_language_weights_hit_their_shares():
    plan = repeat_factors(TOKENS, {"en": 0.7, "zh": 0.2, "code": 0.1}, max_repeats=5)
    assert realised_share(plan, "en/") == pytest.approx(0.7)
    assert realised_share(plan, "zh/") == pytest.approx(0.2)
    assert plan["en/c4"]["repeat"] == plan["en/dolma"]["repeat"]  # sources share their language's weight


def test_domain_weight_overrides_its_language_and_repeats_are_capped():
    plan = repeat_factors(TOKENS, {"en": 0.5, "en/dolma": 0.4, "zh": 0.05, "code": 0.05}, max_repeats=5)
    assert plan["en/dolma"]["repeat"] == pytest.approx(0.4 * 2000 / 200)  # its own weight: 4x
    assert plan["en/c4"]["repeat"] == pytest.approx(0.5 * 2000 / 600, rel=1e-5)  # en's weight, alone
    capped = repeat_factors(TOKENS, {"en": 0.5, "en/dolma": 0.8, "zh": 0.05, "code": 0.05}, max_repeats=5)
    assert capped["en/dolma"]["repeat"] == 5  # wanted 0.8 / 1.4 * 2000 / 200 = 5.7x


def test_no_weights_keep_natural_proportions_and_uncovered_data_is_an_error():
    assert all(v["repeat"] == 1.0 for v in repeat_factors(TOKENS, {}, 5).values())
    with pytest.raises(MixtureError, match="code/github"):
        repeat_factors(TOKENS, {"en": 0.7, "zh": 0.3}, 5)
    assert repeat_factors({"en/c4": 10}, {"en": 1.0, "fr": 3.0}, 5)["en/c4"]["repeat"] == 1.0  # absent fr ignored
