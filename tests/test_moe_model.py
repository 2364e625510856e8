"""The MoE model (training/model.py), sparse upcycling (training/upcycle.py) and the DeepSpeed
expert-parallel layer (training/parallel.py), checked against hand-written references of the
method (docs/method.md sections 2-4): gate normalization, top-k routing with renormalised weights,
capacity dropping in first-choices-first order, the aux loss, upcycling equivalence and sizes."""

from __future__ import annotations

import copy
import dataclasses
import math
import os

import pytest
import torch
import torch.nn.functional as F

from conftest import free_port, run_two_ranks
from skymoe.training.model import (
    FeedForward,
    ModelArgs,
    MoEFeedForward,
    Router,
    Transformer,
    balance_loss,
    expert_capacity,
    normalize_logits,
    parameter_counts,
    route,
)
from skymoe.training.upcycle import UpcycleError, dense_args, upcycle, upcycle_state

TINY_MOE = ModelArgs(vocab_size=97, dim=32, n_layers=4, n_heads=4, ffn_dim=48, max_seq_len=16, num_experts=4,
                     top_k=2, init_std=0.2)


# ---------------------------------------------------------------------------------------- references
def hand_probs(logits: torch.Tensor, lam: float | None) -> torch.Tensor:
    """The gate of method.md section 3, in float64: softmax(lambda * (z - mean z) / std z)."""
    z = logits.double()
    if lam is not None:
        z = lam * (z - z.mean(-1, keepdim=True)) / z.std(-1, keepdim=True, correction=0)
    return torch.softmax(z, dim=-1)


def brute_route(probs: torch.Tensor, top_k: int, capacity: int):
    """The documented priority as a plain loop: every token's first choice in token order, then every
    second choice, ...; an expert holds ``capacity`` routes, slots numbered in the order they fill."""
    rows = probs.tolist()
    num_experts = len(rows[0])
    choices = [sorted(range(num_experts), key=lambda j: -row[j])[:top_k] for row in rows]
    experts = [[-1] * top_k for _ in rows]
    slots = [[None] * top_k for _ in rows]
    filled = [0] * num_experts
    for rank in range(top_k):
        for token, chosen in enumerate(choices):
            expert = chosen[rank]
            if filled[expert] < capacity:
                experts[token][rank] = expert
                slots[token][rank] = filled[expert]
                filled[expert] += 1
    return choices, experts, slots, filled


