"""Your own dense model and tokenizer: Hugging Face Llama, Mistral and Qwen2 folders imported exactly,
their tokenizer used as it is (special tokens from its config, none added), the mismatches refused
before any stage works, and one pipeline run (clean -> tokenize -> train -> export) from a Qwen2-style
model with a tokenizer that has neither BOS nor PAD.

Everything is built here offline: tiny random models from transformers' config classes and a BPE
trained with ``tokenizers``, saved the way Hugging Face saves them.
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import pyarrow.ipc as ipc
import pytest
import torch
from safetensors.torch import load_file
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

from conftest import CORPUS, SMALL_EVALUATE, SMALL_TRAIN
from skymoe.config import MoELayerConfig, load_config
from skymoe.pipeline import check_stages, run_pipeline, stage_range
from skymoe.pipelines.tokenize.tokenizer import TokenizerError, load_tokenizer_folder, save_tokenizer
from skymoe.storage import Storage
from skymoe.training.export import export_hf
from skymoe.training.hf_import import HfImportError, SequenceLengthError, checkpoint_args, import_checkpoint
from skymoe.training.model import Transformer
from skymoe.training.presets import with_moe
from skymoe.training.upcycle import upcycle
from skymoe.training.weights import save_args, save_part

STORAGE = Storage()
EOT = "<|endoftext|>"
TOKENIZER_VOCAB = 600
SEQ_LEN = 32
MAX_LOGIT_DIFF = 1e-5
TEXTS = [json.loads(line)["text"] for line in (CORPUS / "c4" / "c4_demo.jsonl").read_text("utf-8").splitlines()]
# Each kind's distinguishing features; every model is tiny (hidden 64, 2 layers, GQA).
KINDS = {
    "llama": {"tie_word_embeddings": False, "rope_parameters": {
        "rope_type": "llama3", "factor": 4.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
        "original_max_position_embeddings": 16, "rope_theta": 50000.0}},
    "mistral": {"tie_word_embeddings": False, "sliding_window": 64},
    "qwen2": {"tie_word_embeddings": True, "rope_parameters": {"rope_type": "linear", "factor": 2.0,
                                                               "rope_theta": 10000.0}},
}


def hf_checkpoint(folder: Path, kind: str, vocab_size: int, **changes) -> torch.nn.Module:
    """A random ``kind`` model saved as a Hugging Face folder (safetensors), returned in eval mode."""
    import transformers

    names = {"llama": "Llama", "mistral": "Mistral", "qwen2": "Qwen2"}[kind]
    config = getattr(transformers, f"{names}Config")(
        vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, initializer_range=0.1, **{**KINDS[kind], **changes})
    torch.manual_seed(0)
    model = getattr(transformers, f"{names}ForCausalLM")(config).eval()
    if kind == "qwen2":  # random, not zero, q/k/v biases: the import must carry them
        with torch.no_grad():
            for name, param in model.named_parameters():
                if name.endswith("_proj.bias"):
                    param.normal_(std=0.1)
    model.save_pretrained(folder)
    return model


def byte_bpe(specials: list[str], post_processor=None) -> Tokenizer:
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.train_from_iterator(TEXTS, trainers.BpeTrainer(
        vocab_size=TOKENIZER_VOCAB, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False))
    if post_processor is not None:
        tokenizer.post_processor = post_processor
    return tokenizer


@pytest.fixture(scope="module")
def hf_tokenizer(tmp_path_factory) -> Path:
    """A Qwen2-like tokenizer folder as transformers saves it: EOS <|endoftext|>, no BOS, no PAD."""
    from transformers import PreTrainedTokenizerFast

    folder = tmp_path_factory.mktemp("hf-tokenizer")
    tokenizer = byte_bpe([EOT, "<|im_start|>", "<|im_end|>"])
    PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token=EOT).save_pretrained(str(folder))
    return folder


def llama_style_tokenizer(folder: Path, post_processor) -> Path:
    """A folder as older transformers wrote Llama's: BOS ``<s>`` as an AddedToken dict, EOS ``</s>``,
    no PAD, named only in special_tokens_map.json."""
    byte_bpe(["<s>", "</s>"], post_processor).save(str(folder / "tokenizer.json"))
    bos = {"content": "<s>", "lstrip": False, "rstrip": False, "normalized": False, "single_word": False}
    (folder / "special_tokens_map.json").write_text(json.dumps({"bos_token": bos, "eos_token": "</s>",
                                                                "pad_token": None}))
    return folder


@pytest.fixture(scope="module")
def llama_tokenizer(tmp_path_factory) -> Path:
    """Llama-2-like: its post-processor puts BOS before every text."""
    bos_first = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 0)])
    return llama_style_tokenizer(tmp_path_factory.mktemp("llama-tokenizer"), bos_first)


def logit_difference(model: torch.nn.Module, reference: torch.nn.Module, vocab: int) -> float:
    ids = torch.randint(0, vocab, (2, 48), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        return (model(ids) - reference(ids).logits).abs().max().item()


# ---------------------------------------------------------------------------------------- import
@pytest.mark.parametrize("kind", KINDS)
def test_import_computes_the_transformers_logits(tmp_path, kind):
    """GQA, tied and untied embeddings, llama3 and linear RoPE scaling, Qwen2's q/k/v biases, a
    Mistral window no shorter than the sequence: the imported model's logits are transformers'."""
    reference = hf_checkpoint(tmp_path, kind, 512)
    args, state = import_checkpoint(STORAGE, str(tmp_path), 48)
    assert (args.qkv_bias, args.tie_embeddings, args.n_kv_heads, args.max_seq_len) == (
        kind == "qwen2", kind == "qwen2", 2, 48)
    model = Transformer(args).eval()
    model.load_state_dict(state)
    assert logit_difference(model, reference, 512) < MAX_LOGIT_DIFF


def test_upcycled_qwen2_computes_the_dense_function(tmp_path):
    """Every expert a copy of the dense FFN and q/k/v biases copied: at step 0 the MoE is the dense model."""
    reference = hf_checkpoint(tmp_path, "qwen2", 512)
    args, state = import_checkpoint(STORAGE, str(tmp_path), 48)
    dense = Transformer(args).eval()
    dense.load_state_dict(state)
    moe = upcycle(dense, with_moe(args, MoELayerConfig(num_experts=4, capacity_factor=None))).eval()
    assert moe.layers[0].self_attn.q_proj.bias is not None
    assert logit_difference(moe, reference, 512) < MAX_LOGIT_DIFF


def test_export_of_imported_qwen2_loads_in_transformers(tmp_path, hf_tokenizer):
    """The exported remote code follows model.py: biases and scaled RoPE survive ``from_pretrained``;
    config.json has no BOS id and pads with EOS, as the tokenizer says."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    reference = hf_checkpoint(tmp_path / "qwen2", "qwen2", 640)
    args, state = import_checkpoint(STORAGE, str(tmp_path / "qwen2"), 64)
    save_part(STORAGE, str(tmp_path / "weights"), "shared", state)
    save_args(STORAGE, str(tmp_path / "weights"), args)
    source = load_tokenizer_folder(STORAGE, str(hf_tokenizer))
    save_tokenizer(source.tokenizer, STORAGE, str(tmp_path / "tok"), source.config)
    export_hf(STORAGE, str(tmp_path / "weights"), str(tmp_path / "tok"), str(tmp_path / "hf"))

    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    eos = source.eos_id
    assert (config["bos_token_id"], config["eos_token_id"], config["pad_token_id"]) == (None, eos, eos)
    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "hf", trust_remote_code=True)
    ids = AutoTokenizer.from_pretrained(tmp_path / "hf", trust_remote_code=True)(TEXTS[0][:200], return_tensors="pt")
    assert ids.input_ids.max() < TOKENIZER_VOCAB
    with torch.no_grad():
        assert (hf(ids.input_ids).logits - reference(ids.input_ids).logits).abs().max().item() < MAX_LOGIT_DIFF


