"""GPU check of the training stack (issue 16 item 5): upcycle a dense model into the MoE, train it
with DeepSpeed on one accelerator, kill the run after its first checkpoint, resume it, and report
tokens/s, MFU, peak memory, the loss curve and whether the resumed run continued it.

What runs is the train stage's own machinery without Prefect or the clean stage:
``skymoe.training.launch.launch`` (torchrun, one rank, ep_size 1, ZeRO-1) on a ``RunSpec`` with
``RunInit("upcycle", <dense weights>)``, as ``training/runs.py``'s ``execute_run`` builds it.

Data: ``--tokens DIR`` reuses a finished tokenize output (its manifest and Arrow shards); without
it, a token folder in the layout the trainer reads (Arrow shards written with the tokenize stage's
``pack``/``rows_table``, a manifest with ``index``, ``mixture``, ``seq_len``, ``token_dtype``) is
generated here from a seeded Markov chain over the vocabulary. That data is SYNTHETIC: loss
figures show the mechanics (it falls, resume continues it), not model quality. The dense weights
are random (seeded), saved as a skymoe weights folder and upcycled by the trainer.

The kill: the launch runs in a child process; once the checkpoint at ``--checkpoint-every`` is
COMPLETE and ``--kill-after`` more steps are logged, the child and every process under it
(torchrun and the rank) get SIGKILL. The relaunch resumes from the latest checkpoint in the run
folder and recomputes the steps after it; their losses are compared with the ones the killed
attempt logged (4 decimals, as the trainer logs them), so the uninterrupted and resumed curves
are compared without a second run.

Reported: tokens/s (median of each attempt's steps after ``--warmup``), MFU as the trainer logged
it per step (``mfu``: PaLM model FLOPs over the data-sheet dense bf16 peak; null on a CPU) and
``mfu_vs_measured_matmul``, peak GPU memory (``nvidia-smi`` memory.used sampled every 0.5 s: the
whole process, CUDA context and allocator cache included; the trainer does not record
``torch.cuda.max_memory_allocated``), first/last loss, start-up, checkpoint-save and resume times.

GPU (normally through ``bash benchmarks/gpu_check.sh``, which installs the carried wheels first):
    python benchmarks/gpu_check.py            # small preset, bf16, 200 steps x 8 x 1024 tokens, kill at 110
    python benchmarks/gpu_check.py --steps 300 --micro-batch 4 --seq-len 2048 --experts 16
CPU smoke test of the same logic (tiny preset, fp32, under a minute on 2 cores):
    python benchmarks/gpu_check.py --smoke
Exit status: 0 when every check passed, 1 when one failed, 2 on a setup error.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import logging
import math
import os
import queue
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

STEP_LINE = re.compile(r"\[rank 0\] \S+ step (\d+)/(\d+) loss (\S+)")
RESUMED_LINE = re.compile(r"\[rank 0\] \S+: resumed from step (\d+)")
ECHO_EVERY = 25  # step lines echoed to the console (all of them go to the log file)


def say(message: str = "") -> None:
    print(message, flush=True)


# ------------------------------------------------------------------------------------------ options
def parse_options(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true",
                        help="CPU smoke test: tiny preset, fp32, 12 steps, seq 64, checkpoint at 6, kill 3 later")
    parser.add_argument("--preset", default=None, choices=["tiny", "small"], help="model preset (default small)")
    parser.add_argument("--experts", type=int, default=None, help="experts per MoE layer (default: the config's)")
    parser.add_argument("--steps", type=int, default=None, help="training steps in all (default 200)")
    parser.add_argument("--micro-batch", type=int, default=None, help="sequences per step (default 8)")
    parser.add_argument("--seq-len", type=int, default=None, help="tokens per sequence (default 1024)")
    parser.add_argument("--checkpoint-every", type=int, default=None,
                        help="steps between checkpoints; the kill follows the first (default steps // 2)")
    parser.add_argument("--kill-after", type=int, default=None,
                        help="steps past the first checkpoint at which the run is killed (default 10)")
    parser.add_argument("--warmup", type=int, default=None, help="steps of each attempt left out of medians")
    parser.add_argument("--precision", default=None, choices=["bf16", "fp32"], help="default bf16 (fp32 smoke)")
    parser.add_argument("--lr", type=float, default=1.8e-3, help="peak learning rate (the upcycled phase's)")
    parser.add_argument("--tokens", default=None, help="a finished tokenize output to train on (else synthetic)")
    parser.add_argument("--work", default=None, help="scratch folder (default: a temporary one, deleted)")
    parser.add_argument("--keep", action="store_true", help="keep the scratch folder")
    parser.add_argument("--log", default=None, help="file for every line the ranks print (default in --work; "
                        "$OUT/gpu_check.log when OUT is set)")
    parser.add_argument("--device-check-off", action="store_true",
                        help="run without a GPU (implied by --smoke); MFU is then n/a")
    parser.add_argument("--deadline-s", type=float, default=420,
                        help="wall-clock limit for the whole check; past it the run is stopped and what was "
                             "measured so far is reported (default 420)")
    parser.add_argument("--child", nargs=2, metavar=("SPEC", "PARALLEL"), help=argparse.SUPPRESS)
    options = parser.parse_args(argv)
    smoke = options.smoke
    defaults = {"preset": "tiny" if smoke else "small", "steps": 12 if smoke else 200,
                "micro_batch": 4 if smoke else 8, "seq_len": 64 if smoke else 1024,
                "kill_after": 3 if smoke else 10, "warmup": 1 if smoke else 10,
                "precision": "fp32" if smoke else "bf16"}
    for key, value in defaults.items():
        if getattr(options, key) is None:
            setattr(options, key, value)
    if options.checkpoint_every is None:
        options.checkpoint_every = max(1, options.steps // 2)
    if smoke:
        options.device_check_off = True
    if not 0 < options.checkpoint_every + options.kill_after < options.steps:
        parser.error(f"the kill (step {options.checkpoint_every} + {options.kill_after}) must come before the "
                     f"last step ({options.steps})")
    return options


# ------------------------------------------------------------------------------------------ child
def child_main(spec_path: str, parallel_path: str) -> None:
    """One launch (torchrun + ranks) in its own process, so the parent can kill the whole tree."""
    from skymoe.config import ParallelConfig
    from skymoe.training.launch import launch
    from skymoe.training.spec import RunSpec

    handler = logging.StreamHandler(sys.stdout)
    handler.setFormatter(logging.Formatter("%(message)s"))
    train_log = logging.getLogger("skymoe.train")
    train_log.addHandler(handler)
    train_log.setLevel(logging.DEBUG)  # the ranks' non-"[rank" lines (DeepSpeed's own) are debug
    spec = RunSpec.read(Path(spec_path))
    parallel = ParallelConfig(**json.loads(Path(parallel_path).read_text()))
    launch(spec, parallel, Path(spec_path).parent)


# ------------------------------------------------------------------------------------------ data
def synthetic_tokens(folder: Path, rows_needed: int, seq_len: int, vocab: int, seed: int = 0) -> dict[str, Any]:
    """A token folder the trainer reads: pseudo-text from a seeded Markov chain (each id has 4
    Zipf-drawn successors, taken with probabilities .6/.25/.1/.05), documents of varied length
    packed with EOS (id 0) by the tokenize stage's own packing into Arrow IPC shards, and a manifest."""
    import numpy as np
    import pyarrow.ipc as ipc

    from skymoe.pipelines.tokenize.mixture import repeat_factors
    from skymoe.pipelines.tokenize.packing import pack, rows_table
    from skymoe.stage import MANIFEST, Manifest

    rng = np.random.default_rng(seed)
    dtype = np.uint16 if vocab <= 2**16 else np.uint32
    ranks = np.arange(1, vocab, dtype=np.float64)
    zipf = (1 / ranks) / (1 / ranks).sum()
    successors = rng.choice(np.arange(1, vocab), size=(vocab, 4), p=zipf).astype(np.int64)
    row_len = seq_len + 1
    tokens_needed = rows_needed * row_len + row_len
    streams = 1024
    length = max(2 * row_len, -(-tokens_needed // streams) + row_len)
    chain = np.empty((length, streams), dtype=np.int64)
    chain[0] = rng.choice(np.arange(1, vocab), size=streams, p=zipf)
    picks = rng.choice(4, size=(length, streams), p=[0.6, 0.25, 0.1, 0.05])
    for t in range(1, length):
        chain[t] = successors[chain[t - 1], picks[t]]
    doc_lengths = rng.integers(length // 2, length + 1, size=streams)
    ids = np.concatenate([chain[:n, i] for i, n in enumerate(doc_lengths)]).astype(dtype)
    rows = pack(ids, doc_lengths, 0, row_len, dtype)
    count = min(len(rows.ids), rows_needed)
    per_file = 4096
    index = []
    for part, start in enumerate(range(0, count, per_file)):
        stop = min(start + per_file, count)
        table = rows_table(rows, "en", "synthetic", start, stop)
        path = f"train/synthetic-en-{part:04d}.arrow"
        (folder / "train").mkdir(parents=True, exist_ok=True)
        with open(folder / path, "wb") as handle, ipc.new_file(handle, table.schema) as writer:
            writer.write_table(table)
        index.append({"path": path, "split": "train", "lang": "en", "source": "synthetic",
                      "sequences": stop - start, "tokens": (stop - start) * row_len})
    tokens = sum(entry["tokens"] for entry in index)
    manifest = Manifest(stage="tokenize", fingerprint="synthetic-gpu-check", code_version="gpu_check",
                        config={"synthetic": True, "seed": seed, "seq_len": seq_len, "vocab_size": vocab},
                        inputs={}, label="synthetic tokens (benchmarks/gpu_check.py)",
                        counts={"train_sequences": count, "train_tokens": tokens},
                        extra={"index": index, "mixture": repeat_factors({"en/synthetic": tokens}, {}, 5.0),
                               "seq_len": seq_len, "token_dtype": np.dtype(dtype).name, "vocab_size": vocab,
                               "tokenizer": None, "synthetic": True})
    (folder / MANIFEST).write_text(manifest.to_json(), encoding="utf-8")
    return {"sequences": count, "tokens": tokens, "files": len(index)}


# ------------------------------------------------------------------------------------------ processes
def descendants(pid: int) -> list[int]:
    """Every live process under ``pid`` (torchrun starts its ranks in new sessions, so a process
    group kill would miss them); read from /proc."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        ppid = int(stat[stat.rindex(")") + 2 :].split()[1])
        children.setdefault(ppid, []).append(int(entry))
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat[stat.rindex(")") + 2] != "Z"


class MemorySampler:
    """Peak of ``nvidia-smi``'s memory.used (MiB) over all GPUs, sampled in a thread."""

    def __init__(self, every_s: float = 0.5):
        self.every_s = every_s
        self.peak_mib: int | None = None
        self.available = shutil.which("nvidia-smi") is not None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def start(self) -> "MemorySampler":
        if self.available:
            self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                out = subprocess.run(["nvidia-smi", "--query-gpu=memory.used", "--format=csv,noheader,nounits"],
                                     capture_output=True, text=True, timeout=10).stdout
                used = max(int(float(v)) for v in out.split())
                self.peak_mib = used if self.peak_mib is None else max(self.peak_mib, used)
            except (OSError, ValueError, subprocess.SubprocessError):
                pass
            self._stop.wait(self.every_s)

    def stop(self) -> None:
        self._stop.set()


class Attempt:
    """One launch of the run in a child process, its output parsed as it comes."""

    def __init__(self, name: str, spec_path: Path, parallel_path: Path, log_file, env: dict[str, str]):
        self.name = name
        self.log_file = log_file
        self.started = time.monotonic()
        self.proc = subprocess.Popen([sys.executable, os.path.abspath(__file__), "--child", str(spec_path),
                                      str(parallel_path)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                     text=True, env=env, start_new_session=True)
        self.lines: queue.Queue[str | None] = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()
        self.losses: dict[int, str] = {}  # step -> the loss as logged (4 decimals)
        self.step_times: dict[int, float] = {}  # step -> seconds since launch when its line arrived
        self.resumed_from: int | None = None
        self.tail: list[str] = []
        self.killed_at: int | None = None
        self.killed_pids: list[int] = []
        self.returncode: int | None = None

    def _read(self) -> None:
        for line in self.proc.stdout:
            self.lines.put(line.rstrip("\n"))
        self.lines.put(None)

    def pump(self, timeout: float) -> bool:
        """Handle the next line, waiting at most ``timeout`` s for it; False once the output has ended.
        One line at a time, so the caller's kill condition is checked after every step line."""
        try:
            line = self.lines.get(timeout=timeout)
        except queue.Empty:
            return True
        if line is None:
            self.returncode = self.proc.wait()
            return False
        self._handle(line)
        return True

    def _handle(self, line: str) -> None:
        now = time.monotonic() - self.started
        self.log_file.write(f"[{self.name} {now:7.1f}s] {line}\n")
        self.log_file.flush()
        self.tail = (self.tail + [line])[-40:]
        if match := STEP_LINE.search(line):
            step, total = int(match.group(1)), int(match.group(2))
            self.losses[step] = match.group(3)
            self.step_times[step] = now
            if step == 1 or step % ECHO_EVERY == 0 or step == total:
                say(f"  [{self.name} {now:6.1f}s] {line.split('] ', 1)[1]}")
        elif match := RESUMED_LINE.search(line):
            self.resumed_from = int(match.group(1))
            say(f"  [{self.name} {now:6.1f}s] {line.split('] ', 1)[1]}")
        elif line.startswith("[rank 0]") and ("MFU against" in line or "deleted checkpoints" in line):
            say(f"  [{self.name} {now:6.1f}s] {line.split('] ', 1)[1]}")

    @property
    def last_step(self) -> int:
        return max(self.losses, default=0)

    def kill(self) -> list[int]:
        """SIGKILL the child and everything under it, as a crash or a lost node would."""
        pids = descendants(self.proc.pid) + [self.proc.pid]
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        self.killed_at = self.last_step
        self.killed_pids = pids
        return pids

    def drain(self, timeout: float = 60.0) -> None:
        """Read what is left after a kill (bounded: a survivor holding the pipe must not hang us)."""
        stop = time.monotonic() + timeout
        while time.monotonic() < stop and self.pump(1.0):
            pass


# ------------------------------------------------------------------------------------------ main
def main(options: argparse.Namespace) -> int:
    began = time.monotonic()
    deadline = began + options.deadline_s
    import torch

    from skymoe.config import PhaseConfig, StorageConfig, TrainConfig
    from skymoe.storage import Storage
    from skymoe.stage import MANIFEST, Manifest
    from skymoe.training.model import Transformer, parameter_counts
    from skymoe.training.presets import PRESETS, dense_shape, with_moe
    from skymoe.training.spec import RunInit, RunSpec
    from skymoe.training.upcycle import dense_args
    from skymoe.training.weights import save_args, save_part

    # deepspeed is not imported here (its version is read from the metadata): this process should
    # hold no CUDA context, so that the sampled GPU memory is the rank's alone.
    cuda = torch.cuda.is_available()
    say("== gpu_check: upcycle -> MoE training -> kill -> resume")
    say(f"python {sys.version.split()[0]}, torch {torch.__version__} (CUDA {torch.version.cuda}), deepspeed "
        f"{importlib.metadata.version('deepspeed')}, skymoe from {Path(sys.modules['skymoe'].__file__).parent}")
    if cuda:
        # Named through nvidia-smi: torch.cuda.get_device_name would initialise CUDA in this process,
        # whose context would then count in the memory sampled for the rank.
        name = subprocess.run(["nvidia-smi", "--query-gpu=name,memory.total", "--format=csv,noheader"],
                              capture_output=True, text=True).stdout.strip() if shutil.which("nvidia-smi") else "?"
        say(f"device: {name} ({torch.cuda.device_count()} visible to torch; the run uses 1)")
    elif not options.device_check_off:
        say("ERROR: no CUDA device; use --device-check-off (or --smoke) to run the logic on the CPU")
        return 2
    else:
        say("device: CPU (no CUDA): the logic is checked, speed and MFU are not meaningful")

    work = Path(options.work) if options.work else Path(tempfile.mkdtemp(prefix="gpu-check-"))
    work.mkdir(parents=True, exist_ok=True)
    out_dir = os.environ.get("OUT")
    log_path = Path(options.log) if options.log else (Path(out_dir, "gpu_check.log") if out_dir
                                                       else work / "gpu_check.log")
    log_path.parent.mkdir(parents=True, exist_ok=True)
    say(f"work folder {work}; full rank output in {log_path}")

    # ---- tokens
    started = time.monotonic()
    if options.tokens:
        tokens_dir = Path(options.tokens).resolve()
        manifest = Manifest.from_json((tokens_dir / MANIFEST).read_text(encoding="utf-8"))
        seq_len, vocab = int(manifest.extra["seq_len"]), int(manifest.extra["vocab_size"])
        synthetic = bool(manifest.extra.get("synthetic"))
        say(f"tokens: {tokens_dir} (seq_len {seq_len}, vocab {vocab}; --seq-len is ignored)")
    else:
        seq_len, synthetic = options.seq_len, True
        vocab = PRESETS[options.preset]["vocab_size"]
        tokens_dir = work / "tokens"
        made = synthetic_tokens(tokens_dir, options.steps * options.micro_batch + 64, seq_len, vocab)
        say(f"tokens: SYNTHETIC Markov-chain pseudo-text, {made['sequences']:,} sequences x {seq_len + 1} ids "
            f"({made['tokens'] / 1e6:.1f}M tokens, vocab {vocab}, {made['files']} Arrow files) in "
            f"{time.monotonic() - started:.1f}s: losses show mechanics, not model quality")

    # ---- config, shapes, dense weights
    moe_cfg = {"num_experts": options.experts} if options.experts else {}
    train = TrainConfig(
        model={"preset": options.preset}, moe=moe_cfg, scratch=None,
        upcycled=PhaseConfig(steps=options.steps, lr=options.lr, min_lr=min(options.lr, 3e-4),
                             warmup_steps=min(10, options.steps // 4)),
        parallel={"world_size": 1, "ep_size": 1, "zero_stage": 1, "precision": options.precision,
                  "launcher": "torchrun"},
        micro_batch_size=options.micro_batch, grad_accum=1, checkpoint_every=options.checkpoint_every,
        keep_checkpoints=1, log_every=1, eval_every=10**6, similarity_every=10**6)
    moe_args = with_moe(dense_shape(train, seq_len, vocab), train.moe)
    dense = dense_args(moe_args)
    counts = parameter_counts(moe_args)
    say(f"model: preset {options.preset}, {moe_args.n_layers} layers, dim {moe_args.dim}, "
        f"{moe_args.num_experts} experts top-{moe_args.top_k} (capacity factor {moe_args.capacity_factor}), "
        f"{counts['total'] / 1e9:.3f}B parameters ({counts['activated'] / 1e9:.3f}B activated), "
        f"dense source {parameter_counts(dense)['total'] / 1e9:.3f}B")
    say(f"run: {options.steps} steps x {options.micro_batch} x {seq_len} tokens, {options.precision}, "
        f"1 rank (ep_size 1, ZeRO-1, torchrun), checkpoint every {options.checkpoint_every}, kill at step "
        f"{options.checkpoint_every + options.kill_after}, then resume")

    started = time.monotonic()
    dense_uri = str(work / "dense" / "weights")
    storage = Storage.from_config(StorageConfig(root=str(work)))
    torch.manual_seed(train.seed)
    model = Transformer(dense)
    save_part(storage, dense_uri, "shared", model.state_dict())
    save_args(storage, dense_uri, dense)
    del model
    say(f"dense weights: random (seed {train.seed}), written in {time.monotonic() - started:.1f}s")

    run_dir = work / "run"
    if run_dir.exists():
        shutil.rmtree(run_dir)  # a kept --work from an earlier check would be resumed, not started
    spec = RunSpec(name="upcycled", run_uri=str(run_dir), tokens_uri=str(tokens_dir), model=moe_args.to_dict(),
                   init=RunInit("upcycle", dense_uri), phase=train.upcycled.model_dump(mode="json"),
                   train=train.model_dump(mode="json"), storage={}, local_dir=str(work / "local"))
    specs = work / "specs"
    specs.mkdir(exist_ok=True)
    spec_path, parallel_path = specs / "gpu-check-spec.json", specs / "gpu-check-parallel.json"
    spec.write(spec_path)
    parallel_path.write_text(json.dumps(train.parallel.model_dump(mode="json")))
    env = dict(os.environ, PYTHONUNBUFFERED="1")

    kill_step = options.checkpoint_every + options.kill_after
    sampler = MemorySampler().start()
    failures: list[str] = []
    attempts: list[Attempt] = []
    with open(log_path, "a", encoding="utf-8") as log_file:
        # ---- attempt 1: until the kill
        say(f"-- attempt 1 (killed after step {kill_step})")
        first = Attempt("run-1", spec_path, parallel_path, log_file, env)
        attempts.append(first)
        checkpoint_seen_at: float | None = None
        while first.pump(0.5):
            # A checkpoint counts once its COMPLETE marker exists (training/checkpoint.py); which
            # step it was is checked later by the step the relaunch says it resumed from.
            if checkpoint_seen_at is None and any(run_dir.glob("**/COMPLETE")):
                checkpoint_seen_at = time.monotonic() - first.started
                say(f"  [run-1 {checkpoint_seen_at:6.1f}s] checkpoint step {options.checkpoint_every} COMPLETE")
            if checkpoint_seen_at is not None and first.last_step >= kill_step:
                pids = first.kill()
                say(f"  [run-1 {time.monotonic() - first.started:6.1f}s] SIGKILL to {len(pids)} processes "
                    f"(launcher child, torchrun, rank) at logged step {first.killed_at}")
                first.drain()
                break
            if time.monotonic() > deadline:
                first.kill()
                first.drain()
                failures.append(f"deadline ({options.deadline_s:.0f}s) passed during attempt 1")
                break
        if first.killed_at is None and not failures:
            failures.append(f"attempt 1 ended (status {first.returncode}) before the kill at step {kill_step}")
            say("\n".join(first.tail[-25:]))
        time.sleep(1.0)
        # By the pids killed: survivors would have been re-parented away from the child by now.
        leftovers = [pid for pid in first.killed_pids if alive(pid)]
        if leftovers:
            failures.append(f"processes left after the kill: {leftovers}")

        # ---- attempt 2: resume to the end
        if not failures:
            say("-- attempt 2 (resume from the latest complete checkpoint)")
            second = Attempt("run-2", spec_path, parallel_path, log_file, env)
            attempts.append(second)
            while second.pump(0.5):
                if time.monotonic() > deadline:
                    second.kill()
                    second.drain()
                    failures.append(f"deadline ({options.deadline_s:.0f}s) passed during attempt 2")
                    break
            if second.returncode not in (0, None) and second.killed_at is None:
                failures.append(f"attempt 2 failed with status {second.returncode}")
                say("\n".join(second.tail[-25:]))
    sampler.stop()

    summary = summarize(options, attempts, run_dir, failures, counts, synthetic, sampler, cuda,
                        time.monotonic() - began)
    if out_dir:
        Path(out_dir, "gpu_check_summary.json").write_text(json.dumps(summary, indent=1))
        metrics = run_dir / "metrics.jsonl"
        if metrics.exists():
            shutil.copy(metrics, Path(out_dir, "gpu_check_metrics.jsonl"))
    if not options.work and not options.keep:
        shutil.rmtree(work, ignore_errors=True)
    elif options.keep or options.work:
        say(f"kept {work}")
    return 1 if summary["failures"] else 0


def summarize(options, attempts: list[Attempt], run_dir: Path, failures: list[str], counts: dict, synthetic: bool,
              sampler: MemorySampler, cuda: bool, wall_s: float) -> dict[str, Any]:
    metrics_path = run_dir / "metrics.jsonl"
    rows = [json.loads(line) for line in metrics_path.read_text().splitlines()] if metrics_path.exists() else []
    rows = [row for row in rows if "loss" in row]
    first = attempts[0] if attempts else None
    second = attempts[1] if len(attempts) > 1 else None
    resumed_from = second.resumed_from if second else None
    say("")
    say("== summary" + (" (SYNTHETIC data: losses show mechanics, not quality)" if synthetic else ""))
    summary: dict[str, Any] = {"steps": options.steps, "micro_batch": options.micro_batch,
                               "precision": options.precision, "params_total": counts["total"],
                               "params_activated": counts["activated"], "synthetic_data": synthetic,
                               "wall_s": round(wall_s, 1)}

    # The step counter: the final metrics must hold steps 1..N once each, the resume must start
    # right after the first checkpoint.
    steps = [row["step"] for row in rows]
    complete = steps == list(range(1, options.steps + 1))
    summary["steps_complete"] = complete
    summary["resumed_from"] = resumed_from
    if second is not None:
        if resumed_from != options.checkpoint_every:
            failures.append(f"attempt 2 resumed from {resumed_from}, expected step {options.checkpoint_every}")
        if not complete:
            failures.append(f"metrics.jsonl steps are not 1..{options.steps} once each "
                            f"(got {len(steps)} rows, {steps[:3]}...{steps[-3:]})")
    say(f"step counter: resumed from step {resumed_from} (first checkpoint {options.checkpoint_every}), "
        f"final metrics hold steps {steps[0] if steps else '-'}..{steps[-1] if steps else '-'} "
        f"({len(steps)} rows) -> {'continuous' if complete else 'NOT continuous'}")

    # The resumed curve against the killed attempt's own losses for the same steps.
    if first is not None and first.killed_at is not None and rows:
        logged = {step: loss for step, loss in first.losses.items() if step > options.checkpoint_every}
        by_step = {row["step"]: row["loss"] for row in rows}
        # Both as the trainer logs them (4 decimals), so a bit-exact resume shows a difference of 0.
        pairs = [(step, float(loss), round(by_step[step], 4)) for step, loss in sorted(logged.items())
                 if step in by_step]
        diffs = [abs(a - b) for _, a, b in pairs]
        worst = round(max(diffs, default=math.nan), 4)
        # fp32 on a CPU resumes bit for bit (RNG state is checkpointed); bf16 on a GPU is not
        # bit-deterministic (atomic adds in backward kernels), so there "continues" means close.
        tolerance = 0.0 if options.precision == "fp32" and not cuda else 0.05
        summary["resume_compare"] = {"steps": [p[0] for p in pairs], "killed_run": [p[1] for p in pairs],
                                     "resumed_run": [p[2] for p in pairs], "max_abs_diff": worst,
                                     "tolerance": tolerance}
        say(f"resume vs uninterrupted (steps {pairs[0][0] if pairs else '-'}..{pairs[-1][0] if pairs else '-'}: "
            f"the killed run's own losses vs the resumed run's recomputation): max |loss diff| {worst:.4f} at 4 "
            f"decimals ({'identical' if worst == 0 else f'tolerance {tolerance:g}'})")
        for step, a, b in pairs[:3] + (pairs[-2:] if len(pairs) > 5 else []):
            say(f"    step {step}: killed run {a:.4f}, resumed run {b:.4f}")
        if first.killed_at >= options.steps:
            failures.append(f"the kill came after the last step ({first.killed_at}): raise --steps")
        if not pairs:
            failures.append("no steps after the checkpoint to compare (kill came too early)")
        elif not worst <= tolerance:
            failures.append(f"resumed losses differ from the killed run's by {worst:.4f} > {tolerance:g}")
        before = by_step.get(options.checkpoint_every)
        after = by_step.get(options.checkpoint_every + 1)
        if before is not None and after is not None:
            say(f"    around the checkpoint: step {options.checkpoint_every} {before:.4f} (saved), "
                f"step {options.checkpoint_every + 1} {after:.4f} (first resumed step)")

    if rows:
        summary["loss_first"], summary["loss_last"] = rows[0]["loss"], rows[-1]["loss"]
        say(f"loss: step 1 {rows[0]['loss']:.4f} -> step {rows[-1]['step']} {rows[-1]['loss']:.4f}")
        if not rows[-1]["loss"] < rows[0]["loss"]:
            failures.append("the loss did not fall")
        if any(not math.isfinite(row["loss"]) for row in rows):
            failures.append("non-finite losses")

    # Speed: per attempt, the steps it ran itself after its warm-up.
    for label, lo, hi in (("attempt 1", 1, options.checkpoint_every),
                          ("attempt 2", options.checkpoint_every + 1, options.steps)):
        part = [row for row in rows if lo <= row["step"] <= hi][options.warmup:]
        if not part:
            continue
        tps = statistics.median(row["tokens_per_s"] for row in part)
        mfu = [row["mfu"] for row in part if row.get("mfu") is not None]
        vs_matmul = statistics.median(row["mfu_vs_measured_matmul"] for row in part)
        key = label.replace(" ", "_")
        summary[key] = {"steps": f"{part[0]['step']}..{part[-1]['step']}", "tokens_per_s": tps,
                        "mfu": statistics.median(mfu) if mfu else None, "peak_tflops": part[-1].get("peak_tflops"),
                        "mfu_vs_measured_matmul": vs_matmul,
                        "model_tflops_per_step": part[-1]["model_flops"] / 1e12}
        mfu_text = (f"MFU {statistics.median(mfu):.1%} of {part[-1]['peak_tflops']:g} TFLOP/s data-sheet peak"
                    if mfu else "MFU n/a (no data-sheet peak for this device)")
        say(f"{label} steps {part[0]['step']}..{part[-1]['step']}: {tps:,.0f} tokens/s (median), {mfu_text}, "
            f"{vs_matmul:.1%} of the start-up matmul rate (trainer's metrics.jsonl)")

    for attempt in attempts:
        times = attempt.step_times
        if not times:
            continue
        first_step = min(times)
        line = f"{attempt.name}: first step line after {times[first_step]:.1f}s (launch, imports, model build"
        line += ", upcycle" if attempt is first else ", checkpoint load"
        line += ", engine)"
        gap_step = options.checkpoint_every
        if attempt is first and gap_step in times and gap_step + 1 in times:
            line += f"; checkpoint save ~{times[gap_step + 1] - times[gap_step]:.1f}s (step {gap_step}->{gap_step + 1})"
        summary[f"{attempt.name}_startup_s"] = round(times[first_step], 1)
        say(line)
    if sampler.peak_mib is not None:
        summary["peak_gpu_memory_mib"] = sampler.peak_mib
        say(f"peak GPU memory: {sampler.peak_mib:,} MiB (nvidia-smi memory.used, sampled every 0.5 s: the whole "
            "process incl. CUDA context and allocator cache)")
    else:
        say("peak GPU memory: n/a (no nvidia-smi; the trainer does not record torch.cuda.max_memory_allocated)")
    summary["failures"] = failures
    say(f"wall: {wall_s:.0f}s")
    say("RESULT: " + ("PASS" if not failures else "FAIL: " + "; ".join(failures)))
    return summary


if __name__ == "__main__":
    opts = parse_options()
    if opts.child:
        child_main(*opts.child)
    else:
        sys.exit(main(opts))
