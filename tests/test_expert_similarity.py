"""Expert similarity from a fixed random projection of each expert's weights: close to the exact
mean pairwise cosine at every level of similarity, 1 for identical experts, the global RNG
untouched, and the same on 2 expert-parallel gloo ranks (only projections are gathered) as on one
process holding every expert."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch

from conftest import run_two_ranks
from skymoe.training.metrics import expert_similarity, mean_pairwise_cosine, project_expert
from skymoe.training.model import FeedForward, ModelArgs, Transformer

REPO = Path(__file__).resolve().parent.parent
ARGS = ModelArgs(vocab_size=64, dim=32, n_layers=2, n_heads=2, ffn_dim=64, max_seq_len=16, num_experts=4, top_k=2)


def exact_similarity(experts: list[torch.nn.Module]) -> float:
    return mean_pairwise_cosine(torch.stack([torch.cat([p.flatten() for p in e.parameters()]) for e in experts]))


def experts_sharing(share: float, count: int = 8, seed: int = 0) -> list[FeedForward]:
    """``count`` experts, each ``share`` of one common expert plus the rest of its own random weights."""
    torch.manual_seed(seed)
    common = FeedForward(64, 128)
    experts = [FeedForward(64, 128) for _ in range(count)]
    with torch.no_grad():
        for expert in experts:
            for own, shared in zip(expert.parameters(), common.parameters()):
                own.copy_(share * shared + (1 - share) * own)
    return experts


@pytest.mark.parametrize("share", [0.0, 0.3, 0.5, 0.7, 0.9, 1.0])
def test_the_projection_is_close_to_the_exact_similarity(share):
    experts = experts_sharing(share)
    exact = exact_similarity(experts)
    projected = mean_pairwise_cosine(torch.stack([project_expert(e, 256) for e in experts]))
    assert projected == pytest.approx(exact, abs=0.05)
    if share == 1.0:
        assert projected == pytest.approx(1.0, abs=1e-6)


def test_the_projection_is_fixed_and_leaves_the_global_rng_alone():
    expert = experts_sharing(0.0, count=1)[0]
    state = torch.get_rng_state()
    first = project_expert(expert, 256)
    assert torch.equal(torch.get_rng_state(), state)  # deterministic resume restores the global RNG: untouched
    assert torch.equal(project_expert(expert, 256), first)
    assert not torch.equal(project_expert(expert, 256, seed=1), first)


def test_a_model_measures_every_moe_layer():
    torch.manual_seed(5)
    model = Transformer(ARGS)
    measured = expert_similarity(model)
    assert len(measured) == 2
    for value, moe in zip(measured, model.moe_layers()):
        assert value == pytest.approx(exact_similarity(list(moe.experts)), abs=0.05)


# Rank r holds experts 2r, 2r+1 of every MoE layer (ep_size 2) and measures with the others' projections.
WORKER = r"""
import os, sys
import torch
import deepspeed
deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
deepspeed.init_distributed(dist_backend="gloo", verbose=False)
from skymoe.training.metrics import expert_similarity
from skymoe.training.model import ModelArgs, Transformer
from skymoe.training.parallel import ExpertParallelMoE, make_expert_parallel
rank, out = int(os.environ["RANK"]), sys.argv[1]
model = Transformer(ModelArgs(**torch.load(os.path.join(out, "args.pt"))))
model.load_state_dict(torch.load(os.path.join(out, "state.pt")))
model = make_expert_parallel(model, ep_size=2, ep_rank=rank)
for layer in model.layers:
    if isinstance(layer.mlp, ExpertParallelMoE):
        layer.mlp.moe.set_deepspeed_parallelism()
torch.save(expert_similarity(model), os.path.join(out, f"rank{rank}.pt"))
deepspeed.comm.destroy_process_group()
"""


def test_two_expert_parallel_ranks_measure_what_one_process_does(tmp_path):
    torch.manual_seed(7)
    model = Transformer(ARGS)
    with torch.no_grad():  # experts part copies, part their own weights: a similarity well inside (0, 1)
        for moe in model.moe_layers():
            for expert in moe.experts[1:]:
                for own, first in zip(expert.parameters(), moe.experts[0].parameters()):
                    own.copy_(0.6 * first + 0.4 * own)
    torch.save(dataclasses.asdict(ARGS), tmp_path / "args.pt")
    torch.save(model.state_dict(), tmp_path / "state.pt")
    run_two_ranks(WORKER, tmp_path)

    one_process = expert_similarity(model)
    assert all(0.2 < value < 0.95 for value in one_process), one_process
    for rank in range(2):
        assert torch.load(tmp_path / f"rank{rank}.pt") == pytest.approx(one_process, abs=1e-6)
