"""Each expert-parallel rank materialises and initialises only what it holds (issue 16, item 2).

The trainer's ``initial_model`` builds the model on the meta device, makes it expert-parallel there,
gives storage to the shared tensors and the rank's own experts only, then fills them: random values
from (seed, plain name) per parameter, ``weights`` and ``upcycle`` read tensor by tensor. So every
layout (ep_size, rank) starts from the same global weights, and a rank's peak memory is its share.
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys

import pytest
import torch

from conftest import REPO, run_two_ranks
from skymoe.storage import Storage
from skymoe.training.model import ModelArgs, Transformer
from skymoe.training.spec import RunInit
from skymoe.training.upcycle import UpcycleError, dense_args, upcycle_state
from skymoe.training.weights import WeightsError, WeightsReader, save_args, save_part

pytest.importorskip("deepspeed")
os.environ.setdefault("DS_ACCELERATOR", "cpu")

from skymoe.training.parallel import ExpertParallelMoE, materialize, build_rank_model, plain_names  # noqa: E402
from skymoe.training.trainer import initial_model  # noqa: E402

ARGS = ModelArgs(vocab_size=97, dim=32, n_layers=3, n_heads=4, ffn_dim=48, max_seq_len=16, num_experts=8,
                 moe_every=1, qkv_bias=True, capacity_factor=None)
SEED = 11


def assembled(args: ModelArgs, init: RunInit, ep_size: int,
              storage: Storage | None = None) -> dict[str, torch.Tensor]:
    """The global state dict put together from every rank's slice (plain names); no name twice
    except the shared tensors, which every rank holds and which must agree."""
    merged: dict[str, torch.Tensor] = {}
    for rank in range(ep_size):
        model = initial_model(args, init, SEED, storage or Storage(), ep_size, rank)
        names = plain_names(model)
        for name, tensor in model.state_dict().items():
            plain = names[name]
            if ".experts." in plain:
                assert plain not in merged, f"{plain} held by two ranks"
            elif plain in merged:
                assert torch.equal(merged[plain], tensor), f"ranks disagree on shared {plain}"
            merged[plain] = tensor
    return merged


def assert_same_state(got: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> None:
    assert set(got) == set(expected)
    for name, tensor in expected.items():
        assert torch.equal(got[name], tensor), name


def record_reads(monkeypatch) -> list[str]:
    reads: list[str] = []
    original = WeightsReader.read

    def read(self, name):
        reads.append(name)
        return original(self, name)

    monkeypatch.setattr(WeightsReader, "read", read)
    return reads


# ------------------------------------------------------------------------------------------- random
@pytest.mark.parametrize("tie", [False, True])
def test_random_init_is_the_same_global_model_on_every_layout(tie):
    args = dataclasses.replace(ARGS, tie_embeddings=tie)
    one = assembled(args, RunInit("random"), 1)
    for ep_size in (2, 4, 8):
        assert_same_state(assembled(args, RunInit("random"), ep_size), one)
    assert_same_state(Transformer(args, seed=SEED).state_dict(), one)  # the plain model draws the same
    if tie:
        assert torch.equal(one["lm_head.weight"], one["embed_tokens.weight"])
    # The rules of Transformer._init_weights: normal(init_std) matrices, zero biases, unit norms.
    for name, tensor in one.items():
        if name.endswith(("layernorm.weight", "norm.weight")):
            assert torch.equal(tensor, torch.ones_like(tensor)), name
        elif name.endswith(".bias"):
            assert not tensor.any(), name
        elif name.endswith(".weight"):
            assert tensor.std().item() == pytest.approx(args.init_std, rel=0.15), name
        else:
            assert name.endswith(".mlp.aux_alpha") and tensor.item() == 0.0
    # Every expert, layer and matrix has its own draw; another seed draws anew.
    weights = [t for n, t in one.items() if n.endswith("gate_proj.weight")]
    assert len(weights) == args.n_layers * args.num_experts
    assert len({t.sum().item() for t in weights}) == len(weights)
    other = Transformer(args, seed=SEED + 1).state_dict()
    name = "layers.0.mlp.experts.3.up_proj.weight"
    assert not torch.equal(other[name], one[name])


def test_meta_build_allocates_nothing_and_materialize_keeps_deepspeed_attributes():
    args = dataclasses.replace(ARGS, tie_embeddings=True)
    model = build_rank_model(args, 4, 3)
    assert all(t.is_meta for t in model.state_dict().values())
    materialize(model, "cpu")
    assert not any(t.is_meta for t in list(model.state_dict().values()) + [model.rope_cos, model.rope_sin])
    assert model.lm_head.weight is model.embed_tokens.weight
    expected = Transformer(args)
    assert torch.equal(model.rope_cos, expected.rope_cos) and torch.equal(model.rope_sin, expected.rope_sin)
    for layer in model.layers:
        assert isinstance(layer.mlp, ExpertParallelMoE) and len(layer.mlp.local_experts) == 2
        for param in layer.mlp.local_experts.parameters():  # what keeps experts out of the data-parallel all-reduce
            assert param.allreduce is False and param.group_name == "ep_size_4"
    names = plain_names(model)
    experts = sorted({int(n.split(".experts.")[1].split(".")[0]) for n in names.values() if ".experts." in n})
    assert experts == [6, 7]


# ------------------------------------------------------------------------------------------ upcycle
@pytest.mark.parametrize("moe_every", [1, 2])
def test_upcycle_on_every_layout_is_upcycle_state(tmp_path, moe_every, monkeypatch):
    args = dataclasses.replace(ARGS, moe_every=moe_every)
    storage, folder = Storage(), str(tmp_path / "dense")
    torch.manual_seed(1)
    dense = Transformer(dense_args(args))
    save_part(storage, folder, "shared", dense.state_dict())
    save_args(storage, folder, dense.args)
    expected = upcycle_state(dense.state_dict(), args, SEED)
    reads = record_reads(monkeypatch)
    for ep_size in (1, 2, 4):
        assert_same_state(assembled(args, RunInit("upcycle", folder), ep_size, storage), expected)
    assert reads and set(reads) <= set(dense.state_dict())  # tensor by tensor, each from the dense folder
    reads.clear()
    initial_model(args, RunInit("upcycle", folder), SEED, storage, 2, 1)
    assert sorted(reads) == sorted(set(dense.state_dict()))  # each once, however many local experts copy it
    # Experts are exact copies of their layer's dense FFN; routers fresh (the random init's, same seed).
    random = Transformer(args, seed=SEED).state_dict()
    for name, tensor in expected.items():
        if ".mlp.experts." in name:
            head, tail = name.split(".mlp.experts.")
            assert torch.equal(tensor, dense.state_dict()[f"{head}.mlp.{tail.split('.', 1)[1]}"]), name
        elif ".mlp.router." in name:
            assert torch.equal(tensor, random[name]), name
    assert all(not expected[n].any() for n in expected if n.endswith(".router.bias"))
    # Mismatched dense weights are still refused, before anything is read.
    reads.clear()
    with pytest.raises(UpcycleError, match="shape"):
        initial_model(dataclasses.replace(args, ffn_dim=64), RunInit("upcycle", folder), SEED, storage, 2, 1)
    assert not reads


# ------------------------------------------------------------------------------------------ weights
def test_weights_init_reads_only_the_ranks_own_tensors(tmp_path, monkeypatch):
    """An MoE weights folder written by 2 ranks (shared, experts-ep0, experts-ep1) loads into 1, 2 or
    4 ranks; a rank reads the shared tensors and its own experts, nothing else."""
    args = ARGS
    storage, folder = Storage(), str(tmp_path / "moe")
    source = Transformer(args, seed=3)
    with torch.no_grad():
        for index, layer in enumerate(source.moe_layers()):
            layer.router.bias.uniform_()
            layer.aux_alpha.fill_(0.1 * index)
    state = source.state_dict()
    half = args.num_experts // 2
    expert = lambda name: int(name.split(".experts.")[1].split(".")[0])  # noqa: E731
    save_part(storage, folder, "shared", {n: t for n, t in state.items() if ".experts." not in n})
    for part in range(2):
        save_part(storage, folder, f"experts-ep{part}",
                  {n: t for n, t in state.items() if ".experts." in n and expert(n) // half == part})
    reads = record_reads(monkeypatch)
    for ep_size in (1, 2, 4):
        assert_same_state(assembled(args, RunInit("weights", folder), ep_size, storage), state)
    reads.clear()
    initial_model(args, RunInit("weights", folder), SEED, storage, 4, 1)
    assert {expert(n) for n in reads if ".experts." in n} == {2, 3}
    assert len(reads) == len(set(reads)) == len({n for n in state if ".experts." not in n or expert(n) in (2, 3)})

    # Weights saved before the router had a bias load with a zero one; a folder that does not fit is refused.
    old = str(tmp_path / "old")
    save_part(storage, old, "shared", {n: t for n, t in state.items() if not n.endswith(".router.bias")})
    loaded = assembled(args, RunInit("weights", old), 2, storage)
    assert all(not loaded[n].any() for n in loaded if n.endswith(".router.bias"))
    with pytest.raises(WeightsError, match="does not fit"):
        initial_model(dataclasses.replace(args, n_layers=4), RunInit("weights", folder), SEED, storage, 2, 0)
    with pytest.raises(WeightsError, match="shapes"):
        initial_model(dataclasses.replace(args, vocab_size=98), RunInit("weights", folder), SEED, storage, 2, 0)


# ------------------------------------------------------------------------------- two real ranks
TWO_RANKS = r"""
import json, os, sys
import torch, torch.nn.functional as F
import deepspeed
deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
deepspeed.init_distributed(dist_backend="gloo", verbose=False)
from skymoe.storage import Storage
from skymoe.training.model import ModelArgs
from skymoe.training.parallel import ExpertParallelMoE
from skymoe.training.spec import RunInit
from skymoe.training.trainer import initial_model
rank, out = int(os.environ["RANK"]), sys.argv[1]
args = ModelArgs(**json.loads(sys.argv[2]))
model = initial_model(args, RunInit("random"), int(sys.argv[3]), Storage(), 2, rank).train()
for layer in model.layers:
    if isinstance(layer.mlp, ExpertParallelMoE):
        layer.mlp.moe.set_deepspeed_parallelism()
