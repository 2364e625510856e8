"""HumanEval scoring with a local pass@k scorer: model-written code runs only in a sandboxed
subprocess, and only when the run opted in.

lm-eval's built-in ``humaneval`` task scores with ``evaluate.load("code_eval")``, which needs the
Hugging Face hub (its ``utils.py`` calls it at import time, so a YAML must not ``include`` the
built-in task either). This module replaces that scorer.

**Opt-in.** Nothing is executed unless the environment holds ``SKYMOE_RUN_MODEL_CODE=1``
(:data:`OPT_IN_ENV`); the evaluate stage sets it only when the config says
``evaluate.run_code: true``. Without it every entry point that would run code raises
:class:`UnsafeCodeRefused`. lm-eval's own guard applies as well: the task YAML says
``unsafe_code: true`` and ``simple_evaluate`` needs ``confirm_run_unsafe_code=True``.

**Sandbox** (:func:`check_program`). Each program runs in a fresh ``python -I -B`` process in a
new session (process group) in a throwaway directory that is deleted afterwards, with stdin on
/dev/null and an environment of PATH, LANG, LC_ALL, HOME and TMPDIR only (HOME and TMPDIR point
into the throwaway directory). A small bootstrap sets, before the program runs: RLIMIT_AS
(memory), RLIMIT_CPU, RLIMIT_FSIZE (16 MB per file, stdout/stderr included; Python ignores
SIGXFSZ, so a larger write fails with EFBIG), RLIMIT_NOFILE 64 and RLIMIT_CORE 0, with hard limits
the program cannot raise (hard = soft; RLIMIT_CPU's hard limit, a SIGKILL, one second after its
soft one, a SIGXCPU). RLIMIT_NPROC is left alone: it counts all of the user's processes
machine-wide and does not apply to root, so it would block even threads for one user and nothing
for another; process creation is refused by the audit hook instead, and threads are bounded by the
memory limit (each reserves its stack). It then installs an audit hook (``sys.addaudithook``;
Python offers no way to remove one) that refuses sockets, subprocesses, exec/spawn/fork, signals
to other processes, ctypes, ``resource.setrlimit`` and gc introspection, and any write, create,
delete, rename, link, chmod or chown outside the throwaway directory (symlinks resolved; the audit
event of ``os.open`` does not carry its ``dir_fd``, so a path relative to a directory descriptor
is judged against the working directory). Where ``unshare -rn`` works without privileges (probed
once), the process also runs in its own user and network namespace, whose only interface
(loopback) is down. The wall-clock timeout kills the whole process group. This guards the machine
against careless or runaway model code (loops, memory bombs, stray files, network calls); it is
not a boundary against a program written to break out of the interpreter, and it does not stop a
program from faking its own result (which only spoils its own score).

**Standalone use**::

    problems = load_problems(".../humaneval/HumanEval.jsonl.gz")
    report = score(problems, {task_id: [completion, ...]}, ks=(1,), timeout_s=5, memory_mb=512)
    report["pass@1"], report["results"][0]  # {"task_id", "n", "correct", "reasons"}

The program for a completion is ``prompt + completion + "\\n" + test + "\\ncheck(entry_point)"``
(:func:`build_program`), as in the Codex paper's harness.

**lm-eval wiring.** A task YAML names hooks with ``!function <module>.<function>``. lm-eval
0.4.13's task loader first looks for ``<module>.py`` (dots as slashes) next to the YAML, then
imports ``<module>`` normally; ``evaluation`` is an installed package, so
``!function skymoe.evaluation.humaneval.<function>`` works from a YAML in any folder (as long as no
``evaluation/humaneval.py`` sits next to that YAML). The hooks:

- ``build_predictions(resps: list[list[str]], docs: list[dict]) -> list[list[str]]``: filter
  (``function: custom``) that prepends each doc's prompt to its completions, like the built-in's.
  ``build_predictions_instruct`` (same signature) also cuts each completion at the first
  code fence, for the chat-style variant.
- ``process_results(doc: dict, results: list) -> dict[str, float]``: a task's
  ``process_results`` hook. ``results[0]`` is the filtered response: a list of programs (from
  ``build_predictions``) or one string (lm-eval's default ``take_first`` filter); an element that
  does not start with the doc's prompt is taken for a bare completion and gets the prompt
  prepended. Returns ``{"pass@k": estimate}`` for k in (1, 10, 100) with k <= the number of
  samples (``repeats``), so ``repeats: 1`` gives ``{"pass@1": 0.0 or 1.0}``. Default limits
  (:data:`DEFAULT_TIMEOUT_S`, :data:`DEFAULT_MEMORY_MB`, :data:`DEFAULT_WORKERS`).
- ``pass_at_k_metric(references: list[str], predictions: list[list[str]], k: list[int] | int = 1,
  timeout_s=5.0, memory_mb=512, workers=2) -> dict[str, float]``: the same interface as the
  built-in ``utils.pass_at_k`` metric (``references`` = ``doc_to_target``, i.e. the test code and
  ``check(entry_point)``; ``predictions`` = the programs from ``build_predictions``); extra keys
  of a ``metric_list`` entry (``k``, ``timeout_s``, ``memory_mb``, ``workers``) arrive as keyword
  arguments. lm-eval stores the returned ``pass@k`` keys with the entry's aggregation.

Either way lm-eval reports ``pass@1,create_test`` (metric, filter name) in ``results[task]``.

A complete task YAML using ``process_results`` (``dataset_kwargs.data_files`` as the local file)::

    task: humaneval_local
    dataset_path: json
    dataset_name: null
    dataset_kwargs:
      data_files: {test: /path/to/humaneval/HumanEval.jsonl.gz}
    test_split: test
    unsafe_code: true
    output_type: generate_until
    doc_to_text: "{{prompt}}"
    doc_to_target: "{{test}}\\ncheck({{entry_point}})"
    generation_kwargs:
      until: ["\\nclass", "\\ndef", "\\n#", "\\nif", "\\nprint"]
      max_gen_toks: 1024
      do_sample: false
    repeats: 1
    num_fewshot: 0
    filter_list:
      - name: create_test
        filter:
          - function: custom
            filter_fn: !function skymoe.evaluation.humaneval.build_predictions
    process_results: !function skymoe.evaluation.humaneval.process_results
    metric_list:
      - metric: pass@1
        aggregation: mean
        higher_is_better: true
    metadata: {version: 1.0}

or, instead of ``process_results`` and its ``metric_list``, the metric form (the built-in's
shape)::

    metric_list:
      - metric: !function skymoe.evaluation.humaneval.pass_at_k_metric
        aggregation: mean
        higher_is_better: true
        k: [1]
        timeout_s: 5
"""

