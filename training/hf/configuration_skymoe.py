"""Hugging Face configuration of a skymoe model, shipped as remote code by ``training/export.py``.

The fields are those of ``ModelArgs`` (defaults taken from it, so the two cannot drift apart);
``model_args()`` turns the config back into the dataclass the model is built from. One is renamed:
``top_k`` is also a sampling parameter, which transformers copies from a model config into the
generation config (a model built from this config would then sample from the top 2 tokens), so
the config calls it ``num_experts_per_tok``, the name Hugging Face MoE models use.
``attribute_map`` exposes the standard names (``hidden_size``, ``max_position_embeddings``, ...)
that generic code such as lm-evaluation-harness or ``tie_weights`` reads.

Only transformers and the bundled ``model.py`` are imported, so the folder loads anywhere with
``trust_remote_code=True``.
"""

from __future__ import annotations

from dataclasses import fields

from transformers import PretrainedConfig  # the name both transformers 4 and 5 export

from .model import ModelArgs

RENAMED = {"top_k": "num_experts_per_tok"}  # ModelArgs field -> config field


class SkyMoeConfig(PretrainedConfig):
    model_type = "skymoe"
    attribute_map = {
        "hidden_size": "dim",
        "num_hidden_layers": "n_layers",
        "num_attention_heads": "n_heads",
        "num_key_value_heads": "n_kv_heads",
        "intermediate_size": "ffn_dim",
        "max_position_embeddings": "max_seq_len",
        "rms_norm_eps": "norm_eps",
        "tie_word_embeddings": "tie_embeddings",
    }

    vocab_size: int = ModelArgs.vocab_size
    dim: int = ModelArgs.dim
    n_layers: int = ModelArgs.n_layers
    n_heads: int = ModelArgs.n_heads
    n_kv_heads: int | None = ModelArgs.n_kv_heads
    qkv_bias: bool = ModelArgs.qkv_bias
    ffn_dim: int = ModelArgs.ffn_dim
    max_seq_len: int = ModelArgs.max_seq_len
    rope_theta: float = ModelArgs.rope_theta
    # Not "rope_scaling": transformers 5 makes that name a deprecated alias of rope_parameters.
    rope_freq_scaling: dict | None = ModelArgs.rope_freq_scaling
    norm_eps: float = ModelArgs.norm_eps
    tie_embeddings: bool = ModelArgs.tie_embeddings
    num_experts: int = ModelArgs.num_experts
    moe_every: int = ModelArgs.moe_every
    num_experts_per_tok: int = ModelArgs.top_k
    capacity_factor: float | None = ModelArgs.capacity_factor
    eval_capacity_factor: float | None = ModelArgs.eval_capacity_factor
    min_capacity: int = ModelArgs.min_capacity
    gate_norm_lambda: float | None = ModelArgs.gate_norm_lambda
    balance_loss: str = ModelArgs.balance_loss
    balance_scope: str = ModelArgs.balance_scope
    init_std: float = ModelArgs.init_std

    # The skymoe tokenizer's special tokens: <s>, </s>, <pad> (export writes the exported tokenizer's).
    bos_token_id: int | None = 0
    eos_token_id: int | None = 1
    pad_token_id: int | None = 2

    def model_args(self) -> ModelArgs:
        values = {field.name: getattr(self, RENAMED.get(field.name, field.name)) for field in fields(ModelArgs)}
        return ModelArgs(**values)
