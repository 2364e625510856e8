"""HumanEval scoring (evaluation/humaneval.py): the local pass@k scorer and its sandbox.

The scorer is checked on the real problems (../shared/data/bench/humaneval, read in place): the
canonical solutions must all pass and empty completions must all fail. The sandbox is checked with
programs that loop, eat memory, open a socket to a server listening here, write files inside and
outside their directory; the lm-eval hooks are checked by running lm-eval itself on both task YAMLs
given in the module docstring.
"""

from __future__ import annotations

import gzip
import json
import math
import os
import re
import socket
import textwrap
import time
from pathlib import Path

import pytest

from skymoe.evaluation import humaneval
from skymoe.evaluation.humaneval import (UnsafeCodeRefused, build_program, check_program, load_problems, pass_at_k,
                                  pass_at_k_metric, process_results, score)

# The shared data folder next to the checkout (../shared), as on the development machine.
HUMANEVAL = Path(__file__).resolve().parents[2] / "shared" / "data" / "bench" / "humaneval" / "HumanEval.jsonl.gz"


@pytest.fixture(scope="module")
def problems() -> list[dict]:
    if not HUMANEVAL.exists():
        pytest.skip(f"no HumanEval data at {HUMANEVAL}")
    return load_problems(HUMANEVAL)


@pytest.fixture(autouse=True)
def opt_in(monkeypatch):
    monkeypatch.setenv(humaneval.OPT_IN_ENV, "1")


@pytest.fixture(params=["namespace", "hook-only"])
def isolation(request, monkeypatch) -> str:
    """Each network test runs as configured here (with ``unshare -rn`` where it works) and with
    the audit hook as the only guard, as on a machine without user namespaces."""
    if request.param == "hook-only":
        monkeypatch.setattr(humaneval, "_namespace_prefix", lambda: ())
    return request.param


# ---------------------------------------------------------------------------------------- scoring
def test_canonical_solutions_all_pass(problems):
    assert len(problems) == 164
    started = time.monotonic()
    report = score(problems, {p["task_id"]: [p["canonical_solution"]] for p in problems}, ks=(1,), workers=2)
    elapsed = time.monotonic() - started
    failed = [(row["task_id"], row["reasons"]) for row in report["results"] if row["correct"] != 1]
    assert failed == []
    assert report["pass@1"] == 1.0 and report["problems"] == 164
    print(f"164 canonical solutions checked in {elapsed:.1f} s")


def test_empty_completions_all_fail(problems):
    report = score(problems, {p["task_id"]: [""] for p in problems}, workers=2)
    assert report["pass@1"] == 0.0
    assert all(row["reasons"][0].startswith("failed: ") for row in report["results"])


def test_score_several_samples(problems):
    first = problems[:3]
    completions = {p["task_id"]: [p["canonical_solution"], "", "    return None\n", p["canonical_solution"]]
                   for p in first}
    report = score(first, completions, ks=(1, 2, 4), workers=2)
    assert [row["correct"] for row in report["results"]] == [2, 2, 2]
    assert report["pass@1"] == pytest.approx(0.5)
    assert report["pass@2"] == pytest.approx(pass_at_k(4, 2, 2))
    assert report["pass@4"] == 1.0
    with pytest.raises(ValueError, match="k <= samples"):
        score(first, completions, ks=(5,))
    with pytest.raises(ValueError, match="missing"):
        score(problems[:4], completions)


def test_pass_at_k_hand_computed():
    assert pass_at_k(5, 2, 1) == pytest.approx(0.4)
    assert pass_at_k(5, 2, 2) == pytest.approx(0.7)  # 1 - C(3,2)/C(5,2) = 1 - 3/10
    assert pass_at_k(5, 0, 1) == 0.0 and pass_at_k(5, 0, 3) == 0.0
    assert pass_at_k(5, 4, 2) == 1.0  # n - c < k: every k-subset holds a correct sample
    assert pass_at_k(5, 5, 5) == 1.0
    for n, c, k in [(10, 3, 4), (200, 17, 10), (200, 1, 100), (1000, 5, 100)]:
        assert pass_at_k(n, c, k) == pytest.approx(1 - math.comb(n - c, k) / math.comb(n, k), rel=1e-9)
    for n, c, k in [(5, 6, 1), (5, -1, 1), (5, 2, 0), (5, 2, 6)]:
        with pytest.raises(ValueError):
            pass_at_k(n, c, k)


# ---------------------------------------------------------------------------------------- the sandbox
def test_infinite_loop_is_cut_by_the_timeout():
    for program in ("while True:\n    pass\n", "import time\ntime.sleep(60)\n"):  # CPU-bound and idle
        started = time.monotonic()
        assert check_program(program, timeout_s=1, memory_mb=256) == (False, "timed out")
        assert time.monotonic() - started < 10


def test_memory_bomb_is_stopped():
    bomb = "chunks = []\nwhile True:\n    chunks.append(bytearray(10 * 2**20))\n"
    passed, reason = check_program(bomb, timeout_s=20, memory_mb=256)
    assert not passed and (reason == "memory" or "MemoryError" in reason), reason


