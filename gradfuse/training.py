"""Training loops people expect: shuffled epochs with a last partial batch, the model's own loss
and the metrics its targets call for (gradfuse/metrics.py) on the test split each epoch, a
progress line with throughput, atomic resumable checkpoints (Ctrl-C leaves one), a plot, runs
reproducible from a seed, and a stop at the first non-finite loss.

Reproducibility: epoch ``e`` visits the examples in the order ``default_rng([seed, e])``
draws, and every other source of randomness (initial weights, dropout masks) is a function of
the seed and the step counter, so a run resumed from a checkpoint continues the same curve.

Nothing is lost: a checkpoint is replaced atomically, so a failed write leaves the previous
one; if it cannot be written at all, training stops and the weights go to the temporary
folder instead (the error says where); a diverged run writes nothing over the last good files.
"""

from __future__ import annotations

import contextlib
import json
import math
import signal
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

import numpy as np

from gradfuse.data import Dataset, read_numpy
from gradfuse.errors import GradfuseError, InputError, NumericError
from gradfuse.files import FileError, atomic_file, rescue_path
from gradfuse.metrics import Metrics, for_model

CHECKPOINT_VERSION = 2


@dataclass
class TrainConfig:
    epochs: int = 10
    batch_size: int = 64
    lr: float = 0.05
    seed: int = 0
    checkpoint: str | None = None  # a .npz path, written after every epoch and on Ctrl-C
    plot: str | None = None  # a .png path for the loss and metric curves


@dataclass
class History:
    epoch: list[int] = field(default_factory=list)
    train_loss: list[float] = field(default_factory=list)
    test: dict[str, list[float]] = field(default_factory=dict)  # metric name -> one value per epoch
    step_losses: list[float] = field(default_factory=list)  # every step, for exact resume checks
    examples_per_second: list[float] = field(default_factory=list)  # training steps only, per epoch
    finished: bool = False  # a resumed run that had nothing left to train


class Diverged(NumericError):
    """The training loss became NaN or infinite."""


def metrics_of(compiled, custom=None) -> Metrics:
    """The metrics that fit ``compiled``'s prediction and targets (plus a model's own)."""
    return for_model(compiled.prediction, compiled.targets, compiled.loss_graph, custom)


def shard(idx: np.ndarray, rank: int, ranks: int) -> np.ndarray:
    """Rank ``rank``'s part of a global batch: ``ranks`` near-equal consecutive slices."""
    return np.array_split(idx, ranks)[rank]


def rank_batches(parts: list[np.ndarray], ranks: int) -> list[np.ndarray]:
    """The global batches every rank takes a part of: those with at least two examples per rank
    (BatchNorm needs two rows; every rank drops the same ones, so all run the same steps)."""
    return parts if ranks == 1 else [p for p in parts if len(p) >= 2 * ranks]


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
    """Weights, optimizer state and where training stands (``epoch``, batches of it done), in
    one .npz replaced atomically."""
    meta = {"version": CHECKPOINT_VERSION, "model": compiled.name, "epoch": epoch, "batch": batch,
            "config": asdict(config), "history": asdict(history)}
    with atomic_file(path, "checkpoint") as f:
        np.savez(f, __meta__=np.array(json.dumps(meta)), **{f"w/{k}": v for k, v in compiled.weights.items()})


def read_checkpoint(path: str) -> tuple[dict, dict[str, np.ndarray]]:
    """(meta, weights) of a checkpoint, or a one-line error for anything else."""
    arrays = read_numpy(path, "checkpoint")
    if not isinstance(arrays, dict) or "__meta__" not in arrays:
        raise FileError("checkpoint", path, "not a gradfuse checkpoint (no __meta__ entry)")
    try:
        meta = json.loads(str(arrays["__meta__"]))
    except ValueError as e:
        raise FileError("checkpoint", path, f"its __meta__ entry is damaged ({e})") from None
    if not isinstance(meta, dict) or meta.get("version") != CHECKPOINT_VERSION:
        version = meta.get("version") if isinstance(meta, dict) else None
        raise FileError("checkpoint", path, f"format {version}, this gradfuse reads format {CHECKPOINT_VERSION}")
    return meta, {k[2:]: v for k, v in arrays.items() if k.startswith("w/")}


