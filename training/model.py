"""A Llama-like decoder (RMSNorm, RoPE, SwiGLU) whose FFN is dense or a top-k MoE layer, per layer.

Read top to bottom: config, norm, rotary embedding, attention, feed-forward, the router (gate
bias, gating logit normalization, top-k with renormalised weights, capacity dropping), the MoE layer, the
block and the model. This file is plain PyTorch with no project imports on purpose: the Hugging
Face export ships it as the remote modeling code, and DeepSpeed's expert-parallel layer in
``training/parallel.py`` reuses its router and expert modules.

Parameter names follow Hugging Face Llama (``embed_tokens``, ``self_attn.q_proj``, ``mlp.gate_proj``,
``input_layernorm`` ...), so a Llama, Mistral or Qwen2 checkpoint imports without renaming and rotary
embeddings use the same half-split convention. Two options exist only for imported checkpoints: Qwen2's
q/k/v biases (``qkv_bias``) and a rescaled RoPE (``rope_freq_scaling``); both are off in a new model.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import asdict, dataclass, field

import torch
import torch.nn.functional as F
from torch import nn


@dataclass
class ModelArgs:
    vocab_size: int = 4096
    dim: int = 128
    n_layers: int = 4
    n_heads: int = 4
    n_kv_heads: int | None = None  # None = n_heads (no grouped-query attention)
    qkv_bias: bool = False  # biases on the q/k/v projections (Qwen2); o_proj never has one
    ffn_dim: int = 344
    max_seq_len: int = 256
    rope_theta: float = 10000.0
    # None = plain RoPE; else Hugging Face's rope parameters for "linear" ({"rope_type", "factor"}) or
    # "llama3" (also low_freq_factor, high_freq_factor, original_max_position_embeddings).
    rope_freq_scaling: dict | None = None
    norm_eps: float = 1e-5
    tie_embeddings: bool = False
    # MoE: num_experts = 0 keeps every FFN dense; otherwise every moe_every-th layer is an MoE layer.
    num_experts: int = 0
    moe_every: int = 1
    top_k: int = 2
    capacity_factor: float | None = 1.25  # training-time capacity; None = never drop
    eval_capacity_factor: float | None = None  # None = no dropping at evaluation / inference
    min_capacity: int = 4
    gate_norm_lambda: float | None = 1.0  # gating logit normalization; None = plain softmax
    balance_loss: str = "skywork"  # the auxiliary load-balancing loss: "skywork" or "switch" (see route)
    balance_scope: str = "micro_batch"  # the tokens T the loss averages over: "micro_batch" or "global_batch"
    init_std: float = 0.02

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads

    @property
    def kv_heads(self) -> int:
        return self.n_kv_heads or self.n_heads

    def is_moe_layer(self, layer: int) -> bool:
        return self.num_experts > 0 and (layer + 1) % self.moe_every == 0

    def to_dict(self) -> dict:
        return asdict(self)


# ---------------------------------------------------------------------------------------- blocks
class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Normalise in fp32 (as Llama does) so bf16 training keeps a stable scale.
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(x.dtype)


def rotary_tables(head_dim: int, seq_len: int, theta: float, device=None,
                  scaling: dict | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    inv_freq = rotary_frequencies(head_dim, theta, scaling, device)
    angles = torch.outer(torch.arange(seq_len, device=device, dtype=torch.float32), inv_freq)
    angles = torch.cat([angles, angles], dim=-1)
    return angles.cos(), angles.sin()


def rotary_frequencies(head_dim: int, theta: float, scaling: dict | None = None, device=None) -> torch.Tensor:
    """The rotary inverse frequencies: plain RoPE, or rescaled the way a checkpoint was trained
    (``ModelArgs.rope_freq_scaling``), in Hugging Face's operations and order so an imported model's
    frequencies are bit-identical. "linear" divides every frequency by ``factor``; "llama3" divides
    the low ones, keeps the high ones and blends smoothly between."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, device=device, dtype=torch.float32) / head_dim))
    kind = (scaling or {}).get("rope_type", "default")
    if kind == "default":
        return inv_freq
    if kind == "linear":
        return inv_freq / scaling["factor"]
    if kind == "llama3":
        factor, low, high = scaling["factor"], scaling["low_freq_factor"], scaling["high_freq_factor"]
        context = scaling["original_max_position_embeddings"]
        wavelen = 2 * math.pi / inv_freq
        scaled = torch.where(wavelen > context / low, inv_freq / factor, inv_freq)
        smooth = (context / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = ~(wavelen < context / high) * ~(wavelen > context / low)
        return torch.where(medium, smoothed, scaled)
    raise ValueError(f"rope_type {kind!r} is not implemented (default, linear, llama3)")


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: (batch, heads, seq, head_dim); half-split rotation, as in Hugging Face Llama."""
    first, second = x.chunk(2, dim=-1)
    rotated = torch.cat([-second, first], dim=-1)
    return (x.float() * cos + rotated.float() * sin).to(x.dtype)


class Attention(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.n_heads, self.kv_heads, self.head_dim = args.n_heads, args.kv_heads, args.head_dim
        self.q_proj = nn.Linear(args.dim, args.n_heads * args.head_dim, bias=args.qkv_bias)
        self.k_proj = nn.Linear(args.dim, args.kv_heads * args.head_dim, bias=args.qkv_bias)
        self.v_proj = nn.Linear(args.dim, args.kv_heads * args.head_dim, bias=args.qkv_bias)
        self.o_proj = nn.Linear(args.n_heads * args.head_dim, args.dim, bias=False)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        batch, seq, _ = x.shape
        q = self.q_proj(x).view(batch, seq, self.n_heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(batch, seq, self.kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(batch, seq, self.kv_heads, self.head_dim).transpose(1, 2)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=self.kv_heads != self.n_heads)
        return self.o_proj(out.transpose(1, 2).reshape(batch, seq, -1))


class FeedForward(nn.Module):
    """SwiGLU: down(silu(gate(x)) * up(x)). The dense FFN and every expert are this module."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.gate_proj = nn.Linear(dim, hidden, bias=False)
        self.up_proj = nn.Linear(dim, hidden, bias=False)
        self.down_proj = nn.Linear(hidden, dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


# ---------------------------------------------------------------------------------------- routing
def normalize_logits(logits: torch.Tensor, lam: float | None) -> torch.Tensor:
    """Gating logit normalization (Skywork-MoE 4.1): lambda * (z - mean(z)) / (std(z) + 1e-6) over the experts.

    lam=None leaves the logits as they are (plain softmax gate). The population std; the 1e-6 (not in
    the report) keeps a token whose logits are all equal (a zero input, or a zero router) at the uniform
    gate instead of 0/0."""
    if lam is None:
        return logits
    mean = logits.mean(-1, keepdim=True)
    std = logits.std(-1, keepdim=True, correction=0)
    return lam * (logits - mean) / (std + 1e-6)


def expert_capacity(num_tokens: int, num_experts: int, top_k: int, factor: float | None, minimum: int) -> int:
    """Slots per expert: ceil(k * T / n * factor), at least ``minimum``; factor None = room for every token."""
    if factor is None:
        return num_tokens
    return max(math.ceil(top_k * num_tokens / num_experts * factor), minimum)


@dataclass
class Routing:
    """Where each token goes. ``experts``/``slots``: (tokens, k), expert -1 where capacity dropped the
    route; ``weights``: the selected gate values renormalised to sum to 1 per token (fp32)."""

    experts: torch.Tensor
    slots: torch.Tensor
    weights: torch.Tensor
    probs: torch.Tensor  # (tokens, n) gate distribution after normalization and softmax
    capacity: int
    aux_loss: torch.Tensor  # the load-balancing loss (route's ``balance``), differentiable
    stats: dict[str, torch.Tensor] = field(default_factory=dict)


def route(logits: torch.Tensor, top_k: int, capacity: int, lam: float | None,
          balance: str = "skywork") -> Routing:
    """Top-k routing with capacity. Slots fill by choice rank first (every token's first choice
    before any second choice), then in token order, so drops hit second choices first.

    The load-balancing loss over the T tokens routed together, with n experts and g the gate values:
    ``skywork`` (the report's eq. 3) sum_j (1/n - mean_i g_ij)^2, 0 when the mean gate is uniform;
    ``switch`` (Switch Transformer, GShard; what most frameworks use) n * sum_j f_j * P_j with f_j the
    share of the T * k top-k choices that picked expert j (before capacity) and P_j = mean_i g_ij,
    1 when balanced. Only P_j carries gradient; f_j counts choices, so the Switch form pushes on
    the experts that are actually chosen too often, where the report's form pushes on the mean gate.
    ``stats["choices"]`` holds the top-k choices per expert, for a loss over more tokens (``GlobalBalance``)."""
    num_tokens, num_experts = logits.shape
    probs = F.softmax(normalize_logits(logits.float(), lam), dim=-1)
    top_values, top_experts = probs.topk(top_k, dim=-1)
    weights = top_values / top_values.sum(-1, keepdim=True)

    one_hot = F.one_hot(top_experts.t(), num_experts)  # (k, tokens, n)
    filled_before = one_hot.sum(1).cumsum(0) - one_hot.sum(1)  # slots taken by earlier choice ranks
    slot_of = (one_hot.cumsum(1) - 1 + filled_before.unsqueeze(1)) * one_hot
    slots = slot_of.sum(-1).t()  # (tokens, k)
    kept = slots < capacity
    experts = torch.where(kept, top_experts, torch.full_like(top_experts, -1))

    choices = one_hot.sum((0, 1))
    aux_loss = balance_loss(probs.mean(0), choices.float() / (num_tokens * top_k), balance)
    with torch.no_grad():
        ranked = probs.topk(min(3, num_experts), dim=-1).values
        stats = {
            "choices": choices,
            "dropped": (~kept).sum(),
            "routes": torch.tensor(kept.numel(), device=logits.device),
            "load": torch.bincount(experts[kept], minlength=num_experts),
            "max1_max2": (ranked[:, 0] / ranked[:, 1]).mean(),
            "max2_max3": (ranked[:, 1] / ranked[:, 2]).mean() if num_experts > 2
            else torch.full((), float("nan"), device=logits.device),
        }
    return Routing(experts, torch.where(kept, slots, torch.zeros_like(slots)), weights, probs, capacity, aux_loss,
                   stats)


def balance_loss(mean_gate: torch.Tensor, choice_share: torch.Tensor, form: str) -> torch.Tensor:
    """The load-balancing loss from per-expert statistics: P_j = ``mean_gate`` (differentiable) and
    f_j = ``choice_share`` (a count: no gradient); see ``route`` for the two forms."""
    if form == "skywork":
        return (1.0 / mean_gate.shape[0] - mean_gate).pow(2).sum()
    if form == "switch":
        return mean_gate.shape[0] * (choice_share * mean_gate).sum()
    raise ValueError(f"balance loss {form!r}: expected 'skywork' or 'switch'")


class GlobalBalance:
    """The load-balancing loss with T = the global batch (``balance_scope: global_batch``): every token
    routed so far in this optimizer step, on every data-parallel rank, not one rank's micro-batch.

    Each forward all-reduces the micro-batch's per-expert gate sums, choice counts and token count over
    the default process group (every rank routes its own tokens through a replicated router) and adds
    them to the step's running totals. No gradient needs to cross ranks: the loss depends on the local
    tokens only through P_j, and ``P_global`` is the mean of the ranks' and micro-batches' equally sized
    ``P_local``. So ``dL/dP_global``, evaluated on the totals and applied to ``P_local``, gives each rank
    its share of the exact gradient once the data-parallel average (over ranks and micro-batches) is
    taken. With gradient accumulation the totals are those of micro-batches 1..m of the step, so the
    last micro-batch sees the whole batch and earlier ones a prefix of it (exact for one micro-batch
    per step). The caller starts each step with ``reset``."""

    def __init__(self, top_k: int, form: str):
        self.top_k, self.form = top_k, form
        self.totals: torch.Tensor | None = None  # [gate sums (n), choices (n), tokens], fp64

    def reset(self) -> None:
        self.totals = None

    def aux_loss(self, probs: torch.Tensor, choices: torch.Tensor) -> torch.Tensor:
        num_experts = probs.shape[1]
        counts = torch.cat([probs.detach().double().sum(0), choices.double(),
                            probs.new_full((1,), probs.shape[0], dtype=torch.float64)])
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.all_reduce(counts)
        self.totals = counts if self.totals is None else self.totals + counts
        tokens = self.totals[-1]
        with torch.enable_grad():  # the slope is taken even where the caller's forward runs without grad
            mean_gate = (self.totals[:num_experts] / tokens).float().requires_grad_()
            value = balance_loss(mean_gate, (self.totals[num_experts:-1] / (tokens * self.top_k)).float(), self.form)
            (slope,) = torch.autograd.grad(value, mean_gate)
        local = probs.mean(0)
        return value.detach() + (slope * (local - local.detach())).sum()  # the value, with the gradient's slope


class Router(nn.Module):
    """The gate: expert logits ``z = W x + b`` (the report's section 2), routed in fp32.

    The bias starts at zero (new models and upcycling alike) and is learned. Normalization comes
    after it: subtracting the mean over experts removes only a shift shared by every expert, so
    ``b`` still sets a per-expert offset."""

    def __init__(self, args: ModelArgs):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(args.num_experts, args.dim))
        self.bias = nn.Parameter(torch.zeros(args.num_experts))
        self.top_k, self.lam = args.top_k, args.gate_norm_lambda
        self.capacity_factor, self.eval_capacity_factor = args.capacity_factor, args.eval_capacity_factor
        self.min_capacity, self.balance = args.min_capacity, args.balance_loss
        if args.balance_scope not in ("micro_batch", "global_batch"):
            raise ValueError(f"balance scope {args.balance_scope!r}: expected 'micro_batch' or 'global_batch'")
        self.global_balance = GlobalBalance(args.top_k, args.balance_loss) if args.balance_scope == "global_batch" \
            else None

    def forward(self, x: torch.Tensor) -> Routing:
        logits = F.linear(x.float(), self.weight.float(), self.bias.float())
        factor = self.capacity_factor if self.training else self.eval_capacity_factor
        capacity = expert_capacity(x.shape[0], self.weight.shape[0], self.top_k, factor, self.min_capacity)
        routing = route(logits, self.top_k, capacity, self.lam, self.balance)
        if self.training and self.global_balance is not None:
            routing.aux_loss = self.global_balance.aux_loss(routing.probs, routing.stats["choices"])
        return routing

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        """Weights saved before the gate had a bias load with a zero one: the function they computed."""
        if prefix + "weight" in state_dict and prefix + "bias" not in state_dict:
            state_dict[prefix + "bias"] = torch.zeros_like(self.bias)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)