from __future__ import annotations

import functools
import gzip
import json
import logging
import math
import os
import secrets
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

log = logging.getLogger("skymoe.evaluate.humaneval")

OPT_IN_ENV = "SKYMOE_RUN_MODEL_CODE"
FIELDS = ("task_id", "prompt", "canonical_solution", "test", "entry_point")
DEFAULT_TIMEOUT_S = 5.0
DEFAULT_MEMORY_MB = 512
DEFAULT_WORKERS = 2
FILE_LIMIT_MB = 16  # largest file the program may write (its stdout and stderr included)
OPEN_FILES = 64
PROCESS_RESULTS_KS = (1, 10, 100)
REASON_CHARS = 300


class UnsafeCodeRefused(RuntimeError):
    """Model-written code would be executed, but the run did not opt in."""


def require_opt_in() -> None:
    """Raise unless this process was explicitly allowed to execute model-written code."""
    if os.environ.get(OPT_IN_ENV) != "1":
        raise UnsafeCodeRefused(
            f"refusing to execute model-written code: set {OPT_IN_ENV}=1 to allow it (the evaluate stage "
            f"sets it only when the config says evaluate.run_code: true)")


# ------------------------------------------------------------------------------------ problems
def load_problems(path: str | Path) -> list[dict]:
    """The problems of a HumanEval.jsonl or HumanEval.jsonl.gz file, in file order. A missing file,
    a line that is not a JSON object with the five string fields, or a repeated task_id is a
    ValueError naming the file (and the line)."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"{path}: no such HumanEval file")
    opener = gzip.open if path.name.endswith(".gz") else open
    problems: list[dict] = []
    seen: set[str] = set()
    try:
        with opener(path, "rt", encoding="utf-8") as lines:
            for number, line in enumerate(lines, start=1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as err:
                    raise ValueError(f"{path}:{number}: not valid JSON ({err.msg})") from None
                if not isinstance(row, dict):
                    raise ValueError(f"{path}:{number}: expected a JSON object, got {type(row).__name__}")
                bad = [name for name in FIELDS if not isinstance(row.get(name), str)]
                if bad:
                    raise ValueError(f"{path}:{number}: missing or non-string fields {bad}")
                if row["task_id"] in seen:
                    raise ValueError(f"{path}:{number}: task_id {row['task_id']!r} appears twice")
                seen.add(row["task_id"])
                problems.append({name: row[name] for name in FIELDS})
    except (OSError, EOFError, UnicodeDecodeError) as err:  # a truncated or corrupt gzip, bad bytes
        raise ValueError(f"{path}: cannot read ({err})") from err
    if not problems:
        raise ValueError(f"{path}: no problems in the file")
    return problems


def build_program(problem: dict, completion: str) -> str:
    """The program that checks one completion: prompt, completion, the tests, and the call."""
    return problem["prompt"] + completion + "\n" + _test_code(problem)


def _test_code(problem: dict) -> str:
    return problem["test"] + f"\ncheck({problem['entry_point']})"


# ------------------------------------------------------------------------------------ pass@k
def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k from n samples of which c are correct (Chen et al. 2021):
    1 - C(n-c, k) / C(n, k), computed as a product that neither overflows nor loses precision."""
    if not 0 <= c <= n:
        raise ValueError(f"pass_at_k needs 0 <= c <= n, got n={n}, c={c}")
    if not 1 <= k <= n:
        raise ValueError(f"pass_at_k needs 1 <= k <= n, got n={n}, k={k}")
    if n - c < k:
        return 1.0
    return 1.0 - math.prod(1.0 - k / i for i in range(n - c + 1, n + 1))


