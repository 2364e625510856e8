"""The deployments as ``skymoe serve`` runs them: a real Prefect server and process worker on a free
loopback port, runs triggered through the API, and a kill -9 of worker and flow run mid-training."""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from uuid import UUID

import pytest
from conftest import SMALL_TRAIN, free_port, write_config

from skymoe.flows.serve import LocalPrefect, flow_run_pids, serving, start_server, start_worker, stop
from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId, LogFilter, LogFilterFlowRunId
from prefect.client.schemas.objects import FlowRun

# Long enough that the kill lands between the first checkpoint and the end of the dense run.
LONG_TRAIN = {**SMALL_TRAIN, "dense": {**SMALL_TRAIN["dense"], "steps": 80},
              "upcycled": {**SMALL_TRAIN["upcycled"], "steps": 10}, "checkpoint_every": 10, "eval_every": 40}


@pytest.fixture(scope="module")
def local(tmp_path_factory):
    """Server, pool, the pipeline and single-stage deployments, and a worker, for this module."""
    home = tmp_path_factory.mktemp("prefect-serve")
    with serving(LocalPrefect(port=free_port(), home=home), ["pipeline", "clean", "tokenize"]) as running:
        yield running  # the shutdown also ends runs a failed test left going


@pytest.fixture(scope="module")
def config(tmp_path_factory, small_corpus) -> tuple[Path, Path]:
    """One config and root for the module: the crash test reuses the single-stage test's outputs."""
    folder = tmp_path_factory.mktemp("serve-run")
    return write_config(folder / "c.yaml", str(folder / "out"), [str(small_corpus)], train=LONG_TRAIN), folder / "out"


@pytest.mark.slow  # ~1 min; the browser test and the serve command's test run deployments by default
def test_single_stage_deployments_and_a_missing_upstream(local, config):
    path, root = config
    params = {"config_path": str(path)}
    early = _wait(local, _trigger(local, "tokenize", params))
    assert early.state.is_failed()
    assert "the clean output this run needs is missing" in early.state.message

    clean = _wait(local, _trigger(local, "clean", params))
    assert clean.state.is_completed(), clean.state.message
    assert _task_states(local, clean) == {"clean": "Completed"}

    tokenize = _wait(local, _trigger(local, "tokenize", params))
    assert tokenize.state.is_completed(), tokenize.state.message
    assert _task_states(local, tokenize) == {"tokenize": "Completed"}  # clean was found, not rerun
    assert len(list((root / "tokenize").glob("*/manifest.json"))) == 1


@pytest.mark.slow  # ~2 min; the browser test and the serve command's test run deployments by default
def test_kill_9_of_worker_and_run_then_restart_and_resume(local, config, caplog):
    path, root = config
    params = {"config_path": str(path), "until": "train"}
    first = _trigger(local, "pipeline", params)
    checkpoints = _wait_for_checkpoint(local, first, root)

    os.killpg(local.worker.pid, signal.SIGKILL)  # the worker first, so it cannot report the run's death
    local.worker.wait()
    _kill_run(local, str(first))
    killed_at = max(int(p.parent.name.split("-")[1]) for p in checkpoints.glob("step-*/COMPLETE"))
    with local.client() as client:
        assert client.read_flow_run(first).state.is_running()  # a ghost: nobody reported the kill

    with caplog.at_level(logging.WARNING, logger="skymoe.flows.serve"):
        local.worker = start_worker(local)
    with local.client() as client:
        ghost = client.read_flow_run(first)
    assert ghost.state.is_crashed() and "process is gone" in ghost.state.message
    assert f"flow run {ghost.name!r} ({first}) was Running with no live process: marked Crashed" in caplog.text
    assert "Running" not in _task_states(local, ghost).values()

    rerun = _wait(local, _trigger(local, "pipeline", params), timeout=600)
    assert rerun.state.is_completed(), rerun.state.message
    assert _task_states(local, rerun) == {"clean": "Cached", "tokenize": "Cached", "train": "Completed"}
    assert f"dense: resumed from step {killed_at} " in _logs(local, rerun)
    rows = [json.loads(line) for line in (checkpoints.parent / "metrics.jsonl").read_text().splitlines()]
    assert [row["step"] for row in rows if "loss" in row] == list(range(1, LONG_TRAIN["dense"]["steps"] + 1))


