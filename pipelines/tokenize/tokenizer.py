"""The tokenizer: byte-level BPE with single-digit numbers, trained locally with ``tokenizers``.

Skywork's tokenizer splits numbers into single digits and falls back to bytes for unknown UTF-8.
Here the same two properties come from the pre-tokenizer and the alphabet: ``Digits`` isolates
every digit before BPE sees the text (so no merge can ever join two digits), and the initial
alphabet is all 256 byte symbols, so every input has a spelling and nothing is ever unknown.
There is no normalizer and no prefix space, so ``decode(encode(text)) == text`` exactly.

Special tokens are BOS ``<s>`` (id 0), EOS ``</s>`` (id 1) and PAD ``<pad>`` (id 2). They are
control ids, never text: a document that contains the literal string ``</s>`` is encoded as its
bytes (``encode_special_tokens`` here, ``split_special_tokens`` in the Hugging Face config), so a
web page cannot forge a document boundary, and the stage places BOS/EOS ids itself. Nothing is
added by a post-processor for the same reason.

``tokenizers`` does not store ``encode_special_tokens`` in ``tokenizer.json``: load a tokenizer
with :func:`load_tokenizer` (which sets it), not ``Tokenizer.from_file``.
"""

from __future__ import annotations

import json
from collections.abc import Iterable

import numpy as np
import numpy.typing as npt
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from skymoe.storage import Storage, join

BOS, EOS, PAD = "<s>", "</s>", "<pad>"
SPECIAL_TOKENS = (BOS, EOS, PAD)  # trained in this order: ids 0, 1, 2
TOKENIZER_FILE = "tokenizer.json"
_BYTE_ALPHABET = pre_tokenizers.ByteLevel.alphabet()


class TokenizerError(ValueError):
    """A tokenizer that cannot be used: missing, unreadable, without its special tokens, or too big
    for the integer type chosen to store its ids."""


def train_tokenizer(texts: Iterable[str], vocab_size: int, min_frequency: int = 2) -> Tokenizer:
    """Train a byte-level BPE on ``texts``.

    Deterministic: the same texts in the same order give the same ``tokenizer.json`` bytes. The
    vocabulary can come out smaller than ``vocab_size`` when the texts offer too few pairs seen
    ``min_frequency`` times; ``get_vocab_size()`` is the size to use downstream.
    """
    smallest = len(_BYTE_ALPHABET) + len(SPECIAL_TOKENS)
    if vocab_size < smallest:
        raise TokenizerError(f"vocab_size {vocab_size} is below {smallest}: the 256 byte symbols "
                             "and the special tokens must all fit")
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Digits(individual_digits=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False),
    ])
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=min_frequency,
                                  special_tokens=list(SPECIAL_TOKENS), initial_alphabet=_BYTE_ALPHABET,
                                  show_progress=False)
    tokenizer.train_from_iterator(texts, trainer)
    tokenizer.encode_special_tokens = True
    return tokenizer


def save_tokenizer(tokenizer: Tokenizer, storage: Storage, folder_uri: str) -> list[str]:
    """Write a Hugging Face tokenizer folder; returns the URIs written.

    The two config files are written here rather than by ``save_pretrained``: transformers 5 names
    its own ``TokenizersBackend`` class there, which transformers 4 cannot load, while
    ``PreTrainedTokenizerFast`` loads in both. ``clean_up_tokenization_spaces`` is off because
    transformers 4 would otherwise rewrite " ." as "." when decoding.
    """
    _check_special_tokens(tokenizer, folder_uri)
    specials = {"bos_token": BOS, "eos_token": EOS, "pad_token": PAD}
    config = {"tokenizer_class": "PreTrainedTokenizerFast", **specials,
              "split_special_tokens": True, "clean_up_tokenization_spaces": False}
    files = {
        TOKENIZER_FILE: tokenizer.to_str().encode("utf-8"),
        "tokenizer_config.json": _json_bytes(config),
        "special_tokens_map.json": _json_bytes(specials),
    }
    written = []
    for name, data in files.items():
        uri = join(folder_uri, name)
        storage.write_bytes(uri, data)
        written.append(uri)
    return written


def load_tokenizer(storage: Storage, uri: str) -> Tokenizer:
    """Load a ``tokenizer.json`` file, or the one inside a tokenizer folder (local or ``s3://``)."""
    path = uri if uri.endswith(".json") else join(uri, TOKENIZER_FILE)
    try:
        raw = storage.read_bytes(path)
    except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
        raise TokenizerError(f"no tokenizer at {path}") from None
    try:
        tokenizer = Tokenizer.from_str(raw.decode("utf-8"))
    except Exception as err:  # tokenizers raises a bare Exception for any malformed file
        raise TokenizerError(f"{path} is not a valid tokenizer.json: {err}") from None
    _check_special_tokens(tokenizer, path)
    tokenizer.encode_special_tokens = True
    return tokenizer


def smallest_token_dtype(vocab_size: int) -> np.dtype:
    """The narrowest unsigned integer type for ids 0..vocab_size-1 (uint16 holds Skywork's 65,536)."""
    for dtype in (np.dtype(np.uint16), np.dtype(np.uint32)):
        if 0 < vocab_size <= np.iinfo(dtype).max + 1:
            return dtype
    raise TokenizerError(f"no token id type for a vocabulary of {vocab_size}")


def check_token_dtype(dtype: npt.DTypeLike, vocab_size: int) -> np.dtype:
    """A configured id type as a numpy dtype, refused when it cannot hold every id of the vocabulary
    (ids would wrap around silently when written)."""
    try:
        resolved = np.dtype(dtype)
    except TypeError:
        raise TokenizerError(f"unknown token id type {dtype!r}") from None
    if resolved.kind not in "iu":
        raise TokenizerError(f"token id type {resolved} is not an integer type")
    if np.iinfo(resolved).max < vocab_size - 1:
        raise TokenizerError(f"token id type {resolved} holds ids up to {np.iinfo(resolved).max}, but the "
                             f"vocabulary has {vocab_size} ids; use {smallest_token_dtype(vocab_size)}")
    return resolved


def _check_special_tokens(tokenizer: Tokenizer, where: str) -> None:
    registered = {token.content for token in tokenizer.get_added_tokens_decoder().values() if token.special}
    missing = [token for token in SPECIAL_TOKENS if token not in registered]
    if missing:
        raise TokenizerError(f"{where}: tokenizer lacks the special tokens {missing}")


def _json_bytes(value: dict) -> bytes:
    return (json.dumps(value, indent=2, sort_keys=True) + "\n").encode("utf-8")