# ------------------------------------------------------------------------------------ scoring
def score(problems: Sequence[dict], completions: dict[str, list[str]], ks: Iterable[int] = (1,),
          timeout_s: float = DEFAULT_TIMEOUT_S, memory_mb: int = DEFAULT_MEMORY_MB,
          workers: int = DEFAULT_WORKERS) -> dict[str, Any]:
    """Run every completion's program and estimate pass@k.

    ``completions`` maps each problem's task_id to its samples (one list per problem, all
    problems covered). Returns ``{"pass@k": mean over problems, ..., "problems": count,
    "results": [{"task_id", "n", "correct", "reasons"}, ...]}`` in problem order; ``reasons`` holds
    :func:`check_program`'s reason per sample. Checks run ``workers`` at a time (each is its own
    subprocess)."""
    require_opt_in()
    by_id = {problem["task_id"]: problem for problem in problems}
    missing = [task_id for task_id in by_id if task_id not in completions]
    unknown = sorted(set(completions) - set(by_id))
    if missing or unknown:
        raise ValueError(f"completions do not match the problems: missing {missing[:5]} ({len(missing)} in all), "
                         f"unknown {unknown[:5]} ({len(unknown)} in all)")
    ks = sorted(set(ks))
    fewest = min((len(completions[task_id]) for task_id in by_id), default=0)
    if not ks or ks[0] < 1 or fewest < ks[-1]:
        raise ValueError(f"pass@k needs 1 <= k <= samples per problem; got ks={ks}, fewest samples {fewest}")
    jobs = [(task_id, build_program(by_id[task_id], completion))
            for task_id in by_id for completion in completions[task_id]]
    outcomes = _run_all([program for _, program in jobs], timeout_s, memory_mb, workers)
    results: dict[str, dict[str, Any]] = {task_id: {"task_id": task_id, "n": 0, "correct": 0, "reasons": []}
                                          for task_id in by_id}
    for (task_id, _), (passed, reason) in zip(jobs, outcomes):
        entry = results[task_id]
        entry["n"] += 1
        entry["correct"] += int(passed)
        entry["reasons"].append(reason)
    rows = list(results.values())
    report: dict[str, Any] = {f"pass@{k}": sum(pass_at_k(row["n"], row["correct"], k) for row in rows) / len(rows)
                              for k in ks}
    return {**report, "problems": len(rows), "results": rows}


def _run_all(programs: list[str], timeout_s: float, memory_mb: int, workers: int) -> list[tuple[bool, str]]:
    if len(programs) <= 1 or workers <= 1:
        return [check_program(program, timeout_s, memory_mb) for program in programs]
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="humaneval") as pool:
        return list(pool.map(lambda program: check_program(program, timeout_s, memory_mb), programs))


# ------------------------------------------------------------------------------------ lm-eval hooks
def build_predictions(resps: list[list[str]], docs: list[dict]) -> list[list[str]]:
    """lm-eval ``custom`` filter: each completion with its doc's prompt in front."""
    return [[doc["prompt"] + resp for resp in doc_resps] for doc_resps, doc in zip(resps, docs)]


