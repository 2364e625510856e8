"""Timing of incremental reruns against the full run they extend (printed, never asserted).

Input: the bundled demo corpus (``examples/corpus``) cut into a landing folder of 10 parts per
data file (c4, cmrc2018, zhwiki by lines; the dolma WARC and its small JSONL whole), 32 files in
all. Held back: part 9 of each of c4, cmrc2018 and zhwiki (3 files, ~10% of the data).

Timed, each as the real command in a fresh process (wall clock, Prefect start included):
1. full:  ``skymoe incremental --config tiny --root R --input landing --json`` on the 29 files:
   generation 0, i.e. the whole tiny pipeline (clean, tokenize, train dense + upcycled + scratch, evaluate);
2. no-op: the same command again without ``--json`` (nothing new: answered before Prefect starts,
   "nothing to do"), and the same through the Prefect flow itself (``incremental_flow``, as the
   scheduled deployment runs it);
3. +10%:  the held-back files land, the same command: generation 1 (clean the 3 new files against
   the history, append their tokens, 50 steps of continued training, evaluate).
Targets (issue 6): the no-op under 5% of the full run; the new data's stages (clean + tokenize,
from the manifests' timings) at most 20% of the full run's data stages.

Run: ``python benchmarks/bench_incremental.py [--keep DIR]`` (about 10 minutes on 2 cores).
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from provenance import ROOT, git_state  # benchmarks/provenance.py, beside this script

CORPUS = ROOT / "examples" / "corpus"
SPLIT = ("c4/c4_demo.jsonl", "cmrc2018/cmrc2018_contexts.jsonl", "zhwiki/zhwiki_part1.txt")
WHOLE = ("dolma/cc_en_head-0091.jsonl", "dolma/sample-0000.warc.gz")
PARTS = 10
_FLOW = ("import json, sys; from skymoe.flows.incremental import incremental_flow; "
         "print('RESULT ' + json.dumps(incremental_flow(config_path='tiny', root=sys.argv[1], input_prefix=sys.argv[2])))")


def make_landing(folder: Path, held_back: Path) -> None:
    """Parts 0-8 of each split file (and the whole files) into ``folder``, part 9 into ``held_back``."""
    for name in SPLIT:
        lines = (CORPUS / name).read_text(encoding="utf-8").splitlines()
        per_part = -(-len(lines) // PARTS)
        source, stem = name.split("/")[0], Path(name).stem
        for part in range(PARTS):
            target = (held_back if part == PARTS - 1 else folder) / source / f"{stem}-{part}{Path(name).suffix}"
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_text("\n".join(lines[part * per_part:(part + 1) * per_part]) + "\n", encoding="utf-8")
    for name in WHOLE:
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(CORPUS / name, folder / name)


def timed(command: list[str]) -> tuple[float, str]:
    started = time.monotonic()
    done = subprocess.run(command, capture_output=True, text=True, cwd=ROOT)
    seconds = time.monotonic() - started
    if done.returncode:
        sys.exit(f"failed: {' '.join(command)}\n{done.stderr[-3000:]}")
    return seconds, done.stdout


def data_stage_seconds(root: Path, outputs: dict[str, str]) -> tuple[float, float]:
    """Clean and tokenize seconds of one generation, from the manifests' own timings."""
    clean = json.loads((root / "clean" / outputs["clean"] / "manifest.json").read_text())["timings"]
    tokenize = json.loads((root / "tokenize" / outputs["tokenize"] / "manifest.json").read_text())["timings"]
    return clean["total"], tokenize["tokenizer"] + tokenize["encode"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--keep", type=Path, help="work in this folder and keep it (default: a temp folder)")
    args = parser.parse_args()
    work = args.keep or Path(tempfile.mkdtemp(prefix="skymoe-bench-incremental-"))
    landing, held_back, root = work / "landing", work / "held-back", work / "out"
    make_landing(landing, held_back)
    cli = [sys.executable, "-m", "skymoe.flows.cli", "incremental", "--config", "tiny", "--root", str(root),
           "--input", str(landing)]
    cli_json = [*cli, "--json"]  # stdout is then the flow's summary alone, one JSON object
    files = sum(1 for p in landing.rglob("*") if p.is_file())
    print(f"{git_state(('pipelines', 'flows', 'training', 'evaluation', 'skymoe'))}; {files} files landed, "
          f"{sum(1 for p in held_back.rglob('*') if p.is_file())} held back")

    full_s, out = timed(cli_json)
    first = json.loads(out)
    noop_cli_s, out = timed(cli)
    assert "nothing to do" in out, out
    noop_flow_s, out = timed([sys.executable, "-c", _FLOW, str(root), str(landing)])
    assert '"generation": null' in out, out
    for path in held_back.rglob("*"):
        if path.is_file():
            target = landing / path.relative_to(held_back)
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(path, target)
    increment_s, out = timed(cli_json)
    second = json.loads(out)

    full_clean, full_tokenize = data_stage_seconds(root, first["outputs"])
    new_clean, new_tokenize = data_stage_seconds(root, second["outputs"])
    full_data, new_data = full_clean + full_tokenize, new_clean + new_tokenize
    print(f"{'':<34}{'seconds':>10}{'ratio':>10}  target")
    print(f"{'full tiny run (generation 0)':<34}{full_s:>10.1f}")
    print(f"{'  of which clean + tokenize':<34}{full_data:>10.1f}")
    print(f"{'no-op rerun, CLI':<34}{noop_cli_s:>10.1f}{noop_cli_s / full_s:>10.1%}  < 5% of the full run")
    print(f"{'no-op rerun, Prefect flow':<34}{noop_flow_s:>10.1f}{noop_flow_s / full_s:>10.1%}  < 5% of the full run")
    print(f"{'+10% files, whole generation 1':<34}{increment_s:>10.1f}{increment_s / full_s:>10.1%}")
    print(f"{'  of which clean + tokenize':<34}{new_data:>10.1f}{new_data / full_data:>10.1%}  <= 20% of full data stages")
    print(f"counts of generation 1: {json.dumps({k: v for k, v in second['counts'].items() if k != 'evaluation'})}")
    if not args.keep:
        shutil.rmtree(work)


if __name__ == "__main__":
    main()
