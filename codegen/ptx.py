"""The CUDA kernels ahead of time, with no GPU: each kernel's PTX for a compute capability
(Numba's NVVM from the pip CUDA wheels), assembled to a cubin by nvJitLink, whose log says what
the kernel costs on the chip (registers, shared memory, spills). ``show --stage kernels --target
cuda`` prints that; an artifact for the GPU stores the PTX.

PTX ISA and compute capability are pinned together with the wheels (cuda-toolkit 13.0): NVVM 13.5
writes PTX 9.5, which a CUDA 13.0 driver and ptxas refuse.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

CC = (9, 0)  # the H200's (sm_90)
PTX_VERSION = "9.0"  # what NVVM 13.0 writes (tests/test_cuda_ptx.py checks every kernel's)
GEMM_TYPES = {F: f"void({t}[:, :], {t}[:, :], {t}[:, :], int64, int64, int64, int64, int64)"
              for F, t in (("f32", "float32"), ("f64", "float64"))}


@dataclass(frozen=True)
class KernelCost:
    """What nvJitLink reports for one kernel assembled for the chip."""

    registers: int
    shared_bytes: int
    spill_stores: int
    spill_loads: int

    def __str__(self) -> str:
        spills = "no spills" if not (self.spill_stores or self.spill_loads) else \
            f"SPILLS {self.spill_stores} B stored, {self.spill_loads} B loaded"
        return f"{self.registers} registers, {self.shared_bytes} B shared memory, {spills}"


def kernel_ptx(module, types: dict[str, str], cc: tuple[int, int] = CC) -> dict[str, str]:
    """PTX of every distinct kernel of a printed CUDA module (``types``: codegen.cuda.kernel_types;
    a kernel that is another's code under its name, ``k12_0 = k5_0``, is compiled as that one),
    and of the tiled GEMMs the module's step launches."""
    from numba import cuda

    source = getattr(module, "__source__", None) or open(module.__file__).read()
    wanted = {**types, **{f"gemm_{F}": t for F, t in GEMM_TYPES.items() if f"gemm_{F}[" in source}}
    seen: set[int] = set()
    out = {}
    for name, signature in wanted.items():
        kernel = getattr(module, name)
        if id(kernel) not in seen:
            seen.add(id(kernel))
            out[name] = cuda.compile_ptx(kernel.py_func, signature, cc=cc)[0]
    return out


def ptx_version(ptx: str) -> str:
    """The PTX ISA version a PTX text declares (``.version 9.0`` -> ``9.0``)."""
    found = re.search(r"^\.version\s+(\S+)", ptx, re.M)
    return found.group(1) if found else "unknown"


def assemble(ptx: str, name: str, cc: tuple[int, int] = CC) -> tuple[bytes, KernelCost]:
    """The cubin of one kernel's PTX, linked by nvJitLink for ``sm_{cc}``, and its cost. Raises
    RuntimeError with nvJitLink's log where the PTX does not assemble."""
    from cuda.bindings import nvjitlink

    handle = nvjitlink.create(2, [f"-arch=sm_{cc[0]}{cc[1]}", "-verbose"])
    try:
        data = ptx.encode()
        try:
            nvjitlink.add_data(handle, nvjitlink.InputType.PTX, data, len(data), name)
            nvjitlink.complete(handle)
        except nvjitlink.nvJitLinkError as e:
            raise RuntimeError(f"{name}: nvJitLink refused the PTX ({e}):\n{_log(handle, error=True)}") from None
        cubin = bytearray(nvjitlink.get_linked_cubin_size(handle))
        nvjitlink.get_linked_cubin(handle, cubin)
        return bytes(cubin), parse_cost(_log(handle))
    finally:
        nvjitlink.destroy(handle)


def _log(handle, error: bool = False) -> str:
    from cuda.bindings import nvjitlink

    size = (nvjitlink.get_error_log_size if error else nvjitlink.get_info_log_size)(handle)
    text = bytearray(size)
    (nvjitlink.get_error_log if error else nvjitlink.get_info_log)(handle, text)
    return text.decode(errors="replace")


def parse_cost(log: str) -> KernelCost:
    """Registers, shared memory and spills from an assembler's verbose log (nvJitLink or ptxas)."""
    def number(pattern: str) -> int:
        found = re.search(pattern, log)
        return int(found.group(1)) if found else 0

    return KernelCost(registers=number(r"[Uu]sed (\d+) registers"), shared_bytes=number(r"(\d+) bytes smem"),
                      spill_stores=number(r"(\d+) bytes spill stores"), spill_loads=number(r"(\d+) bytes spill loads"))


def costs(module, types: dict[str, str], cc: tuple[int, int] = CC) -> dict[str, tuple[str, KernelCost]]:
    """Each kernel's PTX and what it costs assembled: ``{name: (ptx, cost)}``."""
    return {name: (ptx, assemble(ptx, name, cc)[1]) for name, ptx in kernel_ptx(module, types, cc).items()}


def with_costs(source: str, prog, cc: tuple[int, int] = CC) -> str:
    """A printed CUDA module's source with each kernel's cost on the chip above its definition
    (``show --stage kernels --target cuda``). ``prog``: the KernelProgram it was printed from."""
    import os
    import tempfile

    from .cpu import CPUBackend
    from .cuda import kernel_types

    with tempfile.TemporaryDirectory() as tmp:  # imported as a file: Numba reads kernels' source from it
        path = os.path.join(tmp, "gfcuda_show.py")
        with open(path, "w") as f:
            f.write(source)
        found = costs(CPUBackend.import_file(path), kernel_types(prog), cc)
    arch = f"sm_{cc[0]}{cc[1]}"
    version = ptx_version(next(iter(found.values()))[0]) if found else "?"
    lines = source.splitlines()
    out = [f"# each kernel as PTX {version} for {arch}, assembled by nvJitLink: registers, shared memory, spills"]
    for i, line in enumerate(lines):
        name = line[4:line.index("(")] if line.startswith("def ") and "(" in line else None
        if name in found and i and lines[i - 1].startswith("@cuda.jit"):
            out.insert(len(out) - 1, f"# {name} on {arch}: {found[name][1]}")
        out.append(line)
    return "\n".join(out) + "\n"
