"""Training loops people expect: shuffled epochs with a last partial batch, evaluation each
epoch, a progress line with loss and throughput, atomic resumable checkpoints (Ctrl-C leaves
one), a loss/accuracy plot, and runs reproducible from a seed.

Reproducibility: epoch ``e`` visits the examples in the order ``default_rng([seed, e])``
draws, and every other source of randomness (initial weights, dropout masks) is a function of
the seed and the step counter, so a run resumed from a checkpoint continues the same curve.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

import numpy as np

from gradfuse.errors import GradfuseError, InputError

CHECKPOINT_VERSION = 1


@dataclass
class TrainConfig:
    epochs: int = 10
    batch_size: int = 64
    lr: float = 0.05
    seed: int = 0
    checkpoint: str | None = None  # a .npz path, written after every epoch and on Ctrl-C
    plot: str | None = None  # a .png path for the loss/accuracy curves


@dataclass
class History:
    epoch: list[int] = field(default_factory=list)
    train_loss: list[float] = field(default_factory=list)
    test_loss: list[float] = field(default_factory=list)
    test_accuracy: list[float] = field(default_factory=list)
    step_losses: list[float] = field(default_factory=list)  # every step, for exact resume checks


def load_data(path: str) -> dict[str, np.ndarray]:
    """A ``.npz`` with ``x_train``, ``y_train`` and optionally ``x_test``, ``y_test``."""
    try:
        with np.load(path, allow_pickle=False) as f:
            data = {k: f[k] for k in f.files}
    except (OSError, ValueError) as e:
        raise GradfuseError(f"{path}: cannot read it as a .npz of arrays: {e}") from None
    missing = {"x_train", "y_train"} - set(data)
    if missing:
        raise GradfuseError(f"{path}: missing {', '.join(sorted(missing))} (has {', '.join(sorted(data))})")
    return data


def batches(n: int, batch_size: int, seed: int, epoch: int) -> list[np.ndarray]:
    """The epoch's shuffled batches; a last batch of one example joins the previous one
    (BatchNorm cannot normalise a batch of one)."""
    if batch_size < 1:
        raise InputError(f"batch size must be at least 1, got {batch_size}")
    order = np.random.default_rng([seed, epoch]).permutation(n)
    cuts = list(range(batch_size, n, batch_size))
    if cuts and n - cuts[-1] == 1:
        cuts.pop()
    return np.split(order, cuts)


def evaluate(compiled, x: np.ndarray, y: np.ndarray) -> tuple[float, float]:
    """Mean cross-entropy and accuracy of the model's logits on (x, y)."""
    logits = compiled.predict(x).astype(np.float64)
    z = logits - logits.max(axis=1, keepdims=True)
    logp = z - np.log(np.exp(z).sum(axis=1, keepdims=True))
    return float(-logp[np.arange(len(y)), y].mean()), float((logits.argmax(1) == y).mean())


class Progress:
    """One line per epoch; on a terminal, a live bar with loss and throughput while it runs."""

    def __init__(self, stream=None):
        self.stream = stream or sys.stdout
        self.live = self.stream.isatty()

    def step(self, epoch: int, done: int, total: int, loss: float, rate: float) -> None:
        if self.live:
            bar = "#" * int(24 * done / total)
            self.stream.write(f"\repoch {epoch:3d} [{bar:<24}] {done}/{total}  loss {loss:.4f}  {rate:,.0f} ex/s")
            self.stream.flush()

    def epoch(self, text: str) -> None:
        self.stream.write(("\r" + " " * 79 + "\r" if self.live else "") + text + "\n")
        self.stream.flush()


def save_checkpoint(path: str, compiled, history: History, epoch: int, batch: int, config: TrainConfig) -> None:
    """Weights, optimizer state and where training stands, in one .npz replaced atomically."""
    meta = {"version": CHECKPOINT_VERSION, "model": compiled.name, "epoch": epoch, "batch": batch,
            "config": asdict(config), "history": asdict(history)}
    tmp = f"{path}.{os.getpid()}.tmp"
    with open(tmp, "wb") as f:
        np.savez(f, __meta__=np.array(json.dumps(meta)), **{f"w/{k}": v for k, v in compiled.weights.items()})
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def load_checkpoint(path: str, compiled) -> tuple[History, int, int]:
    try:
        with np.load(path, allow_pickle=False) as f:
            meta = json.loads(str(f["__meta__"]))
            weights = {k[2:]: f[k] for k in f.files if k.startswith("w/")}
    except (OSError, ValueError, KeyError) as e:
        raise GradfuseError(f"{path}: not a gradfuse checkpoint ({e})") from None
    if meta.get("version") != CHECKPOINT_VERSION:
        raise GradfuseError(f"{path}: checkpoint format {meta.get('version')}, "
                            f"this gradfuse reads {CHECKPOINT_VERSION}")
    if meta["model"] != compiled.name:
        raise GradfuseError(f"{path}: a checkpoint of {meta['model']}, not {compiled.name}")
    missing = set(compiled.weights) - set(weights)
    if missing:
        raise GradfuseError(f"{path}: lacks {', '.join(sorted(missing))} (another optimizer or model?)")
    for k, v in compiled.weights.items():
        if weights[k].shape != v.shape or weights[k].dtype != v.dtype:
            raise GradfuseError(f"{path}: {k} is {weights[k].dtype}{list(weights[k].shape)}, the model has "
                                f"{v.dtype}{list(v.shape)}")
        v[...] = weights[k]
    return History(**meta["history"]), meta["epoch"], meta["batch"]


