#!/usr/bin/env bash
# GPU check (issue 16 item 5): on a machine with a GPU and NO registry access, install the carried
# wheels that are missing, print the machine, then run benchmarks/gpu_check.py: the small preset's
# dense random weights upcycled into the MoE, trained in bf16 on one GPU (DeepSpeed, torchrun,
# world_size 1, ep_size 1), killed after its first checkpoint, resumed, and summarized (tokens/s,
# MFU as the trainer logs it, peak GPU memory, losses, resume continuity). Data is synthetic.
# Sized to stay under 8 minutes wall on an H100/H200 (not yet measured there); the driver stops itself
# at --deadline-s (420 s) and still reports what it measured.
#
#   bash benchmarks/gpu_check.sh [DIR=.gpu-wheels] [driver options...]
#   e.g. bash benchmarks/gpu_check.sh .gpu-wheels --steps 150 --seq-len 2048
#
# Before, on a machine with registry access: bash benchmarks/gpu_wheels.sh 3.12 .gpu-wheels
# With this workplace's device tool: run(command="bash benchmarks/gpu_check.sh", carry=[".gpu-wheels"],
# timeout_s=540). With $OUT set, the full rank log, the summary JSON and metrics.jsonl land there.
#
# Installs go to a --target folder put first on PYTHONPATH, always --no-index --no-deps: nothing is
# fetched, and the machine's torch (or anything else of its own) is never replaced. A carried wheel
# is installed only when its package is missing or older there. skymoe itself is built from the
# working tree this runs in (it travels with the call); if that build fails, the wheel in DIR (a
# snapshot from when gpu_wheels.sh ran) is used instead, and the output says so.
# PY=... picks the interpreter (default python3); SITE=... the target folder.
set -uo pipefail

DIR=.gpu-wheels
if [[ $# -gt 0 && "$1" != -* ]]; then DIR=$1; shift; fi
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT" || exit 2
PY=${PY:-python3}
SITE=${SITE:-/tmp/gpu-check-site}
export PYTHONUNBUFFERED=1
if [[ -n "${OUT:-}" ]]; then exec > >(tee "$OUT/gpu_check_console.txt") 2>&1; fi
started=$(date +%s)

echo "== machine"
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv 2>/dev/null \
  || echo "nvidia-smi: not found"
"$PY" - <<'EOF'
import sys, torch
print(f"python {sys.version.split()[0]} ({sys.executable}); torch {torch.__version__}, CUDA {torch.version.cuda}, "
      f"cuda available: {torch.cuda.is_available()}"
      + (f", {torch.cuda.get_device_name(0)} x {torch.cuda.device_count()}" if torch.cuda.is_available() else ""))
EOF

echo "== packages (from $DIR, --no-index --no-deps, into $SITE)"
mkdir -p "$SITE"
export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"
# Which carried wheels to install: those whose package is missing or older here. pydantic-core
# must match pydantic exactly, so it goes in whenever pydantic does.
mapfile -t wheels < <("$PY" - "$DIR" <<'EOF'
import glob, importlib.metadata as md, os, sys
from packaging.utils import canonicalize_name, parse_wheel_filename
from packaging.version import Version
chosen = {}
for path in sorted(glob.glob(os.path.join(sys.argv[1], "*.whl"))):
    name, version, _, _ = parse_wheel_filename(os.path.basename(path))
    if name == "skymoe":
        continue
    try:
        have = Version(md.version(name))
    except md.PackageNotFoundError:
        have = None
    if have is None or have < version:
        chosen[name] = path
    print(f"  {name} {version}: {'install' if name in chosen else f'present ({have})'}", file=sys.stderr)
if canonicalize_name("pydantic") in chosen:
    for path in glob.glob(os.path.join(sys.argv[1], "pydantic_core-*.whl")):
        chosen["pydantic-core"] = path
print("\n".join(chosen.values()))
EOF
)
if [[ ${#wheels[@]} -gt 0 && -n "${wheels[0]}" ]]; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" \
    "${wheels[@]}" || { echo "ERROR: installing the carried wheels failed"; exit 2; }
fi
# -P everywhere below: from the repository root, ./skymoe (the core folder alone) would shadow the
# installed package, whose subpackages (skymoe.training -> training/) exist only once installed.
if "$PY" -P -c "import skymoe.training" 2>/dev/null; then
  echo "  skymoe: present ($("$PY" -P -c 'import skymoe, os; print(os.path.dirname(skymoe.__file__))'))"
else
  # From a copy of the package folders: an in-tree build would leave build/ and egg-info behind.
  build=$(mktemp -d)
  cp -r pyproject.toml README.md skymoe pipelines training evaluation flows ablations "$build"/
  if "$PY" -m pip install -q --no-index --no-deps --no-build-isolation --ignore-requires-python \
      --upgrade --target "$SITE" "$build" >"$build.err" 2>&1; then
    echo "  skymoe: built from this working tree"
  else
    echo "  skymoe: building the working tree failed (setuptools $("$PY" -P -c 'import setuptools; print(setuptools.__version__)' 2>&1 | tail -1); pyproject asks >= 68):"
    grep -iE "error|requires" "$build.err" | head -5 | sed 's/^/    /'
    wheel=$(ls "$DIR"/skymoe-*.whl 2>/dev/null | head -1)
    [[ -n "$wheel" ]] || { echo "ERROR: skymoe could not be built and $DIR has no skymoe wheel"; exit 2; }
    "$PY" -m pip install -q --no-index --no-deps --ignore-requires-python --upgrade --target "$SITE" "$wheel" \
      || exit 2
    echo "  skymoe: WARNING: from $wheel, a snapshot made by gpu_wheels.sh, not this working tree"
  fi
  rm -rf "$build" "$build.err"
fi
"$PY" -P -c "import pydantic, hjson, deepspeed, skymoe.training.launch; print(f'  import check: deepspeed {deepspeed.__version__}, pydantic {pydantic.__version__}')" \
  2>&1 | grep -v "^\[20" || { echo "ERROR: the training stack does not import"; exit 2; }
echo "  set-up took $(( $(date +%s) - started ))s"

echo "== check"
"$PY" benchmarks/gpu_check.py --deadline-s 420 "$@"
status=$?
echo "== gpu_check.sh: exit $status after $(( $(date +%s) - started ))s"
exit $status
