"""Train the digits MLP with the compiled CPU program and report its test accuracy.

    python examples/train_digits.py [--epochs 10] [--batch-size 64] [--lr 0.05]
"""

import argparse
import os
import runpy
import time

import numpy as np

import gradfuse as gf

here = os.path.dirname(os.path.abspath(__file__))
parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("--epochs", type=int, default=10)
parser.add_argument("--batch-size", type=int, default=64)
parser.add_argument("--lr", type=float, default=0.05)
parser.add_argument("--seed", type=int, default=0)
args = parser.parse_args()

model = runpy.run_path(os.path.join(here, "digits_mlp.py"))["model"]
data = model.data()
start = time.perf_counter()
compiled = gf.compile(model, gf.SGD(momentum=0.9))
print(f"compiled {model.name}: trace, autodiff, passes and codegen in {time.perf_counter() - start:.2f} s "
      f"(kernels: {compiled.train_program.path})")

rng = np.random.default_rng(args.seed)
n = len(data["x_train"])
for epoch in range(1, args.epochs + 1):
    start, losses = time.perf_counter(), []
    order = rng.permutation(n)
    for i in range(0, n, args.batch_size):
        batch = order[i:i + args.batch_size]
        losses.append(compiled.train_step(data["x_train"][batch], data["y_train"][batch], lr=args.lr))
    accuracy = (compiled.predict(data["x_test"]).argmax(1) == data["y_test"]).mean()
    print(f"epoch {epoch:2d}  loss {np.mean(losses):.4f}  test accuracy {accuracy:.1%}  "
          f"({n / (time.perf_counter() - start):,.0f} examples/s)")
