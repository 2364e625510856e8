"""Benchmark skymoe's MoE layers (forward + backward, fp32, CPU) against Hugging Face Mixtral's sparse MoE block.

Layers, one shape (hidden, ffn, experts; top-2), one set of weights (skymoe's, drawn N(0, 0.02), copied
into Mixtral's ``gate.weight``, ``gate_up_proj[e] = [gate_proj; up_proj]`` and ``down_proj[e]``):
(a) skymoe's training layer ``skymoe.training.parallel.ExpertParallelMoE``: skymoe's ``RouterGate`` as the gate
    of ``deepspeed.moe.layer.MoE`` (sparse-route dispatch into an [experts, capacity, hidden] buffer ->
    ``Experts`` -> decode), ep_size 1 in this process (gloo, world size 1). The gate trims the buffer to
    the busiest expert's kept load: min(router capacity, max kept load), all-reduced over the expert group;
(b) skymoe's local layer ``skymoe.training.model.MoEFeedForward`` (same router; per expert: nonzero -> gather ->
    expert -> index_add_);
(c) ``transformers``' ``MixtralSparseMoeBlock`` (same-shape ``MixtralConfig``, no download, no router
    jitter, experts implementation ``eager``, transformers' default).
Equal work, checked first: skymoe's gating logit normalization (lambda, default 1.0) is a per-token
increasing affine map of the logits, so all pick the same top-k experts for every token; at lambda None
all compute the same function. Capacity: ``none`` = never drop; ``1.25`` = ``ModelArgs.capacity_factor``.
"Expert rows" = rows the experts run per forward: experts x buffer capacity for (a), kept routes for (b),
2 x tokens for (c).

Timed: one step = grads cleared, ``layer(x).backward(g)`` with a fixed upstream gradient (``x`` requires
grad; skymoe's aux loss is computed, not back-propagated). ``--warmup`` untimed rounds, then
``--repeats`` rounds, each one step of every variant, the order rotating each round. tokens/s: median over
rounds and best round (steadier on a shared machine); ratios skymoe / Mixtral, per round in brackets.
One process, ``torch.set_num_threads(--threads)``. ``--profile``: a ``torch.profiler`` op table per variant.

Run: ``python benchmarks/bench_moe_layer.py [--shapes 256x688x8 512x1376x8] [--tokens 4096] [--repeats 5]
[--threads 2] [--capacity-factors none 1.25] [--profile]`` (about 1 minute on 2 quiet cores). On a busy
machine ``--threads 1`` gives steadier numbers: 2 threads on 2 loaded cores mostly measure the scheduler.
"""

from __future__ import annotations

import argparse
import logging
import os
import platform
import socket
import sys
import time
from importlib.metadata import version
from pathlib import Path
from statistics import median

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from provenance import files_digest, git_state  # noqa: E402  (benchmarks/provenance.py, beside this script)

SOURCES = ("training/model.py", "training/parallel.py")
SEQ_LEN = 256  # the input is [tokens // SEQ_LEN, SEQ_LEN, hidden]
LABELS = {"ep": "(a) skymoe ExpertParallelMoE (DeepSpeed, ep 1)", "local": "(b) skymoe MoEFeedForward (local)",
          "mixtral": "(c) transformers MixtralSparseMoeBlock"}


def sources_digest() -> str:
    return files_digest(SOURCES)


def code_version() -> str:
    """git HEAD, uncommitted changes to the measured sources, and a digest of those sources as read."""
    return f"{git_state(SOURCES)}; sources digest {sources_digest()}"


