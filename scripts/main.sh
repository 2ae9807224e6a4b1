#!/usr/bin/env bash
# The main job on a fresh machine: set up, train the digits MLP with the compiled CPU program,
# and show where to look at what gradfuse made of it.
source "$(dirname "${BASH_SOURCE[0]}")/setup.sh"
python examples/train_digits.py "$@"
cat <<'MSG'

Look inside (each prints IR; add --format dot for Graphviz):
  gradfuse show examples/digits_mlp.py                          # forward IR
  gradfuse show examples/digits_mlp.py --stage backward         # the generated backward, with provenance
  gradfuse show examples/digits_mlp.py --stage train            # forward + backward + SGD update
  gradfuse show examples/digits_mlp.py --stage fused --explain  # kernels, fusion decisions, memory plan
  gradfuse show examples/digits_mlp.py --stage kernels          # the generated Numba source
  gradfuse gradcheck examples/digits_mlp.py                     # backward vs finite differences
MSG