ids = torch.load(os.path.join(out, f"ids{rank}.pt"))
logits = model(ids)
F.cross_entropy(logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten()).backward()
torch.save({"logits": logits.detach()}, os.path.join(out, f"rank{rank}.pt"))
deepspeed.comm.destroy_process_group()
"""


def test_two_ranks_built_from_meta_compute_the_one_rank_model(tmp_path):
    """Two gloo ranks (ep_size 2), each built by ``initial_model`` with half of the experts, route
    through DeepSpeed's all-to-all and give the logits of the whole model built in one process."""
    args = dataclasses.replace(ARGS, n_layers=2)
    batches = [torch.randint(0, args.vocab_size, (2, args.max_seq_len),
                             generator=torch.Generator().manual_seed(rank)) for rank in range(2)]
    for rank, ids in enumerate(batches):
        torch.save(ids, tmp_path / f"ids{rank}.pt")
    run_two_ranks(TWO_RANKS, tmp_path, json.dumps(args.to_dict()), str(SEED))
    local = Transformer(args, seed=SEED).train()
    with torch.no_grad():
        for rank, ids in enumerate(batches):
            got = torch.load(tmp_path / f"rank{rank}.pt")["logits"]
            torch.testing.assert_close(got, local(ids), atol=1e-5, rtol=0)


