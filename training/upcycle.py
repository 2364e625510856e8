"""Sparse upcycling (Skywork-MoE section 3): an MoE model that starts as a copy of a dense one.

Embeddings, attention, norms and the output head are copied; every expert of an MoE layer starts
as the dense FFN of that layer; routers are freshly initialised. With the top-k weights
renormalised to sum to 1, the upcycled model computes exactly the dense function at step 0
(as long as capacity drops nothing).
"""

from __future__ import annotations

import dataclasses

import torch

from skymoe.training.model import ModelArgs, Transformer


class UpcycleError(ValueError):
    """The dense weights do not fit the MoE shape."""


def dense_args(moe_args: ModelArgs) -> ModelArgs:
    """The dense model an MoE shape upcycles from: same shape, no experts."""
    return dataclasses.replace(moe_args, num_experts=0)


def upcycle_state(dense_state: dict[str, torch.Tensor], moe_args: ModelArgs, seed: int) -> dict[str, torch.Tensor]:
    """The MoE state dict: dense tensors copied, each dense FFN copied into every expert, new routers."""
    with torch.random.fork_rng(devices=[]):  # seeded routers without touching the caller's RNG
        torch.manual_seed(seed)
        moe = Transformer(moe_args)  # fresh routers (and a full set of keys to fill)
    state = moe.state_dict()
    missing = [key for key in state if _dense_key(key) not in dense_state and not _fresh(key)]
    if missing:
        raise UpcycleError(f"dense weights lack {len(missing)} tensors the MoE needs, e.g. {missing[:3]}")
    unused = sorted(set(dense_state) - {_dense_key(key) for key in state if not _fresh(key)})
    if unused:
        raise UpcycleError(f"dense weights hold {len(unused)} tensors the MoE has no place for, e.g. {unused[:3]}")
    for key, value in state.items():
        if _fresh(key):
            continue
        source = dense_state[_dense_key(key)]
        if source.shape != value.shape:
            raise UpcycleError(f"{key}: dense shape {tuple(source.shape)} != MoE shape {tuple(value.shape)}")
        state[key] = source.clone()
    return state


def upcycle(dense: Transformer, moe_args: ModelArgs, seed: int = 0) -> Transformer:
    moe = Transformer(moe_args)
    moe.load_state_dict(upcycle_state(dense.state_dict(), moe_args, seed))
    return moe


def _fresh(key: str) -> bool:
    """Router weights and aux-loss coefficients start new."""
    return ".mlp.router." in key or key.endswith(".mlp.aux_alpha")


def _dense_key(key: str) -> str:
    """``layers.3.mlp.experts.5.up_proj.weight`` -> ``layers.3.mlp.up_proj.weight``."""
    if ".mlp.experts." not in key:
        return key
    head, tail = key.split(".mlp.experts.", 1)
    return f"{head}.mlp.{tail.split('.', 1)[1]}"



