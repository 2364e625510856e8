"""Model weights as a folder of safetensors files with plain ``Transformer`` parameter names.

This is the interchange format between the pieces of training: a dense run's final weights are
what upcycling reads, a Hugging Face Llama import produces one, and the export merges one into a
Hugging Face folder. Expert-parallel ranks each write the experts they own (``experts-epN``) and
one rank writes everything else (``shared``), so no rank ever gathers the whole model.
"""

from __future__ import annotations

import json

import torch
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors

from skymoe.storage import Storage, join
from skymoe.training.model import ModelArgs

ARGS_FILE = "model_args.json"


class WeightsError(ValueError):
    """A weights folder is missing, incomplete or does not fit the model."""


def save_part(storage: Storage, folder: str, name: str, state: dict[str, torch.Tensor]) -> None:
    # clone: tied embeddings share one tensor under two names, which safetensors refuses to write
    tensors = {key: value.detach().to("cpu").clone().contiguous() for key, value in state.items()}
    storage.write_bytes(join(folder, f"{name}.safetensors"), save_safetensors(tensors))


def save_args(storage: Storage, folder: str, args: ModelArgs) -> None:
    storage.write_text(join(folder, ARGS_FILE), json.dumps(args.to_dict(), indent=1))


def load_args(storage: Storage, folder: str) -> ModelArgs:
    uri = join(folder, ARGS_FILE)
    if not storage.exists(uri):
        raise WeightsError(f"{folder}: no {ARGS_FILE}; not a skymoe weights folder")
    return ModelArgs(**json.loads(storage.read_text(uri)))


def load_state(storage: Storage, folder: str) -> dict[str, torch.Tensor]:
    """Every part of a weights folder merged into one state dict."""
    parts = [uri for uri in storage.listdir(folder) if uri.endswith(".safetensors")]
    if not parts:
        raise WeightsError(f"{folder}: no .safetensors files")
    state: dict[str, torch.Tensor] = {}
    for uri in parts:
        state.update(load_safetensors(storage.read_bytes(uri)))
    return state