def random_logits(tokens: int, experts: int, seed: int, scale: float = 1.0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(tokens, experts, generator=generator) * scale


def tiny_ids(args: ModelArgs, batch: int = 2, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, args.vocab_size, (batch, args.max_seq_len), generator=generator)


def seeded_model(args: ModelArgs, seed: int) -> Transformer:
    torch.manual_seed(seed)
    return Transformer(args)


# ---------------------------------------------------------------------------------------- 1. normalization
@pytest.mark.parametrize("lam", [0.5, 1.0, 2.0, 3.7])
def test_normalize_logits_mean_zero_std_lambda(lam):
    # Tokens of very different offsets and scales: normalization removes both.
    scales, offsets = torch.linspace(0.1, 20.0, 64).unsqueeze(1), torch.linspace(-50, 50, 64).unsqueeze(1)
    logits = random_logits(64, 16, seed=1) * scales + offsets
    out = normalize_logits(logits, lam)
    assert out.shape == logits.shape
    torch.testing.assert_close(out.mean(-1), torch.zeros(64), atol=1e-4, rtol=0)
    torch.testing.assert_close(out.std(-1, correction=0), torch.full((64,), lam), atol=0, rtol=1e-4)
    # The order of the experts is kept (normalization is a positive affine map per token).
    assert torch.equal(out.argsort(-1), logits.argsort(-1))


def test_normalize_logits_none_is_identity():
    logits = random_logits(8, 6, seed=2) * 5 + 3
    out = normalize_logits(logits, None)
    assert torch.equal(out, logits)


# ---------------------------------------------------------------------------------------- 2. sharpness
def test_sharpness_grows_with_lambda():
    logits = random_logits(512, 16, seed=3)
    max_prob, ratio12, ratio23 = [], [], []
    for lam in (0.5, 1.0, 2.0):
        routing = route(logits, top_k=2, capacity=512, lam=lam)
        max_prob.append(routing.probs.max(-1).values.mean().item())
        ratio12.append(routing.stats["max1_max2"].item())
        ratio23.append(routing.stats["max2_max3"].item())
        # The logged ratios are what they say, from the gate distribution.
        ranked = hand_probs(logits, lam).topk(3, dim=-1).values
        assert ratio12[-1] == pytest.approx((ranked[:, 0] / ranked[:, 1]).mean().item(), rel=1e-5)
        assert ratio23[-1] == pytest.approx((ranked[:, 1] / ranked[:, 2]).mean().item(), rel=1e-5)
    assert max_prob[0] < max_prob[1] < max_prob[2]
    assert ratio12[0] < ratio12[1] < ratio12[2]
    assert ratio23[0] < ratio23[1] < ratio23[2]


def test_normalization_keeps_ratios_above_one_for_tiny_logits():
    # Method section 3: without normalization a gate with near-equal logits degenerates (ratios -> 1);
    # the normalized gate keeps Max1/Max2 well above 1 whatever the logit scale.
    logits = random_logits(256, 16, seed=4, scale=1e-3)
    plain = route(logits, top_k=2, capacity=256, lam=None).stats["max1_max2"].item()
    normalized = route(logits, top_k=2, capacity=256, lam=1.0).stats["max1_max2"].item()
    assert plain < 1.01
    assert normalized > 1.2


# ---------------------------------------------------------------------------------------- 3. top-k weights
@pytest.mark.parametrize("top_k", [1, 2, 3])
@pytest.mark.parametrize("lam", [None, 1.0])
def test_route_picks_top_k_with_renormalised_weights(top_k, lam):
    tokens, num_experts = 50, 8
    logits = random_logits(tokens, num_experts, seed=5 + top_k)
    routing = route(logits, top_k=top_k, capacity=tokens, lam=lam)
    probs = hand_probs(logits, lam)
    torch.testing.assert_close(routing.probs.double(), probs, atol=1e-6, rtol=1e-5)
    assert routing.experts.shape == routing.weights.shape == routing.slots.shape == (tokens, top_k)
    assert (routing.experts >= 0).all(), "capacity = tokens must drop nothing"
    assert routing.stats["dropped"].item() == 0
    for token in range(tokens):
        chosen = routing.experts[token].tolist()
        assert len(set(chosen)) == top_k
        expected = sorted(range(num_experts), key=lambda j: -probs[token, j].item())[:top_k]
        assert chosen == expected  # the k largest, largest first
        selected = probs[token, chosen]
        torch.testing.assert_close(routing.weights[token].double(), selected / selected.sum(), atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(routing.weights.sum(-1), torch.ones(tokens), atol=1e-6, rtol=0)
    assert routing.weights.dtype == torch.float32


# ---------------------------------------------------------------------------------------- 4. drops
@pytest.mark.parametrize(
    "tokens,num_experts,top_k,capacity,skew",
    [
        (40, 4, 2, 8, 0.0),     # total room 32 < 80 routes
        (37, 8, 2, 3, 0.0),
        (25, 5, 3, 6, 0.0),
        (30, 4, 1, 5, 0.0),
        (33, 4, 2, 6, 4.0),     # most first choices on expert 0: first choices are dropped as well
        (20, 6, 2, 1, 0.0),     # one slot per expert
    ],
)
def test_route_drop_accounting_matches_brute_force(tokens, num_experts, top_k, capacity, skew):
    logits = random_logits(tokens, num_experts, seed=tokens + capacity)
    logits[:, 0] += skew
    routing = route(logits, top_k=top_k, capacity=capacity, lam=1.0)
    choices, experts, slots, load = brute_route(routing.probs, top_k, capacity)

    assert torch.equal(routing.experts, torch.tensor(experts))
    dropped = sum(e == -1 for row in experts for e in row)
    assert 0 < dropped < tokens * top_k, "the case must drop some routes and keep some"
    assert routing.stats["dropped"].item() == dropped
    assert routing.stats["routes"].item() == tokens * top_k
    assert routing.stats["load"].tolist() == load
    assert routing.capacity == capacity
    seen = set()
    for token in range(tokens):
        for rank in range(top_k):
            expert = routing.experts[token, rank].item()
            if expert < 0:
                continue
            slot = routing.slots[token, rank].item()
            assert slot == slots[token][rank]
            assert 0 <= slot < capacity
            assert (expert, slot) not in seen
            seen.add((expert, slot))
    # The weights still belong to the token's top-k choices (drops do not re-route).
    for token in range(tokens):
        assert [e for e in routing.experts[token].tolist() if e >= 0] == \
            [e for e, kept in zip(choices[token], experts[token]) if kept >= 0]
    if skew:
        assert any(row[0] == -1 for row in experts), "the skewed case should drop first choices"


# ---------------------------------------------------------------------------------------- 5. capacity
@pytest.mark.parametrize(
    "tokens,num_experts,top_k,factor,minimum,expected",
    [
        (100, 8, 2, None, 4, 100),   # None = room for every token
        (3, 8, 2, None, 4, 3),       # None ignores the minimum: T is always enough
        (100, 8, 2, 1.25, 4, 32),    # ceil(2 * 100 / 8 * 1.25) = ceil(31.25)
        (64, 8, 2, 1.0, 4, 16),      # exact, no rounding up
        (10, 4, 1, 1.0, 1, 3),       # ceil(2.5)
        (8, 16, 2, 1.0, 4, 4),       # ceil(1.0) = 1 < minimum
        (8, 16, 2, 1.0, 0, 1),
    ],
)
def test_expert_capacity(tokens, num_experts, top_k, factor, minimum, expected):
    assert expert_capacity(tokens, num_experts, top_k, factor, minimum) == expected


def test_router_uses_train_and_eval_capacity_factors():
    args = dataclasses.replace(TINY_MOE, capacity_factor=0.5, eval_capacity_factor=2.0, min_capacity=1)
    router = Router(args)
    torch.nn.init.normal_(router.weight)
    x = torch.randn(40, args.dim)
    assert router.train()(x).capacity == math.ceil(2 * 40 / 4 * 0.5)
    assert router.eval()(x).capacity == math.ceil(2 * 40 / 4 * 2.0)
    router.eval_capacity_factor = None
    assert router(x).capacity == 40


# ---------------------------------------------------------------------------------------- 6. aux loss
def test_switch_balance_loss_counts_top_k_choices_and_is_one_when_balanced():
    """n * sum_j f_j * P_j: f_j from the top-k choices (before capacity, no gradient), P_j the mean gate."""
    args = dataclasses.replace(TINY_MOE, num_experts=4, top_k=2, balance_loss="switch", capacity_factor=0.5)
    torch.manual_seed(7)
    router = Router(args)
    torch.nn.init.normal_(router.weight, std=0.5)
    x = torch.randn(32, args.dim)
    routing = router.train()(x)
    assert (routing.experts == -1).any()  # capacity dropped routes: f still counts them
    weight = router.weight.detach().double().requires_grad_()
    probs = hand_probs(x.double() @ weight.t() + router.bias.detach().double(), args.gate_norm_lambda)
    chosen = F.one_hot(probs.topk(2, dim=-1).indices, 4).sum((0, 1)).double() / (32 * 2)
    expected = 4 * (chosen * probs.mean(0)).sum()
    assert routing.aux_loss.item() == pytest.approx(expected.item(), rel=1e-5)
    routing.aux_loss.backward()
    expected.backward()
    torch.testing.assert_close(router.weight.grad.double(), weight.grad, rtol=1e-4, atol=1e-7)
    # A uniform gate with every expert chosen equally often: the loss is exactly 1.
    uniform = route(torch.zeros(8, 4), top_k=2, capacity=8, lam=None, balance="switch")
    assert uniform.aux_loss.item() == pytest.approx(1.0)


@pytest.mark.parametrize("lam", [None, 1.0, 2.0])
def test_aux_loss_matches_formula_and_is_differentiable(lam):
    args = dataclasses.replace(TINY_MOE, num_experts=8, gate_norm_lambda=lam)
    torch.manual_seed(6)
    router = Router(args)
    torch.nn.init.normal_(router.weight, std=0.5)
    torch.nn.init.normal_(router.bias, std=0.5)
    x = torch.randn(64, args.dim)
    routing = router.train()(x)

    weight = router.weight.detach().double().requires_grad_()
    bias = router.bias.detach().double().requires_grad_()
    probs = hand_probs(x.double() @ weight.t() + bias, lam)
    expected = ((1.0 / args.num_experts - probs.mean(0)) ** 2).sum()
    assert routing.aux_loss.item() == pytest.approx(expected.item(), rel=1e-5, abs=1e-9)

    assert routing.aux_loss.requires_grad
    routing.aux_loss.backward()
    expected.backward()
    for learned, reference in ((router.weight, weight), (router.bias, bias)):  # the bias is learned too
        grad = learned.grad
        assert grad is not None and grad.norm() > 0
        assert ((grad.double() - reference.grad).norm() / reference.grad.norm()).item() < 1e-4


def test_router_bias_starts_at_zero_in_new_and_upcycled_models():
    moe = seeded_model(TINY_MOE, 5)
    dense = seeded_model(dense_args(TINY_MOE), 5)
    for model in (moe, upcycle(dense, TINY_MOE, seed=3)):
        routers = [layer.router for layer in model.moe_layers()]
        assert routers and all(torch.equal(r.bias, torch.zeros(TINY_MOE.num_experts)) for r in routers)
        assert all(r.weight.abs().sum() > 0 for r in routers)


@pytest.mark.parametrize("lam", [None, 1.0])
def test_router_bias_shifts_each_expert_before_normalization(lam):
    """z = W x + b, then normalization: a per-expert bias changes the gate even though normalization
    removes any shift shared by all experts."""
    args = dataclasses.replace(TINY_MOE, num_experts=6, gate_norm_lambda=lam)
    torch.manual_seed(4)
    router = Router(args)
    torch.nn.init.normal_(router.weight, std=0.5)
    x = torch.randn(32, args.dim)
    unbiased = router(x).probs
    with torch.no_grad():
        router.bias.copy_(torch.linspace(-1.0, 1.5, args.num_experts))
    probs = router(x).probs
    torch.testing.assert_close(probs.double(), hand_probs(x.double() @ router.weight.detach().double().t()
                                                         + router.bias.detach().double(), lam), atol=1e-5, rtol=0)
    assert (probs - unbiased).abs().max() > 0.01
    with torch.no_grad():
        router.bias.fill_(3.0)  # the same shift for every expert
    torch.testing.assert_close(router(x).probs, unbiased, atol=1e-5, rtol=0)


def test_weights_saved_without_a_router_bias_load_with_a_zero_one():
    """Weights written before the gate had a bias (strict load) compute what they computed then."""
    model = seeded_model(TINY_MOE, 13)
    ids = tiny_ids(TINY_MOE)
    with torch.no_grad():
        expected = model.eval()(ids)
    old = {name: tensor for name, tensor in model.state_dict().items() if not name.endswith(".router.bias")}
    assert len(old) < len(model.state_dict())
    loaded = seeded_model(TINY_MOE, 99)
    with torch.no_grad():
        for layer in loaded.moe_layers():
            layer.router.bias.fill_(0.5)
    loaded.load_state_dict(old)
    assert all(not layer.router.bias.any() for layer in loaded.moe_layers())
    with torch.no_grad():
        torch.testing.assert_close(loaded.eval()(ids), expected, atol=0, rtol=0)
    assert ".router.bias" not in "".join(old)  # the caller's dict is left as it was


def test_model_aux_loss_sums_alpha_weighted_layers():
    args = dataclasses.replace(TINY_MOE, moe_every=2)
    model = seeded_model(args, 7)
    model(tiny_ids(args))
    layers = model.moe_layers()
    assert len(layers) == 2
    assert model.aux_loss().item() == 0.0  # alpha starts at 0
    layers[0].aux_alpha.fill_(0.01)
    layers[1].aux_alpha.fill_(0.003)
    expected = 0.01 * layers[0].last_routing.aux_loss + 0.003 * layers[1].last_routing.aux_loss
    assert model.aux_loss().item() == pytest.approx(expected.item(), rel=1e-6)
    assert model.aux_loss().requires_grad


def union_router(router: Router, scope: str) -> Router:
    """A copy of ``router`` with its balance loss averaged over ``scope``."""
    args = dataclasses.replace(TINY_MOE, num_experts=router.weight.shape[0], balance_loss=router.balance,
                               balance_scope=scope)
    copied = Router(args)
    copied.load_state_dict(router.state_dict())
    return copied.train()


@pytest.mark.parametrize("form", ["skywork", "switch"])
def test_global_batch_aux_loss_is_the_loss_of_the_step_so_far(form):
    """One process, two micro-batches in a step: the first micro-batch's loss and gradient are its own;
    the second's loss is the loss over both, and its gradient that loss's, through its own tokens."""
    torch.manual_seed(21)
    router = union_router(Router(dataclasses.replace(TINY_MOE, num_experts=8, balance_loss=form)), "global_batch")
    torch.nn.init.normal_(router.weight, std=0.5)
    reference = union_router(router, "micro_batch")
    first, second = torch.randn(24, TINY_MOE.dim), torch.randn(40, TINY_MOE.dim)

    alone = router(first).aux_loss
    alone.backward()
    expected = reference(first).aux_loss
    expected.backward()
    assert alone.item() == pytest.approx(expected.item(), rel=1e-6)
    torch.testing.assert_close(router.weight.grad, reference.weight.grad, rtol=1e-5, atol=1e-9)

    router.zero_grad()
    both = router(second).aux_loss
    both.backward()
    union = reference(torch.cat([first, second])).aux_loss
    assert both.item() == pytest.approx(union.item(), rel=1e-5)
    assert abs(both.item() - reference(second).aux_loss.item()) > 1e-3 * union.item()  # not its own loss
    # d L_union / d weight with the first micro-batch's gates held, per token of the second (40 of 64).
    weight = router.weight.detach().clone().requires_grad_()
    first_probs, second_probs = (F.softmax(normalize_logits(x @ weight.t() + router.bias.detach(),
                                                            TINY_MOE.gate_norm_lambda), -1) for x in (first, second))
    mean_gate = (first_probs.detach().sum(0) + second_probs.sum(0)) / 64
    choice_share = reference(torch.cat([first, second])).stats["choices"].float() / (64 * TINY_MOE.top_k)
    (balance_loss(mean_gate, choice_share, form) * 64 / 40).backward()
    torch.testing.assert_close(router.weight.grad, weight.grad, rtol=1e-4, atol=1e-9)

    router.global_balance.reset()  # a new step
    assert router(second).aux_loss.item() == pytest.approx(reference(second).aux_loss.item(), rel=1e-6)
    totals = router.global_balance.totals.clone()
    router.eval()(first)  # evaluation routes without adding to the step's tokens
    assert torch.equal(router.global_balance.totals, totals)


def test_model_start_step_resets_every_global_batch_router():
    model = seeded_model(dataclasses.replace(TINY_MOE, balance_scope="global_batch"), 8).train()
    model(tiny_ids(TINY_MOE))
    routers = [module for module in model.modules() if isinstance(module, Router)]
    assert len(routers) == TINY_MOE.n_layers and all(r.global_balance.totals is not None for r in routers)
    model.start_step()
    assert all(router.global_balance.totals is None for router in routers)


# ---------------------------------------------------------------------------------------- 7. upcycling
@pytest.mark.parametrize("moe_every", [1, 2])
def test_upcycled_model_computes_the_dense_function(moe_every):
    moe_args = dataclasses.replace(TINY_MOE, moe_every=moe_every, capacity_factor=None)
    dense = seeded_model(dense_args(moe_args), 8)
    assert not dense.moe_layers()
    moe = upcycle(dense, moe_args, seed=1)
    assert len(moe.moe_layers()) == moe_args.n_layers // moe_every

    ids = tiny_ids(moe_args)
    with torch.no_grad():
        expected = dense.eval()(ids)
        assert expected.abs().max() > 0.1  # the comparison below is not between near-zero outputs
        for mode in ("train", "eval"):  # capacity_factor None (train), eval_capacity_factor None (eval)
            got = moe.train(mode == "train")(ids)
            torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)
            assert all(layer.last_routing.stats["dropped"].item() == 0 for layer in moe.moe_layers())

    dense_state = dense.state_dict()
    for index, layer in enumerate(moe.layers):
        dense_mlp = dense.layers[index].mlp
        if moe_args.is_moe_layer(index):
            assert isinstance(layer.mlp, MoEFeedForward)
            for expert in layer.mlp.experts:
                for name, tensor in expert.state_dict().items():
                    assert torch.equal(tensor, dense_mlp.state_dict()[name])
            assert layer.mlp.aux_alpha.item() == 0.0
        else:
            assert isinstance(layer.mlp, FeedForward)
            for name, tensor in layer.mlp.state_dict().items():
                assert torch.equal(tensor, dense_mlp.state_dict()[name])
    for name, tensor in moe.state_dict().items():
        if ".mlp." not in name:
            assert torch.equal(tensor, dense_state[name]), name

    # Routers are fresh: initialised (not zero), different per layer, not copies of any dense tensor,
    # reproducible from the seed and different under another seed.
    routers = [layer.router.weight.detach() for layer in moe.moe_layers()]
    assert all(r.abs().sum() > 0 for r in routers)
    for i in range(len(routers)):
        for j in range(i + 1, len(routers)):
            assert not torch.equal(routers[i], routers[j])
    for tensor in dense_state.values():
        for router in routers:
            if tensor.shape == router.shape:
                assert not torch.equal(tensor, router)
            if tensor.dim() == 2 and tensor.shape[1] == router.shape[1]:  # nor any row block of one
                rows = router.shape[0]
                assert not any(torch.equal(router, tensor[k : k + rows]) for k in range(tensor.shape[0] - rows + 1))
    again = upcycle_state(dense_state, moe_args, seed=1)
    other = upcycle_state(dense_state, moe_args, seed=2)
    name = next(k for k in again if k.endswith(".mlp.router.weight"))
    assert torch.equal(again[name], moe.state_dict()[name])
    assert not torch.equal(other[name], again[name])


def test_upcycled_model_differs_once_capacity_drops():
    # The equivalence above is not vacuous: with dropping capacity the MoE is no longer the dense model.
    moe_args = dataclasses.replace(TINY_MOE, capacity_factor=0.25, min_capacity=1)
    dense = seeded_model(dense_args(moe_args), 9)
    moe = upcycle(dense, moe_args)
    ids = tiny_ids(moe_args)
    with torch.no_grad():
        diff = (moe.train()(ids) - dense.eval()(ids)).abs().max().item()
    assert sum(layer.last_routing.stats["dropped"].item() for layer in moe.moe_layers()) > 0
    assert diff > 1e-3


def test_upcycle_rejects_mismatched_dense_weights():
    moe_args = TINY_MOE
    dense = seeded_model(dense_args(moe_args), 10)
    with pytest.raises(UpcycleError, match="shape"):
        upcycle(dense, dataclasses.replace(moe_args, ffn_dim=64))
    with pytest.raises(UpcycleError, match="shape"):
        upcycle(dense, dataclasses.replace(moe_args, vocab_size=101))
    with pytest.raises(UpcycleError, match="lack"):
        upcycle(dense, dataclasses.replace(moe_args, n_layers=moe_args.n_layers + 1))
    state = dense.state_dict()
    del state["layers.1.mlp.up_proj.weight"]
    with pytest.raises(UpcycleError, match="lack"):
        upcycle_state(state, moe_args, seed=0)


# ---------------------------------------------------------------------------------------- 8. local MoE layer
@pytest.mark.parametrize("train,capacity_factor,lam", [(True, 0.5, 1.0), (True, 0.75, None), (False, 0.5, 2.0)])
def test_moe_feedforward_matches_brute_force(train, capacity_factor, lam):
    args = dataclasses.replace(TINY_MOE, capacity_factor=capacity_factor, min_capacity=1, gate_norm_lambda=lam)
    torch.manual_seed(11)
    moe = MoEFeedForward(args).train(train)
    torch.nn.init.normal_(moe.router.weight, std=0.5)
    torch.nn.init.normal_(moe.router.bias, std=0.5)
    for expert in moe.experts:
        for p in expert.parameters():
            torch.nn.init.normal_(p, std=0.2)
    x = torch.randn(3, 10, args.dim)
    with torch.no_grad():
        out = moe(x)
    assert out.shape == x.shape

    tokens = x.reshape(-1, args.dim)
    probs = hand_probs(tokens @ moe.router.weight.detach().t() + moe.router.bias.detach(), lam)
    factor = capacity_factor if train else args.eval_capacity_factor
    capacity = expert_capacity(tokens.shape[0], args.num_experts, args.top_k, factor, args.min_capacity)
    choices, experts, _, _ = brute_route(probs, args.top_k, capacity)
    dropped = sum(e == -1 for row in experts for e in row)
    assert moe.last_routing.stats["dropped"].item() == dropped
    assert (dropped > 0) == train

    expected = torch.zeros_like(tokens)
    with torch.no_grad():
        for t in range(tokens.shape[0]):
            selected = probs[t, choices[t]]
            weights = selected / selected.sum()  # renormalised over the k choices, before dropping
            for rank, expert in enumerate(experts[t]):
                if expert >= 0:
                    expected[t] += weights[rank].float() * moe.experts[expert](tokens[t : t + 1])[0]
    torch.testing.assert_close(out.reshape(-1, args.dim), expected, atol=1e-5, rtol=1e-5)


# ---------------------------------------------------------------------------------------- 9. sizes
def test_parameter_counts_skywork_moe_146b():
    args = ModelArgs(vocab_size=65536, dim=4608, n_layers=52, n_heads=36, ffn_dim=12288, num_experts=16, top_k=2,
                     moe_every=1)
    counts = parameter_counts(args)
    assert 140e9 <= counts["total"] <= 150e9
    assert 20e9 <= counts["activated"] <= 24e9
    assert counts["embedding"] == 2 * 65536 * 4608 + 4608


@pytest.mark.parametrize(
    "overrides",
    [
        dict(num_experts=0, tie_embeddings=False),
        dict(num_experts=0, tie_embeddings=True),
        dict(num_experts=4, moe_every=1, tie_embeddings=False),
        dict(num_experts=4, moe_every=2, tie_embeddings=True),
        dict(num_experts=3, moe_every=1, top_k=1, n_kv_heads=2),
        dict(num_experts=4, n_kv_heads=2, qkv_bias=True),  # Qwen2's q/k/v biases
    ],
)
def test_parameter_counts_match_instantiated_model(overrides):
    args = dataclasses.replace(TINY_MOE, **overrides)
    model = Transformer(args)
    counts = parameter_counts(args)
    assert counts["total"] == sum(p.numel() for p in model.parameters())
    expert_size = 3 * args.dim * args.ffn_dim
    inactive = len(model.moe_layers()) * (args.num_experts - args.top_k) * expert_size
    assert counts["total"] - counts["activated"] == inactive
    embedding = model.embed_tokens.weight.numel() + model.norm.weight.numel()
    if not args.tie_embeddings:
        embedding += model.lm_head.weight.numel()
    assert counts["embedding"] == embedding


# ---------------------------------------------------------------------------------------- 10. expert parallel
@pytest.fixture(scope="module")
def dist_world():
    """A one-process gloo world for DeepSpeed's MoE layer, torn down after this module."""
    keys = ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE", "LOCAL_RANK", "DS_ACCELERATOR")
    saved = {key: os.environ.get(key) for key in keys}
    os.environ.update({"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port()), "RANK": "0", "WORLD_SIZE": "1",
                       "LOCAL_RANK": "0", "DS_ACCELERATOR": "cpu"})
    import deepspeed

    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    started = not torch.distributed.is_initialized()
    if started:
        deepspeed.init_distributed(dist_backend="gloo")
    yield deepspeed
    if started:
        deepspeed.comm.destroy_process_group()
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


def to_expert_parallel(model: Transformer) -> Transformer:
    from skymoe.training.parallel import ExpertParallelMoE, make_expert_parallel

    parallel = make_expert_parallel(model, ep_size=1, ep_rank=0)
    moe_layers = [layer.mlp for layer in parallel.layers if isinstance(layer.mlp, ExpertParallelMoE)]
    assert moe_layers
    for layer in moe_layers:
        layer.moe.set_deepspeed_parallelism()
    return parallel


def ep_name(name: str) -> str:
    """A local parameter name -> the expert-parallel model's name for it (ep_size 1)."""
    name = name.replace(".mlp.router.", ".mlp.moe.deepspeed_moe.gate.router.")
    return name.replace(".mlp.experts.", ".mlp.moe.deepspeed_moe.experts.deepspeed_experts.")


@pytest.mark.parametrize("moe_every", [1, 2])
def test_expert_parallel_matches_local_and_exports_plain_state(dist_world, moe_every):
    from skymoe.training.parallel import SHARED_PART, plain_state_parts

    args = dataclasses.replace(TINY_MOE, moe_every=moe_every, capacity_factor=0.75, min_capacity=1)
    local = seeded_model(args, 12)
    for index, layer in enumerate(local.moe_layers()):
        layer.aux_alpha.fill_(0.01 * (index + 1))
    parallel = to_expert_parallel(copy.deepcopy(local))
    assert len(parallel.moe_layers()) == len(local.moe_layers())
    ids = tiny_ids(args)

    # Train mode, with a capacity that drops routes: same logits, same drops, same aux loss, same gradients.
    local.train()
    parallel.train()
    local_logits, parallel_logits = local(ids), parallel(ids)
    torch.testing.assert_close(parallel_logits, local_logits, atol=1e-5, rtol=0)
    local_drops = [layer.last_routing.stats["dropped"].item() for layer in local.moe_layers()]
    parallel_drops = [layer.last_routing.stats["dropped"].item() for layer in parallel.moe_layers()]
    assert parallel_drops == local_drops
    assert sum(local_drops) > 0
    assert parallel.aux_loss().item() == pytest.approx(local.aux_loss().item(), rel=1e-5)

    target = tiny_ids(args, seed=1)
    for model, logits in ((local, local_logits), (parallel, parallel_logits)):
        loss = F.cross_entropy(logits.flatten(0, 1), target.flatten()) + model.aux_loss()
        loss.backward()
    parallel_params = dict(parallel.named_parameters())
    for name, param in local.named_parameters():
        other = parallel_params[ep_name(name)]
        assert other.grad is not None, name
        torch.testing.assert_close(other.grad, param.grad, atol=1e-5, rtol=1e-4, msg=name)

    # Eval mode (no dropping) agrees too.
    with torch.no_grad():
        torch.testing.assert_close(parallel.eval()(ids), local.eval()(ids), atol=1e-5, rtol=0)

    # Move the parallel model away from the local one (one SGD step, new alphas), then export it.
    with torch.no_grad():
        for param in parallel.parameters():
            param -= 0.5 * param.grad
        for layer in parallel.moe_layers():
            layer.aux_alpha.fill_(0.007)
    parts = plain_state_parts(parallel)
    assert set(parts) == {SHARED_PART, "experts-ep0"}
    merged: dict[str, torch.Tensor] = {}
    for part in parts.values():
        assert all(isinstance(t, torch.Tensor) for t in part.values())
        assert not set(part) & set(merged)
        merged.update(part)
    assert all(".experts." in name for name in parts["experts-ep0"])
    fresh = Transformer(args)
    assert set(merged) == set(fresh.state_dict())
    fresh.load_state_dict(merged, strict=True)
    assert all(layer.aux_alpha.item() == pytest.approx(0.007) for layer in fresh.moe_layers())
    with torch.no_grad():
        for mode in (True, False):
            expected = parallel.train(mode)(ids)
            torch.testing.assert_close(fresh.train(mode)(ids), expected, atol=1e-5, rtol=0)
        assert (fresh(ids) - local.eval()(ids)).abs().max() > 1e-3  # the export is the moved model


# Two ranks, ep_size 2 (each holds half of the experts): the all-to-all path and the global expert indices
# of the export, which a one-process world cannot reach. Each rank is its own Python process, and the
# workers below start with this rank's model, seeded as the test's one-process model is.
RANK_MODEL = r"""
import os, sys
import torch, torch.nn.functional as F
import deepspeed
deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
deepspeed.init_distributed(dist_backend="gloo", verbose=False)
from skymoe.training.model import ModelArgs, Transformer
from skymoe.training.parallel import make_expert_parallel, plain_state_parts
rank, out = int(os.environ["RANK"]), sys.argv[1]
args = ModelArgs(**torch.load(os.path.join(out, "args.pt")))
torch.manual_seed(13)
model = make_expert_parallel(Transformer(args), ep_size=2, ep_rank=rank).train()
for layer in model.moe_layers():
    layer.moe.set_deepspeed_parallelism()
"""
EP_WORKER = RANK_MODEL + r"""
ids, target = torch.load(os.path.join(out, f"batch{rank}.pt"))
logits = model(ids)
F.cross_entropy(logits.flatten(0, 1), target.flatten()).backward()
grads = {name: p.grad for name, p in model.named_parameters() if ".deepspeed_experts." in name or ".router." in name}
drops = [layer.last_routing.stats["dropped"].item() for layer in model.moe_layers()]
torch.save({"logits": logits.detach(), "drops": drops, "grads": grads, "parts": plain_state_parts(model)},
           os.path.join(out, f"rank{rank}.pt"))
deepspeed.comm.destroy_process_group()
"""


def test_expert_parallel_two_ranks_matches_local(tmp_path):
    args = dataclasses.replace(TINY_MOE, n_layers=2, capacity_factor=0.75, min_capacity=1)
    torch.save(dataclasses.asdict(args), tmp_path / "args.pt")
    batches = [(tiny_ids(args, seed=2 * r), tiny_ids(args, seed=2 * r + 1)) for r in range(2)]
    for rank, batch in enumerate(batches):
        torch.save(batch, tmp_path / f"batch{rank}.pt")
    run_two_ranks(EP_WORKER, tmp_path)
    results = [torch.load(tmp_path / f"rank{rank}.pt") for rank in range(2)]

    torch.manual_seed(13)
    local = Transformer(args).train()
    expert_grads: dict[str, torch.Tensor] = {}
    for rank, (ids, target) in enumerate(batches):
        local.zero_grad()
        logits = local(ids)
        torch.testing.assert_close(results[rank]["logits"], logits.detach(), atol=1e-5, rtol=0)
        drops = [layer.last_routing.stats["dropped"].item() for layer in local.moe_layers()]
        assert results[rank]["drops"] == drops
        F.cross_entropy(logits.flatten(0, 1), target.flatten()).backward()
        for name, param in local.named_parameters():
            if ".router." in name:  # the router is replicated: each rank has the gradient of its own tokens
                torch.testing.assert_close(results[rank]["grads"][ep_name(name)], param.grad, atol=1e-6, rtol=1e-4)
            elif ".experts." in name:
                expert_grads[name] = expert_grads.get(name, 0) + param.grad
    assert sum(sum(r["drops"]) for r in results) > 0
    # An expert lives on one rank and gets the gradient of both ranks' tokens routed to it (all-to-all backward).
    for rank, result in enumerate(results):
        for ep_param, grad in result["grads"].items():
            if ".router." in ep_param:
                continue
            layer, rest = ep_param.split(".mlp.moe.deepspeed_moe.experts.deepspeed_experts.")
            index, tail = rest.split(".", 1)
            name = f"{layer}.mlp.experts.{rank * 2 + int(index)}.{tail}"
            torch.testing.assert_close(grad, expert_grads.pop(name), atol=1e-6, rtol=1e-4)
    assert not expert_grads, "every expert is held by exactly one rank"

    # The export: rank 0 writes shared + experts 0-1, rank 1 writes experts 2-3, under global indices.
    assert set(results[0]["parts"]) == {"shared", "experts-ep0"}
    assert set(results[1]["parts"]) == {"experts-ep1"}
    merged: dict[str, torch.Tensor] = {}
    for result in results:
        for part in result["parts"].values():
            assert not set(part) & set(merged)
            merged.update(part)
    expected = local.state_dict()
    assert set(merged) == set(expected)
    for name, tensor in expected.items():
        assert torch.equal(merged[name], tensor), name


# The global-batch aux loss over two expert-parallel ranks: each rank routes its own batch, the loss
# averages over both.
AUX_WORKER = RANK_MODEL + r"""
for layer in model.moe_layers():
    layer.aux_alpha.fill_(1.0)
model.start_step()
model(torch.load(os.path.join(out, f"ids{rank}.pt")))
aux = model.aux_loss()
aux.backward()
grads = {name: p.grad for name, p in model.named_parameters() if ".deepspeed_experts." not in name}
torch.save({"aux": aux.item(), "grads": grads}, os.path.join(out, f"rank{rank}.pt"))
deepspeed.comm.destroy_process_group()
"""


@pytest.mark.parametrize("form", ["skywork", "switch"])
def test_global_batch_aux_loss_over_two_ranks_is_the_loss_of_their_union(tmp_path, form):
    """Each rank's loss is the loss over both ranks' tokens, and the ranks' gradients average (as the
    data-parallel all-reduce does) to that loss's gradient: the same as one process routing both batches.
    No capacity: a dropped route would change the later layers' inputs between the two layouts."""
    args = dataclasses.replace(TINY_MOE, n_layers=2, capacity_factor=None, balance_loss=form,
                               balance_scope="global_batch")
    torch.save(dataclasses.asdict(args), tmp_path / "args.pt")
    ids = [tiny_ids(args, seed=30 + rank) for rank in range(2)]
    for rank, rank_ids in enumerate(ids):
        torch.save(rank_ids, tmp_path / f"ids{rank}.pt")
    run_two_ranks(AUX_WORKER, tmp_path)
    results = [torch.load(tmp_path / f"rank{rank}.pt") for rank in range(2)]

    def one_process(batch: torch.Tensor) -> tuple[float, dict[str, torch.Tensor]]:
        torch.manual_seed(13)
        model = Transformer(dataclasses.replace(args, balance_scope="micro_batch")).train()
        for layer in model.moe_layers():
            layer.aux_alpha.fill_(1.0)
        model(batch)
        aux = model.aux_loss()
        aux.backward()
        return aux.item(), {name: p.grad for name, p in model.named_parameters()
                            if ".experts." not in name and p.grad is not None}  # lm_head and the last norm: none

    union_aux, union_grads = one_process(torch.cat(ids))
    assert any(".router." in name for name in union_grads) and any("self_attn" in name for name in union_grads)
    for rank, result in enumerate(results):
        assert result["aux"] == pytest.approx(union_aux, rel=1e-5)
        assert abs(result["aux"] - one_process(ids[rank])[0]) > 1e-3 * union_aux  # not the rank's own loss
    for name, grad in union_grads.items():
        mean = (results[0]["grads"][ep_name(name)] + results[1]["grads"][ep_name(name)]) / 2
        torch.testing.assert_close(mean, grad, atol=1e-7, rtol=1e-4)


def test_export_gives_weights_saved_without_a_router_bias_a_zero_one():
    from skymoe.training.export import _checked_state

    model = seeded_model(TINY_MOE, 14)
    old = {name: tensor for name, tensor in model.state_dict().items() if not name.endswith(".router.bias")}
    state = _checked_state(TINY_MOE, old, "old-weights")
    biases = [name for name in state if name.endswith(".router.bias")]
    assert len(biases) == len(model.moe_layers()) and all(not state[name].any() for name in biases)
