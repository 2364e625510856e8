"""Tokenization: a byte-level BPE tokenizer (trained here or loaded) and, next, packed token shards."""
