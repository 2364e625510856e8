"""HumanEval scoring with a local pass@k scorer: model-written code runs only in its own process
inside an OS-level sandbox, the tests run in another process that judges it, and nothing runs
unless the run opted in.

lm-eval's built-in ``humaneval`` task scores with ``evaluate.load("code_eval")``, which needs the
Hugging Face hub (its ``utils.py`` calls it at import time, so a YAML must not ``include`` the
built-in task either). This module replaces that scorer.

**Opt-in.** Nothing is executed unless the environment holds ``SKYMOE_RUN_MODEL_CODE=1``
(:data:`OPT_IN_ENV`); the evaluate stage sets it only when the config says
``evaluate.run_code: true``. Without it every entry point that would run code raises
:class:`UnsafeCodeRefused`. lm-eval's own guard applies as well: the task YAML says
``unsafe_code: true`` and ``simple_evaluate`` needs ``confirm_run_unsafe_code=True``.

**Candidate and judge** (:func:`check_program`). Each sample is two processes joined by two pipes.
The *candidate* runs the model's program (prompt + completion) in the sandbox and then answers
calls to its functions. The *judge* runs only trusted code: the problem's prompt (for helpers the
tests call, such as ``poly``), then the test code, with the entry point, and every other name the
test reads but neither it nor the prompt defines, bound to a stub that sends the arguments to the
candidate and returns its answer. Values cross as JSON of plain built-in values (None, bool, int,
float, str, list, tuple, dict, set, frozenset); anything else is an error. The verdict is
"passed" only when the test code ran to its end in the judge, so whatever the completion does to
its own interpreter (patching ``builtins.isinstance``, returning an object whose ``__eq__`` is
always true, tracing frames, exiting early, printing a fake result) cannot make a test pass.

**Sandbox** (:class:`_Boundary`, probed once per process by :func:`_boundary`). util-linux
``unshare`` starts the candidate in new mount, network, IPC, UTS and PID namespaces (and a user
namespace when the harness is not root). A Python preamble, the namespaces' init, then makes every
inherited mount read-only and nosuid, covers /tmp, /dev/shm, /run and /sys with empty read-only
tmpfs, mounts a fresh read-only /proc that shows only the sandbox's processes, mounts a private
64 MB tmpfs at /tmp/work (HOME, TMPDIR, the working directory; the only writable place, gone with
the namespace), and, as root, covers the first ancestor of the interpreter's installation that
uid 65534 cannot enter (/root for a pyenv Python) with an empty tmpfs in which only that
installation is attached again, read-only. It then drops privileges (as root: uid and gid 65534,
no supplementary groups; always: empty capability bounding and ambient sets, no_new_privs) and
execs ``python -I -S -B`` (the standard library only) on the candidate bootstrap. The network
namespace's only interface, loopback, is down, so nothing is reachable, 127.0.0.1 included. The
bootstrap sets RLIMIT_AS (memory), RLIMIT_CPU, RLIMIT_FSIZE (16 MB per file, stdout and stderr
included), RLIMIT_NOFILE 64, RLIMIT_NPROC 16 and RLIMIT_CORE 0, hard = soft, and installs an
audit hook that refuses sockets, subprocesses, ctypes and writes outside the work directory: a
second line that turns careless code into a clear error, not the boundary. The wall-clock timeout
kills both process groups; the PID namespace ends with its init, so no process of the sample
survives it.

**Without a sandbox** (no ``unshare``, namespaces not permitted, e.g. in an unprivileged
container): code is refused with :class:`UnsafeCodeRefused`, which says why, unless the run opts
in to the audit hook alone, which a program written to escape it gets past
(``unsafe_code_execution=True``, or ``SKYMOE_UNSAFE_CODE_EXECUTION=1``, :data:`UNSAFE_ENV`).
docs/evaluation.md says what the sandbox does not cover.

**Standalone use**::

    problems = load_problems(".../humaneval/HumanEval.jsonl.gz")
    report = score(problems, {task_id: [completion, ...]}, ks=(1,), timeout_s=5, memory_mb=512)
    report["pass@1"], report["results"][0]  # {"task_id", "n", "correct", "reasons"}

The candidate for a completion runs ``prompt + completion``; the judge runs the prompt, then
``test + "\\ncheck(entry_point)"`` (:func:`judge_kwargs`), the Codex paper's harness split in two.

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
  of a ``metric_list`` entry (``k``, ``timeout_s``, ``memory_mb``, ``workers``,
  ``unsafe_code_execution``) arrive as keyword arguments. lm-eval stores the returned ``pass@k``
  keys with the entry's aggregation. The metric does not see the prompt, so the judge takes every
  name the test reads from the candidate, helpers such as ``poly`` included (which a completion
  could redefine, as in the reference harness); ``process_results`` has the doc and does not.

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
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

log = logging.getLogger("skymoe.evaluate.humaneval")

OPT_IN_ENV = "SKYMOE_RUN_MODEL_CODE"
UNSAFE_ENV = "SKYMOE_UNSAFE_CODE_EXECUTION"
FIELDS = ("task_id", "prompt", "canonical_solution", "test", "entry_point")
DEFAULT_TIMEOUT_S = 5.0
DEFAULT_MEMORY_MB = 512
DEFAULT_WORKERS = 2
FILE_LIMIT_MB = 16  # largest file the program may write (its stdout and stderr included), largest reply
OPEN_FILES = 64
PROCESSES = 16  # RLIMIT_NPROC inside the sandbox (as root: all of uid 65534's processes on the machine)
SANDBOX_UID = 65534  # "nobody": the candidate's uid and gid when the harness runs as root
SANDBOX_WORK = "/tmp/work"  # the work directory inside the sandbox: a private tmpfs
WORK_LIMIT_MB = 64  # its size
SETUP_FAILED = 125  # the preamble's exit code when it could not build the sandbox
PROCESS_RESULTS_KS = (1, 10, 100)
REASON_CHARS = 300
EXIT_GRACE_S = 2.0  # how long a candidate that closed its channel gets to finish exiting


class UnsafeCodeRefused(RuntimeError):
    """Model-written code would be executed, but the run did not opt in (or no sandbox can be made
    and the run did not accept running without one)."""


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


def judge_kwargs(problem: dict) -> dict[str, str]:
    """What :func:`check_program` needs besides the candidate's program to judge a completion of
    ``problem``: the tests and the call, the prompt as trusted prelude, the entry point."""
    return {"test": _test_code(problem), "prelude": problem["prompt"], "entry_point": problem["entry_point"]}


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
Job = tuple[str, dict[str, str]]  # the candidate's program, check_program's judge keyword arguments


def score(problems: Sequence[dict], completions: dict[str, list[str]], ks: Iterable[int] = (1,),
          timeout_s: float = DEFAULT_TIMEOUT_S, memory_mb: int = DEFAULT_MEMORY_MB,
          workers: int = DEFAULT_WORKERS, unsafe_code_execution: bool | None = None) -> dict[str, Any]:
    """Run every completion against its problem's tests and estimate pass@k.

    ``completions`` maps each problem's task_id to its samples (one list per problem, all
    problems covered). Returns ``{"pass@k": mean over problems, ..., "problems": count,
    "results": [{"task_id", "n", "correct", "reasons"}, ...]}`` in problem order; ``reasons`` holds
    :func:`check_program`'s reason per sample. Checks run ``workers`` at a time (each is two
    subprocesses). ``unsafe_code_execution``: see :func:`check_program`."""
    require_opt_in()
    _require_boundary(unsafe_code_execution)
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
    task_ids = [task_id for task_id in by_id for _ in completions[task_id]]
    jobs = [(by_id[task_id]["prompt"] + completion, judge_kwargs(by_id[task_id]))
            for task_id in by_id for completion in completions[task_id]]
    outcomes = _run_all(jobs, timeout_s, memory_mb, workers, unsafe_code_execution)
    results: dict[str, dict[str, Any]] = {task_id: {"task_id": task_id, "n": 0, "correct": 0, "reasons": []}
                                          for task_id in by_id}
    for task_id, (passed, reason) in zip(task_ids, outcomes):
        entry = results[task_id]
        entry["n"] += 1
        entry["correct"] += int(passed)
        entry["reasons"].append(reason)
    rows = list(results.values())
    report: dict[str, Any] = {f"pass@{k}": sum(pass_at_k(row["n"], row["correct"], k) for row in rows) / len(rows)
                              for k in ks}
    return {**report, "problems": len(rows), "results": rows}


def _run_all(jobs: list[Job], timeout_s: float, memory_mb: int, workers: int,
             unsafe_code_execution: bool | None) -> list[tuple[bool, str]]:
    def run(job: Job) -> tuple[bool, str]:
        program, judge = job
        return check_program(program, timeout_s, memory_mb, unsafe_code_execution=unsafe_code_execution, **judge)

    if len(jobs) <= 1 or workers <= 1:
        return [run(job) for job in jobs]
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="humaneval") as pool:
        return list(pool.map(run, jobs))


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
    doc. See the module docstring for what ``results`` may hold. Runs without a sandbox only
    where the environment says :data:`UNSAFE_ENV` = 1 (lm-eval passes no options to this hook)."""
    require_opt_in()
    _require_boundary(None)
    samples = results[0] if results else []
    if isinstance(samples, str):
        samples = [samples]
    if not samples:
        raise ValueError(f"{doc.get('task_id')}: no generated samples to score")
    prompt = doc["prompt"]
    jobs = [(sample if sample.startswith(prompt) else prompt + sample, judge_kwargs(doc)) for sample in samples]
    outcomes = _run_all(jobs, DEFAULT_TIMEOUT_S, DEFAULT_MEMORY_MB, DEFAULT_WORKERS, None)
    correct = sum(passed for passed, _ in outcomes)
    return {f"pass@{k}": pass_at_k(len(jobs), correct, k) for k in PROCESS_RESULTS_KS if k <= len(jobs)}


