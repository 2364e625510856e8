"""One training run on one DeepSpeed rank: ``python -m skymoe.training.trainer <spec.json>`` under torchrun
or the deepspeed launcher (``training/launch.py`` starts it).

The loop: build the model (random, loaded or upcycled), make its MoE layers expert-parallel, wrap
it in a DeepSpeed engine (ZeRO-1 by default, a client AdamW so nothing is JIT-compiled on CPU),
resume from the latest complete checkpoint if any, then step through the token shards. After
each step the per-layer drop rates, summed over all ranks, drive the adaptive aux-loss
coefficients, so every rank takes the same decision. Metrics go to ``metrics.jsonl`` in the run
folder (per step also MFU against the accelerators' data-sheet peak and, separately, against the
matmul peak measured at start-up), checkpoints every ``checkpoint_every`` steps (the newest
``keep_checkpoints`` and those the evaluate stage reads are kept), the final weights to
``final/weights``.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time
from typing import Any, Iterator

import deepspeed
import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from deepspeed.moe.utils import split_params_into_different_moe_groups_for_optimizer
from deepspeed.utils import groups

from skymoe.training.data import TokenReader
from skymoe.config import AuxLossConfig, PhaseConfig, StorageConfig
from skymoe.progress import Progress
from skymoe.storage import Storage, join
from skymoe.training import checkpoint
from skymoe.training.flops import spec_peak_tflops, step_model_flops
from skymoe.training.metrics import RoutingTotals, expert_similarity, validation_loss
from skymoe.training.model import ModelArgs, Transformer
from skymoe.training.parallel import build_rank_model, materialize, plain_names, rank_tensors
from skymoe.training.schedule import learning_rate, next_alpha
from skymoe.training.spec import RunInit, RunSpec
from skymoe.training.upcycle import upcycle_into
from skymoe.training.weights import WeightsReader, load_into

log = logging.getLogger("skymoe.train")


def main(spec_path: str) -> None:
    spec = RunSpec.read(spec_path)
    rank = _init_distributed()
    logging.basicConfig(level=logging.INFO if rank == 0 else logging.WARNING, stream=sys.stdout,
                        format=f"[rank {rank}] %(message)s")
    Trainer(spec).train()
    dist.barrier()
    dist.destroy_process_group()


def _init_distributed() -> int:
    # Without this, DeepSpeed's first init JIT-compiles a shared-memory comm op for minutes on CPU.
    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    deepspeed.init_distributed(dist_backend=backend)
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    return dist.get_rank()


class Trainer:
    def __init__(self, spec: RunSpec):
        self.spec = spec
        self.train_cfg = spec.train
        self.phase = PhaseConfig(**spec.phase)
        self.aux = AuxLossConfig(**spec.train["aux_loss"])
        self.storage = Storage.from_config(StorageConfig(root=spec.run_uri, s3=spec.storage))
        self.rank, self.world = dist.get_rank(), dist.get_world_size()
        self.device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
        self.args = ModelArgs(**spec.model)
        precision = spec.train["parallel"]["precision"]
        self.bf16 = precision == "bf16" or (precision == "auto" and torch.cuda.is_available())

        self.model = self._build_model()
        self.engine = self._build_engine()
        self.micro_batch = spec.train["micro_batch_size"]
        self.accum = spec.train["grad_accum"]
        self.tokens_per_step = self.micro_batch * self.accum * self.world * self.args.max_seq_len
        self.metrics: list[dict[str, Any]] = []
        self.step = 0
        consumed = 0
        resume = checkpoint.latest_step(self.storage, spec.run_uri)
        if resume is not None:
            record = checkpoint.load(self.storage, spec.run_uri, spec.local_dir, self.engine, resume)
            self._keep_fp32_buffers()
            self.step, consumed = resume, record["consumed_samples"]
            self.metrics = [json.loads(line) for line in self.storage.read_text(
                join(checkpoint.checkpoints_uri(spec.run_uri), checkpoint.tag(resume), "metrics.jsonl")).splitlines()]
            log.info("%s: resumed from step %d (%d samples consumed)", spec.name, resume, consumed)
        self.reader = TokenReader(self.storage, spec.tokens_uri, "train", seed=spec.train["seed"], dp_rank=self.rank,
                                  dp_world_size=self.world, consumed_samples=consumed)
        self.validation = TokenReader(self.storage, spec.tokens_uri, "validation").by_domain() \
            if _has_validation(self.storage, spec.tokens_uri) else {}
        self.measured_peak_flops = _measured_peak_flops(self.bf16, self.device)
        self.peak_tflops, source = spec_peak_tflops(
            torch.cuda.get_device_name(self.device) if self.device.type == "cuda" else None)
        log.info("%s: MFU against %s per device (%s); mfu_vs_measured_matmul against %.1f TFLOP/s measured "
                 "over %d ranks", spec.name, f"{self.peak_tflops:g} TFLOP/s" if self.peak_tflops else "no peak",
                 source, self.measured_peak_flops / 1e12, self.world)

    # ------------------------------------------------------------------------------ set-up
    def _build_model(self) -> Transformer:
        torch.manual_seed(self.spec.train["seed"])  # the global RNG starts the same on every rank
        ep_size = self.spec.train["parallel"]["ep_size"] if self.args.num_experts else 1
        model = initial_model(self.args, self.spec.init, self.spec.train["seed"], self.storage, ep_size,
                              self.rank % ep_size, self.device)
        for moe in model.moe_layers():
            moe.aux_alpha.fill_(self.aux.alpha)
        return model

    def _build_engine(self):
        decay, no_decay = [], []
        for name, param in self.model.named_parameters():
            (decay if param.ndim >= 2 and "embed_tokens" not in name else no_decay).append(param)
        param_groups = [{"params": decay, "weight_decay": self.train_cfg["weight_decay"], "name": "decay"},
                        {"params": no_decay, "weight_decay": 0.0, "name": "no_decay"}]
        if self.args.num_experts:
            param_groups = split_params_into_different_moe_groups_for_optimizer(param_groups)
        # A client optimizer: DeepSpeed's own "optimizer" block would JIT-compile FusedAdam on CPU.
        optimizer = torch.optim.AdamW(param_groups, lr=self.phase.lr, betas=(0.9, 0.95), eps=1e-8)
        config = {
            "train_micro_batch_size_per_gpu": self.spec.train["micro_batch_size"],
            "gradient_accumulation_steps": self.spec.train["grad_accum"],
            "gradient_clipping": self.spec.train["grad_clip"],
            "zero_optimization": {"stage": self.spec.train["parallel"]["zero_stage"]},
            "bf16": {"enabled": self.bf16},
            "steps_per_print": 10**9,
        }
        engine, *_ = deepspeed.initialize(model=self.model, optimizer=optimizer, config=config)
        if self.args.num_experts:
            group = self.model.moe_layers()[0].moe.expert_group_name
            ep_rank = groups._get_expert_parallel_rank(group)
            assert ep_rank == self.rank % self.spec.train["parallel"]["ep_size"], "expert slice/rank mismatch"
        self._keep_fp32_buffers()
        return engine

    def _keep_fp32_buffers(self) -> None:
        """The engine casts float buffers to bf16: the aux-loss coefficients are tiny and the rotary
        tables must match the fp32 ones the export and evaluation use."""
        for moe in self.model.moe_layers():
            moe.aux_alpha.data = moe.aux_alpha.data.float()
        self.model.rope_cos.data = self.model.rope_cos.data.float()
        self.model.rope_sin.data = self.model.rope_sin.data.float()

    # ------------------------------------------------------------------------------ loop
    def train(self) -> None:
        spec, total = self.spec, self.phase.steps
        batches = self._batches()
        progress = Progress(f"train/{spec.name}", total - self.step, "steps", log, every_s=15)
        self._prune_checkpoints()  # a kill mid-delete at the last step leaves no later save to finish it
        if self.step == 0 and total > 0 and self.validation:
            self.metrics.append({"step": 0, "tokens": 0, **self._validation()})
        while self.step < total:
            started = time.monotonic()
            lr = learning_rate(self.phase, self.step)
            for group in self.engine.optimizer.param_groups:
                group["lr"] = lr
            row = self._train_step(batches, lr)
            self.step += 1
            elapsed = time.monotonic() - started
            row.update(step=self.step, tokens=self.step * self.tokens_per_step,
                       tokens_per_s=self.tokens_per_step / elapsed, **self._utilisation(row, elapsed))
            if self.args.num_experts and (self.step % self.train_cfg["similarity_every"] == 0 or self.step == 1):
                row["expert_similarity"] = expert_similarity(self.model)
            if self.validation and (self.step % self.train_cfg["eval_every"] == 0 or self.step == total):
                row.update(self._validation())
            self.metrics.append(row)
            progress.update()
            if self.step % self.train_cfg["log_every"] == 0 or self.step == total:
                log.info("%s step %d/%d loss %.4f lr %.2e %s%.0f tokens/s MFU %s (%.1f%% of measured matmul)",
                         spec.name, self.step, total, row["loss"], lr,
                         f"drop {np.mean(row['drop_rate']):.3f} " if "drop_rate" in row else "", row["tokens_per_s"],
                         "n/a" if row["mfu"] is None else f"{row['mfu']:.1%}", 100 * row["mfu_vs_measured_matmul"])
            if self.step % self.train_cfg["checkpoint_every"] == 0 or self.step == total:
                self._save_checkpoint()
        progress.close()
        checkpoint.save_weights(self.storage, join(spec.run_uri, "final"), self.model)
        if self.rank == 0:
            self._write_metrics(join(spec.run_uri, "metrics.jsonl"))

    def _train_step(self, batches: Iterator[torch.Tensor], lr: float) -> dict[str, Any]:
        totals = RoutingTotals(len(self.model.moe_layers()), self.args.num_experts, self.device)
        losses = torch.zeros(2, dtype=torch.float64, device=self.device)
        self.model.start_step()
        for _ in range(self.accum):
            ids = next(batches).to(self.device)
            logits = self.engine(ids[:, :-1])
            ce = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))
            aux = self.model.aux_loss()
            self.engine.backward(ce + aux)
            self.engine.step()
            losses += torch.stack([ce.detach(), aux.detach()]).double()
            if self.args.num_experts:
                totals.add(self.model)
        dist.all_reduce(losses)
        losses /= self.world * self.accum
        row: dict[str, Any] = {"loss": losses[0].item(), "lr": lr}
        if self.args.num_experts:
            routing = totals.reduce()
            row["aux_loss_total"] = losses[1].item()
            row["alpha"] = [moe.aux_alpha.item() for moe in self.model.moe_layers()]  # the value this step used
            row.update(routing)
            for moe, drop_rate in zip(self.model.moe_layers(), routing["drop_rate"]):
                moe.aux_alpha.fill_(next_alpha(moe.aux_alpha.item(), drop_rate, self.aux))
        return row

    def _utilisation(self, row: dict[str, Any], seconds: float) -> dict[str, Any]:
        """The step's model FLOPs (only the expert routes computed count) and its MFU: against the
        data-sheet peak of all ranks' accelerators (None without one, as on a CPU), and separately
        against the matmul FLOP/s the ranks measured at start-up."""
        flops = step_model_flops(self.args, self.tokens_per_step, self.args.max_seq_len,
                                 row.get("routes_computed", []))
        spec_peak = self.peak_tflops * 1e12 * self.world if self.peak_tflops else None
        return {"model_flops": flops, "peak_tflops": self.peak_tflops,
                "mfu": flops / seconds / spec_peak if spec_peak else None,
                "mfu_vs_measured_matmul": flops / seconds / self.measured_peak_flops}

    def _batches(self) -> Iterator[torch.Tensor]:
        for rows in self.reader.batches(self.micro_batch):
            yield torch.from_numpy(rows.astype(np.int64))

    def _validation(self) -> dict[str, Any]:
        losses = validation_loss(self.engine, self.model, self.validation, self.micro_batch,
                                 self.train_cfg["eval_batches"], self.device)
        return {"val_loss": losses}

    def _save_checkpoint(self) -> None:
        uri = join(checkpoint.checkpoints_uri(self.spec.run_uri), checkpoint.tag(self.step))
        if self.rank == 0:
            self._write_metrics(join(uri, "metrics.jsonl"))
            self._write_metrics(join(self.spec.run_uri, "metrics.jsonl"))
        checkpoint.save(self.storage, self.spec.run_uri, self.spec.local_dir, self.engine, self.model, self.step,
                        {"consumed_samples": self.reader.consumed_samples, "tokens": self.step * self.tokens_per_step})
        self._prune_checkpoints()

    def _prune_checkpoints(self) -> None:
        """Rank 0 deletes checkpoints retention no longer keeps. Called once every rank is past
        loading (the start-up all-reduce) or past a save (its last barrier), so none reads them."""
        if self.rank != 0:
            return
        deleted = checkpoint.prune(self.storage, self.spec.run_uri, self.train_cfg.get("keep_checkpoints", 2),
                                   self.spec.protect_every_steps)
        if deleted:
            log.info("%s: deleted checkpoints at steps %s", self.spec.name, deleted)

    def _write_metrics(self, uri: str) -> None:
        self.storage.write_text(uri, "".join(json.dumps(row) + "\n" for row in self.metrics))


def initial_model(args: ModelArgs, init: RunInit, seed: int, storage: Storage, ep_size: int, ep_rank: int,
                  device: torch.device | str = "cpu") -> Transformer:
    """The starting model as expert-parallel rank ``ep_rank`` of ``ep_size`` holds it, materialised
    only where the rank holds parameters: built on the meta device, made expert-parallel there, given
    storage for the shared tensors and its own experts, then filled. Random values come from (seed,
    plain name) per parameter (``Transformer.init_parameters``); ``weights`` and ``upcycle`` read
    their folder tensor by tensor by plain name. Every layout therefore starts from the same global
    weights, and no rank ever holds (or reads) another rank's experts. A dense model (no experts) is
    the whole model on every rank."""
    model = materialize(build_rank_model(args, ep_size, ep_rank), device)
    names = plain_names(model)
    if init.kind == "random":
        model.init_parameters(seed, names.__getitem__)
        return model
    targets = rank_tensors(model, names)
    with torch.device("meta"):
        shapes = {key: tuple(value.shape) for key, value in Transformer(args).state_dict().items()}
    with WeightsReader(storage, init.uri) as reader:
        if init.kind == "weights":
            load_into(reader, targets, shapes)
        elif init.kind == "upcycle":
            upcycle_into(reader, targets, shapes, model, names.__getitem__, seed)
        else:
            raise ValueError(f"unknown init kind {init.kind!r}")
    return model


def _has_validation(storage: Storage, tokens_uri: str) -> bool:
    manifest = json.loads(storage.read_text(join(tokens_uri, "manifest.json")))
    return any(entry["split"] == "validation" and entry["sequences"] > 0 for entry in manifest["extra"]["index"])


def _measured_peak_flops(bf16: bool, device: torch.device) -> float:
    """This machine's matmul FLOP/s summed over the ranks: the denominator of ``mfu_vs_measured_matmul``.
    Its own generator: this runs after a resume restored the global RNG, which it must not move."""
    n, repeats = (4096, 20) if device.type == "cuda" else (1024, 4)
    dtype = torch.bfloat16 if bf16 else torch.float32
    a = torch.randn(n, n, device=device, dtype=dtype, generator=torch.Generator(device=device).manual_seed(0))
    a @ a  # warm-up
    if device.type == "cuda":
        torch.cuda.synchronize()
    started = time.perf_counter()
    for _ in range(repeats):
        a @ a
    if device.type == "cuda":
        torch.cuda.synchronize()
    flops = torch.tensor(2 * n**3 * repeats / (time.perf_counter() - started), dtype=torch.float64, device=device)
    dist.all_reduce(flops)
    return flops.item()


if __name__ == "__main__":
    # The deepspeed launcher adds --local_rank=N; torchrun sets LOCAL_RANK instead.
    main(next(arg for arg in sys.argv[1:] if not arg.startswith("--local_rank")))
