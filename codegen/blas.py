"""GEMM for the generated kernels: CBLAS ``?gemm`` of the OpenBLAS that numpy itself uses.

Calling CBLAS directly, rather than ``np.dot`` inside ``@njit``, gives two things: numpy's
OpenBLAS (bundled with its wheels; measured ~6% faster here than scipy's, which Numba's
``np.dot`` calls), and ``alpha``/``beta``, so ``W -= lr * (xᵀ @ g)`` (the SGD update of a dense
layer) is one GEMM accumulating into W, with no gradient buffer and no extra pass.

The library is found at import; its ``cblas_?gemm`` addresses are given to LLVM under fixed
names, so kernels that call them are cached by Numba like any other. Where numpy ships no such
library (a numpy built against MKL or Accelerate), ``AVAILABLE`` is False and the code
generator falls back to ``np.dot``.
"""

from __future__ import annotations

import ctypes
import glob
import hashlib
import os

import llvmlite.binding as llvm
import numpy as np
from numba import njit, types

ROW_MAJOR, NO_TRANS, TRANS = 101, 111, 112
ROUTINES = ("sgemm", "dgemm", "sgemv", "dgemv")
# Numba's cache of a generated kernel holds this module's code linked in, but is keyed on the
# kernel's own file only: generated modules name this hash so that a change here renames them
with open(__file__, "rb") as _f:
    SOURCE_HASH = hashlib.sha256(_f.read()).hexdigest()[:16]


def _numpy_openblas() -> ctypes.CDLL | None:
    """numpy's bundled 64-bit-integer OpenBLAS (manylinux wheels: numpy.libs/libscipy_openblas64_*)."""
    libs = os.path.join(os.path.dirname(os.path.dirname(np.__file__)), "numpy.libs")
    for path in sorted(glob.glob(os.path.join(libs, "libscipy_openblas64_*.so*"))):
        try:
            lib = ctypes.CDLL(path)
            for routine in ROUTINES:
                getattr(lib, f"scipy_cblas_{routine}64_")
            return lib
        except (OSError, AttributeError):
            continue
    return None


_LIB = _numpy_openblas()
AVAILABLE = _LIB is not None
if AVAILABLE:
    # the GEMMs' threads follow NUMBA_NUM_THREADS like the kernels' (unless OpenBLAS is told
    # otherwise); this is numpy's BLAS, so numpy's matmuls in this process follow it too
    _threads = os.environ.get("NUMBA_NUM_THREADS")
    if _threads and not any(os.environ.get(v) for v in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS")):
        _LIB.scipy_openblas_set_num_threads64_(ctypes.c_int(int(_threads)))
    for _routine in ROUTINES:
        llvm.add_symbol(f"gradfuse_cblas_{_routine}",
                        ctypes.cast(getattr(_LIB, f"scipy_cblas_{_routine}64_"), ctypes.c_void_p).value)

_i32, _i64, _ptr = types.int32, types.int64, types.intp  # ILP64: dimensions are 64-bit
_sgemm, _dgemm = (types.ExternalFunction(f"gradfuse_cblas_{p}gemm", types.void(
    _i32, _i32, _i32, _i64, _i64, _i64, real, _ptr, _i64, _ptr, _i64, real, _ptr, _i64))
    for p, real in (("s", types.float32), ("d", types.float64)))
_sgemv, _dgemv = (types.ExternalFunction(f"gradfuse_cblas_{p}gemv", types.void(
    _i32, _i32, _i64, _i64, real, _ptr, _i64, _ptr, _i64, real, _ptr, _i64))
    for p, real in (("s", types.float32), ("d", types.float64)))


def require() -> None:
    """Called on import by generated modules that use these GEMMs."""
    if not AVAILABLE:
        raise ImportError("these kernels call the OpenBLAS bundled with numpy's wheels (numpy.libs/"
                          "libscipy_openblas64_*), which this numpy lacks: compile the model again here")


@njit(cache=True, nogil=True)
def gemm(transpose_a, transpose_b, alpha, a, b, beta, c):
    """``c = alpha * op(a) @ op(b) + beta * c`` (float32 or float64); shapes are the verified IR's."""
    a, b = np.ascontiguousarray(a), np.ascontiguousarray(b)  # no copy for C-layout arrays
    if not c.flags.c_contiguous:
        raise ValueError("gemm: the result buffer is not C-contiguous")
    m, n = c.shape
    k = a.shape[0] if transpose_a else a.shape[1]
    if ((a.shape[1] if transpose_a else a.shape[0]) != m or (b.shape[1] if transpose_b else b.shape[0]) != k
            or (b.shape[0] if transpose_b else b.shape[1]) != n):  # BLAS takes pointers: never out of bounds
        raise ValueError("gemm: operand shapes do not match the result")
    lda, ldb, ldc = max(1, a.shape[1]), max(1, b.shape[1]), max(1, n)
    if k == 0:  # an empty product: c = beta * c, c unread at beta = 0 (?gemv returns at once, c untouched)
        if beta == 0:
            c[...] = 0
        else:
            c *= beta
        return
    if m == 1:  # one row (inference on one example): GEMV, as numpy does; OpenBLAS's GEMM is 4x slower
        rows, cols = b.shape  # c[0] = alpha * op(b)ᵀ · a's one row or column (stride 1 either way) + beta * c[0]
        tb = NO_TRANS if transpose_b else TRANS
        if c.itemsize == 4:  # float32 (matmul takes floats only)
            _sgemv(ROW_MAJOR, tb, rows, cols, np.float32(alpha), b.ctypes.data, ldb, a.ctypes.data, 1,
                   np.float32(beta), c.ctypes.data, 1)
        else:
            _dgemv(ROW_MAJOR, tb, rows, cols, np.float64(alpha), b.ctypes.data, ldb, a.ctypes.data, 1,
                   np.float64(beta), c.ctypes.data, 1)
        return
    ta, tb = TRANS if transpose_a else NO_TRANS, TRANS if transpose_b else NO_TRANS
    if c.itemsize == 4:
        _sgemm(ROW_MAJOR, ta, tb, m, n, k, np.float32(alpha), a.ctypes.data, lda, b.ctypes.data, ldb,
               np.float32(beta), c.ctypes.data, ldc)
    else:
        _dgemm(ROW_MAJOR, ta, tb, m, n, k, np.float64(alpha), a.ctypes.data, lda, b.ctypes.data, ldb,
               np.float64(beta), c.ctypes.data, ldc)
