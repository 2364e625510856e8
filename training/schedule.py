"""What changes during training by formula: the learning rate and the aux-loss coefficients."""

from __future__ import annotations

import math

from skymoe.config import AuxLossConfig, PhaseConfig


def learning_rate(phase: PhaseConfig, step: int) -> float:
    """Linear warmup to ``lr``, then cosine decay to ``min_lr`` at the last step (or constant)."""
    if phase.warmup_steps and step < phase.warmup_steps:
        return phase.lr * (step + 1) / phase.warmup_steps
    if phase.constant:
        return phase.lr
    decay_steps = max(phase.steps - phase.warmup_steps, 1)
    progress = min((step - phase.warmup_steps) / decay_steps, 1.0)
    return phase.min_lr + 0.5 * (phase.lr - phase.min_lr) * (1 + math.cos(math.pi * progress))


def next_alpha(alpha: float, drop_rate: float, config: AuxLossConfig) -> float:
    """Skywork-MoE 4.2: alpha_hat = min(xi * d, alpha_max); alpha <- beta * alpha + (1 - beta) * alpha_hat."""
    if config.mode == "fixed":
        return config.alpha
    target = min(config.xi * drop_rate, config.alpha_max)
    return config.beta * alpha + (1 - config.beta) * target