def pass_at_k_metric(references: list[str], predictions: list[list[str]], k: list[int] | int = 1,
                     timeout_s: float = DEFAULT_TIMEOUT_S, memory_mb: int = DEFAULT_MEMORY_MB,
                     workers: int = DEFAULT_WORKERS, unsafe_code_execution: bool | None = None) -> dict[str, float]:
    """lm-eval metric with the interface of the built-in ``utils.pass_at_k``: ``references`` are
    test programs (``doc_to_target``), ``predictions`` per reference the full programs made by
    :func:`build_predictions`. Returns ``{"pass@k": mean over references}``.

    Raises ValueError, never TypeError, on bad input: lm-eval retries a metric that raises
    TypeError with another calling convention, which would hide the cause."""
    require_opt_in()
    _require_boundary(unsafe_code_execution)
    ks = [k] if isinstance(k, int) else list(k)
    if len(references) != len(predictions):
        raise ValueError(f"{len(references)} references but {len(predictions)} prediction lists")
    groups = [[prediction] if isinstance(prediction, str) else list(prediction) for prediction in predictions]
    jobs = [(program, {"test": reference}) for reference, group in zip(references, groups) for program in group]
    outcomes = iter(_run_all(jobs, timeout_s, memory_mb, workers, unsafe_code_execution))
    counts = [(len(group), sum(passed for passed, _ in (next(outcomes) for _ in group))) for group in groups]
    if not counts:
        raise ValueError("no references to score")
    return {f"pass@{kk}": sum(pass_at_k(n, c, kk) for n, c in counts) / len(counts) for kk in ks}


