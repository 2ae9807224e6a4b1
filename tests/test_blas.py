"""The CBLAS calls of the generated GEMMs (numpy's OpenBLAS, with alpha and beta) against numpy."""

import itertools

import numpy as np
import pytest

from gradfuse.codegen import blas

pytestmark = pytest.mark.skipif(not blas.AVAILABLE, reason="numpy has no bundled OpenBLAS here: kernels use np.dot")


@pytest.mark.parametrize("dtype, m, ta, tb", list(itertools.product([np.float32, np.float64], [1, 2, 5],
                                                                   [False, True], [False, True])))
def test_gemm_is_alpha_op_a_op_b_plus_beta_c(dtype, m, ta, tb):
    """m = 1 takes GEMV (one example at inference), the others GEMM; every transpose combination."""
    rng = np.random.default_rng(m)
    k, n = 7, 3
    a = rng.standard_normal((k, m) if ta else (m, k)).astype(dtype)
    b = rng.standard_normal((n, k) if tb else (k, n)).astype(dtype)
    c = rng.standard_normal((m, n)).astype(dtype)
    want = -0.5 * ((a.T if ta else a) @ (b.T if tb else b)) + 2 * c
    blas.gemm(ta, tb, dtype(-0.5), a, b, dtype(2.0), c)
    np.testing.assert_allclose(c, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("m, beta", list(itertools.product([1, 2], [0.0, 0.5, 1.0])))
def test_gemm_over_an_empty_inner_axis_is_beta_c(m, beta):
    """Found by the mixed graphs (tests/strategies.py): a matmul contracting an axis of size 0 (a
    slice [1:1]) is beta * c, and c unread at beta = 0; at m = 1 GEMV returned at once, leaving
    what the buffer held (NaN from a reused arena buffer)."""
    a, b = np.ones((m, 0), np.float32), np.ones((0, 3), np.float32)
    c = np.full((m, 3), np.nan if beta == 0 else 2.0, np.float32)
    blas.gemm(False, False, np.float32(1), a, b, np.float32(beta), c)
    np.testing.assert_array_equal(c, np.full((m, 3), 0.0 if beta == 0 else 2.0 * beta, np.float32))


def test_gemm_refuses_a_non_contiguous_result():
    a, b = np.ones((2, 3), np.float32), np.ones((3, 4), np.float32)
    c = np.zeros((4, 2), np.float32).T
    with pytest.raises(ValueError, match="not C-contiguous"):
        blas.gemm(False, False, np.float32(1), a, b, np.float32(0), c)
    assert not c.any()


def test_gemm_copies_non_contiguous_operands():
    rng = np.random.default_rng(0)
    a = rng.standard_normal((6, 3)).astype(np.float32)[::2]  # (3, 3), strided rows
    b = rng.standard_normal((3, 8)).astype(np.float32)[:, ::2]  # (3, 4), strided columns
    c = np.zeros((3, 4), np.float32)
    blas.gemm(False, False, np.float32(1), a, b, np.float32(0), c)
    np.testing.assert_allclose(c, a @ b, rtol=1e-5)


def test_gemm_threads_follow_numba_num_threads():
    import os
    import subprocess
    import sys

    code = ("import gradfuse.codegen.blas\nfrom threadpoolctl import threadpool_info\n"
            "print([i['num_threads'] for i in threadpool_info() if 'openblas64' in i['filepath']])")
    env = {k: v for k, v in os.environ.items() if k not in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS")}
    out = subprocess.run([sys.executable, "-c", code], env={**env, "NUMBA_NUM_THREADS": "1"},
                         capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[1]"


def test_gemm_refuses_operands_that_do_not_match_the_result():
    a, b, c = np.ones((2, 3), np.float32), np.ones((4, 4), np.float32), np.zeros((2, 4), np.float32)
    with pytest.raises(ValueError, match="do not match"):
        blas.gemm(False, False, np.float32(1), a, b, np.float32(0), c)
    assert not c.any()
