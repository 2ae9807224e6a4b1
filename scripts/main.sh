#!/usr/bin/env bash
# The main job on a fresh machine: set up, train the digits MLP with the compiled CPU program,
# write it as an artifact, and show where to look at what gradfuse made of it.
source "$(dirname "${BASH_SOURCE[0]}")/setup.sh"
mkdir -p out
gradfuse train examples/digits_mlp.py --epochs 10 --batch-size 64 --lr 0.05 --seed 0 \
    --checkpoint out/digits_mlp.ckpt.npz --plot out/digits_mlp.png -o out/digits_mlp "$@"
cat <<'MSG'

The trained model is the artifact out/digits_mlp (loss/accuracy curves: out/digits_mlp.png).
  gradfuse run out/digits_mlp --input x.npy       # a later process runs it, compiling nothing
  ls out/digits_mlp/ir                            # its IR at every stage: forward, backward, train, fused
  ls out/digits_mlp/kernels                       # the generated Numba source

Look inside the pipeline:
  gradfuse show examples/digits_mlp.py                          # forward IR
  gradfuse show examples/digits_mlp.py --stage backward         # the generated backward, with provenance
  gradfuse show examples/digits_mlp.py --stage train            # forward + backward + SGD update
  gradfuse show examples/digits_mlp.py --stage fused --explain  # kernels, fusion decisions, memory plan
  gradfuse show examples/digits_mlp.py --stage kernels          # the generated Numba source
  gradfuse gradcheck examples/digits_mlp.py                     # backward vs finite differences
MSG
