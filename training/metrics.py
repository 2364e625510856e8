"""Per-step measurements that need all ranks: routing statistics, expert similarity, validation loss.

They are collective (all ranks call them at the same step) and return the same numbers on every
rank, so decisions taken from them (the adaptive aux-loss coefficients) stay identical across ranks.
Model FLOPs and MFU are in ``training/flops.py``.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F

from skymoe.training.model import Transformer
from skymoe.training.parallel import ExpertParallelMoE


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