def load_checkpoint(path: str, compiled) -> tuple[History, int, int, dict]:
    """Load the weights into ``compiled``; returns (history, epoch, batches done, config)."""
    meta, weights = read_checkpoint(path)
    if meta["model"] != compiled.name:
        raise FileError("checkpoint", path, f"a checkpoint of {meta['model']}, not {compiled.name}")
    missing = set(compiled.weights) - set(weights)
    if missing:
        raise FileError("checkpoint", path, f"lacks {', '.join(sorted(missing))} (another optimizer or model?)")
    for k, v in compiled.weights.items():
        if weights[k].shape != v.shape or weights[k].dtype != v.dtype:
            raise FileError("checkpoint", path, f"{k} is {weights[k].dtype}{list(weights[k].shape)}, the model "
                                                f"has {v.dtype}{list(v.shape)}")
    for k, v in compiled.weights.items():  # only once everything is known to fit
        v[...] = weights[k]
    return History(**meta["history"]), meta["epoch"], meta["batch"], meta["config"]


def rescued(failed: FileError, compiled, history: History, epoch: int, batch: int, config: TrainConfig,
            then: str) -> FileError:
    """What to raise when ``failed`` kept the weights from where they were going: they are saved
    as a checkpoint in the temporary folder, and the error says where and ``then`` (how to go on,
    ``{path}`` standing for the rescued file), or that they are lost if even that fails."""
    path = rescue_path(compiled.name)
    try:
        save_checkpoint(path, compiled, history, epoch, batch, config)
    except FileError as again:
        return FileError(failed.what, failed.path, f"{failed.why}; saving the weights to {path} failed too "
                                                   f"({again.why}): the trained weights are lost")
    return FileError(failed.what, failed.path, f"{failed.why}; {then.format(path=path)}")


def _save_or_rescue(compiled, history: History, epoch: int, batch: int, config: TrainConfig) -> None:
    """The checkpoint; where it cannot be written, the same file in the temporary folder, and
    an error that says so (training stops: every later write would fail the same way)."""
    try:
        save_checkpoint(config.checkpoint, compiled, history, epoch, batch, config)
    except FileError as e:
        raise rescued(e, compiled, history, epoch, batch, config, "training stopped, and the checkpoint went to "
                      "{path} instead (go on with --checkpoint {path} --resume)") from None


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


def _resume(compiled, config: TrainConfig, progress: Progress) -> tuple[History, int, int]:
    if not config.checkpoint:
        raise GradfuseError("nothing to resume from: --resume needs --checkpoint FILE")
    history, epoch, batch, saved = load_checkpoint(config.checkpoint, compiled)
    for key in ("batch_size", "seed"):  # the batches of an epoch follow from these: keep them
        if saved[key] != getattr(config, key):
            progress.epoch(f"note: resuming with the checkpoint's {key.replace('_', ' ')} {saved[key]} "
                           f"(not {getattr(config, key)}), so the run goes on as it started")
            setattr(config, key, saved[key])
    if epoch > config.epochs:
        progress.epoch(f"{config.checkpoint}: training already finished ({epoch - 1} of {config.epochs} epochs "
                       f"done); nothing to train (pass --epochs N with N > {epoch - 1} to train on)")
        history.finished = True
    else:
        progress.epoch(f"resumed from {config.checkpoint}: epoch {epoch}, {batch} batches of it done")
    return history, epoch, batch


def _diverged(loss: float, epoch: int, step: int, steps: int, history: History, config: TrainConfig,
              cause: str | None = None) -> Diverged:
    last = history.step_losses[-1] if history.step_losses else None
    text = f"epoch {epoch}, step {step} of {steps}: the training loss is {loss}"
    text += f" (it was {last:.4g} the step before)" if last is not None else " at the first step"
    text += f"; {cause}" if cause else (f"; the learning rate ({config.lr:g}) is likely too high for this model, "
                                        "or the data holds extreme values: run with --check to name the first "
                                        "op that made a NaN/Inf")
    if config.checkpoint and history.epoch:
        text += f"; the last good checkpoint, {config.checkpoint} (epoch {history.epoch[-1]}), is kept"
    return Diverged(text + "; nothing was written")


