"""The scalar helpers are written once for both backends: each one, for each float type, compiles
with Numba CUDA to PTX for sm_90 (NVVM from the cuda-toolkit wheels; no GPU needed)."""

import math
import os
import subprocess
import sysconfig

import numpy as np
import pytest
from conftest import EXAMPLES

from gradfuse.codegen import scalar_lib
from gradfuse.passes.optimizer import SGD

cuda = pytest.importorskip("numba.cuda", reason="numba-cuda is a dependency of gradfuse")

SIGNATURES = {  # each helper's type, F standing for its float type
    "floor_f": "F(F)", "ldexp_f": "F(F, F)", "fast_tanh": "F(F)", "fast_exp": "F(F)", "sigmoid": "F(F)",
    "gelu_tanh": "F(F)", "one_plus_erf": "F(F)", "gelu_none": "F(F)", "gelu_grad_tanh": "F(F, F)",
    "gelu_grad_none": "F(F, F)",
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


# ---- every kernel of every example, as the CUDA backend prints it --------------------------------
PTXAS = os.path.join(sysconfig.get_paths()["purelib"], "nvidia", "cu13", "bin", "ptxas")
EXAMPLE_NAMES = sorted(os.path.splitext(f)[0] for f in os.listdir(EXAMPLES) if f.endswith(".py"))


def _example_kernels(example_model, name: str, tmp_path):
    """(module, {kernel: signature}) of the example's fused training step (or forward, without a
    loss) printed for the CUDA backend, imported here (``cuda.jit`` compiles nothing on import)."""
    from gradfuse.codegen import cuda as cuda_backend
    from gradfuse.codegen.kernel_ir import lower
    from gradfuse.passes.manager import run_pipeline
    from gradfuse.stages import training_passes

    model = example_model(name)
    pipeline = "simplify,fuse(target='cuda'),memory-plan(target='cuda')"
    if model.loss is not None:
        graph = run_pipeline(model.trace(train=True, with_loss=True), f"{training_passes(SGD())},{pipeline}").graph
    else:
        graph = run_pipeline(model.trace(), pipeline).graph
    prog = lower(graph, "cuda")
    source = cuda_backend.print_module(prog)
    path = tmp_path / f"gfcuda_{name}.py"
    path.write_text(source)
    from gradfuse.codegen.cpu import CPUBackend

    return CPUBackend.import_file(str(path)), cuda_backend.kernel_types(prog)


@pytest.mark.parametrize("name", EXAMPLE_NAMES)
def test_every_kernel_of_the_example_assembles_for_sm90(example_model, name, tmp_path):
    """Each kernel compiles to PTX for sm_90, and both ptxas (the pip wheel's) and nvJitLink
    assemble it with no register spills; the tiled GEMM uses shared memory."""
    from gradfuse.codegen import ptx as aot

    module, types = _example_kernels(example_model, name, tmp_path)
    sources = aot.kernel_ptx(module, types)
    distinct = {id(getattr(module, name)) for name in types}  # a layer like another's shares its kernels
    assert "gemm_f32" in sources and len(sources) == len(distinct) + sum(n.startswith("gemm_") for n in sources)
    for kernel, ptx in sources.items():
        assert aot.ptx_version(ptx) == aot.PTX_VERSION, f"{kernel}: PTX ISA {aot.ptx_version(ptx)}"
        src = tmp_path / f"{kernel}.ptx"
        src.write_text(ptx)
        out = subprocess.run([PTXAS, "-arch=sm_90", "-v", str(src), "-o", str(tmp_path / f"{kernel}.cubin")],
                             capture_output=True, text=True)
        assert out.returncode == 0, f"{name} {kernel}: ptxas failed:\n{out.stderr}"
        cost = aot.parse_cost(out.stderr)
        assert cost.spill_stores == cost.spill_loads == 0, f"{name} {kernel} spills:\n{out.stderr}"
        cubin, linked = aot.assemble(ptx, kernel)
        assert cubin[:4] == b"\x7fELF" and linked.spill_stores == linked.spill_loads == 0, f"{kernel}: {linked}"
        if kernel.startswith("gemm_"):
            assert cost.shared_bytes > 0, f"{kernel}: no shared memory\n{out.stderr}"
