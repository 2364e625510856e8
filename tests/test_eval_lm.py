"""evaluation/lm.py: skymoe's lm-eval model class (``SkyMoeLM``, registered as ``skymoe``) against
lm-eval's own ``hf`` model (``HFLM`` loading the exported folder with its remote code).

One small exported folder is built the way tests/test_export.py builds one: a random MoE (dim 64,
2 layers, one dense and one 4-expert MoE layer, grouped-query attention, max_seq_len 128) and a
byte-level BPE trained with ``skymoe.pipelines.tokenize.tokenizer`` on a few hundred English and Chinese
sentences of examples/corpus. The requests are real text from other documents of the corpus:
multiple-choice sets, Chinese, contexts ending in spaces, empty contexts, contexts past
max_seq_len, literal special-token text, duplicates. Nothing is fetched (offline env, local folder).
"""

from __future__ import annotations

import dataclasses
import json
import math
import random
import re

import pytest
import torch

from conftest import CORPUS
from skymoe.pipelines.tokenize.tokenizer import save_tokenizer, train_tokenizer
from skymoe.storage import Storage
from skymoe.training.export import export_hf
from skymoe.training.model import ModelArgs, Transformer
from skymoe.training.weights import save_args, save_part

STORAGE = Storage()
ARGS = ModelArgs(vocab_size=1024, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=128, max_seq_len=128,
                 num_experts=4, moe_every=2, top_k=2)
MAX_DIFF = 1e-4
EOS = 1
MAX_GEN = 24


