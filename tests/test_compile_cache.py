"""gf.compile keeps the optimised IR of each program in its cache directory: compiling the same
model again parses it back instead of running the passes, and anything else runs them."""

import glob
import os

import pytest

import gradfuse as gf
import gradfuse.compiler as compiler


def pipelines(cache_dir) -> list[str]:
    return sorted(glob.glob(os.path.join(cache_dir, "pipelines", "*.gfir")))


def test_a_second_compile_reuses_the_optimised_ir(example_model, tmp_path, monkeypatch):
    model = example_model("digits_mlp")
    first = gf.compile(model, gf.SGD(momentum=0.9), cache_dir=str(tmp_path))
    assert len(pipelines(tmp_path)) == 2  # inference and training step
    monkeypatch.setattr(compiler, "run_pipeline", lambda g, p: pytest.fail(f"the passes ran for @{g.name}"))
    again = gf.compile(model, gf.SGD(momentum=0.9), cache_dir=str(tmp_path))
    for a, b in zip(first.programs().values(), again.programs().values(), strict=True):
        assert str(a.graph) == str(b.graph) and a.source == b.source and a.path == b.path


def test_another_optimizer_or_pipeline_runs_the_passes(example_model, tmp_path):
    model = example_model("digits_mlp")
    gf.compile(model, gf.SGD(momentum=0.9), cache_dir=str(tmp_path))
    gf.compile(model, gf.Adam(), cache_dir=str(tmp_path))  # same forward, another training step
    assert len(pipelines(tmp_path)) == 3
    gf.compile(model, gf.Adam(), cache_dir=str(tmp_path), pipeline="simplify,fuse")
    assert len(pipelines(tmp_path)) == 5


def test_damaged_cache_entries_are_recomputed(example_model, tmp_path):
    model = example_model("digits_mlp")
    want = [p.source for p in gf.compile(model, cache_dir=str(tmp_path)).programs().values()]
    for entry in pipelines(tmp_path):
        with open(entry, "w") as f:
            f.write("func @digits_mlp(  # cut short\n")
    assert [p.source for p in gf.compile(model, cache_dir=str(tmp_path)).programs().values()] == want
    for entry in pipelines(tmp_path):
        with open(entry) as f:
            assert "cut short" not in f.read()
