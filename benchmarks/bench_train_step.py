"""Achieved FLOP/s of skymoe's MoE training step as a fraction of this machine's measured matmul peak,
and MFU as published runs report it where the accelerator has a data-sheet peak.

The peer here is the hardware: the peak is what ``torch.matmul`` reaches on square matrices with
every core (fp32 and bf16, median of repeats), and the training step is the real thing - the
train stage's DeepSpeed ranks (``skymoe.training.launch``: 2 ranks, gloo, ZeRO-1, ep_size 2 by default)
training an MoE from random weights on the bundled demo corpus (cleaned and tokenized into a
temporary root first, not timed). Achieved FLOP/s = the model FLOPs of each step as the ranks' own
``metrics.jsonl`` records them (``step_model_flops``: PaLM's 6N + 12 L d T with N the dense weights
plus the expert weights of the routes computed, not those capacity dropped) over the step's time,
median of the steps after the first ``--warmup``. The in-run MFU is against the data-sheet peak
(none on a CPU) and ``mfu_vs_measured_matmul`` against the matmul FLOP/s the ranks measure at start-up.

Run: ``python benchmarks/bench_train_step.py [--preset tiny] [--steps 40] [--precision fp32|bf16]``
(about 2-3 minutes on 2 cores, most of it cleaning and tokenizing the demo corpus once).
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import tempfile
import time
from pathlib import Path

import torch

from skymoe.config import load_config
from skymoe.pipeline import run_pipeline
from skymoe.storage import Storage
from skymoe.training.launch import launch
from skymoe.training.model import parameter_counts
from skymoe.training.presets import dense_shape, with_moe
from skymoe.training.spec import RunInit, RunSpec


def matmul_peak(dtype: torch.dtype, n: int = 2048, repeats: int = 5) -> float:
    """Median FLOP/s of an n x n matmul with all of this process's threads."""
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    a @ b
    rates = []
    for _ in range(repeats):
        started = time.perf_counter()
        a @ b
        rates.append(2 * n**3 / (time.perf_counter() - started))
    return statistics.median(rates)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="tiny", choices=["tiny", "small"])
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--precision", default="fp32", choices=["fp32", "bf16"])
    parser.add_argument("--micro-batch", type=int, default=4)
    options = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)

    with tempfile.TemporaryDirectory(prefix="bench-train-") as tmp:
        root = str(Path(tmp, "root"))
        config = load_config(None, {"storage": {"root": root}, "train": {
            "model": {"preset": options.preset}, "micro_batch_size": options.micro_batch,
            "parallel": {"precision": options.precision}, "checkpoint_every": 10**6, "eval_every": 10**6,
            "similarity_every": 10**6}})
        storage = Storage.from_config(config.storage)
        _, tokens = run_pipeline(config, storage, ("clean", "tokenize"))
        seq_len, vocab = tokens.manifest.extra["seq_len"], tokens.manifest.extra["vocab_size"]
        args = with_moe(dense_shape(config.train, seq_len, vocab), config.train.moe)
        phase = config.train.scratch.model_copy(update={"steps": options.steps})
        spec = RunSpec(name="bench", run_uri=str(Path(tmp, "run")), tokens_uri=tokens.ref.uri, model=args.to_dict(),
                       init=RunInit("random"), phase=phase.model_dump(mode="json"),
                       train=config.train.model_dump(mode="json"), storage={}, local_dir=str(Path(tmp, "local")))
        launch(spec, config.train.parallel, Path(tmp, "specs"))
        rows = [json.loads(line) for line in Path(tmp, "run", "metrics.jsonl").read_text().splitlines()]

    steps = [row for row in rows if "tokens_per_s" in row][options.warmup:]
    tokens_per_s = statistics.median(row["tokens_per_s"] for row in steps)
    tokens_per_step = steps[0]["tokens"] / steps[0]["step"]
    achieved = statistics.median(row["model_flops"] * row["tokens_per_s"] / tokens_per_step for row in steps)
    spec_mfu = [row["mfu"] for row in steps if row["mfu"] is not None]
    peaks = {"fp32": matmul_peak(torch.float32), "bf16": matmul_peak(torch.bfloat16)}
    counts = parameter_counts(args)
    print(f"model: preset {options.preset}, {args.num_experts} experts top-{args.top_k}, "
          f"{counts['total'] / 1e6:.1f}M parameters ({counts['activated'] / 1e6:.1f}M activated), seq_len {seq_len}, "
          f"{config.train.parallel.world_size} ranks, ep_size {config.train.parallel.ep_size}, "
          f"ZeRO-{config.train.parallel.zero_stage}, {options.precision}")
    print(f"{'':32}{'value':>14}")
    print(f"{'training tokens/s (median)':32}{tokens_per_s:>14,.0f}")
    print(f"{'achieved GFLOP/s':32}{achieved / 1e9:>14.1f}")
    for name, peak in peaks.items():
        print(f"{f'matmul peak {name} GFLOP/s':32}{peak / 1e9:>14.1f}   step/peak = {achieved / peak:.1%}")
    if spec_mfu:
        label = f"MFU vs {steps[0]['peak_tflops']:g} TFLOP/s peak"
        print(f"{label:32}{statistics.median(spec_mfu):>14.1%}   (median, data-sheet peak per device)")
    else:
        print(f"{'MFU vs data-sheet peak':32}{'n/a':>14}   (no data-sheet peak for this device; "
              f"SKYMOE_PEAK_TFLOPS sets one)")
    mfu_measured = statistics.median(row["mfu_vs_measured_matmul"] for row in steps)
    print(f"{'mfu_vs_measured_matmul (median)':32}{mfu_measured:>14.1%}   (in-run, vs the ranks' start-up matmul)")


if __name__ == "__main__":
    main()
