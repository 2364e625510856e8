"""Benchmark loglikelihood requests/s of skymoe's lm-eval model class (``skymoe.evaluation.lm.SkyMoeLM``)
against lm-eval's own ``hf`` model (``HFLM``) on the same exported checkpoint and the same requests.

Checkpoint: ``--checkpoint`` (an exported Hugging Face folder, ``training/export.py``) or, by default,
one built here before any timing: a random-weight MoE of the ``tiny`` preset's shape (dim 128,
4 layers, 4 heads, ffn 344, 8 experts top-2 in every layer, max_seq_len 256, init_std 0.02) with a
byte-level BPE (``train_tokenizer``, vocab 4096) trained on the bundled corpus (c4 + zhwiki), exported
with ``export_hf``. Random weights score text as well as trained ones for timing purposes: the
work per token does not depend on the values (eval routing never drops a token).

Requests: ``--requests`` (default 500) loglikelihood requests shaped like multiple-choice tasks
(hellaswag/piqa/ARC style): N/4 questions of 4 continuations each. A question's context is a cut of
a real document of examples/corpus (c4 English or cmrc2018 Chinese, 3:1), cut at a word (English) or
character (Chinese) so that it is 100-200 tokens; its continuations are the true next 2-12 words (or
4-30 characters) and three stretches of the same length from other documents. Every request is
tokenized as lm-eval does; none needs truncation (context + continuation <= 256 tokens).

What is timed: one ``lm.loglikelihood(requests)`` call per run (tokenization, batching, forwards,
scoring, reordering: everything lm-eval's evaluator would call), progress bars off, under the same
``torch.set_num_threads`` for both (default 1: on a shared 2-core machine two threads made single
runs of the same work vary 25x, each small matmul waiting for the other thread). Each model is
loaded once before the clock (``HFLM(pretrained=folder, trust_remote_code=True, device=cpu,
batch_size=B)``; ``SkyMoeLM(folder, batch_size=B)``), runs once untimed (warm-up), then ``--repeats``
timed runs, the two models interleaved; medians are reported. ``batch_size`` means B sequences
per forward for HFLM; for SkyMoeLM at most B x max_length padded tokens per forward, HFLM's largest
batch (see evaluation/lm.py). With ``--hf-batch-sizes`` HFLM is also timed at other batch sizes, to
show how much of the difference a larger HFLM batch would recover. ``--no-share`` adds SkyMoeLM
with context sharing off (one row per request, as HFLM): what the other optimisations alone give.

Also printed: the max absolute difference of the loglikelihoods and whether the is_greedy flags agree,
against HFLM as timed and against HFLM with ``logits_cache=False`` (one extra untimed run). They can
differ: HFLM's logits cache groups requests whose context + continuation[:-1] are the same tokens
even when they split them differently (two cuts of one document, each with its true continuation),
and lm-eval 0.4.13 then scores the shorter continuation at the leading positions of the longer one's
window (``_loglikelihood_tokens`` takes the trailing slice for is_greedy only, not for the gather).
Such requests are counted. Also printed: the tokens
each model runs through its layers (HFLM: every context + continuation - 1; SkyMoeLM: each distinct
context once + each distinct continuation - 1).

Run: ``python benchmarks/bench_eval_loglikelihood.py [--requests 500] [--batch-size 16] [--threads N]
[--repeats 3] [--checkpoint folder]`` (about 1-2 minutes on 2 shared cores).
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import argparse  # noqa: E402
import json  # noqa: E402
import logging  # noqa: E402
import platform  # noqa: E402
import random  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from provenance import files_digest, git_state  # noqa: E402  (benchmarks/provenance.py, beside this script)

CORPUS = ROOT / "examples" / "corpus"
SOURCES = ("evaluation/lm.py", "training/model.py")
TINY = {"vocab_size": 4096, "dim": 128, "n_layers": 4, "n_heads": 4, "ffn_dim": 344, "max_seq_len": 256,
        "num_experts": 8, "top_k": 2, "moe_every": 1}


def _version(package: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(package)
    except PackageNotFoundError:
        return "?"


def sources_digest() -> str:
    return files_digest(SOURCES)


def code_version() -> str:
    """git HEAD, uncommitted changes to the measured sources, and a digest of those sources as read."""
    return f"{git_state(SOURCES)}; sources digest {sources_digest()}"


# ------------------------------------------------------------------------------ inputs
def corpus() -> tuple[list[str], list[str], list[str]]:
    english = [json.loads(line)["text"] for line in (CORPUS / "c4" / "c4_demo.jsonl").read_text("utf-8").splitlines()]
    zhwiki = (CORPUS / "zhwiki" / "zhwiki_part1.txt").read_text("utf-8").splitlines()
    cmrc = [json.loads(line)["text"] for line in
            (CORPUS / "cmrc2018" / "cmrc2018_contexts.jsonl").read_text("utf-8").splitlines()]
    return english, zhwiki, cmrc


def build_checkpoint(folder: Path) -> float:
    """Train the tokenizer, make the random tiny-shaped MoE, export; returns the seconds it took."""
    import torch

    from skymoe.pipelines.tokenize.tokenizer import save_tokenizer, train_tokenizer
    from skymoe.storage import Storage
    from skymoe.training.export import export_hf
    from skymoe.training.model import ModelArgs, Transformer
    from skymoe.training.weights import save_args, save_part

    started = time.perf_counter()
    english, zhwiki, _ = corpus()
    storage = Storage()
    tokenizer = train_tokenizer(english[:200] + zhwiki[:800], vocab_size=TINY["vocab_size"])
    save_tokenizer(tokenizer, storage, str(folder / "tokenizer"))
    args = ModelArgs(**{**TINY, "vocab_size": tokenizer.get_vocab_size()})
    torch.manual_seed(0)
    model = Transformer(args).eval()
    save_part(storage, str(folder / "weights"), "shared", model.state_dict())
    save_args(storage, str(folder / "weights"), args)
    export_hf(storage, str(folder / "weights"), str(folder / "tokenizer"), str(folder / "hf"))
    return time.perf_counter() - started


def make_requests(lm, count: int, max_length: int, seed: int = 0) -> list[tuple[str, str]]:
    """``count`` (context, continuation) pairs, 4 per question (see the module docstring). ``lm``
    tokenizes as lm-eval does (``tok_encode`` / ``_encode_pair``)."""
    english, _, cmrc = corpus()
    rng = random.Random(seed)
    english = [doc.split() for doc in english[200:] if len(doc.split()) > 260]
    chinese = [text for text in cmrc if len(text) > 400]
    pairs: list[tuple[str, str]] = []
    question = 0
    while len(pairs) < count:
        zh = question % 4 == 3
        question += 1
        if zh:
            doc = rng.choice(chinese)
            cut = rng.randrange(100, 200)
            while len(lm.tok_encode(doc[:cut])) < 100:
                cut += 20
            while len(lm.tok_encode(doc[:cut])) > 200:
                cut -= 10
            context, length = doc[:cut], rng.randrange(4, 31)
            options = [doc[cut:cut + length]]
            for other in rng.sample(chinese, 3):
                start = rng.randrange(0, len(other) - length)
                options.append(other[start:start + length])
        else:
            doc = rng.choice(english)
            cut = rng.randrange(70, 150)
            while len(lm.tok_encode(" ".join(doc[:cut]))) < 100:
                cut += 10
            while len(lm.tok_encode(" ".join(doc[:cut]))) > 200:
                cut -= 5
            context, length = " ".join(doc[:cut]), rng.randrange(2, 13)
            options = [" " + " ".join(doc[cut:cut + length])]
            for other in rng.sample(english, 3):
                start = rng.randrange(0, len(other) - length)
                options.append(" " + " ".join(other[start:start + length]))
        for option in options:
            context_ids, continuation_ids = lm._encode_pair(context, option)
            if continuation_ids and len(context_ids) + len(continuation_ids) <= max_length + 1:
                pairs.append((context, option))
    return pairs[:count]


def token_counts(lm, pairs: list[tuple[str, str]]) -> tuple[int, int]:
    """Tokens through the layers: HFLM (ctx + cont - 1 each) and SkyMoeLM (shared contexts)."""
    encoded = [lm._encode_pair(c, x) for c, x in pairs]
    hf = sum(len(c) + len(x) - 1 for c, x in encoded)
    contexts, continuations = {}, set()
    for c, x in encoded:
        contexts[tuple(c)] = len(c)
        continuations.add((tuple(c), tuple(x)))
    return hf, sum(contexts.values()) + sum(len(x) - 1 for _, x in continuations)


def split_sharing(lm, pairs: list[tuple[str, str]]) -> int:
    """Requests whose context + continuation[:-1] tokens equal another request's with a different
    context length (HFLM's logits cache groups them; see the module docstring)."""
    splits: dict[tuple[int, ...], set[int]] = {}
    encoded = [lm._encode_pair(c, x) for c, x in pairs]
    for c, x in encoded:
        splits.setdefault(tuple(c + x[:-1]), set()).add(len(c))
    return sum(len(splits[tuple(c + x[:-1])]) > 1 for c, x in encoded)


# ------------------------------------------------------------------------------ main
def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--checkpoint", help="an exported Hugging Face folder (default: build a random tiny MoE)")
    ap.add_argument("--requests", type=int, default=500, help="loglikelihood requests (4 per question)")
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--threads", type=int, default=1, help="torch threads for both (0: torch's default)")
    ap.add_argument("--repeats", type=int, default=3, help="timed runs per model; medians are reported")
    ap.add_argument("--hf-batch-sizes", type=int, nargs="*", default=[], help="also time HFLM at these")
    ap.add_argument("--no-share", action="store_true", help="also time SkyMoeLM with share_context=False")
    args = ap.parse_args()

    import torch
    import transformers
    from lm_eval.api.instance import Instance
    from lm_eval.models.huggingface import HFLM

    from skymoe.evaluation.lm import SkyMoeLM

    logging.getLogger("lm_eval").setLevel(logging.ERROR)
    logging.getLogger("evaluation").setLevel(logging.ERROR)
    transformers.logging.set_verbosity_error()
    if args.threads:
        torch.set_num_threads(args.threads)
    digest, wall = sources_digest(), time.perf_counter()
    load0 = os.getloadavg()[0]
    print(f"skymoe eval loglikelihood benchmark  (python {platform.python_version()}, {platform.machine()}, "
          f"{os.cpu_count()} CPUs, load average {load0:.1f}; torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads for both; lm-eval {_version('lm_eval')}, "
          f"transformers {transformers.__version__})")
    print(f"skymoe code: {code_version()}")

    with tempfile.TemporaryDirectory(prefix="bench-eval-") as tmp:
        if args.checkpoint:
            folder = args.checkpoint
            print(f"checkpoint: {folder}")
        else:
            build_s = build_checkpoint(Path(tmp))
            folder = str(Path(tmp) / "hf")
            print(f"checkpoint: random tiny-shaped MoE {TINY}, tokenizer trained on the corpus, exported "
                  f"(built in {build_s:.1f}s, excluded)")

        started = time.perf_counter()
        hf = HFLM(pretrained=folder, trust_remote_code=True, device="cpu", batch_size=args.batch_size)
        hf_load = time.perf_counter() - started
        started = time.perf_counter()
        sky = SkyMoeLM(folder, batch_size=args.batch_size, device="cpu")
        sky_load = time.perf_counter() - started
        config = sky.model.args
        print(f"model: dim {config.dim}, {config.n_layers} layers, {config.num_experts} experts top-{config.top_k}, "
              f"vocab {config.vocab_size}, max_seq_len {config.max_seq_len}, eval_capacity_factor "
              f"{config.eval_capacity_factor}; load (excluded): HFLM {hf_load:.2f}s, SkyMoeLM {sky_load:.2f}s")

        pairs = make_requests(sky, args.requests, sky.max_length)
        requests = [Instance("loglikelihood", {}, pair, index) for index, pair in enumerate(pairs)]
        contexts = [len(sky.tok_encode(c)) for c, _ in pairs]
        continuations = [len(sky._encode_pair(c, x)[1]) for c, x in pairs]
        hf_tokens, sky_tokens = token_counts(sky, pairs)
        split_groups = split_sharing(sky, pairs)
        print(f"requests: {len(pairs)} ({len(set(c for c, _ in pairs))} contexts x 4 continuations; "
              f"{sum(any(ord(ch) > 0x2e80 for ch in c) for c, _ in pairs)} of them Chinese); context tokens "
              f"{min(contexts)}-{max(contexts)} (median {statistics.median(contexts):.0f}), continuation "
              f"tokens {min(continuations)}-{max(continuations)} (median {statistics.median(continuations):.0f})")
        print(f"tokens through the layers per run: HFLM {hf_tokens}, SkyMoeLM {sky_tokens} "
              f"({hf_tokens / sky_tokens:.2f}x fewer)")

        runners = {f"HFLM batch_size={args.batch_size}": hf, f"SkyMoeLM batch_size={args.batch_size}": sky}
        for size in args.hf_batch_sizes:
            runners[f"HFLM batch_size={size}"] = HFLM(pretrained=folder, trust_remote_code=True, device="cpu",
                                                      batch_size=size)
        if args.no_share:
            runners["SkyMoeLM share_context=False"] = SkyMoeLM(folder, batch_size=args.batch_size, device="cpu",
                                                               share_context=False)
        results, seconds = {}, {name: [] for name in runners}
        for name, lm in runners.items():  # warm-up, untimed; also the answers compared below
            results[name] = lm.loglikelihood(requests, disable_tqdm=True)
        hf.logits_cache = False  # the untimed reference run without HFLM's logits cache
        uncached = hf.loglikelihood(requests, disable_tqdm=True)
        hf.logits_cache = True
        for _ in range(args.repeats):
            for name, lm in runners.items():
                started = time.perf_counter()
                lm.loglikelihood(requests, disable_tqdm=True)
                seconds[name].append(time.perf_counter() - started)

    hf_name, sky_name = list(runners)[:2]
    print()
    print(f"Loglikelihood throughput ({len(pairs)} requests per run; medians of {args.repeats}, per run in brackets)")
    for name, values in seconds.items():
        rate = len(pairs) / statistics.median(values)
        runs = ", ".join(f"{len(pairs) / v:.0f}" for v in values)
        print(f"  {name:32s} {statistics.median(values):7.2f} s  {rate:8.1f} requests/s  [{runs}]")
    ratio = statistics.median(seconds[hf_name]) / statistics.median(seconds[sky_name])
    per_run = ", ".join(f"{h / s:.2f}" for h, s in zip(seconds[hf_name], seconds[sky_name], strict=True))
    print(f"  SkyMoeLM / HFLM at batch_size={args.batch_size}: {ratio:.2f}x (target >= 1.0x) [{per_run}]")
    print()
    print(f"Agreement (the warm-up runs' answers); {split_groups} requests share their context + continuation[:-1] "
          f"tokens with a request that splits them elsewhere (HFLM's logits cache mis-scores the shorter)")
    for label, reference in ((hf_name, results[hf_name]), (f"{hf_name}, logits_cache=False", uncached)):
        print(f"  against {label}:")
        for name, answers in results.items():
            if name == hf_name:
                continue
            diff = [abs(a[0] - b[0]) for a, b in zip(reference, answers, strict=True)]
            greedy = sum(a[1] != b[1] for a, b in zip(reference, answers, strict=True))
            print(f"    {name:32s} max |loglikelihood difference| {max(diff):.2e} ({sum(d > 1e-4 for d in diff)} "
                  f"above 1e-4); is_greedy differs on {greedy} requests")
    print()
    if sources_digest() != digest:
        print("WARNING: the sources changed while this ran; the numbers may mix two versions")
    load1 = os.getloadavg()[0]
    if max(load0, load1) > (os.cpu_count() or 1):
        print(f"NOTE: load average {load0:.1f} -> {load1:.1f} on {os.cpu_count()} CPUs: other processes shared "
              f"the cores, absolute rates are low; the ratio is the comparable number")
    print(f"Total wall time {time.perf_counter() - wall:.0f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
