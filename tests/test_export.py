"""Hugging Face export (training/export.py with the remote code in training/hf/) and Llama import
(training/hf_import.py).

The export is checked the way it will be used: the folder is loaded with ``AutoModelForCausalLM``
and ``AutoTokenizer`` (``trust_remote_code``, nothing downloaded) and must compute the trained
``Transformer``'s logits, with and without padding, and its greedy continuation. The import is
checked against ``LlamaForCausalLM`` itself on randomly initialised checkpoints.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import boto3
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

from skymoe.pipelines.tokenize.tokenizer import save_tokenizer, train_tokenizer
from skymoe.storage import Storage
from skymoe.training.export import ExportError, export_hf
from skymoe.training.hf_import import HfImportError, import_checkpoint
from skymoe.training.model import ModelArgs, Transformer
from skymoe.training.weights import save_args, save_part

STORAGE = Storage()
DENSE = ModelArgs(vocab_size=512, dim=64, n_layers=2, n_heads=4, ffn_dim=128, max_seq_len=64, init_std=0.2)
SHAPES = {
    "moe": dataclasses.replace(DENSE, num_experts=4, moe_every=1, top_k=2),
    "dense": DENSE,
    "tied-gqa": dataclasses.replace(DENSE, n_kv_heads=2, tie_embeddings=True),
}
TEXTS = ["The quick brown fox jumps over the lazy dog.", "Pi is 3.14159 and e is 2.71828.",
         "A tokenizer for a test, trained on a few sentences.", "Mixture of experts: route each token."] * 5
MAX_LOGIT_DIFF = 1e-4


# ---------------------------------------------------------------------------------------- helpers
@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """The models are tiny: one thread is faster, and immune to other processes on a busy machine
    (with two threads each small matmul waits on the other thread, 100x slower under load)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def tokenizer_folder(tmp_path_factory) -> str:
    folder = str(tmp_path_factory.mktemp("tokenizer"))
    save_tokenizer(train_tokenizer(TEXTS, vocab_size=300), STORAGE, folder)
    return folder


def random_model(args: ModelArgs, seed: int = 0) -> Transformer:
    torch.manual_seed(seed)
    model = Transformer(args).eval()
    for index, moe in enumerate(model.moe_layers()):
        moe.aux_alpha.fill_(0.01 * (index + 1))  # checkpointed state, so the export must carry it
    return model


def exported(tmp_path: Path, model: Transformer, tokenizer_folder: str | None) -> str:
    """Save a weights folder and export it. With tied embeddings the ``lm_head.weight`` alias is left
    out: safetensors refuses two names for one tensor."""
    weights, out = str(tmp_path / "weights"), str(tmp_path / "hf")
    state = model.state_dict()
    if model.args.tie_embeddings:
        del state["lm_head.weight"]
    save_part(STORAGE, weights, "shared", state)
    save_args(STORAGE, weights, model.args)
    export_hf(STORAGE, weights, tokenizer_folder, out)
    return out


def greedy(model: Transformer, ids: torch.Tensor, steps: int) -> torch.Tensor:
    for _ in range(steps):
        ids = torch.cat([ids, model(ids)[:, -1:].argmax(-1)], dim=1)
    return ids


# ---------------------------------------------------------------------------------------- export
@pytest.mark.parametrize("shape", sorted(SHAPES))
def test_export_loads_with_auto_classes_and_matches_the_model(tmp_path, tokenizer_folder, shape):
    args = SHAPES[shape]
    model = random_model(args)
    out = exported(tmp_path, model, tokenizer_folder)
    assert {"configuration_skymoe.py", "modeling_skymoe.py", "model.py", "model.safetensors", "config.json",
            "generation_config.json", "tokenizer.json"} <= {p.name for p in Path(out).iterdir()}

    hf = AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True)
    tokenizer = AutoTokenizer.from_pretrained(out, trust_remote_code=True)
    assert not hf.training and hf.dtype == torch.float32
    assert hf.config.model_args().to_dict() == args.to_dict()
    # Every ModelArgs field is a declared config field (an undeclared one would load as a loose
    # attribute, and be dropped if transformers took it for a generation parameter, as with top_k).
    renamed = {"top_k": "num_experts_per_tok"}
    assert {renamed.get(f.name, f.name) for f in dataclasses.fields(ModelArgs)} <= {
        f.name for f in dataclasses.fields(hf.config)}
    assert (tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id) == (0, 1, 2)
    assert (hf.config.bos_token_id, hf.config.eos_token_id, hf.config.pad_token_id) == (0, 1, 2)
    if args.tie_embeddings:
        assert hf.model.lm_head.weight is hf.model.embed_tokens.weight
    for ours, theirs in zip(model.moe_layers(), hf.model.moe_layers(), strict=True):
        assert torch.equal(ours.aux_alpha, theirs.aux_alpha)

    ids = tokenizer(TEXTS[0], return_tensors="pt").input_ids
    with torch.no_grad():
        expected = model(ids)
        output = hf(ids, labels=ids)
        generated = hf.generate(ids[:, :6], max_new_tokens=8, do_sample=False)
        generated_with_cache_flag = hf.generate(ids[:, :6], max_new_tokens=8, do_sample=False, use_cache=True)
    difference = (output.logits - expected).abs().max().item()
    assert difference < MAX_LOGIT_DIFF, f"{shape}: max logit difference {difference}"
    assert torch.allclose(output.loss, F.cross_entropy(expected[0, :-1], ids[0, 1:]), atol=1e-5)
    reference = greedy(model, ids[:, :6], 8)
    assert torch.equal(generated, reference)
    assert torch.equal(generated_with_cache_flag, reference)


