"""``gradfuse.compile``: a model in, a compiled model out, with the weights it owns.

A CompiledModel holds two programs over one set of arrays: inference (the forward graph in
eval mode) and, when the model has a loss, the training step (forward, backward, optimizer
update). Parameters, optimizer state and BatchNorm statistics live in ``weights`` and are
updated in place by ``train_step``. A CompiledModel is also what ``gradfuse.load`` returns for
an artifact: nothing in it needs the model's Python code.
"""

from __future__ import annotations

import functools
import glob
import hashlib
import os
from dataclasses import dataclass

import numpy as np

from gradfuse.errors import GradfuseError, InputError
from gradfuse.ir.graph import ArgKind, Graph
from gradfuse.ir.types import TensorType
from gradfuse.model import Model
from gradfuse.passes.manager import run_pipeline
from gradfuse.passes.optimizer import SGD, Adam
from gradfuse.passes.training import training_step
from gradfuse.runtime.program import DEFAULT_CACHE, Program

ONE_DISPATCH_KERNELS = 8
PIPELINE = "simplify,fuse,memory-plan"  # the plan's pass puts the nodes in its memory-saving order


@dataclass
class CompiledModel:
    name: str
    inputs: dict[str, TensorType]
    targets: dict[str, TensorType]
    predict_program: Program
    train_program: Program | None
    weights: dict[str, np.ndarray]  # params, optimizer state, running statistics: updated in place
    optimizer: str = "none"  # how the training step updates the weights, e.g. "sgd(momentum=0.9, ...)"
    check: bool = False  # run kernel by kernel and stop at the first NaN/Inf, naming the op and line

    def __post_init__(self):
        # inference of a small model is a few short kernels, where per-call overhead shows: one
        # compiled call instead (Program.one_dispatch); a training step runs for milliseconds
        p = self.predict_program
        p.one_dispatch = len(p.kernels.kernels) <= ONE_DISPATCH_KERNELS and not p.checks_indices

    def predict(self, x: np.ndarray) -> np.ndarray:
        """The model's output for a batch (inference mode)."""
        return self._run(self.predict_program, self._inputs(self.inputs, [x]))[0]

    def train_step(self, *arrays: np.ndarray, lr: float) -> float:
        """One step of forward, backward and optimizer update on a batch; returns the loss."""
        if self.train_program is None:
            raise InputError(f"model {self.name} has no loss: pass loss=... to gradfuse.Model to train it")
        feeds = self._inputs({**self.inputs, **self.targets}, arrays)
        feeds["lr"] = np.asarray(lr, dtype=np.float32)
        return float(self._run(self.train_program, feeds)[0])

    def _inputs(self, names, arrays) -> dict[str, np.ndarray]:
        if len(arrays) != len(names):
            raise InputError(f"expected {len(names)} array(s) ({', '.join(names)}), got {len(arrays)}")
        return dict(zip(names, arrays, strict=True))

    def _run(self, program: Program, feeds: dict) -> list[np.ndarray]:
        feeds = {**self.weights, **feeds}  # the program looks up the parameters and state it takes
        return program.run_checked(feeds) if self.check else program.run(feeds)

    def programs(self) -> dict[str, Program]:
        return {"predict": self.predict_program, **({"train": self.train_program} if self.train_program else {})}


def compile(model: Model, optimizer: SGD | Adam | None = None, cache_dir: str = DEFAULT_CACHE,
            pipeline: str = PIPELINE) -> CompiledModel:
    """Trace, differentiate, optimise and generate the kernels of ``model`` for the CPU."""
    forward = cached_pipeline(model.trace(), pipeline, cache_dir)
    predict = Program.compile(forward, cache_dir)
    weights = {k: np.ascontiguousarray(v) for k, v in model.initial_values().items()}
    train = None
    optimizer = optimizer or SGD()
    if model.loss is not None:
        step = training_step(model, optimizer)
        train = Program.compile(cached_pipeline(step.graph, pipeline, cache_dir), cache_dir)
        weights.update(step.new_state)
        _add_missing_state(step.graph, weights)
    _add_missing_state(forward, weights)
    return CompiledModel(model.name, dict(model.inputs), dict(model.targets), predict, train, weights,
                         optimizer.describe() if train else "none")


def cached_pipeline(graph: Graph, pipeline: str, cache_dir: str) -> Graph:
    """``run_pipeline(graph, pipeline).graph``, kept as IR text in ``cache_dir`` under a hash of the
    input IR, the pipeline and gradfuse's own source: compiling the same model again (a new
    process) parses the optimised IR back instead of running the passes (as ``load`` does)."""
    from gradfuse.ir.parser import parse_graph

    key = hashlib.sha256("\n".join((_source_digest(), pipeline, str(graph))).encode()).hexdigest()[:24]
    path = os.path.join(cache_dir, "pipelines", f"{graph.name}_{key}.gfir")
    try:
        with open(path, encoding="utf-8") as f:
            return parse_graph(f.read(), file=path)
    except (OSError, GradfuseError):  # not cached yet (or unreadable): run the passes
        pass
    result = run_pipeline(graph, pipeline).graph
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = f"{path}.{os.getpid()}.tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(str(result))
    os.replace(tmp, path)  # atomic: a concurrent compile reads all of it or nothing
    return result


@functools.cache
def _source_digest() -> str:
    """A hash of every gradfuse source file: cached pipelines are valid for this code only."""
    import gradfuse.codegen
    import gradfuse.ir
    import gradfuse.passes
    import gradfuse.runtime

    packages = (gradfuse, gradfuse.ir, gradfuse.passes, gradfuse.codegen, gradfuse.runtime)
    files = {f for m in packages for f in glob.glob(os.path.join(os.path.dirname(m.__file__), "**", "*.py"),
                                                    recursive=True)}
    h = hashlib.sha256()
    for path in sorted(files):
        with open(path, "rb") as f:
            h.update(os.path.basename(path).encode() + f.read())
    return h.hexdigest()


def _add_missing_state(g: Graph, weights: dict[str, np.ndarray]) -> None:
    """State a graph carries that nobody initialised yet (the dropout step counter) starts at 0."""
    for kind, v in g.args:
        if kind is not ArgKind.input and v.name not in weights:
            weights[v.name] = np.zeros(v.type.concrete({}), v.type.dtype.np)
