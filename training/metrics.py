"""Per-step measurements: routing statistics, expert similarity, validation loss, model FLOPs and MFU.

The measurements that need all ranks (routing totals, expert similarity, validation loss) are
collective (all ranks call them at the same step) and return the same numbers on every rank, so
decisions taken from them (the adaptive aux-loss coefficients) stay identical across ranks.

MFU here is the figure published training runs report (PaLM appendix B; Megatron-Core and
Skywork-MoE quote the same): model FLOPs of a step (:func:`step_model_flops`, counting only the
expert routes that were computed) over the accelerators' data-sheet dense bf16 peak
(:func:`spec_peak_tflops`). It is not comparable with a peak measured on the machine, which the
trainer reports separately as ``mfu_vs_measured_matmul``.
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Mapping, Sequence

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F

from skymoe.training.model import ModelArgs, Transformer
from skymoe.training.parallel import ExpertParallelMoE

PEAK_ENV = "SKYMOE_PEAK_TFLOPS"
# Dense (no sparsity) bf16 tensor peaks per device in TFLOP/s, from the vendors' data sheets. Each
# pattern is searched as a whole word in ``torch.cuda.get_device_name()``; the first match wins, so
# variants come before their family name ("H100 PCIe" before "H100", the SXM part).
SPEC_PEAK_TFLOPS: tuple[tuple[str, float], ...] = (
    ("GH200", 989.0),
    ("H200 NVL", 835.0),
    ("H200", 989.0),
    ("H100 NVL", 835.0),
    ("H100 PCIe", 756.0),
    ("H100", 989.0),
    ("H800", 989.0),
    ("A100", 312.0),
    ("A800", 312.0),
    ("L40S", 362.0),
    ("L40", 181.0),
    ("L4", 121.0),
    ("B200", 2250.0),
    ("MI300X", 1307.0),
)


class RoutingTotals:
    """Routing statistics of the MoE layers summed over a step's micro-batches on this rank.

    The sums live on the model's device: NCCL reduces only GPU tensors."""

    def __init__(self, num_layers: int, num_experts: int, device: torch.device):
        self.counts = torch.zeros(num_layers, 2 + num_experts, dtype=torch.float64, device=device)  # dropped, routes, load
        self.means = torch.zeros(num_layers, 3, dtype=torch.float64, device=device)  # aux loss, max1/max2, max2/max3
        self.micro_batches = 0

    def add(self, model: Transformer) -> None:
        for index, moe in enumerate(model.moe_layers()):
            routing = moe.last_routing
            stats = routing.stats
            self.counts[index, 0] += stats["dropped"].item()
            self.counts[index, 1] += stats["routes"].item()
            self.counts[index, 2:] += stats["load"].double()
            self.means[index] += torch.stack([routing.aux_loss.detach(), stats["max1_max2"],
                                              stats["max2_max3"]]).double()
        self.micro_batches += 1

    def reduce(self) -> dict[str, list]:
        """Per layer over all ranks: drop rate, routes computed (token-expert pairs an expert ran on,
        i.e. not dropped by capacity), aux loss, gate ratios, load share per expert."""
        counts, means = self.counts.clone(), self.means.clone() / max(self.micro_batches, 1)
        dist.all_reduce(counts)
        dist.all_reduce(means)
        means /= dist.get_world_size()
        load = counts[:, 2:]
        return {
            "drop_rate": (counts[:, 0] / counts[:, 1].clamp(min=1)).tolist(),
            "routes_computed": [int(kept) for kept in (counts[:, 1] - counts[:, 0]).tolist()],
            "aux_loss": means[:, 0].tolist(),
            "max1_max2": means[:, 1].tolist(),
            "max2_max3": means[:, 2].tolist(),
            "expert_load": (load / load.sum(1, keepdim=True).clamp(min=1)).tolist(),
        }


SIMILARITY_DIMS = 1024
SIMILARITY_SEED = 20240603
_SKETCH_CHUNK = 1 << 20  # weight coordinates projected at a time: 8 MiB of bucket draws, 4 MiB of values


