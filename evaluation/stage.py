"""The evaluate stage: lm-evaluation-harness on local benchmark data, for the exported model and,
when asked, for every n-th saved checkpoint of the exported run.

Each evaluated model is its own stage output ``<root>/evaluate/<fingerprint>/`` (fingerprint: this
package's source, the lm-eval version, the evaluate config, the benchmark files' checksums, and
the model: the train stage's fingerprint plus ``final`` or the checkpoint's step), so a rerun never
evaluates a model twice. An output holds lm-eval's results JSON, the per-sample logs, a score
table, a comparison with the previous comparable evaluation, and a plot.
"""

from __future__ import annotations

import json
import logging
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from skymoe.config import PipelineConfig
from skymoe.plots import bar_chart_png, figure_png
from skymoe.stage import (Continuation, Manifest, Plan, Stage, StageOutput, StageRef, folder_entries, fingerprint,
                          read_manifest, shard_entry)
from skymoe.storage import Storage, join

log = logging.getLogger("skymoe.evaluate")

# Skywork-MoE base, the report's Table 1 (percent), shown next to skymoe's scores for context.
REPORT_TABLE_1 = {"ceval": 82.2, "cmmlu": 79.5, "mmlu": 77.4, "gsm8k": 76.1, "math": 31.9, "humaneval": 43.9}
# What a model that guesses scores: the floor to judge a tiny model against.
CHANCE = {"ceval": 25.0, "cmmlu": 25.0, "mmlu": 25.0, "hellaswag": 25.0, "piqa": 50.0, "gsm8k": 0.0, "math": 0.0,
          "humaneval": 0.0}
# The headline metric of each suite, in order of preference (lm-eval "metric,filter" keys).
HEADLINE = ("acc_norm,none", "acc,none", "exact_match,flexible-extract", "exact_match,strict-match",
            "exact_match,none", "pass@1,none", "pass@1,create_test")


class EvaluateError(ValueError):
    """The evaluation cannot start: no trained model, missing benchmark data, a bad task."""


@dataclass(frozen=True)
class EvalTarget:
    """One model to evaluate: the stage's export (``step`` None) or a saved checkpoint."""

    label: str  # "final" or "step-0000100"
    settings_digest: str  # config + benchmark files: only evaluations with the same digest compare
    weights_uri: str  # a Hugging Face folder (final) or a skymoe weights folder (checkpoint)
    tokenizer_uri: str
    tokens: int  # training tokens the weights have seen (0 when unknown)
    step: int | None


class EvaluateStage(Stage):
    """lm-eval on local benchmark data, for the exported model and every n-th evaluated checkpoint:
    each evaluated model is its own output, so no model is evaluated twice."""

    name = "evaluate"
    upstream = ("train",)
    section = "evaluate"
    code = tuple(f"skymoe.evaluation.{module}" for module in (
        "stage", "harness", "humaneval", "lm", "tasks", "task_templates.minerva_math"))
    libraries = ("lm_eval",)

    def check(self, config: PipelineConfig, storage: Storage) -> None:
        check_inputs(config)

    def plan(self, config: PipelineConfig, storage: Storage, upstream: Mapping[str, StageRef],
             continues: Continuation | None = None) -> list[Plan]:
        """The models to evaluate (a continuing generation: its continued model alone), each with its
        output location; fails early on missing inputs."""
        train_ref = upstream["train"]
        train = read_manifest(storage, train_ref)
        if train is None:
            raise EvaluateError(f"no complete train output at {train_ref.uri} (manifest.json missing)")
        data_checksums = _data_checksums(storage, config.evaluate.data_dir, sorted(config.evaluate.suites))
        settings = config.evaluate.model_dump(mode="json", exclude={"data_dir", "batch_size", "checkpoint_every"})
        run = train.extra["exported_run"]
        tokenizer = join(train.upstream["tokenize"], "tokenizer")
        final_tokens = train.extra["runs"][run]["tokens"]
        digest = fingerprint(self.name, self.code_version, settings, data_checksums)

        def target_plan(model: str, target: EvalTarget) -> Plan:
            return self.make_plan(config, settings, {"model": model, **data_checksums}, {"train": train_ref},
                                  work=target, label=f"evaluate-{target.label}")

        plans = [target_plan(f"{train_ref.fingerprint}/final", EvalTarget(
            "final", digest, train_ref.path(train.extra["export"]), tokenizer, final_tokens, None))]
        every = config.evaluate.checkpoint_every
        if every and continues is None:
            protect = config.train.checkpoint_every * every
            for step, uri, tokens in _saved_checkpoints(storage, train_ref.path("runs", run, "checkpoints")):
                if step % protect or tokens == final_tokens:  # the last checkpoint is the exported model
                    continue
                plans.append(target_plan(f"{train_ref.fingerprint}/{step}", EvalTarget(
                    f"step-{step:07d}", digest, join(uri, "weights"), tokenizer, tokens, step)))
        return plans

    def run(self, plan: Plan, storage: Storage) -> StageOutput:
        return _evaluate(plan.config, storage, plan.ref, plan.work)


