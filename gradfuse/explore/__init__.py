"""``gradfuse explore``: one self-contained HTML page per model linking its forward graph, the
generated backward, the training step, its fused kernels, their generated source and the reports
(fusion decisions, memory plan, saved values, gradient health, kernel times).

The page needs no network and no server: the data is one JSON object inlined into it, the
layouts are computed here (``layout.py``), and a small script in the page draws SVG from them
(``page.py``). Data extraction: ``data.py`` (graphs, groups, layouts) and ``reports.py``.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass

from gradfuse.errors import GradfuseError
from gradfuse.ir.graph import Graph


@dataclass
class Stages:
    """The graphs a page is made of (from a model file or an artifact)."""

    name: str
    forward: Graph
    backward: Graph | None  # forward + generated backward (None: the model has no loss)
    saved: list  # the forward values the backward reads
    train: Graph | None  # the unfused training step
    source_dir: str | None  # where the model's source files are
    origin: str  # what the page was made from, in words
    model: object = None  # the Model, when made from a model file (gradcheck, example data)
    weights: dict | None = None  # an artifact's weights (profiling)


@dataclass
class ExploreReport:
    path: str
    bytes: int
    seconds: float
    nodes: int  # the nodes of every view
    layouts: int  # the layouts written (one per group and view)


def stages_of_model(spec: str, optimizer=None, dtype: str | None = None) -> Stages:
    """The stages as ``gradfuse.compile`` makes them (``dtype``: every float in that precision)."""
    from gradfuse.loader import load_model
    from gradfuse.model import float_dtype
    from gradfuse.passes.autodiff import differentiate
    from gradfuse.passes.optimizer import SGD, add_optimizer
    from gradfuse.passes.precision import with_float

    model = load_model(spec)
    dt = None if dtype is None else float_dtype(dtype)

    def precise(g: Graph) -> Graph:
        return g if dt is None else with_float(g, dt)

    folder = os.path.dirname(os.path.abspath(spec.split(":")[0]))
    forward = precise(model.trace())
    if model.loss is None:
        return Stages(model.name, forward, None, [], None, folder, spec, model)
    grads = differentiate(precise(model.trace(train=True, with_loss=True)))
    train = add_optimizer(grads, optimizer or SGD()).graph
    return Stages(model.name, forward, grads.graph, grads.saved, train, folder, spec, model)


def stages_of_artifact(path: str) -> Stages:
    """The stages an artifact keeps in ``ir/`` (forward, backward, train): its optimizer is the one
    it was compiled with."""
    import numpy as np

    from gradfuse.ir.parser import parse_graph
    from gradfuse.passes.autodiff import gradients_of
    from gradfuse.runtime.artifact import read_manifest

    manifest = read_manifest(path)

    def read(name: str) -> Graph | None:
        file = os.path.join(path, "ir", f"{name}.gfir")
        if not os.path.exists(file):
            return None
        with open(file, encoding="utf-8") as f:
            return parse_graph(f.read(), file=file)

    forward = read("forward")
    if forward is None:
        raise GradfuseError(f"{path}: the artifact has no ir/forward.gfir (made by an older gradfuse?): explore "
                            "the model file instead")
    backward, train = read("backward"), read("train")
    saved = gradients_of(backward).saved if backward is not None else []
    weights = None
    try:
        with np.load(os.path.join(path, "weights.npz"), allow_pickle=False) as f:
            weights = {k: np.array(f[k]) for k in f.files}
    except (OSError, ValueError):
        pass
    return Stages(manifest.get("model", forward.name), forward, backward, saved, train, None,
                  f"artifact {path}", None, weights)


def build_payload(st: Stages, batch: int = 256, *, profile: bool = False, health: bool = False,
                  command: str = "", pipeline=None) -> dict:
    """Everything the page shows, as one JSON-able dict; ``pipeline``: the result of the passes
    on the training step, where the caller ran them already."""
    from gradfuse.codegen.kernel_ir import lower
    from gradfuse.codegen.targets import get_backend
    from gradfuse.passes.manager import run_pipeline
    from gradfuse.runtime.program import plan_storage

    from . import data, reports

    step = st.train if st.train is not None else st.forward
    result = pipeline or run_pipeline(step, f"simplify,fuse(batch={batch}),memory-plan(batch={batch})")
    fused = result.graph
    fusion, plan = result.results["fuse"].data, result.results["memory-plan"].data
    lowered = lower(fused)
    in_place = plan_storage(lowered, 256)  # as Program.compile plans it
    source = get_backend("cpu").print_module(lowered, in_place)
    # codegen numbers kernels in schedule order; the graph, the fusion report and the plan keep fusion's names
    fusion_name = {k.name: k.nodes[0].kernel for k in lowered.kernels if k.nodes and k.nodes[0].kernel}

    views = [data.graph_view("forward", "forward (inference)", st.forward, batch)]
    if st.backward is not None:
        views.append(data.graph_view("backward", "forward + generated backward", st.backward, batch))
    if st.train is not None:
        views.append(data.graph_view("train", "training step: forward, backward, optimizer update", st.train, batch))
    views.append(data.graph_view("kernels", "training step, fused into kernels" if st.train is not None
                                 else "inference, fused into kernels", fused, batch, by_kernel=True))
    kernel_info = reports.kernel_reports(fused, fusion, plan, source, fusion_name)
    for gid, grp in views[-1]["groups"].items():
        if gid.startswith("k:") and gid[2:] in kernel_info:
            grp["label"] = f"{gid[2:]} · {kernel_info[gid[2:]]['kind']}"
    payload = {
        "model": st.name, "origin": st.origin, "batch": batch, "command": command,
        "views": views,
        "kernels": kernel_info,
        "fusion": reports.fusion_summary(fusion),
        "memory": reports.memory_timeline(plan),
        "saved": reports.saved_ledger(st.saved, batch),
        "sources": data.source_lines([st.forward] + [g for g in (st.backward, fused) if g is not None],
                                     st.source_dir),
        "module": source,
    }
    if health:
        payload["health"] = _health(st)
        payload["gradcheck"] = _gradcheck(st)
    if profile:
        payload["profile"] = _profile(st, fused, batch, fusion_name)
    return payload


def _health(st: Stages) -> list[dict]:
    from gradfuse import gradcheck as gc

    return [{"layer": h.layer, "norm": h.grad_norm, "flag": h.flag, "shape": list(h.shape)}
            for h in gc.gradient_health(st.model, batch=64)]


def _gradcheck(st: Stages) -> list[dict]:
    """Each parameter's gradient against finite differences, as ``gradfuse gradcheck`` reports it."""
    from gradfuse import gradcheck as gc

    return [{"name": r.name, "shape": list(r.shape), "err": None if r.zero else r.worst_rel_error,
             "noise": None if r.zero else r.fd_noise, "verdict": r.verdict} for r in gc.gradcheck(st.model)]