# ------------------------------------------------------------------------------------- peak memory
# A shape where the experts are ~94% of the bytes: 2 MoE layers of 16 experts (dim 1,024, FFN 2,816),
# 1.17 GB in fp32. A rank of ep_size 2 holds 0.53 of it.
BIG = ModelArgs(vocab_size=4096, dim=1024, n_layers=2, n_heads=16, ffn_dim=2816, max_seq_len=64, num_experts=16,
                moe_every=1)

PEAK_WORKER = r"""
import hashlib, json, os, sys
import torch
from skymoe.storage import Storage
from skymoe.training.model import ModelArgs, Transformer
from skymoe.training.parallel import make_expert_parallel, plain_names
from skymoe.training.spec import RunInit
from skymoe.training.trainer import initial_model

def rss_kb():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") // 1024

mode, ep_size, rank, uri, out = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4], sys.argv[5]
args = ModelArgs(**json.loads(sys.argv[6]))
torch.manual_seed(0)
torch.empty(8).normal_()  # one-off set-up costs, not the model's: the first draw, and the first
with torch.device("meta"):  # module built on the meta device (~80 MiB of torch's meta kernels, loaded once)
    Transformer(ModelArgs(num_experts=2))
start = rss_kb()
if mode == "whole":  # what the trainer did before: the whole model, then this rank's slice of it
    model = make_expert_parallel(Transformer(args), ep_size, rank)
else:
    model = initial_model(args, RunInit(mode, uri or None), 7, Storage(), ep_size, rank)
# This process's own high-water mark (VmHWM): getrusage's ru_maxrss survives exec, so it would report
# the parent's resident size whenever the test process happens to be larger than this one.
peak = next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith("VmHWM:"))
held = {id(t): t.numel() * t.element_size() for t in model.state_dict().values()}
names = plain_names(model)
digests = {names[n]: hashlib.sha256(t.numpy().tobytes()).hexdigest() for n, t in model.state_dict().items()}
json.dump({"start_kb": start, "peak_kb": peak, "held_bytes": sum(held.values()), "digests": digests}, open(out, "w"))
"""


