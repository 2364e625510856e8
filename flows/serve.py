"""``skymoe serve``: a local Prefect server with the UI, the ``skymoe-local`` process pool, every
deployment of ``prefect.yaml`` and a worker - one command instead of four terminals.

Everything binds 127.0.0.1. The server and the worker are child processes in their own sessions, so
a Ctrl-C in the terminal reaches only this process, which then stops the worker before the server
(a worker without its server would log connection errors until killed).

A flow run whose process died without reporting (kill -9, OOM, a reboot, or a worker stopped
mid-run) stays "Running" in the API forever; ``start_worker`` first marks such runs Crashed, and so
does a clean shutdown, so the UI shows no ghost runs. A ``skymoe`` command that runs a flow in its
own process does the same for the killed commands before it (:func:`crash_killed_command_runs`).
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from pathlib import Path

from skymoe.flows.prefect_env import OFFLINE_DEFAULTS
from prefect.client.orchestration import SyncPrefectClient
from prefect.client.schemas.actions import WorkPoolCreate
from prefect.client.schemas.filters import (
    FlowRunFilter,
    FlowRunFilterId,
    FlowRunFilterState,
    FlowRunFilterStateType,
    FlowRunFilterTags,
    TaskRunFilter,
    TaskRunFilterState,
    TaskRunFilterStateType,
    WorkPoolFilter,
    WorkPoolFilterName,
)
from prefect.client.schemas.objects import FlowRun, StateType
from prefect.exceptions import ObjectNotFound
from prefect.states import Crashed

HOST = "127.0.0.1"
POOL = "skymoe-local"
PROJECT_DIR = Path(__file__).resolve().parent.parent
# A flow run is Pending from the moment a worker claims it until the worker records the process it
# started; a run this young with no process recorded may just be starting under another worker.
PENDING_GRACE = timedelta(seconds=60)
ACTIVE = [StateType.RUNNING, StateType.PENDING]
COMMAND_TAG = "skymoe-command"

_NO_PROXY = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # loopback never goes through a proxy
log = logging.getLogger(__name__)  # not under "skymoe": those records go to the flow run API


class ServeError(RuntimeError):
    """The server, a deployment or the worker could not be started."""


@dataclass
class LocalPrefect:
    """One local Prefect installation: its port, its state folder (database, results, cache
    records, logs), the checkout its deployments run from, and the processes serving it."""

    port: int = 4200
    home: Path = PROJECT_DIR / ".prefect"
    project_dir: Path = PROJECT_DIR
    server: subprocess.Popen | None = field(default=None, repr=False)
    worker: subprocess.Popen | None = field(default=None, repr=False)

    @property
    def ui_url(self) -> str:
        return f"http://{HOST}:{self.port}"

    @property
    def api_url(self) -> str:
        return f"{self.ui_url}/api"

    def env(self) -> dict[str, str]:
        """The environment of every Prefect process of this installation.

        ``prefect server start --port N`` alone leaves the UI calling port 4200, hence the
        ``PREFECT_SERVER_API_*`` and ``PREFECT_UI_API_URL`` settings.
        """
        env = {**OFFLINE_DEFAULTS, **os.environ}
        env.update({
            "PREFECT_HOME": str(self.home),
            "PREFECT_API_URL": self.api_url,
            "PREFECT_SERVER_API_HOST": HOST,
            "PREFECT_SERVER_API_PORT": str(self.port),
            "PREFECT_UI_API_URL": self.api_url,
            "PREFECT_UI_URL": self.ui_url,
            "PREFECT_CLI_PROMPT": "false",
            "SKYMOE_PROJECT_DIR": str(self.project_dir),  # prefect.yaml's pull step: run from this checkout
        })
        env.setdefault("PREFECT_WORKER_QUERY_SECONDS", "3")  # a local server: a clicked Run starts promptly
        return env

    def client(self) -> SyncPrefectClient:
        return SyncPrefectClient(self.api_url)


def start_server(local: LocalPrefect, timeout: float = 180) -> subprocess.Popen:
    """Start ``prefect server start`` on 127.0.0.1 and wait until its API answers (a cold SQLite
    database takes tens of seconds on 2 cores)."""
    with socket.socket() as probe:  # else the health check below could find another server there
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # a listener fails it; TIME_WAIT does not
        try:
            probe.bind((HOST, local.port))
        except OSError:
            raise ServeError(f"port {local.port} on {HOST} is in use (another server?): choose another "
                             "with --port") from None
    local.home.mkdir(parents=True, exist_ok=True)
    with open(local.home / "server.log", "ab") as out:
        proc = subprocess.Popen([sys.executable, "-m", "prefect", "server", "start", "--host", HOST,
                                 "--port", str(local.port)],
                                env=local.env(), stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise ServeError(f"the Prefect server exited with status {proc.returncode}:\n"
                             + _tail(local.home / "server.log"))
        try:
            with _NO_PROXY.open(f"{local.api_url}/health", timeout=5) as response:
                if response.status == 200:
                    return proc
        except (urllib.error.URLError, OSError):
            pass
        time.sleep(0.5)
    stop(proc)
    raise ServeError(f"the Prefect server did not answer on {local.api_url} within {timeout:.0f} s:\n"
                     + _tail(local.home / "server.log"))


def ensure_pool(local: LocalPrefect) -> None:
    """Create the ``skymoe-local`` process work pool unless it exists (a user's edits to it stay)."""
    from prefect.workers.process import ProcessWorker

    with local.client() as client:
        try:
            client.read_work_pool(POOL)
        except ObjectNotFound:
            client.create_work_pool(WorkPoolCreate(name=POOL, type="process",
                                                   base_job_template=ProcessWorker.get_default_base_job_template()))
            log.info("created the process work pool %s", POOL)


def deploy_all(local: LocalPrefect, names: list[str] | None = None, timeout: float = 300) -> None:
    """``prefect deploy`` of every deployment in ``prefect.yaml`` (or only ``names``); any
    deployment that fails to deploy (a missing entrypoint, say) fails the whole call."""
    selection = [arg for name in names for arg in ("--name", name)] if names else ["--all"]
    result = subprocess.run([sys.executable, "-m", "prefect", "deploy", *selection], cwd=local.project_dir,
                            env=local.env(), capture_output=True, text=True, timeout=timeout)
    if result.returncode != 0:
        raise ServeError(f"prefect deploy failed (status {result.returncode}):\n"
                         + (result.stdout + result.stderr)[-3000:])
    log.info("deployed %s from %s", ", ".join(names) if names else "every deployment",
             local.project_dir / "prefect.yaml")


def flow_run_pids() -> dict[str, list[int]]:
    """Live local processes by the flow run they belong to.

    A worker puts ``PREFECT__FLOW_RUN_ID`` in the environment of each flow-run process, and every
    child (torchrun, the DeepSpeed ranks, datatrove workers) inherits it, so this finds a run's
    whole tree even where children started their own sessions. Reads ``/proc`` (Linux); a zombie's
    environment reads empty, so dead processes never count.
    """
    runs: dict[str, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            environ = (entry / "environ").read_bytes()
        except OSError:  # gone meanwhile, or another user's
            continue
        for item in environ.split(b"\0"):
            if item.startswith(b"PREFECT__FLOW_RUN_ID="):
                runs.setdefault(item.split(b"=", 1)[1].decode(), []).append(int(entry.name))
    return runs


def crash_stale_runs(local: LocalPrefect) -> list[str]:
    """Mark Crashed every Running/Pending flow run of the pool whose process is gone, with its
    Running/Pending task runs; return their names. The server binds 127.0.0.1, so every worker of
    the pool - and every flow-run process - is on this machine."""
    now = datetime.now(timezone.utc)
    live = flow_run_pids()
    with local.client() as client:
        gone = [run for run in _active_runs(client) if str(run.id) not in live
                and not (run.state.type == StateType.PENDING and not run.infrastructure_pid
                         and now - run.state.timestamp < PENDING_GRACE)]
        return crash_runs(client, gone, "its process is gone: killed, crashed, or stopped with its worker")


def crash_runs(client: SyncPrefectClient, runs: list[FlowRun], why: str) -> list[str]:
    """Mark ``runs`` Crashed with their Running/Pending task runs, saying ``why``; return their names.
    For runs known to have no live process: the API would show them Running forever."""
    crashed = []
    for run in runs:
        message = f"{run.state.name}, but {why}"
        client.set_flow_run_state(run.id, Crashed(message=message), force=True)
        task_runs = client.read_task_runs(
            flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[run.id])),
            task_run_filter=TaskRunFilter(state=TaskRunFilterState(type=TaskRunFilterStateType(any_=ACTIVE))))
        for task_run in task_runs:
            client.set_task_run_state(task_run.id, Crashed(message=message), force=True)
        log.warning("flow run %r (%s) was %s with no live process: marked Crashed", run.name, run.id,
                    run.state.name)
        crashed.append(run.name)
    return crashed