class MoEFeedForward(nn.Module):
    """Top-k MoE layer computed locally (all experts on this process).

    After each forward ``last_routing`` holds the routing (aux loss, drops, load, gate ratios). The
    aux-loss coefficient ``aux_alpha`` is fp32 model state so it is checkpointed with the weights."""

    def __init__(self, args: ModelArgs):
        super().__init__()
        self.router = Router(args)
        self.experts = nn.ModuleList(FeedForward(args.dim, args.ffn_dim) for _ in range(args.num_experts))
        self.register_buffer("aux_alpha", torch.zeros((), dtype=torch.float32))
        self.last_routing: Routing | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tokens = x.reshape(-1, x.shape[-1])
        routing = self.router(tokens)
        self.last_routing = routing
        out = torch.zeros_like(tokens)
        for index, expert in enumerate(self.experts):
            token_ids, choice = torch.nonzero(routing.experts == index, as_tuple=True)
            if token_ids.numel():
                weight = routing.weights[token_ids, choice].unsqueeze(-1)
                out.index_add_(0, token_ids, (expert(tokens[token_ids]) * weight).to(out.dtype))
        return out.view_as(x)


class Block(nn.Module):
    def __init__(self, args: ModelArgs, layer: int):
        super().__init__()
        self.input_layernorm = RMSNorm(args.dim, args.norm_eps)
        self.self_attn = Attention(args)
        self.post_attention_layernorm = RMSNorm(args.dim, args.norm_eps)
        self.mlp = MoEFeedForward(args) if args.is_moe_layer(layer) else FeedForward(args.dim, args.ffn_dim)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        h = x + self.self_attn(self.input_layernorm(x), cos, sin)
        return h + self.mlp(self.post_attention_layernorm(h))


