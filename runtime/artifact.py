"""Ahead-of-time artifacts: everything a later process needs to run a compiled model, without
tracing, passes or Numba compiling anything.

An artifact is a directory::

    manifest.json          format version, gradfuse/Numba versions, target, CPU, signature,
                           graph hashes and a SHA-256 for every other file
    ir/*.gfir              the printed IR of every stage (forward, backward, train, fused)
    kernels/*.py           the generated Numba modules, and kernels/__pycache__ their compiled code
    ptx/*.ptx              for target cuda: every GPU kernel's PTX (the manifest says for which chip)
    weights.npz            parameters, optimizer state, running statistics (no pickle)

It is written to a temporary directory and renamed into place, so a crash leaves the old
artifact or none. Loading checks every hash before any file is used (Numba's cache files are
its own pickled format: a tampered one is refused before Numba reads it).
"""

from __future__ import annotations

import glob
import hashlib
import json
import os
import shutil
from dataclasses import dataclass

import numpy as np

from gradfuse.errors import GradfuseError
from gradfuse.files import FileError, atomic_dir
from gradfuse.ir.graph import ArgKind
from gradfuse.ir.types import parse_type

FORMAT = "gradfuse-artifact"
FORMAT_VERSION = 1


class ArtifactError(GradfuseError):
    """An artifact that cannot be used as it is: the message says what differs."""


def cpu_identity() -> dict[str, str]:
    """What Numba compiles for: target triple, CPU name and features (its cache key)."""
    from numba.core.registry import cpu_target

    triple, name, features = cpu_target.target_context.codegen().magic_tuple()
    return {"triple": triple, "cpu": name, "features": features}


def _sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _versions() -> dict[str, str]:
    import numba

    import gradfuse

    return {"gradfuse": gradfuse.__version__, "numba": numba.__version__, "numpy": np.__version__}


@dataclass
class SaveReport:
    path: str
    files: int
    bytes: int


def warm_up(compiled, batch_sizes=(2,)) -> None:
    """Run each program on zeros and copies of the weights at each batch size, so that Numba
    compiles every kernel now (into the module's on-disk cache, which an artifact copies) and
    the buffers of those sizes are laid out before anything is timed."""
    from gradfuse.compiler import CompiledModel
    from gradfuse.runtime.program import compile_kernels

    programs = [p for p in (compiled.predict_program, compiled.train_program) if p is not None]
    if programs[0]._device:
        return  # GPU kernels: their PTX is written instead (_write_ptx); nothing runs where there may be no GPU
    compile_kernels(programs)  # the two programs' kernels in one split between the workers
    scratch = CompiledModel(compiled.name, compiled.inputs, compiled.targets, compiled.predict_program,
                            compiled.train_program, {k: v.copy() for k, v in compiled.weights.items()})
    for n in dict.fromkeys(max(n, 2) for n in batch_sizes):  # a training batch needs two rows (BatchNorm)
        def zeros(t, n=n):
            return np.zeros(t.concrete({s: n for s in t.symbols}), t.dtype.np)

        scratch.predict(*[zeros(t) for t in compiled.inputs.values()])
        if compiled.train_program is not None:
            scratch.train_step(*[zeros(t) for t in {**compiled.inputs, **compiled.targets}.values()], lr=0.0)


def save(compiled, path: str, stages: dict[str, str] | None = None) -> SaveReport:
    """Write ``compiled`` (a CompiledModel) as an artifact at ``path``, atomically: a failure
    (a full disk included) leaves the previous artifact, or none, and no temporary folder.

    ``stages`` maps a stage name to its printed IR (``forward``, ``backward``, ``train``); the
    fused IR that the programs run is always included."""
    warm_up(compiled)
    path = os.path.abspath(path)
    check_destination(path)
    with atomic_dir(path, "artifact", _is_artifact) as tmp:
        _write(compiled, tmp, stages or {})
    files = [f for f in glob.glob(os.path.join(path, "**"), recursive=True) if os.path.isfile(f)]
    return SaveReport(path, len(files), sum(os.path.getsize(f) for f in files))


def _is_artifact(path: str) -> bool:
    return os.path.exists(os.path.join(path, "manifest.json"))


def check_destination(path: str) -> None:
    """Refuse, before any work, to replace a folder that holds something other than an artifact."""
    if os.path.isdir(path) and os.listdir(path) and not _is_artifact(path):
        raise FileError("artifact", path, "exists and is not a gradfuse artifact; refusing to replace it "
                                          "(choose another name)")


