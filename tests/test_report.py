"""The command line's reports: the run summary table, ``skymoe show`` on a root, and errors in one line."""

from __future__ import annotations

import contextlib
import io
import json
import logging
import subprocess
import sys
from datetime import datetime
from pathlib import Path

from skymoe.config import ConfigError
from skymoe.flows.cli import ConsoleFilter, is_user_error, main
from skymoe.report import format_fields, format_run_summary, human_bytes, human_seconds
from skymoe.stage import Manifest
from skymoe.storage import Storage, StorageError

ROOT = "/data/skymoe-out"
TRAIN = f"{ROOT}/train/0b1c2d3e4f5a6b7c"


def _scores(hellaswag: float, piqa: float, piqa_beats: bool) -> list[dict]:
    return [{"suite": "hellaswag", "metric": "acc_norm,none", "score": hellaswag, "stderr": 4.4, "chance": 25.0,
             "beats_chance": False, "delta_vs_previous": None, "skywork_moe_report": None},
            {"suite": "piqa", "metric": "acc,none", "score": piqa, "stderr": 4.9, "chance": 50.0,
             "beats_chance": piqa_beats, "delta_vs_previous": None, "skywork_moe_report": None}]


def _result(stage: str, fp: str, cached: bool, seconds: float, counts: dict, label: str | None = None, **more) -> dict:
    return {"stage": stage, "label": label or stage, "fingerprint": fp, "uri": f"{ROOT}/{stage}/{fp}",
            "cached": cached, "seconds": seconds, "counts": counts, **more}


def run_summary() -> dict:
    """A default run as the pipeline flow returns it: tokenize cached, two evaluated models."""
    return {"root": ROOT, "export": f"{TRAIN}/hf", "results": [
        _result("clean", "ec05ed9951943fa6", False, 51.2,
                {"docs_in": 2432, "docs_out": 928, "rejected": 1504, "rejects_by_reason": {"language": 1200}}),
        _result("tokenize", "f974a735f8bf0208", True, 0.0, {"train_tokens": 675139, "train_sequences": 2627}),
        _result("train", "0b1c2d3e4f5a6b7c", False, 245.4,
                {"dense_params": 640000, "moe_params_total": 754496, "moe_params_activated": 656192,
                 "dense_final_loss": 6.0213, "upcycled_final_loss": 7.1352}, export=f"{TRAIN}/hf"),
        _result("evaluate", "9f3c1d2ab4e5f601", False, 21.0, {"suites": 2, "items": 30}, "evaluate-final",
                scores=_scores(26.0, 55.0, False)),
        _result("evaluate", "4a7b2c9d0e1f3a5b", False, 19.6, {"suites": 2, "items": 30}, "evaluate-step-0000040",
                scores=_scores(25.0, 61.0, True)),
    ]}


def row(lines: list[str], first_cell: str) -> list[str]:
    [match] = [line for line in lines if line.split()[:1] == [first_cell]]
    return match.split()


def test_run_summary_is_a_short_table_with_a_row_per_result():
    text = format_run_summary(run_summary(), {TRAIN: 48_234_496})
    lines = text.splitlines()
    assert len(lines) <= 25 and max(len(line) for line in lines) <= 160
    assert lines[0] == f"skymoe run: 5 stage results under {ROOT}"

    assert row(lines, "clean")[1:4] == ["ran", "51.2s", "clean/ec05ed9951943fa6"]
    assert "2,432 -> 928 docs, 1,504 rejected" in " ".join(row(lines, "clean"))
    assert row(lines, "tokenize")[1:4] == ["cached", "-", "tokenize/f974a735f8bf0208"]
    assert "675,139 train tokens in 2,627 sequences" in " ".join(row(lines, "tokenize"))
    train = " ".join(row(lines, "train"))
    assert train.startswith("train ran 4m05s train/0b1c2d3e4f5a6b7c")
    assert "MoE 754,496 params (656,192 active), final loss dense 6.02, upcycled 7.14" in train
    assert row(lines, "evaluate-final")[1:4] == ["ran", "21.0s", "evaluate/9f3c1d2ab4e5f601"]
    assert row(lines, "evaluate-step-0000040")[1:3] == ["ran", "19.6s"]

    # Scores: suites down, models across (final first), chance beside each suite, above chance marked.
    assert row(lines, "score")[1:] == ["(%)", "chance", "final", "step-0000040"]
    assert row(lines, "hellaswag")[1:] == ["25.0", "26.0", "25.0"]
    assert row(lines, "piqa")[1:] == ["50.0", "55.0", "61.0*"]
    assert lines[lines.index(next(line for line in lines if line.startswith("piqa"))) + 1] == (
        "* above chance by more than two standard errors")

    assert lines[-2] == f"exported model (Hugging Face folder): {TRAIN}/hf"
    assert lines[-1] == "train/0b1c2d3e4f5a6b7c on disk: 46.0 MiB"