def test_legacy_rope_scaling_reads_as_rope_parameters(tmp_path):
    """config.json from transformers 4 (rope_theta + rope_scaling with "type") imports the same shape."""
    hf_checkpoint(tmp_path, "qwen2", 512)
    config_file = tmp_path / "config.json"
    config = json.loads(config_file.read_text())
    new = checkpoint_args(STORAGE, str(tmp_path), 48)
    del config["rope_parameters"]
    config_file.write_text(json.dumps({**config, "rope_theta": 10000.0, "rope_scaling": {"type": "linear",
                                                                                         "factor": 2.0}}))
    assert checkpoint_args(STORAGE, str(tmp_path), 48) == new
    assert new.rope_freq_scaling == {"rope_type": "linear", "factor": 2.0}


def test_import_refuses_what_it_cannot_reproduce(tmp_path):
    source = tmp_path / "source"
    hf_checkpoint(source, "mistral", 512)

    def changed(name: str, **fields) -> str:
        folder = tmp_path / name
        shutil.copytree(source, folder)
        config = json.loads((folder / "config.json").read_text())
        (folder / "config.json").write_text(json.dumps({**config, **fields}))
        return str(folder)

    refusals = [
        (changed("yarn", rope_parameters={"rope_type": "yarn", "factor": 4.0, "rope_theta": 1e4}),
         HfImportError, r"config\.json: rope_parameters of type 'yarn' is not supported"),
        (changed("dynamic", rope_scaling={"type": "dynamic", "factor": 2.0}), HfImportError,
         "rope_scaling of type 'dynamic'"),
        (changed("partial", rope_parameters={"rope_type": "default", "rope_theta": 1e4, "partial_rotary_factor": 0.5}),
         HfImportError, "partial_rotary_factor"),
        (changed("incomplete", rope_parameters={"rope_type": "llama3", "factor": 8.0, "rope_theta": 1e4}),
         HfImportError, r"lacks \['low_freq_factor'"),
        (changed("window", sliding_window=16), SequenceLengthError, "sliding_window is 16"),
        (changed("short", max_position_embeddings=32), SequenceLengthError, "max_position_embeddings is 32"),
        (changed("gemma", model_type="gemma"), HfImportError, "model_type is 'gemma'"),
        (changed("llama-bias", model_type="llama", attention_bias=True), HfImportError, "attention_bias is true"),
    ]
    for folder, error, match in refusals:
        with pytest.raises(error, match=match):
            checkpoint_args(STORAGE, folder, 48)
    # Qwen2 files carry a window they do not use unless use_sliding_window is on.
    unused = changed("unused-window", model_type="qwen2", sliding_window=16, use_sliding_window=False,
                     layer_types=None)
    assert checkpoint_args(STORAGE, unused, 48).max_seq_len == 48


