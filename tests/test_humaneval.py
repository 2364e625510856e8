"""HumanEval scoring (evaluation/humaneval.py): the local pass@k scorer, its sandbox and its judge.

The scorer is checked on the real problems (../shared/data/bench/humaneval, read in place): the
canonical solutions must all pass and empty completions must all fail. The sandbox is checked with
programs that loop, eat memory, and with a table of attacks (``ATTACKS``) that each try to leave a
mark on the host (a file outside the work directory, a connection to a listener on 127.0.0.1, a
secret read) or to fake a pass; every one must be judged failed and leave no mark, and each
escape is shown to be real by running it once without the sandbox (audit hook only) or, for the
fake passes, as the one-process harness would. The lm-eval hooks are checked by running lm-eval
itself on both task YAMLs given in the module docstring.
"""

from __future__ import annotations

import gzip
import json
import math
import os
import re
import secrets
import shutil
import socket
import subprocess
import sys
import tempfile
import textwrap
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from skymoe.evaluation import humaneval
from skymoe.evaluation.humaneval import (UnsafeCodeRefused, check_program, judge_kwargs, load_problems, pass_at_k,
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
    monkeypatch.delenv(humaneval.UNSAFE_ENV, raising=False)


def without_sandbox(monkeypatch) -> None:
    """As on a machine where no sandbox can be made, with the run opted in to the audit hook alone."""
    monkeypatch.setattr(humaneval, "_boundary", lambda: (None, "disabled by the test"))
    monkeypatch.setenv(humaneval.UNSAFE_ENV, "1")


def require_sandbox() -> humaneval._Boundary:
    boundary, why = humaneval._boundary()
    if boundary is None:
        pytest.skip(f"no OS sandbox on this machine: {why}")
    return boundary


@pytest.fixture(params=["sandbox", "hook-only"])
def isolation(request, monkeypatch) -> str:
    """Each such test runs in the sandbox and with the audit hook as the only guard."""
    if request.param == "sandbox":
        require_sandbox()
    else:
        without_sandbox(monkeypatch)
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


# ---------------------------------------------------------------------------------------- the judge
def test_values_cross_as_plain_values():
    """Arguments and results keep their types (tuple vs list, int vs float vs bool, NaN, big ints,
    dicts with non-string keys, sets); anything else is refused, on either side."""
    program = "def echo(*args, **kwargs):\n    return args, kwargs\n\ndef opaque():\n    return object()\n"
    test = textwrap.dedent("""
        import math
        values = [None, True, 0, -2**100, 1.5, float("inf"), "é\\n", [1, (2, 3)], (), {1: [2], "a": {3.0}},
                  {frozenset({1})}, [[[[]]]]]
        for value in values:
            (back,), kwargs = echo(value, key=value)
            assert back == value and type(back) is type(value) and kwargs == {"key": value}, (value, back)
        (nan,), _ = echo(float("nan"))
        assert math.isnan(nan)
        assert echo() == ((), {})
        try:
            echo(len)
        except TypeError as err:
            assert "cannot pass a builtin_function_or_method" in str(err)
        else:
            raise AssertionError("a function was passed")
        opaque()
    """)
    passed, reason = check_program(program, 5, 256, test=test)
    assert not passed and reason == "failed: TypeError: cannot pass a object between the program and the tests"


def test_trusted_prelude_and_entry_point():
    """The prompt's helpers come from the trusted prelude, even where the completion redefines
    them; the entry point always comes from the candidate, even though the prelude defines a stub."""
    prelude = "def helper(x):\n    return x * 2\n\ndef solve(x):\n    '''Return helper(x) + 1.'''\n"
    test = "def check(candidate):\n    assert candidate(3) == helper(3) + 1 == 7\n\ncheck(solve)\n"
    honest = prelude + "    return helper(x) + 1\n"
    cheat = prelude + "    return 1\n\ndef helper(x):\n    return 0\n"
    assert check_program(honest, 5, 256, test=test, prelude=prelude, entry_point="solve") == (True, "passed")
    assert check_program(cheat, 5, 256, test=test, prelude=prelude, entry_point="solve")[0] is False
    # without the prelude every free name of the test is the candidate's
    assert check_program(honest, 5, 256, test=test) == (True, "passed")


def test_candidate_failures_are_reasons():
    def judged(program: str, test: str = "check(f)") -> tuple[bool, str]:
        return check_program(program, 5, 256, test="def check(candidate):\n    candidate()\n" + test)

    assert judged("def f():\n    raise ValueError('no')\n") == (False, "failed: ValueError: no")
    assert judged("g = 1\n", "check(g)") == (False, "failed: NameError: the program defines no function 'g'")
    assert judged("x = 1 +\n")[1].startswith("failed: SyntaxError")
    assert judged("def f():\n    import os\n    os._exit(7)\n") == (
        False, "failed: exited before the tests finished (exit code 7)")
    assert judged("def f():\n    return bytearray(2**31)\n") == (False, "memory")


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
    require_sandbox()
    program = ("names = [line.split(':')[0].strip() for line in open('/proc/self/net/dev').read().splitlines()[2:]]\n"
               "assert names == ['lo'], names\n")
    assert check_program(program, timeout_s=5, memory_mb=256) == (True, "passed")


def test_sandbox_view_and_identity():
    """Inside: a read-only filesystem but for /tmp/work, only the sandbox's processes, no
    capabilities, no_new_privs, and (when the harness is root) uid and gid 65534 with /root empty
    but for the interpreter."""
    boundary = require_sandbox()
    program = textwrap.dedent(f"""
        import os
        status = open("/proc/self/status").read()
        assert "CapEff:\\t0000000000000000" in status and "CapBnd:\\t0000000000000000" in status, status
        assert "NoNewPrivs:\\t1" in status
        assert os.getcwd() == os.environ["HOME"] == os.environ["TMPDIR"] == "/tmp/work"
        assert os.listdir("/tmp") == ["work"] and os.listdir("/dev/shm") == []
        for path in ("/", "/tmp", "/dev/shm", "/proc", "/usr", {sys.base_prefix!r}):
            assert os.statvfs(path).f_flag & os.ST_RDONLY, path
        assert not os.statvfs("/tmp/work").f_flag & os.ST_RDONLY
        assert sorted(name for name in os.listdir("/proc") if name.isdigit()) == ["1"]
        if {boundary.uid!r} is not None:
            assert (os.getuid(), os.getgid(), os.getgroups()) == (65534, 65534, [])
        if {boundary.hidden!r} is not None:
            assert len(os.listdir({boundary.hidden!r})) == 1
    """)
    assert check_program(program, timeout_s=5, memory_mb=256) == (True, "passed")


def test_work_dir_is_a_small_private_tmpfs(tmp_path):
    """The program cannot fill the host's disk: its only writable place holds 64 MB, in memory."""
    require_sandbox()
    program = textwrap.dedent("""
        import errno
        written = 0
        try:
            for number in range(100):
                with open("fill-%d" % number, "wb") as f:
                    f.write(bytes(8 * 2**20))
                written += 8
        except OSError as err:
            assert err.errno == errno.ENOSPC, err
        assert 32 <= written <= 64, written
    """)
    assert check_program(program, 10, 256, tmp_parent=tmp_path) == (True, "passed")
    assert os.listdir(tmp_path) == []


def test_files_are_written_only_inside_the_throwaway_dir(tmp_path, isolation):
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
        assert os.path.realpath("out.txt") == os.path.join(os.environ["HOME"], "out.txt")
        os.makedirs("a/b")
        with tempfile.NamedTemporaryFile(dir="a/b") as f:
            f.write(b"x")
        for attempt in (lambda: open({str(outside)!r}, "w"), lambda: open({str(cwd / 'out.txt')!r}, "x"),
                        lambda: os.remove({str(kept)!r}), lambda: os.rename({str(kept)!r}, "stolen.txt"),
                        lambda: open("link", "w") if os.symlink({str(outside)!r}, "link") is None else None,
                        lambda: os.rename("out.txt", {str(outside)[1:]!r}, dst_dir_fd=os.open("/", os.O_RDONLY))):
            try:
                attempt()
            except (PermissionError, FileNotFoundError):
                pass
            else:
                raise AssertionError("a write outside the sandbox was allowed")
    """)
    assert check_program(program, timeout_s=5, memory_mb=256, tmp_parent=parent) == (True, "passed")
    assert os.listdir(parent) == []  # the throwaway dir is gone
    assert not outside.exists() and kept.read_text() == "keep me"
    assert sorted(os.listdir(cwd)) == cwd_before

    passed, reason = check_program(f"open({str(outside)!r}, 'w').write('x')", 5, 256, tmp_parent=parent)
    assert not passed and re.search("PermissionError|FileNotFoundError", reason) and not outside.exists()


def test_early_exit_and_process_creation_do_not_pass():
    for program in ("import sys\nsys.exit(0)\n", "import os\nos._exit(0)\n",
                    "import subprocess\nsubprocess.run(['true'])\n", "import os\nos.fork()\n"):
        passed, reason = check_program(program, timeout_s=5, memory_mb=256)
        assert not passed and reason.startswith("failed: "), (program, reason)


def test_without_pidfd_the_wait_polls(monkeypatch):
    monkeypatch.delattr(os, "pidfd_open", raising=False)
    assert check_program("assert 1 + 1 == 2", timeout_s=5, memory_mb=256) == (True, "passed")
    assert check_program("while True:\n    pass\n", timeout_s=1, memory_mb=256) == (False, "timed out")


def test_sandbox_probe_reports_why_not(monkeypatch, tmp_path):
    probe = humaneval._boundary.__wrapped__  # uncached
    monkeypatch.setattr(humaneval.shutil, "which", lambda name: None)
    assert probe() == (None, "util-linux unshare is not installed")
    refusing = tmp_path / "unshare"
    refusing.write_text("#!/bin/sh\necho 'unshare: unshare failed: Operation not permitted' >&2\nexit 1\n")
    refusing.chmod(0o755)
    monkeypatch.setattr(humaneval.shutil, "which", lambda name: str(refusing))
    boundary, why = probe()
    assert boundary is None and why == "unshare failed: unshare: unshare failed: Operation not permitted"


def test_a_sandbox_that_cannot_be_built_fails_the_sample(monkeypatch):
    """A sandbox that breaks after the probe (here: an interpreter installation that is gone) is a
    failed sample with the preamble's reason, never a run without the boundary."""
    boundary = require_sandbox()
    broken = humaneval._Boundary(boundary.unshare, boundary.python, "/nonexistent/python", "/nonexistent", boundary.uid)
    monkeypatch.setattr(humaneval, "_boundary", lambda: (broken, ""))
    passed, reason = check_program("pass", 5, 256)
    assert not passed and reason.startswith("sandbox setup failed: ") and "/nonexistent" in reason, reason


def test_without_a_sandbox_code_is_refused_unless_the_run_accepts_it(monkeypatch, tmp_path, problems):
    monkeypatch.setattr(humaneval, "_boundary", lambda: (None, "namespaces are not permitted"))
    with pytest.raises(UnsafeCodeRefused, match="namespaces are not permitted.*unsafe_code_execution: true"):
        check_program("pass", 5, 256, tmp_parent=tmp_path)
    problem = problems[0]
    with pytest.raises(UnsafeCodeRefused):
        score([problem], {problem["task_id"]: [problem["canonical_solution"]]})
    with pytest.raises(UnsafeCodeRefused):
        process_results(problem, [[problem["canonical_solution"]]])
    with pytest.raises(UnsafeCodeRefused):
        pass_at_k_metric(["assert True"], [["pass"]])
    assert os.listdir(tmp_path) == []  # refused before any directory was made
    assert check_program("pass", 5, 256, unsafe_code_execution=True) == (True, "passed")
    monkeypatch.setenv(humaneval.UNSAFE_ENV, "1")
    assert score([problem], {problem["task_id"]: [problem["canonical_solution"]]})["pass@1"] == 1.0
    with pytest.raises(UnsafeCodeRefused):  # the argument wins over the environment
        check_program("pass", 5, 256, unsafe_code_execution=False)


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


def test_user_namespace_sandbox_for_an_unprivileged_harness():
    """A harness that is not root gets a user namespace (its uid is root inside, itself outside):
    run this module as uid 65534 with the system's Python and check the sandbox still holds."""
    system_python, setpriv = shutil.which("python3", path="/usr/bin:/bin"), shutil.which("setpriv")
    if os.geteuid() != 0 or not system_python or not setpriv:
        pytest.skip("needs root, setpriv and a system python3 to act as an unprivileged user")
    target = Path(tempfile.mkdtemp(prefix="skymoe-userns-", dir="/var/tmp"))
    target.chmod(0o777)  # world-writable, on the root filesystem outside /tmp: only the read-only mount stops a write
    # A copy the unprivileged user can read wherever the checkout is (a CI checkout under a 0700 folder is not).
    readable = Path(tempfile.mkdtemp(prefix="skymoe-userns-module-", dir="/var/tmp"))
    readable.chmod(0o755)
    module_copy = readable / "humaneval.py"
    shutil.copyfile(humaneval.__file__, module_copy)
    module_copy.chmod(0o644)
    script = textwrap.dedent(f"""
        import importlib.util, json, sys
        spec = importlib.util.spec_from_file_location("humaneval_copy", {str(module_copy)!r})
        module = sys.modules[spec.name] = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        boundary, why = module._boundary()
        escape = "import os\\nos.mkfifo({str(target / 'fifo')!r})\\n"
        print(json.dumps([boundary is not None and boundary.uid is None, why,
                          module.check_program("def f(x):\\n    return x * 2\\n", test="assert f(21) == 42"),
                          module.check_program(escape)]))
    """)
    try:
        result = subprocess.run([setpriv, "--reuid=65534", "--regid=65534", "--clear-groups", system_python, "-I",
                                 "-c", script], capture_output=True, text=True, timeout=120, cwd="/",
                                env={"PATH": os.defpath, humaneval.OPT_IN_ENV: "1"})
        assert result.returncode == 0, result.stderr[-2000:]
        user_namespace, why, honest, escape = json.loads(result.stdout)
        if not user_namespace and "Operation not permitted" in why:
            pytest.skip(f"unprivileged user namespaces are not permitted here: {why}")
        assert user_namespace and why == ""
        assert honest == [True, "passed"]
        assert escape[0] is False and "Read-only file system" in escape[1] and os.listdir(target) == []
    finally:
        shutil.rmtree(target)
        shutil.rmtree(readable)


# ---------------------------------------------------------------------------------------- attacks
# Runs a program in a new process past the audit hook: _posixsubprocess.fork_exec raises no audit
# event on Python 3.11, and the new interpreter has no hook at all.
SPAWN = textwrap.dedent("""
    import os, sys, _posixsubprocess

    def spawn(*argv):
        read, write = os.pipe()
        pid = _posixsubprocess.fork_exec([os.fsencode(a) for a in argv], [os.fsencode(argv[0])], True, (write,),
                                         None, None, -1, -1, -1, -1, -1, -1, read, write, True, False, -1, None,
                                         None, None, -1, None, False)
        os.close(write)
        os.close(read)
        return os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])

    def python(code):
        return spawn(sys.executable, "-S", "-c", code)
""")
ATTACK_TEST = "def check(candidate):\n    assert candidate() is True\n\ncheck(attack)\n"


@dataclass
class Targets:
    """What the attacks aim at: world-writable directories outside the work directory (on the
    root filesystem, and in /tmp), a name in /dev/shm, a root-only secret, a listener on 127.0.0.1."""

    outside: Path
    tmp: Path
    shm: Path
    secret: Path
    server: socket.socket

    @property
    def port(self) -> int:
        return self.server.getsockname()[1]

    def contacted(self) -> bool:
        """Whether anyone connected to the listener (and sent anything)."""
        self.server.settimeout(0.3)
        try:
            connection, _ = self.server.accept()
        except socket.timeout:
            return False
        with connection:
            connection.settimeout(2)
            return connection.recv(100) == b"escaped"


@pytest.fixture
def targets() -> Iterator[Targets]:
    if not os.path.isdir("/var/tmp") or not os.path.isdir("/dev/shm"):
        pytest.skip("needs /var/tmp and /dev/shm")
    outside = Path(tempfile.mkdtemp(prefix="skymoe-attack-", dir="/var/tmp"))
    tmp = Path(tempfile.mkdtemp(prefix="skymoe-attack-", dir="/tmp"))
    for directory in (outside, tmp):
        directory.chmod(0o777)  # so that only the boundary, not file permissions, stops a write
    secret = outside / "secret"
    secret.write_text("secret")
    secret.chmod(0o600)
    shm = Path("/dev/shm") / f"skymoe-attack-{secrets.token_hex(8)}"
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen()
    try:
        yield Targets(outside, tmp, shm, secret, server)
    finally:
        server.close()
        shutil.rmtree(outside)
        shutil.rmtree(tmp)
        shm.unlink(missing_ok=True)


@dataclass(frozen=True)
class Attack:
    """A program defining ``attack()``, True when the attack worked as far as the program can
    tell; ``mark``: whether it left its mark on the host (None: it leaves none); ``control``: how to show it is real
    without the boundary ("hook-only": the audit hook alone; "one-process": program and test in
    one interpreter, as the reference harness runs them; None: the audit hook alone stops it)."""

    name: str
    program: Callable[[Targets], str]
    mark: Callable[[Targets], bool] | None = None
    control: str | None = "hook-only"
    test: Callable[[Targets], str] = lambda targets: ATTACK_TEST


def returns(expression: str) -> str:
    return f"def attack():\n    return {expression}\n"


ATTACKS = [
    Attack("fork_exec_shell_writes_outside",
           lambda t: SPAWN + returns(f"spawn('/bin/sh', '-c', 'echo escaped > {t.outside}/shell') == 0"),
           lambda t: (t.outside / "shell").exists()),
    Attack("fork_exec_shell_writes_tmp",
           lambda t: SPAWN + returns(f"spawn('/bin/sh', '-c', 'echo escaped > {t.tmp}/shell') == 0"),
           lambda t: (t.tmp / "shell").exists()),
    Attack("fork_exec_shell_writes_dev_shm",
           lambda t: SPAWN + returns(f"spawn('/bin/sh', '-c', 'echo escaped > {t.shm}') == 0"),
           lambda t: t.shm.exists()),
    Attack("fork_exec_python_connects_to_localhost",
           lambda t: SPAWN + returns(f"python('import socket; socket.create_connection((\"127.0.0.1\", {t.port}), "
                                     f"timeout=2).sendall(b\"escaped\")') == 0"),
           lambda t: t.contacted()),
    Attack("socket_connects_to_localhost",
           lambda t: "import socket\n" + returns(f"socket.create_connection(('127.0.0.1', {t.port}), timeout=2)"
                                                 f".sendall(b'escaped') is None"),
           lambda t: t.contacted(), control=None),
    Attack("os_open_with_dir_fd_outside",
           lambda t: "import os\n" + returns(f"os.close(os.open('dir_fd', os.O_WRONLY | os.O_CREAT, "
                                             f"dir_fd=os.open({str(t.outside)!r}, os.O_RDONLY))) is None"),
           lambda t: (t.outside / "dir_fd").exists()),
    Attack("sqlite3_connect_writes_outside",
           lambda t: "import sqlite3\n" + returns(f"sqlite3.connect({str(t.outside / 'escape.db')!r})"
                                                  f".execute('create table t (x)') is not None"),
           lambda t: (t.outside / "escape.db").exists()),
    Attack("os_mkfifo_outside",
           lambda t: "import os\n" + returns(f"os.mkfifo({str(t.outside / 'fifo')!r}) is None"),
           lambda t: (t.outside / "fifo").exists()),
    Attack("ctypes_libc_system_in_fresh_interpreter",
           lambda t: SPAWN + returns(f"python('import ctypes, sys; sys.exit(ctypes.CDLL(None).system("
                                     f"b\"echo escaped > {t.outside}/ctypes\") != 0)') == 0"),
           lambda t: (t.outside / "ctypes").exists()),
    Attack("ctypes_libc_system_in_process",
           lambda t: "import ctypes\n" + returns(f"ctypes.CDLL(None).system(b'echo escaped > {t.outside}/c') == 0"),
           lambda t: (t.outside / "c").exists(), control=None),
    Attack("open_in_tmp_outside_the_work_dir",
           lambda t: returns(f"open({str(t.tmp / 'open')!r}, 'w').write('escaped') == 7"),
           lambda t: (t.tmp / "open").exists(), control=None),
    Attack("reads_a_root_only_file",
           lambda t: returns(f"open({str(t.secret)!r}).read() == 'secret'")),
    Attack("patches_builtins_isinstance_and_bool",  # narrowly, so that its own channel to the judge still works
           lambda t: "import builtins\n_isinstance = builtins.isinstance\n"
                     "builtins.isinstance = lambda value, kind: value == 'wrong' or _isinstance(value, kind)\n"
                     "builtins.bool = lambda *args: True\n" + returns("'wrong'"),
           control="one-process",
           test=lambda t: "def check(candidate):\n    assert isinstance(candidate(), int)\n"
                          "    assert bool(candidate() == 42)\n\ncheck(attack)\n"),
    Attack("returns_an_object_equal_to_anything",
           lambda t: "class Anything:\n    def __eq__(self, other):\n        return True\n\n" + returns("Anything()"),
           control="one-process", test=lambda t: "assert attack() == 42\n"),
    Attack("prints_a_verdict_and_exits",
           lambda t: "import os, sys\nprint('passed')\nsys.stderr.write('passed\\n')\n"
                     "os.write(1, b'{\"passed\": true, \"reason\": \"passed\", \"candidate_gone\": false}')\n"
                     "os._exit(0)\n",
           control=None),
]


@pytest.mark.parametrize("attack", ATTACKS, ids=lambda attack: attack.name)
def test_attack_fails_in_the_sandbox(attack, targets):
    require_sandbox()
    passed, reason = check_program(attack.program(targets), 10, 256, test=attack.test(targets), entry_point="attack")
    assert not passed, reason
    assert attack.mark is None or not attack.mark(targets), "the attack reached the host"


@pytest.mark.parametrize("attack", [attack for attack in ATTACKS if attack.control],
                         ids=lambda attack: attack.name)
def test_attack_is_real_without_the_boundary(attack, targets, monkeypatch):
    """The control: the same attack succeeds where the boundary (or the separate judge) is missing,
    so its failure above is the boundary's doing."""
    if attack.control == "one-process":
        assert runs_to_the_end(attack.program(targets) + "\n" + attack.test(targets))
        return
    without_sandbox(monkeypatch)
    test = attack.test(targets)
    assert check_program(attack.program(targets), 10, 256, test=test, entry_point="attack") == (True, "passed")
    assert attack.mark is None or attack.mark(targets)


def runs_to_the_end(program: str) -> bool:
    """The one-process harness's verdict (the Codex paper's): the program and its tests ran in
    one interpreter without an exception."""
    return subprocess.run([sys.executable, "-I", "-S", "-c", program], capture_output=True, timeout=30).returncode == 0


def test_real_problems_cannot_be_faked(problems):
    """HumanEval/4 tests only ``abs(candidate(x) - y) < 1e-6``: patching ``builtins.abs`` passes
    it in one process, not against the judge. HumanEval/32 tests with the prompt's ``poly``: a
    completion that redefines it passes in one process, not against the judge, which takes
    ``poly`` from the trusted prompt."""
    for problem, completion in ((problems[4], "    return 0.0\n\nimport builtins\nbuiltins.abs = lambda value: 0\n"),
                                (problems[32], "    return 0.0\n\ndef poly(xs, x):\n    return 0.0\n")):
        one_process = problem["prompt"] + completion + "\n" + judge_kwargs(problem)["test"]
        assert runs_to_the_end(one_process), problem["task_id"]
        assert score([problem], {problem["task_id"]: [completion]})["pass@1"] == 0.0, problem["task_id"]


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
    assert judge_kwargs(doc) == {"test": reference, "prelude": doc["prompt"], "entry_point": doc["entry_point"]}


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
