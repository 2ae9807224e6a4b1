"""The fusion pass: kernel groups, the explained report, and unchanged numbers."""

import numpy as np
import pytest
from hypothesis import given, settings
from strategies import graphs, random_feeds

import gradfuse as gf
from gradfuse.ir.parser import parse_graph
from gradfuse.ir.registry import role
from gradfuse.passes.fusion import fuse, kernels
from gradfuse.passes.optimizer import SGD, Adam
from gradfuse.stages import training_step


@pytest.fixture(scope="module")
def mlp_step(example_model):
    return training_step(example_model("digits_mlp"), SGD(momentum=0.9))


@pytest.fixture(scope="module")
def mlp_fused(mlp_step):
    return fuse(mlp_step.graph, batch=256)


def assert_same_results(g, h, feeds):
    a, b = gf.interpret(g, feeds), gf.interpret(h, feeds)
    for x, y in zip(a.outputs, b.outputs, strict=True):
        np.testing.assert_array_equal(x, y)
    assert a.state.keys() == b.state.keys()
    for k in a.state:
        np.testing.assert_array_equal(a.state[k], b.state[k])


def test_fused_training_step_is_golden_and_round_trips(mlp_fused, golden):
    graph, report = mlp_fused
    text = str(graph)
    golden("digits_mlp.fused.gfir", text)
    golden("digits_mlp.fusion-report.txt", report.render() + "\n")
    reparsed = parse_graph(text)
    assert str(reparsed) == text
    assert [n.kernel for n in reparsed.nodes] == [n.kernel for n in graph.nodes]


def test_every_elementwise_op_of_the_mlp_step_shares_a_kernel_with_a_matmul_or_reduction(mlp_fused):
    graph, report = mlp_fused
    assert report.unfused_elementwise == []
    for k in kernels(graph):
        anchors = [role(n) for n in k if role(n) in ("gemm", "reduction", "row")]
        assert anchors, f"kernel of {[n.op for n in k]} has no matmul or reduction"
        assert anchors.count("gemm") <= 1


def test_mlp_step_kernel_count_and_traffic(mlp_fused, mlp_step):
    graph, report = mlp_fused
    materialized = [n for n in mlp_step.graph.nodes if role(n) not in ("immediate", "view")]
    assert report.kernels_before == len(materialized) == 30
    assert len(report.kernels) == 8
    assert report.bytes_after < 0.55 * report.bytes_before
    header = report.render().splitlines()[0]
    assert "30 kernels -> 8" in header and "MB ->" in header


def test_cross_entropy_and_its_gradient_share_one_pass(mlp_fused):
    graph, _ = mlp_fused
    (k,) = [k for k in kernels(graph) if any(n.op == "softmax_cross_entropy" for n in k)]
    assert [n.op for n in k] == ["softmax_cross_entropy", "softmax_cross_entropy_grad"]


def test_optimizer_update_is_the_epilogue_of_the_gradient_gemm(mlp_fused):
    graph, _ = mlp_fused
    (k,) = [k for k in kernels(graph) if k[0].outputs[0].name == "grad.fc1.weight"]
    assert [n.op for n in k] == ["matmul", "mul", "add", "mul", "sub"]
    assert all(n.stage == "update" for n in k[1:])


def test_report_explains_rejections_in_words(mlp_fused):
    text = mlp_fused[1].render()
    assert "%relu (relu) -> %fc2.matmul (matmul): a GEMM on the cpu backend reads its operands from memory" in text
    assert "%relu.mask (gt) -> %grad.fc1 (where): it needs %grad.relu, computed by another kernel" in text
    assert "ends the kernel: an epilogue is elementwise" in text


def test_fusion_keeps_numbers(mlp_step, mlp_fused, example_model):
    data = example_model("digits_mlp").data()
    feeds = {"x": data["x_train"][:32], "y": data["y_train"][:32], "lr": np.float32(0.1),
             **example_model("digits_mlp").initial_values(), **mlp_step.new_state}
    assert_same_results(mlp_step.graph, mlp_fused[0], feeds)