# ---------------------------------------------------------------------------------------- tokenizer
def test_hf_tokenizer_folder_is_used_as_it_is(hf_tokenizer, tmp_path):
    folder = load_tokenizer_folder(STORAGE, str(hf_tokenizer))
    assert (folder.specials.eos, folder.specials.bos, folder.specials.pad) == (EOT, None, None)
    assert folder.tokenizer.get_vocab_size() == TOKENIZER_VOCAB  # nothing added
    assert folder.eos_id not in folder.tokenizer.encode(f"a {EOT} b").ids  # special-token text stays text

    save_tokenizer(folder.tokenizer, STORAGE, str(tmp_path / "copy"), folder.config)
    saved = json.loads((tmp_path / "copy" / "tokenizer_config.json").read_text())
    assert saved["eos_token"] == EOT and "bos_token" not in saved and saved["split_special_tokens"] is True
    assert json.loads((tmp_path / "copy" / "special_tokens_map.json").read_text()) == {"eos_token": EOT}


def test_llama_style_folder_with_added_token_dicts(llama_tokenizer, tmp_path):
    """Special tokens written as AddedToken dicts, only in special_tokens_map.json, BOS added by the
    post-processor (Llama's), no PAD: read as they are. A post-processor that adds EOS is refused."""
    folder = load_tokenizer_folder(STORAGE, str(llama_tokenizer))
    assert (folder.specials.bos, folder.specials.eos, folder.specials.pad) == ("<s>", "</s>", None)
    assert folder.tokenizer.encode("hello").ids[0] == 0  # documents start with BOS, as Llama's do

    eos_last = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    llama_style_tokenizer(tmp_path, eos_last)
    with pytest.raises(TokenizerError, match="post-processor adds eos_token '</s>'"):
        load_tokenizer_folder(STORAGE, str(tmp_path))


# ---------------------------------------------------------------------------------------- plan-time checks
def pipeline_config(tmp_path: Path, dense_source: Path, tokenizer: Path | None, **tokenize):
    """Clean (one small English file, no quality model) -> tokenize with ``tokenizer`` -> import
    ``dense_source`` and upcycle it for 3 steps."""
    inputs = tmp_path / "input.jsonl"
    inputs.write_text("\n".join(json.dumps({"text": text}) for text in TEXTS[:120]) + "\n", encoding="utf-8")
    train = {**SMALL_TRAIN, "dense_source": str(dense_source), "dense": {"steps": 0},
             "upcycled": {"steps": 3, "lr": 1e-3, "warmup_steps": 1}, "eval_every": 100, "checkpoint_every": 3}
    tokenizer_settings = {"path": str(tokenizer)} if tokenizer else {}
    return load_config(None, {
        "storage": {"root": str(tmp_path / "root")},
        "clean": {"inputs": [str(inputs)], "executor": {"workers": 1}, "classifier": {"enabled": False}},
        "tokenize": {"seq_len": SEQ_LEN, "tokenizer": tokenizer_settings, **tokenize},
        "train": train, "evaluate": SMALL_EVALUATE})