class Transformer(nn.Module):
    """``seed`` None initialises from the global RNG, in construction order; an int initialises every
    parameter from (seed, its name) alone (``init_parameters``), as training does."""

    def __init__(self, args: ModelArgs, seed: int | None = None):
        super().__init__()
        self.args = args
        self.embed_tokens = nn.Embedding(args.vocab_size, args.dim)
        self.layers = nn.ModuleList(Block(args, i) for i in range(args.n_layers))
        self.norm = RMSNorm(args.dim, args.norm_eps)
        self.lm_head = nn.Linear(args.dim, args.vocab_size, bias=False)
        if args.tie_embeddings:
            self.lm_head.weight = self.embed_tokens.weight
        self.init_buffers()
        if seed is None:
            self.apply(self._init_weights)
        else:
            self.init_parameters(seed)

    def init_buffers(self, device: torch.device | str | None = None) -> None:
        """The rotary tables (not saved: recomputed), on ``device`` (None: the default device); also what
        a model built on the meta device calls once it has real storage."""
        cos, sin = rotary_tables(self.args.head_dim, self.args.max_seq_len, self.args.rope_theta, device,
                                 self.args.rope_freq_scaling)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)

    def _init_weights(self, module: nn.Module) -> None:
        """The sequential initialisation from the global RNG (``Transformer(args)`` without a seed)."""
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, std=self.args.init_std)
            if getattr(module, "bias", None) is not None:  # q/k/v biases (qkv_bias) start at zero
                nn.init.zeros_(module.bias)
        elif isinstance(module, Router):
            nn.init.normal_(module.weight, std=self.args.init_std)
            nn.init.zeros_(module.bias)

    @torch.no_grad()
    def init_parameters(self, seed: int, plain_name=None, only=None) -> None:
        """Every parameter from ``(seed, its name)`` alone, each with its own generator, with the rules of
        ``_init_weights`` (Linear/Embedding weights and routers normal(init_std), biases zero, norms one).

        The values do not depend on which other parameters exist or in which order they are built, so a
        rank holding a slice of the experts creates exactly its slice of the one global model.
        ``plain_name`` maps a parameter's name in this module to its plain ``Transformer`` name (an
        expert-parallel model's experts carry their global index there); ``only`` limits it to those
        plain names. Tied weights are initialised once, under their first name."""
        seen: set[int] = set()
        for module_name, module in self.named_modules():
            for key, param in module.named_parameters(recurse=False):
                if id(param) in seen:
                    continue
                seen.add(id(param))
                name = f"{module_name}.{key}" if module_name else key
                name = plain_name(name) if plain_name else name
                if only is not None and name not in only:
                    continue
                param.copy_(initial_value(module, key, tuple(param.shape), self.args.init_std, seed, name))

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        seq = input_ids.shape[1]
        if seq > self.rope_cos.shape[0]:
            cos, sin = rotary_tables(self.args.head_dim, seq, self.args.rope_theta, input_ids.device,
                                     self.args.rope_freq_scaling)
        else:
            cos, sin = self.rope_cos[:seq], self.rope_sin[:seq]
        h = self.embed_tokens(input_ids)
        for layer in self.layers:
            h = layer(h, cos, sin)
        return self.lm_head(self.norm(h))

    def moe_layers(self) -> list[nn.Module]:
        """The MoE FFNs in layer order (local or expert-parallel: anything with ``aux_alpha``)."""
        return [layer.mlp for layer in self.layers if hasattr(layer.mlp, "aux_alpha")]

    def start_step(self) -> None:
        """Start an optimizer step: a global-batch aux loss (``GlobalBalance``) forgets the last step's tokens."""
        for module in self.modules():
            if isinstance(module, Router) and module.global_balance is not None:
                module.global_balance.reset()

    def aux_loss(self) -> torch.Tensor:
        """sum_l alpha_l * L_aux^(l) over the MoE layers of the last forward (0 for a dense model)."""
        total = torch.zeros((), device=self.lm_head.weight.device)
        for moe in self.moe_layers():
            total = total + moe.aux_alpha.float() * moe.last_routing.aux_loss
        return total


