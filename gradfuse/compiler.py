"""``gradfuse.compile``: a model in, a compiled model out, with the weights it owns.

A CompiledModel holds two programs over one set of arrays: inference (the forward graph in
eval mode) and, when the model has a loss, the training step (forward, backward, optimizer
update). Parameters, optimizer state and BatchNorm statistics live in ``weights`` and are
updated in place by ``train_step``. A CompiledModel is also what ``gradfuse.load`` returns for
an artifact: nothing in it needs the model's Python code.

``state_dict()`` / ``load_state_dict()`` read and write the parameters and buffers as PyTorch's
do (numpy arrays by dotted path, no optimizer state); see :mod:`gradfuse.state_dict`.
``compile(..., dtype="f64")`` computes everything in float64 (inputs, weights, every float op),
for checking numerics against a float64 reference.
"""

from __future__ import annotations

import functools
import glob
import hashlib
import os
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

from gradfuse.errors import GradfuseError, InputError
from gradfuse.files import CACHE, atomic_file
from gradfuse.ir.graph import ArgKind, Graph
from gradfuse.ir.types import DType, TensorType
from gradfuse.model import Model, float_dtype, trace_loss
from gradfuse.passes.distributed import DEFAULT_BUCKET_MB
from gradfuse.passes.manager import run_pipeline
from gradfuse.passes.optimizer import SGD, Adam
from gradfuse.passes.precision import with_float
from gradfuse.runtime.device import DeviceWeights
from gradfuse.runtime.program import DEFAULT_CACHE, Program
from gradfuse.stages import training_passes
from gradfuse.state_dict import LoadResult, check_state

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
    loss_graph: Graph | None = None  # (prediction, *targets) -> loss: what evaluation measures (metrics.py)

    def __post_init__(self):
        # inference of a small model is a few short kernels, where per-call overhead shows: one
        # compiled call instead (Program.one_dispatch); a training step runs for milliseconds
        p = self.predict_program
        p.one_dispatch = len(p.kernels.kernels) <= ONE_DISPATCH_KERNELS and not p.checks_indices
        lr = [v for kind, v in self.train_program.graph.args if v.name == "lr"] if self.train_program else []
        self._lr_dtype = lr[0].type.dtype.np if lr else np.dtype(np.float32)
        # f32 arrays for f64 inputs are widened (exact); the runtime refuses the other way (lossy)
        self._widen = {n for n, t in {**self.inputs, **self.targets}.items() if t.dtype is DType.f64}
        if p._device and not isinstance(self.weights, DeviceWeights):
            self.weights = DeviceWeights(self.weights)  # they stay in device memory between steps

    def kernel_report(self) -> str:
        """``compiled 40 kernels, reused 90`` over the predict and training programs."""
        counts = [p.kernel_counts for p in (self.predict_program, self.train_program) if p is not None]
        return (f"compiled {sum(c for c, _ in counts)} kernels, reused {sum(r for _, r in counts)} "
                "(kernels identical up to buffer names share one compiled function)")

    def predict(self, *inputs: np.ndarray, **named: np.ndarray) -> np.ndarray:
        """The model's output for a batch (inference mode): one array per input, by position in
        the order of ``inputs`` or by name (``predict(x=..., mask=...)``), or both (positions first)."""
        return self._run(self.predict_program, self._inputs(self.inputs, inputs, named))[0]

    def train_step(self, *arrays: np.ndarray, lr: float, **named: np.ndarray) -> float:
        """One step of forward, backward and optimizer update on a batch; returns the loss. The
        inputs then the targets, by position or by name (``train_step(x=..., y=..., lr=0.1)``)."""
        if self.train_program is None:
            raise InputError(f"model {self.name} has no loss: pass loss=... to gradfuse.Model to train it")
        feeds = self._inputs({**self.inputs, **self.targets}, arrays, named)
        feeds["lr"] = np.asarray(lr, dtype=self._lr_dtype)
        return float(self._run(self.train_program, feeds)[0])

    def _inputs(self, names, arrays, named=None) -> dict[str, np.ndarray]:
        """The feeds by name from arrays given by position (in the order of ``names``) and by name."""
        if not named and len(arrays) == len(names):  # the common case, on the path of every call
            feeds = dict(zip(names, arrays, strict=True))
        else:
            feeds = self._named_inputs(list(names), arrays, named or {})
        for name in self._widen.intersection(feeds):
            a = feeds[name]
            if isinstance(a, np.ndarray) and a.dtype == np.float32:
                feeds[name] = a.astype(np.float64)
        return feeds

    def _named_inputs(self, names: list[str], arrays, named) -> dict[str, np.ndarray]:
        expected = ", ".join(names) or "no arrays"
        if len(arrays) > len(names) or not named:
            raise InputError(f"model {self.name}: expected {len(names)} array(s) ({expected}), got {len(arrays)}")
        unknown = [k for k in named if k not in names]
        if unknown:
            raise InputError(f"model {self.name}: unknown input {', '.join(map(repr, unknown))} (it takes {expected})")
        twice = [k for k in names[:len(arrays)] if k in named]
        if twice:
            raise InputError(f"model {self.name}: {', '.join(map(repr, twice))} given by position and by name")
        feeds = {**dict(zip(names, arrays, strict=False)), **named}
        missing = [k for k in names if k not in feeds]
        if missing:
            raise InputError(f"model {self.name}: missing input {', '.join(map(repr, missing))} "
                             f"(it takes {len(names)} array(s): {expected})")
        return {k: feeds[k] for k in names}

    def _run(self, program: Program, feeds: dict) -> list[np.ndarray]:
        if isinstance(self.weights, DeviceWeights):
            program.require_device()
            feeds = {**self.weights.for_step(), **feeds}
            out = program.run_checked(feeds) if self.check else program.run(feeds)
            self.weights.updated(program.updates)
            return out
        feeds = {**self.weights, **feeds}  # the program looks up the parameters and state it takes
        return program.run_checked(feeds) if self.check else program.run(feeds)

    @property
    def prediction(self) -> TensorType:
        """The type of what ``predict`` returns."""
        return self.predict_program.graph.outputs[0].type

    def programs(self) -> dict[str, Program]:
        return {"predict": self.predict_program, **({"train": self.train_program} if self.train_program else {})}

    # ---- weights in and out, as PyTorch's state_dict ----------------------------------------
    def tensor_names(self) -> list[str]:
        """The parameters and buffers (running statistics, fixed tables), in the model's order:
        the weights that are not optimizer state (momentum, Adam moments) or step counters."""
        names = [v.name for kind, v in self.predict_program.graph.args if kind is not ArgKind.input]
        if self.train_program is not None:
            names += [v.name for kind, v in self.train_program.graph.args
                      if kind is ArgKind.param and v.name not in names]
        return names

    def state_dict(self) -> dict[str, np.ndarray]:
        """Numpy copies of the parameters and buffers by dotted path (``fc1.weight``,
        ``norm.running_mean``), as PyTorch's ``state_dict()`` holds them: no optimizer state.
        :func:`gradfuse.to_pytorch` turns it into PyTorch's names and layouts."""
        return {name: self.weights[name].copy() for name in self.tensor_names()}

    def load_state_dict(self, state: Mapping[str, np.ndarray], strict: bool = True) -> LoadResult:
        """Write ``state`` into the compiled weights, in place (the arrays ``weights`` holds keep
        their identity); a model loaded from an artifact takes it too. Float arrays of any precision
        are converted to the compiled dtype (as PyTorch copies into the existing tensors).
        Optimizer state (momentum, Adam moments and step) is left as it is. Nothing is written
        unless every entry fits; the StateDictError names every missing, unexpected and
        mis-shaped entry (``strict=False`` tolerates missing and unexpected ones)."""
        expected = {n: TensorType(DType.of(self.weights[n].dtype), self.weights[n].shape)
                    for n in self.tensor_names()}
        arrays, result = check_state(state, expected, strict=strict, what=f"compiled model {self.name}")
        for name, a in arrays.items():
            self.weights[name][...] = a  # numpy casts into the weight's dtype
        return result