def _profile(st: Stages, fused: Graph, batch: int, fusion_name: dict[str, str], steps: int = 5) -> dict:
    """Milliseconds per kernel (the median of ``steps`` timed runs after a warm-up)."""
    import numpy as np

    from gradfuse.ir.graph import ArgKind
    from gradfuse.runtime.program import Program

    program = Program.compile(fused)
    values = st.model.initial_values() if st.model is not None else dict(st.weights or {})
    rng = np.random.default_rng(0)
    feeds = {}
    if st.model is not None:
        from gradfuse.gradcheck import example_feeds

        feeds = example_feeds(st.model, fused, batch)
    for kind, v in fused.args:
        if v.name == "lr":
            feeds[v.name] = np.asarray(0.01, v.type.dtype.np)
        elif kind is not ArgKind.input:
            feeds[v.name] = values[v.name].copy() if v.name in values else np.zeros(v.type.concrete({}),
                                                                                     v.type.dtype.np)
        elif v.name not in feeds:
            shape = v.type.concrete({s: batch for s in v.type.symbols})
            feeds[v.name] = (rng.normal(size=shape) if v.type.dtype.is_float
                             else rng.integers(0, 2, size=shape)).astype(v.type.dtype.np)
    seconds = program.profile(feeds, steps)
    return {"steps": steps, "ms": {fusion_name.get(k, k): s * 1e3 for k, s in seconds.items()},
            "compile_s": program.compile_seconds}


def write_page(payload: dict, path: str) -> int:
    from gradfuse.files import atomic_file

    from .page import render

    html = render(payload)
    with atomic_file(path, "page", "w") as f:
        f.write(html)
    return len(html.encode("utf-8"))


def explore(spec: str, output: str, batch: int = 256, optimizer=None, profile: bool = False,
            gradcheck: bool = False, command: str = "", dtype: str | None = None) -> ExploreReport:
    """Write the page of a model file or an artifact directory to ``output`` (an artifact keeps its
    own optimizer and precision: ``optimizer`` and ``dtype`` are for model files)."""
    start = time.perf_counter()
    if batch < 1:
        raise GradfuseError(f"--batch must be at least 1, got {batch}")
    st = stages_of_artifact(spec) if os.path.isdir(spec) else stages_of_model(spec, optimizer, dtype)
    if gradcheck and st.model is None:
        raise GradfuseError("--gradcheck needs the model file (an artifact keeps no Python code to check)")
    if gradcheck and st.train is None:
        raise GradfuseError(f"--gradcheck: model {st.name} has no loss to differentiate")
    payload = build_payload(st, batch, profile=profile, health=gradcheck, command=command)
    size = write_page(payload, output)
    return ExploreReport(output, size, time.perf_counter() - start,
                         sum(len(v["nodes"]) for v in payload["views"]),
                         sum(len(v["layouts"]) for v in payload["views"]))


def dumps(payload: dict) -> str:
    """The payload as JSON safe inside a <script> element."""
    return json.dumps(payload, separators=(",", ":"), ensure_ascii=False).replace("</", "<\\/")