@torch.no_grad()
def expert_similarity(model: Transformer, dims: int = SIMILARITY_DIMS) -> list[float]:
    """Per MoE layer: the mean pairwise cosine similarity of its experts' flattened weights
    (Skywork-MoE's monitoring metric: 1.0 right after upcycling, falling as experts diverge).

    Each expert's weights are first projected to ``dims`` numbers (:func:`project_expert`), and only
    the projections cross expert-parallel ranks, so no rank ever holds another rank's experts. The
    projection preserves inner products in expectation; the cosine of two projections differs from
    the exact one by about ``(1 - cos^2) / sqrt(dims)`` per pair, less on the mean over pairs, and
    identical experts (right after upcycling) give 1 up to rounding."""
    result = []
    for moe in model.moe_layers():
        parallel = isinstance(moe, ExpertParallelMoE)
        local = moe.local_experts if parallel else moe.experts
        vectors = torch.stack([project_expert(expert, dims) for expert in local])
        if parallel and moe.moe.ep_size > 1:
            ep_group = moe.moe.deepspeed_moe.ep_group
            gathered = [torch.empty_like(vectors) for _ in range(dist.get_world_size(ep_group))]
            dist.all_gather(gathered, vectors.contiguous(), group=ep_group)
            vectors = torch.cat(gathered)
        result.append(mean_pairwise_cosine(vectors))
    return result


def mean_pairwise_cosine(vectors: torch.Tensor) -> float:
    """Mean cosine similarity over all ordered pairs of distinct rows."""
    unit = F.normalize(vectors.float(), dim=1)
    cosine = unit @ unit.t()
    n = cosine.shape[0]
    return ((cosine.sum() - cosine.diagonal().sum()) / (n * (n - 1))).item()


@torch.no_grad()
def project_expert(expert: torch.nn.Module, dims: int, seed: int = SIMILARITY_SEED) -> torch.Tensor:
    """A fixed random projection of an expert's flattened weights to ``dims`` fp32 numbers.

    A count sketch (a sparse random-sign projection: each weight coordinate is added, with a random
    sign, into one of ``dims`` buckets) costs one pass over the weights whatever ``dims`` is, where a
    dense Gaussian matrix would cost ``dims`` passes, and it is generated chunk by chunk, so it needs
    about 12 MiB for any expert size. The buckets and signs of a chunk depend only on
    ``seed``, the parameter's position and the chunk's, so every expert on every rank is projected
    by the same matrix (on one device type). Its own generator leaves the global RNG, which
    deterministic resume restores, untouched."""
    params = list(expert.parameters())
    # Bucket b < dims adds with sign +, bucket dims + b with sign - into coordinate b: one draw and
    # one index_add per chunk give both the bucket and the sign.
    buckets = torch.zeros(2 * dims, dtype=torch.float32, device=params[0].device)
    generator = torch.Generator(device=buckets.device)
    for index, param in enumerate(params):
        flat = param.detach().reshape(-1)
        for chunk, start in enumerate(range(0, flat.numel(), _SKETCH_CHUNK)):
            values = flat[start:start + _SKETCH_CHUNK].float()
            generator.manual_seed(seed + 1_000_003 * index + chunk)
            draw = torch.randint(0, 2 * dims, values.shape, generator=generator, device=buckets.device)
            buckets.index_add_(0, draw, values)
    return buckets[:dims] - buckets[dims:]


@torch.no_grad()
def validation_loss(engine, model: Transformer, readers: dict, micro_batch: int, max_batches: int,
                    device: torch.device) -> dict[str, float]:
    """Mean next-token loss per ``<lang>/<source>`` on the validation split.

    Every rank runs the same number of equally shaped batches (expert parallelism exchanges
    tokens between ranks in every forward); a domain smaller than one round wraps around."""
    rank, world = dist.get_rank(), dist.get_world_size()
    engine.eval()
    losses = {}
    for domain, reader in readers.items():
        size = reader.num_sequences
        batches = min(max_batches, -(-size // (world * micro_batch)))
        total = torch.zeros(2, dtype=torch.float64, device=device)
        for batch in range(batches):
            first = (batch * world + rank) * micro_batch
            rows = np.stack([reader.sequence((first + i) % size) for i in range(micro_batch)])
            ids = torch.from_numpy(rows.astype(np.int64)).to(device)
            logits = engine(ids[:, :-1])
            loss = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1),
                                   reduction="sum")
            total += torch.stack([loss.double(), torch.tensor(ids[:, 1:].numel(), dtype=torch.float64, device=device)])
        dist.all_reduce(total)
        losses[domain] = (total[0] / total[1]).item()
    engine.train()
    return losses


