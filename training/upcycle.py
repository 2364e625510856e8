"""Sparse upcycling (Skywork-MoE section 3): an MoE model that starts as a copy of a dense one.

Embeddings, attention, norms and the output head are copied; every expert of an MoE layer starts
as the dense FFN of that layer; routers are freshly initialised. With the top-k weights
renormalised to sum to 1, the upcycled model computes exactly the dense function at step 0
(as long as capacity drops nothing).
"""

from __future__ import annotations

import dataclasses

import torch

from skymoe.training.model import ModelArgs, Transformer, initial_value
from skymoe.training.weights import WeightsReader


class UpcycleError(ValueError):
    """The dense weights do not fit the MoE shape."""


def dense_args(moe_args: ModelArgs) -> ModelArgs:
    """The dense model an MoE shape upcycles from: same shape, no experts."""
    return dataclasses.replace(moe_args, num_experts=0)


def upcycle_sources(moe_shapes: dict[str, tuple[int, ...]],
                    dense_shapes: dict[str, tuple[int, ...]]) -> dict[str, str | None]:
    """Each MoE tensor's dense source (plain names; shapes of the whole models): the dense tensor it
    copies, or None for a fresh one (routers, aux-loss coefficients). Refuses dense weights that lack a
    tensor, hold one the MoE has no place for, or whose shapes differ."""
    missing = [key for key in moe_shapes if _dense_key(key) not in dense_shapes and not _fresh(key)]
    if missing:
        raise UpcycleError(f"dense weights lack {len(missing)} tensors the MoE needs, e.g. {missing[:3]}")
    unused = sorted(set(dense_shapes) - {_dense_key(key) for key in moe_shapes if not _fresh(key)})
    if unused:
        raise UpcycleError(f"dense weights hold {len(unused)} tensors the MoE has no place for, e.g. {unused[:3]}")
    sources: dict[str, str | None] = {}
    for key, shape in moe_shapes.items():
        if _fresh(key):
            sources[key] = None
            continue
        source = _dense_key(key)
        if tuple(dense_shapes[source]) != tuple(shape):
            raise UpcycleError(f"{key}: dense shape {tuple(dense_shapes[source])} != MoE shape {tuple(shape)}")
        sources[key] = source
    return sources


def upcycle_state(dense_state: dict[str, torch.Tensor], moe_args: ModelArgs, seed: int) -> dict[str, torch.Tensor]:
    """The MoE state dict: dense tensors copied, each dense FFN copied into every expert, new routers
    (from ``seed`` and each router's name, as ``Transformer.init_parameters`` draws them; the caller's
    RNG is not touched)."""
    with torch.device("meta"):
        meta = Transformer(moe_args)  # the keys and shapes, nothing allocated
    shapes = {key: tuple(value.shape) for key, value in meta.state_dict().items()}
    sources = upcycle_sources(shapes, {key: tuple(value.shape) for key, value in dense_state.items()})
    state: dict[str, torch.Tensor] = {}
    for key, source in sources.items():
        if source is not None:
            state[key] = dense_state[source].clone()
        else:
            state[key] = fresh_value(meta, key, moe_args, seed)
    return state


def upcycle_into(reader: WeightsReader, targets: dict[str, torch.Tensor], moe_shapes: dict[str, tuple[int, ...]],
                 model: Transformer, plain_name, seed: int) -> None:
    """Upcycles only what this rank holds: ``targets`` (plain name -> this rank's tensor) are filled from
    the dense weights folder read tensor by tensor, the local experts' from their layer's dense FFN,
    the fresh ones as ``upcycle_state`` makes them. ``moe_shapes``: every rank's tensors (to check the
    dense weights against the whole MoE)."""
    sources = upcycle_sources(moe_shapes, reader.shapes())
    last: tuple[str, torch.Tensor] | None = None  # each dense tensor is read once for all local experts
    fresh: set[str] = set()
    with torch.no_grad():
        for key, tensor in sorted(targets.items(), key=lambda item: sources[item[0]] or ""):
            source = sources[key]
            if source is None:
                tensor.zero_()  # aux_alpha; the routers are drawn below
                fresh.add(key)
                continue
            if last is None or last[0] != source:
                last = (source, reader.read(source))
            tensor.copy_(last[1])
    model.init_parameters(seed, plain_name, only=fresh)


def fresh_value(model: Transformer, key: str, args: ModelArgs, seed: int) -> torch.Tensor:
    """A fresh tensor of a new MoE under its plain name: a router's as ``init_parameters`` draws it,
    an aux-loss coefficient zero."""
    module_name, leaf = key.rsplit(".", 1)
    module = model.get_submodule(module_name)
    if leaf in module._parameters:
        return initial_value(module, leaf, tuple(module._parameters[leaf].shape), args.init_std, seed, key)
    buffer = module._buffers[leaf]
    return torch.zeros(buffer.shape, dtype=buffer.dtype)


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



