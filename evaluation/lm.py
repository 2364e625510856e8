"""skymoe's lm-evaluation-harness model class, registered as ``skymoe``.

``SkyMoeLM`` evaluates an exported Hugging Face folder (``training/export.py``) without its remote
code: the weights (``model.safetensors``) go straight into ``skymoe.training.model.Transformer`` and the
tokenizer is ``tokenizer.json`` read with ``tokenizers``. It computes what lm-eval's own ``hf`` model
(``HFLM``) computes on the same folder, request for request, only faster:

* Tokenization is HFLM's: the context's trailing spaces move to the continuation, context and
  context + continuation are encoded whole (special tokens as the tokenizer's post-processor adds
  them; none for skymoe's tokenizer) and split at the context's length, an empty context becomes
  the prefix token (BOS), and a context + continuation longer than ``max_length + 1`` tokens loses
  tokens on the left. ``split_special_tokens`` from tokenizer_config.json is honoured, so a literal
  ``</s>`` in a text is bytes, as for the Hugging Face tokenizer.
* Requests with the same context tokens share one pass over the context: the context and every
  continuation (less its last token) are packed into one row with a mask by which each
  continuation sees the context and itself, at the positions it would have alone. A multiple-choice
  question with four answers costs one context instead of four; identical continuations are scored
  once (HFLM's one-token cache is the special case of single-token answers).
* Rows are sorted longest first and right-padded; a forward holds at most ``batch_size x
  max_length`` padded tokens (HFLM's largest batch). The FFN/MoE layers run on real tokens only, and
  the final norm, output layer and log-softmax only at the scored positions.
* Generation is greedy with a key/value cache (the exported model recomputes the whole sequence at
  every step), stops at EOS or as soon as a stop string appears in the decoded text, and is cut at
  ``max_gen_toks`` (per request, default: the constructor's ``max_gen_tokens``, itself by default
  HFLM's 256 where that fits the window and ``max_length // 2`` where it does not, so a task
  that sets no length runs at default settings on a small model). The context is
  left-truncated to ``max_length - max_gen_toks`` tokens as HFLM does; where HFLM refuses
  (``max_gen_toks >= max_length``), the context keeps its last ``max_length // 2`` tokens and, once
  the sequence fills the window, every step sees the last ``max_length`` tokens (recomputed).

All of this is exact in eval mode, where MoE layers route with ``eval_capacity_factor`` None (no
token is dropped, so a token's output depends on nothing else in the batch). With a finite
factor, capacity is shared by the batch: results then depend on batching, for HFLM too (which also
counts pads), and the two classes agree only approximately.

Construct it from Python (``SkyMoeLM("path/to/hf")``) or through lm-eval with
``--model skymoe --model_args pretrained=path,max_gen_tokens=128 --batch_size 16 --device cpu``
(lm-eval's command line passes ``batch_size`` and ``device`` itself, so they cannot be model_args
there). ``skymoe.evaluation.lm`` must be imported first (importing it registers the class), which
``python -m skymoe.evaluation.cli`` (lm-eval's command line) does.
"""

from __future__ import annotations

import copy
import json
import logging
from collections import defaultdict
from dataclasses import fields
from pathlib import Path

import torch
import torch.nn.functional as F
from lm_eval import utils as lm_utils
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model
from lm_eval.models.utils import (
    Collator,
    handle_stop_sequences,
    has_bos_prefix,
    normalize_gen_kwargs,
    postprocess_generated_text,
)
from safetensors.torch import load_file
from tokenizers import Tokenizer
from tqdm import tqdm

from skymoe.training.model import ModelArgs, Transformer, apply_rotary, rotary_tables

logger = logging.getLogger(__name__)

CONFIG_RENAMED = {"top_k": "num_experts_per_tok"}  # ModelArgs field -> config.json key (training/export.py)
SPECIAL_KEYS = ("bos", "eos", "pad")
DEFAULT_BATCH_SIZE = 16
DEFAULT_MAX_GEN_TOKENS = 256  # HFLM's fixed max_gen_toks


class SkyMoeEvalError(ValueError):
    """The folder cannot be evaluated: missing files, or weights that do not fit config.json."""


# ---------------------------------------------------------------------------------------- loading
def load_model_args(folder: Path) -> ModelArgs:
    """ModelArgs from an exported config.json (the fields, ``top_k`` under its config name)."""
    config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    values = {}
    for field in fields(ModelArgs):
        key = CONFIG_RENAMED.get(field.name, field.name)
        if key in config:
            values[field.name] = config[key]
    return ModelArgs(**values)


