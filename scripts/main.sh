#!/usr/bin/env bash
# The main job on a fresh machine: set up, train the digits MLP with the compiled CPU program,
# write it as an artifact, run that artifact in a new process on the test images, and show
# where to look at what gradfuse made of it.
source "$(dirname "${BASH_SOURCE[0]}")/setup.sh"
mkdir -p out
gradfuse train examples/digits_mlp.py --epochs 10 --batch-size 64 --lr 0.05 --seed 0 \
    --checkpoint out/digits_mlp.ckpt.npz --plot out/digits_mlp.png -o out/digits_mlp "$@"
python -c "import numpy as np; from gradfuse import datasets; np.savez('out/digits.npz', **datasets.digits())"
gradfuse run out/digits_mlp --input out/digits.npz:x_test --output out/digits_mlp.predictions.npy
python - <<'PY'
import numpy as np
y, p = np.load("out/digits.npz")["y_test"], np.load("out/digits_mlp.predictions.npy")
print(f"the artifact, run in a new process: {np.mean(p.argmax(1) == y):.1%} of the {len(y)} test digits right")
PY
cat <<'MSG'

The trained model is the artifact out/digits_mlp (curves: out/digits_mlp.png).
  gradfuse run out/digits_mlp --input out/digits.npz:x_test   # a later process runs it, compiling nothing
  ls out/digits_mlp/ir            # its IR at every stage: forward, backward, train, loss, *.fused (what runs)
  ls out/digits_mlp/kernels       # the generated Numba source

Look inside the pipeline:
  gradfuse show examples/digits_mlp.py                          # forward IR
  gradfuse show examples/digits_mlp.py --stage backward         # the generated backward, with provenance
  gradfuse show examples/digits_mlp.py --stage train            # forward + backward + SGD update
  gradfuse show examples/digits_mlp.py --stage fused --explain  # kernels, fusion decisions, memory plan
  gradfuse show examples/digits_mlp.py --stage kernels          # the generated Numba source
  gradfuse gradcheck examples/digits_mlp.py                     # backward vs finite differences
Other tasks: gradfuse train examples/regression.py --epochs 40 --lr 0.01; gradfuse train examples/char_lm.py --lr 0.1
MSG