def test_padding_left_or_right_gives_the_unpadded_logits(tmp_path, tokenizer_folder):
    """lm-evaluation-harness right-pads loglikelihood batches (no mask) and left-pads generation
    batches (with a mask); every real position must get the logits of its unpadded sequence."""
    model = random_model(SHAPES["moe"])
    out = exported(tmp_path, model, tokenizer_folder)
    hf = AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True)
    tokenizer = AutoTokenizer.from_pretrained(out, trust_remote_code=True)
    texts = TEXTS[:3]
    rows = [tokenizer(text, return_tensors="pt").input_ids for text in texts]

    for side in ("right", "left"):
        tokenizer.padding_side = side
        batch = tokenizer(texts, return_tensors="pt", padding=True)
        assert not batch.attention_mask.all()
        with torch.no_grad():
            logits = hf(batch.input_ids, attention_mask=batch.attention_mask).logits
            unmasked = hf(batch.input_ids).logits
            for index, row in enumerate(rows):
                real = batch.attention_mask[index].bool()
                expected = model(row)[0]
                assert (logits[index, real] - expected).abs().max().item() < MAX_LOGIT_DIFF, side
                if side == "right":  # causal attention: right padding needs no mask
                    assert (unmasked[index, real] - expected).abs().max().item() < MAX_LOGIT_DIFF

    with torch.no_grad():  # batch still left-padded
        generated = hf.generate(**batch, max_new_tokens=5, do_sample=False)
        for index, row in enumerate(rows):
            assert torch.equal(generated[index, -(row.shape[1] + 5):], greedy(model, row, 5)[0])
        holed = batch.attention_mask.clone()
        holed[0, -2] = 0
        with pytest.raises(ValueError, match="contiguous"):
            hf(batch.input_ids, attention_mask=holed)


def test_export_refuses_weights_or_tokenizer_that_do_not_fit(tmp_path, tokenizer_folder):
    model = random_model(DENSE)
    exported(tmp_path, model, None)  # no tokenizer: the tokenizer's ids are assumed
    assert json.loads((tmp_path / "hf" / "config.json").read_text())["eos_token_id"] == 1

    small = dataclasses.replace(DENSE, vocab_size=256)
    with pytest.raises(ExportError, match="does not fit the model's vocab_size 256"):
        exported(tmp_path / "small", random_model(small), tokenizer_folder)

    save_args(STORAGE, str(tmp_path / "weights"), dataclasses.replace(DENSE, ffn_dim=96))
    with pytest.raises(ExportError, match=r"layers\.0\.mlp\.gate_proj\.weight has shape \(128, 64\)"):
        export_hf(STORAGE, str(tmp_path / "weights"), None, str(tmp_path / "other"))


# ---------------------------------------------------------------------------------------- import
def llama_checkpoint(folder: Path, gqa: bool, tied: bool, shard: bool = False) -> LlamaForCausalLM:
    config = LlamaConfig(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2 if gqa else 4, max_position_embeddings=64,
                         rope_theta=5000.0, rms_norm_eps=1e-5, tie_word_embeddings=tied, initializer_range=0.1)
    torch.manual_seed(1)
    llama = LlamaForCausalLM(config).eval()
    llama.save_pretrained(folder, max_shard_size="100KB" if shard else "50GB")
    return llama


@pytest.mark.parametrize("gqa,tied,shard", [(False, False, False), (True, False, True), (False, True, False),
                                            (True, True, True)])