def build_predictions_instruct(resps: list[list[str]], docs: list[dict]) -> list[list[str]]:
    """lm-eval ``custom`` filter for chat-style answers: as :func:`build_predictions`, each
    completion cut at its first code fence."""
    return [[doc["prompt"] + resp.split("```", 1)[0] for resp in doc_resps] for doc_resps, doc in zip(resps, docs)]


def process_results(doc: dict, results: list) -> dict[str, float]:
    """lm-eval ``process_results`` hook: pass@k (k in 1, 10, 100 up to the sample count) for one
    doc. See the module docstring for what ``results`` may hold."""
    require_opt_in()
    samples = results[0] if results else []
    if isinstance(samples, str):
        samples = [samples]
    if not samples:
        raise ValueError(f"{doc.get('task_id')}: no generated samples to score")
    prompt = doc["prompt"]
    programs = [(sample if sample.startswith(prompt) else prompt + sample) + "\n" + _test_code(doc)
                for sample in samples]
    outcomes = _run_all(programs, DEFAULT_TIMEOUT_S, DEFAULT_MEMORY_MB, DEFAULT_WORKERS)
    correct = sum(passed for passed, _ in outcomes)
    return {f"pass@{k}": pass_at_k(len(programs), correct, k) for k in PROCESS_RESULTS_KS if k <= len(programs)}


def pass_at_k_metric(references: list[str], predictions: list[list[str]], k: list[int] | int = 1,
                     timeout_s: float = DEFAULT_TIMEOUT_S, memory_mb: int = DEFAULT_MEMORY_MB,
                     workers: int = DEFAULT_WORKERS) -> dict[str, float]:
    """lm-eval metric with the interface of the built-in ``utils.pass_at_k``: ``references`` are
    test programs (``doc_to_target``), ``predictions`` per reference the full programs made by
    :func:`build_predictions`. Returns ``{"pass@k": mean over references}``.

    Raises ValueError, never TypeError, on bad input: lm-eval retries a metric that raises
    TypeError with another calling convention, which would hide the cause."""
    require_opt_in()
    ks = [k] if isinstance(k, int) else list(k)
    if len(references) != len(predictions):
        raise ValueError(f"{len(references)} references but {len(predictions)} prediction lists")
    groups = [[prediction] if isinstance(prediction, str) else list(prediction) for prediction in predictions]
    programs = [program + "\n" + reference for reference, group in zip(references, groups) for program in group]
    outcomes = iter(_run_all(programs, timeout_s, memory_mb, workers))
    counts = [(len(group), sum(passed for passed, _ in (next(outcomes) for _ in group))) for group in groups]
    if not counts:
        raise ValueError("no references to score")
    return {f"pass@{kk}": sum(pass_at_k(n, c, kk) for n, c in counts) / len(counts) for kk in ks}