def _evaluate(config: PipelineConfig, storage: Storage, ref: StageRef, target: EvalTarget) -> StageOutput:
    from skymoe.evaluation.harness import evaluate_folder  # lm-eval and torch load only when evaluating

    with tempfile.TemporaryDirectory(prefix="skymoe-eval-") as scratch:
        model_dir = _local_model(storage, target, Path(scratch))
        outcome = evaluate_folder(model_dir, config.evaluate, Path(scratch))
    scores = outcome.scores
    storage.write_text(ref.path("results.json"), json.dumps(outcome.results, indent=1, default=str))
    for task, rows in outcome.samples.items():
        storage.write_text(ref.path("samples", f"{task}.jsonl"),
                           "".join(json.dumps(row, ensure_ascii=False, default=str) + "\n" for row in rows))
    previous = _previous_scores(storage, ref, target)
    table = [{"suite": suite, "metric": score["metric"], "score": score["value"], "stderr": score["stderr"],
              "chance": CHANCE.get(suite),
              "beats_chance": score["value"] - 2 * (score["stderr"] or 0) > CHANCE.get(suite, 0),
              "delta_vs_previous": None if previous is None or suite not in previous["scores"]
              else round(score["value"] - previous["scores"][suite]["value"], 3),
              "skywork_moe_report": REPORT_TABLE_1.get(suite)} for suite, score in scores.items()]
    storage.write_bytes(ref.path("scores.png"), bar_chart_png(
        f"{target.label}: score per suite (percent)", {suite: s["value"] for suite, s in scores.items()}, "score"))
    log.info("evaluate %s: %s", target.label, ", ".join(f"{s} {v['value']:.1f}" for s, v in scores.items()))
    return StageOutput(
        counts={"suites": len(scores), "items": outcome.items},
        extra={"label": target.label, "step": target.step, "tokens": target.tokens, "scores": scores, "table": table,
               "previous": previous and previous["uri"], "settings_digest": target.settings_digest,
               "model": target.weights_uri, "plots": ["scores.png"], "summary": {"scores": table},
               "files": [shard_entry(storage, ref.path("results.json"), ref),
                         *folder_entries(storage, ref, ref.path("samples")),
                         shard_entry(storage, ref.path("scores.png"), ref)]})


def progress_plot(points: list[tuple[int, dict[str, float]]]) -> bytes | None:
    """Score per suite against training tokens (one point per evaluated checkpoint); None for fewer
    than two points."""
    points = sorted(points, key=lambda point: point[0])
    if len(points) < 2:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4.5))
    for suite in points[-1][1]:
        known = [(tokens, scores[suite]) for tokens, scores in points if suite in scores]
        ax.plot(*zip(*known), "o-", label=f"{suite} (chance {CHANCE.get(suite, 0):g})")
    ax.set_xlabel("training tokens")
    ax.set_ylabel("score (percent)")
    ax.set_title("evaluation score against training tokens")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return figure_png(fig)


def _data_checksums(storage: Storage, data_dir: str, suites: list[str]) -> dict[str, str]:
    """Checksums of the selected suites' files (each suite has its own folder under ``data_dir``)."""
    checksums = {}
    for suite in suites:
        files = storage.expand(join(data_dir, suite))
        if not files:
            raise EvaluateError(f"evaluate.data_dir: no {suite} files at {join(data_dir, suite)}")
        checksums |= {f"data:{uri[len(data_dir):].lstrip('/')}": storage.checksum(uri) for uri in files}
    return checksums


def _saved_checkpoints(storage: Storage, checkpoints_uri: str) -> list[tuple[int, str, int]]:
    """(step, uri, tokens) of every complete checkpoint, by step."""
    found = []
    for uri in storage.listdir(checkpoints_uri):
        complete = join(uri, "COMPLETE")
        if storage.exists(complete):
            record = json.loads(storage.read_text(complete))
            found.append((record["step"], uri, record.get("tokens", 0)))
    return sorted(found)


def _local_model(storage: Storage, target: EvalTarget, scratch: Path) -> Path:
    """A local Hugging Face folder for lm-eval: the export copied down, or a checkpoint exported."""
    folder = scratch / "model"
    if target.step is None:
        for uri in storage.listdir(target.weights_uri):
            (folder / uri.rsplit("/", 1)[1]).parent.mkdir(parents=True, exist_ok=True)
            (folder / uri.rsplit("/", 1)[1]).write_bytes(storage.read_bytes(uri))
    else:
        from skymoe.training.export import export_hf

        export_hf(storage, target.weights_uri, target.tokenizer_uri, str(folder))
    return folder


def _previous_scores(storage: Storage, ref: StageRef, target: EvalTarget) -> dict[str, Any] | None:
    """The evaluation to compare with, among those with the same suites, settings and data: for the
    exported model, the latest earlier exported model under this root (the previous training run);
    for a checkpoint, the previous evaluated checkpoint of the same run. None when there is none."""
    best = None
    for uri in storage.listdir(join(ref.root, EvaluateStage.name)):
        if uri == ref.uri or not storage.exists(join(uri, "manifest.json")):
            continue
        manifest = Manifest.from_json(storage.read_text(join(uri, "manifest.json")))
        extra = manifest.extra
        if extra.get("settings_digest") != target.settings_digest:
            continue
        if target.step is None and extra["label"] == "final":
            rank = manifest.created_at
        elif (target.step is not None and extra["step"] is not None and extra["step"] < target.step
              and extra["model"].rsplit("/checkpoints/", 1)[0] == target.weights_uri.rsplit("/checkpoints/", 1)[0]):
            rank = extra["step"]
        else:
            continue
        if best is None or rank > best[0]:
            best = (rank, {"uri": uri, "scores": extra["scores"]})
    return best[1] if best else None


def check_inputs(config: PipelineConfig) -> None:
    """Fail before any stage runs when the benchmarks cannot be read: a dry run of the task builder,
    which finds every suite's folder and parses every row it will use. (Checksums wait for the
    plan: hashing the files here too would read them twice.)"""
    from skymoe.evaluation.tasks import TaskError, build_tasks

    with tempfile.TemporaryDirectory(prefix="skymoe-tasks-") as scratch:
        try:
            build_tasks(config.evaluate.data_dir, config.evaluate.suites, Path(scratch) / "tasks")
        except TaskError as err:
            raise EvaluateError(f"evaluate: {err}") from None


STAGE = EvaluateStage()