def measure(tmp_path, args: ModelArgs, mode: str, ep_size: int, rank: int, uri: str = "") -> dict:
    out = tmp_path / f"{mode}-{ep_size}-{rank}.json"
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu"}
    proc = subprocess.run([sys.executable, "-c", PEAK_WORKER, mode, str(ep_size), str(rank), uri, str(out),
                           json.dumps(args.to_dict())], cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    result = json.loads(out.read_text())
    result["growth_bytes"] = (result["peak_kb"] - result["start_kb"]) * 1024
    return result


def test_peak_memory_of_a_rank_is_its_own_share(tmp_path):
    assert_rank_memory_is_its_share(tmp_path, BIG)


@pytest.mark.slow
def test_peak_memory_of_a_small_preset_rank_is_its_own_share(tmp_path):
    """The same for the ``small`` preset as the train config builds it by default (8 experts in every
    layer, ~1B parameters, 4 GiB in fp32): several GiB of RAM and a few minutes."""
    from skymoe.config import TrainConfig
    from skymoe.training.presets import dense_shape, with_moe

    train = TrainConfig.model_validate({"model": {"preset": "small"}})
    assert_rank_memory_is_its_share(tmp_path, with_moe(dense_shape(train, seq_len=1024), train.moe))


def assert_rank_memory_is_its_share(tmp_path, args: ModelArgs) -> None:
    from skymoe.training.model import parameter_counts

    full_bytes = 4 * parameter_counts(args)["total"]
    one = measure(tmp_path, args, "random", 1, 0)
    ranks = [measure(tmp_path, args, "random", 2, rank) for rank in range(2)]
    old = measure(tmp_path, args, "whole", 2, 1)
    storage, dense_folder = Storage(), str(tmp_path / "dense")
    dense = Transformer(dense_args(args), seed=5)
    save_part(storage, dense_folder, "shared", dense.state_dict())
    del dense
    upcycled = [measure(tmp_path, args, "upcycle", 2, rank, dense_folder) for rank in range(2)]
    upcycled_one = measure(tmp_path, args, "upcycle", 1, 0, dense_folder)
    report = {name: (round(r["growth_bytes"] / 2**20), round(r["held_bytes"] / 2**20))
              for name, r in [("ep1", one), ("ep2 rank0", ranks[0]), ("ep2 rank1", ranks[1]),
                              ("ep2 rank1 before (whole model first)", old), ("upcycle ep2 rank0", upcycled[0]),
                              ("upcycle ep2 rank1", upcycled[1]), ("upcycle ep1", upcycled_one)]}
    print(f"\npeak RSS growth / held MiB (full model {full_bytes / 2**20:.0f} MiB):", json.dumps(report))

    # Peak = what the rank holds + a small overhead (one tensor's draw or read, allocator slack).
    with torch.device("meta"):
        largest = max(t.numel() * 4 for t in Transformer(args).state_dict().values())
    overhead = largest + 32 * 2**20
    assert one["held_bytes"] == full_bytes + 4 * sum(args.is_moe_layer(layer) for layer in range(args.n_layers))  # + aux_alpha
    moe_layers = sum(args.is_moe_layer(layer) for layer in range(args.n_layers))
    other_ranks_experts = 4 * moe_layers * (args.num_experts // 2) * 3 * args.dim * args.ffn_dim
    for result in ranks + upcycled:
        assert result["held_bytes"] < one["held_bytes"] - other_ranks_experts + 2**20
        assert result["growth_bytes"] < result["held_bytes"] + overhead
    assert old["growth_bytes"] > full_bytes  # the old path really built the whole model on a rank
    # The slices put together are the one-rank model, for random and upcycled starts alike.
    for whole, parts in ((one, ranks), (upcycled_one, upcycled)):
        shared = set(parts[0]["digests"]) & set(parts[1]["digests"])
        assert shared and all(parts[0]["digests"][n] == parts[1]["digests"][n] for n in shared)
        assert not any(".experts." in n for n in shared)
        merged = {**parts[0]["digests"], **parts[1]["digests"]}
        assert merged == whole["digests"]
        assert not set(parts[0]["digests"]) - set(whole["digests"])
