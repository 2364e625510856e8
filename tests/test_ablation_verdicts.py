"""The ablation verdict code (ablations/report.py) on constructed inputs whose answer is known: paired
t-tests for "lower"/"higher", TOST for "similar", one seed, non-finite values, the init ablation's
pre-registered comparison, the expert-similarity and adaptive-alpha findings; and the ablation plan's
pairing of runs by seed, which the paired tests rely on."""

from __future__ import annotations

import json
import math
import statistics

import pytest
import torch
from scipy import stats

from skymoe.ablations import report
from skymoe.ablations.report import (
    INCONCLUSIVE,
    NOT_DECIDED,
    NOT_REPRODUCED,
    NOT_SHOWN_EQUIVALENT,
    ONE_SEED,
    REPRODUCED,
    compare,
    decide,
    t_interval,
)
from skymoe.ablations.run import AblationPlan, plan_ablation, size_for
from skymoe.ablations.variants import AUX_COEF_CAPACITY_FACTOR, SIZES, sized_train, variants
from skymoe.config import ConfigError, load_config
from skymoe.stage import Manifest, StageRef, write_manifest
from skymoe.storage import Storage
from skymoe.training.model import Transformer

BASE = [6.30, 6.28, 6.35, 6.31, 6.27, 6.33, 6.29, 6.32]  # a variant's final loss over 8 seeds
NOISE = [0.004, -0.003, 0.002, -0.001, 0.003, -0.004, 0.001, -0.002]  # small seed-to-seed noise, mean 0


def shifted(values: list[float], by: float, noise: list[float] = NOISE) -> list[float]:
    return [v + by + e for v, e in zip(values, noise)]


# ----------------------------------------------------------------------------------- the statistics
def test_t_interval_is_the_textbook_paired_interval():
    diffs = [a - b for a, b in zip(shifted(BASE, -0.02), BASE)]
    ci = t_interval(diffs)
    half = 2.3646 * statistics.stdev(diffs) / math.sqrt(8)  # t(0.975, 7), from a table
    assert ci.effect == pytest.approx(-0.02) and ci.n == 8
    assert (ci.low, ci.high) == pytest.approx((ci.effect - half, ci.effect + half), rel=1e-4)
    assert ci.p == pytest.approx(stats.ttest_rel(shifted(BASE, -0.02), BASE).pvalue)


def test_clear_win_is_reproduced():
    status, ci = decide([a - b for a, b in zip(shifted(BASE, -0.02), BASE)], "lower")
    assert status == REPRODUCED and ci.high < 0


def test_clear_loss_is_not_reproduced():
    status, ci = decide([a - b for a, b in zip(shifted(BASE, +0.02), BASE)], "lower")
    assert status == NOT_REPRODUCED and ci.low > 0
    assert decide([a - b for a, b in zip(shifted(BASE, +0.02), BASE)], "higher")[0] == REPRODUCED


def test_noisy_difference_is_inconclusive():
    """A mean difference of -0.005 against paired noise of ±0.03: the 95% CI holds 0."""
    noise = [0.03, -0.025, 0.02, -0.03, 0.035, -0.02, 0.025, -0.035]
    status, ci = decide([a - b for a, b in zip(shifted(BASE, -0.005, noise), BASE)], "lower")
    assert status == INCONCLUSIVE and ci.low < 0 < ci.high


def test_three_of_three_seeds_can_be_decided_now():
    """The case docs/results.md had to call inconclusive by the old spread rule: every paired seed agrees,
    the unpaired spreads (0.08 and 0.06) dwarf the difference, yet the paired differences are consistent."""
    scratch, upcycled = [6.66, 6.80, 6.805], [6.75, 6.88, 6.872]
    assert statistics.stdev(scratch) + statistics.stdev(upcycled) > 0.079
    record = compare("scratch wins", "scratch", scratch, "upcycled", upcycled, "lower", "val loss")
    assert record["status"] == REPRODUCED


