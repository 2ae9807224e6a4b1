"""``--target cuda`` from the command line on a machine without a GPU: the kernels print with their
cost on sm_90, an artifact is written with every kernel's PTX, and whatever would launch a kernel
is refused in one line (exit 1) before anything is copied or run."""

import json
import os
import re

import numpy as np
import pytest
from test_cli import MLP, run

from gradfuse.codegen import ptx

cuda = pytest.importorskip("numba.cuda", reason="numba-cuda is a dependency of gradfuse")
no_gpu = pytest.mark.skipif(cuda.is_available(), reason="checks the refusals of a machine without a GPU")


def test_show_kernels_prints_each_kernels_cost_on_sm90(capsys):
    code, out, _ = run(capsys, "show", MLP, "--stage", "kernels", "--target", "cuda")
    assert code == 0
    lines = out.splitlines()
    kernels = [lines[i + 1][4:lines[i + 1].index("(")] for i, line in enumerate(lines)
               if line == "@cuda.jit" and re.match(r"def (k\d+_\d+|gemm_f32)\(", lines[i + 1])]
    costs = dict(re.findall(r"^# (\w+) on sm_90: (.*)$", out, re.M))
    assert "k2_0" in kernels and "gemm_f32" in kernels
    assert set(costs) == set(kernels), "every launched kernel has its cost printed above it"
    assert all(c.endswith("no spills") for c in costs.values()), costs
    assert int(re.search(r"(\d+) B shared", costs["gemm_f32"]).group(1)) > 0
    assert "cuda.shared.array" in out and "def step(" in out


def test_show_loops_and_fused_take_the_target(capsys):
    code, out, _ = run(capsys, "show", MLP, "--stage", "loops", "--target", "cuda")
    assert code == 0 and "kernel k" in out


@pytest.fixture(scope="module")
def cuda_artifact(tmp_path_factory):
    from gradfuse.cli import main

    path = str(tmp_path_factory.mktemp("art") / "mlp_cuda")
    assert main(["compile", MLP, "--target", "cuda", "-o", path]) == 0
    return path


def test_a_cuda_artifact_holds_every_kernels_ptx(cuda_artifact):
    manifest = json.load(open(os.path.join(cuda_artifact, "manifest.json")))
    assert manifest["target"] == "cuda"
    assert manifest["cuda"] == {"compute_capability": "9.0", "ptx_version": ptx.PTX_VERSION}
    train = manifest["programs"]["train"]["ptx"]
    assert "gemm_f32" in train and len(train) >= 8
    for rel in train.values():
        text = open(os.path.join(cuda_artifact, rel)).read()
        assert rel in manifest["files"] and ".entry" in text and ptx.ptx_version(text) == ptx.PTX_VERSION
    cubin, cost = ptx.assemble(open(os.path.join(cuda_artifact, train["k2_0"])).read(), "k2_0")
    assert cubin[:4] == b"\x7fELF" and cost.spill_stores == 0


@no_gpu
def test_without_a_gpu_running_is_refused_in_one_line(capsys, cuda_artifact, tmp_path):
    x = tmp_path / "x.npy"
    np.save(x, np.zeros((2, 64), np.float32))
    for argv, says in [(["run", cuda_artifact, "--input", str(x)], "compiled for target cuda (PTX 9.0 for compute "
                                                                     "capability 9.0); --target cuda: no CUDA GPU"),
                       (["train", MLP, "--target", "cuda", "--epochs", "1"], "no CUDA GPU here"),
                       (["bench", "--target", "cuda"], "no CUDA GPU here"),
                       (["bench", "--target", "cudasim"], "would time Numba's simulator"),
                       (["train", MLP, "--target", "cudasim"], "needs NUMBA_ENABLE_CUDASIM=1")]:
        code, out, err = run(capsys, *argv)
        assert code == 1 and says in err and err.count("\n") == 1, (argv, err)