# ------------------------------------------------------------------------------------ one check
def check_program(program: str, timeout_s: float = DEFAULT_TIMEOUT_S, memory_mb: int = DEFAULT_MEMORY_MB, *,
                  test: str = "", prelude: str = "", entry_point: str | None = None,
                  tmp_parent: str | Path | None = None,
                  unsafe_code_execution: bool | None = None) -> tuple[bool, str]:
    """Judge one program: ``program`` (untrusted) runs in the sandbox as the candidate; ``test``
    (trusted) runs in the judge after ``prelude`` (trusted), calling the candidate's functions:
    ``entry_point`` and every name the test reads that neither defines (see the module
    docstring). True only when the test code ran to its end; with no ``test``, when the program
    itself did.

    The reason is "passed", "failed: <exception line>" (the test's, or the candidate's when its
    function raised), "timed out" (wall clock or CPU limit), "memory", "output too large",
    "crashed (<signal>)" or "sandbox setup failed: ...". ``tmp_parent``: where the throwaway
    directory for the processes' output (and, without a sandbox, the program's work directory)
    is made (default: the system's temporary folder). ``unsafe_code_execution``: run
    with the audit hook alone where no sandbox can be made (None: as :data:`UNSAFE_ENV` says);
    otherwise that case raises :class:`UnsafeCodeRefused`."""
    require_opt_in()
    if timeout_s <= 0 or memory_mb <= 0:
        raise ValueError(f"timeout_s and memory_mb must be positive, got {timeout_s}, {memory_mb}")
    boundary = _require_boundary(unsafe_code_execution)
    root = Path(tempfile.mkdtemp(prefix="skymoe-humaneval-", dir=tmp_parent))
    try:
        job = {"test": test, "prelude": prelude, "entry_point": entry_point}
        with ExitStack() as files:
            def scratch() -> IO[bytes]:  # unlinked at once: nothing in the sandbox can find it by name
                return files.enter_context(tempfile.TemporaryFile(dir=root))
            streams = _Streams(*(scratch() for _ in range(6)))
            streams.program.write(program.encode("utf-8"))
            streams.job.write(json.dumps(job).encode("utf-8"))
            for stream in (streams.program, streams.job):
                stream.seek(0)
            return _run_pair(streams, root, boundary, timeout_s, memory_mb)
    finally:
        _remove(root)


@dataclass(frozen=True)
class _Streams:
    """The files of one check: the candidate's stdin, stdout and stderr, the judge's stdin (its
    job), stdout (its verdict) and stderr."""

    program: IO[bytes]
    candidate_out: IO[bytes]
    candidate_err: IO[bytes]
    job: IO[bytes]
    verdict: IO[bytes]
    judge_err: IO[bytes]


def _run_pair(streams: _Streams, root: Path, boundary: _Boundary | None, timeout_s: float,
              memory_mb: int) -> tuple[bool, str]:
    """Start the candidate and the judge, wait for the judge's verdict (or the timeout), then kill
    both process groups."""
    requests = os.pipe()  # judge -> candidate
    replies = os.pipe()  # candidate -> judge
    limits = [str(memory_mb * 2**20), str(math.ceil(timeout_s) + 1)]
    processes: list[subprocess.Popen] = []
    try:
        try:
            processes.append(_start_candidate(streams, root, boundary, limits, requests[0], replies[1]))
            processes.append(_start_judge(streams, limits, requests[1], replies[0]))
        finally:
            for fd in (*requests, *replies):  # only the children may hold the ends: EOF when one dies
                os.close(fd)
        candidate, judge = processes
        started = time.monotonic()
        timed_out = not _wait_unreaped(judge.pid, timeout_s)
        verdict = None if timed_out else _read_verdict(streams)
        exited = True
        if verdict is not None and verdict["candidate_gone"]:
            grace = min(EXIT_GRACE_S, max(0.0, timeout_s - (time.monotonic() - started)))
            exited = _wait_unreaped(candidate.pid, grace)
    finally:
        for process in processes:
            _kill_group(process)
    if timed_out:
        return False, "timed out"
    if verdict is None:
        log.warning("the judge process failed (exit code %s): %s", judge.returncode, _tail(streams.judge_err)[-500:])
        return False, "failed: the test process broke down"
    if not verdict["candidate_gone"]:
        return verdict["passed"] is True and verdict["reason"] == "passed", str(verdict["reason"])[:REASON_CHARS]
    if not exited:
        return False, "failed: the program closed its channel to the tests"
    return False, _exit_reason(candidate.returncode, _tail(streams.candidate_err))


