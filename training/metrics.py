"""Per-step measurements that need all ranks: routing statistics, expert similarity, validation loss.

Every function here is collective (all ranks call it at the same step) and returns the same
numbers on every rank, so decisions taken from them (the adaptive aux-loss coefficients) stay
identical across ranks.
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
        """Per layer over all ranks: drop rate, aux loss, gate ratios, load share per expert."""
        counts, means = self.counts.clone(), self.means.clone() / max(self.micro_batches, 1)
        dist.all_reduce(counts)
        dist.all_reduce(means)
        means /= dist.get_world_size()
        load = counts[:, 2:]
        return {
            "drop_rate": (counts[:, 0] / counts[:, 1].clamp(min=1)).tolist(),
            "aux_loss": means[:, 0].tolist(),
            "max1_max2": means[:, 1].tolist(),
            "max2_max3": means[:, 2].tolist(),
            "expert_load": (load / load.sum(1, keepdim=True).clamp(min=1)).tolist(),
        }


@torch.no_grad()
def expert_similarity(model: Transformer) -> list[float]:
    """Per MoE layer: the mean pairwise cosine similarity of its experts' flattened weights
    (Skywork-MoE's monitoring metric: 1.0 right after upcycling, falling as experts diverge).
    Experts held by other expert-parallel ranks are gathered for the measurement."""
    result = []
    for moe in model.moe_layers():
        parallel = isinstance(moe, ExpertParallelMoE)
        local = moe.local_experts if parallel else moe.experts
        vectors = torch.stack([torch.cat([p.float().flatten() for p in e.parameters()]) for e in local])
        if parallel and moe.moe.ep_size > 1:
            ep_group = moe.moe.deepspeed_moe.ep_group
            gathered = [torch.empty_like(vectors) for _ in range(dist.get_world_size(ep_group))]
            dist.all_gather(gathered, vectors.contiguous(), group=ep_group)
            vectors = torch.cat(gathered)
        unit = F.normalize(vectors, dim=1)
        cosine = unit @ unit.t()
        n = cosine.shape[0]
        result.append(((cosine.sum() - cosine.diagonal().sum()) / (n * (n - 1))).item())
    return result


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
