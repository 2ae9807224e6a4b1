"""Run by tests/test_distributed.py, alone or on every rank of ``mpiexec -n K``: train model files
for some steps with a global batch split across the ranks and write (rank 0) the step losses and
the final weights of each to an .npz (several in one launch: MPI and Numba start once).

    python tests/mpi/train_ranks.py OUTDIR MODEL.py:sgd [MODEL.py:adam ...] [--epochs 1]
        [--train 1280] [--batch 64] [--checkpoint CK.npz] [--resume] [--die-at STEP] [--no-dropout]

writes OUTDIR/<model stem>-<optimizer>.npz.
"""

import argparse
import os
import sys

import numpy as np

import gradfuse as gf
from gradfuse.data import check_data
from gradfuse.errors import GradfuseError
from gradfuse.loader import load_model
from gradfuse.runtime import distributed
from gradfuse.training import Progress, TrainConfig, fit


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("out")
    p.add_argument("jobs", nargs="+", help="MODEL.py:sgd or MODEL.py:adam")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument("--train", type=int, default=20 * 64, help="training examples (20 steps of 64)")
    p.add_argument("--checkpoint")
    p.add_argument("--resume", action="store_true")
    p.add_argument("--die-at", type=int, default=None, help="rank 1 kills itself (SIGKILL) at this global step")
    p.add_argument("--hang-at", type=int, default=None, help="rank 1 stops (SIGSTOP) at this global step")
    p.add_argument("--no-dropout", action="store_true")
    p.add_argument("--mismatch", action="store_true", help="rank 1 compiles another program (momentum 0.5)")
    p.add_argument("--lr", type=float, default=0.05)
    a = p.parse_args()
    if a.no_dropout:
        from gradfuse import functional as F

        F.dropout = lambda x, p: x  # dropout off: the equivalence of 1 and K ranks is exact then
    w = distributed.world()
    for job in a.jobs:
        path, optimizer = job.rsplit(":", 1)
        out = os.path.join(a.out, f"{os.path.splitext(os.path.basename(path))[0]}-{optimizer}.npz")
        train(a, w, load_model(path), optimizer, out)
    return 0


def train(a, w, model, optimizer: str, out: str) -> None:
    ranks = w.size if w is not None else 1
    opt = gf.Adam() if optimizer == "adam" else gf.SGD(momentum=0.5 if a.mismatch and w and w.rank == 1 else 0.9)
    compiled = gf.compile(model, opt, workers=ranks)
    raw = model.data()
    x, y = raw["x_train"][:a.train], raw["y_train"][:a.train]
    data = check_data({"x_train": x, "y_train": y}, compiled.inputs, compiled.targets, compiled.prediction)
    config = TrainConfig(epochs=a.epochs, batch_size=a.batch, lr=a.lr, seed=0, checkpoint=a.checkpoint)
    step = [0]

    def on_step(epoch, batch):
        step[0] += 1
        if w is not None and w.rank == 1 and a.die_at == step[0]:
            os.kill(os.getpid(), 9)
        if w is not None and w.rank == 1 and a.hang_at == step[0]:
            os.kill(os.getpid(), 19)

    try:
        history = fit(compiled, data, config, resume=a.resume, progress=Progress(sys.stdout), on_step=on_step)
    except GradfuseError as e:
        print(f"error: {e}", file=sys.stderr)
        distributed.exit_now(1)
    if w is None or w.rank == 0:
        np.savez(out, losses=np.array(history.step_losses), **{f"w/{k}": v for k, v in compiled.weights.items()})


if __name__ == "__main__":
    sys.exit(main())