@contextlib.contextmanager
def _steps_are_atomic():
    """Ctrl-C during a step takes effect after the step and its bookkeeping, so a checkpoint
    never records a step as undone whose update is already in the weights."""
    if threading.current_thread() is not threading.main_thread():
        yield lambda: None
        return
    pending = []
    previous = signal.signal(signal.SIGINT, lambda *_: pending.append(True))

    def deliver():
        if pending:
            pending.clear()
            raise KeyboardInterrupt

    try:
        yield deliver
    finally:
        signal.signal(signal.SIGINT, previous)


def fit(compiled, data: dict[str, np.ndarray], config: TrainConfig, resume: bool = False,
        progress: Progress | None = None, on_step: Callable[[int, int], None] | None = None) -> History:
    """Train ``compiled`` (a CompiledModel or a loaded artifact) on ``data``."""
    progress = progress or Progress()
    x, y = data["x_train"], data["y_train"]
    history, start_epoch, start_batch = History(), 1, 0
    if resume:
        if not config.checkpoint or not os.path.exists(config.checkpoint):
            raise GradfuseError(f"nothing to resume: no checkpoint at {config.checkpoint}")
        history, start_epoch, start_batch = load_checkpoint(config.checkpoint, compiled)
        progress.epoch(f"resumed from {config.checkpoint}: epoch {start_epoch}, batch {start_batch}")
    epoch, done = start_epoch, start_batch  # done: batches of this epoch already in the weights
    try:
        for epoch in range(start_epoch, config.epochs + 1):
            parts = batches(len(x), config.batch_size, config.seed, epoch)
            losses, seen, t0 = [], 0, time.perf_counter()
            done = start_batch if epoch == start_epoch else 0
            while done < len(parts):
                idx = parts[done]
                with _steps_are_atomic() as deliver_interrupt:
                    loss = compiled.train_step(x[idx], y[idx], lr=config.lr)
                    losses.append(loss)
                    history.step_losses.append(loss)
                    done += 1
                    deliver_interrupt()
                seen += len(idx)
                progress.step(epoch, done, len(parts), loss, seen / (time.perf_counter() - t0))
                if on_step is not None:
                    on_step(epoch, done - 1)
            rate = seen / max(time.perf_counter() - t0, 1e-9)
            history.epoch.append(epoch)
            history.train_loss.append(float(np.mean(losses)) if losses else float("nan"))
            line = f"epoch {epoch:3d}  train loss {history.train_loss[-1]:.4f}"
            if "x_test" in data:
                test_loss, accuracy = evaluate(compiled, data["x_test"], data["y_test"])
                history.test_loss.append(test_loss)
                history.test_accuracy.append(accuracy)
                line += f"  test loss {test_loss:.4f}  test accuracy {accuracy:.1%}"
            progress.epoch(line + f"  ({rate:,.0f} examples/s)")
            if config.checkpoint:
                save_checkpoint(config.checkpoint, compiled, history, epoch + 1, 0, config)
    except KeyboardInterrupt:
        if config.checkpoint:
            save_checkpoint(config.checkpoint, compiled, history, epoch, done, config)
            progress.epoch(f"interrupted: checkpoint written to {config.checkpoint} (epoch {epoch}, "
                           f"{done} batches done); resume with --resume")
        raise
    if config.plot:
        plot_history(history, config.plot, compiled.name)
    return history


def plot_history(history: History, path: str, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    left.plot(history.epoch, history.train_loss, label="train")
    if history.test_loss:
        left.plot(history.epoch, history.test_loss, label="test")
    left.set_xlabel("epoch")
    left.set_ylabel("cross-entropy")
    left.legend()
    if history.test_accuracy:
        right.plot(history.epoch, [100 * a for a in history.test_accuracy], color="tab:green")
    right.set_xlabel("epoch")
    right.set_ylabel("test accuracy (%)")
    fig.suptitle(title)
    fig.tight_layout()
    tmp = f"{path}.{os.getpid()}.tmp.png"
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    os.replace(tmp, path)
