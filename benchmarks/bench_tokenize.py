"""Benchmark skymoe's tokenize stage against raw ``tokenizers`` and datatrove, on real documents.

Input: cleaned-format Parquet shards written directly (the clean stage itself is NOT run) from
the real texts in ``examples/corpus``: c4/c4_demo.jsonl (300 English docs), zhwiki/zhwiki_part1.txt
(1500 Chinese articles, one a line) and cmrc2018/cmrc2018_contexts.jsonl (600 Chinese passages),
one shard per source file, in the clean stage's ``DOC_SCHEMA`` (zstd, as the clean stage writes
them) under ``<tmp>/clean/<fake fingerprint>/data/`` with a fake clean manifest (shards entries
``{"path","docs","input"}``, ``extra["input_files"]`` ``[{"uri","source",...}]``). 1x = those 3 shards
(~2.9 MB of UTF-8 text); Nx = the same 3 shards written N times (3N shards, same document ids, so
every copy splits and packs identically).

A byte-level BPE (vocab 4096, ``train_tokenizer``) is trained once on the 1x texts before any
timing, saved with ``save_tokenizer``, and given to every run as a local path:
``tokenize.tokenizer.path`` for skymoe, the ``tokenizer.json`` file for datatrove (a file path, so
datatrove never looks at the hub).

What is timed, each run in a fresh subprocess (interleaved, ``--repeats`` times; medians):
(a) skymoe: the tokenize stage end to end into a fresh root (``STAGE.plan`` + ``run_plan``: plan,
    tokenizer copy, read Parquet, split/shuffle, ``encode_batch_fast`` in batches of ``encode_batch``,
    pack, write Arrow IPC, checksums, mixture chart, manifest),
    ``skymoe.config.load_config()`` defaults (seq_len 256, encode_batch 512; ``tokenize.executor``
    datatrove with 1 worker, i.e. the encode phase in the stage's own process);
(b) raw ``tokenizers``: ``Tokenizer.encode_batch`` over the same texts (already in memory, shard by
    shard, file order) in batches of the same size, reading ``len(e.ids)``; the practical limit;
(c) datatrove 0.10.1: ``ParquetReader`` over the same shards -> ``DocumentTokenizer`` (same
    tokenizer.json, ``eos_token="</s>"``, same batch size, its default document shuffle) into a
    temp folder, under ``LocalPipelineExecutor(tasks=1, workers=1)``; ``executor.run()`` timed.
(b') the raw loop with ``encode_batch_fast`` (what the stage calls: the same ids, no offsets).
(a'') with ``--executor-workers N``: (a) with ``tokenize.executor`` datatrove, N workers and
    ``min_shards_per_worker`` 1, so the encode phase runs in N spawned processes (``map_shards``); its
    cpu and peak memory are the stage's own process only, not its workers'.
Every worker imports its libraries before the clock. Raw and datatrove also import ``pyarrow.dataset``
there (``pq.read_table`` imports it, and pandas, lazily: ~0.2-0.5 s once per process, reported); skymoe
does not, since the stage imports neither: whatever it imports lazily is inside its clock, and the
top-level modules it imported there are listed (matplotlib or pandas there would be a regression).
Tokens = encoded ids + one EOS per document, for all three: skymoe's manifest train + validation
tokens plus dropped (packing tail) tokens; raw: sum of ``len(ids)`` + documents; datatrove: bytes of
its output token files / 2 (uint16). They must agree (datatrove loads the tokenizer with
``Tokenizer.from_file``, which leaves ``encode_special_tokens`` off; a literal ``</s>`` in a text
would make a difference and is reported).

Peak memory: each worker's RSS high-water mark (``VmHWM`` in ``/proc/self/status``) at exit and right
after imports and setup, so the growth due to the work is visible. Not ``ru_maxrss``: Linux carries
it over fork + exec, so a worker (and ``RUSAGE_CHILDREN`` in the parent) would report the parent's
~330 MiB (after training the tokenizer) instead of its own. The stage's unit of work is one
cleaned shard, so skymoe's peak should not grow with the number of shards.

Threads: ``RAYON_NUM_THREADS`` (default: the CPU count) and ``TOKENIZERS_PARALLELISM=true`` are set
here, before ``tokenizers`` is imported, and inherited by every worker.

Run: ``python benchmarks/bench_tokenize.py [--scales 1 4] [--repeats 3] [--executor-workers N]`` (about
2-3 minutes on 2 shared cores).
"""