def test_run_summary_until_clean_has_no_export_and_no_scores():
    summary = run_summary()
    summary["results"], summary["export"] = summary["results"][:1], None
    lines = format_run_summary(summary).splitlines()
    assert lines[0] == f"skymoe run: 1 stage results under {ROOT}"
    assert [line.split()[0] for line in lines[1:3]] == ["stage", "clean"]
    assert not any("chance" in line for line in lines)
    assert lines[-1] == "exported model: none (training did not run)"


def test_numbers_read_like_a_report():
    assert [human_seconds(s) for s in (0.04, 12.34, 59.96, 245.4, 3725)] == ["0.0s", "12.3s", "60.0s", "4m05s",
                                                                              "1h02m"]
    assert [human_bytes(n) for n in (0, 512, 1536, 48_234_496, 3 * 1024**4)] == ["0 B", "512 B", "1.5 KiB",
                                                                                   "46.0 MiB", "3.0 TiB"]
    assert format_fields({"generation": 2, "series": "s3://b/x", "outputs": {"clean": "ab", "train": "cd"},
                          "counts": {"docs_in": 1200, "evaluation": {"piqa": 55.0}}, "trained": ["a", "b"],
                          "findings": [{"status": "reproduced"}], "report": None}) == [
        "generation: 2", "series: s3://b/x", "outputs: clean ab, train cd", "counts.docs_in: 1,200",
        "counts.evaluation: piqa 55.0", "trained: a, b", "findings: 1 entries", "report: -"]


# ------------------------------------------------------------------------------------------ show
CREATED = datetime(2026, 3, 14, 9, 26, 53).timestamp()


def _output(root: Path, stage: str, fp: str, counts: dict, minutes: int, data_bytes: int, **extra) -> Path:
    folder = root / stage / fp
    (folder / "data").mkdir(parents=True)
    (folder / "data" / "part-0.bin").write_bytes(b"x" * data_bytes)
    manifest = Manifest(stage=stage, fingerprint=fp, code_version="test", config={}, inputs={}, counts=counts,
                        extra=extra, created_at=CREATED + 60 * minutes)
    (folder / "manifest.json").write_text(manifest.to_json(), encoding="utf-8")
    return folder


def fake_root(root: Path) -> Path:
    """Outputs written in an order unlike the pipeline's, an incomplete one, and folders of other kinds."""
    _output(root, "evaluate", "e2", {"suites": 2, "items": 30}, 9, 100, label="step-0000040", step=40,
            tokens=40960, table=_scores(25.0, 61.0, True))
    _output(root, "evaluate", "e1", {"suites": 2, "items": 30}, 8, 100, label="final", step=None, tokens=153600,
            table=_scores(26.0, 55.0, False))
    _output(root, "train", "t1", {"moe_params_total": 754496, "moe_params_activated": 656192}, 5, 3 * 1024 * 1024)
    _output(root, "tokenize", "k1", {"train_tokens": 675139, "train_sequences": 2627}, 2, 2048)
    _output(root, "clean", "c1", {"docs_in": 2432, "docs_out": 928, "rejected": 1504,
                                   "rejects_by_reason": {"language": 1504}}, 0, 10_000)
    (root / "clean" / "c0" / "_done" / "filter").mkdir(parents=True)  # a crashed run: no manifest
    (root / "clean" / "c0" / "_done" / "filter" / "shard-0.json").write_text("{}")
    (root / "ablate" / "gating-norm" / "abcd" / "seed-0").mkdir(parents=True)
    (root / "ablate" / "gating-norm" / "abcd" / "seed-0" / "metrics.jsonl").write_text("{}\n")
    (root / "incremental" / "tiny-0123").mkdir(parents=True)
    (root / "incremental" / "tiny-0123" / "ledger.json").write_text("{}")
    return root