def _write(compiled, root: str, stages: dict[str, str]) -> None:
    os.makedirs(os.path.join(root, "ir"))
    os.makedirs(os.path.join(root, "kernels", "__pycache__"))
    programs = {}
    if compiled.loss_graph is not None:
        stages = {**stages, "loss": str(compiled.loss_graph)}
    for name, text in stages.items():
        with open(os.path.join(root, "ir", f"{name}.gfir"), "w", encoding="utf-8") as f:
            f.write(text)
    device = compiled.predict_program._device
    for name, prog in compiled.programs().items():
        if prog.one_dispatch and not device:
            prog.compile_checked_step()  # into Numba's cache, which the artifact copies below
        ir_file = f"ir/{name}.fused.gfir"
        with open(os.path.join(root, ir_file), "w", encoding="utf-8") as f:
            f.write(str(prog.graph))
        module = os.path.basename(prog.path)
        shutil.copy2(prog.path, os.path.join(root, "kernels", module))  # keeps the mtime Numba's cache checks
        programs[name] = {"ir": ir_file, "module": f"kernels/{module}", "in_place": sorted(prog.in_place),
                          "graph_hash": hashlib.sha256(str(prog.graph).encode()).hexdigest()}
        if prog.backend.name == "cuda":
            programs[name]["ptx"] = _write_ptx(prog, root)
        elif not device:
            _copy_numba_cache(prog, root)
    np.savez(os.path.join(root, "weights.npz"), **compiled.weights)
    files = {}
    for f in sorted(glob.glob(os.path.join(root, "**"), recursive=True)):
        if os.path.isfile(f):
            files[os.path.relpath(f, root)] = _sha256(f)
    manifest = {
        "format": FORMAT, "format_version": FORMAT_VERSION, "versions": _versions(),
        "target": compiled.predict_program.backend.name,
        "cpu": cpu_identity(), **({"cuda": _cuda_identity(programs)} if "ptx" in programs.get("predict", {}) else {}),
        "model": compiled.name, "optimizer": compiled.optimizer,
        "inputs": {k: str(t) for k, t in compiled.inputs.items()},
        "targets": {k: str(t) for k, t in compiled.targets.items()},
        "programs": programs, "loss": "ir/loss.gfir" if compiled.loss_graph is not None else None,
        "files": files,
    }
    with open(os.path.join(root, "manifest.json"), "w", encoding="utf-8") as f:
        json.dump(manifest, f, indent=2)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())


def _copy_numba_cache(prog, root: str) -> None:
    module = os.path.basename(prog.path)
    stem = os.path.splitext(module)[0]
    cached = glob.glob(os.path.join(os.path.dirname(prog.path), "__pycache__", f"{stem}.*"))
    if not cached:
        raise ArtifactError(f"no compiled code found for {module} (is Numba's cache disabled?)")
    for c in cached:
        shutil.copy2(c, os.path.join(root, "kernels", "__pycache__", os.path.basename(c)))


def _write_ptx(prog, root: str) -> dict[str, str]:
    """Every GPU kernel of ``prog`` as PTX for the pinned compute capability (no GPU needed):
    ``{kernel: its file}``; a kernel that does not compile fails the save here, in words."""
    from gradfuse.codegen import ptx
    from gradfuse.codegen.cuda import kernel_types

    os.makedirs(os.path.join(root, "ptx"), exist_ok=True)
    files = {}
    for kernel, text in ptx.kernel_ptx(prog.module, kernel_types(prog.kernels)).items():
        rel = files[kernel] = f"ptx/{kernel}.ptx"
        if not os.path.exists(os.path.join(root, rel)):  # the GEMMs are in both programs
            with open(os.path.join(root, rel), "w", encoding="utf-8") as f:
                f.write(text)
    return files


def _cuda_identity(programs: dict) -> dict[str, str]:
    """The chip and PTX ISA the artifact's PTX was written for."""
    from gradfuse.codegen import ptx

    return {"compute_capability": f"{ptx.CC[0]}.{ptx.CC[1]}", "ptx_version": ptx.PTX_VERSION}


def read_manifest(path: str) -> dict:
    mpath = os.path.join(path, "manifest.json")
    if not os.path.isdir(path):
        raise ArtifactError(f"{path}: no such artifact directory")
    try:
        with open(mpath, encoding="utf-8") as f:
            manifest = json.load(f)
    except FileNotFoundError:
        raise ArtifactError(f"{path}: not a gradfuse artifact (no manifest.json)") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ArtifactError(f"{path}/manifest.json is corrupted: {e}") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise ArtifactError(f"{path}: manifest.json does not describe a gradfuse artifact")
    return manifest