from __future__ import annotations

import os

os.environ.setdefault("RAYON_NUM_THREADS", str(os.cpu_count() or 1))
os.environ["TOKENIZERS_PARALLELISM"] = "true"

import argparse  # noqa: E402
import hashlib  # noqa: E402
import io  # noqa: E402
import json  # noqa: E402
import platform  # noqa: E402
import resource  # noqa: E402
import statistics  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from provenance import git_state  # noqa: E402  (benchmarks/provenance.py, beside this script)

CORPUS = ROOT / "examples" / "corpus"
# (source folder = the clean stage's source name, file, language, how to read it)
INPUTS = (("c4", "c4_demo.jsonl", "en", "jsonl"), ("zhwiki", "zhwiki_part1.txt", "zh", "lines"),
          ("cmrc2018", "cmrc2018_contexts.jsonl", "zh", "jsonl"))
STAGE_DIR = "pipelines/tokenize"  # the folder of the modules the stage's code version digests (git state)
TOOLS = ("skymoe", "raw", "raw_fast", "datatrove")
WORKERS = "skymoe_workers"
LABELS = {"skymoe": "(a) skymoe tokenize stage (end to end)",
          WORKERS: "(a'') skymoe, encode on N datatrove workers",
          "raw": "(b) raw tokenizers encode_batch",
          "raw_fast": "(b') raw tokenizers encode_batch_fast",
          "datatrove": "(c) datatrove ParquetReader->DocumentTokenizer"}


def sources_digest() -> str:
    """The tokenize stage's code version (``STAGE.code_version``: its modules' source and library
    versions), computed afresh on every call: ``code_version`` is cached per process, and the end
    of a run compares against the start to notice an edit made meanwhile."""
    from skymoe.pipelines.tokenize.stage import STAGE
    from skymoe.stage import code_digest

    return f"{STAGE.name}-{code_digest(STAGE.code, STAGE.libraries)}"


def code_version() -> str:
    """git HEAD, uncommitted changes below pipelines/tokenize, and the stage's code version as read."""
    return f"{git_state((STAGE_DIR,))}; stage code version {sources_digest()}"


