"""Import a Hugging Face Llama, Mistral or Qwen2 checkpoint as ``ModelArgs`` and a plain ``Transformer`` state dict.

This is how a dense run can start from published weights instead of training from scratch. The
model in ``training/model.py`` is Llama with the same parameter names and rotary convention; Mistral
is Llama with a sliding attention window, Qwen2 Llama with q/k/v biases. So the import is a prefix
strip plus checks: what the model cannot reproduce (another architecture, a RoPE scaling other than
"linear" and "llama3", Llama's o_proj/MLP biases, another activation, a head size that is not dim /
heads, a sliding window shorter than the training sequences) is refused here, naming the file and
field, rather than imported into a model that would silently compute something else.

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
MODEL_TYPES = ("llama", "mistral", "qwen2")
# The RoPE scalings model.py computes exactly, with the parameters each needs.
ROPE_SCALINGS = {"linear": ("factor",),
                 "llama3": ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")}


class HfImportError(ValueError):
    """The folder is not a checkpoint this model can reproduce exactly."""


class SequenceLengthError(HfImportError):
    """The checkpoint was not trained to attend over sequences as long as the training ones."""


def import_checkpoint(storage: Storage, folder: str, seq_len: int) -> tuple[ModelArgs, dict[str, torch.Tensor]]:
    """The model shape for sequences of ``seq_len`` and its state dict, ready for
    ``Transformer(args).load_state_dict(state)``.

    With tied embeddings ``lm_head.weight`` is a copy of ``embed_tokens.weight`` (not the same tensor,
    so the dict can be written with safetensors, which refuses tensors that share memory)."""
    args = checkpoint_args(storage, folder, seq_len)
    tensors, sources = _read_tensors(storage, folder)
    return args, _plain_state(args, tensors, sources, folder)


def checkpoint_args(storage: Storage, folder: str, seq_len: int) -> ModelArgs:
    """The model shape for sequences of ``seq_len`` from ``config.json`` alone: cheap enough to plan
    with before any weights are read."""
    uri = join(folder, CONFIG_FILE)
    config = _read_config(storage, folder)
    if config.get("model_type") not in MODEL_TYPES:
        raise HfImportError(f"{uri}: model_type is {config.get('model_type')!r}; only {', '.join(MODEL_TYPES)} "
                            "checkpoints import")
    for field in ("attention_bias", "mlp_bias"):  # Llama's: o_proj / MLP biases the model does not have
        if config.get(field):
            raise HfImportError(f"{uri}: {field} is true; the model has biases on q/k/v only (as Qwen2)")
    if config.get("hidden_act", "silu") != "silu":
        raise HfImportError(f"{uri}: hidden_act is {config['hidden_act']!r}; the model's FFN is SwiGLU (silu)")
    missing = [field for field in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
                                   "intermediate_size") if field not in config]
    if missing:
        raise HfImportError(f"{uri}: missing the fields {missing}")
    _check_sequence_length(config, uri, seq_len)

    dim, heads = config["hidden_size"], config["num_attention_heads"]
    head_dim = config.get("head_dim")
    if head_dim is not None and head_dim * heads != dim:
        raise HfImportError(f"{uri}: head_dim {head_dim} is not hidden_size / num_attention_heads ({dim} / {heads})")
    theta, scaling = _rope(config, uri)
    return ModelArgs(
        vocab_size=config["vocab_size"],
        dim=dim,
        n_layers=config["num_hidden_layers"],
        n_heads=heads,
        n_kv_heads=config.get("num_key_value_heads") or heads,
        qkv_bias=config["model_type"] == "qwen2",
        ffn_dim=config["intermediate_size"],
        max_seq_len=seq_len,
        rope_theta=theta,
        rope_freq_scaling=scaling,
        norm_eps=config.get("rms_norm_eps", 1e-6),
        tie_embeddings=bool(config.get("tie_word_embeddings", False)),
        num_experts=0,
    )


def _read_config(storage: Storage, folder: str) -> dict:
    uri = join(folder, CONFIG_FILE)
    if not storage.exists(uri):
        raise HfImportError(f"{folder}: no {CONFIG_FILE}; not a Hugging Face checkpoint folder")
    try:
        return json.loads(storage.read_text(uri))
    except json.JSONDecodeError as err:
        raise HfImportError(f"{uri}: not valid JSON: {err}") from None


def _check_sequence_length(config: dict, uri: str, seq_len: int) -> None:
    """Positions past ``max_position_embeddings`` were never trained; a sliding window shorter than the
    sequence would make the model attend differently from the full causal attention used here."""
    limit = config.get("max_position_embeddings")
    if limit is not None and seq_len > limit:
        raise SequenceLengthError(f"{uri}: max_position_embeddings is {limit}, below the training sequence "
                                  f"length {seq_len}")
    window = _sliding_window(config)
    if window is not None and seq_len > window:
        raise SequenceLengthError(f"{uri}: sliding_window is {window}, below the training sequence length {seq_len} "
                                  "(the model attends over the whole sequence)")


def _sliding_window(config: dict) -> int | None:
    """The attention window the checkpoint uses, None for full attention. Qwen2 uses its
    ``sliding_window`` only with ``use_sliding_window`` (its config files carry a window they never
    use); ``layer_types``, where written, says whether any layer slides."""
    if config.get("use_sliding_window") is False:
        return None
    layer_types = config.get("layer_types")
    if layer_types is not None and "sliding_attention" not in layer_types:
        return None
    return config.get("sliding_window")


def _rope(config: dict, uri: str) -> tuple[float, dict | None]:
    """The rotary base and its scaling (None: plain RoPE). transformers 5 writes ``rope_parameters``
    (the base and the scaling in one dict); older versions ``rope_theta`` and ``rope_scaling`` (whose
    kind may be under ``type``), which wins where both are written, as in transformers."""
    legacy = dict(config.get("rope_scaling") or {})
    if "type" in legacy:
        legacy["rope_type"] = legacy.pop("type")
    parameters = {**(config.get("rope_parameters") or {}), **legacy}
    field = "rope_scaling" if legacy else "rope_parameters"
    kind = parameters.pop("rope_type", "default")
    theta = float(parameters.pop("rope_theta", config.get("rope_theta", 10000.0)))
    if parameters.pop("partial_rotary_factor", 1.0) != 1.0:
        raise HfImportError(f"{uri}: {field} has a partial_rotary_factor; the model rotates whole heads")
    if kind == "default" and not parameters:
        return theta, None
    needed = ROPE_SCALINGS.get(kind)
    if needed is None:
        raise HfImportError(f"{uri}: {field} of type {kind!r} is not supported (plain RoPE, "
                            f"{', '.join(ROPE_SCALINGS)})")
    missing = [name for name in needed if name not in parameters]
    if missing:
        raise HfImportError(f"{uri}: {field} of type {kind!r} lacks {missing}")
    return theta, {"rope_type": kind, **{name: parameters[name] for name in needed}}


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