def test_one_seed_decides_nothing():
    for expect, margin in (("lower", None), ("higher", None), ("similar", 0.02)):
        assert decide([-5.0], expect, margin) == (ONE_SEED, None)
    record = compare("f", "a", [6.1], "b", [6.5], "lower", "loss")
    assert record["status"] == ONE_SEED and record["95% CI"] == "" and record["seeds"] == "1"
    assert record["effect"] == "-0.4"


def test_equivalent_within_the_margin():
    diffs = [a - b for a, b in zip(shifted(BASE, 0.001), BASE)]
    status, ci = decide(diffs, "similar", margin=0.02)
    assert status == REPRODUCED and -0.02 < ci.low and ci.high < 0.02


def test_close_means_with_a_wide_interval_are_not_shown_equivalent():
    """Means 0.001 apart, but the paired differences swing by ±0.05: no evidence of a difference, and
    none of similarity either - the interval reaches past the ±0.02 margin."""
    noise = [0.05, -0.05, 0.04, -0.045, 0.05, -0.04, 0.045, -0.05]
    diffs = [a - b for a, b in zip(shifted(BASE, 0.001, noise), BASE)]
    assert decide(diffs, "lower")[0] == INCONCLUSIVE  # the old rule read this as "similar"
    status, ci = decide(diffs, "similar", margin=0.02)
    assert status == NOT_SHOWN_EQUIVALENT and ci.low < -0.02 and ci.high > 0.02


def test_a_difference_beyond_the_margin_is_not_similar():
    diffs = [a - b for a, b in zip(shifted(BASE, 0.05), BASE)]
    assert decide(diffs, "similar", margin=0.02)[0] == NOT_REPRODUCED
    assert decide(diffs, "similar", margin=0.1)[0] == REPRODUCED  # the margin is the finding's to state


def test_identical_differences_give_a_zero_width_interval():
    assert decide([-0.01] * 4, "lower")[0] == REPRODUCED
    assert decide([0.0] * 4, "lower")[0] == INCONCLUSIVE
    assert decide([0.0] * 4, "similar", margin=0.01)[0] == REPRODUCED


def test_compare_records_effect_interval_test_and_seeds():
    record = compare("normalization lowers the loss", "lambda=1", shifted(BASE, -0.02), "no-norm", BASE, "lower",
                     "final train loss")
    assert record["status"] == REPRODUCED and record["seeds"] == "8" and record["test"] == report.PAIRED_T
    assert record["effect"] == "-0.02"
    low, high = (float(x) for x in record["95% CI"].strip("[]").split(", "))
    assert low < -0.02 < high < 0
    assert "lambda=1 lower in 8 of 8 paired seeds" in record["measured"]
    similar = compare("similar", "lambda=2", shifted(BASE, 0.001), "lambda=1", BASE, "similar", "loss", margin=0.02)
    assert "margin ±0.02" in similar["test"] and "90% CI" in similar["measured"]


def test_bad_comparisons_are_refused_by_name():
    with pytest.raises(ValueError, match="my finding: a has 2 seeds and b 3"):
        compare("my finding", "a", [1.0, 2.0], "b", [1.0, 2.0, 3.0], "lower", "loss")
    with pytest.raises(ValueError, match="positive equivalence margin"):
        compare("f", "a", BASE, "b", BASE, "similar", "loss")
    with pytest.raises(ValueError, match="expected one of lower, higher, similar"):
        compare("f", "a", BASE, "b", BASE, "smaller", "loss")


def test_a_diverged_seed_is_reported_not_tested():
    record = compare("f", "a", [6.1, math.nan, 6.2], "b", [6.3, 6.4, 6.5], "lower", "loss")
    assert record["status"] == f"{NOT_DECIDED} (non-finite values in seed 1)" and record["95% CI"] == ""


# ----------------------------------------------------------------------------------- the ablations' findings
def history(steps: int, loss: float, *, val: float | None = None, similarity: tuple[float, float] | None = None,
            alpha: list[float] | None = None, drops: list[float] | None = None) -> list[dict]:
    """A constructed metrics.jsonl: constant numbers per step, similarity falling linearly."""
    rows = []
    for step in range(steps):
        row = {"step": step + 1, "tokens": 1000 * (step + 1), "loss": loss}
        if alpha is not None:
            row |= {"alpha": alpha, "drop_rate": drops}
        if similarity is not None:
            first, last = similarity
            row["expert_similarity"] = first + (last - first) * step / (steps - 1)
        rows.append(row)
    if val is not None:
        rows[-1]["val_loss"] = {"en/c4": val, "zh/wiki": val}
    return rows


