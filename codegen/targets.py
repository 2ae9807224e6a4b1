"""What each backend declares about itself, for the passes that plan for it: light enough to
import without Numba (fusion and memory planning ask it; ``get_backend`` loads the printer).

A backend's GEMM is the one fusion decision that depends on the target: what it can take into
itself is a declared capability here, never an assumption of the passes.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass


@dataclass(frozen=True)
class GemmFusion:
    prologue: bool  # elementwise work on the operands done inside the GEMM (BLAS reads them from memory: no)
    epilogue: bool  # elementwise work on the product in the GEMM's kernel (bias, activation, residual)
    product_in_memory: bool  # the whole product is written to memory before the epilogue reads it (BLAS)
    accumulate: bool  # C = alpha·(A @ B) + beta·C into an existing array (SGD folded into the weight gradient)


@dataclass(frozen=True)
class Target:
    name: str
    gemm: GemmFusion
    module: str  # where the backend object lives (imported on first use: Numba comes with it)
    attribute: str = "BACKEND"  # its name there

    def backend(self):
        return getattr(importlib.import_module(self.module), self.attribute)


TARGETS = {
    "cpu": Target("cpu", GemmFusion(prologue=False, epilogue=True, product_in_memory=True, accumulate=True),
                  "gradfuse.codegen.cpu"),
    # the tiled GEMM writes its product before the epilogue (a phase of its own) and does not accumulate
    "cuda": Target("cuda", GemmFusion(prologue=False, epilogue=True, product_in_memory=True, accumulate=False),
                   "gradfuse.codegen.cuda"),
    "cudasim": Target("cudasim", GemmFusion(prologue=False, epilogue=True, product_in_memory=True, accumulate=False),
                      "gradfuse.codegen.cuda", "SIM_BACKEND"),
}


def target(name: str) -> Target:
    try:
        return TARGETS[name]
    except KeyError:
        from gradfuse.errors import GradfuseError

        raise GradfuseError(f"unknown target {name!r} (targets: {', '.join(TARGETS)})") from None


def get_backend(name: str = "cpu"):
    """The backend object the runtime drives (see codegen/cpu.py's ``CPUBackend``)."""
    return target(name).backend()