# ------------------------------------------------------------------------------------ the sandbox
# Runs in the child as ``python -I -B -c _BOOTSTRAP program work memory cpu fsize files nonce``: sets the
# limits, installs the audit hook, runs the program in ``work`` and ends with one line
# "<nonce> <reason>" on stderr. Standard library only; nothing here is imported by the parent.
_BOOTSTRAP = r'''
import os, resource, sys, traceback

def _guard(work):
    blocked = ("socket.", "subprocess.", "os.exec", "os.posix_spawn", "os.spawn", "os.fork", "os.system",
               "os.kill", "os.startfile", "pty.", "ctypes.", "signal.pthread_kill", "resource.setrlimit",
               "resource.prlimit", "gc.get_", "sys.remote_exec", "_posixsubprocess.")
    # event -> ((position of a path argument, position of its dir_fd or None), ...), follow symlinks
    paths = {"os.remove": (((0, 1),), False), "os.rmdir": (((0, 1),), False), "os.mkdir": (((0, 2),), False),
             "os.rename": (((0, 2), (1, 3)), False), "os.link": (((0, 2), (1, 3)), False),
             "os.symlink": (((1, 2),), False), "os.chmod": (((0, 2),), True), "os.chown": (((0, 3),), True),
             "os.truncate": (((0, None),), True), "os.utime": (((0, 3),), True),
             "os.setxattr": (((0, None),), True), "os.removexattr": (((0, None),), True),
             "os.chflags": (((0, None),), True), "shutil.rmtree": (((0, 1),), False)}
    write_flags = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND
    realpath, join, isabs, dirname, basename, sep = (os.path.realpath, os.path.join, os.path.isabs,
                                                     os.path.dirname, os.path.basename, os.sep)
    readlink, fsdecode = os.readlink, os.fsdecode

    def resolve(path, dir_fd, follow):
        if isinstance(path, int):
            return realpath(readlink("/proc/self/fd/%d" % path))
        path = fsdecode(path)
        if isinstance(dir_fd, int) and dir_fd >= 0 and not isabs(path):
            path = join(readlink("/proc/self/fd/%d" % dir_fd), path)
        if follow:
            return realpath(path)
        return join(realpath(dirname(path) or "."), basename(path))

    def inside(path, dir_fd=None, follow=True):
        try:
            resolved = resolve(path, dir_fd, follow)
        except Exception:
            return False
        return resolved == work or resolved.startswith(work + sep)

    def hook(event, args):
        if event.startswith(blocked):
            raise PermissionError("sandbox: %s is not allowed" % event)
        if event == "open":
            path, mode, flags = args
            writing = bool(flags & write_flags) or (isinstance(mode, str) and any(c in mode for c in "wax+"))
            if writing and not isinstance(path, int) and not inside(path):
                raise PermissionError("sandbox: writing outside the sandbox directory: %r" % (path,))
        elif event in paths:
            arguments, follow = paths[event]
            for at, dir_fd_at in arguments:
                dir_fd = args[dir_fd_at] if dir_fd_at is not None and len(args) > dir_fd_at else None
                if not inside(args[at], dir_fd, follow):
                    raise PermissionError("sandbox: %s outside the sandbox directory: %r" % (event, args[at]))

    sys.addaudithook(hook)

def _main():
    program, work, memory, cpu, fsize, files, nonce = sys.argv[1:8]
    del sys.argv[1:]
    sys.argv[0] = program
    for name, value in (("RLIMIT_AS", int(memory)), ("RLIMIT_FSIZE", int(fsize)), ("RLIMIT_NOFILE", int(files)),
                        ("RLIMIT_CORE", 0)):
        resource.setrlimit(getattr(resource, name), (value, value))
    resource.setrlimit(resource.RLIMIT_CPU, (int(cpu), int(cpu) + 1))
    write, exit_, format_only = os.write, os._exit, traceback.format_exception_only
    with open(program, encoding="utf-8") as f:
        source = f.read()
    os.chdir(work)
    _guard(os.path.realpath(work))
    try:
        exec(compile(source, program, "exec"), {"__name__": "__sandbox__", "__builtins__": __builtins__})
        reason = "passed"
    except MemoryError:
        reason = "memory"
    except SystemExit as err:
        reason = "failed: exited before the tests finished (SystemExit: %r)" % (err.code,)
    except BaseException as err:
        try:
            reason = "failed: " + format_only(type(err), err)[-1].strip()
        except BaseException:
            reason = "failed: " + type(err).__name__
    try:
        sys.stdout.flush()
    except BaseException:
        pass
    write(2, ("\n%s %s\n" % (nonce, reason.replace("\n", " "))).encode("utf-8", "replace"))
    exit_(0 if reason == "passed" else 1)

_main()
'''


def check_program(program: str, timeout_s: float = DEFAULT_TIMEOUT_S, memory_mb: int = DEFAULT_MEMORY_MB, *,
                  tmp_parent: str | Path | None = None) -> tuple[bool, str]:
    """Run one program in the sandbox (see the module docstring); True when it ran to the end
    without an exception. The reason is "passed", "failed: <exception line>", "timed out" (wall
    clock or CPU limit), "memory", "output too large" or "crashed (<signal>)". ``tmp_parent``:
    where the throwaway directory is made (default: the system's temporary folder)."""
    require_opt_in()
    if timeout_s <= 0 or memory_mb <= 0:
        raise ValueError(f"timeout_s and memory_mb must be positive, got {timeout_s}, {memory_mb}")
    root = Path(tempfile.mkdtemp(prefix="skymoe-humaneval-", dir=tmp_parent))
    try:
        work = root / "work"
        work.mkdir()
        (root / "program.py").write_text(program, encoding="utf-8")
        nonce = secrets.token_hex(16)
        limits = (memory_mb * 2**20, math.ceil(timeout_s) + 1, FILE_LIMIT_MB * 2**20, OPEN_FILES)
        command = [*_namespace_prefix(), sys.executable, "-I", "-B", "-c", _BOOTSTRAP, str(root / "program.py"),
                   str(work), *map(str, limits), nonce]
        env = {"PATH": os.defpath, "LANG": "C.UTF-8", "LC_ALL": "C.UTF-8", "HOME": str(work), "TMPDIR": str(work)}
        with open(root / "stdout", "wb") as stdout, open(root / "stderr", "wb") as stderr:
            process = subprocess.Popen(command, cwd=work, env=env, stdin=subprocess.DEVNULL, stdout=stdout,
                                       stderr=stderr, start_new_session=True, close_fds=True)
            try:
                timed_out = not _wait_unreaped(process.pid, timeout_s)
            finally:
                _kill_group(process)
        return _verdict(process.returncode, timed_out, _tail(root / "stderr"), nonce)
    finally:
        _remove(root)