def init_plan(seeds: int) -> AblationPlan:
    train = sized_train(load_config().train, SIZES["smoke"])
    grid = variants("init", train, SIZES["smoke"], 2.0, 1.0)
    return AblationPlan("init", "smoke", seeds, StageRef("/nowhere", "tokenize", "x"), tuple(grid), (), 64, (2.0, 1.0))


def init_runs(plan: AblationPlan, val: dict[str, float], similarity: dict[str, float]) -> report.Histories:
    """Final validation loss ``val[kind] + noise`` per seed and a similarity falling from 1 to ``similarity[kind]``."""
    runs = {}
    for v in plan.variants:
        kind = v.name.split("/")[0]
        runs[v.name] = [history(6, 7.0, val=val.get(kind, 7.0) + NOISE[seed],
                                similarity=None if not v.moe else (1.0 if v.init == "upcycle" else 0.0,
                                                                   similarity.get(kind, 0.0) + NOISE[seed]))
                        for seed in range(plan.seeds)]
    return runs


def test_init_compares_the_pre_registered_upcycled_variant_not_the_best():
    """upcycle-third-decay is the best model in both budgets; the rule-of-thumb findings still compare the
    pre-registered upcycle-final-3xlr with scratch: better than scratch (small budget) and worse (2x)."""
    plan = init_plan(6)
    val = {"scratch-decay": 7.0, "upcycle-third-decay": 6.5, "upcycle-final-const": 6.99, "upcycle-final-3xlr": 6.9}
    _, findings, _, _ = report._init(plan, init_runs(plan, val, {"upcycle-third-decay": 0.8,
                                                                  "upcycle-final-const": 0.99,
                                                                  "upcycle-final-3xlr": 0.9}), {})
    rules = [f for f in findings if "rule of thumb" in f["finding"]]
    assert len(rules) == 2 and all(report.INIT_COMPARED in f["finding"] for f in rules)
    small, large = rules
    assert small["status"] == REPRODUCED and small["effect"] == "-0.1"  # 3xlr - scratch, not third - scratch
    assert large["status"] == NOT_REPRODUCED  # the 2x budget expects scratch to win
    assert "winner by mean upcycle-third-decay/small" in small["measured"]


def test_expert_similarity_findings_come_from_the_rule():
    plan = init_plan(6)
    val = {"upcycle-third-decay": 6.5, "upcycle-final-const": 6.99, "upcycle-final-3xlr": 6.9}
    _, findings, _, _ = report._init(plan, init_runs(plan, val, {"upcycle-third-decay": 0.8,
                                                                  "upcycle-final-const": 0.99,
                                                                  "upcycle-final-3xlr": 0.9}), {})
    falls = [f for f in findings if "starts at 1 and falls" in f["finding"]]
    weakest = [f for f in findings if "highest expert similarity is the weakest" in f["finding"]]
    assert len(falls) == len(weakest) == 2
    assert all(f["status"] == REPRODUCED and f["test"] == report.ONE_SAMPLE_T for f in falls)
    # final-const is the most similar and the weakest, but only 0.09 worse than 3xlr: tested against it.
    assert all(f["status"] == REPRODUCED and "upcycle-final-const" in f["measured"] for f in weakest)
    assert all("vs upcycle-final-3xlr" in f["measured"] and "intersection-union" in f["test"] for f in weakest)

    # The most similar model is the best one: not reproduced.
    val = {"upcycle-third-decay": 6.9, "upcycle-final-const": 6.5, "upcycle-final-3xlr": 6.95}
    _, findings, _, _ = report._init(plan, init_runs(plan, val, {"upcycle-third-decay": 0.8,
                                                                  "upcycle-final-const": 0.99,
                                                                  "upcycle-final-3xlr": 0.9}), {})
    weakest = [f for f in findings if "highest expert similarity is the weakest" in f["finding"]]
    assert all(f["status"] == NOT_REPRODUCED for f in weakest)


