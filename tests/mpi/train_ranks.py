"""Run by tests/test_distributed.py, alone or on every rank of ``mpiexec -n K``: train a model
file for some steps with a global batch split across the ranks and write (rank 0) the step losses
and the final weights to an .npz.

    python tests/mpi/train_ranks.py MODEL.py OUT.npz --optimizer sgd|adam [--steps 20]
        [--batch 64] [--checkpoint CK.npz] [--resume] [--die-at STEP] [--no-dropout]
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
    p.add_argument("model")
    p.add_argument("out")
    p.add_argument("--optimizer", default="sgd")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument("--train", type=int, default=20 * 64, help="training examples (20 steps of 64)")
    p.add_argument("--checkpoint")
    p.add_argument("--resume", action="store_true")
    p.add_argument("--die-at", type=int, default=None, help="rank 1 kills itself (SIGKILL) at this global step")
    p.add_argument("--hang-at", type=int, default=None, help="rank 1 stops (SIGSTOP) at this global step")
    p.add_argument("--no-dropout", action="store_true")
    p.add_argument("--lr", type=float, default=0.05)
    a = p.parse_args()
    if a.no_dropout:
        from gradfuse import functional as F

        F.dropout = lambda x, p: x  # dropout off: the equivalence of 1 and K ranks is exact then
    model = load_model(a.model)
    w = distributed.world()
    ranks = w.size if w is not None else 1
    opt = gf.Adam() if a.optimizer == "adam" else gf.SGD(momentum=0.9)
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
        np.savez(a.out, losses=np.array(history.step_losses), **{f"w/{k}": v for k, v in compiled.weights.items()})
    return 0


if __name__ == "__main__":
    sys.exit(main())