def show(*args: str) -> str:
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert main(["show", *args]) == 0
    return out.getvalue()


def test_show_lists_outputs_in_pipeline_order_with_size_date_and_scores(tmp_path):
    root = fake_root(tmp_path / "out")
    lines = show("--root", str(root)).splitlines()
    total = Storage().disk_usage(str(root / "clean")) + sum(Storage().disk_usage(str(root / stage))
                                                             for stage in ("tokenize", "train", "evaluate"))
    assert lines[0] == f"6 stage outputs under {root}, {human_bytes(total)} in all"
    assert lines[1].split() == ["stage", "fingerprint", "state", "size", "created", "what"]
    body = [line.split() for line in lines[2:8]]
    assert [(cells[0], cells[1], cells[2]) for cells in body] == [
        ("clean", "c1", "complete"), ("clean", "c0", "INCOMPLETE"), ("tokenize", "k1", "complete"),
        ("train", "t1", "complete"), ("evaluate", "e1", "complete"), ("evaluate", "e2", "complete")]

    clean_bytes = Storage().disk_usage(str(root / "clean" / "c1"))
    assert 10_000 < clean_bytes < 12_000
    assert body[0][3:6] == [*human_bytes(clean_bytes).split(), "2026-03-14T09:26"]
    assert " ".join(body[0][6:]) == "2,432 -> 928 docs, 1,504 rejected"
    assert body[1][3:6] == ["2", "B", "-"] and body[1][6:] == ["filter_shards_done=1"]
    assert body[3][3:6] == ["3.0", "MiB", "2026-03-14T09:31"]
    assert " ".join(lines[6].split()[6:]) == "final: hellaswag 26.0 (chance 25.0), piqa 55.0 (chance 50.0)"
    assert " ".join(lines[7].split()[6:]) == ("step-0000040: hellaswag 25.0 (chance 25.0), "
                                              "piqa 61.0* (chance 50.0)")
    assert lines[8:] == ["also under the root, not stage outputs: ablate, incremental"]


def test_show_json_keeps_its_keys_and_adds_size_date_and_scores(tmp_path):
    root = fake_root(tmp_path / "out")
    listed = json.loads(show("--root", str(root), "--json"))["stages"]
    assert [(item["name"], item["fingerprint"]) for item in listed] == [
        ("clean", "c1"), ("clean", "c0"), ("tokenize", "k1"), ("train", "t1"), ("evaluate", "e1"), ("evaluate", "e2")]
    clean = listed[0]
    assert clean["uri"] == str(root / "clean" / "c1") and clean["complete"] is True
    assert clean["counts"] == {"docs_in": 2432, "docs_out": 928, "rejected": 1504}  # nested counts left out
    assert clean["bytes"] == Storage().disk_usage(clean["uri"]) and clean["created_at"] == CREATED
    assert listed[1]["complete"] is False and listed[1]["created_at"] is None
    assert listed[4]["label"] == "final" and listed[4]["scores"][1]["score"] == 55.0


def test_show_on_an_empty_root(tmp_path):
    assert show("--root", str(tmp_path / "nothing")).strip() == f"no stage outputs under {tmp_path / 'nothing'}"


def test_disk_usage_on_s3(s3_server, bucket):
    client, name = bucket
    client.put_object(Bucket=name, Key="du/train/a/weights.bin", Body=b"w" * 3000)
    client.put_object(Bucket=name, Key="du/train/a/hf/config.json", Body=b"c" * 24)
    client.put_object(Bucket=name, Key="du/train/b/other.bin", Body=b"o" * 7)
    storage = Storage()
    assert storage.disk_usage(f"s3://{name}/du/train/a") == 3024
    assert storage.disk_usage(f"s3://{name}/du/train") == 3031
    assert storage.disk_usage(f"s3://{name}/du/absent") == 0