def test_similar_findings_of_the_init_ablation_use_the_margin():
    plan = init_plan(6)
    val = {"scratch-decay": 7.0, "upcycle-third-decay": 7.004, "upcycle-final-const": 7.2}
    _, findings, _, _ = report._init(plan, init_runs(plan, val, {}), {})
    similar = next(f for f in findings if "give similar loss" in f["finding"])
    assert similar["status"] == REPRODUCED and f"margin ±{report.LOSS_MARGIN:g}" in similar["test"]


def test_adaptive_alpha_at_alpha_max_everywhere_decides_nothing():
    """The case of docs/results.md: adaptive alpha never left alpha_max, so the adaptive arm was a fixed
    0.01 arm; the comparisons with it must not read as findings about the rule."""
    aux = {"alpha_max": 0.01, "xi": 0.2}
    stuck = [history(10, 6.3, alpha=[0.0099, 0.01, 0.01, 0.01], drops=[0.3, 0.4, 0.45, 0.5]) for _ in range(8)]
    assert "never acted" in report._adaptive_idle(stuck, aux)
    acting = [history(10, 6.3, alpha=[0.002, 0.006, 0.01, 0.01], drops=[0.01, 0.03, 0.2, 0.3]) for _ in range(8)]
    assert report._adaptive_idle(acting, aux) is None


def test_alpha_tracks_drops_per_layer():
    tracking = [history(10, 6.3, alpha=[0.002, 0.004 + 0.001 * (s % 2), 0.006, 0.01], drops=[0.01, 0.02, 0.03, 0.3])
                for s in range(8)]
    record = report._alpha_tracks_drops(tracking)
    assert record["status"] == REPRODUCED and record["effect"] == "+1"
    reversed_ = [history(10, 6.3, alpha=[0.01, 0.006, 0.004, 0.002], drops=[0.01, 0.02, 0.03, 0.3]) for _ in range(8)]
    assert report._alpha_tracks_drops(reversed_)["status"] == NOT_REPRODUCED
    flat = [history(10, 6.3, alpha=[0.01] * 4, drops=[0.01, 0.02, 0.03, 0.3]) for _ in range(8)]
    assert report._alpha_tracks_drops(flat)["status"] == f"{NOT_DECIDED} (alpha equal in every layer in 8 of 8 seeds)"
    assert report._alpha_tracks_drops(tracking[:1])["status"] == ONE_SEED


def test_findings_table_names_effect_interval_test_and_verdict():
    records = [compare("normalization lowers the loss", "lambda=1", shifted(BASE, -0.02), "no-norm", BASE, "lower",
                       "final train loss")]
    lines = report.findings_table(records).splitlines()
    assert lines[0] == "| finding | measured | effect | 95% CI | test | seeds | verdict |"
    assert lines[2].endswith(f"| {report.PAIRED_T} | 8 | **reproduced** |")


def fake_tokens(tmp_path) -> tuple[Storage, StageRef]:
    """A tokenize output's manifest, all that planning an ablation reads."""
    storage = Storage(str(tmp_path))
    tokens = StageRef(str(tmp_path), "tokenize", "f" * 16)
    write_manifest(storage, tokens, Manifest("tokenize", tokens.fingerprint, "v", {}, {},
                                             extra={"seq_len": 32, "vocab_size": 97}))
    return storage, tokens