def _read_verdict(streams: _Streams) -> dict | None:
    streams.verdict.seek(0)
    try:
        verdict = json.loads(streams.verdict.read())
    except ValueError:
        return None
    return verdict if isinstance(verdict, dict) and {"passed", "reason", "candidate_gone"} <= set(verdict) else None


def _exit_reason(returncode: int, stderr: str) -> str:
    """Why the candidate's process ended before the tests did, from its exit status."""
    if returncode == SETUP_FAILED and "skymoe sandbox setup failed" in stderr:
        line = stderr.strip().splitlines()[-1]
        log.error("%s", line)
        return line[len("skymoe "):][:REASON_CHARS]
    if returncode < 0:
        signum = -returncode
        if signum in (signal.SIGXCPU, signal.SIGKILL):
            return "timed out"
        if signum == signal.SIGXFSZ:
            return "output too large"
        if _out_of_memory(stderr):
            return "memory"
        return f"crashed ({signal.Signals(signum).name})"
    if _out_of_memory(stderr):
        return "memory"
    return f"failed: exited before the tests finished (exit code {returncode})"


def _out_of_memory(stderr: str) -> bool:
    return any(text in stderr for text in ("MemoryError", "Cannot allocate memory", "out of memory"))


def _tail(stream: IO[bytes], size: int = 65536) -> str:
    stream.seek(max(0, stream.seek(0, os.SEEK_END) - size))
    return stream.read().decode("utf-8", "replace")


def _start_candidate(streams: _Streams, root: Path, boundary: _Boundary | None, limits: list[str],
                     requests: int, replies: int) -> subprocess.Popen:
    """The candidate's process: the bootstrap inside the sandbox, or (no boundary, opted in) a
    plain ``python -I`` with only the audit hook, in ``root/work``."""
    if boundary is None:
        work = root / "work"
        work.mkdir()
        inside = str(work.resolve())
    else:
        work, inside = root, SANDBOX_WORK
    bootstrap = ["-I", "-S", "-B", "-c", _CANDIDATE, inside, *limits, str(FILE_LIMIT_MB * 2**20), str(OPEN_FILES),
                 str(PROCESSES if boundary is not None else 0), str(requests), str(replies)]
    env = {"PATH": os.defpath, "LANG": "C.UTF-8", "LC_ALL": "C.UTF-8", "HOME": inside, "TMPDIR": inside}
    if boundary is not None:
        command, env = boundary.command(bootstrap, env), {"PATH": os.defpath}
    else:
        command = [_interpreter(), *bootstrap]
    return subprocess.Popen(command, cwd=work, env=env, stdin=streams.program, stdout=streams.candidate_out,
                            stderr=streams.candidate_err, pass_fds=(requests, replies), start_new_session=True)


def _start_judge(streams: _Streams, limits: list[str], requests: int, replies: int) -> subprocess.Popen:
    """The judge's process: trusted code, outside the sandbox, reachable by the candidate only
    through the two pipes."""
    command = [_interpreter(), "-I", "-S", "-B", "-c", _JUDGE, *limits, str(requests), str(replies),
               str(FILE_LIMIT_MB * 2**20)]
    return subprocess.Popen(command, env={"PATH": os.defpath, "LANG": "C.UTF-8", "LC_ALL": "C.UTF-8"},
                            stdin=streams.job, stdout=streams.verdict, stderr=streams.judge_err,
                            pass_fds=(requests, replies), start_new_session=True)


