"""Model weights as a folder of safetensors files with plain ``Transformer`` parameter names.

This is the interchange format between the pieces of training: a dense run's final weights are
what upcycling reads, a Hugging Face Llama import produces one, and the export merges one into a
Hugging Face folder. Expert-parallel ranks each write the experts they own (``experts-epN``) and
one rank writes everything else (``shared``), so no rank ever gathers the whole model; and
``WeightsReader`` reads single tensors by name, so no rank reads more than it holds.
"""

from __future__ import annotations

import json
import math
import struct
from typing import IO

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


# safetensors' dtype names (https://github.com/huggingface/safetensors, format: an 8-byte little-endian
# header length, a JSON header {name: {dtype, shape, data_offsets}}, then the tensors' bytes)
_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
           "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
           "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2}


class WeightsReader:
    """The tensors of a weights folder by plain name, read one at a time: only the parts' headers are
    read up front, then each tensor's own bytes (a seek and a read; ranged requests on S3). A rank
    that holds a slice of the experts reads that slice and the shared tensors, never a whole part."""

    def __init__(self, storage: Storage, folder: str):
        self.storage, self.folder = storage, folder
        parts = [uri for uri in storage.listdir(folder) if uri.endswith(".safetensors")]
        if not parts:
            raise WeightsError(f"{folder}: no .safetensors files")
        self._files: dict[str, IO[bytes]] = {}
        self._index: dict[str, tuple[str, torch.dtype, tuple[int, ...], int, int]] = {}
        try:
            for uri in parts:
                self._read_header(uri)
        except BaseException:
            self.close()
            raise

    def _read_header(self, uri: str) -> None:
        file = self._files[uri] = self.storage.open_read(uri)
        (length,) = struct.unpack("<Q", file.read(8))
        header = json.loads(file.read(length))
        for name, entry in header.items():
            if name == "__metadata__":
                continue
            if entry["dtype"] not in _DTYPES:
                raise WeightsError(f"{uri}: {name} has dtype {entry['dtype']}, which skymoe does not read")
            if name in self._index:
                raise WeightsError(f"{uri}: {name} is also in {self._index[name][0]}")
            begin, end = entry["data_offsets"]
            dtype, shape = _DTYPES[entry["dtype"]], tuple(entry["shape"])
            if end - begin != math.prod(shape) * dtype.itemsize:
                raise WeightsError(f"{uri}: {name} holds {end - begin} bytes, not what shape {list(shape)} needs")
            self._index[name] = (uri, dtype, shape, 8 + length + begin, end - begin)

    def __enter__(self) -> "WeightsReader":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        for file in self._files.values():
            file.close()
        self._files.clear()

    def shapes(self) -> dict[str, tuple[int, ...]]:
        return {name: entry[2] for name, entry in self._index.items()}

    def read(self, name: str) -> torch.Tensor:
        if name not in self._index:
            raise WeightsError(f"{self.folder}: no tensor {name}")
        uri, dtype, shape, start, size = self._index[name]
        if size == 0:
            return torch.empty(shape, dtype=dtype)
        file = self._files[uri]
        file.seek(start)
        data = bytearray(size)
        view, done = memoryview(data), 0
        while done < size:
            got = file.readinto(view[done:]) if hasattr(file, "readinto") else None
            if got is None:  # a file object without readinto
                chunk = file.read(size - done)
                view[done : done + len(chunk)] = chunk
                got = len(chunk)
            if not got:
                raise WeightsError(f"{uri}: {name} is cut short")
            done += got
        return torch.frombuffer(data, dtype=dtype).reshape(shape)


@torch.no_grad()
def load_into(reader: WeightsReader, targets: dict[str, torch.Tensor], expected: dict[str, tuple[int, ...]],
              optional_zero: tuple[str, ...] = (".router.bias",)) -> None:
    """Fills ``targets`` (plain name -> this rank's tensor) from ``reader``, as a strict
    ``load_state_dict`` would for the whole model: the folder must hold exactly the tensors of the
    model (``expected``, plain name -> shape, every rank's), each of its shape. A name ending in one of
    ``optional_zero`` may be absent (weights saved before the router had a bias) and is then zero."""
    shapes = reader.shapes()
    missing = sorted(name for name in expected if name not in shapes and not name.endswith(optional_zero))
    unexpected = sorted(set(shapes) - set(expected))
    if missing or unexpected:
        raise WeightsError(f"{reader.folder} does not fit the model: missing {missing[:3]} ({len(missing)}), "
                           f"unexpected {unexpected[:3]} ({len(unexpected)})")
    wrong = [f"{name} {list(shapes[name])} != {list(shape)}" for name, shape in expected.items()
             if name in shapes and tuple(shapes[name]) != tuple(shape)]
    if wrong:
        raise WeightsError(f"{reader.folder}: shapes do not fit the model: {wrong[:3]}")
    for name, tensor in targets.items():
        if name in shapes:
            tensor.copy_(reader.read(name))
        else:
            tensor.zero_()
