#!/usr/bin/env bash
# Run the whole test suite (and the linter) on a fresh machine: sets itself up first.
source "$(dirname "${BASH_SOURCE[0]}")/setup.sh"
ruff check .
python -m pytest "$@"
