#!/usr/bin/env bash
# On a machine with an NVIDIA GPU whose Python already holds numba-cuda, CuPy, PyTorch, pytest and
# hypothesis (the GPU machines' image; nothing is installed): the CUDA tests on the GPU, then
# `gradfuse bench --target cuda`. Everything it prints also goes to files under $OUT (or ./device-out).
#   bash scripts/device_check.sh            # tests and benchmarks, ~5 minutes on an H200
#   bash scripts/device_check.sh --quick    # shorter timing runs
set -uo pipefail
cd "$(dirname "$0")/.."
out=${OUT:-device-out}
mkdir -p "$out"
# gradfuse as its packaging lays it out (gradfuse.ir is ./ir, ...), without pip
site=$(mktemp -d)
cp -r gradfuse "$site/gradfuse"
for part in ir passes codegen runtime; do cp -r "$part" "$site/gradfuse/$part"; done
export PYTHONPATH="$site:tests${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 GRADFUSE_CACHE="$site/cache"
python3 - <<'PY' 2>&1 | tee "$out/versions.txt"
import numba, numpy, sys
from numba import cuda
print(sys.version.split()[0], "numpy", numpy.__version__, "numba", numba.__version__, "cuda available", cuda.is_available())
print(cuda.get_current_device().name, "compute capability", cuda.get_current_device().compute_capability)
PY
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv 2>&1 | tee -a "$out/versions.txt"
GRADFUSE_TEST_TARGET=cuda timeout 420 python3 -m pytest tests/cudasim -q -p no:cacheprovider --durations=10 \
  2>&1 | tee "$out/cuda-tests.txt"
echo "tests exit status ${PIPESTATUS[0]}" | tee -a "$out/cuda-tests.txt"
timeout 600 env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE python3 -m gradfuse.cli bench --target cuda \
  --json "$out/bench-cuda.json" "$@" 2>&1 | tee "$out/bench-cuda.txt"
echo "bench exit status ${PIPESTATUS[0]}" | tee -a "$out/bench-cuda.txt"
