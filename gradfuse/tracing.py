"""Tracing: running a model's Python code on symbolic tensors records a graph.

A :class:`Tracer` is active while a model is traced; every op call goes through
:meth:`Tracer.emit`, which records the node with the user's source line and layer, and turns a
shape error into a message in the user's terms.
"""

from __future__ import annotations

import contextlib
import os
import sys
import threading
from dataclasses import dataclass

from gradfuse.errors import GradfuseError, ShapeError
from gradfuse.ir.graph import ArgKind, GraphBuilder, SourceLoc, Value
from gradfuse.ir.types import DType, TensorType

_LOCAL = threading.local()
_OWN_DIRS = tuple(
    os.path.dirname(os.path.abspath(m.__file__)) + os.sep
    for m in (sys.modules["gradfuse"], sys.modules["gradfuse.ir"])
)


def user_frame():
    """The innermost stack frame outside gradfuse itself: the line of the user's model code."""
    f = sys._getframe(1)
    while f is not None:
        name = f.f_code.co_filename
        if not name.startswith("<") and not os.path.abspath(name).startswith(_OWN_DIRS):
            return os.path.abspath(name), f.f_lineno
        f = f.f_back
    return None


@dataclass
class Scope:
    path: str  # "fc1", "blocks.0.attn"; "" at the top
    layer: str  # the module as the user wrote it: "Linear(64, 32)"


class Tracer:
    def __init__(self, name: str, *, train: bool, seed: int):
        self.builder = GraphBuilder(name)
        self.train = train
        self.seed = seed
        self.scopes: list[Scope] = [Scope("", "")]
        self.dropout_streams = 0
        self.rng_step: Value | None = None
        self.updates: list[tuple[Value, Value]] = []
        self.loc_override: tuple[str, int] | None = None  # (path, line) for code not in the user's frames
        self.tensors: dict = {}  # parameter/buffer path -> Tensor, filled by gradfuse.trace

    # -- scopes ------------------------------------------------------------------------------
    @property
    def scope(self) -> Scope:
        return self.scopes[-1]

    @contextlib.contextmanager
    def layer(self, path: str, layer: str):
        self.scopes.append(Scope(path, layer))
        try:
            yield
        finally:
            self.scopes.pop()

    def where(self) -> str:
        """``file:line: in layer fc1 = Linear(64, 32)`` for error messages."""
        frame = self.loc_override or user_frame()
        text = f"{frame[0]}:{frame[1]}" if frame else "<model>"
        if self.scope.path:
            text += f": in layer {self.scope.path} = {self.scope.layer}"
        return text

    def error(self, message: str, hint: str | None = None) -> ShapeError:
        return ShapeError(message, hint).located(self.where())

    # -- recording ---------------------------------------------------------------------------
    def emit(self, op: str, inputs, attrs=None, hint: str | None = None) -> tuple[Value, ...]:
        frame = self.loc_override or user_frame()
        loc = SourceLoc(os.path.basename(frame[0]), frame[1]) if frame else None
        try:
            return self.builder.emit(op, inputs, attrs, hint=hint, loc=loc, scope=self.scope.path)
        except ShapeError as e:
            if e.where is None:
                e.located(self.where())
            raise
        except GradfuseError as e:
            raise type(e)(f"{self.where()}: {e}") from None

    def const(self, value: float, dtype: DType) -> Value:
        return self.builder.scalar(value, dtype)

    def argument(self, name: str, type: TensorType, kind: ArgKind) -> Value:
        return self.builder.arg(name, type, kind, exact=True)

    def dropout_step(self) -> Value:
        """The training-step counter that seeds dropout masks; incremented once per step."""
        if self.rng_step is None:
            self.rng_step = self.argument("rng.step", TensorType(DType.i64, ()), ArgKind.state)
            (nxt,) = self.builder.emit("add", [self.rng_step, self.const(1, DType.i64)], hint="rng.step.next")
            self.updates.append((self.rng_step, nxt))
        return self.rng_step


def is_tracing() -> bool:
    return getattr(_LOCAL, "tracer", None) is not None


def current() -> Tracer:
    t = getattr(_LOCAL, "tracer", None)
    if t is None:
        raise GradfuseError("gradfuse ops work on traced tensors: call them inside a model traced "
                            "with gradfuse.trace (or Model.trace), not on plain arrays")
    return t


@contextlib.contextmanager
def tracing(tracer: Tracer):
    if getattr(_LOCAL, "tracer", None) is not None:
        raise GradfuseError("a model is already being traced in this thread")
    _LOCAL.tracer = tracer
    try:
        yield tracer
    finally:
        _LOCAL.tracer = None