def test_socket_to_localhost_fails(isolation):
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()
        port = server.getsockname()[1]
        program = (f"import socket\nconnection = socket.create_connection(('127.0.0.1', {port}), timeout=2)\n"
                   f"connection.sendall(b'escaped')\n")
        passed, reason = check_program(program, timeout_s=5, memory_mb=256)
        assert not passed and reason.startswith("failed: "), reason
        server.settimeout(0.2)
        with pytest.raises(socket.timeout):
            server.accept()


def test_network_namespace_has_no_interface_up():
    if not humaneval._namespace_prefix():
        pytest.skip("unshare -rn is not permitted on this machine; the audit hook is the only network guard")
    program = ("names = [line.split(':')[0].strip() for line in open('/proc/net/dev').read().splitlines()[2:]]\n"
               "assert names == ['lo'], names\n")
    assert check_program(program, timeout_s=5, memory_mb=256) == (True, "passed")


def test_files_are_written_only_inside_the_throwaway_dir(tmp_path):
    parent = tmp_path / "sandboxes"
    parent.mkdir()
    outside = tmp_path / "escape.txt"
    kept = tmp_path / "kept.txt"
    kept.write_text("keep me")
    cwd, cwd_before = Path.cwd(), sorted(os.listdir(Path.cwd()))
    program = textwrap.dedent(f"""
        import os, tempfile
        with open("out.txt", "w") as f:
            f.write("inside")
        assert os.path.realpath("out.txt").startswith({str(parent.resolve())!r} + os.sep)
        os.makedirs("a/b")
        with tempfile.NamedTemporaryFile(dir="a/b") as f:
            f.write(b"x")
        for attempt in (lambda: open({str(outside)!r}, "w"), lambda: open({str(cwd / 'out.txt')!r}, "x"),
                        lambda: os.remove({str(kept)!r}), lambda: os.rename({str(kept)!r}, "stolen.txt"),
                        lambda: open("link", "w") if os.symlink({str(outside)!r}, "link") is None else None,
                        lambda: os.rename("out.txt", {str(outside)[1:]!r}, dst_dir_fd=os.open("/", os.O_RDONLY))):
            try:
                attempt()
            except PermissionError:
                pass
            else:
                raise AssertionError("a write outside the sandbox was allowed")
    """)
    assert check_program(program, timeout_s=5, memory_mb=256, tmp_parent=parent) == (True, "passed")
    assert os.listdir(parent) == []  # the throwaway dir is gone
    assert not outside.exists() and kept.read_text() == "keep me"
    assert sorted(os.listdir(cwd)) == cwd_before

    passed, reason = check_program(f"open({str(outside)!r}, 'w').write('x')", 5, 256, tmp_parent=parent)
    assert not passed and "PermissionError" in reason and not outside.exists()


def test_early_exit_and_process_creation_do_not_pass():
    for program in ("import sys\nsys.exit(0)\n", "import os\nos._exit(0)\n",
                    "import subprocess\nsubprocess.run(['true'])\n", "import os\nos.fork()\n"):
        passed, reason = check_program(program, timeout_s=5, memory_mb=256)
        assert not passed and reason.startswith("failed: "), (program, reason)


def test_without_pidfd_the_wait_polls(monkeypatch):
    monkeypatch.delattr(os, "pidfd_open", raising=False)
    assert check_program("assert 1 + 1 == 2", timeout_s=5, memory_mb=256) == (True, "passed")
    assert check_program("while True:\n    pass\n", timeout_s=1, memory_mb=256) == (False, "timed out")


def test_namespace_probe_falls_back(monkeypatch, tmp_path):
    probe = humaneval._namespace_prefix.__wrapped__  # uncached
    monkeypatch.setattr(humaneval.shutil, "which", lambda name: None)
    assert probe() == ()
    refusing = tmp_path / "unshare"
    refusing.write_text("#!/bin/sh\necho 'unshare: Operation not permitted' >&2\nexit 1\n")
    refusing.chmod(0o755)
    monkeypatch.setattr(humaneval.shutil, "which", lambda name: str(refusing))
    assert probe() == ()


def test_opt_in_is_required(monkeypatch, tmp_path, problems):
    monkeypatch.delenv(humaneval.OPT_IN_ENV)
    with pytest.raises(UnsafeCodeRefused, match=humaneval.OPT_IN_ENV):
        check_program("pass", 5, 256, tmp_parent=tmp_path)
    with pytest.raises(UnsafeCodeRefused):
        score(problems[:1], {problems[0]["task_id"]: [problems[0]["canonical_solution"]]})
    with pytest.raises(UnsafeCodeRefused):
        process_results(problems[0], [[problems[0]["canonical_solution"]]])
    monkeypatch.setenv(humaneval.OPT_IN_ENV, "yes")
    with pytest.raises(UnsafeCodeRefused):
        pass_at_k_metric(["assert True"], [["pass"]])
    assert os.listdir(tmp_path) == []  # refused before any directory was made


