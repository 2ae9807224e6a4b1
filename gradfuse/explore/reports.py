"""The reports the page links to its graphs, as JSON-able dicts: per kernel its fusion facts, its
place in the memory plan and its generated source with each op's lines; the memory timeline; the
saved-for-backward ledger; gradient health; kernel times."""

from __future__ import annotations

import re

from gradfuse.codegen.kernel_ir import local_name
from gradfuse.ir.graph import Graph, Node, Value
from gradfuse.passes.fusion import FusionReport
from gradfuse.passes.memory import MemoryPlan

_ASSIGN = re.compile(r"^\s*(\w+)\s*(?:\[[^=]*\])?\s*[+\-*/]?=(?!=)")
_HEADER = re.compile(r"^\s*# %(\S+) = ")


def _arr(v: Value) -> str:
    return "b_" + local_name(v)[2:]


def kernel_functions(source: str) -> dict[str, list[str]]:
    """The generated module's kernel functions by name, each with its decorator."""
    lines = source.splitlines()
    out: dict[str, list[str]] = {}
    i = 0
    while i < len(lines):
        m = re.match(r"def (\w+)\(", lines[i])
        if m and m.group(1) not in ("step", "checked_step"):
            start = i - 1 if i and lines[i - 1].startswith("@") else i
            j = i + 1
            while j < len(lines) and (not lines[j] or lines[j][0] in " \t#"):
                j += 1
            body = lines[start:j]
            while body and not body[-1].strip():
                body.pop()
            out[m.group(1)] = body
            i = j
        else:
            i += 1
    return out


def shared_kernels(source: str) -> dict[str, str]:
    """Kernels whose code is another's (identical layers, compiled once): ``k12 = k5`` -> {k12: k5}."""
    return {m.group(1): m.group(2) for m in re.finditer(r"^(k\w+) = (k\w+)$", source, re.M)}


def mark_lines(lines: list[str], nodes: list[Node]) -> list[int]:
    """For each source line, the index in ``nodes`` of the op it computes (-1: loop structure,
    loads shared by several ops): the line assigning or storing its result, or naming it in the
    header comments; else the last op result the line mentions (``blas_gemm(..., b_out, ...)``)."""
    names: dict[str, int] = {}
    for k, n in enumerate(nodes):
        for v in n.outputs:
            names[local_name(v)] = k
            names[_arr(v)] = k
    by_value = {v.name: k for k, n in enumerate(nodes) for v in n.outputs}
    token = re.compile(r"\b[vb]_\w+")
    marks = []
    for line in lines:
        m = _HEADER.match(line)
        if m:
            marks.append(by_value.get(m.group(1), -1))
            continue
        m = _ASSIGN.match(line)
        if m and m.group(1) in names:
            marks.append(names[m.group(1)])
            continue
        found = [names[t] for t in token.findall(line) if t in names]
        marks.append(found[-1] if found and not line.lstrip().startswith(("for ", "def ", "@")) else -1)
    return marks


def kernel_reports(fused: Graph, report: FusionReport, plan: MemoryPlan, source: str,
                   fusion_name: dict[str, str]) -> dict[str, dict]:
    """Per kernel: kind, ops, traffic, the pairs not fused (and why), its memory-plan step and the
    placement of what it writes, and its source with each line's op. ``fusion_name``: the
    generated function of each kernel -> the kernel's name in the graph."""
    functions, shared = kernel_functions(source), shared_kernels(source)
    for alias, code in shared.items():  # the function that runs it, on its own buffers
        functions.setdefault(alias, functions.get(code, []))
    funcs = {fusion_name.get(fn, fn): (shared.get(fn, fn), lines) for fn, lines in functions.items()}
    step_of = {s.name: s.index for s in plan.steps}
    by_name = {k.name: k for k in report.kernels}
    by_function = {fn: by_name[fusion_name.get(fn, fn)] for fn in functions if fusion_name.get(fn, fn) in by_name}
    out = {}
    for k in report.kernels:
        members = {id(n) for n in k.nodes}
        rejected = [{"p": p.outputs[0].name, "po": p.op, "c": c.outputs[0].name, "co": c.op, "why": why,
                     "dir": "out" if id(p) in members else "in"}
                    for p, c, why in report.rejected if id(p) in members or id(c) in members]
        writes = []
        for v in k.writes:
            p = plan.values.get(v.name)
            if p is not None:
                writes.append({"v": v.name, "kind": p.kind, "b": p.nbytes, "first": p.first, "last": p.last,
                               "off": p.offset, "of": p.in_place_of or p.alias_of or p.storage})
        fn, lines = funcs.get(k.name, (None, []))
        # shared code names the values of the kernel that defines it, whose ops come in the same order
        owner = by_function.get(fn, k)
        out[k.name] = {
            "kind": k.kind, "ops": [n.outputs[0].name for n in k.nodes],
            "reads": [v.name for v in k.reads], "br": k.bytes_read, "bw": k.bytes_written,
            "rejected": rejected, "step": step_of.get(k.name), "writes": writes,
            "fn": fn, "src": lines, "marks": mark_lines(lines, owner.nodes),
        }
    return out


def fusion_summary(report: FusionReport) -> dict:
    return {"before": report.kernels_before, "after": len(report.kernels), "pairs": report.fused_pairs,
            "bytes_before": report.bytes_before, "bytes_after": report.bytes_after,
            "unfused": [{"v": n.outputs[0].name, "why": why} for n, why in report.unfused_elementwise],
            "text": report.render()}


def memory_timeline(plan: MemoryPlan) -> dict:
    """Buffers as rectangles over (schedule steps, arena bytes); the bytes live at each step."""
    live = [0] * len(plan.steps)
    for b in plan.buffers:
        for s in range(max(b.first, 0), min(b.last, len(plan.steps) - 1) + 1):
            live[s] += b.nbytes
    peak_step = max(range(len(live)), key=live.__getitem__) if live else 0
    return {"steps": [s.name for s in plan.steps], "peak": plan.peak, "bound": plan.lower_bound,
            "no_reuse": plan.no_reuse, "schedule": plan.schedule, "batch": plan.batch, "live": live,
            "peak_step": peak_step,
            "buffers": [{"v": b.name, "t": str(b.type), "b": b.nbytes, "o": b.offset, "f": b.first, "l": b.last,
                         "vals": b.values} for b in plan.buffers],
            "text": plan.render()}


def saved_ledger(saved: list[Value], batch: int) -> list[dict]:
    return [{"v": v.name, "t": str(v.type), "b": v.type.nbytes({s: batch for s in v.type.symbols})} for v in saved]
