"""Peak memory of the clean stage on one big input file (issue 13, "Streaming I/O").

Input: a single JSONL file of ``--gb`` GB (default 2.0) of web-page-like documents made of real
sentences from the bundled corpus (``examples/corpus``: C4 and Dolma English, CMRC 2018 and zhwiki
Chinese; about 60% English pages by count): a title, sometimes a navigation line, paragraphs of
sentences drawn at random, sometimes a footer; an id and a URL per record. It is generated once
(seeded, about 30 s per GB) and cached in ``--cache`` (default ``/tmp/skymoe-bench-big``); ``--gz``
reads a gzip copy (level 1, cached beside it) instead.

Measured, each in a subprocess whose process tree is polled (psutil, every 0.25 s) for resident
memory (RSS):
1. ``reader``: the cleaning stage's reader alone (``ShardReader`` over the file, every document
   built and dropped), peak RSS and documents/s. ``--reader-module PATH`` measures another reader
   module instead (e.g. the one before streaming, ``git show 7652af8:pipelines/clean/readers.py``).
2. ``stage`` (not with ``--reader-only``): ``skymoe run --until clean`` with a generated config that
   extends the ``tiny`` preset, reads only this file, ``clean.executor.workers: 2``, into a fresh root
   under the cache folder (removed afterwards unless ``--keep``). The stage reads the plain file as
   pieces of ``clean.reader.split_bytes`` (256 MiB: 8 shards for 2 GB), spread over the workers; a
   ``--gz`` file, or one under ``split_bytes``, is one shard, which datatrove runs in the coordinating
   process. Peak RSS of the coordinating process (the ``skymoe`` CLI) and of every other process in its
   tree, by role: ``worker`` (spawned by the executor),
   ``fork`` (idle helpers forked from the coordinator, whose RSS is the coordinator's shared pages: their
   own memory, USS, is printed beside it), the Prefect server; overall and per phase (the phase taken
   from the stage's log lines ``clean/<phase>``), with the phase timings from the stage's manifest.

Target (issue 13): every worker's peak RSS under 1.5 GB (the coordinator counted as a worker),
whatever the file's size.

Run: ``python benchmarks/bench_big_file.py [--gb 2.0] [--gz] [--reader-only] [--keep] [--set KEY=VALUE ...]``.
Validate with ``--gb 0.2`` first (49,491 documents; under ``split_bytes``, so one shard and one worker);
the stage's time grows with the file.
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import random
import re
import resource
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections import defaultdict
from pathlib import Path

from provenance import files_digest, git_state  # benchmarks/provenance.py, beside this script

REPO = Path(__file__).resolve().parents[1]
CORPUS = REPO / "examples" / "corpus"
FORMAT_VERSION = 1  # bump when the generated file changes, so a stale cached file is not reused
TARGET_BYTES = 1.5e9
MEASURED = ("pipelines/clean/readers.py", "pipelines/clean/stage.py", "skymoe/storage.py")
GB = 1e9


# ------------------------------------------------------------------------------------ the input
def sentence_pools() -> tuple[list[str], list[str]]:
    """Real sentences: English from C4 and Dolma, Chinese from CMRC 2018 contexts and zhwiki lines."""
    english, chinese = [], []
    for path in (CORPUS / "c4" / "c4_demo.jsonl", CORPUS / "dolma" / "cc_en_head-0091.jsonl"):
        for line in path.read_text("utf-8").splitlines():
            for paragraph in json.loads(line)["text"].split("\n"):
                english += [s.strip() for s in re.split(r"(?<=[.!?])\s+", paragraph) if len(s.strip()) > 20]
    zh_texts = [json.loads(line)["text"] for line in
                (CORPUS / "cmrc2018" / "cmrc2018_contexts.jsonl").read_text("utf-8").splitlines()]
    zh_texts += (CORPUS / "zhwiki" / "zhwiki_part1.txt").read_text("utf-8").splitlines()
    for text in zh_texts:
        chinese += [s.strip() for s in re.findall(r"[^。！？]+[。！？]", text) if len(s.strip()) > 8]
    return english, chinese


def web_page(rng: random.Random, pool: list[str], zh: bool, number: int) -> dict:
    """One record shaped like an extracted web page: title, paragraphs, some boilerplate."""
    join = "" if zh else " "
    lines = [pool[rng.randrange(len(pool))].rstrip("。.!?！？")]
    if rng.random() < 0.3:
        lines.append("首页 | 新闻 | 关于我们 | 联系我们" if zh else "Home | News | About us | Contact")
    for _ in range(max(1, int(rng.lognormvariate(1.9, 0.7)))):  # median ~7 paragraphs
        lines.append(join.join(pool[rng.randrange(len(pool))] for _ in range(rng.randint(2, 6))))
    if rng.random() < 0.3:
        lines.append(f"© 2024 站点{number % 997}。保留所有权利。" if zh else f"© 2024 Site {number % 997}. All rights reserved.")
    host = f"{'zh' if zh else 'www'}.site{number % 997}.example"
    return {"id": f"big-{number:09d}", "url": f"https://{host}/page/{number}", "text": "\n".join(lines)}


def make_input(gb: float, cache: Path, packed: bool) -> Path:
    """The cached input file (made on first use; written under a temporary name, then renamed)."""
    cache.mkdir(parents=True, exist_ok=True)
    path = cache / f"web-{gb:g}gb-v{FORMAT_VERSION}.jsonl"
    if not path.exists():
        started = time.monotonic()
        english, chinese = sentence_pools()
        rng, target, written, number = random.Random(13), int(gb * GB), 0, 0
        tmp = path.with_suffix(".tmp")
        with open(tmp, "w", encoding="utf-8") as handle:
            while written < target:
                zh = rng.random() < 0.4
                line = json.dumps(web_page(rng, chinese if zh else english, zh, number), ensure_ascii=False) + "\n"
                handle.write(line)
                written += len(line.encode("utf-8"))
                number += 1
        os.replace(tmp, path)
        print(f"made {path} ({number:,} records, {written / GB:.2f} GB) in {time.monotonic() - started:.0f} s")
    if not packed:
        return path
    gz = path.with_name(path.name + ".gz")
    if not gz.exists():
        started = time.monotonic()
        tmp = gz.with_suffix(".tmp")
        with open(path, "rb") as source, gzip.open(tmp, "wb", compresslevel=1) as target:
            shutil.copyfileobj(source, target, 1 << 22)
        os.replace(tmp, gz)
        print(f"made {gz} ({gz.stat().st_size / GB:.2f} GB) in {time.monotonic() - started:.0f} s")
    return gz


# ------------------------------------------------------------------------------------ measuring
class TreeSampler:
    """Polls a process and its descendants for RSS: peak per process, and per (phase, role)."""

    def __init__(self, root_pid: int, interval: float = 0.25):
        import psutil

        self.root = psutil.Process(root_pid)
        self.root_command = " ".join(self.root.cmdline())
        self.interval = interval
        self.phase = "start"
        self.peak: dict[int, int] = defaultdict(int)
        self.label: dict[int, str] = {}
        self.cpu: dict[int, float] = {}
        self.command: dict[int, str] = {}
        self.uss: dict[int, int] = {}
        self.last: dict[int, int] = {}
        self.trend: list[tuple[int, int]] = []
        self.by_phase: dict[str, dict[str, int]] = defaultdict(lambda: defaultdict(int))
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def role(self, process) -> str:
        """coordinator (the CLI process); worker (a process the executor spawned: a fresh interpreter);
        fork (a child forked from the coordinator that never exec'd: an idle helper, no CPU used, whose RSS
        is mostly the coordinator's pages, shared copy-on-write - its own memory, USS, is measured too);
        prefect server; resource tracker; other."""
        if process.pid == self.root.pid:
            return "coordinator"
        if process.pid not in self.label or self.label[process.pid] == "fork":  # a fork may exec later
            try:
                command, parent = " ".join(process.cmdline()), process.ppid()
            except Exception:  # gone already, or not readable yet: asked again at the next sample
                return "other"
            self.command[process.pid] = f"parent {parent}: {command[:90]}"
            if "resource_tracker" in command:
                kind = "resource tracker"
            elif "spawn_main" in command or "forkserver" in command:
                kind = "worker"
            elif "uvicorn" in command or "prefect.server" in command:
                kind = "prefect server"
            elif command == self.root_command:
                kind = "fork"
            else:
                kind = "other"
            self.label[process.pid] = kind
        return self.label[process.pid]

    def _run(self) -> None:
        import psutil

        while not self.stop.is_set():
            try:
                processes = [self.root, *self.root.children(recursive=True)]
            except psutil.Error:
                return
            for process in processes:
                try:
                    rss = process.memory_info().rss
                    self.cpu[process.pid] = sum(process.cpu_times()[:2])
                except psutil.Error:
                    continue
                role = self.role(process)
                self.last[process.pid] = rss
                self.peak[process.pid] = max(self.peak[process.pid], rss)
                if role == "fork":
                    try:
                        self.uss[process.pid] = max(self.uss.get(process.pid, 0), process.memory_full_info().uss)
                    except psutil.Error:
                        pass
                phase = self.by_phase[self.phase]
                phase[role] = max(phase[role], rss)
            self.stop.wait(self.interval)

    def close(self) -> None:
        self.stop.set()
        self.thread.join()


def follow(process: subprocess.Popen, sampler: TreeSampler, log: Path, echo: bool) -> None:
    """Copy the child's output to a log file, noting the stage's phase from ``clean/<phase>`` lines."""
    with open(log, "w", encoding="utf-8") as out:
        for line in process.stdout:
            out.write(line)
            found = re.search(r"\bclean/([a-z_]+)\b", line)
            if found:
                sampler.phase = found.group(1)
            progress = re.search(r"\bclean/filter \S+: (\d+) docs", line)
            if progress:  # the coordinator's RSS as the filter phase goes: flat if it streams
                sampler.trend.append((int(progress.group(1)), sampler.last.get(sampler.root.pid, 0)))
            if echo and ("clean/" in line or "Error" in line or "error" in line):
                print("   |", line.rstrip()[:160], flush=True)


def run_measured(command: list[str], log: Path, echo: bool = False) -> tuple[int, float, TreeSampler]:
    started = time.monotonic()
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=REPO,
                               env={**os.environ, "PYTHONUNBUFFERED": "1"})
    sampler = TreeSampler(process.pid)
    follow(process, sampler, log, echo)
    code = process.wait()
    sampler.close()
    return code, time.monotonic() - started, sampler


def read_only(path: str, module_path: str | None) -> None:
    """(In a subprocess) every document of the file through the reader, built and dropped."""
    import importlib.util

    from skymoe.config import ReaderConfig
    from skymoe.pipelines.clean import readers
    from skymoe.storage import Storage

    if module_path:
        spec = importlib.util.spec_from_file_location("measured_readers", module_path)
        readers = importlib.util.module_from_spec(spec)
        sys.modules["measured_readers"] = readers
        spec.loader.exec_module(readers)
    storage = Storage()
    shards, _ = readers.discover_inputs(storage, [path])
    started = time.monotonic()
    count = rejected = 0
    for doc in readers.ShardReader(shards, ReaderConfig(), storage).run(rank=0):
        count += 1
        rejected += "_reject" in doc.metadata
    seconds = time.monotonic() - started
    print(json.dumps({"docs": count, "rejected": rejected, "seconds": seconds,
                      "ru_maxrss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}))


def self_cpu(sampler: TreeSampler, pid: int) -> str:
    return f"{sampler.cpu.get(pid, 0.0):,.1f} s CPU"


def mb(value: float) -> str:
    return f"{value / 1e6:,.0f} MB"


def report_reader(path: Path, module_path: str | None, cache: Path) -> None:
    command = [sys.executable, __file__, "--_read-only", str(path), *(["--reader-module", module_path] if module_path else [])]
    code, wall, sampler = run_measured(command, cache / "reader.log")
    lines = (cache / "reader.log").read_text().splitlines()
    if code != 0:
        raise SystemExit(f"reader run failed ({code}):\n" + "\n".join(lines[-20:]))
    result = json.loads(lines[-1])
    print(f"reader alone ({module_path or 'pipelines/clean/readers.py'}): {result['docs']:,} documents "
          f"({result['rejected']:,} rejected) in {result['seconds']:.0f} s "
          f"({result['docs'] / result['seconds']:,.0f} docs/s, {path.stat().st_size / GB / result['seconds'] * 1000:.0f} MB/s); "
          f"peak RSS {mb(max(sampler.peak.values()))} (polled), {mb(result['ru_maxrss'])} (ru_maxrss)")


def report_stage(path: Path, cache: Path, workers: int, overrides: list[str], keep: bool) -> bool:
    run_root = Path(tempfile.mkdtemp(prefix="stage-", dir=cache))
    config = run_root / "bench.yaml"
    config.write_text(json.dumps({  # JSON is YAML
        "extends": "tiny", "storage": {"root": str(run_root / "out")},
        "clean": {"inputs": [str(path)], "executor": {"kind": "datatrove", "workers": workers}},
    }, indent=2))
    command = [sys.executable, "-c", "from skymoe.flows.cli import main; main()", "run", "--config", str(config),
               "--until", "clean", *[item for override in overrides for item in ("--set", override)]]
    print(f"stage: {' '.join(command)}  (log: {run_root / 'stage.log'})")
    try:
        code, wall, sampler = run_measured(command, run_root / "stage.log", echo=True)
        if code != 0:
            tail = (run_root / "stage.log").read_text().splitlines()[-25:]
            print(f"stage FAILED (exit {code}) after {wall:.0f} s:\n" + "\n".join(tail))
        manifests = sorted((run_root / "out" / "clean").glob("*/manifest.json"))
        manifest = json.loads(manifests[0].read_text()) if manifests else {}
        print(f"stage wall {wall:.0f} s; counts {json.dumps(manifest.get('counts', {}))[:300]}")
        timings = manifest.get("timings", {})
        roles = sorted({role for phase in sampler.by_phase.values() for role in phase},
                       key=lambda r: (r != "coordinator", r))
        header = ["phase", "time (s)", *[f"{role} peak" for role in roles]]
        rows = [header]
        for phase, peaks in sampler.by_phase.items():
            seconds = timings.get(phase)
            rows.append([phase, f"{seconds:.1f}" if isinstance(seconds, (int, float)) else "-",
                         *[mb(peaks[role]) if role in peaks else "-" for role in roles]])
        widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
        print("\n".join("  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in rows))
        if sampler.trend:
            picks = sorted({round(i * (len(sampler.trend) - 1) / 8) for i in range(9)})
            print("filter phase, coordinator RSS by documents done: " + ", ".join(
                f"{sampler.trend[i][0]:,}: {mb(sampler.trend[i][1])}" for i in picks))
        print("per process (peak RSS):")
        worst = 0
        for pid, peak in sorted(sampler.peak.items(), key=lambda item: -item[1]):
            role = "coordinator" if pid == sampler.root.pid else sampler.label.get(pid, "other")
            own = f" (USS {mb(sampler.uss[pid])})" if pid in sampler.uss else ""
            print(f"  pid {pid:>7}  {role:<16} {mb(peak):>9}{own}  {self_cpu(sampler, pid):>12}  "
                  f"{sampler.command.get(pid, '')}")
            if role in ("coordinator", "worker"):
                worst = max(worst, peak)
        met = worst < TARGET_BYTES
        print(f"target: every worker's peak RSS under {mb(TARGET_BYTES)} (the coordinator counted as one: it runs "
              f"phases with one shard; idle forks are not, their RSS is the coordinator's shared pages): "
              f"worst {mb(worst)} -> {'MET' if met else 'NOT MET'}")
        return code == 0 and met
    finally:
        if not keep:
            shutil.rmtree(run_root, ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--gb", type=float, default=2.0, help="size of the generated JSONL file")
    parser.add_argument("--gz", action="store_true", help="read a gzip copy of the file (.jsonl.gz)")
    parser.add_argument("--cache", type=Path, default=Path(tempfile.gettempdir()) / "skymoe-bench-big")
    parser.add_argument("--workers", type=int, default=2, help="clean.executor.workers")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="passed on to skymoe run")
    parser.add_argument("--reader-only", action="store_true", help="measure the reader alone, not the stage")
    parser.add_argument("--reader-module", help="a readers.py to measure instead of the installed one")
    parser.add_argument("--keep", action="store_true", help="keep the stage output under the cache folder")
    parser.add_argument("--_read-only", dest="read_only", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.read_only:
        read_only(args.read_only, args.reader_module)
        return
    digest = files_digest(MEASURED)
    print(f"{git_state(('pipelines/clean', 'skymoe'))}; sources {digest}; "
          f"load average {os.getloadavg()[0]:.1f}; {os.cpu_count()} CPUs")
    path = make_input(args.gb, args.cache, args.gz)
    print(f"input: {path} ({path.stat().st_size / GB:.2f} GB)")
    report_reader(path, args.reader_module, args.cache)
    ok = True
    if not args.reader_only:
        ok = report_stage(path, args.cache, args.workers, args.overrides, args.keep)
    if files_digest(MEASURED) != digest:
        print(f"WARNING: {', '.join(MEASURED)} changed during the run: the numbers may mix two versions")
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