def verify(path: str, manifest: dict, target: str | None = None, recompile: bool = False) -> None:
    """Refuse an artifact that is not exactly what its manifest says, in words (or, with
    ``target``, one compiled for another target)."""
    version = manifest.get("format_version")
    if version != FORMAT_VERSION:
        raise ArtifactError(f"{path}: artifact format version {version}, this gradfuse reads version "
                            f"{FORMAT_VERSION}: recompile the model with this gradfuse")
    if manifest.get("target") not in ("cpu", "cuda", "cudasim") or (target and manifest.get("target") != target):
        raise ArtifactError(f"{path}: compiled for target {manifest.get('target')!r}, not {target or 'cpu'!r}")
    for rel, digest in manifest.get("files", {}).items():
        full = os.path.join(path, rel)
        if not os.path.isfile(full):
            raise ArtifactError(f"{path}: {rel} is missing")
        if _sha256(full) != digest:
            raise ArtifactError(f"{path}: {rel} does not match its hash in the manifest (corrupted or edited)")
    if manifest["target"] != "cpu":
        _require_device(path, manifest)
        return  # the CPU's identity and Numba's version matter to Numba's CPU cache only
    here, there = cpu_identity(), manifest.get("cpu", {})
    if here != there and not recompile:
        differs = ", ".join(f"{k}: built for {there.get(k)!r}, this machine {here[k]!r}"
                            for k in here if here[k] != there.get(k))
        raise ArtifactError(f"{path}: compiled for another CPU ({differs[:300]}); load it with recompile=True "
                            "(gradfuse run --recompile) to compile its kernels for this one")
    versions = manifest.get("versions", {})
    if versions.get("numba") != _versions()["numba"] and not recompile:
        raise ArtifactError(f"{path}: compiled with Numba {versions.get('numba')}, this is Numba "
                            f"{_versions()['numba']}; load it with recompile=True to compile its kernels again")


def _require_device(path: str, manifest: dict) -> None:
    from gradfuse.codegen.targets import get_backend

    try:
        get_backend(manifest["target"]).require()
    except GradfuseError as e:
        chip = manifest.get("cuda", {})
        built = f" (PTX {chip.get('ptx_version')} for compute capability {chip.get('compute_capability')})" \
            if chip else ""
        raise ArtifactError(f"{path}: compiled for target {manifest['target']}{built}; {e}") from None


def load(path: str, recompile: bool = False, check_cpu: bool = True):
    """The CompiledModel in the artifact at ``path``; nothing is traced, no pass runs, and with a
    matching CPU Numba loads every kernel from the artifact's cache instead of compiling it."""
    from gradfuse.codegen.kernel_ir import lower
    from gradfuse.codegen.targets import get_backend
    from gradfuse.compiler import CompiledModel
    from gradfuse.ir.parser import parse_graph
    from gradfuse.runtime.program import Program, plan_storage

    path = os.path.abspath(path)
    manifest = read_manifest(path)
    verify(path, manifest, recompile=recompile or not check_cpu)
    backend = get_backend(manifest["target"])
    programs = {}
    for name, info in manifest["programs"].items():
        with open(os.path.join(path, info["ir"]), encoding="utf-8") as f:
            graph = parse_graph(f.read(), file=info["ir"])
        module_path = os.path.join(path, info["module"])
        with open(module_path, encoding="utf-8") as f:
            source = f.read()
        try:
            module = backend.import_file(module_path)
        except ImportError as e:  # e.g. kernels calling a BLAS this machine's numpy does not bundle
            raise ArtifactError(f"{path}: {info['module']}: {e}") from None
        kernels = lower(graph, backend.name)
        plan_storage(kernels, 256, backend.name)  # the storage the module's code assumes shared
        programs[name] = Program(graph, kernels, source, module_path, module,
                                 in_place=frozenset(info["in_place"]), backend=backend)
    with np.load(os.path.join(path, "weights.npz"), allow_pickle=False) as f:
        weights = {k: np.array(f[k]) for k in f.files}
    loss_graph = None
    if manifest.get("loss"):
        with open(os.path.join(path, manifest["loss"]), encoding="utf-8") as f:
            loss_graph = parse_graph(f.read(), file=manifest["loss"])
    for prog in programs.values():
        for kind, v in prog.graph.args:
            if kind is not ArgKind.input and (v.name not in weights or weights[v.name].shape !=
                                              v.type.concrete({}) or weights[v.name].dtype != v.type.dtype.np):
                raise ArtifactError(f"{path}: weights.npz has no {v.type} array for %{v.name}")
    return CompiledModel(manifest["model"], {k: parse_type(t) for k, t in manifest["inputs"].items()},
                         {k: parse_type(t) for k, t in manifest["targets"].items()}, programs["predict"],
                         programs.get("train"), weights, manifest.get("optimizer", "none"), loss_graph=loss_graph)
