"""Model shapes by preset name, and the ``ModelArgs`` a train config asks for.

``tiny`` trains in minutes on two CPU cores; ``small`` (~1B total parameters as an 8-expert MoE)
fits one GPU; ``skywork-moe-146b`` is the report's Table 2 shape, for clusters.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from skymoe.config import MoELayerConfig, TrainConfig
from skymoe.training.model import ModelArgs

PRESETS: dict[str, dict[str, Any]] = {
    "tiny": {"dim": 128, "n_layers": 4, "n_heads": 4, "ffn_dim": 344, "vocab_size": 4096},
    "small": {"dim": 1024, "n_layers": 12, "n_heads": 16, "ffn_dim": 2816, "vocab_size": 65536},
    "skywork-moe-146b": {"dim": 4608, "n_layers": 52, "n_heads": 36, "ffn_dim": 12288, "vocab_size": 65536},
}


def dense_shape(config: TrainConfig, seq_len: int, vocab_size: int | None = None) -> ModelArgs:
    """The dense shape of ``config.model`` (preset + overrides). ``vocab_size`` is the tokenizer's:
    it replaces the preset's unless the config sets one."""
    shape = dict(PRESETS[config.model.preset])
    shape.update(config.model.model_dump(exclude={"preset"}, exclude_none=True))
    if vocab_size is not None and config.model.vocab_size is None:
        shape["vocab_size"] = vocab_size
    return ModelArgs(**shape, max_seq_len=seq_len)


def with_moe(dense: ModelArgs, layer: MoELayerConfig) -> ModelArgs:
    """The same shape with ``layer``'s MoE layers."""
    return dataclasses.replace(dense, num_experts=layer.num_experts, moe_every=layer.moe_every, top_k=layer.top_k,
                               capacity_factor=layer.capacity_factor, eval_capacity_factor=layer.eval_capacity_factor,
                               min_capacity=layer.min_capacity, gate_norm_lambda=layer.gate_norm_lambda,
                               balance_loss=layer.balance_loss, balance_scope=layer.balance_scope)
