"""Expert parallelism through DeepSpeed: the model's MoE layers become ``deepspeed.moe`` layers whose
gate is skymoe's router (gating logit normalization, top-k, capacity, drop accounting).

DeepSpeed moves tokens to the rank that owns their expert (all-to-all) and keeps expert
parameters out of the data-parallel all-reduce; the routing decision stays ours, so the local
``MoEFeedForward`` and the expert-parallel layer compute the same function.
"""

from __future__ import annotations

import torch
from deepspeed.moe.layer import MoE
from deepspeed.moe.sharded_moe import TopKGate
from deepspeed.utils import groups
from torch import nn

from skymoe.training.model import FeedForward, ModelArgs, MoEFeedForward, Router, Routing, Transformer

SHARED_PART = "shared"


class RouterGate(TopKGate):
    """A DeepSpeed gate that routes with skymoe's ``Router`` and returns DeepSpeed's sparse-route tuple
    (deepspeed 0.19: aux loss, capacity, n, expert ids [k, s] with -1 = dropped, slots, weights, counts)."""

    def __init__(self, router: Router, args: ModelArgs):
        super().__init__(args.dim, args.num_experts, k=args.top_k, min_capacity=args.min_capacity,
                         drop_tokens=True, use_rts=False, top2_2nd_expert_sampling=False)
        del self.wg  # the router's weight is the gate's only parameter
        self.router = router
        self.last_routing: Routing | None = None

    def forward(self, input: torch.Tensor, used_token=None, sparse_routes: bool = True, use_tutel: bool = False):
        if not sparse_routes or use_tutel:
            raise NotImplementedError("RouterGate serves DeepSpeed's sparse-route dispatch only")
        self.router.train(self.training)
        routing = self.router(input)
        self.last_routing = routing
        # DeepSpeed runs every expert over a [experts x capacity] buffer, filled or not. Kept slots of
        # expert j are 0..load[j]-1, so the busiest expert's load is all the buffer needs; every rank
        # of the expert-parallel group must agree on it for the all-to-all. (With capacity = tokens,
        # the full buffer would cost experts/k times the work: 4x for 8 experts, 8x for 16.)
        load = routing.stats["load"]
        needed = load.max().reshape(1).clamp(min=1)
        if self.ep_group is not None and torch.distributed.get_world_size(self.ep_group) > 1:
            torch.distributed.all_reduce(needed, op=torch.distributed.ReduceOp.MAX, group=self.ep_group)
        capacity = torch.clamp(needed[0], max=routing.capacity)
        return (routing.aux_loss, capacity, routing.probs.shape[1], routing.experts.t().to(torch.int32),
                routing.slots.t().to(torch.int32), routing.weights.t(), load)


class ExpertParallelMoE(nn.Module):
    """An MoE FFN whose experts are spread over ``ep_size`` ranks; this rank holds a contiguous slice."""

    def __init__(self, local: MoEFeedForward, args: ModelArgs, ep_size: int, ep_rank: int):
        super().__init__()
        self.ep_rank = ep_rank
        self.moe = MoE(args.dim, FeedForward(args.dim, args.ffn_dim), args.num_experts, ep_size=ep_size,
                       k=args.top_k, min_capacity=args.min_capacity, drop_tokens=True, use_rts=False,
                       top2_2nd_expert_sampling=False)
        self.moe.deepspeed_moe.gate = RouterGate(local.router, args)
        self.num_local = args.num_experts // ep_size
        for index, expert in enumerate(self.local_experts):
            source = local.experts[self.first_expert + index]
            if not any(param.is_meta for param in source.parameters()):  # a meta model has nothing to copy
                expert.load_state_dict(source.state_dict())
        self.register_buffer("aux_alpha", local.aux_alpha.detach().clone())

    @property
    def local_experts(self) -> nn.ModuleList:
        return self.moe.deepspeed_moe.experts.deepspeed_experts

    @property
    def first_expert(self) -> int:
        return self.ep_rank * self.num_local

    @property
    def last_routing(self) -> Routing | None:
        return self.moe.deepspeed_moe.gate.last_routing

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out, _, _ = self.moe(x)
        return out


def make_expert_parallel(model: Transformer, ep_size: int, ep_rank: int) -> Transformer:
    """Swap every local MoE layer of ``model`` for an expert-parallel one holding this rank's experts."""
    for layer in model.layers:
        if isinstance(layer.mlp, MoEFeedForward):
            layer.mlp = ExpertParallelMoE(layer.mlp, model.args, ep_size, ep_rank)
    return model