def parameter_seed(seed: int, name: str) -> int:
    """The seed of one parameter's own generator: a hash of the run's seed and the parameter's plain name."""
    digest = hashlib.sha256(f"{seed}/{name}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def initial_value(module: nn.Module, key: str, shape: tuple[int, ...], std: float, seed: int,
                  name: str) -> torch.Tensor:
    """The initial fp32 value of ``module``'s parameter ``key`` (plain name ``name``), drawn on the CPU
    from its own generator so that it is the same on every rank, device and layout."""
    if isinstance(module, (nn.Linear, nn.Embedding, Router)):
        if key == "weight":
            generator = torch.Generator().manual_seed(parameter_seed(seed, name))
            return torch.empty(shape, device="cpu").normal_(0.0, std, generator=generator)
        if key == "bias":  # q/k/v biases (qkv_bias) and the router's bias start at zero
            return torch.zeros(shape, device="cpu")
    elif isinstance(module, RMSNorm) and key == "weight":
        return torch.ones(shape, device="cpu")
    raise TypeError(f"{name}: no initialisation rule for parameter {key!r} of {type(module).__name__}")


# ---------------------------------------------------------------------------------------- sizes
def parameter_counts(args: ModelArgs) -> dict[str, int]:
    """Total and activated (per token: top-k experts) parameters, computed from the shape alone so
    a 146B preset can be sized on a laptop."""
    attn = args.dim * args.head_dim * (2 * args.n_heads + 2 * args.kv_heads)
    if args.qkv_bias:
        attn += args.head_dim * (args.n_heads + 2 * args.kv_heads)
    ffn = 3 * args.dim * args.ffn_dim
    norms = 2 * args.dim
    embed = args.vocab_size * args.dim * (1 if args.tie_embeddings else 2) + args.dim
    total = activated = embed
    for layer in range(args.n_layers):
        total += attn + norms
        activated += attn + norms
        if args.is_moe_layer(layer):
            router = args.num_experts * (args.dim + 1)  # W and b
            total += args.num_experts * ffn + router
            activated += args.top_k * ffn + router
        else:
            total += ffn
            activated += ffn
    return {"total": total, "activated": activated, "embedding": embed}


def training_flops_per_token(args: ModelArgs, seq_len: int) -> float:
    """Forward + backward FLOPs per token, PaLM's estimate: 6 x the activated matmul parameters
    (output projection included, embedding lookup not) + 12 x layers x dim x seq_len for the
    attention scores and values (the full matrix, as PaLM counts it, although causal attention
    needs only half)."""
    counts = parameter_counts(args)
    matmul_params = counts["activated"] - counts["embedding"] + args.vocab_size * args.dim
    return 6 * matmul_params + 12 * args.n_layers * args.dim * seq_len