def compile(model: Model, optimizer: SGD | Adam | None = None, cache_dir: str = DEFAULT_CACHE,
            pipeline: str = PIPELINE, dtype: str | DType | None = None, workers: int = 1,
            bucket_mb: float = DEFAULT_BUCKET_MB, target: str = "cpu") -> CompiledModel:
    """Trace, differentiate, optimise and generate the kernels of ``model`` for ``target``:
    ``cpu`` (Numba CPU), ``cuda`` (Numba CUDA on a GPU) or ``cudasim`` (the CUDA kernels in
    Numba's simulator, with ``NUMBA_ENABLE_CUDASIM=1``).

    ``dtype`` (``"f32"``, ``"f64"`` or a DType; default: the model's own, f32) is the precision
    every float computes in: with ``"f64"`` the inputs, targets, learning rate, weights and every
    float op are float64 (the forward, training-step and loss graphs converted by
    ``passes/precision.py``'s ``with_float``) and ``inputs``/``targets`` say f64. float32
    arrays passed to an f64 model are widened (exactly); float64 arrays passed to an f32 model are
    refused (that would round).

    ``workers`` > 1 compiles the training step of one rank of a data-parallel run: the gradients are
    averaged over the ranks (all-reduce, in buckets of up to ``bucket_mb`` MB) before the update
    (passes/distributed.py); run it on every rank of ``mpiexec -n workers``."""
    dt = None if dtype is None else float_dtype(dtype)

    def precise(g: Graph) -> Graph:
        return g if dt is None else with_float(g, dt)

    def signature(spec: Mapping[str, TensorType]) -> dict[str, TensorType]:
        return {k: t.with_dtype(dt) if dt is not None and t.dtype.is_float else t for k, t in spec.items()}

    from gradfuse.codegen.targets import target as known_target

    known_target(target)  # an unknown name, in words, before any work
    if target != "cpu":  # fusion and the memory plan ask the target's GEMM what it can take
        pipeline = ",".join(f"{p}(target={target!r})" if p in ("fuse", "memory-plan") else p
                            for p in pipeline.split(","))
    traced = model.trace()
    forward = cached_pipeline(precise(traced), pipeline, cache_dir)
    shared = {} if target == "cpu" else None  # the training step calls the predict program's kernels
    predict = Program.compile(forward, cache_dir, target, shared=shared)
    weights = {k: np.ascontiguousarray(v) for k, v in model.initial_values(dt).items()}
    train = None
    optimizer = optimizer or SGD()
    if model.loss is not None:  # the passes from the loss graph: autodiff, the optimizer, then the pipeline
        step_graph = cached_pipeline(precise(model.trace(train=True, with_loss=True)),
                                     f"{training_passes(optimizer, workers, bucket_mb)},{pipeline}", cache_dir)
        train = Program.compile(step_graph, cache_dir, target, shared=shared)
        _add_missing_state(step_graph, weights)  # optimizer state (momentum, moments, step) starts at zero
    _add_missing_state(forward, weights)
    loss = precise(trace_loss(model, traced.outputs[0].type)) if model.loss is not None else None
    return CompiledModel(model.name, signature(model.inputs), signature(model.targets), predict, train, weights,
                         optimizer.describe() if train else "none", loss_graph=loss)


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
    with atomic_file(path, CACHE, "w") as f:  # a concurrent compile reads all of it or nothing
        f.write(str(result))
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
    """State a graph carries that nobody initialised yet (optimizer state, the dropout step counter) starts
    at 0."""
    for kind, v in g.args:
        if kind is not ArgKind.input and v.name not in weights:
            weights[v.name] = np.zeros(v.type.concrete({}), v.type.dtype.np)
