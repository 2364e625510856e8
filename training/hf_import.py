"""Import a Hugging Face Llama checkpoint as ``ModelArgs`` and a plain ``Transformer`` state dict.

This is how a dense run can start from published weights instead of training from scratch. The
model in ``training/model.py`` is Llama with the same parameter names and rotary convention, so the
import is a prefix strip plus checks; what it cannot reproduce (scaled RoPE, biases, another
activation, a head size that is not dim / heads) is refused here, naming the file and field, rather
than imported into a model that would silently compute something else.

Only safetensors files are read, never pickle (``pytorch_model.bin``): loading a pickle runs code.
Tensors keep their stored dtype; ``load_state_dict`` casts them to the model's.
"""

from __future__ import annotations

import json

import torch
from safetensors.torch import load as load_safetensors

from skymoe.storage import Storage, join
from skymoe.training.model import ModelArgs, Transformer

CONFIG_FILE = "config.json"
INDEX_FILE = "model.safetensors.index.json"
# Older exports store the rotary frequencies; they are recomputed from rope_theta.
IGNORED_SUFFIX = "rotary_emb.inv_freq"


class HfImportError(ValueError):
    """The folder is not a Llama checkpoint this model can reproduce exactly."""


def import_llama(storage: Storage, folder: str) -> tuple[ModelArgs, dict[str, torch.Tensor]]:
    """The model shape and its state dict, ready for ``Transformer(args).load_state_dict(state)``.

    With tied embeddings ``lm_head.weight`` is a copy of ``embed_tokens.weight`` (not the same tensor,
    so the dict can be written with safetensors, which refuses tensors that share memory)."""
    args = llama_args(storage, folder)
    tensors, sources = _read_tensors(storage, folder)
    return args, _plain_state(args, tensors, sources, folder)


def llama_args(storage: Storage, folder: str) -> ModelArgs:
    """The model shape from ``config.json`` alone: cheap enough to plan with before any weights are read."""
    uri = join(folder, CONFIG_FILE)
    if not storage.exists(uri):
        raise HfImportError(f"{folder}: no {CONFIG_FILE}; not a Hugging Face checkpoint folder")
    try:
        config = json.loads(storage.read_text(uri))
    except json.JSONDecodeError as err:
        raise HfImportError(f"{uri}: not valid JSON: {err}") from None
    if config.get("model_type") != "llama":
        raise HfImportError(f"{uri}: model_type is {config.get('model_type')!r}; only 'llama' checkpoints import")
    for field in ("attention_bias", "mlp_bias"):
        if config.get(field):
            raise HfImportError(f"{uri}: {field} is true; the model has no biases")
    if config.get("hidden_act", "silu") != "silu":
        raise HfImportError(f"{uri}: hidden_act is {config['hidden_act']!r}; the model's FFN is SwiGLU (silu)")
    missing = [field for field in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
                                   "intermediate_size") if field not in config]
    if missing:
        raise HfImportError(f"{uri}: missing the fields {missing}")

    dim, heads = config["hidden_size"], config["num_attention_heads"]
    head_dim = config.get("head_dim")
    if head_dim is not None and head_dim * heads != dim:
        raise HfImportError(f"{uri}: head_dim {head_dim} is not hidden_size / num_attention_heads ({dim} / {heads})")
    return ModelArgs(
        vocab_size=config["vocab_size"],
        dim=dim,
        n_layers=config["num_hidden_layers"],
        n_heads=heads,
        n_kv_heads=config.get("num_key_value_heads") or heads,
        ffn_dim=config["intermediate_size"],
        max_seq_len=config.get("max_position_embeddings", 2048),
        rope_theta=_rope_theta(config, uri),
        norm_eps=config.get("rms_norm_eps", 1e-6),
        tie_embeddings=bool(config.get("tie_word_embeddings", False)),
        num_experts=0,
    )


def _rope_theta(config: dict, uri: str) -> float:
    """The rotary base. Only plain RoPE is supported: any scaling (linear, dynamic, yarn, llama3 ...)
    changes the frequencies in ways ``model.py`` does not implement. transformers 5 writes
    ``rope_parameters``; older versions ``rope_theta`` and ``rope_scaling``."""
    if config.get("rope_scaling"):
        raise HfImportError(f"{uri}: rope_scaling {config['rope_scaling']} is not supported (plain RoPE only)")
    parameters = config.get("rope_parameters") or {}
    kind = parameters.get("rope_type", "default")
    extra = sorted(parameters.keys() - {"rope_type", "rope_theta"})
    if kind != "default" or extra:
        raise HfImportError(f"{uri}: rope_parameters {parameters} is not supported (plain RoPE only)")
    return float(parameters.get("rope_theta", config.get("rope_theta", 10000.0)))


def _read_tensors(storage: Storage, folder: str) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Every tensor of the checkpoint, and the file each came from (for error messages). The index,
    when present, says which files hold the weights; otherwise every ``*.safetensors`` file does."""
    index_uri = join(folder, INDEX_FILE)
    if storage.exists(index_uri):
        weight_map = json.loads(storage.read_text(index_uri)).get("weight_map") or {}
        files = [join(folder, name) for name in sorted(set(weight_map.values()))]
        absent = [uri for uri in files if not storage.exists(uri)]
        if absent:
            raise HfImportError(f"{index_uri}: weight_map names files that are missing: {absent}")
    else:
        files = [uri for uri in storage.listdir(folder) if uri.endswith(".safetensors")]
    if not files:
        raise HfImportError(f"{folder}: no *.safetensors weights (pickle checkpoints such as pytorch_model.bin "
                            "are never read)")
    tensors: dict[str, torch.Tensor] = {}
    sources: dict[str, str] = {}
    for uri in files:
        for key, value in load_safetensors(storage.read_bytes(uri)).items():
            tensors[key] = value
            sources[key] = uri
    return tensors, sources


def _plain_state(args: ModelArgs, tensors: dict[str, torch.Tensor], sources: dict[str, str],
                 folder: str) -> dict[str, torch.Tensor]:
    """Hugging Face names to plain names (``model.`` stripped), checked against the model's shapes,
    which come from a model on the meta device (no memory)."""
    state = {key.removeprefix("model."): value for key, value in tensors.items()
             if not key.endswith(IGNORED_SUFFIX)}
    if args.tie_embeddings and "embed_tokens.weight" in state:
        state["lm_head.weight"] = state["embed_tokens.weight"].clone()
    with torch.device("meta"):
        expected = Transformer(args).state_dict()
    hf_name = {key: key if key == "lm_head.weight" else f"model.{key}" for key in expected}
    missing = [hf_name[key] for key in expected if key not in state]
    if missing:
        raise HfImportError(f"{folder}: the checkpoint lacks {len(missing)} tensors of the model, e.g. {missing[:3]}")
    unexpected = sorted(key for key in tensors if key.removeprefix("model.") not in expected
                        and not key.endswith(IGNORED_SUFFIX))
    if unexpected:
        raise HfImportError(f"{folder}: tensors the model has no place for (another architecture?), e.g. "
                            f"{unexpected[:3]} in {sources[unexpected[0]]}")
    for key, value in expected.items():
        if state[key].shape != value.shape:
            where = sources.get(hf_name[key], folder)
            raise HfImportError(f"{where}: {hf_name[key]} has shape {tuple(state[key].shape)}, config.json implies "
                                f"{tuple(value.shape)}")
    return {key: state[key] for key in expected}