def test_import_llama_matches_llama_logits(tmp_path, gqa, tied, shard):
    llama = llama_checkpoint(tmp_path, gqa, tied, shard)
    assert (tmp_path / "model.safetensors.index.json").exists() == shard

    args, state = import_checkpoint(STORAGE, str(tmp_path), 64)
    assert (args.n_kv_heads, args.tie_embeddings, args.rope_theta, args.norm_eps) == (2 if gqa else 4, tied,
                                                                                      5000.0, 1e-5)
    model = Transformer(args).eval()
    model.load_state_dict(state)
    ids = torch.randint(0, 512, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        difference = (model(ids) - llama(ids).logits).abs().max().item()
    assert difference < MAX_LOGIT_DIFF, f"gqa={gqa} tied={tied}: max logit difference {difference}"


@pytest.fixture(scope="module")
def llama_folder(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("llama")
    llama_checkpoint(folder, gqa=True, tied=False)
    return folder


def broken_copy(source: Path, target: Path, **config_changes) -> Path:
    shutil.copytree(source, target)
    config = json.loads((target / "config.json").read_text())
    config.update(config_changes)
    (target / "config.json").write_text(json.dumps(config))
    return target


def test_import_refuses_what_it_cannot_reproduce(tmp_path, llama_folder):
    def refused(folder: Path, match: str) -> None:
        with pytest.raises(HfImportError, match=match):
            import_checkpoint(STORAGE, str(folder), 64)

    (tmp_path / "empty").mkdir()
    refused(tmp_path / "empty", "no config.json")
    refused(broken_copy(llama_folder, tmp_path / "gemma", model_type="gemma"),
            r"config\.json: model_type is 'gemma'")
    refused(broken_copy(llama_folder, tmp_path / "scaled", rope_scaling={"rope_type": "dynamic", "factor": 2.0}),
            "rope_scaling of type 'dynamic'")
    refused(broken_copy(llama_folder, tmp_path / "yarn", rope_parameters={"rope_type": "yarn", "factor": 4.0,
                                                                          "rope_theta": 5000.0}),
            "rope_parameters")
    refused(broken_copy(llama_folder, tmp_path / "bias", attention_bias=True), "attention_bias is true")
    refused(broken_copy(llama_folder, tmp_path / "wide", intermediate_size=96),
            r"model\.safetensors: model\.layers\.0\.mlp\.gate_proj\.weight has shape \(128, 64\)")

    missing = broken_copy(llama_folder, tmp_path / "missing")
    tensors = load_file(missing / "model.safetensors")
    del tensors["model.layers.1.mlp.up_proj.weight"]
    save_file(tensors, missing / "model.safetensors")
    refused(missing, r"lacks 1 tensors.*model\.layers\.1\.mlp\.up_proj\.weight")

    (missing / "model.safetensors").unlink()
    refused(missing, r"no \*\.safetensors weights")


def test_llama_to_weights_to_hf_through_s3(tmp_path, s3_server):
    """The whole path on object storage: a sharded Llama checkpoint imported from S3, written as a
    weights folder and exported to S3; the downloaded export computes the Llama's logits."""
    client = boto3.client("s3", endpoint_url=s3_server)
    client.create_bucket(Bucket="skymoe-export")
    llama = llama_checkpoint(tmp_path / "llama", gqa=True, tied=False, shard=True)
    for path in sorted((tmp_path / "llama").iterdir()):
        client.upload_file(str(path), "skymoe-export", f"llama/{path.name}")
    save_tokenizer(train_tokenizer(TEXTS, vocab_size=300), STORAGE, "s3://skymoe-export/tokenizer")

    args, state = import_checkpoint(STORAGE, "s3://skymoe-export/llama", 64)
    save_part(STORAGE, "s3://skymoe-export/weights", "shared", state)
    save_args(STORAGE, "s3://skymoe-export/weights", args)
    export_hf(STORAGE, "s3://skymoe-export/weights", "s3://skymoe-export/tokenizer", "s3://skymoe-export/hf")

    local = tmp_path / "hf"
    local.mkdir()
    for item in client.list_objects_v2(Bucket="skymoe-export", Prefix="hf/")["Contents"]:
        client.download_file("skymoe-export", item["Key"], str(local / item["Key"].removeprefix("hf/")))
    hf = AutoModelForCausalLM.from_pretrained(local, trust_remote_code=True)
    ids = AutoTokenizer.from_pretrained(local, trust_remote_code=True)(TEXTS[1], return_tensors="pt").input_ids
    with torch.no_grad():
        difference = (hf(ids).logits - llama(ids).logits).abs().max().item()
    assert difference < MAX_LOGIT_DIFF