def test_report_states_seeds_rules_and_a_findings_table(tmp_path):
    storage, tokens = fake_tokens(tmp_path)
    plan = plan_ablation(load_config(), storage, "aux-coef", tokens, 8, "smoke")
    alphas = {"fixed-0.01": [0.01, 0.01], "fixed-0.001": [0.001, 0.001], "adaptive": [0.004, 0.01],
              "switch-fixed-0.01": [0.01, 0.01]}
    drops = {"fixed-0.01": [0.02, 0.2], "fixed-0.001": [0.05, 0.3], "adaptive": [0.02, 0.2],
             "switch-fixed-0.01": [0.03, 0.25]}
    for run in plan.runs:
        rows = history(10, 6.3 + 0.01 * (run.variant.name == "fixed-0.01") + NOISE[run.seed],
                       val=6.6 + NOISE[run.seed], alpha=alphas[run.variant.name],
                       drops=[d + NOISE[run.seed] for d in drops[run.variant.name]])
        storage.write_text(f"{run.uri}/metrics.jsonl", "\n".join(json.dumps(row) for row in rows))
    built = report.build_report(plan, storage, {(r.variant.name, r.seed): {"seconds": 1.0} for r in plan.runs}, [])
    text = built.markdown
    assert "Seeds: 8 per variant, paired" in text and report.VERDICT_RULES in text
    assert "| finding | measured | effect | 95% CI | test | seeds | verdict |" in text
    statuses = {f["finding"]: f["status"] for f in built.findings}
    assert statuses["adaptive alpha costs less loss than a fixed large alpha (1e-2)"] == REPRODUCED
    assert statuses["adaptive alpha drops fewer tokens than a fixed small alpha (1e-3)"] == REPRODUCED
    assert all(f["seeds"] == "8" for f in built.findings)


# ----------------------------------------------------------------------------------- pairing by seed
def test_runs_are_paired_by_seed(tmp_path):
    """Seed s of every variant trains with seed s (initial weights and data order) on the same tokens,
    and an upcycled run starts from the dense run of its own seed; variants that differ only in the gate
    start from identical weights. The default seed count is the size's."""
    storage, tokens = fake_tokens(tmp_path)
    config = load_config()
    plan = plan_ablation(config, storage, "init", tokens, 3, "smoke")
    for run in plan.runs:
        assert run.train.seed == run.seed and run.tokens_uri == tokens.uri
        if run.variant.init == "upcycle":
            assert f"/seed-{run.seed}/" in run.init_uri and "/ablate/init/" in run.init_uri
    gating = plan_ablation(config, storage, "gating-norm", tokens, None, "smoke")
    assert gating.seeds == SIZES["smoke"].seeds
    first = {}
    for run in gating.runs:
        state = Transformer(run.args, seed=run.train.seed).state_dict()  # as the trainer initialises it
        if run.seed in first:
            assert all(torch.equal(state[k], first[run.seed][k]) for k in state), run.label
        first.setdefault(run.seed, state)
    assert SIZES["cpu"].seeds >= 8


def test_steps_set_the_moe_budget_in_runs_and_a_report_of_their_own(tmp_path):
    storage, tokens = fake_tokens(tmp_path)
    config = load_config()
    default = plan_ablation(config, storage, "gating-norm", tokens, 1, "smoke")
    longer = plan_ablation(config, storage, "gating-norm", tokens, 1, "smoke", steps=40)
    assert {run.variant.phase.steps for run in default.runs} == {SIZES["smoke"].moe_steps}
    assert {run.variant.phase.steps for run in longer.runs} == {40}
    assert longer.size == "smoke-40steps" and longer.report_uri != default.report_uri
    assert not {run.uri for run in longer.runs} & {run.uri for run in default.runs}  # never mixed with the short runs
    for ablation in ("init", "data-quality"):
        with pytest.raises(ConfigError, match="--steps sets the MoE budget"):
            size_for(ablation, "smoke", 40)
    with pytest.raises(ConfigError, match="--steps must be >= 1"):
        size_for("aux-coef", "smoke", 0)


def test_every_aux_coef_arm_runs_at_the_capacity_where_the_rule_acts(tmp_path):
    storage, tokens = fake_tokens(tmp_path)
    plan = plan_ablation(load_config(), storage, "aux-coef", tokens, 1, "smoke")
    assert {run.train.moe.capacity_factor for run in plan.runs} == {AUX_COEF_CAPACITY_FACTOR}
    assert AUX_COEF_CAPACITY_FACTOR > 1.25  # above the default, where every layer dropped more than 5%