# ---------------------------------------------------------------------------------------- loading
def test_load_problems_errors(tmp_path, problems):
    good = json.dumps(problems[0])
    path = tmp_path / "HumanEval.jsonl"
    path.write_text(f"{good}\n\n{good.replace(problems[0]['task_id'], 'X/1')}\n{{not json\n", encoding="utf-8")
    with pytest.raises(ValueError, match=re.escape(f"{path}:4: not valid JSON")):
        load_problems(path)
    path.write_text(f"{good}\n{json.dumps({'task_id': 'X/2', 'prompt': 'def f():'})}\n", encoding="utf-8")
    with pytest.raises(ValueError, match=re.escape(f"{path}:2: missing or non-string fields") + ".*canonical_solution"):
        load_problems(path)
    path.write_text(f"{good}\n{good}\n", encoding="utf-8")
    with pytest.raises(ValueError, match=":2: task_id .* appears twice"):
        load_problems(path)
    with pytest.raises(ValueError, match=re.escape(str(tmp_path / "absent.jsonl.gz"))):
        load_problems(tmp_path / "absent.jsonl.gz")
    truncated = tmp_path / "truncated.jsonl.gz"
    truncated.write_bytes(gzip.compress((good + "\n").encode())[:-20])
    with pytest.raises(ValueError, match=re.escape(str(truncated))):
        load_problems(truncated)


# ---------------------------------------------------------------------------------------- lm-eval hooks
def test_hooks_directly(problems):
    doc = problems[0]
    assert process_results(doc, [[doc["prompt"] + doc["canonical_solution"]]]) == {"pass@1": 1.0}
    assert process_results(doc, [doc["canonical_solution"]]) == {"pass@1": 1.0}  # bare completion, take_first
    assert process_results(doc, [[doc["prompt"]]]) == {"pass@1": 0.0}
    reference = doc["test"] + f"\ncheck({doc['entry_point']})"
    programs = [doc["prompt"] + doc["canonical_solution"], doc["prompt"]]
    assert pass_at_k_metric([reference], [programs], k=[1, 2]) == {"pass@1": 0.5, "pass@2": 1.0}
    assert humaneval.build_predictions([["A", "B"]], [doc]) == [[doc["prompt"] + "A", doc["prompt"] + "B"]]
    assert humaneval.build_predictions_instruct([["A```rest"]], [doc]) == [[doc["prompt"] + "A"]]
    assert build_program(doc, "X") == doc["prompt"] + "X\n" + reference


def test_lm_eval_runs_the_documented_yamls(tmp_path, monkeypatch, problems):
    """Both task YAMLs of the module docstring (process_results and metric form), run by lm-eval
    on a model that answers the even-numbered problems with the canonical solution and the odd
    ones with nothing."""
    import lm_eval
    from lm_eval.api.model import LM
    from lm_eval.tasks import TaskManager

    doc = humaneval.__doc__.split("A complete task YAML using ``process_results``", 1)[1]
    process_form = textwrap.dedent(doc.split("::\n", 1)[1].split("\nor, instead of", 1)[0])
    metric_list = textwrap.dedent(doc.split("the metric form", 1)[1].split("::\n", 1)[1].split('"""', 1)[0])
    assert "process_results: !function skymoe.evaluation.humaneval.process_results" in process_form
    assert "- metric: !function skymoe.evaluation.humaneval.pass_at_k_metric" in metric_list
    process_form = process_form.replace("/path/to/humaneval/HumanEval.jsonl.gz", str(HUMANEVAL)).replace(
        "dataset_kwargs:\n", f"dataset_kwargs:\n  cache_dir: {tmp_path / 'hf-cache'}\n")
    metric_form = (process_form.replace("task: humaneval_local", "task: humaneval_local_metric")
                   .split("process_results:", 1)[0] + "metadata: {version: 1.0}\n" + metric_list)
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    (tasks / "humaneval_local.yaml").write_text(process_form, encoding="utf-8")
    (tasks / "humaneval_local_metric.yaml").write_text(metric_form, encoding="utf-8")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))
    canonical = {p["prompt"]: p["canonical_solution"] for p in problems}
    number = {p["prompt"]: int(p["task_id"].split("/")[1]) for p in problems}

    class Canonical(LM):
        def loglikelihood(self, requests):
            raise NotImplementedError

        def loglikelihood_rolling(self, requests):
            raise NotImplementedError

        def generate_until(self, requests):
            return [canonical[prompt] if number[prompt] % 2 == 0 else ""
                    for prompt in (request.args[0] for request in requests)]

    results = lm_eval.simple_evaluate(model=Canonical(), tasks=["humaneval_local", "humaneval_local_metric"],
                                      limit=6, task_manager=TaskManager(include_path=str(tasks)),
                                      confirm_run_unsafe_code=True)
    for task in ("humaneval_local", "humaneval_local_metric"):
        assert results["results"][task]["pass@1,create_test"] == pytest.approx(0.5), task
