"""Model FLOPs and MFU as published training runs report them (PaLM appendix B; Megatron-Core and
Skywork-MoE quote the same): model FLOPs of a step (:func:`step_model_flops`, counting only the
expert routes that were computed) over the accelerators' data-sheet dense bf16 peak
(:func:`spec_peak_tflops`). Free of DeepSpeed, so the stage can check the peak override at plan time.
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Mapping, Sequence

from skymoe.training.model import ModelArgs

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
    return None, f"{device_name!r} is not in SPEC_PEAK_TFLOPS (training/flops.py): set {PEAK_ENV}"


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