@pytest.mark.parametrize("name", ["residual_mlp", "digits_attention"])
def test_fusion_of_the_other_examples_keeps_numbers(example_model, name):
    model = example_model(name)
    step = training_step(model, Adam())
    fused, report = fuse(step.graph)
    assert len(report.kernels) < report.kernels_before
    feeds = {**random_feeds(step.graph, batch=4), **model.initial_values(), **step.new_state}
    feeds["y"] = np.arange(4) % 10
    feeds["lr"] = np.float32(1e-3)
    assert_same_results(step.graph, fused, feeds)


def test_a_reduction_boundary_and_a_layout_op_are_explained():
    text = """\
func @g(
    input %x: f32[N,4],
) {
  %e: f32[N,4] = exp %x
  %s: f32[N] = sum %e {axes=[1]}
  %t: f32[4,N] = transpose %e {perm=[1,0]}
  %u: f32[N,4] = neg %x
  return %s, %t, %u
}
"""
    fused, report = fuse(parse_graph(text))
    text = report.render()
    assert "transpose moves data from memory: elementwise work may follow it in its kernel, not precede it" in text
    (k,) = [k for k in kernels(fused) if any(n.op == "sum" for n in k)]
    assert [n.op for n in k] == ["exp", "sum", "neg"]  # exp as prologue, neg horizontally beside it


@settings(max_examples=60, deadline=None)
@given(graphs(max_nodes=10))
def test_fusion_never_changes_results(g):
    fused, report = fuse(g, batch=3)
    assert sorted(n.outputs[0].name for n in fused.nodes) == sorted(n.outputs[0].name for n in g.nodes)
    seen, current = set(), None
    for n in fused.nodes:  # each kernel is one contiguous run of nodes
        if n.kernel != current and n.kernel is not None:
            assert n.kernel not in seen
            seen.add(n.kernel)
        current = n.kernel
    assert report.bytes_after <= report.bytes_before
    with np.errstate(all="ignore"):  # random operands: x / (s - s) makes inf and nan, on both sides alike
        assert_same_results(g, fused, random_feeds(g))


def test_no_merge_across_a_kernel_that_reads_the_result():
    """%a's kernel must not absorb %c, which needs %t = transpose(%a) from another kernel."""
    g = parse_graph("""\
func @f(
    input %x: f32[N],
) {
  %a: f32[N] = add %x, %x
  %t: f32[N] = transpose %a {perm=[0]}
  %b: f32[N] = add %x, %x
  %c: f32[N] = add %x, %t
  return %a, %c
}
""")
    fused, _ = fuse(g)
    order = [n.outputs[0].name for n in fused.nodes]
    assert order.index("a") < order.index("t") < order.index("c")
    assert_same_results(g, fused, random_feeds(g))


BETWEEN = {  # %m reads %e but is in no kernel: a count (an immediate) or a view
    "count": "  %m: f32[] = count %e {axes=[0]}\n  %y: f32[N,3,1] = div %e, %m\n",
    "reshape": "  %r: f32[N,3] = reshape %e {shape=[N,3]}\n  %m: f32[N,3,1] = reshape %r {shape=[N,3,1]}\n"
               "  %y: f32[N,3,1] = mul %e, %m\n",
}


@pytest.mark.parametrize("between", list(BETWEEN))
def test_no_fusion_through_a_node_outside_every_kernel(between):
    """Found by the mixed graphs (tests/strategies.py): %y joined the kernel of %e although it
    also reads %m, computed from %e outside every kernel; the schedule, which runs %m between
    kernels, was then cyclic (networkx raised)."""
    g = parse_graph(f"func @f(\n    input %x: f32[N,3,1],\n) {{\n  %e: f32[N,3,1] = exp %x\n{BETWEEN[between]}"
                    "  return %y\n}\n")
    fused, report = fuse(g)
    order = [n.outputs[0].name for n in fused.nodes]
    assert order.index("e") < order.index("m") < order.index("y")
    e, y = (next(n for n in fused.nodes if n.outputs[0].name == name) for name in "ey")
    assert e.kernel != y.kernel
    assert f"it needs %m ({between}, outside every kernel), which reads %e of this kernel" in report.render()
    assert_same_results(g, fused, random_feeds(g))
