"""The scalar helpers are written once for both backends: each one, for each float type, compiles
with Numba CUDA to PTX for sm_90 (NVVM from the cuda-toolkit wheels; no GPU needed)."""

import math

import numpy as np
import pytest

from gradfuse.codegen import scalar_lib

cuda = pytest.importorskip("numba.cuda", reason="numba-cuda is a dependency of gradfuse")

SIGNATURES = {  # each helper's type, F standing for its float type
    "floor_f": "F(F)", "ldexp_f": "F(F, F)", "fast_tanh": "F(F)", "fast_exp": "F(F)", "sigmoid": "F(F)",
    "gelu_tanh": "F(F)", "gelu_none": "F(F)", "gelu_grad_tanh": "F(F, F)", "gelu_grad_none": "F(F, F)",
    "hash32": "int64(int64)", "counter_uniform": "F(int64, int64, int64, int64)",
    "dropout": "F(F, int64, int64, int64, int64, F)",
}
TYPES = {"f32": "float32", "f64": "float64"}


def cuda_module(helpers: list[tuple[str, str]]) -> dict:
    """The CUDA source of ``helpers`` (and what they call), executed as a module would be."""
    used = scalar_lib.helpers_used("".join(f" {n}_{t}(" for n, t in helpers), backend="cuda")
    src = "\n\n".join(scalar_lib.helper_source(n, t, "@cuda.jit(device=True, inline=\"always\")", backend="cuda")
                      for n, t in scalar_lib.ordered_helpers(used))
    namespace = {"cuda": cuda, "math": math, "np": np, "f32": np.float32, "f64": np.float64, "i32": np.int32,
                 "i64": np.int64}
    exec(compile(src, "<cuda helpers>", "exec"), namespace)  # noqa: S102 - our own generated source
    return namespace


def test_every_helper_is_listed():
    assert set(SIGNATURES) == set(scalar_lib.HELPERS)


# every helper in both float types, but ldexp_f in float64, which nothing uses (float64 keeps libm's exp)
CASES = [(name, ftype) for name in sorted(SIGNATURES) for ftype in TYPES if (name, ftype) != ("ldexp_f", "f64")]


@pytest.mark.parametrize(("name", "ftype"), CASES)
def test_helper_compiles_to_ptx_for_sm90(name, ftype):
    signature = SIGNATURES[name].replace("F", TYPES[ftype])
    ptx, result = cuda.compile_ptx(cuda_module([(name, ftype)])[f"{name}_{ftype}"].py_func, signature, device=True,
                                   cc=(9, 0))
    assert ".target sm_90" in ptx and ".func" in ptx and str(result) == signature.split("(")[0]
