"""Export a skymoe weights folder as a self-contained Hugging Face model folder.

The folder loads with ``AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True)`` and
``AutoTokenizer.from_pretrained(folder, trust_remote_code=True)`` (the tokenizer loader reads
config.json too, whose classes are remote code; without the flag it asks interactively), offline,
with nothing but torch and transformers: the modeling code is shipped in it (``training/hf/*.py`` and a copy of ``training/model.py``, copied
verbatim, so the exported model is the trained model's code, not a re-implementation). That is
what lm-evaluation-harness's ``hf`` model and ``generate`` need.

Weights are written as one ``model.safetensors`` in float32 under the wrapper's names
(``model.`` + the plain ``Transformer`` names); with tied embeddings ``lm_head`` is left out and
tied again on load, as Hugging Face does.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save as save_safetensors

from skymoe.storage import Storage, join
from skymoe.training.model import ModelArgs, Transformer
from skymoe.training.weights import load_args, load_state

HF_CODE = Path(__file__).parent / "hf"
CODE_FILES = (HF_CODE / "configuration_skymoe.py", HF_CODE / "modeling_skymoe.py", Path(__file__).parent / "model.py")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")
# The config's special-token ids come from the tokens tokenizer_config.json names; without a
# tokenizer, those of a trained skymoe tokenizer (<s>, </s>, <pad>).
SPECIAL_KEYS = ("bos", "eos", "pad")
DEFAULT_SPECIAL_IDS = {"bos_token_id": 0, "eos_token_id": 1, "pad_token_id": 2}


class ExportError(ValueError):
    """The weights or the tokenizer cannot make a working Hugging Face folder."""


def export_hf(storage: Storage, weights_folder: str, tokenizer_folder: str | None, out_folder: str) -> None:
    """Write the Hugging Face folder ``out_folder`` from a weights folder and a tokenizer folder (None:
    no tokenizer files, special-token ids 0/1/2). Checks everything before writing anything."""
    args = load_args(storage, weights_folder)
    state = _checked_state(args, load_state(storage, weights_folder), weights_folder)
    special_ids = DEFAULT_SPECIAL_IDS
    if tokenizer_folder is not None:
        special_ids = _copy_tokenizer(storage, tokenizer_folder, out_folder, args.vocab_size)

    tensors = {f"model.{key}": value.float().contiguous() for key, value in state.items()}
    storage.write_bytes(join(out_folder, "model.safetensors"), save_safetensors(tensors, metadata={"format": "pt"}))
    storage.write_text(join(out_folder, "config.json"), _json(hf_config(args, special_ids)))
    storage.write_text(join(out_folder, "generation_config.json"), _json({**special_ids, "do_sample": False}))
    for source in CODE_FILES:
        storage.write_bytes(join(out_folder, source.name), source.read_bytes())


def hf_config(args: ModelArgs, special_ids: dict[str, int | None]) -> dict:
    """config.json: the ModelArgs fields, ``top_k`` under the name ``configuration_skymoe.py`` gives
    it (``num_experts_per_tok``: transformers would take a ``top_k`` for a sampling parameter)."""
    fields = args.to_dict()
    fields["num_experts_per_tok"] = fields.pop("top_k")
    return {
        "model_type": "skymoe",
        "architectures": ["SkyMoeForCausalLM"],
        "auto_map": {
            "AutoConfig": "configuration_skymoe.SkyMoeConfig",
            "AutoModelForCausalLM": "modeling_skymoe.SkyMoeForCausalLM",
        },
        **fields,
        **special_ids,
        "torch_dtype": "float32",
    }


def _checked_state(args: ModelArgs, state: dict[str, torch.Tensor], folder: str) -> dict[str, torch.Tensor]:
    """The state dict, checked against the model shape without allocating the model (meta device),
    so a bad folder fails here rather than in a user's ``from_pretrained``. Tied embeddings keep
    only ``embed_tokens``."""
    if args.tie_embeddings:
        state.pop("lm_head.weight", None)
    with torch.device("meta"):
        model = Transformer(args)
    expected = dict(model.state_dict())
    if args.tie_embeddings:
        del expected["lm_head.weight"]
    for key, value in expected.items():  # weights from before the gate bias: b = 0, the function they had
        if key.endswith(".router.bias") and key not in state and key.removesuffix("bias") + "weight" in state:
            state[key] = torch.zeros(value.shape, dtype=state[key.removesuffix("bias") + "weight"].dtype)
    missing = sorted(expected.keys() - state.keys())
    unexpected = sorted(state.keys() - expected.keys())
    if missing or unexpected:
        raise ExportError(f"{folder}: weights do not fit model_args.json: missing {missing[:5]} "
                          f"({len(missing)} in all), unexpected {unexpected[:5]} ({len(unexpected)} in all)")
    for key, value in expected.items():
        if state[key].shape != value.shape:
            raise ExportError(f"{folder}: {key} has shape {tuple(state[key].shape)}, model_args.json "
                              f"implies {tuple(value.shape)}")
    return {key: state[key] for key in expected}


def _copy_tokenizer(storage: Storage, folder: str, out_folder: str, vocab_size: int) -> dict[str, int | None]:
    """Copy the tokenizer files; returns the special-token ids. Refuses a tokenizer whose ids do not
    fit the embedding (the model would fail on the first such token) or that lacks a special token
    its config names."""
    files = {}
    for name in TOKENIZER_FILES:
        uri = join(folder, name)
        if not storage.exists(uri):
            raise ExportError(f"{folder}: no {name}; not a tokenizer folder written by save_tokenizer")
        files[name] = storage.read_bytes(uri)
    tokenizer = json.loads(files["tokenizer.json"])
    added = {token["content"]: token["id"] for token in tokenizer.get("added_tokens", [])}
    largest = max([*tokenizer["model"]["vocab"].values(), *added.values()])
    if largest >= vocab_size:
        raise ExportError(f"{folder}/tokenizer.json: token id {largest} does not fit the model's vocab_size "
                          f"{vocab_size}")
    special_ids = _special_ids(json.loads(files["tokenizer_config.json"]), added, f"{folder}/tokenizer_config.json")
    for name, data in files.items():
        storage.write_bytes(join(out_folder, name), data)
    return special_ids


def _special_ids(config: dict, added: dict[str, int], where: str) -> dict[str, int | None]:
    """``bos/eos/pad_token_id`` of the tokens ``config`` names (an AddedToken dict or its text). EOS
    is required; no BOS stays None (Qwen2 has none); no PAD pads with EOS, as generation does."""
    names = {key: _token_name(config.get(f"{key}_token")) for key in SPECIAL_KEYS}
    if names["eos"] is None:
        raise ExportError(f"{where}: no eos_token")
    missing = [f"{key}_token" for key, name in names.items() if name is not None and name not in added]
    if missing:
        raise ExportError(f"{where}: special tokens missing from the tokenizer: {missing}")
    ids = {f"{key}_token_id": added.get(name) for key, name in names.items()}
    return {**ids, "pad_token_id": ids["eos_token_id"] if ids["pad_token_id"] is None else ids["pad_token_id"]}


def _token_name(value: str | dict | None) -> str | None:
    """A special token as a tokenizer config writes it: its text, or an AddedToken dict holding it."""
    return value.get("content") if isinstance(value, dict) else value


def _json(value: dict) -> str:
    return json.dumps(value, indent=2) + "\n"
