"""The tokenizer: byte-level BPE with single-digit numbers, trained locally with ``tokenizers``.

Skywork's tokenizer splits numbers into single digits and falls back to bytes for unknown UTF-8.
Here the same two properties come from the pre-tokenizer and the alphabet: ``Digits`` isolates
every digit before BPE sees the text (so no merge can ever join two digits), and the initial
alphabet is all 256 byte symbols, so every input has a spelling and nothing is ever unknown.
There is no normalizer and no prefix space, so ``decode(encode(text)) == text`` exactly.

A trained tokenizer's special tokens are BOS ``<s>`` (id 0), EOS ``</s>`` (id 1) and PAD ``<pad>``
(id 2). They are control ids, never text: a document that contains the literal string ``</s>`` is encoded as its
bytes (``encode_special_tokens`` here, ``split_special_tokens`` in the Hugging Face config), so a
web page cannot forge a document boundary, and the stage places EOS ids itself. Nothing is
added by a post-processor for the same reason.

A given tokenizer (a Hugging Face folder, e.g. a Llama's, Mistral's or Qwen2's) is used as it is:
no token is added, and its special tokens are the ones its ``tokenizer_config.json`` and
``special_tokens_map.json`` name, whatever they are called. Only EOS is required (the packer ends
every document with it); Qwen2 has no BOS, and a missing PAD is padded with EOS downstream. Its
post-processor still runs (a Llama's puts BOS before every document), but one that adds EOS is
refused: EOS would come twice. A bare ``tokenizer.json`` has no config: it must hold this project's
three tokens. Special-token text stays text here too.

``tokenizers`` does not store ``encode_special_tokens`` in ``tokenizer.json``: load a tokenizer
with :func:`load_tokenizer` (which sets it), not ``Tokenizer.from_file``.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from skymoe.storage import Storage, join

BOS, EOS, PAD = "<s>", "</s>", "<pad>"
SPECIAL_TOKENS = (BOS, EOS, PAD)  # trained in this order: ids 0, 1, 2
TOKENIZER_FILE, CONFIG_FILE, MAP_FILE = "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"
# The Hugging Face config of a trained tokenizer (and what a bare tokenizer.json is taken to have).
# transformers 5 would name its own TokenizersBackend class, which transformers 4 cannot load, while
# PreTrainedTokenizerFast loads in both; clean_up_tokenization_spaces is off because transformers 4
# would otherwise rewrite " ." as "." when decoding.
TRAINED_CONFIG = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": BOS, "eos_token": EOS,
                  "pad_token": PAD, "split_special_tokens": True, "clean_up_tokenization_spaces": False}
# The special-token attributes transformers keeps in special_tokens_map.json.
MAP_KEYS = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token",
            "additional_special_tokens")
_BYTE_ALPHABET = pre_tokenizers.ByteLevel.alphabet()


class TokenizerError(ValueError):
    """A tokenizer that cannot be used: missing, unreadable, without its special tokens, or too big
    for the integer type chosen to store its ids."""


@dataclass(frozen=True)
class SpecialTokens:
    """The special tokens a tokenizer's config names; only EOS is required."""

    eos: str
    bos: str | None = None
    pad: str | None = None


@dataclass(frozen=True)
class TokenizerFolder:
    """A loaded tokenizer with its Hugging Face config (special tokens included) and those tokens."""

    tokenizer: Tokenizer
    config: dict
    specials: SpecialTokens

    @property
    def eos_id(self) -> int:
        return self.tokenizer.token_to_id(self.specials.eos)


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


def save_tokenizer(tokenizer: Tokenizer, storage: Storage, folder_uri: str, config: dict | None = None) -> list[str]:
    """Write a Hugging Face tokenizer folder; returns the URIs written.

    ``config`` is the ``tokenizer_config.json`` to write (None: a trained tokenizer's,
    :data:`TRAINED_CONFIG`); ``split_special_tokens`` is always on, so the folder encodes text as the
    stage did. ``special_tokens_map.json`` repeats its special tokens.
    """
    config = {**(TRAINED_CONFIG if config is None else config), "split_special_tokens": True}
    _special_tokens(tokenizer, config, folder_uri)
    files = {
        TOKENIZER_FILE: tokenizer.to_str().encode("utf-8"),
        CONFIG_FILE: _json_bytes(config),
        MAP_FILE: _json_bytes({key: config[key] for key in MAP_KEYS if config.get(key) is not None}),
    }
    written = []
    for name, data in files.items():
        uri = join(folder_uri, name)
        storage.write_bytes(uri, data)
        written.append(uri)
    return written


