"""``skymoe ablate`` end to end in --smoke mode: the real CLI, a real Prefect flow, real 2-rank DeepSpeed
runs on tokens made by the clean and tokenize stages; reports, cache hits and added seeds."""

from __future__ import annotations

import contextlib
import io
import json
import math
import re
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import SMALL_TRAIN, is_verdict, write_config

from skymoe.flows.cli import main



@pytest.fixture(scope="module")
def ablate_root(tmp_path_factory, small_corpus):
    """One root for the module: the clean and tokenize outputs are made once and shared."""
    folder = tmp_path_factory.mktemp("ablate")
    return write_config(folder / "config.yaml", str(folder / "out"), [str(small_corpus)], train=SMALL_TRAIN)


def ablate_cli(config: Path, ablation: str, *flags: str) -> dict:
    """The command line, in this process; its JSON summary. (Not capsys: Prefect's console log
    handler would keep writing to the per-test stream after pytest closed it.)"""
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert main(["ablate", ablation, "--config", str(config), "--smoke", "--json", *flags]) == 0
    text = out.getvalue()
    return json.loads(text[text.index("{\n"):])


def ablate_flow(config: Path, ablation: str, seeds: int) -> dict:
    from skymoe.flows.ablate import ablate_flow

    return ablate_flow(ablation=ablation, config_path=str(config), seeds=seeds, size="smoke")


def numbers(cell: str) -> list[float]:
    return [float(x) for x in re.findall(r"-?\d+(?:\.\d+)?(?:e-?\d+)?", str(cell))]


def check_report(summary: dict, variants: set[str], key: str = "variant") -> str:
    report = Path(summary["report"])
    text = report.read_text()
    assert {row[key] for row in summary["table"]} == variants
    for row in summary["table"]:
        for column, cell in row.items():
            if column not in (key, "budget", "peak lr") and cell != "":
                assert numbers(cell) and all(math.isfinite(x) for x in numbers(cell)), (column, cell)
    assert summary["findings"] and all(is_verdict(f["status"]) for f in summary["findings"])
    images = re.findall(r"!\[[^]]*\]\((plots/[^)]+)\)", text)
    assert images and all((report.parent / image).stat().st_size > 5000 for image in images)
    return text


def test_gating_norm_through_the_cli_then_all_cache_hits(prefect_env, ablate_root, monkeypatch):
    first = ablate_cli(ablate_root, "gating-norm", "--seeds", "1")
    variants = {"no-norm", "lambda=0.5", "lambda=1", "lambda=2"}
    assert sorted(first["trained"]) == sorted(f"{v} seed 0" for v in variants)
    text = check_report(first, variants)
    assert "figure2-gate-distribution.png" in text and "figure3-training.png" in text

    # A second invocation is all cache hits: no training is even attempted.
    def no_training(*args, **kwargs):
        raise AssertionError("a cached run was trained again")

    monkeypatch.setattr("skymoe.ablations.run.execute_run", no_training)
    second = ablate_cli(ablate_root, "gating-norm", "--seeds", "1")
    assert second["trained"] == [] and second["cached"] == 4
    assert second["table"] == first["table"]


@pytest.mark.slow  # ~1.5 min each on 2 cores; the gating-norm smoke test stays in the default suite
def test_aux_coef_adds_only_the_missing_seed(prefect_env, ablate_root):
    first = ablate_flow(ablate_root, "aux-coef", 1)
    variants = {"fixed-0.01", "fixed-0.001", "adaptive", "switch-fixed-0.01"}
    text = check_report(first, variants)
    for plot in ("alpha-per-layer.png", "drop-rate-per-layer.png", "adaptive-alpha-against-drop-rate.png"):
        assert plot in text
    alphas = {row["variant"]: numbers(row["mean alpha"])[0] for row in first["table"]}
    assert alphas["fixed-0.01"] == pytest.approx(0.01) and alphas["fixed-0.001"] == pytest.approx(0.001)

    # A second seed trains only the four seed-1 runs; the report then averages two seeds.
    second = ablate_flow(ablate_root, "aux-coef", 2)
    assert sorted(second["trained"]) == sorted(f"{v} seed 1" for v in variants)
    assert second["cached"] == 4 and all(row["seeds"] == 2 for row in second["table"])
    check_report(second, variants)


@pytest.mark.slow  # ~1.5 min each on 2 cores; the gating-norm smoke test stays in the default suite
def test_init_upcycles_from_dense_checkpoints(prefect_env, ablate_root):
    summary = ablate_flow(ablate_root, "init", 1)
    budgets = ("small", "2x-dense")
    runs = {"dense"} | {f"{kind}/{b}" for b in budgets for kind in
                        ("scratch-decay", "upcycle-third-decay", "upcycle-final-const", "upcycle-final-3xlr")}
    text = check_report(summary, runs, key="run")
    assert all(f"figure1-expert-similarity-{b}.png" in text for b in budgets)
    # Upcycled experts start as copies of the dense FFN: similarity 1 at the first measurement.
    run = next(r for r in summary["table"] if r["run"] == "upcycle-third-decay/small")
    assert numbers(run["final expert similarity"])[0] > 0.9
    winners = [f for f in summary["findings"] if "initialisation wins" in f["finding"]]
    assert len(winners) == 2 and all("winner" in f["measured"] for f in winners)


def test_stdout_holds_only_the_result(ablate_root):
    """DeepSpeed's import-time log line (its accelerator choice) goes to stderr, not into the JSON on stdout."""
    done = subprocess.run([sys.executable, "-m", "skymoe.flows.cli", "ablate", "gating-norm", "--config",
                           str(ablate_root), "--seeds", "0", "--json"], capture_output=True, text=True, timeout=300)
    assert done.returncode == 2 and done.stdout == "", done.stdout
    assert "--seeds must be >= 1" in done.stderr


def test_bad_arguments_fail_before_prefect(ablate_root, capsys):
    assert main(["ablate", "gating-norm", "--config", str(ablate_root), "--seeds", "0"]) == 2
    assert "--seeds must be >= 1" in capsys.readouterr().err
    assert main(["ablate", "data-quality", "--config", str(ablate_root), "--steps", "50"]) == 2
    assert "--steps sets the MoE budget of gating-norm and aux-coef" in capsys.readouterr().err