def build_rank_model(args: ModelArgs, ep_size: int, ep_rank: int) -> Transformer:
    """The model as this rank holds it, on the meta device: nothing allocated, not even the experts of
    other ranks. Give it storage with ``materialize``, then values (``Transformer.init_parameters``
    under ``plain_names``, or tensors read by plain name)."""
    with torch.device("meta"):
        model = Transformer(args)
        if args.num_experts:
            model = make_expert_parallel(model, ep_size, ep_rank)
    return model


@torch.no_grad()
def materialize(model: torch.nn.Module, device: torch.device | str) -> torch.nn.Module:
    """Uninitialised storage on ``device`` for every meta parameter and buffer of ``model``, in place.

    Unlike ``Module.to_empty`` this keeps the attributes DeepSpeed set on the parameter objects (an
    expert's ``allreduce = False`` and ``group_name``, which keep it out of the data-parallel
    all-reduce and put it in the expert optimizer groups) and keeps tied weights tied. Buffers become
    zeros; the model's rotary tables are recomputed."""
    replaced: dict[int, nn.Parameter] = {}
    for module in model.modules():
        for key, param in list(module._parameters.items()):
            if param is None or not param.is_meta:
                continue
            if id(param) not in replaced:
                new = nn.Parameter(torch.empty_like(param, device=device), requires_grad=param.requires_grad)
                new.__dict__.update(param.__dict__)
                replaced[id(param)] = new
            module._parameters[key] = replaced[id(param)]
        for key, buffer in list(module._buffers.items()):
            if buffer is not None and buffer.is_meta:
                module._buffers[key] = torch.zeros_like(buffer, device=device)
    if isinstance(model, Transformer):
        model.init_buffers(device)
    return model


def plain_names(model: torch.nn.Module) -> dict[str, str]:
    """Every state-dict name of ``model`` -> its plain ``Transformer`` name: the identity for a local
    model; in an expert-parallel one, routers under ``mlp.router`` and experts under their global index."""
    moe_modules = {name: module for name, module in model.named_modules() if isinstance(module, ExpertParallelMoE)}
    names: dict[str, str] = {}
    for name in model.state_dict(keep_vars=True):
        owner = next((m for m in moe_modules if name.startswith(m + ".")), None)
        if owner is None:
            names[name] = name
            continue
        module, inner = moe_modules[owner], name[len(owner) + 1 :]
        if inner.startswith("moe.deepspeed_moe.gate.router."):
            names[name] = f"{owner}.router.{inner.rsplit('.', 1)[1]}"
        elif inner.startswith("moe.deepspeed_moe.experts.deepspeed_experts."):
            local, rest = inner.removeprefix("moe.deepspeed_moe.experts.deepspeed_experts.").split(".", 1)
            names[name] = f"{owner}.experts.{module.first_expert + int(local)}.{rest}"
        else:
            names[name] = f"{owner}.{inner}"
    return names


def rank_tensors(model: torch.nn.Module, names: dict[str, str]) -> dict[str, torch.Tensor]:
    """This rank's parameters and saved buffers by plain name (a tied weight once, under its first name)."""
    tensors: dict[str, torch.Tensor] = {}
    seen: set[int] = set()
    for name, tensor in model.state_dict(keep_vars=True).items():
        if id(tensor) not in seen:
            seen.add(id(tensor))
            tensors[names[name]] = tensor.data
    return tensors


def plain_state_parts(model: Transformer) -> dict[str, dict[str, torch.Tensor]]:
    """This rank's share of the weights under plain ``Transformer`` names, by part name: the shared
    (non-expert) tensors and this rank's experts under their global indices. A rank that is not the
    first data-parallel copy of its experts returns only what it must write (nothing, or shared)."""
    shared: dict[str, torch.Tensor] = {}
    experts: dict[str, torch.Tensor] = {}
    moe_modules = {name: module for name, module in model.named_modules() if isinstance(module, ExpertParallelMoE)}
    names = plain_names(model)
    for name, tensor in model.state_dict().items():
        plain = names[name]
        (experts if ".moe.deepspeed_moe.experts.deepspeed_experts." in name else shared)[plain] = tensor
    parts: dict[str, dict[str, torch.Tensor]] = {}
    if torch.distributed.get_rank() == 0:
        parts[SHARED_PART] = shared
    if experts and moe_modules:
        group = next(iter(moe_modules.values())).moe.expert_group_name
        if groups._get_expert_data_parallel_rank(group) == 0:
            parts[f"experts-ep{groups._get_expert_parallel_rank(group)}"] = experts
    return parts