def load_tokenizer(storage: Storage, uri: str) -> Tokenizer:
    """Load a ``tokenizer.json`` file, or the one inside a tokenizer folder (local or ``s3://``)."""
    return load_tokenizer_folder(storage, uri).tokenizer


def load_tokenizer_folder(storage: Storage, uri: str) -> TokenizerFolder:
    """A ``tokenizer.json`` file, or a tokenizer folder, with its config and special tokens, checked:
    the tokens the config names must be special tokens of the tokenizer."""
    path = uri if uri.endswith(".json") else join(uri, TOKENIZER_FILE)
    try:
        raw = storage.read_bytes(path)
    except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
        raise TokenizerError(f"no tokenizer at {path}") from None
    try:
        tokenizer = Tokenizer.from_str(raw.decode("utf-8"))
    except Exception as err:  # tokenizers raises a bare Exception for any malformed file
        raise TokenizerError(f"{path} is not a valid tokenizer.json: {err}") from None
    config, where = (TRAINED_CONFIG, path) if uri.endswith(".json") else _folder_config(storage, uri)
    specials = _special_tokens(tokenizer, config, where)
    tokenizer.encode_special_tokens = True
    return TokenizerFolder(tokenizer, config, specials)


def tokenizer_files(storage: Storage, uri: str) -> list[str]:
    """The files that define the tokenizer at ``uri`` (what its fingerprint hashes): a
    ``tokenizer.json`` alone, or a folder's ``tokenizer.json`` and the config files it has."""
    if uri.endswith(".json"):
        return [uri]
    return [join(uri, TOKENIZER_FILE)] + [join(uri, name) for name in (CONFIG_FILE, MAP_FILE)
                                          if storage.exists(join(uri, name))]


def _special_tokens(tokenizer: Tokenizer, config: dict, where: str) -> SpecialTokens:
    """The special tokens ``config`` names, refused when EOS is not named, when a named token is not a
    special token of ``tokenizer`` (text could then forge it, or it has no id), or when the
    post-processor adds EOS (the packer adds one after every document)."""
    names = {key: _token_name(config.get(f"{key}_token")) for key in ("bos", "eos", "pad")}
    if names["eos"] is None:
        raise TokenizerError(f"{where}: no eos_token; the packer ends every document with EOS")
    registered = {token.content for token in tokenizer.get_added_tokens_decoder().values() if token.special}
    missing = {f"{key}_token": name for key, name in names.items() if name is not None and name not in registered}
    if missing:
        raise TokenizerError(f"{where}: tokenizer lacks the special tokens {list(missing.values())} (its config's "
                             f"{', '.join(missing)})")
    if tokenizer.token_to_id(names["eos"]) in tokenizer.encode("").ids:
        raise TokenizerError(f"{where}: the tokenizer's post-processor adds eos_token {names['eos']!r} to every "
                             "text; the packer adds it after every document itself")
    return SpecialTokens(**names)


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


def _folder_config(storage: Storage, folder: str) -> tuple[dict, str]:
    """A folder's ``tokenizer_config.json`` with ``special_tokens_map.json`` over it (as
    transformers 4 reads them; older folders name their special tokens only in the map), and where
    its special tokens come from. A folder with neither file is taken as a trained one."""
    config_uri, map_uri = join(folder, CONFIG_FILE), join(folder, MAP_FILE)
    config = _read_json(storage, config_uri) if storage.exists(config_uri) else None
    specials = _read_json(storage, map_uri) if storage.exists(map_uri) else None
    if config is None and specials is None:
        return TRAINED_CONFIG, join(folder, TOKENIZER_FILE)
    merged = {**(config or {}), **{key: value for key, value in (specials or {}).items() if value is not None}}
    return merged, f"{folder} ({CONFIG_FILE}, {MAP_FILE})"


def _read_json(storage: Storage, uri: str) -> dict:
    try:
        value = json.loads(storage.read_text(uri))
    except json.JSONDecodeError as err:
        raise TokenizerError(f"{uri}: not valid JSON: {err}") from None
    if not isinstance(value, dict):
        raise TokenizerError(f"{uri}: not a JSON object")
    return value


def _token_name(value: str | dict | None) -> str | None:
    """A special token as a config writes it: its text, or an AddedToken dict holding it."""
    return value.get("content") if isinstance(value, dict) else value


def _json_bytes(value: dict) -> bytes:
    return (json.dumps(value, indent=2, sort_keys=True) + "\n").encode("utf-8")
