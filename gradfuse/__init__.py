"""gradfuse: a neural-network compiler. Define a model with :mod:`gradfuse.nn`, trace it into
the graph IR, differentiate, fuse and compile it to Numba kernels."""

import os as _os

# Numba's OpenMP threads spin after a parallel kernel and fight OpenBLAS's threads for the cores:
# an MLP training step measured 48 ms with them against 6-7 ms with the workqueue layer, which
# sleeps. Set before Numba starts its threads (a user's NUMBA_THREADING_LAYER wins).
# Importing gradfuse (or gradfuse.ir) does not import Numba: the environment variable is what
# Numba reads when codegen first imports it.
if "NUMBA_THREADING_LAYER" not in _os.environ:
    import sys as _sys

    if "numba" in _sys.modules:
        _sys.modules["numba"].config.THREADING_LAYER = "workqueue"
    else:
        _os.environ["NUMBA_THREADING_LAYER"] = "workqueue"

from gradfuse import ir  # noqa: F401, I001  (the IR package must import before the DSL)
from gradfuse import functional, nn
from gradfuse.errors import GradfuseError, InputError, IRParseError, ShapeError, VerifyError
from gradfuse.ir.interpreter import interpret
from gradfuse.ir.types import DType, TensorType
from gradfuse.model import Model, trace
from gradfuse.pytorch import from_pytorch, to_pytorch
from gradfuse.state_dict import StateDictError


def __getattr__(name):
    """``gf.SGD`` and ``gf.Adam`` import the passes when first asked for, not with ``gradfuse``."""
    if name in ("SGD", "Adam"):
        from gradfuse.passes import optimizer

        return getattr(optimizer, name)
    raise AttributeError(f"module 'gradfuse' has no attribute {name!r}")


def compile(model, optimizer=None, **options):
    """Compile ``model`` for the CPU (``dtype="f64"`` computes in float64): see
    :func:`gradfuse.compiler.compile`."""
    from gradfuse.compiler import compile as _compile

    return _compile(model, optimizer, **options)


def load(path, recompile=False):
    """A compiled model from an artifact directory written by ``gradfuse compile``."""
    from gradfuse.runtime.artifact import load as _load

    return _load(path, recompile=recompile)


__version__ = "0.1.0"

__all__ = ["SGD", "Adam", "DType", "GradfuseError", "IRParseError", "InputError", "Model", "ShapeError",
           "StateDictError", "TensorType", "VerifyError", "compile", "from_pytorch", "functional", "interpret", "ir",
           "load", "nn", "to_pytorch", "trace"]