def load_transformer(folder: Path, device: torch.device, dtype: torch.dtype) -> Transformer:
    """The plain Transformer with the folder's weights (``model.`` prefix dropped), in eval mode.

    Built on the meta device and filled by assignment, so no time goes into a random
    initialisation; the rotary tables (not stored) are computed, tied embeddings tied again."""
    args = load_model_args(folder)
    weights = folder / "model.safetensors"
    if not weights.exists():
        raise SkyMoeEvalError(f"{folder}: no model.safetensors")
    state = {key.removeprefix("model."): value for key, value in load_file(str(weights)).items()}
    with torch.device("meta"):
        model = Transformer(args)
    expected = set(model.state_dict())
    if args.tie_embeddings:
        expected.discard("lm_head.weight")
        state.pop("lm_head.weight", None)
    missing, unexpected = sorted(expected - state.keys()), sorted(state.keys() - expected)
    if missing or unexpected:
        raise SkyMoeEvalError(f"{weights}: does not fit config.json: missing {missing[:5]} ({len(missing)}), "
                              f"unexpected {unexpected[:5]} ({len(unexpected)})")
    model.load_state_dict(state, strict=False, assign=True)
    if args.tie_embeddings:
        model.lm_head.weight = model.embed_tokens.weight
    cos, sin = rotary_tables(args.head_dim, args.max_seq_len, args.rope_theta, scaling=args.rope_freq_scaling)
    model.rope_cos, model.rope_sin = cos, sin  # plain buffer assignment (registered, non-persistent)
    model = model.to(device=device, dtype=dtype)
    model.rope_cos, model.rope_sin = cos.to(device), sin.to(device)  # the model's own tables stay fp32
    for moe in model.moe_layers():  # fp32 model state, as in training
        moe.aux_alpha.data = moe.aux_alpha.data.float()
    leftover = [name for name, tensor in [*model.named_parameters(), *model.named_buffers()] if tensor.is_meta]
    if leftover:
        raise SkyMoeEvalError(f"{weights}: tensors left unfilled: {leftover[:5]}")
    return model.eval()


def _special_token(config: dict, name: str) -> str | None:
    value = config.get(f"{name}_token")
    return value.get("content") if isinstance(value, dict) else value


def load_tokenizer(folder: Path) -> tuple[Tokenizer, dict[str, int | None]]:
    """tokenizer.json with ``encode_special_tokens`` set as tokenizer_config.json's
    ``split_special_tokens`` says (what the Hugging Face tokenizer does), and the BOS/EOS/PAD ids:
    the tokenizer config's tokens, else config.json's ids."""
    path = folder / "tokenizer.json"
    if not path.exists():
        raise SkyMoeEvalError(f"{folder}: no tokenizer.json (export with a tokenizer folder)")
    tokenizer = Tokenizer.from_file(str(path))
    tok_config_path = folder / "tokenizer_config.json"
    tok_config = json.loads(tok_config_path.read_text(encoding="utf-8")) if tok_config_path.exists() else {}
    tokenizer.encode_special_tokens = bool(tok_config.get("split_special_tokens", False))
    model_config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    ids: dict[str, int | None] = {}
    for name in SPECIAL_KEYS:
        token = _special_token(tok_config, name)
        token_id = tokenizer.token_to_id(token) if token is not None else None
        ids[name] = token_id if token_id is not None else model_config.get(f"{name}_token_id")
    if ids["eos"] is None:
        raise SkyMoeEvalError(f"{folder}: no EOS token in tokenizer_config.json or config.json")
    return tokenizer, ids