def refused_before_cleaning(config, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        check_stages(config, Storage.from_config(config.storage), stage_range(until="train"))
    assert not Path(config.storage.root, "clean").exists()


def test_mismatches_are_refused_before_cleaning(tmp_path, hf_tokenizer):
    small = tmp_path / "small-vocab"
    hf_checkpoint(small, "llama", TOKENIZER_VOCAB - 88)
    refused_before_cleaning(pipeline_config(tmp_path, small, hf_tokenizer),
                            r"tokenize\.tokenizer\.path: the tokenizer has 600 token ids, more than the vocab_size "
                            r"512 of train\.dense_source")
    refused_before_cleaning(pipeline_config(tmp_path, small, None), r"tokenize\.tokenizer\.vocab_size: .*4096")

    fits = tmp_path / "fits"
    hf_checkpoint(fits, "mistral", 640, sliding_window=16)
    refused_before_cleaning(pipeline_config(tmp_path, fits, hf_tokenizer),
                            r"tokenize\.seq_len 32 is too long for train\.dense_source: .*sliding_window is 16")
    refused_before_cleaning(pipeline_config(tmp_path, small, hf_tokenizer, seq_len=128),
                            r"tokenize\.seq_len 128 .*max_position_embeddings is 64")

    no_eos = tmp_path / "no-eos"
    shutil.copytree(hf_tokenizer, no_eos)
    config_file = no_eos / "tokenizer_config.json"
    config_file.write_text(json.dumps({k: v for k, v in json.loads(config_file.read_text()).items()
                                       if k != "eos_token"}))
    refused_before_cleaning(pipeline_config(tmp_path, fits, no_eos), r"tokenize\.tokenizer\.path: .*no eos_token")


# ---------------------------------------------------------------------------------------- end to end
@pytest.mark.parametrize("kind,tokenizer,model_vocab", [("qwen2", "hf_tokenizer", 640),
                                                         ("llama", "llama_tokenizer", TOKENIZER_VOCAB)])
def test_pipeline_from_your_model_and_tokenizer(tmp_path, request, caplog, kind, tokenizer, model_vocab):
    """Qwen2-style (biases, tied, linear RoPE) with a tokenizer that has no BOS and no PAD and fewer ids
    than the model's padded vocabulary (allowed, and said); Llama-style (GQA, untied, llama3 RoPE) with
    a tokenizer whose post-processor starts every document with BOS. Documents are packed with the
    tokenizer's EOS, the import is exact, the upcycled MoE trains and exports with the tokenizer's ids."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer_folder = request.getfixturevalue(tokenizer)
    reference = hf_checkpoint(tmp_path / kind, kind, model_vocab)
    config = pipeline_config(tmp_path, tmp_path / kind, tokenizer_folder)
    storage = Storage.from_config(config.storage)
    wanted = stage_range(until="train")
    with caplog.at_level(logging.WARNING, logger="skymoe.train"):
        check_stages(config, storage, wanted)
    unused_rows = f"{TOKENIZER_VOCAB} token ids, train.dense_source's vocab_size is {model_vocab}"
    assert (unused_rows in caplog.text) == (model_vocab > TOKENIZER_VOCAB)
    _, tokens, train = run_pipeline(config, storage, wanted)

    assert tokens.manifest.extra["vocab_size"] == TOKENIZER_VOCAB
    source = load_tokenizer_folder(storage, str(tokenizer_folder))
    bos = source.tokenizer.token_to_id(source.specials.bos) if source.specials.bos else None
    with ipc.open_file(Path(tokens.ref.uri) / tokens.manifest.extra["index"][0]["path"]) as reader:
        rows = reader.read_all()
    ids, starts = rows.column("input_ids").to_pylist(), rows.column("doc_starts").to_pylist()
    assert max(map(max, ids)) < TOKENIZER_VOCAB
    for row, row_starts in zip(ids, starts):
        assert all(row[start - 1] == source.eos_id for start in row_starts if start > 0)
        assert all((row[start] == bos) == (bos is not None) for start in row_starts)

    imported = load_file(Path(train.ref.uri, "runs", "dense", "final", "weights", "shared.safetensors"))
    for name, tensor in reference.state_dict().items():
        assert torch.equal(imported[name.removeprefix("model.")], tensor), name
    assert train.manifest.extra["moe_args"]["qkv_bias"] == (kind == "qwen2")
    assert train.manifest.counts["upcycled_steps"] == 3

    hf = Path(train.ref.uri, "hf")
    config_json = json.loads((hf / "config.json").read_text())
    eos = source.eos_id
    assert (config_json["bos_token_id"], config_json["eos_token_id"], config_json["pad_token_id"]) == (bos, eos, eos)
    model = AutoModelForCausalLM.from_pretrained(hf, trust_remote_code=True)
    encoded = AutoTokenizer.from_pretrained(hf, trust_remote_code=True)(TEXTS[0][:200], return_tensors="pt")
    assert encoded.input_ids[0].tolist() == source.tokenizer.encode(TEXTS[0][:200]).ids
    assert torch.isfinite(model(encoded.input_ids).logits).all()