def _verdict(returncode: int, timed_out: bool, stderr: str, nonce: str) -> tuple[bool, str]:
    reported = [line[len(nonce) + 1:] for line in stderr.splitlines() if line.startswith(nonce + " ")]
    if timed_out:
        return False, "timed out"
    if reported:
        reason = reported[-1][:REASON_CHARS]
        return returncode == 0 and reason == "passed", reason
    if returncode < 0:
        signum = -returncode
        if signum in (signal.SIGXCPU, signal.SIGKILL):
            return False, "timed out"
        if signum == signal.SIGXFSZ:
            return False, "output too large"
        if _out_of_memory(stderr):
            return False, "memory"
        return False, f"crashed ({signal.Signals(signum).name})"
    if _out_of_memory(stderr):
        return False, "memory"
    return False, f"failed: exited before the tests finished (exit code {returncode})"


def _out_of_memory(stderr: str) -> bool:
    return any(text in stderr for text in ("MemoryError", "Cannot allocate memory", "out of memory"))


def _tail(path: Path, size: int = 65536) -> str:
    with open(path, "rb") as f:
        f.seek(max(0, f.seek(0, os.SEEK_END) - size))
        return f.read().decode("utf-8", "replace")


def _wait_unreaped(pid: int, timeout_s: float) -> bool:
    """Wait until the process ``pid`` has exited, without reaping it (True), or the timeout
    (False). While it is unreaped its pid, which is also its process group id, cannot be reused,
    so killing that group afterwards cannot hit anyone else's processes."""
    try:
        pidfd = os.pidfd_open(pid)
    except (AttributeError, OSError):  # no pidfd (not Linux >= 5.3): poll waitid instead
        deadline, delay = time.monotonic() + timeout_s, 0.0005
        while os.waitid(os.P_PID, pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is None:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return False
            time.sleep(min(delay, remaining))
            delay = min(2 * delay, 0.01)
        return True
    try:
        poller = select.poll()
        poller.register(pidfd, select.POLLIN)
        return bool(poller.poll(max(1, math.ceil(timeout_s * 1000))))
    finally:
        os.close(pidfd)


def _kill_group(process: subprocess.Popen) -> None:
    """SIGKILL the program's whole process group (it leads its own session, and it is not reaped
    yet), then reap it."""
    try:
        os.killpg(process.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    process.wait()


def _remove(root: Path) -> None:
    """Delete the throwaway directory, even where the program took away permissions in it."""
    def make_writable(function, path, _exc_info):
        try:
            os.chmod(os.path.dirname(path), 0o700)
            os.chmod(path, 0o700)
            function(path)
        except OSError:
            pass
    shutil.rmtree(root, onerror=make_writable)
    if root.exists():
        log.warning("could not delete the sandbox directory %s", root)


@functools.cache
def _namespace_prefix() -> tuple[str, ...]:
    """``("/usr/bin/unshare", "-rn")`` when a user + network namespace can be made here without
    privileges (probed once per process), else ``()``: the audit hook alone then blocks sockets."""
    unshare = shutil.which("unshare")
    if unshare is not None:
        try:
            probe = subprocess.run([unshare, "-rn", sys.executable, "-I", "-c", "pass"], stdin=subprocess.DEVNULL,
                                   capture_output=True, timeout=30, env={"PATH": os.defpath})
            if probe.returncode == 0:
                return (unshare, "-rn")
            log.info("unshare -rn is not permitted here (%s); sockets are blocked by the audit hook only",
                     probe.stderr.decode("utf-8", "replace").strip()[:200])
        except (OSError, subprocess.TimeoutExpired) as err:
            log.info("unshare -rn failed (%s); sockets are blocked by the audit hook only", err)
    return ()
