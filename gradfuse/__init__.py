"""gradfuse: a neural-network compiler. Define a model with :mod:`gradfuse.nn`, trace it into
the graph IR, differentiate, fuse and compile it to Numba kernels."""

from gradfuse import (
           functional,
           ir,  # noqa: F401  (the IR package must import before the DSL)
           nn,
)
from gradfuse.errors import GradfuseError, InputError, IRParseError, ShapeError, VerifyError
from gradfuse.ir.interpreter import interpret
from gradfuse.ir.types import DType, TensorType
from gradfuse.model import Model, trace
from gradfuse.passes.optimizer import SGD, Adam


def compile(model, optimizer=None, **options):
    """Compile ``model`` for the CPU: see :func:`gradfuse.compiler.compile`."""
    from gradfuse.compiler import compile as _compile

    return _compile(model, optimizer, **options)


def load(path, recompile=False):
    """A compiled model from an artifact directory written by ``gradfuse compile``."""
    from gradfuse.runtime.artifact import load as _load

    return _load(path, recompile=recompile)


__version__ = "0.1.0"

__all__ = ["SGD", "Adam", "DType", "GradfuseError", "IRParseError", "InputError", "Model", "ShapeError",
           "TensorType", "VerifyError", "compile", "load", "functional", "interpret", "ir", "nn", "trace"]
