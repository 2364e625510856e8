"""The byte-level BPE tokenizer: exact round trips, single digits, determinism, saving and loading."""

from __future__ import annotations

import json
import re
import unicodedata

import boto3
import numpy as np
import pytest
from tokenizers import Tokenizer, models, pre_tokenizers, trainers

from conftest import CORPUS
from skymoe.pipelines.tokenize.tokenizer import (BOS, EOS, PAD, TokenizerError, check_token_dtype, load_tokenizer,
                                          save_tokenizer, smallest_token_dtype, train_tokenizer)
from skymoe.storage import Storage

VOCAB = 2000
HARD = [
    "",
    "12345",
    "Pi is 3.14159, not 22/7; call +86-10-1234-5678 or ０１２３ (full-width).",
    "emoji 😀 👩🏽‍💻 🇨🇳 ❤️ family 👨‍👩‍👧‍👦",
    "rare CJK 𠀀𪚥 and the last code point \U0010ffff",
    "control \x00\x07\x1b[31m red \x7f",
    "mixed: English 中文 Русский العربية हिन्दी 日本語 한국어 Ελληνικά",
    "combining e\u0301 vs é, zero\u200bwidth, BOM \ufeff, replacement \ufffd",
    "  leading and trailing spaces\t\n\r\n  ",
    "special tokens as text: </s> <s> <pad> end",
    "spacing before punctuation , . ! ? 's n't",
]


@pytest.fixture(scope="module")
def corpus_texts() -> list[str]:
    """Every document of the bundled demo corpus (English, and Chinese from two sources)."""
    def jsonl(path):
        return [json.loads(line)["text"] for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]

    zhwiki = (CORPUS / "zhwiki" / "zhwiki_part1.txt").read_text(encoding="utf-8").splitlines()
    return (jsonl(CORPUS / "c4" / "c4_demo.jsonl") + [line for line in zhwiki if line.strip()]
            + jsonl(CORPUS / "cmrc2018" / "cmrc2018_contexts.jsonl"))


@pytest.fixture(scope="module")
def tokenizer(corpus_texts) -> Tokenizer:
    return train_tokenizer(corpus_texts, vocab_size=VOCAB)


def test_trained_vocabulary_and_special_ids(tokenizer):
    assert tokenizer.get_vocab_size() == VOCAB
    assert [tokenizer.token_to_id(t) for t in (BOS, EOS, PAD)] == [0, 1, 2]


def test_round_trip_every_corpus_document(tokenizer, corpus_texts):
    assert len(corpus_texts) > 2000
    encodings = tokenizer.encode_batch(corpus_texts)
    assert tokenizer.decode_batch([e.ids for e in encodings]) == corpus_texts
    assert not any(0 <= i <= 2 for e in encodings for i in e.ids)
    assert sum(bool(re.search("[\u4e00-\u9fff]", t)) for t in corpus_texts) > 1800  # Chinese included


@pytest.mark.parametrize("text", HARD)
def test_round_trip_hard_strings(tokenizer, text):
    assert tokenizer.decode(tokenizer.encode(text).ids) == text


def test_special_token_text_is_not_a_control_id(tokenizer):
    ids = tokenizer.encode("a </s> b <s> <pad>").ids
    assert not {0, 1, 2} & set(ids)


def test_numbers_are_single_digits(tokenizer):
    assert tokenizer.encode("12345").tokens == ["1", "2", "3", "4", "5"]
    assert tokenizer.encode("x2024年").tokens[1:5] == ["2", "0", "2", "4"]
    # No learned token joins a digit to anything: numeric characters (what the Digits
    # pre-tokenizer splits on: Unicode Nd, Nl, No) only ever stand alone.
    for token_id in range(tokenizer.get_vocab_size()):
        text = tokenizer.decode([token_id])
        if any(unicodedata.category(ch) in ("Nd", "Nl", "No") for ch in text):
            assert len(text) == 1, (token_id, text)


def test_training_is_deterministic(tokenizer, corpus_texts):
    again = train_tokenizer(iter(corpus_texts), vocab_size=VOCAB)
    assert again.to_str().encode() == tokenizer.to_str().encode()


def test_vocab_too_small_for_bytes_and_specials():
    with pytest.raises(TokenizerError, match="258"):
        train_tokenizer(["abc"], vocab_size=258)


