#!/usr/bin/env bash
# Run the whole test suite (and the linter) on a fresh machine: sets itself up first.
source "$(dirname "${BASH_SOURCE[0]}")/setup.sh"
ruff check .
python -m pytest "$@"
# the CUDA backend in Numba's simulator: a process of its own (the variable must precede numba.cuda)
if [ $# -eq 0 ]; then
  NUMBA_ENABLE_CUDASIM=1 python -m pytest tests/cudasim
fi
