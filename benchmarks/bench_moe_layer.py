"""Benchmark skymoe's MoE layers (forward + backward, fp32, CPU) against Hugging Face Mixtral's sparse MoE block.

Layers, all built at the same shape (hidden, ffn, experts, top-k 2) from the same weights:
(a) skymoe's training layer ``training.parallel.ExpertParallelMoE``: skymoe's ``Router`` as the gate of
    ``deepspeed.moe.layer.MoE`` (DeepSpeed's sparse-route dispatch: ``_route_slots`` -> ``_sparse_encode``
    into an [experts, capacity, hidden] buffer -> ``Experts`` -> ``_sparse_decode``), ep_size=1 in this one
    process (gloo, world size 1, its expert group made by ``moe.set_deepspeed_parallelism()``);
(b) skymoe's local layer ``training.model.MoEFeedForward`` (same router; a per-expert loop of
    nonzero -> gather -> expert -> index_add_);
(c) ``transformers.models.mixtral.modeling_mixtral.MixtralSparseMoeBlock`` from a ``MixtralConfig`` of the
    same shape (no download; ``router_jitter_noise`` 0; experts implementation ``eager``, transformers'
    default, unless ``--mixtral-impls`` names others; the first one named is the peer of every ratio).
With ``--with-proposed``, two changes to (a) are also timed, patched into this process only (the repo's
files are not edited), as proposals:
(a') ``RouterGate`` hands DeepSpeed a buffer capacity of min(capacity, the largest kept expert load)
    instead of the router's capacity (with ep_size > 1 the load would be all-reduced (MAX) over the
    expert group so every rank agrees); same routes, same outputs, fewer padded rows;
(a'') ``ExpertParallelMoE.forward`` with ep_size 1 skips DeepSpeed's dispatch buffer: the gate's routing,
    then ``MoEFeedForward``'s gather loop over the local experts (nothing to exchange with one rank).

Same weights: skymoe's router and experts are initialised N(0, 0.02) (as ``Transformer._init_weights``
does) and copied into Mixtral (``gate.weight``; ``gate_up_proj[e] = [gate_proj; up_proj]``,
``down_proj[e]``). Gating logit normalization (skymoe's default lambda 1.0) is a per-token increasing
affine map of the logits, so all layers pick the same top-k experts for every token; only the gate
values differ (checked before any timing, together with output equality at lambda None, where
skymoe's layers and Mixtral compute the same function).

Capacity: skymoe's router drops routes beyond its expert capacity in training. ``none`` = the router's
"never drop" setting (capacity = tokens); ``1.25`` = the default ``ModelArgs.capacity_factor``.
DeepSpeed's layer runs every expert over all ``capacity`` slots of its buffer, filled or not, so its
expert work is experts x capacity rows; "expert rows" shows the rows each layer runs per forward
(top-k x tokens for Mixtral, kept routes for (b)).

What is timed: one step = grads cleared, ``out = layer(x)``, ``out.backward(g)`` with a fixed random
upstream gradient ``g`` (input ``x`` requires grad, so the input gradient is computed too; skymoe's aux
loss is computed in the forward but not back-propagated, Mixtral computes none). ``--warmup`` steps per
variant first, then ``--repeats`` rounds, each timing ``--steps`` steps of every variant in turn (the
order rotates every round, so machine noise hits all alike); tokens/s = steps x tokens / wall seconds,
medians over rounds (and the best round, less sensitive to other load on a shared machine); ratios are
of medians, per-round ratios in brackets. All in one process, ``torch.set_num_threads(--threads)``.

``--breakdown``: where the time of one step goes, from ``torch.profiler`` over ``--profile-steps`` steps of
each skymoe layer (and Mixtral, for reference), attributed to pieces: forward ops by the piece they run
in (the gate / ``route()``, ``_route_slots`` + ``_sparse_encode``, the experts, ``_sparse_decode``; for (b)
the router, the expert FFNs, and the rest of ``MoEFeedForward.forward``: nonzero, gathers, index_add_),
backward ops by the forward op whose autograd node they run (its sequence number), so the pieces add
up to the profiled step. "GEMM" is the part in matmul kernels (aten::mm/addmm/bmm). Per step, ms.

Run: ``python benchmarks/bench_moe_layer.py [--shapes 256x688x8 512x1376x8] [--tokens 4096] [--repeats 5]
[--threads 2] [--capacity-factors none 1.25] [--with-proposed] [--breakdown]`` (about 2-5 minutes on 2
cores). On a busy machine, ``--threads 1`` gives steadier numbers (2 threads on 2 loaded cores mostly
measure the scheduler).
"""