# ------------------------------------------------------------------------------------------- MFU
def step_model_flops(args: ModelArgs, tokens: int, seq_len: int, routes_computed: Sequence[int]) -> float:
    """Model FLOPs of one training step (forward and backward) over ``tokens`` tokens of sequences
    ``seq_len`` long, by PaLM's formula (appendix B): 6 FLOPs per matmul weight per token it is
    applied to (2 forward, 4 backward), plus ``12 * n_layers * n_heads * head_dim * seq_len`` per
    token for the attention scores and weighted values (the full matrix, as PaLM counts it, although
    causal attention needs only half).

    Every token goes through the dense weights: attention projections, dense FFNs, routers and
    the output projection (the embedding lookup is no matmul). An expert's SwiGLU weights count
    once per route it computed: ``routes_computed[i]`` is the number of (token, expert) pairs MoE
    layer ``i`` ran in the step, top-k per token less the routes capacity dropped. Recomputation
    and the padding of experts' capacity buffers are hardware work, not model FLOPs.
    """
    moe_layers = [layer for layer in range(args.n_layers) if args.is_moe_layer(layer)]
    if len(routes_computed) != len(moe_layers):
        raise ValueError(f"routes_computed has {len(routes_computed)} values for {len(moe_layers)} MoE layers")
    attention = args.dim * args.head_dim * (2 * args.n_heads + 2 * args.kv_heads)
    ffn = 3 * args.dim * args.ffn_dim
    dense = (args.n_layers * attention + (args.n_layers - len(moe_layers)) * ffn
             + len(moe_layers) * args.num_experts * args.dim + args.vocab_size * args.dim)
    attention_scores = 12 * args.n_layers * args.n_heads * args.head_dim * seq_len
    return float(6 * dense * tokens + 6 * ffn * sum(routes_computed) + attention_scores * tokens)


def spec_peak_tflops(device_name: str | None, environ: Mapping[str, str] = os.environ) -> tuple[float | None, str]:
    """One accelerator's dense bf16 peak in TFLOP/s and where it comes from: ``SKYMOE_PEAK_TFLOPS``
    when set, else :data:`SPEC_PEAK_TFLOPS` for ``device_name`` (``torch.cuda.get_device_name()``),
    else None: a CPU or an unlisted device has no data-sheet figure, and none is made up."""
    override = peak_override(environ)
    if override is not None:
        return override, PEAK_ENV
    if device_name is None:
        return None, f"no data-sheet peak for a CPU (set {PEAK_ENV} to give one)"
    for pattern, tflops in SPEC_PEAK_TFLOPS:
        if re.search(rf"\b{re.escape(pattern)}\b", device_name):
            return tflops, f"data sheet: {pattern} dense bf16"
    return None, f"{device_name!r} is not in SPEC_PEAK_TFLOPS (training/metrics.py): set {PEAK_ENV}"


def peak_override(environ: Mapping[str, str] = os.environ) -> float | None:
    """``SKYMOE_PEAK_TFLOPS`` as a positive number of TFLOP/s per device, or None when unset."""
    text = environ.get(PEAK_ENV, "").strip()
    if not text:
        return None
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not math.isfinite(value) or value <= 0:
        raise ValueError(f"{PEAK_ENV}={text!r}: give one accelerator's peak as a positive number of TFLOP/s "
                         f"(989 for an H100/H200 SXM in bf16), or unset it to use the built-in table")
    return value