def default_max_gen_tokens(max_length: int) -> int:
    """HFLM's 256 where it leaves room for a context, else half the window: HFLM refuses a task
    without ``max_gen_toks`` on a model of 256 tokens or fewer, and SkyMoeLM should run it as is."""
    return DEFAULT_MAX_GEN_TOKENS if DEFAULT_MAX_GEN_TOKENS < max_length else max(1, max_length // 2)


def _resolve_dtype(dtype: str | torch.dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype in ("auto", None):
        return torch.float32
    resolved = getattr(torch, str(dtype), None)
    if not isinstance(resolved, torch.dtype):
        raise SkyMoeEvalError(f"unknown dtype {dtype!r}")
    return resolved


# ---------------------------------------------------------------------------------------- model class
@register_model("skymoe")
class SkyMoeLM(TemplateLM):
    """lm-eval model for an exported skymoe folder (see the module docstring).

    pretrained: the exported Hugging Face folder; batch_size: HFLM's meaning for generation (rows),
    for loglikelihood a bound of ``batch_size x max_length`` padded tokens per forward ("auto" =
    16); max_gen_tokens: the generation cap when a request sets none (default
    :func:`default_max_gen_tokens`); device: default cuda when
    available, else cpu; dtype: of the weights (float32 default; log-softmax is always fp32);
    max_length: the context window (default: the model's max_seq_len, as HFLM reads it);
    share_context: pack requests with the same context into one row (exact; off = one row per
    request). ``max_batch_size`` and ``trust_remote_code`` are accepted and ignored (lm-eval passes
    the first; a model_args string shared with ``hf`` may carry the second)."""

    def __init__(self, pretrained: str, batch_size: int | str | None = DEFAULT_BATCH_SIZE,
                 max_gen_tokens: int | None = None, device: str | None = None, dtype: str | torch.dtype = "float32",
                 max_length: int | None = None, share_context: bool = True, max_batch_size: int | None = None,
                 trust_remote_code: bool | None = None) -> None:
        super().__init__()
        folder = Path(pretrained)
        if not (folder / "config.json").exists():
            raise SkyMoeEvalError(f"{pretrained}: not an exported skymoe folder (no config.json)")
        if device is None or (str(device).startswith("cuda") and not torch.cuda.is_available()):
            if device is not None:
                logger.warning("device %s requested but CUDA is not available: using cpu", device)
            device = "cuda" if torch.cuda.is_available() else "cpu"
        self._device = torch.device(device)
        self.pretrained = str(pretrained)
        self.model = load_transformer(folder, self._device, _resolve_dtype(dtype))
        self.tokenizer, self._special_ids = load_tokenizer(folder)
        self._max_length = int(max_length or self.model.args.max_seq_len)
        if isinstance(batch_size, str) and not batch_size.isdigit():
            logger.warning("batch_size=%s: automatic batch sizes are not implemented, using %d", batch_size,
                           DEFAULT_BATCH_SIZE)
            batch_size = DEFAULT_BATCH_SIZE
        self.batch_size = max(1, int(batch_size or DEFAULT_BATCH_SIZE))
        self._max_gen_tokens = (default_max_gen_tokens(self._max_length) if max_gen_tokens is None
                                else int(max_gen_tokens))
        if self._max_gen_tokens < 1:
            raise SkyMoeEvalError(f"max_gen_tokens must be >= 1, got {max_gen_tokens}")
        self.share_context = bool(share_context)
        args = self.model.args
        cos, sin = rotary_tables(args.head_dim, max(self._max_length, args.max_seq_len), args.rope_theta,
                                 self._device, scaling=args.rope_freq_scaling)
        self._rope = (cos, sin)
        self._pad_id = next((i for i in (self._special_ids["pad"], self._special_ids["eos"], 0)
                             if i is not None and 0 <= i < args.vocab_size), 0)
        self._bos_text = (self.tokenizer.decode([self.prefix_token_id], skip_special_tokens=False)
                          if self.prefix_token_id is not None else None)
        if args.num_experts and args.eval_capacity_factor is not None:
            logger.warning("eval_capacity_factor=%s: MoE capacity is shared by a batch, so scores depend on "
                           "batching (and differ slightly from HFLM's)", args.eval_capacity_factor)

    # -------------------------------------------------------------------------------- lm-eval API
    @property
    def eot_token_id(self) -> int:
        return self._special_ids["eos"]

    @property
    def prefix_token_id(self) -> int:
        """HFLM's: BOS when the tokenizer has one, else EOS."""
        bos = self._special_ids["bos"]
        return bos if bos is not None else self._special_ids["eos"]

    @property
    def max_length(self) -> int:
        return self._max_length

    @property
    def max_gen_toks(self) -> int:
        return self._max_gen_tokens

    @property
    def device(self) -> torch.device:
        return self._device

    @property
    def tokenizer_name(self) -> str:
        return self.pretrained.replace("/", "__")

    def get_model_info(self) -> dict:
        return {"model_num_parameters": sum(p.numel() for p in self.model.parameters()),
                "model_dtype": str(self.model.lm_head.weight.dtype), "pretrained": self.pretrained}

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, left_truncate_len: int | None = None,
                   **kwargs) -> list[int]:
        """HFLM.tok_encode: special tokens by default, none when the string already starts with BOS."""
        return self._encode_batch([string], add_special_tokens, left_truncate_len)[0]

    def _encode_batch(self, strings: list[str], add_special_tokens: bool | None = None,
                      left_truncate_len: int | None = None) -> list[list[int]]:
        if not strings:
            return []
        if add_special_tokens is None:  # HFLM: special tokens, unless the string already starts with BOS
            flags = [not has_bos_prefix(s, self._bos_text) for s in strings]
            if len(set(flags)) > 1:
                return [self._encode_batch([s], flag, left_truncate_len)[0] for s, flag in zip(strings, flags,
                                                                                            strict=True)]
            add_special_tokens = flags[0]
        encodings = [e.ids for e in self.tokenizer.encode_batch(strings, add_special_tokens=add_special_tokens)]
        if left_truncate_len:
            encodings = [ids[-left_truncate_len:] for ids in encodings]
        return encodings

    def tok_decode(self, tokens: list[int], skip_special_tokens: bool = True) -> str:
        return self.tokenizer.decode(list(tokens), skip_special_tokens=skip_special_tokens)

    def loglikelihood(self, requests, disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        """TemplateLM.loglikelihood (HFLM's tokenization), with the encodes batched."""
        pairs = [req.args for req in requests]
        empty = [i for i, (context, _) in enumerate(pairs) if context == ""]
        full = [i for i, (context, _) in enumerate(pairs) if context != ""]
        encoded: list[tuple[list[int], list[int]] | None] = [None] * len(pairs)

        conts = self._encode_batch([pairs[i][1] for i in empty], add_special_tokens=False)
        for i, cont in zip(empty, conts, strict=True):
            if not cont:
                raise SkyMoeEvalError(f"request {i}: empty context and empty continuation")
            encoded[i] = ([self.prefix_token_id], cont) if self.prefix_token_id != cont[0] else (cont[:1], cont[1:])

        contexts, wholes = [], []
        for i in full:  # TemplateLM._encode_pair: the context's trailing spaces go to the continuation
            context, continuation = pairs[i]
            n_spaces = len(context) - len(context.rstrip())
            if n_spaces > 0:
                continuation = context[-n_spaces:] + continuation
                context = context[:-n_spaces]
            contexts.append(context)
            wholes.append(context + continuation)
        for i, context_enc, whole_enc in zip(full, self._encode_many(contexts), self._encode_many(wholes),
                                             strict=True):
            encoded[i] = (context_enc, whole_enc[len(context_enc):])

        new_reqs = [(pair, ctx, cont) for pair, (ctx, cont) in zip(pairs, encoded, strict=True)]
        return self._loglikelihood_tokens(new_reqs, disable_tqdm=disable_tqdm)

    def _encode_many(self, strings: list[str]) -> list[list[int]]:
        """tok_encode over many strings, one encode_batch call per chunk (GIL released, parallel)."""
        out: list[list[int]] = []
        for start in range(0, len(strings), 4096):
            out.extend(self._encode_batch(strings[start:start + 4096]))
        return out

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        """HFLM's rolling windows (prefix token, windows of max_length, one token of context),
        all scored in one _loglikelihood_tokens call."""
        windows, owners = [], []
        strings = [req.args[0] for req in requests]
        for index, tokens in enumerate(self._encode_many(strings)):
            for context, continuation in map(lm_utils.make_disjoint_window, lm_utils.get_rolling_token_windows(
                    token_list=tokens, prefix_token=self.prefix_token_id, max_seq_len=self.max_length,
                    context_len=1)):
                windows.append((None, context, continuation))
                owners.append(index)
        scores = self._loglikelihood_tokens(windows, disable_tqdm=disable_tqdm)
        totals = [0.0] * len(requests)
        for owner, (logprob, _) in zip(owners, scores, strict=True):
            totals[owner] += logprob
        for string, total in zip(strings, totals, strict=True):
            self.cache_hook.add_partial("loglikelihood_rolling", (string,), total)
        return totals

    # -------------------------------------------------------------------------------- scoring
    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs) -> list[tuple[float, bool]]:
        """requests: ((context, continuation) strings or None, context ids, continuation ids)."""
        max_len = self.max_length
        keys: list[tuple[tuple[int, ...], tuple[int, ...]]] = []
        truncated = clipped = 0
        for _, context, continuation in requests:
            if not context or not continuation:
                raise SkyMoeEvalError("empty context or continuation tokens")
            if len(continuation) > max_len:  # only a window's worth of it can be scored: its last max_len tokens
                clipped += 1
                context, continuation = list(context) + list(continuation[:-max_len]), continuation[-max_len:]
            if len(context) + len(continuation) > max_len + 1:  # HFLM: (ctx + cont)[-(max_len + 1):][:-1]
                truncated += 1
                context = (list(context) + list(continuation))[-(max_len + 1):][:-len(continuation)]
            keys.append((tuple(context), tuple(continuation)))
        if truncated:
            logger.warning("%d of %d requests exceed max_length %d: their contexts were truncated on the left",
                           truncated, len(requests), max_len)
        if clipped:
            logger.warning("%d of %d continuations are longer than max_length %d: only their last %d tokens are "
                           "scored", clipped, len(requests), max_len, max_len)

        # Unique continuations per context; each is scored once, for every request that asks.
        groups: dict[tuple[int, ...], dict[tuple[int, ...], list[int]]] = defaultdict(lambda: defaultdict(list))
        for index, (context, continuation) in enumerate(keys):
            groups[context][continuation].append(index)
        rows = self._pack_rows(groups)
        rows.sort(key=lambda row: -row[2])

        results: list[tuple[float, bool] | None] = [None] * len(requests)
        budget = self.batch_size * max_len
        progress = tqdm(total=len(requests), disable=disable_tqdm or self.rank != 0,
                        desc="Running loglikelihood requests (skymoe)")
        start = 0
        while start < len(rows):
            width = rows[start][2]
            count = max(1, min(len(rows) - start, budget // max(width, 1)))
            batch = rows[start:start + count]
            start += count
            for owners, score in self._score_rows(batch):
                for index in owners:
                    results[index] = score
                    if requests[index][0] is not None:
                        self.cache_hook.add_partial("loglikelihood", requests[index][0], score)
                progress.update(len(owners))
        progress.close()
        return results

    def _pack_rows(self, groups) -> list[tuple[tuple[int, ...], list[tuple[tuple[int, ...], list[int]]], int]]:
        """(context, [(continuation, request indices)], row length) rows. A row holds the context and
        each continuation less its last token; a group too long for ``2 x max_length`` tokens is
        split across rows (each with the context)."""
        cap = 2 * self.max_length
        rows = []
        for context, continuations in groups.items():
            row, length = [], len(context)
            for continuation, owners in continuations.items():
                extra = len(continuation) - 1
                if row and (not self.share_context or length + extra > cap):
                    rows.append((context, row, length))
                    row, length = [], len(context)
                row.append((continuation, owners))
                length += extra
            rows.append((context, row, length))
        return rows

    @torch.inference_mode()
    def _score_rows(self, rows) -> list[tuple[list[int], tuple[float, bool]]]:
        batch, width = len(rows), max(1, max(row[2] for row in rows))
        ids = torch.full((batch, width), self._pad_id, dtype=torch.long)
        positions = torch.zeros((batch, width), dtype=torch.long)
        segments = torch.full((batch, width), -1, dtype=torch.long)  # 0 context, k continuation k, -1 pad
        packed = False
        gather_rows, gather_cols, targets, spans = [], [], [], []
        for b, (context, continuations, length) in enumerate(rows):
            n_ctx = len(context)
            ids[b, :n_ctx] = torch.tensor(context)
            positions[b, :n_ctx] = torch.arange(n_ctx)
            segments[b, :n_ctx] = 0
            offset = n_ctx
            packed |= sum(len(continuation) > 1 for continuation, _ in continuations) > 1  # else plain causal
            for k, (continuation, owners) in enumerate(continuations, start=1):
                body = continuation[:-1]
                n = len(body)
                if n:
                    ids[b, offset:offset + n] = torch.tensor(body)
                    positions[b, offset:offset + n] = torch.arange(n_ctx, n_ctx + n)
                    segments[b, offset:offset + n] = k
                first = len(targets)
                gather_rows.extend([b] * len(continuation))
                gather_cols.extend([n_ctx - 1, *range(offset, offset + n)])
                targets.extend(continuation)
                spans.append((owners, first, len(continuation)))
                offset += n
        real = segments >= 0
        mask = None
        if packed:
            index = torch.arange(width)
            causal = index[:, None] >= index[None, :]
            same = segments[:, :, None] == segments[:, None, :]
            mask = (causal & (same | (segments == 0)[:, None, :]))[:, None]  # (batch, 1, query, key)
            mask = mask.to(self._device)
        hidden, _ = self._forward(ids.to(self._device), positions.to(self._device), mask, real.to(self._device))
        chosen = hidden[torch.tensor(gather_rows, device=self._device), torch.tensor(gather_cols, device=self._device)]
        logprobs = F.log_softmax(self.model.lm_head(self.model.norm(chosen)).float(), dim=-1)
        target = torch.tensor(targets, device=self._device)
        token_logprobs = logprobs.gather(1, target[:, None])[:, 0].cpu()
        greedy = (logprobs.argmax(-1) == target).cpu()
        out = []
        for owners, first, count in spans:
            out.append((owners, (float(token_logprobs[first:first + count].sum()),
                                 bool(greedy[first:first + count].all()))))
        return out

    def _forward(self, ids: torch.Tensor, positions: torch.Tensor, mask: torch.Tensor | None,
                 real: torch.Tensor | None, cache: list | None = None, keep_cache: bool = False):
        """The Transformer's forward over its own modules, with explicit positions, an attention mask
        (None = plain causal), FFN/MoE on the ``real`` tokens only (None = all) and an optional
        key/value cache. Returns the final hidden states (before the last norm) and the new cache."""
        model = self.model
        cos, sin = self._rope
        cos, sin = cos[positions].unsqueeze(1), sin[positions].unsqueeze(1)  # (batch, 1, seq, head_dim)
        hidden = model.embed_tokens(ids)
        batch, seq, dim = hidden.shape
        keep = None
        if real is not None and not bool(real.all()):
            keep = real.reshape(-1).nonzero(as_tuple=True)[0]
        new_cache = []
        for layer_index, layer in enumerate(model.layers):
            attn = layer.self_attn
            x = layer.input_layernorm(hidden)
            q = attn.q_proj(x).view(batch, seq, attn.n_heads, attn.head_dim).transpose(1, 2)
            k = attn.k_proj(x).view(batch, seq, attn.kv_heads, attn.head_dim).transpose(1, 2)
            v = attn.v_proj(x).view(batch, seq, attn.kv_heads, attn.head_dim).transpose(1, 2)
            q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
            if cache is not None:
                past_k, past_v = cache[layer_index]
                k, v = torch.cat([past_k, k], dim=2), torch.cat([past_v, v], dim=2)
            if keep_cache:
                new_cache.append((k, v))
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None and cache is None,
                                                 enable_gqa=attn.kv_heads != attn.n_heads)
            hidden = hidden + attn.o_proj(out.transpose(1, 2).reshape(batch, seq, -1))
            if keep is None:
                hidden = hidden + layer.mlp(layer.post_attention_layernorm(hidden))
            else:
                flat = hidden.reshape(-1, dim)
                tokens = flat.index_select(0, keep)
                flat = flat.index_add(0, keep, layer.mlp(layer.post_attention_layernorm(tokens)))
                hidden = flat.view(batch, seq, dim)
        return hidden, new_cache

    # -------------------------------------------------------------------------------- generation
    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        """Greedy generation, batched by identical generation kwargs, longest context first."""
        results = []
        progress = tqdm(total=len(requests), disable=disable_tqdm or self.rank != 0,
                        desc="Running generate_until requests (skymoe)")
        contexts_all = list(dict.fromkeys(req.args[0] for req in requests))
        encoded = dict(zip(contexts_all, self._encode_many(contexts_all), strict=True))

        def _collate(request):
            return -len(encoded[request[0]]), request[0]

        collator = Collator([req.args for req in requests], sort_fn=_collate, group_by="gen_kwargs",
                            group_fn=lambda request: request[1])
        eos_text = self.tok_decode([self.eot_token_id], skip_special_tokens=False)
        warned_sampling = warned_window = False
        for chunk in collator.get_batched(n=self.batch_size):
            contexts, all_kwargs = zip(*chunk, strict=True)
            kwargs = normalize_gen_kwargs(copy.deepcopy(all_kwargs[0]), self.max_gen_toks)
            until = handle_stop_sequences(kwargs.pop("until", None), eos=eos_text)
            max_new = int(kwargs.pop("max_gen_toks"))
            if kwargs.get("do_sample") and not warned_sampling:
                logger.warning("skymoe decodes greedily: do_sample/temperature are ignored (%s)", kwargs)
                warned_sampling = True
            budget = self.max_length - max_new
            if budget <= 0:
                budget = max(1, self.max_length // 2)
                if not warned_window:
                    warned_window = True
                    logger.warning("max_gen_toks %d >= max_length %d: contexts keep their last %d tokens and the "
                                   "window slides past max_length", max_new, self.max_length, budget)
            prompts = [encoded[context][-budget:] or [self.prefix_token_id] for context in contexts]
            for context, generated in zip(contexts, self._greedy(prompts, max_new, until), strict=True):
                text = postprocess_generated_text(self.tok_decode(generated), until, None)
                results.append(text)
                self.cache_hook.add_partial("generate_until", (context, all_kwargs[0]), text)
                progress.update(1)
        progress.close()
        return collator.get_original(results)

    def _prefill(self, prompts: list[list[int]], keep_cache: bool):
        """Left-padded prompts in one forward: last-position logits, cache, key mask."""
        batch, width = len(prompts), max(len(p) for p in prompts)
        ids = torch.full((batch, width), self._pad_id, dtype=torch.long)
        real = torch.zeros((batch, width), dtype=torch.bool)
        for b, prompt in enumerate(prompts):
            ids[b, width - len(prompt):] = torch.tensor(prompt)
            real[b, width - len(prompt):] = True
        positions = (real.long().cumsum(1) - 1).clamp(min=0)
        index = torch.arange(width)
        mask = (index[:, None] >= index[None, :]) & real[:, None, :] | torch.eye(width, dtype=torch.bool)
        ids, positions, real = ids.to(self._device), positions.to(self._device), real.to(self._device)
        hidden, cache = self._forward(ids, positions, mask[:, None].to(self._device), real, keep_cache=keep_cache)
        return self._next_logits(hidden[:, -1]), cache, real

    def _next_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.model.lm_head(self.model.norm(hidden)).float()

    @torch.inference_mode()
    def _greedy(self, prompts: list[list[int]], max_new: int, until: list[str]) -> list[list[int]]:
        """Generated ids per prompt (EOS excluded): at most ``max_new``, stopping at EOS or once a
        stop string appears in the decoded generation. Finished rows leave the batch."""
        stops = [s for s in until if s]
        prompts = [list(p[-self.max_length:]) or [self.prefix_token_id] for p in prompts]
        generated: list[list[int]] = [[] for _ in prompts]
        sequences = [list(p) for p in prompts]
        active = list(range(len(prompts)))
        logits, cache, keys = self._prefill(prompts, keep_cache=True)
        sliding = False
        for _ in range(max_new):
            tokens = logits.argmax(-1).tolist()
            still = []
            for row, (b, token) in enumerate(zip(active, tokens, strict=True)):
                if token == self.eot_token_id:
                    continue
                generated[b].append(token)
                sequences[b].append(token)
                if stops and any(s in self.tok_decode(generated[b]) for s in stops):
                    continue
                if len(generated[b]) < max_new:
                    still.append(row)
            if not still:
                break
            active_rows = torch.tensor(still, device=self._device)
            active = [active[row] for row in still]
            if not sliding and max(len(sequences[b]) for b in active) > self.max_length:
                sliding = True  # positions would pass the window: recompute on the last max_length tokens
            if sliding:
                logits, _, _ = self._prefill([sequences[b][-self.max_length:] for b in active], keep_cache=False)
                continue
            cache = [(k.index_select(0, active_rows), v.index_select(0, active_rows)) for k, v in cache]
            keys = torch.cat([keys.index_select(0, active_rows),
                              torch.ones((len(active), 1), dtype=torch.bool, device=self._device)], dim=1)
            ids = torch.tensor([[sequences[b][-1]] for b in active], device=self._device)
            positions = torch.tensor([[len(sequences[b]) - 1] for b in active], device=self._device)
            hidden, cache = self._forward(ids, positions, keys[:, None, None, :], None, cache=cache, keep_cache=True)
            logits = self._next_logits(hidden[:, -1])
        return generated