def fit(compiled, data: Dataset, config: TrainConfig, resume: bool = False, progress: Progress | None = None,
        on_step: Callable[[int, int], None] | None = None, metrics: Metrics | None = None) -> History:
    """Train ``compiled`` (a CompiledModel or a loaded artifact) on checked ``data``.

    Under ``mpiexec`` (``compiled`` compiled with ``workers`` = the number of ranks) every rank
    runs this loop: each global batch of ``batch_size`` is split across the ranks, the loss is the
    mean over them, and rank 0 alone prints, evaluates and writes checkpoints (see _Ranks)."""
    from gradfuse.runtime.artifact import warm_up

    ranks = _Ranks.of(compiled)
    progress = progress or Progress()
    if ranks.rank:
        progress = Progress(_Discard())
    metrics = metrics or metrics_of(compiled)
    history, start_epoch, start_batch = History(), 1, 0
    if resume:
        history, start_epoch, start_batch = _resume(compiled, config, progress)
        if history.finished:
            return history
    ranks.start(compiled, progress)
    first = rank_batches(batches(len(data), config.batch_size, config.seed, start_epoch), ranks.size)
    sizes = {len(shard(part, r, ranks.size)) for part in first for r in range(ranks.size)}
    with ranks.patience():
        started = time.perf_counter()
        warm_up(compiled, sizes)  # Numba compiles here, not inside the first epoch's throughput
    if hasattr(compiled, "kernel_report"):
        progress.epoch(f"{compiled.kernel_report()}, ready in {time.perf_counter() - started:.1f} s")
    inputs = len(compiled.inputs)
    if data.test is not None and not ranks.rank:  # a metric that fails does so now, not after the first epoch
        metrics.evaluate(compiled.predict, [a[:2] for a in data.test[:inputs]], [a[:2] for a in data.test[inputs:]])
    epoch, done = start_epoch, start_batch  # done: batches of this epoch already in the weights
    try:
        for epoch in range(start_epoch, config.epochs + 1):
            parts = rank_batches(batches(len(data), config.batch_size, config.seed, epoch), ranks.size)
            losses, seen, t0 = [], 0, time.perf_counter()
            done = start_batch if epoch == start_epoch else 0
            while done < len(parts):
                idx = shard(parts[done], ranks.rank, ranks.size)
                with _steps_are_atomic() as deliver_interrupt:
                    try:
                        loss = compiled.train_step(*(a[idx] for a in data.train), lr=config.lr)
                    except NumericError as e:  # check mode names the op
                        raise _diverged(float("nan"), epoch, done + 1, len(parts), history, config, str(e)) from None
                    loss = ranks.mean_loss(loss, epoch, done + 1)
                    if not math.isfinite(loss):
                        raise _diverged(loss, epoch, done + 1, len(parts), history, config)
                    losses.append(loss)
                    history.step_losses.append(loss)
                    done += 1
                    deliver_interrupt()
                seen += len(parts[done - 1])
                progress.step(epoch, done, len(parts), loss, seen / (time.perf_counter() - t0))
                if on_step is not None:
                    on_step(epoch, done - 1)
            history.examples_per_second.append(seen / max(time.perf_counter() - t0, 1e-9))
            history.epoch.append(epoch)
            history.train_loss.append(float(np.mean(losses)) if losses else float("nan"))
            line = f"epoch {epoch:3d}  train loss {history.train_loss[-1]:.4f}"
            if data.test is not None and not ranks.rank:
                measured = metrics.evaluate(compiled.predict, data.test[:inputs], data.test[inputs:])
                for k, v in measured.items():
                    history.test.setdefault(k, []).append(v)
                line += "  test " + metrics.describe(measured)
            progress.epoch(line + f"  ({history.examples_per_second[-1]:,.0f} examples/s)")
            if config.checkpoint:
                ranks.save(compiled, history, epoch + 1, 0, config)
    except KeyboardInterrupt:
        if config.checkpoint and not ranks.rank:  # (no collective here: the other ranks may be gone)
            _save_or_rescue(compiled, history, epoch, done, config)
            progress.epoch(f"interrupted: checkpoint written to {config.checkpoint} (epoch {epoch}, "
                           f"{done} batches done); resume with --resume")
        raise
    return history