def test_serve_command_deploys_everything_and_stops_cleanly(tmp_path, config, monkeypatch):
    """``skymoe serve`` as a user runs it; SIGTERM with a run in flight leaves no process behind and
    no ghost run in the database."""
    monkeypatch.setenv("PREFECT_SERVER_SERVICES_SCHEDULER_ENABLED", "false")  # no hourly run mid-test
    local = LocalPrefect(port=free_port(), home=tmp_path / "home")
    proc = subprocess.Popen([sys.executable, "-m", "skymoe.flows.cli", "serve", "--port", str(local.port), "--home",
                             str(local.home)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    try:
        output = ""
        while "Prefect UI at" not in output and (line := proc.stdout.readline()):  # "" once serve exited
            output += line
        assert f"Prefect UI at {local.ui_url} " in output, output[-3000:]
        with urllib.request.urlopen(f"{local.ui_url}/ui-settings") as response:
            assert json.load(response)["api_url"] == local.api_url  # the UI calls this port, not 4200
        with local.client() as client:
            deployments = {d.name: d for d in client.read_deployments()}
        assert set(deployments) == {"pipeline", "clean", "tokenize", "train", "evaluate", "incremental"}
        assert [s.schedule.cron for s in deployments["incremental"].schedules] == ["0 * * * *"]
        assert [s.active for s in deployments["incremental"].schedules] == [False]  # paused until turned on
        assert "root" in deployments["incremental"].parameter_openapi_schema["required"]
        form = deployments["pipeline"].parameter_openapi_schema["properties"]  # the Custom run form
        assert form["until"]["enum"] == form["from_stage"]["enum"] == ["clean", "tokenize", "train", "evaluate"]
        assert form["until"].get("description") and form["overrides"].get("description")
        assert deployments["train"].parameters["from_stage"] == deployments["train"].parameters["until"] == "train"

        run = _trigger(local, "pipeline", {"config_path": str(config[0]), "root": str(tmp_path / "out")})
        with local.client() as client:
            while not (state := client.read_flow_run(run).state).is_running():
                assert not state.is_final(), state.message
                time.sleep(0.5)
        os.kill(proc.pid, signal.SIGTERM)
        assert proc.wait(60) == 0
        assert "worker and server stopped" in proc.stdout.read()
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert not _processes_with(f"PREFECT_HOME={local.home}")
    local.server = start_server(local)
    try:
        with local.client() as client:
            state = client.read_flow_run(run).state
        # Crashed either way: marked by serve's shutdown, or reported by the run's own process on SIGTERM.
        assert state.is_crashed(), state
    finally:
        stop(local.server)


def _processes_with(variable: str) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        try:
            if entry.name.isdigit() and variable.encode() in (entry / "environ").read_bytes().split(b"\0"):
                found.append(int(entry.name))
        except OSError:
            pass
    return found


def _trigger(local: LocalPrefect, deployment: str, parameters: dict) -> UUID:
    with local.client() as client:
        found = client.read_deployment_by_name(f"skymoe-pipeline/{deployment}")
        return client.create_flow_run_from_deployment(found.id, parameters=parameters).id


def _wait(local: LocalPrefect, run_id: UUID, timeout: float = 300) -> FlowRun:
    deadline = time.monotonic() + timeout
    with local.client() as client:
        while time.monotonic() < deadline:
            run = client.read_flow_run(run_id)
            if run.state.is_final():
                return run
            time.sleep(1)
    raise AssertionError(f"flow run {run_id} still {run.state.name} after {timeout} s")


def _wait_for_checkpoint(local: LocalPrefect, run_id: UUID, root: Path, timeout: float = 300) -> Path:
    """The dense run's checkpoints folder, as soon as its first checkpoint is complete."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        complete = list(root.glob("train/*/runs/dense/checkpoints/step-*/COMPLETE"))
        if complete:
            return complete[0].parent.parent
        with local.client() as client:
            state = client.read_flow_run(run_id).state
        assert not state.is_final(), f"the run ended before its first checkpoint: {state.name} {state.message}"
        time.sleep(0.2)
    raise AssertionError(f"no checkpoint after {timeout} s")


def _runs_of(local: LocalPrefect) -> dict[str, list[int]]:
    with local.client() as client:
        ours = {str(run.id) for run in client.read_flow_runs()}
    return {run: pids for run, pids in flow_run_pids().items() if run in ours}


def _kill_run(local: LocalPrefect, run_id: str) -> None:
    """kill -9 every process of the run (flow-run process, torchrun, DeepSpeed ranks), again until
    none is left: a parent may spawn a child between the listing and its own death."""
    while pids := _runs_of(local).get(run_id):
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        time.sleep(0.1)


def _task_states(local: LocalPrefect, run: FlowRun) -> dict[str, str]:
    with local.client() as client:
        task_runs = client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[run.id])))
    return {task_run.name.rsplit("-", 1)[0]: task_run.state.name for task_run in task_runs}  # "clean-0" -> clean


def _logs(local: LocalPrefect, run: FlowRun) -> str:
    messages: list[str] = []
    with local.client() as client:
        while page := client.read_logs(LogFilter(flow_run_id=LogFilterFlowRunId(any_=[run.id])),
                                       limit=200, offset=len(messages)):
            messages += [record.message for record in page]
    return "\n".join(messages)
