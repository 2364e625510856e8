#!/usr/bin/env bash
# Wheels for benchmarks/gpu_check.sh, gathered on a machine WITH registry access (the dev machine),
# for a GPU machine WITHOUT one (Python 3.12 with its own CUDA torch, numpy, pyarrow, pyyaml,
# fsspec, xxhash, safetensors, tokenizers, msgpack, ninja, psutil, py-cpuinfo, einops, tqdm,
# packaging already installed; no deepspeed, no pydantic, no hjson).
#
#   bash benchmarks/gpu_wheels.sh [PYTHON_VERSION=3.12] [DIR=.gpu-wheels]
#
# DIR then holds (about 7 MiB):
#   - pydantic, pydantic-core (binary, cp<ver> manylinux x86_64), annotated-types, typing-inspection,
#     typing-extensions, hjson: downloaded with --only-binary=:all: --no-deps, at the versions of
#     this checkout's venv, so the GPU run uses what the tests here use;
#   - deepspeed-<ver>-py3-none-any.whl built from the sdist with DS_BUILD_OPS=0 (no compiled ops:
#     the trainer uses a client torch AdamW, so nothing is JIT-compiled either);
#   - skymoe-<ver>-py3-none-any.whl, this checkout as a wheel (gpu_check.sh prefers building the
#     working tree that travels with the call, and falls back to this snapshot).
# Nothing here installs anything. The folder must travel with the device call (`carry`), so keep it
# ignored by git (`/.gpu-wheels/` in .gitignore) and small (the whole tree is limited to 64 MiB).
#
# PY=path/to/python overrides the interpreter used to read versions and build (default: the
# checkout's .venv/bin/python, else python3); it needs pip, setuptools>=68 and torch (deepspeed's
# setup.py imports torch).
set -euo pipefail

PY_VERSION=${1:-3.12}
DIR=${2:-.gpu-wheels}
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"
if [[ -z "${PY:-}" ]]; then
  if [[ -x .venv/bin/python ]]; then PY=.venv/bin/python; else PY=python3; fi
fi
mkdir -p "$DIR"
ABI="cp${PY_VERSION/./}"

# The version of a package in $PY's environment (empty when not installed).
installed() { "$PY" -c "import importlib.metadata as m, sys
try: print(m.version(sys.argv[1]))
except m.PackageNotFoundError: pass" "$1"; }

# deepspeed: the version installed here (what the tests ran), else the lower bound pyproject pins.
DS_VERSION=$(installed deepspeed)
if [[ -z "$DS_VERSION" ]]; then
  DS_VERSION=$(sed -n 's/.*"deepspeed>=\([0-9.]*\).*/\1/p' pyproject.toml | head -1)
fi

pins=()
for name in pydantic pydantic-core annotated-types typing-inspection typing-extensions hjson; do
  version=$(installed "$name")
  pins+=("${name}${version:+==$version}")
done

echo "== downloading for Python $PY_VERSION ($ABI, manylinux x86_64): ${pins[*]}"
rm -f "$DIR"/pydantic-*.whl "$DIR"/pydantic_core-*.whl "$DIR"/annotated_types-*.whl \
      "$DIR"/typing_inspection-*.whl "$DIR"/typing_extensions-*.whl "$DIR"/hjson-*.whl
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version "$PY_VERSION" --implementation cp \
  --abi "$ABI" --abi abi3 --abi none \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
  --platform manylinux2014_x86_64 --platform manylinux1_x86_64 --platform any \
  -d "$DIR" "${pins[@]}"

if ! ls "$DIR"/deepspeed-"$DS_VERSION"-*.whl >/dev/null 2>&1; then
  echo "== building deepspeed $DS_VERSION (DS_BUILD_OPS=0: pure Python, no compiled ops)"
  rm -f "$DIR"/deepspeed-*.whl
  DS_BUILD_OPS=0 "$PY" -m pip wheel -q --no-deps --no-build-isolation -w "$DIR" "deepspeed==$DS_VERSION"
fi

echo "== building skymoe from this checkout (a snapshot of the working tree as it is now)"
rm -f "$DIR"/skymoe-*.whl
build=$(mktemp -d)
trap 'rm -rf "$build"' EXIT
# Build from a copy: an in-tree build leaves build/ and egg-info behind in the checkout.
git ls-files -co --exclude-standard -z | grep -zv "^\(tests\|examples\|docs\|${DIR#./}\)/" \
  | xargs -0 cp --parents -t "$build" 2>/dev/null || true
"$PY" -m pip wheel -q --no-deps --no-build-isolation -w "$DIR" "$build"

# The mapped subpackages must be inside (skymoe.training -> training/ etc.).
"$PY" - "$DIR" <<'EOF'
import glob, sys, zipfile
wheel = glob.glob(f"{sys.argv[1]}/skymoe-*.whl")[0]
names = set(zipfile.ZipFile(wheel).namelist())
need = ["skymoe/config.py", "skymoe/training/trainer.py", "skymoe/training/launch.py",
        "skymoe/pipelines/tokenize/packing.py", "skymoe/training/hf/modeling_skymoe.py"]
missing = [n for n in need if n not in names]
if missing:
    sys.exit(f"{wheel} lacks {missing}: the package-dir mapping did not apply")
EOF

echo "== $DIR:"
ls -l "$DIR"
du -sh "$DIR"