def test_save_and_load_local(tokenizer, corpus_texts, tmp_path):
    storage = Storage()
    folder = str(tmp_path / "tok")
    written = save_tokenizer(tokenizer, storage, folder)
    assert sorted(uri.rsplit("/", 1)[1] for uri in written) == [
        "special_tokens_map.json", "tokenizer.json", "tokenizer_config.json"]
    samples = corpus_texts[::50] + HARD
    for uri in (folder, f"{folder}/tokenizer.json"):
        loaded = load_tokenizer(storage, uri)
        assert [e.ids for e in loaded.encode_batch(samples)] == [e.ids for e in tokenizer.encode_batch(samples)]
        assert not {0, 1, 2} & set(loaded.encode(HARD[-2]).ids)  # special-token text stays text after loading


def test_transformers_loads_the_saved_folder(tokenizer, corpus_texts, tmp_path):
    from transformers import AutoTokenizer

    folder = tmp_path / "tok"
    save_tokenizer(tokenizer, Storage(), str(folder))
    hf = AutoTokenizer.from_pretrained(str(folder))
    assert (hf.bos_token, hf.eos_token, hf.pad_token) == (BOS, EOS, PAD)
    assert (hf.bos_token_id, hf.eos_token_id, hf.pad_token_id) == (0, 1, 2)
    samples = corpus_texts[::10] + HARD
    ids = hf(samples)["input_ids"]
    assert ids == [e.ids for e in tokenizer.encode_batch(samples)]
    assert hf.batch_decode(ids) == samples


def test_save_and_load_s3(tokenizer, s3_server):
    client = boto3.client("s3", endpoint_url=s3_server)
    if "skymoe-tok" not in [b["Name"] for b in client.list_buckets().get("Buckets", [])]:
        client.create_bucket(Bucket="skymoe-tok")
    storage = Storage(s3_endpoint_url=s3_server)
    written = save_tokenizer(tokenizer, storage, "s3://skymoe-tok/run/tokenizer")
    assert all(storage.exists(uri) for uri in written)
    loaded = load_tokenizer(storage, "s3://skymoe-tok/run/tokenizer")
    assert loaded.encode(HARD[6]).ids == tokenizer.encode(HARD[6]).ids
    with pytest.raises(TokenizerError, match="s3://skymoe-tok/elsewhere/tokenizer.json"):
        load_tokenizer(storage, "s3://skymoe-tok/elsewhere")


def test_missing_tokenizer_names_the_path(tmp_path):
    for uri in (str(tmp_path / "absent"), str(tmp_path / "absent.json")):
        with pytest.raises(TokenizerError, match="absent"):
            load_tokenizer(Storage(), uri)


def test_invalid_file_names_the_path(tmp_path):
    path = tmp_path / "broken" / "tokenizer.json"
    path.parent.mkdir()
    path.write_text("{not json", encoding="utf-8")
    with pytest.raises(TokenizerError, match=re.escape(str(path))):
        load_tokenizer(Storage(), str(path.parent))


def test_tokenizer_without_special_tokens_is_refused(tmp_path):
    plain = Tokenizer(models.BPE())
    plain.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    plain.train_from_iterator(["plain text without specials"] * 3,
                              trainers.BpeTrainer(vocab_size=300, show_progress=False,
                                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    path = tmp_path / "plain.json"
    plain.save(str(path))
    expected = f"{path}: tokenizer lacks the special tokens ['<s>', '</s>', '<pad>']"
    with pytest.raises(TokenizerError, match=re.escape(expected)):
        load_tokenizer(Storage(), str(path))
    with pytest.raises(TokenizerError, match="special tokens"):
        save_tokenizer(plain, Storage(), str(tmp_path / "out"))
    assert not (tmp_path / "out").exists()


def test_smallest_token_dtype():
    assert smallest_token_dtype(VOCAB) == np.uint16
    assert smallest_token_dtype(65_536) == np.uint16
    assert smallest_token_dtype(65_537) == np.uint32
    assert smallest_token_dtype(2**32) == np.uint32
    for size in (0, 2**32 + 1):
        with pytest.raises(TokenizerError):
            smallest_token_dtype(size)


def test_check_token_dtype():
    assert check_token_dtype("uint16", 65_536) == np.uint16
    assert check_token_dtype(np.int32, 65_537) == np.int32
    with pytest.raises(TokenizerError, match="uint16 holds ids up to 65535.*65537.*uint32"):
        check_token_dtype("uint16", 65_537)
    with pytest.raises(TokenizerError, match="not an integer"):
        check_token_dtype("float32", VOCAB)
    with pytest.raises(TokenizerError, match="unknown"):
        check_token_dtype("uint12", VOCAB)