# ---------------------------------------------------------------------------------------- errors
def test_config_error_prints_one_line(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text(f"storage:\n  root: {tmp_path / 'out'}\nclean:\n  language:\n    min_confidence: 2\n")
    result = subprocess.run([sys.executable, "-m", "skymoe.flows.cli", "run", "--config", str(bad)],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and result.stdout == ""
    [line] = result.stderr.splitlines()
    assert line.startswith(f"skymoe: error: {bad}: field 'clean.language.min_confidence': ")
    assert not (tmp_path / "out").exists()


def test_a_bad_set_item_prints_one_line(tmp_path):
    result = subprocess.run([sys.executable, "-m", "skymoe.flows.cli", "run", "--root", str(tmp_path / "out"),
                             "--set", "train.dense.steps"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and result.stdout == ""
    [line] = result.stderr.splitlines()
    assert line.startswith("skymoe: error: --set train.dense.steps: ")


_ERROR_IN_A_TASK = """
import logging, sys
from skymoe.flows import cli

def run_command(args):
    from prefect import flow, task
    from skymoe.config import ConfigError
    from skymoe.flows.prefect_env import forward_stage_logs

    @task
    def stage():
        logging.getLogger("skymoe.demo").info("a stage log line")
        raise ConfigError("c.yaml: field 'train.dense.steps': must be > 0")

    @flow
    def pipeline():
        forward_stage_logs()
        stage()

    return pipeline()

cli._cmd_run = run_command  # the real command's shape: Prefect imported inside it, the error raised in a task
sys.exit(cli.main(["run"]))
"""


def test_a_user_error_inside_a_prefect_task_prints_one_line(prefect_env):
    """Prefect logs the error from the task and from the flow, each with a traceback, and both failed
    states; the terminal shows the stage's own log line and the error's one line, nothing else."""
    result = subprocess.run([sys.executable, "-c", _ERROR_IN_A_TASK], capture_output=True, text=True, timeout=600)
    assert result.returncode == 2 and result.stdout == ""
    lines = result.stderr.splitlines()
    assert len(lines) == 2 and lines[0].endswith("INFO skymoe.demo: a stage log line")
    assert lines[1] == "skymoe: error: c.yaml: field 'train.dense.steps': must be > 0"


def _record(name: str, level: int, message: str, error: BaseException | None = None) -> logging.LogRecord:
    exc_info = (type(error), error, None) if error is not None else None
    return logging.LogRecord(name, level, __file__, 1, message, None, exc_info)


def test_console_keeps_prefect_to_warnings_and_silent_on_user_errors():
    """What Prefect logs when a task raises a user error inside a flow, then a real bug and a warning."""
    console = ConsoleFilter()
    error = ConfigError("c.yaml: field 'train.dense.steps': must be > 0")
    shown = [record.getMessage() for record in [
        _record("prefect", logging.INFO, "Starting temporary server on http://127.0.0.1:8172"),
        _record("prefect.flow_runs", logging.INFO, "Beginning flow run 'spiffy-jellyfish'"),
        _record("prefect.flow_runs", logging.INFO, "View at http://127.0.0.1:4200/runs/flow-run/0d1e"),
        _record("skymoe.clean", logging.INFO, "clean/filter: 3/5 shards"),
        _record("prefect.task_runs", logging.ERROR, f"Task run failed with exception: {error!r}", error),
        _record("prefect.task_runs", logging.ERROR, f"Finished in state Failed('Task run encountered {error}')"),
        _record("prefect.flow_runs", logging.ERROR, f"Encountered exception during execution: {error!r}", error),
        _record("prefect.flow_runs", logging.ERROR, f"Finished in state Failed('{error}')"),
        _record("prefect.server.events.messaging", logging.WARNING, "Refusing to publish event of size 2000000"),
        _record("prefect.task_runs", logging.ERROR, "Task run failed with exception: KeyError('x')", KeyError("x")),
    ] if console.filter(record)]
    assert shown == ["View at http://127.0.0.1:4200/runs/flow-run/0d1e", "clean/filter: 3/5 shards",
                     "Refusing to publish event of size 2000000",
                     "Task run failed with exception: KeyError('x')"]


def test_user_errors_are_skymoes_own():
    assert is_user_error(ConfigError("x")) and is_user_error(StorageError("no bucket"))
    assert not is_user_error(ValueError("a library's bug")) and not is_user_error(KeyError("x"))