# ---------------------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module", autouse=True)
def offline_one_thread(tmp_path_factory):
    """Offline Hugging Face settings, and one torch thread (tiny models; immune to a busy machine)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("HF_HUB_OFFLINE", "1")
        patch.setenv("HF_DATASETS_OFFLINE", "1")
        patch.setenv("HF_HOME", str(tmp_path_factory.mktemp("hf_home")))
        yield
    torch.set_num_threads(threads)


def corpus_texts() -> tuple[list[str], list[str]]:
    english = [json.loads(line)["text"] for line in (CORPUS / "c4" / "c4_demo.jsonl").read_text("utf-8").splitlines()]
    chinese = (CORPUS / "zhwiki" / "zhwiki_part1.txt").read_text("utf-8").splitlines()
    return english, chinese


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> tuple[str, Transformer]:
    """The exported folder and the Transformer it was exported from. The EOS row of the output
    layer is zeroed, so greedy decoding (max of ~1000 logits, each ~N(0, 0.2)) never picks EOS and
    only a stop string or the token cap ends a generation."""
    english, chinese = corpus_texts()
    sentences = [s for doc in english[:60] for s in re.split(r"(?<=[.!?])\s+", doc) if s][:300]
    sentences += [s for line in chinese[:60] for s in line.split("。") if s][:300]
    folder = tmp_path_factory.mktemp("skymoe_eval")
    tokenizer = train_tokenizer(sentences, vocab_size=ARGS.vocab_size)
    save_tokenizer(tokenizer, STORAGE, str(folder / "tokenizer"))
    torch.manual_seed(0)
    model = Transformer(ARGS).eval()
    with torch.no_grad():
        model.lm_head.weight[EOS].zero_()
    save_part(STORAGE, str(folder / "weights"), "shared", model.state_dict())
    save_args(STORAGE, str(folder / "weights"), ARGS)
    export_hf(STORAGE, str(folder / "weights"), str(folder / "tokenizer"), str(folder / "hf"))
    return str(folder / "hf"), model


@pytest.fixture(scope="module")
def hflm(built):
    from lm_eval.models.huggingface import HFLM

    return HFLM(pretrained=built[0], trust_remote_code=True, batch_size=8, device="cpu")


@pytest.fixture(scope="module")
def skymoe(built):
    from skymoe.evaluation.lm import SkyMoeLM

    return SkyMoeLM(built[0], batch_size=8, max_gen_tokens=MAX_GEN, device="cpu")


def instances(kind: str, args: list[tuple]) -> list:
    from lm_eval.api.instance import Instance

    return [Instance(kind, {}, arg, index) for index, arg in enumerate(args)]


def loglikelihood_requests(hflm) -> list[tuple[str, str]]:
    """A few hundred (context, continuation) pairs from documents the tokenizer was not trained on.
    Pairs whose continuation tokenizes to nothing (BPE merges it into the context's last token) are
    left out: lm-eval's hf model asserts on them, and so does SkyMoeLM."""
    english, chinese = corpus_texts()
    rng = random.Random(0)
    pairs: list[tuple[str, str]] = []
    words = [doc.split() for doc in english[200:280] if len(doc.split()) >= 30][:60]
    for doc in words:  # multiple choice: one context, the true next words and three distractors
        cut = rng.randrange(5, min(len(doc) - 8, 70))
        context = " ".join(doc[:cut])
        options = [" " + " ".join(doc[cut:cut + rng.randrange(1, 8)])]
        for other in rng.sample(words, 3):
            start = rng.randrange(0, max(1, len(other) - 8))
            options.append(" " + " ".join(other[start:start + rng.randrange(1, 8)]))
        pairs += [(context, option) for option in options]
    for line in chinese[200:240]:  # Chinese: split inside the text, continuations of several lengths
        cut = rng.randrange(4, max(5, min(len(line) - 12, 150)))
        pairs += [(line[:cut], line[cut:cut + n]) for n in (1, 3, 9)]
    for doc in english[260:275]:  # contexts ending in spaces (moved to the continuation), empty contexts
        head = " ".join(doc.split()[:12])
        pairs += [(head + " ", "and then"), (head + "  \n", "The"), ("", doc.split()[0]), ("", head)]
    for letter_context in english[275:285]:  # MMLU-like single-token answers sharing a context
        question = " ".join(letter_context.split()[:30]) + "\nAnswer:"
        pairs += [(question, f" {letter}") for letter in "ABCD"]
    assert len(hflm.tok_encode(english[290])) > 2 * ARGS.max_seq_len
    pairs += [(english[290], " the end"),  # longer than max_seq_len: truncated on the left
              ("<s>" + english[291][:60], " and more"),  # starts with the BOS text
              ("Literal special tokens", " </s> <pad> stay text"), ("甲", "乙丙")]
    pairs += pairs[:6]  # exact duplicates
    kept = [(c, x) for c, x in pairs if c == "" or hflm._encode_pair(c, x)[1]]
    assert len(kept) >= 300 and len(pairs) - len(kept) < 30
    return kept


# ---------------------------------------------------------------------------------------- (a)
def test_loglikelihood_matches_lm_evals_hf_model(hflm, skymoe, built):
    pairs = loglikelihood_requests(hflm)
    # Some continuations are the model's own greedy tokens, so is_greedy is not always False.
    _, model = built
    english, _ = corpus_texts()
    for doc in english[285:300]:
        context = " ".join(doc.split()[:20])
        ids = torch.tensor([skymoe.tok_encode(context)])
        with torch.no_grad():
            for _ in range(3):
                ids = torch.cat([ids, model(ids)[:, -1:].argmax(-1)], dim=1)
        pairs.append((context, skymoe.tok_decode(ids[0, -3:].tolist())))
    requests = instances("loglikelihood", pairs)

    theirs = hflm.loglikelihood(requests, disable_tqdm=True)
    ours = skymoe.loglikelihood(requests, disable_tqdm=True)
    differences = [abs(a[0] - b[0]) for a, b in zip(theirs, ours, strict=True)]
    worst = max(range(len(pairs)), key=differences.__getitem__)
    assert differences[worst] < MAX_DIFF, f"{pairs[worst]!r}: {theirs[worst]} vs {ours[worst]}"
    assert [a[1] for a in theirs] == [b[1] for b in ours]
    assert sum(b[1] for b in ours) >= 5  # the greedy continuations above
    assert all(math.isfinite(b[0]) and b[0] < 0 for b in ours)

    # The same numbers without context sharing (one row per request, as HFLM batches them).
    from skymoe.evaluation.lm import SkyMoeLM

    unshared = SkyMoeLM(built[0], batch_size=3, share_context=False).loglikelihood(requests[:80], disable_tqdm=True)
    assert max(abs(a[0] - b[0]) for a, b in zip(theirs[:80], unshared, strict=True)) < MAX_DIFF


def test_requests_splitting_the_same_tokens_differently(hflm, skymoe, built):
    """One document cut at two places, each cut scored on its true continuation up to the same
    end: both requests run the same tokens (context + continuation[:-1]) and score different
    positions. lm-eval 0.4.13's HFLM groups them in its logits cache and scores the shorter
    continuation at the leading positions of the longer one's window (huggingface.py takes the
    trailing slice for is_greedy only), so the comparison is with ``logits_cache=False`` and with
    the plain Transformer."""
    _, model = built
    english, _ = corpus_texts()
    words = english[295].split()
    pairs = [(" ".join(words[:cut]), " " + " ".join(words[cut:40])) for cut in (20, 30, 38)]
    encoded = [skymoe._encode_pair(*pair) for pair in pairs]
    assert len({tuple(c + x[:-1]) for c, x in encoded}) == 1 and len({len(c) for c, _ in encoded}) == 3
    requests = instances("loglikelihood", pairs)
    ours = skymoe.loglikelihood(requests, disable_tqdm=True)
    hflm.logits_cache = False
    try:
        theirs = hflm.loglikelihood(requests, disable_tqdm=True)
    finally:
        hflm.logits_cache = True
    for (context, continuation), mine, other in zip(encoded, ours, theirs, strict=True):
        with torch.no_grad():
            logprobs = torch.log_softmax(model(torch.tensor([context + continuation[:-1]]))[0], -1)
        expected = logprobs[len(context) - 1:].gather(1, torch.tensor(continuation)[:, None]).sum().item()
        assert abs(mine[0] - expected) < MAX_DIFF and abs(other[0] - expected) < MAX_DIFF


# ---------------------------------------------------------------------------------------- (b)
def test_loglikelihood_rolling_matches(hflm, skymoe):
    english, chinese = corpus_texts()
    documents = [english[250], english[251], chinese[250], chinese[251][:40], "x"]
    assert len(skymoe.tok_encode(english[250])) > 4 * ARGS.max_seq_len  # several windows
    requests = instances("loglikelihood_rolling", [(doc,) for doc in documents])
    theirs = hflm.loglikelihood_rolling(requests, disable_tqdm=True)
    ours = skymoe.loglikelihood_rolling(requests, disable_tqdm=True)
    for doc, a, b in zip(documents, theirs, ours, strict=True):
        assert math.isclose(a, b, rel_tol=1e-6, abs_tol=MAX_DIFF), f"{doc[:30]!r}: {a} vs {b}"


# ---------------------------------------------------------------------------------------- (c)
def reference_greedy(model: Transformer, prompt: list[int], steps: int, window: int) -> list[int]:
    """Plain greedy decoding with the Transformer, on the last ``window`` tokens at every step."""
    ids = list(prompt)
    with torch.no_grad():
        for _ in range(steps):
            ids.append(int(model(torch.tensor([ids[-window:]]))[0, -1].argmax()))
    return ids[len(prompt):]


def test_generate_until_stop_strings_and_token_cap(hflm, skymoe, built):
    _, model = built
    english, chinese = corpus_texts()
    prompts = [english[240][:120], english[241][:50], chinese[240][:40], chinese[241][:90]]

    # Without a stop string (EOS is never chosen) every generation runs to the cap: max_gen_toks
    # when the request sets it, else the constructor's max_gen_tokens; the same text as HFLM's.
    for cap in (5, None):
        kwargs = {"until": [], "do_sample": False} | ({"max_gen_toks": cap} if cap else {})
        requests = instances("generate_until", [(p, dict(kwargs)) for p in prompts])
        ours = skymoe.generate_until(requests, disable_tqdm=True)
        for prompt, text in zip(prompts, ours, strict=True):
            steps = cap or MAX_GEN
            context = skymoe.tok_encode(prompt)[-(ARGS.max_seq_len - steps):]  # HFLM's left truncation
            expected = reference_greedy(model, context, steps, ARGS.max_seq_len)
            assert EOS not in expected and text == skymoe.tok_decode(expected)
        if cap:
            assert ours == hflm.generate_until(requests, disable_tqdm=True)
    prompt_ids = skymoe.tok_encode(prompts[0])
    assert len(skymoe._greedy([prompt_ids], MAX_GEN, [])[0]) == MAX_GEN

    # A stop string taken from the middle of a full generation cuts it there; HFLM agrees.
    full = skymoe.generate_until(instances("generate_until", [(prompts[0], {"until": []})]), disable_tqdm=True)[0]
    # two letters or digits from the second half (not U+FFFD, which a half-decoded character shows)
    stop = next(full[i:i + 2] for i in range(len(full) // 2, len(full) - 1) if full[i:i + 2].isalnum())
    requests = instances("generate_until", [(p, {"until": [stop], "max_gen_toks": 20}) for p in prompts])
    ours = skymoe.generate_until(requests, disable_tqdm=True)
    assert ours[0] == full.split(stop)[0] and len(ours[0]) < len(full)
    assert ours == hflm.generate_until(requests, disable_tqdm=True)
    stopped = skymoe._greedy([prompt_ids], MAX_GEN, [stop])[0]
    assert stop in skymoe.tok_decode(stopped) and stop not in skymoe.tok_decode(stopped[:-1])

    # max_gen_toks >= max_length (HFLM refuses): the context keeps max_length // 2 tokens and the
    # window slides; still exactly max_gen_toks tokens.
    long_prompt = " ".join(english[242].split()[:200])
    cap = ARGS.max_seq_len + 12
    text = skymoe.generate_until(instances("generate_until", [(long_prompt, {"until": [], "max_gen_toks": cap})]),
                                 disable_tqdm=True)[0]
    kept = skymoe.tok_encode(long_prompt)[-(ARGS.max_seq_len // 2):]
    assert text == skymoe.tok_decode(reference_greedy(model, kept, cap, ARGS.max_seq_len))


def test_generation_stops_at_eos(built):
    from skymoe.evaluation.lm import SkyMoeLM

    lm = SkyMoeLM(built[0], batch_size=2, max_gen_tokens=10)
    head = torch.nn.Linear(ARGS.dim, ARGS.vocab_size)  # EOS wins at every position
    with torch.no_grad():
        head.weight.zero_()
        head.bias.copy_(torch.nn.functional.one_hot(torch.tensor(EOS), ARGS.vocab_size).float())
    lm.model.lm_head = head
    requests = instances("generate_until", [("Some text", {"until": ["\n"]}), ("文本", {})])
    assert lm.generate_until(requests, disable_tqdm=True) == ["", ""]
    assert lm._greedy([lm.tok_encode("Some text")], 10, []) == [[]]


# ---------------------------------------------------------------------------------------- (d)
def test_registered_with_lm_eval_and_built_from_model_args(built):
    from lm_eval.api.registry import get_model

    from skymoe.evaluation.lm import SkyMoeLM

    assert get_model("skymoe") is SkyMoeLM
    assert get_model("hf").__name__ == "HFLM"  # registering ours does not hide lm-eval's own
    lm = get_model("skymoe").create_from_arg_string(f"pretrained={built[0]},batch_size=4,max_gen_tokens=7",
                                                    {"device": "cpu", "batch_size": None})
    assert (lm.batch_size, lm.max_gen_toks, lm.max_length, str(lm.device)) == (4, 7, ARGS.max_seq_len, "cpu")
    assert (lm.prefix_token_id, lm.eot_token_id) == (0, 1)
    assert dataclasses.asdict(lm.model.args) == dataclasses.asdict(ARGS)