def init_deepspeed() -> None:
    """A one-process gloo 'world' so DeepSpeed's MoE layer can make its (size 1) expert group."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    import deepspeed

    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    deepspeed.init_distributed(dist_backend="gloo")
    logging.getLogger("DeepSpeed").setLevel(logging.ERROR)


def parse_cf(text: str) -> float | None:
    return None if text.lower() == "none" else float(text)


def cap(key: tuple[str, float | None]) -> str:
    """The capacity column of a (layer, capacity factor) variant; Mixtral never drops."""
    return "-" if key[0] == "mixtral" else "none" if key[1] is None else f"{key[1]:g}"


def build(shape: tuple[int, int, int], lam: float | None) -> dict:
    """(a), (b) and (c) over one set of weights; (a) shares (b)'s router."""
    import torch
    from transformers import MixtralConfig
    from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock

    from skymoe.training.model import ModelArgs, MoEFeedForward
    from skymoe.training.parallel import ExpertParallelMoE

    hidden, ffn, experts = shape
    margs = ModelArgs(dim=hidden, ffn_dim=ffn, num_experts=experts, max_seq_len=SEQ_LEN, gate_norm_lambda=lam)
    torch.manual_seed(0)
    local = MoEFeedForward(margs)
    with torch.no_grad():
        for p in local.parameters():
            p.normal_(0.0, 0.02)
    ep = ExpertParallelMoE(local, margs, ep_size=1, ep_rank=0)
    ep.moe.set_deepspeed_parallelism()
    config = MixtralConfig(hidden_size=hidden, intermediate_size=ffn, num_local_experts=experts,
                           num_experts_per_tok=margs.top_k, router_jitter_noise=0.0, hidden_act="silu")
    config._experts_implementation = "eager"
    mixtral = MixtralSparseMoeBlock(config)
    with torch.no_grad():
        mixtral.gate.weight.copy_(local.router.weight)
        for e, expert in enumerate(local.experts):
            mixtral.experts.gate_up_proj[e].copy_(torch.cat([expert.gate_proj.weight, expert.up_proj.weight]))
            mixtral.experts.down_proj[e].copy_(expert.down_proj.weight)
    return {"ep": ep.train(), "local": local.train(), "mixtral": mixtral.train()}


def check(layers: dict, x, cfs) -> tuple[list[str], dict]:
    """Same top-k sets as Mixtral, same outputs at lambda None; per capacity, drops and expert rows."""
    import torch

    tokens = x.reshape(-1, x.shape[-1])
    router, gate = layers["local"].router, layers["ep"].moe.deepspeed_moe.gate
    lam = router.lam
    rows = {("mixtral", None): tokens.shape[0] * router.top_k}
    with torch.no_grad():
        _, _, mix_idx = layers["mixtral"].gate(tokens)
        router.capacity_factor = None
        same = torch.equal(router(tokens).experts.sort(-1).values, mix_idx.sort(-1).values)
        lines = [f"top-{router.top_k} expert sets equal to Mixtral's for every token (lambda {router.lam}): "
                 f"{'yes' if same else 'NO'}"]
        router.lam = None
        ref = layers["mixtral"](x)
        diffs = ", ".join(f"{name} {(layers[name](x) - ref).abs().max().item():.1e}" for name in ("ep", "local"))
        lines.append(f"outputs at lambda None, capacity none, max |diff| vs Mixtral: {diffs} "
                     f"(output max |value| {ref.abs().max().item():.1e})")
        router.lam = lam
        for cf in cfs:
            router.capacity_factor = cf
            routing = router(tokens)
            load, buffer = routing.stats["load"], int(gate(tokens)[1])  # gate()[1]: the capacity DeepSpeed gets
            rows[("ep", cf)], rows[("local", cf)] = buffer * load.numel(), int((routing.experts >= 0).sum())
            lines.append(f"capacity {cap(('ep', cf)):>4s}: router {routing.capacity} slots/expert, DeepSpeed buffer "
                         f"{buffer}; dropped routes {int(routing.stats['dropped'])}/{int(routing.stats['routes'])}, "
                         f"kept load min/max {int(load.min())}/{int(load.max())}")
    return lines, rows


