"""MFU as published runs report it: the model FLOP count on constructed numbers (dropped routes
left out), the routes a real MoE layer computed, the data-sheet peak table and its override, and
a real 2-rank run whose metrics carry both figures (no data-sheet MFU on a CPU)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from conftest import SMALL_TRAIN, random_tokens_output
from skymoe.config import PhaseConfig, load_config
from skymoe.storage import Storage
from skymoe.training.launch import launch
from skymoe.training.flops import PEAK_ENV, spec_peak_tflops, step_model_flops
from skymoe.training.metrics import RoutingTotals
from skymoe.training.model import ModelArgs, Transformer
from skymoe.training.presets import dense_shape, with_moe
from skymoe.training.spec import RunInit, RunSpec
from skymoe.training.runs import utilisation_summary
from skymoe.training.stage import STAGE, TrainError

# Layer 0 dense, layer 1 MoE; head_dim 4, grouped-query attention with one KV head.
ARGS = ModelArgs(vocab_size=100, dim=8, n_layers=2, n_heads=2, n_kv_heads=1, ffn_dim=16, max_seq_len=10,
                 num_experts=4, moe_every=2, top_k=2)


# ------------------------------------------------------------------------------ the FLOP count
def test_step_flops_by_hand():
    # Per token, by hand: attention q,k,v,o = 8*8 + 8*4 + 8*4 + 8*8 = 192 weights a layer, 2 layers = 384;
    # the dense FFN 3*8*16 = 384; the router 4*8 = 32; the output projection 100*8 = 800: 1,600 dense weights.
    # An expert has 3*8*16 = 384 weights. Attention scores: 12 * 2 layers * 8 * 10 positions = 1,920.
    tokens, routes = 40, 70  # 4 sequences of 10; 80 routes asked for (top-2), 10 dropped
    expected = 6 * 1600 * tokens + 6 * 384 * routes + 1920 * tokens
    assert expected == 622_080
    assert step_model_flops(ARGS, tokens, 10, [routes]) == expected


def test_dropped_routes_are_not_counted():
    all_routes = step_model_flops(ARGS, 40, 10, [80])
    assert all_routes - step_model_flops(ARGS, 40, 10, [70]) == 6 * 384 * 10
    dense = step_model_flops(ModelArgs(vocab_size=100, dim=8, n_layers=2, n_heads=2, ffn_dim=16), 40, 10, [])
    assert dense > 0
    with pytest.raises(ValueError, match="routes_computed has 2 values for 1 MoE layers"):
        step_model_flops(ARGS, 40, 10, [80, 80])


@pytest.fixture(scope="module")
def one_rank(tmp_path_factory):
    """RoutingTotals.reduce all-reduces: a one-process gloo group."""
    started = not dist.is_initialized()
    if started:
        dist.init_process_group("gloo", init_method=f"file://{tmp_path_factory.mktemp('dist') / 'store'}",
                                rank=0, world_size=1)
    yield
    if started:
        dist.destroy_process_group()


def test_routes_computed_are_the_rows_the_experts_ran_on(one_rank):
    args = ModelArgs(vocab_size=64, dim=16, n_layers=2, n_heads=2, ffn_dim=32, max_seq_len=16, num_experts=4,
                     top_k=2, capacity_factor=0.5, min_capacity=1)
    torch.manual_seed(3)
    model = Transformer(args).train()
    rows = {index: 0 for index in range(len(model.moe_layers()))}
    for index, moe in enumerate(model.moe_layers()):
        for expert in moe.experts:
            expert.register_forward_hook(
                lambda module, inputs, out, i=index: rows.__setitem__(i, rows[i] + len(inputs[0])))
    totals = RoutingTotals(len(model.moe_layers()), args.num_experts, torch.device("cpu"))
    for seed in range(2):  # two micro-batches
        model(torch.randint(0, args.vocab_size, (3, 16), generator=torch.Generator().manual_seed(seed)))
        totals.add(model)
    computed = totals.reduce()["routes_computed"]
    asked = 2 * 3 * 16 * args.top_k
    assert computed == [rows[0], rows[1]]
    assert all(0 < kept < asked for kept in computed)  # capacity 0.5 dropped routes in every layer
    tokens = 2 * 3 * 16
    assert step_model_flops(args, tokens, 16, computed) < step_model_flops(args, tokens, 16, [asked, asked])


# ------------------------------------------------------------------------------ the peak
@pytest.mark.parametrize("name, tflops", [
    ("NVIDIA H200", 989.0), ("NVIDIA H200 NVL", 835.0), ("NVIDIA GH200 480GB", 989.0),
    ("NVIDIA H100 80GB HBM3", 989.0), ("NVIDIA H100 PCIe", 756.0), ("NVIDIA A100-SXM4-80GB", 312.0),
    ("NVIDIA A100 80GB PCIe", 312.0), ("NVIDIA L40S", 362.0), ("NVIDIA L40", 181.0), ("NVIDIA L4", 121.0),
])
def test_data_sheet_peaks(name, tflops):
    peak, source = spec_peak_tflops(name, environ={})
    assert peak == tflops and "data sheet" in source


def test_no_peak_is_invented():
    assert spec_peak_tflops(None, environ={})[0] is None  # a CPU
    peak, source = spec_peak_tflops("NVIDIA GeForce RTX 4090", environ={})
    assert peak is None and PEAK_ENV in source


def test_the_environment_overrides_the_table():
    assert spec_peak_tflops("NVIDIA H100 80GB HBM3", environ={PEAK_ENV: "700"}) == (700.0, PEAK_ENV)
    assert spec_peak_tflops(None, environ={PEAK_ENV: " 0.5 "}) == (0.5, PEAK_ENV)


@pytest.mark.parametrize("value", ["fast", "0", "-989", "inf", "nan"])
def test_a_bad_override_is_refused_at_plan_time(value, monkeypatch, tmp_path):
    with pytest.raises(ValueError, match=f"{PEAK_ENV}='{value}': give one accelerator's peak"):
        spec_peak_tflops(None, environ={PEAK_ENV: value})
    monkeypatch.setenv(PEAK_ENV, value)
    config = load_config(None, {"storage": {"root": str(tmp_path)}})
    with pytest.raises(TrainError, match=PEAK_ENV):
        STAGE.check(config, Storage())


def test_the_summary_takes_medians_after_the_first_step():
    rows = [{"step": 0, "val_loss": {}}] + [
        {"step": step, "mfu": None, "peak_tflops": None, "mfu_vs_measured_matmul": value}
        for step, value in enumerate([0.01, 0.2, 0.4, 0.3], start=1)]
    assert utilisation_summary(rows) == {"mfu": None, "peak_tflops": None, "mfu_vs_measured_matmul": 0.3}
    assert utilisation_summary([]) == {}


# ------------------------------------------------------------------------------ a real run
SEQ_LEN, VOCAB = 32, 512


@pytest.fixture(scope="module")
def tokens_uri(tmp_path_factory) -> str:
    """A tokenize output as the stage writes it, of seeded random ids (the FLOP count needs no real text)."""
    return random_tokens_output(tmp_path_factory.mktemp("mfu-tokens"), "mfu", VOCAB, SEQ_LEN, rows=128)


def run_metrics(tokens_uri: str, folder: Path) -> tuple[ModelArgs, int, list[dict]]:
    """Four steps of a from-scratch MoE (2 ranks, ep_size 2) whose capacity drops routes."""
    moe = {**SMALL_TRAIN["moe"], "capacity_factor": 0.5, "min_capacity": 1}
    train = load_config(None, {"train": {**SMALL_TRAIN, "moe": moe, "checkpoint_every": 100}}).train
    args = with_moe(dense_shape(train, SEQ_LEN, VOCAB), train.moe)
    spec = RunSpec(name="scratch", run_uri=str(folder / "run"), tokens_uri=tokens_uri, model=args.to_dict(),
                   init=RunInit("random"), phase=PhaseConfig(steps=4, lr=2e-3, warmup_steps=1).model_dump(mode="json"),
                   train=train.model_dump(mode="json"), storage={}, local_dir=str(folder / "local"))
    launch(spec, train.parallel, folder / "specs")
    rows = [json.loads(line) for line in (folder / "run" / "metrics.jsonl").read_text().splitlines()]
    tokens_per_step = train.micro_batch_size * train.grad_accum * train.parallel.world_size * SEQ_LEN
    return args, tokens_per_step, [row for row in rows if "loss" in row]


def test_a_run_records_both_figures_per_step(tokens_uri, tmp_path, monkeypatch):
    monkeypatch.delenv(PEAK_ENV, raising=False)
    args, tokens, steps = run_metrics(tokens_uri, tmp_path / "cpu")
    assert len(steps) == 4
    moe_layers = sum(args.is_moe_layer(layer) for layer in range(args.n_layers))
    for row in steps:
        assert row["mfu"] is None and row["peak_tflops"] is None  # a CPU has no data-sheet peak
        assert 0 < row["mfu_vs_measured_matmul"] < 1
        assert len(row["routes_computed"]) == moe_layers
        assert sum(row["routes_computed"]) < moe_layers * args.top_k * tokens  # routes were dropped
        assert row["model_flops"] == step_model_flops(args, tokens, SEQ_LEN, row["routes_computed"])
    print(f"\nCPU, 2 ranks: mfu_vs_measured_matmul per step {[round(r['mfu_vs_measured_matmul'], 4) for r in steps]}, "
          f"mfu {[r['mfu'] for r in steps]}")

    monkeypatch.setenv(PEAK_ENV, "0.05")  # 50 GFLOP/s per rank, given by hand
    _, _, steps = run_metrics(tokens_uri, tmp_path / "given")
    for row in steps:
        seconds = tokens / row["tokens_per_s"]
        assert row["peak_tflops"] == 0.05
        assert row["mfu"] == pytest.approx(row["model_flops"] / seconds / (2 * 0.05e12), rel=1e-9)
