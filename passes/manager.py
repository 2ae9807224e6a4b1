"""Pass infrastructure: named passes with options, pipelines, verification and IR dumps.

A pass is a frozen dataclass with a ``name`` and a ``run(graph) -> PassResult``; its fields are
its options. A pipeline is a list of passes, or a string such as ``"simplify,fuse,memory-plan"``
(options as ``fuse(max_ops=16)``). After every pass the verifier runs; with ``dump_dir`` (or
the ``GRADFUSE_DUMP`` environment variable) the IR after each pass is written to
``DIR/NN-name.gfir`` with the pass's report beside it.
"""

from __future__ import annotations

import ast
import dataclasses
import os
import re
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

from gradfuse.errors import GradfuseError
from gradfuse.ir.graph import Graph
from gradfuse.ir.verifier import verify


@dataclass
class PassResult:
    graph: Graph
    report: str = ""  # what the pass did, in words, for the dump and --explain
    data: Any = None  # a pass's structured result (e.g. the fusion report, the memory plan)


class Pass:
    """Base of passes: subclasses are frozen dataclasses with a class-level ``name``."""

    name: ClassVar[str]

    def run(self, graph: Graph) -> PassResult:
        raise NotImplementedError

    def spec(self) -> str:
        """The pass as it is written in a pipeline string."""
        options = [f"{f.name}={getattr(self, f.name)!r}" for f in dataclasses.fields(self)
                   if getattr(self, f.name) != f.default]
        return f"{self.name}({', '.join(options)})" if options else self.name


PASSES: dict[str, type[Pass]] = {}


def register_pass(cls: type[Pass]) -> type[Pass]:
    assert cls.name not in PASSES, f"pass {cls.name} registered twice"
    PASSES[cls.name] = cls
    return cls


@dataclass
class PassRecord:
    name: str
    seconds: float
    nodes_before: int
    nodes_after: int
    report: str


@dataclass
class PipelineResult:
    graph: Graph
    records: list[PassRecord] = field(default_factory=list)
    results: dict[str, PassResult] = field(default_factory=dict)  # by pass name, the last run of each

    def timing_table(self) -> str:
        rows = [f"  {r.name:<16} {r.seconds * 1e3:8.1f} ms  nodes {r.nodes_before:>4} -> {r.nodes_after:<4}"
                for r in self.records]
        return "\n".join(["passes:"] + rows)


_SPEC = re.compile(r"^\s*([a-z][a-z0-9-]*)\s*(?:\((.*)\))?\s*$")


def parse_pipeline(text: str) -> list[Pass]:
    """``"simplify, fuse(max_ops=8), memory-plan"`` -> pass objects."""
    _load_passes()
    passes = []
    for part in _split_top_level(text):
        m = _SPEC.match(part)
        if not m:
            raise GradfuseError(f"pipeline: cannot read {part.strip()!r} (expected name or name(option=value))")
        name, args = m.group(1), m.group(2)
        if name not in PASSES:
            raise GradfuseError(f"pipeline: unknown pass {name!r} (known: {', '.join(sorted(PASSES))})")
        options = {}
        if args and args.strip():
            try:
                call = ast.parse(f"f({args})", mode="eval").body
                assert isinstance(call, ast.Call) and not call.args
                options = {kw.arg: ast.literal_eval(kw.value) for kw in call.keywords}
            except (SyntaxError, ValueError, AssertionError):
                raise GradfuseError(f"pipeline: bad options for {name}: {args!r} (write option=value, ...)") from None
        try:
            passes.append(PASSES[name](**options))
        except TypeError:
            known = ", ".join(f.name for f in dataclasses.fields(PASSES[name])) or "none"
            raise GradfuseError(f"pipeline: {name} does not take {', '.join(options)} (options: {known})") from None
    return passes


def _split_top_level(text: str) -> list[str]:
    parts, depth, current = [], 0, ""
    for ch in text:
        depth += ch == "("
        depth -= ch == ")"
        if ch == "," and depth == 0:
            parts.append(current)
            current = ""
        else:
            current += ch
    if current.strip():
        parts.append(current)
    return parts


def run_pipeline(graph: Graph, passes: Sequence[Pass] | str, dump_dir: str | None = None) -> PipelineResult:
    """Run passes in order, verifying after each; dump the IR after each if asked."""
    if isinstance(passes, str):
        passes = parse_pipeline(passes)
    dump_dir = dump_dir or os.environ.get("GRADFUSE_DUMP") or None
    result = PipelineResult(graph)
    if dump_dir:
        _write(os.path.join(dump_dir, "00-input.gfir"), str(graph))
    for i, p in enumerate(passes, start=1):
        before = len(result.graph.nodes)
        start = time.perf_counter()
        out = p.run(result.graph)
        verify(out.graph)
        seconds = time.perf_counter() - start
        result.records.append(PassRecord(p.spec(), seconds, before, len(out.graph.nodes), out.report))
        result.results[p.name] = out
        result.graph = out.graph
        if dump_dir:
            stem = os.path.join(dump_dir, f"{i:02d}-{p.name}")
            _write(stem + ".gfir", str(out.graph))
            if out.report:
                _write(stem + ".txt", out.report + "\n")
    return result


def _write(path: str, text: str) -> None:
    from gradfuse.files import atomic_file

    with atomic_file(path, "IR dump", "w") as f:
        f.write(text)


def _load_passes() -> None:
    from . import autodiff, distributed, fusion, memory, optimizer, simplify  # noqa: F401  (each registers its passes)