def _version(package: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(package)
    except PackageNotFoundError:
        return "?"


# ------------------------------------------------------------------------------ input
def load_documents() -> list[tuple[str, str, str, list[tuple[str, str]]]]:
    """(source, file uri, lang, [(doc id, text)]) per input file, real documents in file order."""
    out = []
    for source, name, lang, kind in INPUTS:
        path = CORPUS / source / name
        docs = []
        with path.open(encoding="utf-8") as f:
            for line_no, line in enumerate(f, 1):
                if not line.strip():
                    continue
                text = json.loads(line)["text"] if kind == "jsonl" else line.rstrip("\n")
                docs.append((f"{source}/{name}:{line_no}", text))
        out.append((source, str(path), lang, docs))
    return out


def write_clean_input(folder: Path, scale: int, documents) -> tuple[str, str, int]:
    """Cleaned-format shards + a fake clean manifest; returns (root, fingerprint, shards)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from skymoe.pipelines.clean.stage import DOC_SCHEMA
    from skymoe.stage import Manifest, StageRef, write_manifest
    from skymoe.storage import Storage

    storage = Storage()
    ref = StageRef(str(folder), "clean", f"bench{scale:012d}x")
    entries, inputs = [], []
    for copy in range(scale):
        for source, uri, lang, docs in documents:
            input_uri = uri if copy == 0 else f"{uri}#copy{copy}"
            shard_id = hashlib.sha1(input_uri.encode("utf-8")).hexdigest()[:12]
            rows = [{"id": doc_id, "text": text, "source": source, "lang": lang, "lang_score": 1.0,
                     "quality_score": 1.0, "url": None} for doc_id, text in docs]
            path = f"data/{shard_id}-0000.parquet"
            buffer = io.BytesIO()
            pq.write_table(pa.Table.from_pylist(rows, schema=DOC_SCHEMA), buffer, compression="zstd")
            storage.write_bytes(ref.path(path), buffer.getvalue())
            entries.append({"path": path, "docs": len(rows), "input": input_uri})
            inputs.append({"uri": input_uri, "shard_id": shard_id, "source": source, "format": "jsonl"})
    write_manifest(storage, ref, Manifest(stage="clean", fingerprint=ref.fingerprint, code_version="bench",
                                          config={}, inputs={}, label="clean", shards=entries,
                                          extra={"input_files": inputs}))
    return str(folder), ref.fingerprint, len(entries)


# ------------------------------------------------------------------------------ workers
def _cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def _hwm_kb() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    return 0


def worker(args) -> dict:
    """One timed run in this (fresh) process; returns seconds, tokens, docs and memory."""
    from skymoe.config import load_config

    # The whole config the stage plans from: defaults, the given tokenizer, the fresh root to write into.
    tokenize: dict = {"tokenizer": {"path": args.tokenizer}}
    if args.worker == WORKERS:
        tokenize["executor"] = {"kind": "datatrove", "workers": args.executor_workers, "min_shards_per_worker": 1}
    pipeline = load_config(None, {"storage": {"root": args.out}, "tokenize": tokenize})
    config = pipeline.tokenize
    warm_import = 0.0
    if args.worker not in ("skymoe", WORKERS):
        # pq.read_table imports pyarrow.dataset (and pandas with it) lazily on first use, ~0.2-0.5 s once per
        # process; raw and datatrove pay that here, before their clock, and report what it cost.
        start = time.perf_counter()
        import pyarrow.dataset  # noqa: F401

        warm_import = time.perf_counter() - start
    clean_root, clean_fp = args.input.split("::")
    data = Path(clean_root) / "clean" / clean_fp / "data"
    result: dict = {}
    if args.worker in ("skymoe", WORKERS):
        from skymoe.pipelines.tokenize import stage
        from skymoe.stage import StageRef, run_plan
        from skymoe.storage import Storage

        clean_ref = StageRef(clean_root, "clean", clean_fp)
        imported = set(sys.modules)
        base, cpu = _hwm_kb(), _cpu_s()
        start = time.perf_counter()
        (plan,) = stage.STAGE.plan(pipeline, Storage(), {"clean": clean_ref})
        res = run_plan(stage.STAGE, plan, Storage())
        seconds = time.perf_counter() - start
        result["lazy_imports"] = sorted({name.split(".")[0] for name in sys.modules}
                                        - {name.split(".")[0] for name in imported})
        c = res.manifest.counts
        tokens = sum(c.get(f"{s}_{k}", 0) for s in ("train", "validation") for k in ("tokens", "dropped_tokens"))
        docs = c.get("train_docs", 0) + c.get("validation_docs", 0)
        result |= {"timings": res.manifest.timings, "files": len(res.manifest.shards),
                   "packed": c.get("train_tokens", 0) + c.get("validation_tokens", 0)}
    elif args.worker in ("raw", "raw_fast"):
        import pyarrow.parquet as pq

        from skymoe.pipelines.tokenize.tokenizer import load_tokenizer
        from skymoe.storage import Storage

        tokenizer = load_tokenizer(Storage(), args.tokenizer)
        shards = [pq.read_table(p, columns=["text"])["text"].to_pylist() for p in sorted(data.glob("*.parquet"))]
        encode = tokenizer.encode_batch if args.worker == "raw" else tokenizer.encode_batch_fast
        base, cpu = _hwm_kb(), _cpu_s()
        start = time.perf_counter()
        tokens = docs = 0
        for texts in shards:
            for i in range(0, len(texts), config.encode_batch):
                tokens += sum(len(e.ids) for e in encode(texts[i : i + config.encode_batch]))
            docs += len(texts)
        tokens += docs  # one EOS per document, as the other two count
        seconds = time.perf_counter() - start
    else:
        from datatrove.executor import LocalPipelineExecutor
        from datatrove.pipeline.readers import ParquetReader
        from datatrove.pipeline.tokens import DocumentTokenizer

        out = Path(args.out)
        executor = LocalPipelineExecutor(
            pipeline=[ParquetReader(str(data), glob_pattern="*.parquet", text_key="text", id_key="id"),
                      DocumentTokenizer(str(out / "tokens"), tokenizer_name_or_path=str(Path(args.tokenizer) /
                                                                                        "tokenizer.json"),
                                        eos_token="</s>", batch_size=config.encode_batch, seed=0)],
            tasks=1, workers=1, logging_dir=str(out / "logs"))
        base, cpu = _hwm_kb(), _cpu_s()
        start = time.perf_counter()
        executor.run()
        seconds = time.perf_counter() - start
        tokens = sum(p.stat().st_size for p in (out / "tokens").glob("*.ds")) // 2
        docs = sum(p.stat().st_size for p in (out / "tokens").glob("*.ds.index")) // 8
    cpu = _cpu_s() - cpu
    # VmHWM, not ru_maxrss: Linux carries ru_maxrss over fork + exec, so a worker would report the
    # parent's footprint (here ~330 MiB after training the tokenizer) whenever that is larger.
    return {"seconds": seconds, "cpu": cpu, "tokens": int(tokens), "docs": int(docs), "peak_kb": _hwm_kb(),
            "base_kb": base, "warm_import": warm_import, **result}


def spawn(tool: str, input_spec: str, tokenizer: str, out: str, executor_workers: int) -> dict:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", tool, "--input", input_spec,
           "--tokenizer", tokenizer, "--out", out, "--executor-workers", str(executor_workers)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    if proc.returncode != 0:
        raise RuntimeError(f"{tool} worker failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


# ------------------------------------------------------------------------------ report
def med(values: list[float]) -> float:
    return statistics.median(values)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--scales", type=int, nargs="+", default=[1, 4], help="corpus copies (1x = the 3 real shards)")
    ap.add_argument("--repeats", type=int, default=3, help="timed runs per tool and scale; medians are reported")
    ap.add_argument("--executor-workers", type=int, default=0,
                    help="also time (a''): the stage with its encode phase on this many spawned datatrove workers")
    ap.add_argument("--worker", choices=(*TOOLS, WORKERS), help=argparse.SUPPRESS)
    ap.add_argument("--input", help=argparse.SUPPRESS)
    ap.add_argument("--tokenizer", help=argparse.SUPPRESS)
    ap.add_argument("--out", help=argparse.SUPPRESS)
    args = ap.parse_args()
    LABELS[WORKERS] = f"(a'') skymoe, encode on {args.executor_workers} datatrove workers"
    if args.worker:
        print(json.dumps(worker(args)))
        return 0
    wall = time.perf_counter()

    from skymoe.pipelines.tokenize.tokenizer import save_tokenizer, train_tokenizer
    from skymoe.config import load_config
    from skymoe.storage import Storage

    version, digest = code_version(), sources_digest()
    defaults = load_config().tokenize
    documents = load_documents()
    texts = [text for _, _, _, docs in documents for _, text in docs]
    n_bytes = sum(len(t.encode("utf-8")) for t in texts)
    print(f"skymoe tokenize benchmark  (python {platform.python_version()}, {platform.machine()}, "
          f"{os.cpu_count()} CPUs, {args.repeats} repeats, medians; every run a fresh subprocess)")
    print(f"skymoe code: {version}; tokenizers {_version('tokenizers')}, pyarrow {_version('pyarrow')}, "
          f"datatrove {_version('datatrove')}")
    print(f"threads: RAYON_NUM_THREADS={os.environ['RAYON_NUM_THREADS']} "
          f"TOKENIZERS_PARALLELISM={os.environ['TOKENIZERS_PARALLELISM']} (all runs)")
    print("input: cleaned-format Parquet shards written directly from the real texts (clean stage NOT run), "
          "DOC_SCHEMA, zstd, fake clean manifest; one shard per source file:")
    for source, uri, lang, docs in documents:
        print(f"  {source:9s} {Path(uri).name:24s} {lang}  {len(docs):5d} docs  "
              f"{sum(len(t.encode('utf-8')) for _, t in docs) / 1e6:.2f} MB")
    print(f"  1x = {len(texts)} docs, {n_bytes / 1e6:.2f} MB UTF-8; Nx = the same shards written N times "
          f"(same ids and texts)")

    with tempfile.TemporaryDirectory(prefix="bench_tokenize_") as tmp:
        tmp_path = Path(tmp)
        start = time.perf_counter()
        tokenizer = train_tokenizer(texts, 4096)
        train_s = time.perf_counter() - start
        tok_dir = str(tmp_path / "tokenizer")
        save_tokenizer(tokenizer, Storage(), tok_dir)
        literal = sum(t.count("</s>") + t.count("<s>") + t.count("<pad>") for t in texts)
        print(f"tokenizer: byte-level BPE trained once on the 1x texts in {train_s:.1f}s (excluded), "
              f"{tokenizer.get_vocab_size()} ids, passed as tokenize.tokenizer.path={Path(tok_dir).name}/ "
              f"(datatrove: its tokenizer.json); literal special-token strings in the texts: {literal}")
        print(f"stage config: load_config() defaults, seq_len {defaults.seq_len}, encode_batch "
              f"{defaults.encode_batch}, sequences_per_file {defaults.sequences_per_file}, validation "
              f"{defaults.validation_permille} permille; batch size {defaults.encode_batch} for (b) and (c)")

        inputs = {}
        for scale in args.scales:
            root, fp, shards = write_clean_input(tmp_path / f"input{scale}x", scale, documents)
            inputs[scale] = (f"{root}::{fp}", shards)

        tools = TOOLS + ((WORKERS,) if args.executor_workers else ())
        runs: dict[tuple[str, int], list[dict]] = {}
        n = 0
        for _ in range(args.repeats):  # interleaved, so machine noise hits every variant alike
            for scale in args.scales:
                for tool in tools:
                    n += 1
                    out = tmp_path / f"out{n}"
                    runs.setdefault((tool, scale), []).append(spawn(tool, inputs[scale][0], tok_dir, str(out),
                                                                    args.executor_workers))
                    subprocess.run(["rm", "-rf", str(out)], check=False)

    print()
    print(f"Throughput (tokens = encoded ids + 1 EOS per document; medians of {args.repeats}; cpu = user+sys "
          f"seconds of the worker process over the timed part)")
    print(f"  {'scale':5s} {'tool':48s} {'docs':>6s} {'tokens':>9s} {'wall s':>7s} {'cpu s':>6s} {'Mtok/s':>7s}  "
          f"per-run wall s")
    rates: dict[tuple[str, int], float] = {}
    for scale in args.scales:
        for tool in tools:
            rs = runs[(tool, scale)]
            secs = [r["seconds"] for r in rs]
            rates[(tool, scale)] = med([r["tokens"] / r["seconds"] for r in rs])
            print(f"  {scale:>4d}x {LABELS[tool]:48s} {rs[0]['docs']:6d} {rs[0]['tokens']:9d} {med(secs):7.3f} "
                  f"{med([r['cpu'] for r in rs]):6.3f} {rates[(tool, scale)] / 1e6:7.3f}  "
                  f"{', '.join(f'{x:.3f}' for x in secs)}")
        sk = runs[("skymoe", scale)]
        tm = {k: med([r["timings"][k] for r in sk]) for k in sk[0]["timings"]}
        print(f"        skymoe manifest timings (medians, s): {tm}; {sk[0]['files']} Arrow files, "
              f"{sk[0]['packed']} tokens packed into rows, {sk[0]['tokens'] - sk[0]['packed']} dropped (row tails)")
        others = [r for tool in ("raw", "datatrove") for r in runs[(tool, scale)]]
        print(f"        before the clock (raw and datatrove workers): import pyarrow.dataset (+ pandas), which "
              f"pq.read_table imports lazily: {med([r['warm_import'] for r in others]):.3f}s median")
        print(f"        imported by the skymoe stage inside its clock (top-level modules): "
              f"{', '.join(sorted({m for r in sk for m in r['lazy_imports']})) or 'none'}")
        toks = {tool: runs[(tool, scale)][0]["tokens"] for tool in tools}
        if len(set(toks.values())) > 1:
            print(f"        NOTE token counts differ: {toks}")

    print()
    print("Side by side: skymoe tokens/s over the other's (ratio of medians; per repeat, by wall time, in brackets)")
    pairs = [("skymoe", "raw", 0.9), ("skymoe", "datatrove", 1.5), ("skymoe", "raw_fast", None)]
    if args.executor_workers:
        pairs += [(WORKERS, "skymoe", None)]
    for mine, other, target in pairs:
        cells = []
        for scale in args.scales:
            ratio = rates[(mine, scale)] / rates[(other, scale)]
            per = [o["seconds"] / m["seconds"] for m, o in zip(runs[(mine, scale)], runs[(other, scale)])]
            verdict = "" if target is None else (" MET" if ratio >= target else " NOT MET")
            cells.append(f"{scale}x {ratio:.2f}{verdict} [{', '.join(f'{x:.2f}' for x in per)}]")
        goal = f" (target >= {target})" if target else ""
        print(f"  {LABELS[mine].split(' ', 1)[0]} / {LABELS[other].split(' ', 1)[0]} {other}{goal}: "
              + ";  ".join(cells))

    print()
    print("Peak memory of the worker process (VmHWM at exit, MiB; medians; 'setup' = VmHWM when the clock starts, "
          "after imports)")
    print(f"  {'tool':48s} " + " ".join(f"{f'{s}x peak':>9s} {f'{s}x setup':>9s}" for s in args.scales))
    for tool in tools:
        cells = []
        for scale in args.scales:
            rs = runs[(tool, scale)]
            cells.append(f"{med([r['peak_kb'] for r in rs]) / 1024:9.0f} {med([r['base_kb'] for r in rs]) / 1024:9.0f}")
        print(f"  {LABELS[tool]:48s} " + " ".join(cells))
    if len(args.scales) > 1:
        lo, hi = min(args.scales), max(args.scales)
        peak = {s: med([r["peak_kb"] for r in runs[("skymoe", s)]]) for s in (lo, hi)}
        grow = {s: med([r["peak_kb"] - r["base_kb"] for r in runs[("skymoe", s)]]) for s in (lo, hi)}
        print(f"  skymoe {lo}x -> {hi}x ({inputs[lo][1]} -> {inputs[hi][1]} shards, {hi // lo}x the data): peak "
              f"{peak[lo] / 1024:.0f} -> {peak[hi] / 1024:.0f} MiB ({peak[hi] / peak[lo]:.2f}x), growth above setup "
              f"{grow[lo] / 1024:.0f} -> {grow[hi] / 1024:.0f} MiB; flat (peak within 1.20x): "
              f"{'YES' if peak[hi] <= 1.20 * peak[lo] else 'NO'}")
        print("  (raw holds every text of the corpus in memory before the clock; datatrove's executor also starts a "
              "multiprocess Manager process, not counted)")
    print()
    if sources_digest() != digest:
        print("WARNING: the tokenize sources changed while this ran; the numbers may mix two versions")
    print(f"Total wall time {time.perf_counter() - wall:.0f}s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