def command_tags() -> list[str]:
    """Tags for the flow runs a ``skymoe`` command runs in its own process (``run``, ``ablate``,
    ``incremental``): which host and process runs them, so a later command can tell one that was
    killed (no worker records a process for them)."""
    return [COMMAND_TAG, f"{COMMAND_TAG}-pid:{socket.gethostname()}:{os.getpid()}"]


def crash_killed_command_runs(client: SyncPrefectClient) -> list[str]:
    """Mark Crashed the Running/Pending flow runs of ``skymoe`` commands on this host whose process is
    gone (kill -9, OOM, a closed terminal); a worker's runs are :func:`crash_stale_runs`'s."""
    runs = client.read_flow_runs(flow_run_filter=FlowRunFilter(
        state=FlowRunFilterState(type=FlowRunFilterStateType(any_=ACTIVE)), tags=FlowRunFilterTags(all_=[COMMAND_TAG])))
    prefix = f"{COMMAND_TAG}-pid:{socket.gethostname()}:"
    gone = [run for run in runs for tag in run.tags
            if tag.startswith(prefix) and not _alive(int(tag.removeprefix(prefix)))]
    return crash_runs(client, gone, "the skymoe command running it is gone: killed or crashed")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def end_orphaned_runs(local: LocalPrefect, grace: float = 15) -> None:
    """After the worker stopped: give the processes of the pool's active runs ``grace`` seconds to
    exit, then SIGKILL them. Flow-run processes lead their own sessions, so a worker that had to
    be killed leaves them running against a server about to go away."""
    with local.client() as client:
        runs = {str(run.id) for run in _active_runs(client)}
    deadline = time.monotonic() + grace
    while pids := [pid for run, run_pids in flow_run_pids().items() if run in runs for pid in run_pids]:
        if time.monotonic() > deadline + 10:  # SIGKILL pending (uninterruptible I/O): do not hang the shutdown
            log.warning("flow-run processes %s outlived the shutdown", pids)
            return
        if time.monotonic() > deadline:
            for pid in pids:
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.kill(pid, signal.SIGKILL)
        time.sleep(0.2)


