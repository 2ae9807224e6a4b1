"""Cold and warm compile times of the models issue 13 names, each in a fresh process.

    python -m gradfuse.compile_times                 # all three; cold = an empty cache folder
    python -m gradfuse.compile_times --only mlp12

Cold: a new, empty cache folder, so Numba compiles every kernel; warm: the same folder again in
another fresh process (Numba loads the cached machine code). Each time covers ``gf.compile`` and
the first training step and prediction (where Numba compiles lazily), not the Python start-up;
importing Numba is in it (gradfuse imports it on the first compile). ``cpu`` is the process's CPU
time over the same span, which other work on a shared machine inflates less than the wall time.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile

MODELS = {
    "block": "a pre-LN transformer block (seq 128, width 256, 4 heads, MLP 1024 GELU), MSE, SGD",
    "mlp12": "a 12-block residual MLP with BatchNorm (width 96, dropout 0.1) on 8x8 digits, SGD",
    "mlp12-nodrop": "the same without dropout (each dropout's stream number makes its kernels differ)",
    "char": "examples/char_transformer.py (2 causal blocks, width 128), Adam",
}

_CHILD = r"""
import json, sys, time
import numpy as np
t0 = time.perf_counter()
import gradfuse as gf
from gradfuse.runtime.artifact import warm_up
name, cache = sys.argv[1], sys.argv[2]
if name == "block":
    from gradfuse.bench import transformer_block_model
    model, opt = transformer_block_model(), gf.SGD()
elif name.startswith("mlp12"):
    sys.path.insert(0, "examples")
    import residual_mlp
    net = residual_mlp.ResidualMLP(depth=12, p=0.0 if name.endswith("nodrop") else 0.1)
    model = gf.Model(net, inputs={"x": "f32[N,8,8]"}, targets={"y": "i64[N]"},
                     loss=gf.functional.cross_entropy)
    opt = gf.SGD(momentum=0.9)
else:
    sys.path.insert(0, "examples")
    import char_transformer
    model, opt = char_transformer.make_model(), gf.Adam()
t1, c1 = time.perf_counter(), time.process_time()
compiled = gf.compile(model, opt, cache_dir=cache)
warm_up(compiled)
t2, c2 = time.perf_counter(), time.process_time()
counts = [p.kernel_counts for p in (compiled.predict_program, compiled.train_program) if p is not None]
print(json.dumps({"import": t1 - t0, "compile": t2 - t1, "cpu": c2 - c1, "kernels": counts}))
"""


def measure(name: str, cache: str) -> dict:
    out = subprocess.run([sys.executable, "-c", _CHILD, name, cache], capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--only", choices=sorted(MODELS), action="append")
    a = p.parse_args(argv)
    for name in a.only or list(MODELS):
        with tempfile.TemporaryDirectory(prefix="gf-cold-") as cache:
            cold = measure(name, cache)
            warm = measure(name, cache)
        kernels = ", ".join(f"{c} compiled + {r} reused" for c, r in cold["kernels"])
        print(f"{name:12s} cold {cold['compile']:6.2f} s (cpu {cold['cpu']:.2f})  warm {warm['compile']:5.2f} s "
              f"(cpu {warm['cpu']:.2f})  (import {cold['import']:.1f} s; kernels predict/train: {kernels}; "
              f"load average {os.getloadavg()[0]:.1f})  {MODELS[name]}", flush=True)


if __name__ == "__main__":
    main()
