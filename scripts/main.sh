#!/usr/bin/env bash
# The main job on a fresh machine: set up, then show what gradfuse does with the digits MLP.
source "$(dirname "${BASH_SOURCE[0]}")/setup.sh"
echo "== the digits MLP as gradfuse IR (gradfuse show examples/digits_mlp.py)"
gradfuse show examples/digits_mlp.py
echo
echo "== running it with the reference interpreter on real digits"
python examples/digits_forward.py
