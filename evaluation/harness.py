"""lm-evaluation-harness on one local model folder, offline: the suites' tasks, the model class the
config names, one ``simple_evaluate`` call, and the headline score of every suite."""

from __future__ import annotations

import os
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

from skymoe.evaluation.humaneval import OPT_IN_ENV, UNSAFE_ENV
from skymoe.evaluation.tasks import OFFLINE_ENV, TaskSet, build_tasks
from skymoe.config import EvaluateConfig


@dataclass
class Outcome:
    results: dict[str, Any]  # lm-eval's results, without the per-sample logs
    samples: dict[str, list[dict]]  # per task: lm-eval's per-sample logs
    scores: dict[str, dict[str, Any]]  # per suite: metric, value (percent), stderr (percent or None)
    items: int  # evaluated documents over all tasks (lm-eval's effective sample counts)


def evaluate_folder(model_dir: Path, config: EvaluateConfig, scratch: Path) -> Outcome:
    with _offline(scratch, run_code=config.run_code, unsafe_code_execution=config.unsafe_code_execution):
        task_set = build_tasks(config.data_dir, config.suites, scratch / "tasks")
        raw = task_set.evaluate(_model(model_dir, config), log_samples=True, random_seed=config.seed,
                                numpy_random_seed=config.seed, torch_random_seed=config.seed,
                                fewshot_random_seed=config.seed, gen_kwargs={"max_gen_toks": config.max_gen_tokens},
                                confirm_run_unsafe_code=config.run_code)
    samples = raw.pop("samples", {})
    items = sum(int(counts.get("effective", 0)) for counts in raw.get("n-samples", {}).values())
    return Outcome(raw, samples, _headline_scores(raw, task_set), items)


def _model(model_dir: Path, config: EvaluateConfig):
    """skymoe's own lm-eval class, or lm-eval's ``hf`` on the exported folder (remote code)."""
    if config.model == "hf":
        import torch
        from lm_eval.models.huggingface import HFLM

        # HFLM defaults to cuda even on a CPU-only torch. Its logits cache scores a continuation from the
        # wrong positions when two requests tokenize to the same ids split differently (lm-eval 0.4.13).
        return HFLM(pretrained=str(model_dir), trust_remote_code=True, batch_size=config.batch_size,
                    device="cuda" if torch.cuda.is_available() else "cpu", logits_cache=False)
    from skymoe.evaluation.lm import SkyMoeLM

    return SkyMoeLM(str(model_dir), batch_size=config.batch_size, max_gen_tokens=config.max_gen_tokens)


def _headline_scores(raw: dict[str, Any], task_set: TaskSet) -> dict[str, dict[str, Any]]:
    scores = {}
    for suite in task_set.suites.values():
        entry = raw["results"].get(suite.name, {})
        metric = next((key for key in suite.metrics if isinstance(entry.get(key), (int, float))), None)
        if metric is None:
            continue
        name, _, filter_name = metric.partition(",")
        stderr = entry.get(f"{name}_stderr,{filter_name}")
        # float(): lm-eval's numbers may be numpy scalars, which JSON (manifests, Prefect) refuses
        scores[suite.suite] = {"metric": metric, "value": round(100 * float(entry[metric]), 3),
                               "stderr": round(100 * float(stderr), 3) if isinstance(stderr, (int, float)) else None}
    return scores


@contextmanager
def _offline(scratch: Path, run_code: bool, unsafe_code_execution: bool) -> Iterator[None]:
    """Nothing may be fetched: the hub and datasets in offline mode with caches in ``scratch``;
    model-written code runs only when the config opts in, and outside an OS sandbox only when it
    opts in to that too."""
    settings = {**OFFLINE_ENV, "TRANSFORMERS_OFFLINE": "1", "HF_HOME": str(scratch / "hf"),
                "HF_DATASETS_CACHE": str(scratch / "hf" / "datasets"), OPT_IN_ENV: "1" if run_code else None,
                UNSAFE_ENV: "1" if run_code and unsafe_code_execution else None}
    saved = {key: os.environ.get(key) for key in settings}
    for key, value in settings.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