from __future__ import annotations

import os

os.environ.setdefault("DS_ACCELERATOR", "cpu")

import argparse  # noqa: E402
import contextlib  # noqa: E402
import hashlib  # noqa: E402
import logging  # noqa: E402
import platform  # noqa: E402
import socket  # noqa: E402
import statistics  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from collections import defaultdict  # noqa: E402
from pathlib import Path  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

SOURCES = ("training/model.py", "training/parallel.py")
LAYERS = {"ep": "(a) skymoe ExpertParallelMoE (DeepSpeed MoE, ep 1)",
          "ep_trim": "(a') (a), DS buffer capacity = max kept load",
          "ep_fast": "(a'') (a), ep 1 fast path (no DS buffer)",
          "local": "(b) skymoe MoEFeedForward (local)"}
GEMM_OPS = {"aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm", "aten::_grouped_mm"}


def _version(package: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(package)
    except PackageNotFoundError:
        return "?"


def sources_digest() -> str:
    return hashlib.sha1(b"".join((ROOT / s).read_bytes() for s in SOURCES)).hexdigest()[:12]


def code_version() -> str:
    """git HEAD, uncommitted changes to the layer sources, and a digest of those sources as read."""
    try:
        head = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True,
                              text=True, timeout=10).stdout.strip() or "?"
        dirty = subprocess.run(["git", "-C", str(ROOT), "status", "--porcelain", "--", *SOURCES],
                               capture_output=True, text=True, timeout=10).stdout.split("\n")
        dirty = [line[3:] for line in dirty if line.strip()]
    except (OSError, subprocess.SubprocessError):
        head, dirty = "?", []
    return (f"git {head}{' + uncommitted ' + ', '.join(dirty) if dirty else ''}; {', '.join(SOURCES)} digest "
            f"{sources_digest()}")


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_deepspeed(port: int) -> None:
    """A one-process gloo 'world' so DeepSpeed's MoE layer can make its (size 1) expert group."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
    import deepspeed

    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    deepspeed.init_distributed(dist_backend="gloo")
    for name in ("DeepSpeed", "deepspeed"):
        logging.getLogger(name).setLevel(logging.ERROR)


def parse_shape(text: str) -> tuple[int, int, int]:
    try:
        hidden, ffn, experts = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"shape {text!r}: expected HIDDENxFFNxEXPERTS, e.g. 256x688x8") from None
    return hidden, ffn, experts


def parse_optional_float(text: str) -> float | None:
    return None if text.lower() == "none" else float(text)


def fmt_cf(cf: float | None) -> str:
    return "none" if cf is None else f"{cf:g}"


def fmt_shape(shape) -> str:
    return "/".join(map(str, shape))


def med(values: list[float]) -> float:
    return statistics.median(values)


# ------------------------------------------------------------------------------ layers
def trimmed_gate_class():
    """(a'): RouterGate handing DeepSpeed min(capacity, largest kept load) slots per expert."""
    import torch

    from training.parallel import RouterGate

    class TrimmedRouterGate(RouterGate):
        def forward(self, input, used_token=None, sparse_routes: bool = True, use_tutel: bool = False):
            aux, capacity, n, experts, slots, weights, counts = super().forward(input, used_token, sparse_routes,
                                                                               use_tutel)
            need = counts.max().reshape(1)  # kept slots of expert j are 0..counts[j]-1
            if self.ep_group is not None and torch.distributed.get_world_size(self.ep_group) > 1:
                torch.distributed.all_reduce(need, op=torch.distributed.ReduceOp.MAX, group=self.ep_group)
            return aux, torch.minimum(capacity, need[0]), n, experts, slots, weights, counts

    return TrimmedRouterGate


def ep1_fast_forward(self, x):
    """(a''): ExpertParallelMoE.forward for ep_size 1: the gate's routing, MoEFeedForward's gather loop."""
    import torch

    tokens = x.reshape(-1, x.shape[-1])
    gate = self.moe.deepspeed_moe.gate
    gate.router.train(gate.training)
    routing = gate.router(tokens)
    gate.last_routing = routing
    out = torch.zeros_like(tokens)
    for index, expert in enumerate(self.local_experts):
        token_ids, choice = torch.nonzero(routing.experts == index, as_tuple=True)
        if token_ids.numel():
            weight = routing.weights[token_ids, choice].unsqueeze(-1)
            out.index_add_(0, token_ids, (expert(tokens[token_ids]) * weight).to(out.dtype))
    return out.view_as(x)


def build(shape: tuple[int, int, int], args, seed: int):
    """skymoe's layers (and the proposals) and Mixtral's block(s), over one set of weights."""
    import types

    import torch
    from transformers import MixtralConfig
    from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock

    from training.model import ModelArgs, MoEFeedForward
    from training.parallel import ExpertParallelMoE

    hidden, ffn, experts = shape
    margs = ModelArgs(dim=hidden, ffn_dim=ffn, num_experts=experts, top_k=args.top_k, max_seq_len=args.seq_len,
                      gate_norm_lambda=args.gate_norm_lambda)
    torch.manual_seed(seed)
    local = MoEFeedForward(margs)
    with torch.no_grad():
        for p in local.parameters():
            p.normal_(0.0, 0.02)
    local.train()
    skymoe = {}
    for name in ("ep", "ep_trim", "ep_fast") if args.with_proposed else ("ep",):
        layer = ExpertParallelMoE(local, margs, ep_size=1, ep_rank=0)  # every one shares local.router
        layer.moe.set_deepspeed_parallelism()
        layer.train()
        if name == "ep_trim":
            layer.moe.deepspeed_moe.gate.__class__ = trimmed_gate_class()
        elif name == "ep_fast":
            layer.forward = types.MethodType(ep1_fast_forward, layer)
        skymoe[name] = layer
    skymoe["local"] = local
    mixtral = {}
    for impl in args.mixtral_impls:
        config = MixtralConfig(hidden_size=hidden, intermediate_size=ffn, num_local_experts=experts,
                               num_experts_per_tok=args.top_k, router_jitter_noise=0.0, hidden_act="silu")
        config._experts_implementation = impl
        block = MixtralSparseMoeBlock(config)
        with torch.no_grad():
            block.gate.weight.copy_(local.router.weight)
            for e, expert in enumerate(local.experts):
                block.experts.gate_up_proj[e].copy_(torch.cat([expert.gate_proj.weight, expert.up_proj.weight]))
                block.experts.down_proj[e].copy_(expert.down_proj.weight)
        block.train()
        mixtral[impl] = block
    return margs, local, skymoe, mixtral


def check(local, skymoe, mixtral, x, cfs) -> tuple[list[str], dict]:
    """Same top-k sets as Mixtral at the timed lambda, same outputs at lambda None; capacity and drops."""
    import torch

    lines, info = [], {}
    tokens = x.reshape(-1, x.shape[-1])
    peer = next(iter(mixtral.values()))
    router = local.router
    saved = (router.capacity_factor, router.lam)
    with torch.no_grad():
        _, _, mix_idx = peer.gate(tokens)
        router.capacity_factor = None
        same = torch.equal(router(tokens).experts.sort(-1).values, mix_idx.sort(-1).values)
        lines.append(f"top-{mix_idx.shape[1]} expert sets equal to Mixtral's for every token (lambda {router.lam}): "
                     f"{'yes' if same else 'NO'}")
        router.lam = None
        ref = peer(x)
        diffs = {name: (layer(x) - ref).abs().max().item() for name, layer in skymoe.items()}
        diffs.update({f"mixtral {impl}": (block(x) - ref).abs().max().item()
                      for impl, block in list(mixtral.items())[1:]})
        lines.append("outputs at lambda None, capacity none, max |diff| vs Mixtral: "
                     + ", ".join(f"{k} {v:.1e}" for k, v in diffs.items())
                     + f" (output max |value| {ref.abs().max().item():.1e})")
        router.lam = saved[1]
        for cf in cfs:
            router.capacity_factor = cf
            routing = router(tokens)
            load = routing.stats["load"]
            kept = int((routing.experts >= 0).sum())
            info[cf] = {"ep": routing.capacity * load.numel(), "ep_trim": min(routing.capacity, int(load.max()))
                        * load.numel(), "ep_fast": kept, "local": kept, "mixtral": tokens.shape[0] * router.top_k}
            lines.append(f"capacity {fmt_cf(cf):>4s}: {routing.capacity} slots/expert, dropped routes "
                         f"{int(routing.stats['dropped'])}/{int(routing.stats['routes'])}, kept expert load "
                         f"min/max {int(load.min())}/{int(load.max())} (mean of all routes "
                         f"{tokens.shape[0] * router.top_k / load.numel():.0f})")
    router.capacity_factor, router.lam = saved
    return lines, info


def step(layer, x, g) -> None:
    for p in layer.parameters():
        p.grad = None
    x.grad = None
    layer(x).backward(g)


# ------------------------------------------------------------------------------ breakdown
@contextlib.contextmanager
def labelled(pieces: list[tuple[object, str, str]]):
    """Wrap ``obj.attr`` (a module's forward or a module-level function) in a record_function range."""
    from torch.profiler import record_function

    saved = []
    for obj, attr, label in pieces:
        had = attr in vars(obj)
        original = getattr(obj, attr)

        def wrapper(*a, _f=original, _label=label, **k):
            with record_function(_label):
                return _f(*a, **k)

        saved.append((obj, attr, original, had))
        setattr(obj, attr, wrapper)
    try:
        yield
    finally:
        for obj, attr, original, had in reversed(saved):
            if had:
                setattr(obj, attr, original)
            else:
                delattr(obj, attr)  # back to the class's method


def profile_pieces(layer, x, g, pieces, labels, steps: int) -> dict:
    """{(piece, 'fwd'|'bwd'): [total us, GEMM us]} per step, from one profiler run over ``steps`` steps."""
    from torch.profiler import ProfilerActivity, profile

    with labelled(pieces):
        step(layer, x, g)
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            for _ in range(steps):
                step(layer, x, g)
    events = list(prof.events())

    def chain(e):
        while e is not None:
            yield e
            e = e.cpu_parent

    def backward_node(e):
        return next((a for a in chain(e) if a.name.startswith("autograd::engine::evaluate_function")), None)

    def piece(e):
        outer = None
        for a in chain(e):
            if a.name in labels:
                outer = a.name  # the outermost label wins (the gate calls the router)
        return outer

    seq_piece = {}
    for e in events:
        if e.sequence_nr >= 0 and backward_node(e) is None:
            seq_piece.setdefault(e.sequence_nr, piece(e))
    out: dict = defaultdict(lambda: [0.0, 0.0])
    for e in events:
        node = backward_node(e)
        if node is None:
            key = (piece(e) or "other", "fwd")
        elif "AccumulateGrad" in node.name:
            key = ("grad accumulation", "bwd")
        else:
            key = (seq_piece.get(node.sequence_nr) or "other", "bwd")
        cell = out[key]
        cell[0] += e.self_cpu_time_total / steps
        if e.name in GEMM_OPS:
            cell[1] += e.self_cpu_time_total / steps
    return out


def breakdown(skymoe, mixtral, x, g, steps: int) -> dict[str, tuple[list[str], dict]]:
    from deepspeed.moe import sharded_moe

    result = {}
    for name, layer in skymoe.items():
        if name == "local":
            pieces = [(layer.router, "forward", "router (matmul + route())")]
            pieces += [(expert, "forward", "expert FFNs") for expert in layer.experts]
            rest = "rest of forward (nonzero, gathers, weights, index_add_)"
        else:
            moe = layer.moe.deepspeed_moe
            if name == "ep_fast":
                pieces = [(moe.gate.router, "forward", "router (matmul + route())")]
                pieces += [(expert, "forward", "expert FFNs") for expert in layer.local_experts]
                rest = "rest of forward (nonzero, gathers, weights, index_add_)"
            else:
                pieces = [(moe.gate, "forward", "gate: RouterGate (router matmul + route() + counts)")]
                pieces += [(sharded_moe, "_route_slots", "_route_slots + _sparse_encode"),
                           (sharded_moe, "_sparse_encode", "_route_slots + _sparse_encode"),
                           (moe.experts, "forward", "experts on the [E, C, M] buffer (DS Experts)"),
                           (sharded_moe, "_sparse_decode", "_sparse_decode")]
                rest = "rest of forward (MOELayer glue)"
        labels = list(dict.fromkeys(label for _, _, label in pieces))
        result[name] = (labels + [rest], profile_pieces(layer, x, g, pieces, set(labels), steps), rest)
    block = next(iter(mixtral.values()))
    pieces = [(block.gate, "forward", "router"), (block.experts, "forward", "experts (loop + FFNs + index_add_)")]
    labels = [label for _, _, label in pieces]
    result["mixtral"] = (labels + ["rest of forward"], profile_pieces(block, x, g, pieces, set(labels), steps),
                         "rest of forward")
    return result


def print_breakdown(title: str, labels: list[str], cells: dict, rest: str) -> None:
    total = [sum(v[0] for v in cells.values()), sum(v[1] for v in cells.values())]
    print(f"    {title}: {total[0] / 1e3:.0f} ms/step profiled, {total[1] / 1e3:.0f} ms of it GEMM "
          f"({100 * total[1] / max(total[0], 1e-9):.0f}%)")
    print(f"      {'piece':56s} {'fwd ms':>8s} {'bwd ms':>8s} {'total':>8s} {'share':>6s} {'GEMM ms':>8s}")
    keys = [(label, label) for label in labels if label != rest] + [(rest, "other"),
                                                                     ("grad accumulation (.grad)", "grad accumulation")]
    for label, key in keys:
        fwd, bwd = cells.get((key, "fwd"), [0.0, 0.0]), cells.get((key, "bwd"), [0.0, 0.0])
        t = fwd[0] + bwd[0]
        if t:
            print(f"      {label:56s} {fwd[0] / 1e3:8.1f} {bwd[0] / 1e3:8.1f} {t / 1e3:8.1f} "
                  f"{100 * t / total[0]:5.1f}% {(fwd[1] + bwd[1]) / 1e3:8.1f}")


# ------------------------------------------------------------------------------ main
def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shapes", type=parse_shape, nargs="+", default=[(256, 688, 8), (512, 1376, 8)],
                    help="HIDDENxFFNxEXPERTS per shape")
    ap.add_argument("--tokens", type=int, default=4096, help="tokens per step (batch x seq-len)")
    ap.add_argument("--seq-len", type=int, default=256, help="sequence length of the [batch, seq, hidden] input")
    ap.add_argument("--top-k", type=int, default=2)
    ap.add_argument("--capacity-factors", type=parse_optional_float, nargs="+", default=[None, 1.25],
                    help="skymoe training capacity factors to time ('none' = never drop)")
    ap.add_argument("--gate-norm-lambda", type=parse_optional_float, default=1.0,
                    help="skymoe gating logit normalization lambda ('none' = plain softmax, as Mixtral)")
    ap.add_argument("--mixtral-impls", nargs="+", default=["eager"], choices=["eager", "batched_mm", "grouped_mm"],
                    help="transformers experts implementations to time; the first is the peer of the ratios")
    ap.add_argument("--threads", type=int, default=2, help="torch.set_num_threads for every layer")
    ap.add_argument("--repeats", type=int, default=5, help="timed rounds; medians are reported")
    ap.add_argument("--steps", type=int, default=1, help="forward+backward steps per variant per round")
    ap.add_argument("--warmup", type=int, default=1, help="untimed steps per variant before the rounds")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--with-proposed", action="store_true",
                    help="also time (a') trimmed DeepSpeed capacity and (a'') the ep 1 fast path (patched in here)")
    ap.add_argument("--breakdown", action="store_true", help="also profile where each layer's step time goes")
    ap.add_argument("--profile-steps", type=int, default=2, help="steps per profiled layer for --breakdown")
    args = ap.parse_args()
    if args.tokens % args.seq_len:
        ap.error("--tokens must be a multiple of --seq-len")
    wall = time.perf_counter()

    import torch

    torch.set_num_threads(args.threads)
    init_deepspeed(free_port())
    import transformers

    transformers.logging.set_verbosity_error()
    version, digest = code_version(), sources_digest()
    load0 = os.getloadavg()[0]
    print(f"skymoe MoE layer benchmark  (python {platform.python_version()}, {platform.machine()}, "
          f"{os.cpu_count()} CPUs, load average {load0:.1f}; torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads, fp32; {args.repeats} rounds x {args.steps} step(s) after "
          f"{args.warmup} warm-up step(s))")
    print(f"skymoe code: {version}; deepspeed {_version('deepspeed')}, transformers {_version('transformers')}")
    print(f"step = forward + backward of {args.tokens} tokens ([{args.tokens // args.seq_len}, {args.seq_len}, "
          f"hidden] input requiring grad), top-{args.top_k}; skymoe gate_norm_lambda {args.gate_norm_lambda}; "
          f"Mixtral experts implementation(s): {', '.join(args.mixtral_impls)}")

    peer = f"mixtral:{args.mixtral_impls[0]}"
    results = []  # (shape, {variant: [tok/s per round]}, {cf: {layer: rows}})
    breakdowns = []
    for shape in args.shapes:
        hidden = shape[0]
        margs, local, skymoe, mixtral = build(shape, args, args.seed)
        gen = torch.Generator().manual_seed(args.seed + 1)
        x = torch.randn(args.tokens // args.seq_len, args.seq_len, hidden, generator=gen).requires_grad_(True)
        g = torch.randn(x.shape, generator=gen)
        print()
        print(f"shape hidden {hidden} / ffn {shape[1]} / {shape[2]} experts, {args.tokens} tokens:")
        lines, rows = check(local, skymoe, mixtral, x.detach(), args.capacity_factors)
        for line in lines:
            print(f"  {line}")
        variants = {}  # name -> (layer, capacity factor)
        for name, layer in skymoe.items():
            for cf in args.capacity_factors:
                variants[f"{name}@{fmt_cf(cf)}"] = (layer, cf)
        for impl, block in mixtral.items():
            variants[f"mixtral:{impl}"] = (block, None)
        for name, (layer, cf) in variants.items():
            local.router.capacity_factor = cf
            for _ in range(args.warmup):
                step(layer, x, g)
        rates: dict[str, list[float]] = {name: [] for name in variants}
        order = list(variants)
        for round_no in range(args.repeats):
            shift = round_no % len(order)
            for name in order[shift:] + order[:shift]:
                layer, cf = variants[name]
                local.router.capacity_factor = cf
                start = time.perf_counter()
                for _ in range(args.steps):
                    step(layer, x, g)
                rates[name].append(args.steps * args.tokens / (time.perf_counter() - start))
        results.append((shape, rates, rows))
        if args.breakdown:
            for cf in args.capacity_factors:
                local.router.capacity_factor = cf
                breakdowns.append((shape, cf, breakdown(skymoe, mixtral, x, g, args.profile_steps)))
        local.router.capacity_factor = margs.capacity_factor

    print()
    print(f"Throughput, tokens/s, forward + backward (median and best of {args.repeats} rounds); ratios vs "
          f"(c) Mixtral {args.mixtral_impls[0]}: of medians, of bests, [per round]; expert rows = rows the experts "
          f"run per forward")
    names = [n for n in LAYERS if n in results[0][1] or any(k.startswith(n + "@") for k in results[0][1])]
    for shape, rates, rows in results:
        print(f"  shape {fmt_shape(shape)} (hidden/ffn/experts), {args.tokens} tokens")
        print(f"    {'layer':48s} {'capacity':>8s} {'tok/s med':>10s} {'tok/s best':>10s} {'vs (c) med':>10s} "
              f"{'vs (c) best':>11s} {'expert rows':>11s}  per round")
        ref = rates[peer]
        for name in names:
            for cf in args.capacity_factors:
                r = rates[f"{name}@{fmt_cf(cf)}"]
                per = ", ".join(f"{a / c:.2f}" for a, c in zip(r, ref))
                print(f"    {LAYERS[name]:48s} {fmt_cf(cf):>8s} {med(r):10.0f} {max(r):10.0f} "
                      f"{med(r) / med(ref):9.2f}x {max(r) / max(ref):10.2f}x {rows[cf][name]:11d}  [{per}]")
        for impl in args.mixtral_impls:
            r = rates[f"mixtral:{impl}"]
            per = ", ".join(f"{a / c:.2f}" for a, c in zip(r, ref))
            print(f"    {'(c) transformers MixtralSparseMoeBlock ' + impl:48s} {'-':>8s} {med(r):10.0f} {max(r):10.0f} "
                  f"{med(r) / med(ref):9.2f}x {max(r) / max(ref):10.2f}x "
                  f"{rows[args.capacity_factors[0]]['mixtral']:11d}  [{per}]")
    print()
    print(f"Side by side: skymoe's training layer (a) vs (c) Mixtral {args.mixtral_impls[0]}, target >= 1.00x "
          f"(ratio of medians; of bests in brackets)")
    for shape, rates, _ in results:
        ref = rates[peer]
        for cf in args.capacity_factors:
            cells = []
            for name in names:
                r = rates[f"{name}@{fmt_cf(cf)}"]
                ratio = med(r) / med(ref)
                verdict = (" MET" if ratio >= 1.0 else " NOT MET") if name == "ep" else ""
                cells.append(f"{LAYERS[name].split(' ', 1)[0]} {ratio:.2f}x{verdict} [{max(r) / max(ref):.2f}x]")
            print(f"  {fmt_shape(shape):12s} capacity {fmt_cf(cf):>4s}:  " + ";  ".join(cells))
    if breakdowns:
        print()
        print(f"Breakdown (torch.profiler, {args.profile_steps} steps per layer, per step; backward ops attributed to "
              f"the piece whose forward op made their autograd node; 'other' = ops outside the pieces)")
        for shape, cf, result in breakdowns:
            print(f"  shape {fmt_shape(shape)}, capacity {fmt_cf(cf)}")
            for name, (labels, cells, rest) in result.items():
                title = LAYERS.get(name, f"(c) Mixtral {args.mixtral_impls[0]}")
                print_breakdown(title, labels, cells, rest)
    print()
    if sources_digest() != digest:
        print("WARNING: the layer sources changed while this ran; the numbers may mix two versions")
    load1 = os.getloadavg()[0]
    if max(load0, load1) > (os.cpu_count() or 1):
        print(f"NOTE: load average {load0:.1f} -> {load1:.1f} on {os.cpu_count()} CPUs: other work shared the cores; "
              f"the best-round ratios are the steadier ones")
    print(f"Total wall time {time.perf_counter() - wall:.0f}s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