def step(layer, x, g) -> None:
    layer.zero_grad(set_to_none=True)
    x.grad = None
    layer(x).backward(g)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shapes", nargs="+", default=["256x688x8", "512x1376x8"], help="HIDDENxFFNxEXPERTS each")
    ap.add_argument("--tokens", type=int, default=4096, help=f"tokens per step (a multiple of {SEQ_LEN})")
    ap.add_argument("--capacity-factors", type=parse_cf, nargs="+", default=[None, 1.25], help="'none' = never drop")
    ap.add_argument("--gate-norm-lambda", type=parse_cf, default=1.0, help="skymoe's; 'none' = plain softmax")
    ap.add_argument("--threads", type=int, default=2, help="torch.set_num_threads")
    ap.add_argument("--repeats", type=int, default=5, help="timed rounds; medians are reported")
    ap.add_argument("--warmup", type=int, default=1, help="untimed rounds first")
    ap.add_argument("--profile", action="store_true", help="also print a torch.profiler op table per variant")
    args = ap.parse_args()
    if args.tokens % SEQ_LEN:
        ap.error(f"--tokens must be a multiple of {SEQ_LEN}")
    wall = time.perf_counter()

    import torch
    from torch.profiler import profile

    torch.set_num_threads(args.threads)
    init_deepspeed()
    import transformers

    transformers.logging.set_verbosity_error()
    digest, load0 = sources_digest(), os.getloadavg()
    print(f"skymoe MoE layer benchmark  (python {platform.python_version()}, {platform.machine()}, "
          f"{os.cpu_count()} CPUs; torch {torch.__version__}, {torch.get_num_threads()} threads, fp32; "
          f"{args.repeats} rounds after {args.warmup} warm-up round(s))")
    print(f"skymoe code: {code_version()}; deepspeed {version('deepspeed')}, transformers {version('transformers')}")
    print(f"step = forward + backward of {args.tokens} tokens ([{args.tokens // SEQ_LEN}, {SEQ_LEN}, hidden] input "
          f"requiring grad), top-2; skymoe gate_norm_lambda {args.gate_norm_lambda}")

    for shape in [tuple(int(v) for v in s.lower().split("x")) for s in args.shapes]:
        layers = build(shape, args.gate_norm_lambda)
        router = layers["local"].router
        gen = torch.Generator().manual_seed(1)
        x = torch.randn(args.tokens // SEQ_LEN, SEQ_LEN, shape[0], generator=gen).requires_grad_(True)
        g = torch.randn(x.shape, generator=gen)
        print(f"\nshape hidden {shape[0]} / ffn {shape[1]} / {shape[2]} experts, {args.tokens} tokens:")
        lines, rows = check(layers, x.detach(), args.capacity_factors)
        print("\n".join(f"  {line}" for line in lines))
        order = [(name, cf) for name in ("ep", "local") for cf in args.capacity_factors] + [("mixtral", None)]
        rates: dict[tuple, list[float]] = {key: [] for key in order}
        for round_no in range(-args.warmup, args.repeats):  # rounds below 0 warm up, untimed
            for key in order[round_no % len(order):] + order[:round_no % len(order)]:
                router.capacity_factor = key[1]
                start = time.perf_counter()
                step(layers[key[0]], x, g)
                if round_no >= 0:
                    rates[key].append(args.tokens / (time.perf_counter() - start))
        ref = rates[("mixtral", None)]
        print(f"  tokens/s, forward + backward, median and best of {args.repeats} rounds; vs (c) = skymoe / Mixtral, "
              f"of medians, of bests, [per round]")
        print(f"    {'layer':48s} {'capacity':>8s} {'tok/s med':>10s} {'tok/s best':>10s} {'vs (c) med':>10s} "
              f"{'vs (c) best':>11s} {'expert rows':>11s}  per round")
        for key, r in rates.items():
            per = ", ".join(f"{a / c:.2f}" for a, c in zip(r, ref))
            print(f"    {LABELS[key[0]]:48s} {cap(key):>8s} {median(r):10.0f} {max(r):10.0f} "
                  f"{median(r) / median(ref):9.2f}x {max(r) / max(ref):10.2f}x {rows[key]:11d}  [{per}]")
        for key in order if args.profile else []:
            router.capacity_factor = key[1]
            with profile() as prof:
                for _ in range(3):
                    step(layers[key[0]], x, g)
            print(f"\n  profile, 3 steps: {LABELS[key[0]]}, capacity {cap(key)}")
            print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=12))
    print()
    if sources_digest() != digest:
        print("WARNING: the layer sources changed while this ran; the numbers may mix two versions")
    load1 = os.getloadavg()
    busy = max(load0[0], load1[0]) > (os.cpu_count() or 1)
    print(f"load average (1/5/15 min): start {' '.join(f'{v:.2f}' for v in load0)}, end "
          f"{' '.join(f'{v:.2f}' for v in load1)}, {os.cpu_count()} CPUs"
          + ("; other work shared the cores: the best-round ratios are the steadier ones" if busy else ""))
    print(f"Total wall time {time.perf_counter() - wall:.0f}s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
