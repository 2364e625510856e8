"""Rebuild the bundled benchmark subsets (examples/bench) from ../shared/data/bench.

Only the permissively licensed sets are copied: MMLU, GSM8K, MATH, HumanEval, HellaSwag (MIT)
and PIQA (AFL-3.0). C-Eval and CMMLU (CC BY-NC-SA 4.0, non-commercial) are never copied: the
evaluate stage reads them from the shared data folder when ``evaluate.data_dir`` points there.

Every subset is the *first* N rows of the upstream file (lines copied byte-for-byte, header kept
for CSV), in the same layout as the shared folder, so ``skymoe.evaluation.tasks.build_tasks`` reads both
the same way. The SOURCE.md and LICENSE files beside the data are kept by hand and are not
regenerated here.

Usage:
    python examples/bench/make_bench.py [--data ../shared/data/bench]
"""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

HERE = Path(__file__).resolve().parent
DEFAULT_DATA = HERE.parent.parent.parent / "shared" / "data" / "bench"

MMLU_SUBJECTS = ("anatomy", "elementary_mathematics", "high_school_geography", "marketing", "philosophy")
MMLU_TEST_ROWS = 20  # per subject; dev keeps all 5 rows (the 5-shot examples)
GSM8K_TEST_ROWS = 50
GSM8K_TRAIN_ROWS = 10  # the few-shot pool
MATH_SUBJECTS = ("algebra", "number_theory", "prealgebra")
MATH_TEST_ROWS = 15  # per subject; MATH's few-shot examples are the 4 fixed Minerva prompts
HELLASWAG_ROWS = 200
PIQA_ROWS = 200


def head_lines(src: Path, dst: Path, rows: int | None, header: bool = False) -> int:
    """Copy the first ``rows`` lines (plus a header line) of a text file, bytes unchanged."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    with src.open("rb") as fin:
        lines = fin.read().split(b"\n")
    if lines and lines[-1] == b"":
        lines.pop()
    take = lines if rows is None else lines[: rows + int(header)]
    dst.write_bytes(b"".join(line + b"\n" for line in take))
    return len(take) - int(header)


def head_csv(src: Path, dst: Path, rows: int | None) -> int:
    """First ``rows`` records of a CSV file (a quoted field may span lines), bytes unchanged."""
    import csv
    import io

    text = src.read_text(encoding="utf-8")
    reader = csv.reader(io.StringIO(text, newline=""))
    next(reader)
    ends = [reader.line_num]
    for _ in reader:
        ends.append(reader.line_num)
        if rows is not None and len(ends) > rows:
            break
    physical = text.split("\n")
    dst.parent.mkdir(parents=True, exist_ok=True)
    dst.write_text("\n".join(physical[: ends[-1]]) + "\n", encoding="utf-8", newline="")
    return len(ends) - 1


def build(data: Path) -> None:
    out = HERE
    for subject in MMLU_SUBJECTS:
        head_csv(data / f"mmlu/test/{subject}_test.csv", out / f"mmlu/test/{subject}_test.csv", MMLU_TEST_ROWS)
        head_csv(data / f"mmlu/dev/{subject}_dev.csv", out / f"mmlu/dev/{subject}_dev.csv", None)
    head_lines(data / "gsm8k/test.jsonl", out / "gsm8k/test.jsonl", GSM8K_TEST_ROWS)
    head_lines(data / "gsm8k/train.jsonl", out / "gsm8k/train.jsonl", GSM8K_TRAIN_ROWS)
    shutil.copyfile(data / "gsm8k/LICENSE", out / "gsm8k/LICENSE")
    for subject in MATH_SUBJECTS:
        head_lines(data / f"math/jsonl/test_{subject}.jsonl", out / f"math/jsonl/test_{subject}.jsonl", MATH_TEST_ROWS)
    (out / "humaneval").mkdir(parents=True, exist_ok=True)
    shutil.copyfile(data / "humaneval/HumanEval.jsonl.gz", out / "humaneval/HumanEval.jsonl.gz")
    shutil.copyfile(data / "humaneval/LICENSE", out / "humaneval/LICENSE")
    head_lines(data / "hellaswag/hellaswag_val.jsonl", out / "hellaswag/hellaswag_val.jsonl", HELLASWAG_ROWS)
    head_lines(data / "piqa/valid.jsonl", out / "piqa/valid.jsonl", PIQA_ROWS)
    head_lines(data / "piqa/valid-labels.lst", out / "piqa/valid-labels.lst", PIQA_ROWS)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA, help="the shared bench folder")
    args = parser.parse_args()
    if not args.data.is_dir():
        raise SystemExit(f"{args.data}: no such folder")
    build(args.data)


if __name__ == "__main__":
    main()