def _active_runs(client: SyncPrefectClient) -> list[FlowRun]:
    return client.read_flow_runs(
        flow_run_filter=FlowRunFilter(state=FlowRunFilterState(type=FlowRunFilterStateType(any_=ACTIVE))),
        work_pool_filter=WorkPoolFilter(name=WorkPoolFilterName(any_=[POOL])))


def start_worker(local: LocalPrefect, timeout: float = 120) -> subprocess.Popen:
    """Crash the pool's stale runs, then start a process worker and wait for its first heartbeat."""
    crash_stale_runs(local)
    started = datetime.now(timezone.utc)
    with open(local.home / "worker.log", "ab") as out:
        proc = subprocess.Popen([sys.executable, "-m", "prefect", "worker", "start", "--pool", POOL,
                                 "--type", "process"],
                                cwd=local.project_dir, env=local.env(), stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True)
    deadline = time.monotonic() + timeout
    with local.client() as client:
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise ServeError(f"the worker exited with status {proc.returncode}:\n"
                                 + _tail(local.home / "worker.log"))
            if any(w.last_heartbeat_time and w.last_heartbeat_time >= started
                   for w in client.read_workers_for_work_pool(POOL)):
                return proc
            time.sleep(0.5)
    stop(proc)
    raise ServeError(f"the worker sent no heartbeat within {timeout:.0f} s:\n" + _tail(local.home / "worker.log"))


def stop(proc: subprocess.Popen | None, timeout: float = 30) -> None:
    """SIGTERM the process's group (it leads its own session), SIGKILL it if it lingers."""
    if proc is None or proc.poll() is not None:
        return
    for sig, wait in ((signal.SIGTERM, timeout), (signal.SIGKILL, 10)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            break
        try:
            proc.wait(wait)
            break
        except subprocess.TimeoutExpired:
            continue


@contextmanager
def serving(local: LocalPrefect, deployments: list[str] | None = None) -> Iterator[LocalPrefect]:
    """Server, pool, deployments (all of ``prefect.yaml`` unless named) and worker for the body;
    stops whatever worker and server ``local`` holds at the end, also after an error."""
    try:
        local.server = start_server(local)
        ensure_pool(local)
        deploy_all(local, deployments)
        local.worker = start_worker(local)
        yield local
    finally:
        try:
            stop(local.worker)
            if local.worker is not None and local.server is not None and local.server.poll() is None:
                end_orphaned_runs(local)
                crash_stale_runs(local)  # runs the worker took down with it: Crashed now, not at the next start
        finally:
            stop(local.server)


def serve(local: LocalPrefect) -> int:
    """Serve until Ctrl-C or SIGTERM; a server or worker that dies ends the command with an error."""
    signal.signal(signal.SIGTERM, signal.default_int_handler)  # SIGTERM unwinds like Ctrl-C: children stopped
    try:
        with serving(local) as running:
            print(f"skymoe: Prefect UI at {running.ui_url} (pool {POOL}; logs in {running.home}/server.log and "
                  f"worker.log); Ctrl-C stops worker and server", flush=True)
            while True:
                for name, proc in (("server", running.server), ("worker", running.worker)):
                    if proc.poll() is not None:
                        raise ServeError(f"the {name} exited with status {proc.returncode}:\n"
                                         + _tail(running.home / f"{name}.log"))
                time.sleep(1)
    except KeyboardInterrupt:
        print("skymoe: worker and server stopped", flush=True)
        return 0


def _tail(path: Path, chars: int = 3000) -> str:
    return path.read_text(errors="replace")[-chars:] if path.exists() else ""
