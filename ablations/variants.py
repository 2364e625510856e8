"""The variant grids of the three ablations, and the sizes they run at.

An ablation is a list of :class:`Variant`: one training run each (per seed), differing from the
user's ``train`` config only in what the ablation varies. Everything else - data, model shape,
batch, budget, seeds - is shared, so differences between variants are the ablation's effect.
Kept free of torch and Prefect: the CLI validates a grid before anything heavy starts.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from pydantic import ValidationError

from skymoe.config import ConfigError, PhaseConfig, TrainConfig

ABLATIONS = ("gating-norm", "aux-coef", "init")


@dataclass(frozen=True)
class Size:
    """How big an ablation runs: the train-config overrides every variant shares, and the budgets."""

    train: dict[str, Any]
    moe_steps: int  # gating-norm and aux-coef runs
    dense_steps: int  # the init ablation's dense run (a multiple of 3: a checkpoint at one third)
    seeds: int  # the default number of seeds per variant


# cpu: ~30 minutes per ablation and 3 seeds on two CPU cores shared with other jobs (measured: 31, 16
# and 22 min in docs/results.md; most of a short run is launching DeepSpeed), so about 80 minutes at its
# default 8 seeds: with fewer, a paired t-test needs an effect of several times the seed-to-seed spread
# of the differences (t quantile 4.3 at 3 seeds, 2.36 at 8). smoke: a handful of steps of a 2-layer
# model, for the test suite (one seed: nothing is decided). gpu: a wider, deeper model and ~17x the
# steps, for one GPU (one rank; not measured yet), 4 seeds by default.
_INTERVALS = {"eval_batches": 4, "log_every": 10}
SIZES: dict[str, Size] = {
    "smoke": Size({"model": {"preset": "tiny", "dim": 32, "n_layers": 2, "n_heads": 2, "ffn_dim": 64},
                   "moe": {"num_experts": 4}, "micro_batch_size": 2, "eval_every": 4, "eval_batches": 1,
                   "similarity_every": 2, "log_every": 2},
                  moe_steps=4, dense_steps=6, seeds=1),
    "cpu": Size({"model": {"preset": "tiny"}, "micro_batch_size": 4, "eval_every": 40, "similarity_every": 10,
                 **_INTERVALS},
                moe_steps=120, dense_steps=45, seeds=8),
    "gpu": Size({"model": {"preset": "tiny", "dim": 512, "n_layers": 8, "n_heads": 8, "ffn_dim": 1376},
                 "parallel": {"world_size": 1, "ep_size": 1}, "micro_batch_size": 16, "eval_every": 200,
                 "similarity_every": 50, **_INTERVALS},
                moe_steps=2000, dense_steps=1500, seeds=4),
}


@dataclass(frozen=True)
class Variant:
    """One arm of an ablation. ``settings`` are nested ``train`` overrides; ``init`` is ``random`` or
    ``upcycle`` from ``source`` (a dense variant's name) at checkpoint ``source_step`` (None = final)."""

    name: str
    moe: bool
    phase: PhaseConfig
    settings: dict[str, Any] = field(default_factory=dict)
    init: str = "random"
    source: str | None = None
    source_step: int | None = None
    group: str | None = None  # the init ablation's budget

    def train_config(self, base: TrainConfig, seed: int) -> TrainConfig:
        """``base`` with this variant's settings and ``seed``, validated like a config file."""
        merged = _merge(base.model_dump(mode="json"), {**self.settings, "seed": seed})
        try:
            return TrainConfig.model_validate(merged)
        except ValidationError as err:
            raise ConfigError(f"ablation variant {self.name}: {err}") from None


def sized_train(train: TrainConfig, size: Size) -> TrainConfig:
    """The user's train section with the size's shared overrides (shape, batch, intervals)."""
    try:
        return TrainConfig.model_validate(_merge(train.model_dump(mode="json"), size.train))
    except ValidationError as err:
        raise ConfigError(f"ablation size: {err}") from None


def variants(ablation: str, train: TrainConfig, size: Size, moe_flops: float = 1.0,
             dense_flops: float = 1.0) -> list[Variant]:
    """The grid of ``ablation``. ``moe_flops``/``dense_flops`` (training FLOPs per token) size the
    init ablation's budgets in compute, as the report's rule of thumb counts them."""
    if ablation == "gating-norm":
        return gating_norm(train, size)
    if ablation == "aux-coef":
        return aux_coef(train, size)
    if ablation == "init":
        return initialisation(train, size, moe_flops, dense_flops)
    raise ConfigError(f"unknown ablation {ablation!r}: expected one of {', '.join(ABLATIONS)}")


def _phase(steps: int, lr: float, min_lr: float, constant: bool = False) -> PhaseConfig:
    return PhaseConfig(steps=steps, lr=lr, min_lr=min(min_lr, lr), warmup_steps=max(1, steps // 10),
                       constant=constant)


def gating_norm(train: TrainConfig, size: Size) -> list[Variant]:
    """Section 4.1: plain softmax gate against normalized logits with lambda 0.5, 1 and 2."""
    phase = _phase(size.moe_steps, train.dense.lr, train.dense.min_lr)
    return [Variant("no-norm" if lam is None else f"lambda={lam:g}", True, phase, {"moe": {"gate_norm_lambda": lam}})
            for lam in (None, 0.5, 1.0, 2.0)]


# The aux-coef ablation's capacity factor. The rule alpha -> min(xi d, alpha_max) leaves alpha_max only
# where a layer drops under alpha_max / xi = 5% of its routes. At the default 1.25 every layer of the cpu
# size drops 25-60% and the adaptive arm is a fixed alpha_max arm; at 2.5 (searched over 1.25-3 on the
# cpu size, one seed, 120 steps) layers drop 0-10% late in the run and their alphas part (0.0066-0.0089
# at the end), so the rule is what the comparison measures.
AUX_COEF_CAPACITY_FACTOR = 2.5


def aux_coef(train: TrainConfig, size: Size) -> list[Variant]:
    """Section 4.2: fixed alpha 1e-2 and 1e-3 against the adaptive rule (xi 1/5, alpha_max 0.01, beta 0.99),
    and the Switch Transformer's balance loss at a fixed 1e-2 beside them, all at capacity factor
    ``AUX_COEF_CAPACITY_FACTOR``."""
    phase = _phase(size.moe_steps, train.dense.lr, train.dense.min_lr)
    capacity = {"capacity_factor": AUX_COEF_CAPACITY_FACTOR}
    fixed = [Variant(f"fixed-{alpha:g}", True, phase, {"aux_loss": {"mode": "fixed", "alpha": alpha}, "moe": capacity})
             for alpha in (1e-2, 1e-3)]
    adaptive = {"mode": "adaptive", "alpha": 0.01, "xi": 0.2, "alpha_max": 0.01, "beta": 0.99}
    # The Switch Transformer form most frameworks use, at its usual fixed 0.01: a reference, not a report arm.
    switch = Variant("switch-fixed-0.01", True, phase, {"aux_loss": {"mode": "fixed", "alpha": 1e-2},
                                                        "moe": {**capacity, "balance_loss": "switch"}})
    return fixed + [Variant("adaptive", True, phase, {"aux_loss": adaptive, "moe": capacity}), switch]


def initialisation(train: TrainConfig, size: Size, moe_flops: float, dense_flops: float) -> list[Variant]:
    """Section 3: a dense run with a checkpoint at one third of its budget, then 8-expert MoEs from
    scratch or upcycled, under a small budget and one of about twice the dense cost.

    Learning rates follow the report relative to the dense schedule (3e-3 -> 3e-4 there): scratch at
    the dense peak, upcycled from the 1/3 checkpoint at 0.6x (1.8e-3), from the final dense
    checkpoint at a constant min lr (3e-4) or at 0.4x the peak (1.2e-3, "3xLR")."""
    if size.dense_steps % 3:
        raise ConfigError(f"the init ablation's dense budget ({size.dense_steps} steps) must be a multiple of 3")
    peak, low, third = train.dense.lr, train.dense.min_lr, size.dense_steps // 3
    dense = Variant("dense", False, _phase(size.dense_steps, peak, low), {"checkpoint_every": third})
    budgets = {"small": max(2, round(size.dense_steps / 3 * dense_flops / moe_flops)),
               "2x-dense": math.ceil(2 * size.dense_steps * dense_flops / moe_flops)}
    grid = [dense]
    for budget, steps in budgets.items():
        grid += [
            Variant(f"scratch-decay/{budget}", True, _phase(steps, peak, low), group=budget),
            Variant(f"upcycle-third-decay/{budget}", True, _phase(steps, 0.6 * peak, low), init="upcycle",
                    source="dense", source_step=third, group=budget),
            Variant(f"upcycle-final-const/{budget}", True, _phase(steps, low, low, constant=True), init="upcycle",
                    source="dense", group=budget),
            Variant(f"upcycle-final-3xlr/{budget}", True, _phase(steps, 0.4 * peak, low), init="upcycle",
                    source="dense", group=budget),
        ]
    return grid


def _merge(base: dict, extra: dict) -> dict:
    merged = dict(base)
    for key, value in extra.items():
        merged[key] = _merge(merged[key], value) if isinstance(value, dict) and isinstance(merged.get(key), dict) \
            else value
    return merged