def _interpreter() -> str:
    """The interpreter's real file: a venv's ``python`` is a link into a base installation, and
    ``-I`` ignores the venv anyway."""
    return os.path.realpath(sys.executable)


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
    """SIGKILL the process's whole group (it leads its own session, and it is not reaped yet),
    then reap it. For the candidate that also ends its PID namespace: unshare's ``--kill-child``
    takes the namespace's init with it, and the kernel every process left inside."""
    try:
        os.killpg(process.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    process.wait()


def _remove(root: Path) -> None:
    """Delete the throwaway directory, even where the program took away permissions in it. Its
    processes are dead by now; symbolic links are never followed (a chmod through a link the
    program planted would change a file of ours)."""
    for directory, subdirectories, _ in os.walk(root):  # top-down: opened up before it is entered
        for name in subdirectories:
            path = os.path.join(directory, name)
            try:
                if not os.path.islink(path):
                    os.chmod(path, 0o700)
            except OSError:
                pass
    shutil.rmtree(root, ignore_errors=True)
    if root.exists():
        log.warning("could not delete the sandbox directory %s", root)


# ------------------------------------------------------------------------------------ the boundary
@dataclass(frozen=True)
class _Boundary:
    """How this machine starts a program inside the OS-level sandbox (see the module docstring)."""

    unshare: str
    python: str  # the interpreter run inside (its real file)
    prefix: str  # its installation
    hidden: str | None  # the ancestor of ``prefix`` that ``uid`` cannot enter: covered, ``prefix`` re-attached
    uid: int | None  # root: the uid (and gid) the program runs as; None: a user namespace, our own uid

    def command(self, argv: Sequence[str], env: dict[str, str]) -> list[str]:
        """``unshare`` and the preamble that builds a sandbox and then execs ``python argv`` in it
        with the environment ``env``."""
        namespaces = ["--mount", "--net", "--ipc", "--uts", "--pid", "--fork", "--kill-child"]
        if self.uid is None:  # not root: a user namespace grants the right to mount
            namespaces = ["--user", "--map-root-user", *namespaces]
        setup = {"work": SANDBOX_WORK, "work_mb": WORK_LIMIT_MB, "prefix": self.prefix, "hidden": self.hidden,
                 "uid": self.uid, "host_namespaces": _namespace_ids(), "argv": [self.python, *argv], "env": env}
        return [self.unshare, *namespaces, "--", self.python, "-I", "-S", "-B", "-c", _PREAMBLE, json.dumps(setup)]


def _require_boundary(unsafe_code_execution: bool | None) -> _Boundary | None:
    """The sandbox to run model-written code in, or None (the audit hook alone) where none can be
    made and the run accepted that explicitly; otherwise UnsafeCodeRefused, saying why and how."""
    boundary, why = _boundary()
    if boundary is not None:
        return boundary
    if unsafe_code_execution is None:
        unsafe_code_execution = os.environ.get(UNSAFE_ENV) == "1"
    if not unsafe_code_execution:
        raise UnsafeCodeRefused(
            f"refusing to execute model-written code: no OS-level sandbox can be made on this machine ({why}), "
            f"and the in-process audit hook alone does not stop a program written to get past it. Run where "
            f"util-linux unshare may create mount, network and PID namespaces (as root, or with unprivileged "
            f"user namespaces), or accept the risk on a disposable machine: evaluate.unsafe_code_execution: true "
            f"({UNSAFE_ENV}=1)")
    _warn_unsandboxed(why)
    return None


@functools.cache
def _warn_unsandboxed(why: str) -> None:
    log.warning("executing model-written code WITHOUT an OS sandbox (%s): the run opted in to the audit hook "
                "alone", why)


@functools.cache
def _boundary() -> tuple[_Boundary | None, str]:
    """The sandbox this machine allows, probed once per process: ``(boundary, "")``, or
    ``(None, why not)``."""
    unshare = shutil.which("unshare")
    if unshare is None:
        return None, "util-linux unshare is not installed"
    as_root = os.geteuid() == 0
    boundary = _Boundary(unshare=unshare, python=_interpreter(), prefix=sys.base_prefix,
                         hidden=_hidden_ancestor(sys.base_prefix, SANDBOX_UID) if as_root else None,
                         uid=SANDBOX_UID if as_root else None)
    why = _probe(boundary)
    if why:
        log.warning("no OS sandbox for model-written code: %s", why)
        return None, why
    return boundary, ""


def _hidden_ancestor(prefix: str, uid: int) -> str | None:
    """The first directory on the way down to ``prefix`` (itself included) that ``uid`` (also
    the gid) cannot enter, or None."""
    path = Path(prefix)
    for directory in [*reversed(path.parents), path]:
        status = directory.stat()
        bit = 0o100 if status.st_uid == uid else 0o010 if status.st_gid == uid else 0o001
        if not status.st_mode & bit:
            return str(directory)
    return None


def _probe(boundary: _Boundary) -> str:
    """Build the sandbox once and check it from inside (:data:`_PROBE`); "" when it holds, else
    why not."""
    argv = ["-I", "-S", "-B", "-c", _PROBE, str(boundary.uid)]
    try:
        result = subprocess.run(boundary.command(argv, {"PATH": os.defpath}), cwd="/", env={"PATH": os.defpath},
                                stdin=subprocess.DEVNULL, capture_output=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired) as err:
        return f"cannot start {boundary.unshare}: {err}"
    if result.returncode != 0:
        message = result.stderr.decode("utf-8", "replace").strip().splitlines() or [f"exit code {result.returncode}"]
        return f"{Path(boundary.unshare).name} failed: {message[-1][:300]}"
    return ""


def _namespace_ids() -> dict[str, str]:
    """This process's namespaces: the preamble refuses to touch mounts unless its own differ."""
    return {kind: os.readlink(f"/proc/self/ns/{kind}") for kind in ("mnt", "net", "pid", "ipc", "uts")}


# ------------------------------------------------------------------------------------ in-sandbox code
# Standard library only; none of it is imported by the parent. Values between candidate and judge:
# JSON of plain built-in values, containers tagged ({"tuple": [...]}, {"dict": [[key, value], ...]}).
_CODEC = r'''
import json

def encode(value):
    kind = type(value)
    if value is None or kind in (bool, int, float, str):
        return value
    if kind in (list, tuple, set, frozenset):
        return {kind.__name__: [encode(item) for item in value]}
    if kind is dict:
        return {"dict": [[encode(key), encode(item)] for key, item in value.items()]}
    raise TypeError("cannot pass a %s between the program and the tests" % kind.__name__)

_CONTAINERS = {"list": list, "tuple": tuple, "set": set, "frozenset": frozenset}

def decode(data):
    kind = type(data)
    if data is None or kind in (bool, int, float, str):
        return data
    if kind is dict and len(data) == 1:
        (tag, items), = data.items()
        if type(items) is list and tag in _CONTAINERS:
            return _CONTAINERS[tag](decode(item) for item in items)
        if type(items) is list and tag == "dict" and all(type(pair) is list and len(pair) == 2 for pair in items):
            return {decode(key): decode(item) for key, item in items}
    raise ValueError("not an encoded value")
'''

# The candidate: ``python -I -S -B -c _CANDIDATE work memory cpu fsize files processes requests replies``,
# the program on stdin. Sets the limits, installs the audit hook, runs the program in ``work``, says
# {"ready": true} (or {"ready": false, "reason": ...}) on ``replies``, then answers each
# {"call", "args", "kwargs"} line on ``requests`` with {"value": ...} or {"error": reason}.
_CANDIDATE = _CODEC + r'''
import errno, os, resource, sys, traceback

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

def describe(err):
    if isinstance(err, MemoryError):
        return "memory"
    if isinstance(err, OSError) and err.errno == errno.EFBIG:
        return "output too large"
    if isinstance(err, SystemExit):
        return "failed: exited before the tests finished (SystemExit: %r)" % (err.code,)
    try:
        return "failed: " + traceback.format_exception_only(type(err), err)[-1].strip()
    except BaseException:
        return "failed: " + type(err).__name__

def send(fd, message):
    data = (json.dumps(message) + "\n").encode("ascii")
    while data:
        data = data[os.write(fd, data):]

def serve(namespace, requests, replies):
    for line in os.fdopen(requests, "rb"):
        try:
            call = json.loads(line)
            function = namespace.get(call["call"])
            if not callable(function):
                raise NameError("the program defines no function %r" % (call["call"],))
            reply = {"value": encode(function(*decode(call["args"]), **decode(call["kwargs"])))}
        except BaseException as err:
            reply = {"error": describe(err)}
        send(replies, reply)

def _main():
    work, memory, cpu, fsize, files, processes, requests, replies = sys.argv[1:9]
    del sys.argv[1:]
    sys.argv[0] = "<candidate>"
    source = os.fdopen(0, "rb", closefd=False).read().decode("utf-8")
    null = os.open(os.devnull, os.O_RDONLY)
    os.dup2(null, 0)
    os.close(null)
    for name, value in (("RLIMIT_AS", memory), ("RLIMIT_FSIZE", fsize), ("RLIMIT_NOFILE", files), ("RLIMIT_CORE", 0),
                        ("RLIMIT_NPROC", processes)):
        if name != "RLIMIT_NPROC" or int(value):
            resource.setrlimit(getattr(resource, name), (int(value), int(value)))
    resource.setrlimit(resource.RLIMIT_CPU, (int(cpu), int(cpu) + 1))
    os.chdir(work)
    _guard(os.path.realpath(work))
    namespace = {"__name__": "__candidate__", "__builtins__": __builtins__}
    try:
        exec(compile(source, "<candidate>", "exec"), namespace)
        hello = {"ready": True}
    except BaseException as err:
        hello = {"ready": False, "reason": describe(err)}
    send(int(replies), hello)
    if hello["ready"]:
        serve(namespace, int(requests), int(replies))
    os._exit(0)

_main()
'''

# The judge: ``python -I -S -B -c _JUDGE memory cpu requests replies limit``, {"test", "prelude",
# "entry_point"} on stdin. Writes {"passed", "reason", "candidate_gone"} on stdout.
_JUDGE = _CODEC + r'''
import builtins, os, resource, symtable, sys, traceback

class CandidateError(Exception):
    """The candidate's function failed, or its process broke the protocol; the message is the reason."""

class CandidateGone(CandidateError):
    """The candidate's process closed its end of the channel (it exited or was killed)."""

def reason_from(text):
    """A reason the untrusted candidate reported, kept to the scorer's vocabulary."""
    text = str(text)[:300]
    return text if text in ("memory", "output too large") or text.startswith("failed: ") else "failed: " + text

class Channel:
    def __init__(self, requests, replies, limit):
        self.requests, self.replies, self.limit = os.fdopen(requests, "wb"), os.fdopen(replies, "rb"), limit

    def send(self, message):
        try:
            self.requests.write(json.dumps(message).encode("ascii") + b"\n")
            self.requests.flush()
        except BrokenPipeError:
            raise CandidateGone("the program's process is gone") from None

    def receive(self):
        line = self.replies.readline(self.limit)
        if not line:
            raise CandidateGone("the program's process is gone")
        try:
            message = json.loads(line)
        except (ValueError, RecursionError):
            message = None
        if type(message) is not dict:
            raise CandidateError("failed: the program sent a malformed reply")
        return message

def stub(channel, name):
    """Stands for the candidate's function ``name``: each call runs in the candidate's process."""
    def call(*args, **kwargs):
        channel.send({"call": name, "args": encode(list(args)), "kwargs": encode(kwargs)})
        reply = channel.receive()
        if "error" in reply:
            raise CandidateError(reason_from(reply["error"]))
        try:
            return decode(reply["value"])
        except (KeyError, TypeError, ValueError, RecursionError):
            raise CandidateError("failed: the program sent a malformed value") from None
    call.__name__ = call.__qualname__ = name
    return call

def free_names(source):
    """Names the code reads but never binds at module level, builtins excepted."""
    top = symtable.symtable(source, "<test>", "exec")
    bound = {symbol.get_name() for symbol in top.get_symbols()
             if symbol.is_assigned() or symbol.is_imported() or symbol.is_namespace()}
    found, tables = set(), [top]
    while tables:
        table = tables.pop()
        found.update(symbol.get_name() for symbol in table.get_symbols()
                     if symbol.is_referenced() and (table is top or symbol.is_global()))
        tables.extend(table.get_children())
    return found - bound - set(dir(builtins))

def judge(job, channel):
    hello = channel.receive()
    if hello.get("ready") is not True:
        raise CandidateError(reason_from(hello.get("reason", "the program did not load")))
    namespace = {"__name__": "__judge__"}
    exec(compile(job["prelude"], "<prelude>", "exec"), namespace)
    for name in free_names(job["test"]) | {job["entry_point"]} - {None}:
        if name == job["entry_point"] or name not in namespace:
            namespace[name] = stub(channel, name)
    exec(compile(job["test"], "<test>", "exec"), namespace)

def _main():
    memory, cpu, requests, replies, limit = map(int, sys.argv[1:6])
    resource.setrlimit(resource.RLIMIT_AS, (memory, memory))
    resource.setrlimit(resource.RLIMIT_CPU, (cpu, cpu + 1))
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    job = json.load(sys.stdin)
    verdict = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)  # what the tests print goes to stderr, never into the verdict
    gone = False
    try:
        judge(job, Channel(requests, replies, limit))
        passed, reason = True, "passed"
    except CandidateGone as err:
        passed, reason, gone = False, str(err), True
    except CandidateError as err:
        passed, reason = False, str(err)
    except MemoryError:
        passed, reason = False, "memory"
    except BaseException as err:
        passed, reason = False, "failed: " + traceback.format_exception_only(type(err), err)[-1].strip()
    verdict.write(json.dumps({"passed": passed, "reason": reason, "candidate_gone": gone}))
    verdict.flush()
    os._exit(0)

_main()
'''

# The namespaces' init: ``python -I -S -B -c _PREAMBLE setup`` under unshare, as root of its mount
# namespace. Builds the sandbox (see the module docstring), drops privileges and execs
# ``setup["argv"]``; on any error it exits SETUP_FAILED with one line on stderr. Linux >= 5.12
# (open_tree, move_mount and mount_setattr; their numbers are the same on every architecture).
_PREAMBLE = r'''
import ctypes, json, os, sys

AT_FDCWD, AT_EMPTY_PATH, AT_RECURSIVE = -100, 0x1000, 0x8000
OPEN_TREE_CLONE, MOVE_MOUNT_F_EMPTY_PATH = 1, 4
ATTR_RDONLY, ATTR_NOSUID, ATTR_NODEV = 1, 2, 4
MS_RDONLY, MS_NOSUID, MS_NODEV, MS_NOEXEC = 1, 2, 4, 8
SYS_OPEN_TREE, SYS_MOVE_MOUNT, SYS_MOUNT_SETATTR = 428, 429, 442
PR_CAPBSET_DROP, PR_SET_NO_NEW_PRIVS, PR_CAP_AMBIENT, PR_CAP_AMBIENT_CLEAR_ALL = 24, 38, 47, 4
HIDDEN = ("/dev/shm", "/run", "/sys")  # besides the work directory's parent, /tmp: empty read-only tmpfs
libc = ctypes.CDLL(None, use_errno=True)
L = ctypes.c_long

class MountAttr(ctypes.Structure):
    _fields_ = [("attr_set", ctypes.c_uint64), ("attr_clr", ctypes.c_uint64), ("propagation", ctypes.c_uint64),
                ("userns_fd", ctypes.c_uint64)]

def checked(result, what):
    if result < 0:
        code = ctypes.get_errno()
        raise OSError(code, "%s: %s" % (what, os.strerror(code)))
    return result

def detach(path):
    """A detached copy of the mount at ``path`` (taken while the path is still visible)."""
    flags = OPEN_TREE_CLONE | os.O_CLOEXEC
    return checked(libc.syscall(L(SYS_OPEN_TREE), L(AT_FDCWD), os.fsencode(path), L(flags)), "open_tree " + path)

def attach(fd, target):
    checked(libc.syscall(L(SYS_MOVE_MOUNT), L(fd), b"", L(AT_FDCWD), os.fsencode(target), L(MOVE_MOUNT_F_EMPTY_PATH)),
            "move_mount " + target)
    os.close(fd)

def restrict(fd, path, flags, attributes):
    attr = MountAttr(attr_set=attributes)
    checked(libc.syscall(L(SYS_MOUNT_SETATTR), L(fd), os.fsencode(path), L(flags), ctypes.byref(attr),
                         L(ctypes.sizeof(attr))), "mount_setattr " + (path or "fd"))

def mount(fstype, target, flags, data):
    checked(libc.mount(fstype.encode(), target.encode(), fstype.encode(), ctypes.c_ulong(flags), data.encode()),
            "mount %s on %s" % (fstype, target))

def empty_dir(target, read_only=True):
    mount("tmpfs", target, MS_NOSUID | MS_NODEV | MS_NOEXEC | (MS_RDONLY if read_only else 0), "mode=0755,size=64k")

def drop_privileges(uid):
    for cap in range(64):
        if libc.prctl(PR_CAPBSET_DROP, ctypes.c_ulong(cap), 0, 0, 0) < 0:
            break  # past the last capability this kernel knows
    checked(libc.prctl(PR_CAP_AMBIENT, ctypes.c_ulong(PR_CAP_AMBIENT_CLEAR_ALL), 0, 0, 0), "clear ambient caps")
    if uid is not None:
        os.setgroups([])
        os.setresgid(uid, uid, uid)
        os.setresuid(uid, uid, uid)
    checked(libc.prctl(PR_SET_NO_NEW_PRIVS, ctypes.c_ulong(1), 0, 0, 0), "no_new_privs")

def main(setup):
    same = [kind for kind, host in setup["host_namespaces"].items() if os.readlink("/proc/self/ns/" + kind) == host]
    if same:
        raise RuntimeError("still in the host's %s namespace" % ", ".join(same))
    os.umask(0o022)
    prefix = detach(setup["prefix"]) if setup["hidden"] else None
    restrict(AT_FDCWD, "/", AT_RECURSIVE, ATTR_RDONLY | ATTR_NOSUID)
    work, parent = setup["work"], os.path.dirname(setup["work"])
    empty_dir(parent, read_only=False)
    os.mkdir(work)
    owner = "" if setup["uid"] is None else ",uid=%d,gid=%d" % (setup["uid"], setup["uid"])
    mount("tmpfs", work, MS_NOSUID | MS_NODEV, "mode=0700,size=%dm,nr_inodes=4096%s" % (setup["work_mb"], owner))
    restrict(AT_FDCWD, parent, 0, ATTR_RDONLY)
    if prefix is not None:
        restrict(prefix, "", AT_EMPTY_PATH, ATTR_RDONLY | ATTR_NOSUID | ATTR_NODEV)
        empty_dir(setup["hidden"], read_only=False)
        os.makedirs(setup["prefix"], exist_ok=True)
        attach(prefix, setup["prefix"])
        restrict(AT_FDCWD, setup["hidden"], 0, ATTR_RDONLY)
    for path in HIDDEN:
        if os.path.isdir(path) and not os.path.islink(path):
            empty_dir(path)
    proc_flags = MS_RDONLY | MS_NOSUID | MS_NODEV | MS_NOEXEC
    try:
        mount("proc", "/proc", proc_flags, "subset=pid")
    except OSError:  # Linux < 5.8: the whole of a fresh proc, still read-only
        mount("proc", "/proc", proc_flags, "")
    os.chdir(work)
    drop_privileges(setup["uid"])
    os.execve(setup["argv"][0], setup["argv"], setup["env"])

try:
    main(json.loads(sys.argv[1]))
except BaseException as err:
    sys.stderr.write("skymoe sandbox setup failed: %s\n" % (err,))
    sys.stderr.flush()
    os._exit(125)
'''

# Run in a fresh sandbox once per process (``python -I -S -B -c _PROBE uid``): exits non-zero, saying
# why on stderr, unless the sandbox holds.
_PROBE = r'''
import errno, os, socket, sys

def require(condition, what):
    if not condition:
        sys.exit("sandbox probe: " + what)

for path in ("/", "/tmp", "/dev/shm", "/proc"):
    require(os.statvfs(path).f_flag & os.ST_RDONLY, path + " is writable")
with open("probe", "w") as f:
    f.write("the work directory is writable")
lines = open("/proc/self/net/dev").read().splitlines()[2:]
require([line.split(":")[0].strip() for line in lines] == ["lo"], "network interfaces besides lo")
try:
    socket.create_connection(("127.0.0.1", 9), timeout=1).close()
    reachable = True
except OSError as err:
    reachable = err.errno != errno.ENETUNREACH
require(not reachable, "127.0.0.1 is reachable")
require("CapEff:\t0000000000000000" in open("/proc/self/status").read(), "capabilities left")
require(sys.argv[1] == "None" or os.getuid() == os.getgid() == int(sys.argv[1]), "uid is not " + sys.argv[1])
'''
