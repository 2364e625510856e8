"""lm-eval's command line on an exported model: ``skymoe tasks export`` and ``python -m
skymoe.evaluation.cli`` (``lm_eval`` with ``--model skymoe``), as docs/evaluation.md shows them.

The documented commands run as they stand, in a fresh folder, on a tiny exported model (a random
MoE with a 256-token window, the tiny preset's, and a byte-level BPE trained on a few hundred
sentences of examples/corpus) and the bundled examples/bench: ``skymoe`` at its default generation
length, ``hf`` with the ``--gen_kwargs`` the document gives it. Nothing is fetched (offline env).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from conftest import CORPUS
from skymoe.flows.cli import main as skymoe_main

DOC = Path(__file__).resolve().parents[1] / "docs" / "evaluation.md"
TASKS = ("skymoe_piqa", "skymoe_gsm8k")
WINDOW = 256


@pytest.fixture(scope="module")
def exported(tmp_path_factory) -> Path:
    """A tiny random MoE exported as training/export.py exports the train stage's model."""
    import torch

    from skymoe.pipelines.tokenize.tokenizer import save_tokenizer, train_tokenizer
    from skymoe.storage import Storage
    from skymoe.training.export import export_hf
    from skymoe.training.model import ModelArgs, Transformer
    from skymoe.training.weights import save_args, save_part

    args = ModelArgs(vocab_size=512, dim=32, n_layers=2, n_heads=2, n_kv_heads=1, ffn_dim=64, max_seq_len=WINDOW,
                     num_experts=4, moe_every=2, top_k=2)
    docs = [json.loads(line)["text"] for line in (CORPUS / "c4" / "c4_demo.jsonl").read_text("utf-8").splitlines()]
    sentences = [s for doc in docs[:60] for s in re.split(r"(?<=[.!?])\s+", doc) if s][:300]
    folder, storage = tmp_path_factory.mktemp("lm_eval_cli_model"), Storage()
    save_tokenizer(train_tokenizer(sentences, vocab_size=args.vocab_size), storage, str(folder / "tokenizer"))
    torch.manual_seed(0)
    save_part(storage, str(folder / "weights"), "shared", Transformer(args).state_dict())
    save_args(storage, str(folder / "weights"), args)
    export_hf(storage, str(folder / "weights"), str(folder / "tokenizer"), str(folder / "hf"))
    return folder / "hf"


def documented_commands() -> str:
    """The first bash block of docs/evaluation.md's "The lm_eval CLI" section."""
    section = DOC.read_text("utf-8").split("## The lm_eval CLI", 1)[1].split("\n## ", 1)[0]
    match = re.search(r"```bash\n(.*?)```", section, re.S)
    assert match, "docs/evaluation.md: no bash block in 'The lm_eval CLI'"
    return match.group(1)


def cli_env(tmp_path: Path, model: Path) -> dict[str, str]:
    """This interpreter's scripts first on PATH (``python``, ``skymoe``, ``lm_eval``), one thread,
    a private Hugging Face home, offline for plain ``lm_eval`` too, and MODEL as the document uses it."""
    return {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
            "MODEL": str(model), "HF_HOME": str(tmp_path / "hf_home"), "HF_HUB_OFFLINE": "1",
            "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "OMP_NUM_THREADS": "1",
            "TOKENIZERS_PARALLELISM": "false"}


def results_of(output_path: Path) -> tuple[dict, dict[str, list[dict]]]:
    """lm-eval's results JSON under ``--output_path`` and its per-task samples."""
    [results_file] = output_path.glob("*/results_*.json")
    samples = {task: [json.loads(line) for line in next(output_path.glob(f"*/samples_{task}_*.jsonl")).open()]
               for task in TASKS}
    return json.loads(results_file.read_text("utf-8")), samples


# ------------------------------------------------------------------------------------- end to end
def test_documented_commands_run_and_agree(exported, tmp_path):
    run = subprocess.run(["bash", "-euo", "pipefail", "-c", documented_commands()], cwd=tmp_path,
                         env=cli_env(tmp_path, exported), capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-4000:]

    # The export: both suites, 10 items each, data files by absolute path (any working directory).
    for task in TASKS:
        [config_path] = (tmp_path / "lm-eval-tasks").glob(f"*/{task}.yaml")
        files = yaml.safe_load(config_path.read_text("utf-8"))["dataset_kwargs"]["data_files"]
        assert all(Path(path).is_absolute() and Path(path).is_file() for path in files.values())

    skymoe, skymoe_samples = results_of(tmp_path / "results-skymoe")
    hf, hf_samples = results_of(tmp_path / "results-hf")
    for results in (skymoe, hf):
        assert {task: results["n-samples"][task]["effective"] for task in TASKS} == dict.fromkeys(TASKS, 10)
        assert {"acc,none", "acc_norm,none"} <= results["results"]["skymoe_piqa"].keys()
        assert {"exact_match,strict-match", "exact_match,flexible-extract"} <= results["results"]["skymoe_gsm8k"].keys()
    # skymoe ran gsm8k at its default length, which fits the window: half of it. hf was given that
    # length, so both saw the same contexts and produced the same text.
    assert skymoe["config"]["gen_kwargs"] in ({}, None) and hf["config"]["gen_kwargs"] == {"max_gen_toks": WINDOW // 2}
    generated = [sample["resps"] for sample in skymoe_samples["skymoe_gsm8k"]]
    assert generated and all(resps[0][0] for resps in generated)
    assert generated == [sample["resps"] for sample in hf_samples["skymoe_gsm8k"]]
    assert [s["acc"] for s in skymoe_samples["skymoe_piqa"]] == [s["acc"] for s in hf_samples["skymoe_piqa"]]


# ------------------------------------------------------------------------------------- the parts
def test_skymoe_default_generation_fits_the_window(exported):
    from lm_eval.api.registry import get_model

    from skymoe.evaluation.cli import register_skymoe
    from skymoe.evaluation.lm import SkyMoeLM, default_max_gen_tokens

    register_skymoe()
    assert get_model("skymoe") is SkyMoeLM
    assert [default_max_gen_tokens(n) for n in (2048, 257, 256, 128, 1)] == [256, 256, 128, 64, 1]
    lm = SkyMoeLM(str(exported), device="cpu")
    assert (lm.max_length, lm.max_gen_toks) == (WINDOW, WINDOW // 2)
    assert SkyMoeLM(str(exported), device="cpu", max_gen_tokens=300).max_gen_toks == 300  # asked for: kept


def test_tasks_export_settings_and_refusals(tmp_path, capsys):
    out = tmp_path / "tasks"
    assert skymoe_main(["tasks", "export", str(out), "--suites", "piqa", "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["tasks"] == ["skymoe_piqa"] and summary["include_path"] == str(out)
    assert summary["suites"]["piqa"]["limit"] == 200  # the tiny preset's
    assert skymoe_main(["tasks", "export", str(out), "--suites", "piqa", "mmlu", "--limit", "2", "--json"]) == 0
    suites = json.loads(capsys.readouterr().out)["suites"]
    assert {name: (s["limit"], s["num_fewshot"]) for name, s in suites.items()} == {"mmlu": (2, 5), "piqa": (2, 0)}

    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep")
    assert skymoe_main(["tasks", "export", str(tmp_path / "mine")]) == 2
    assert "not written by build_tasks" in capsys.readouterr().err
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep"
    assert skymoe_main(["tasks", "export", str(out), "--suites", "squad"]) == 2
    assert "unknown suite 'squad'" in capsys.readouterr().err