class _Discard:
    """A stream for the ranks that do not print."""

    def write(self, text: str) -> None:
        pass

    def flush(self) -> None:
        pass

    def isatty(self) -> bool:
        return False


@dataclass
class _Ranks:
    """The training loop's side of a data-parallel run (one rank of it; size 1 alone)."""

    world: object = None
    rank: int = 0
    size: int = 1

    @classmethod
    def of(cls, compiled) -> _Ranks:
        from gradfuse.runtime import distributed

        ranks = distributed.compiled_ranks(compiled)
        w = distributed.world()
        size = w.size if w is not None else 1
        if ranks != size:
            where = f"{size} rank(s) (mpiexec -n {size})" if w is not None else "one process"
            raise GradfuseError(f"{compiled.name} was compiled for {ranks} rank(s), but runs on {where}: compile "
                                f"it with workers={size}, or launch it with mpiexec -n {ranks}")
        return cls(w, w.rank, w.size) if w is not None else cls()

    def start(self, compiled, progress: Progress) -> None:
        """Every rank runs the same program from rank 0's weights and its own dropout stream."""
        if self.world is None:
            return
        from gradfuse.runtime import distributed

        distributed.check_same_program(self.world, compiled)
        for k in sorted(compiled.weights):
            self.world.broadcast(compiled.weights[k], f"the start-up broadcast of %{k} from rank 0")
        distributed.offset_rng(compiled, self.rank)
        norm = "; BatchNorm uses per-rank batch statistics (as PyTorch DDP), running statistics averaged when " \
            "saved" if any("running_" in k for k in compiled.weights) else ""
        progress.epoch(f"data-parallel over {self.size} ranks: each global batch split {self.size} ways, gradients "
                       f"all-reduced in {distributed.describe_buckets(compiled)}{norm}")

    def patience(self):
        """The start-up timeout while the ranks compile their kernels (at their own speeds)."""
        if self.world is None:
            return contextlib.nullcontext()
        from gradfuse.runtime.distributed import STARTUP_TIMEOUT

        return self.world.patience(STARTUP_TIMEOUT)

    def mean_loss(self, loss: float, epoch: int, step: int) -> float:
        if self.world is None:
            return loss
        return self.world.mean(loss, f"the loss of epoch {epoch}, step {step}")

    def save(self, compiled, history: History, epoch: int, batch: int, config: TrainConfig) -> None:
        """Rank 0 writes the checkpoint (atomically), with running statistics averaged over the ranks
        and its own dropout counter; the others wait for it."""
        if self.world is None:
            _save_or_rescue(compiled, history, epoch, batch, config)
            return
        from gradfuse.runtime import distributed

        with distributed.averaged_buffers(self.world, compiled):
            if not self.rank:  # its dropout counter has no offset: a resume on any number of ranks goes on
                _save_or_rescue(compiled, history, epoch, batch, config)
        self.world.barrier(f"the checkpoint of epoch {epoch - 1} (written by rank 0)")


def plot_history(history: History, path: str, title: str, metrics: Metrics) -> None:
    """The loss (train and test) and, beside it, the headline metric and the model's own."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    names = [metrics.headline] + [m.name for m in metrics.metrics if m.custom and m.name != metrics.headline]
    shown = [name for name in names if name in history.test]
    fig, axes = plt.subplots(1, 1 + bool(shown), figsize=(5 + 5 * bool(shown), 4), squeeze=False)
    left = axes[0][0]
    left.plot(history.epoch, history.train_loss, marker=".", label="train")
    if "loss" in history.test:
        left.plot(history.epoch, history.test["loss"], marker=".", label="test")
    left.set_ylabel(f"loss ({metrics.loss_name})")
    left.legend()
    if shown:
        right = axes[0][1]
        for name in shown:
            scale = 100 if metrics.is_percent(name) else 1
            right.plot(history.epoch, [scale * v for v in history.test[name]], marker=".",
                       label=f"test {metrics.label(name)}" + (" (%)" if scale == 100 else ""))
        right.legend()
    for ax in axes[0]:
        ax.set_xlabel("epoch")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    fig.suptitle(title)
    fig.tight_layout()
    with atomic_file(path, "plot") as f:
        fig.savefig(f, dpi=100, format="png")
    plt.close(fig)
