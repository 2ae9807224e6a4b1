"""The text form of the IR (printer + parser) and its DOT view."""

from __future__ import annotations

import math
import re
import shutil

import pytest
from gradfuse.ir.dot import BACKWARD_COLOR, to_dot, to_svg
from gradfuse.ir.graph import ArgKind, Graph, GraphBuilder, SourceLoc
from gradfuse.ir.parser import parse_comment, parse_graph
from gradfuse.ir.printer import format_attr, print_graph
from hypothesis import given, settings
from hypothesis import strategies as st
from strategies import f32, graphs

from gradfuse.errors import IRParseError


def summary(g: Graph, comments: bool = True) -> list:
    """Everything the text form carries, in comparable form (Values compare by identity)."""
    return [g.name, [(k, v.name, v.type) for k, v in g.args],
            [(n.op, [v.name for v in n.inputs], [(v.name, v.type) for v in n.outputs], repr(n.attrs),
              (n.loc, n.scope, n.note) if comments else None) for n in g.nodes],
            [v.name for v in g.outputs], [(a.name, b.name) for a, b in g.updates]]


def assert_round_trip(g: Graph, comments: bool = True) -> None:
    """print -> parse -> print is byte-exact and keeps the graph (but for what a comment
    cannot hold, e.g. a multi-line note, when ``comments`` is false)."""
    text = print_graph(g)
    back = parse_graph(text)
    assert print_graph(back) == text
    assert summary(back, comments) == summary(g, comments)


def training_graph() -> Graph:
    """A graph using every attribute kind the registry has, multi-output nodes and updates."""
    b = GraphBuilder("digits_mlp")
    x = b.arg("x", f32("N", 8))
    w = b.arg("fc1.weight", f32(8, 6), ArgKind.param)
    bias = b.arg("fc1.bias", f32(6), ArgKind.param)
    gamma, beta = b.arg("bn.weight", f32(6), ArgKind.param), b.arg("bn.bias", f32(6), ArgKind.param)
    mean, var = b.arg("bn.running_mean", f32(6), ArgKind.state), b.arg("bn.running_var", f32(6), ArgKind.state)
    loc = SourceLoc("digits_mlp.py", 14)
    h = b.emit1("matmul", x, w, loc=loc, scope="fc1")
    h = b.emit1("add", h, bias, loc=loc, scope="fc1", hint="fc1")
    y, new_mean, new_var = b.emit("batch_norm_train", [h, gamma, beta, mean, var], {"momentum": 0.25},
                                  scope="bn", loc=SourceLoc("digits_mlp.py", 15))
    a = b.emit1("gelu", y, attrs={"approximate": "tanh"}, note="activation")
    big = b.emit1("const", attrs={"value": math.inf, "shape": [6]})
    m = b.emit1("maximum", a, big, note="vjp(relu) of %h2: g*(x>0) · not a location")
    r = b.emit1("reshape", m, attrs={"shape": ["N", 2, 3]}, scope="blocks.0.norm")
    t = b.emit1("transpose", r, attrs={"perm": [0, 2, 1]}, note="vjp(matmul) wrt rhs", loc=loc)
    s = b.emit1("sum", t, attrs={"axes": [1, 2], "keepdims": True})
    p = b.emit1("cast", b.emit1("softmax", h, attrs={"axis": 1}), attrs={"dtype": "f64"})
    lr = b.emit1("leaky_relu", h, attrs={"alpha": 1e-05})
    nan = b.emit1("const", attrs={"value": -math.nan, "dtype": "f64"})
    return b.finish([s, p, lr, nan], [(mean, new_mean), (var, new_var)])


# ---- printing ------------------------------------------------------------------------------

TINY = """\
func @tiny(
    input %x: f32[N,4],
    param %w: f32[4,3],
    state %count: f32[],
) {
  %fc.matmul: f32[N,3] = matmul %x, %w {transpose_a=false, transpose_b=false}  # tiny.py:3 @fc
  %h: f32[N,3] = relu %fc.matmul                                       # vjp(relu) of %h · @fc
  %const: f32[] = const {value=1.0, dtype=f32, shape=[]}
  %count.new: f32[] = add %count, %const                               # tiny.py:9
  %mean: f32[] = mean %h {axes=[0,1], keepdims=false}
  return %mean, %h
  update %count <- %count.new
}
"""


def tiny_graph() -> Graph:
    b = GraphBuilder("tiny")
    x = b.arg("x", f32("N", 4))
    w = b.arg("w", f32(4, 3), ArgKind.param)
    count = b.arg("count", f32(), ArgKind.state)
    h = b.emit1("matmul", x, w, loc=SourceLoc("tiny.py", 3), scope="fc")
    h = b.emit1("relu", h, hint="h", scope="fc", note="vjp(relu) of %h")
    one = b.emit1("const", attrs={"value": 1})
    new = b.emit1("add", count, one, hint="count.new", loc=SourceLoc("tiny.py", 9))
    m = b.emit1("mean", h, attrs={"axes": [0, 1]})
    return b.finish([m, h], [(count, new)])


def test_golden_text():
    assert print_graph(tiny_graph()) == TINY
    assert str(tiny_graph()) == TINY
    assert print_graph(parse_graph(TINY)) == TINY


def test_comments_are_aligned_at_column_72():
    for line in TINY.splitlines():
        if "#" in line and len(line.split("  #")[0]) < 70:
            assert line.index("#") == 71


def test_no_args_no_outputs():
    text = "func @empty() {\n  return\n}\n"
    g = parse_graph(text)
    assert (g.args, g.nodes, g.outputs) == ([], [], [])
    assert print_graph(g) == text


def test_hand_written_graph_round_trips():
    assert_round_trip(training_graph())
    assert_round_trip(tiny_graph())


def test_shape_symbols_named_like_keywords():
    b = GraphBuilder("f")
    x = b.arg("x", f32("inf", "true", 4))
    b.emit1("reshape", x, attrs={"shape": ["inf", "true", 2, 2]})
    assert_round_trip(b.finish([]))


def test_special_floats_and_strings():
    assert [format_attr("float", v) for v in (1e-05, 0.5, math.inf, -math.inf, math.nan, 3)] == \
           ["1e-05", "0.5", "inf", "-inf", "nan", "3.0"]
    assert format_attr("float?", None) == "none"
    assert format_attr("str", 'a "b" · \n') == '"a \\"b\\" \\u00b7 \\n"'
    assert format_attr("dims", ("N", 64)) == "[N,64]"
    text = print_graph(training_graph())
    assert "{value=inf, dtype=f32, shape=[6]}" in text and "{value=nan, dtype=f64, shape=[]}" in text
    assert '{approximate="tanh"}' in text and "{alpha=1e-05}" in text and "{dtype=f64}" in text


def test_parse_is_lenient_about_layout():
    text = """
# a hand-written graph
func @f(input %x: f32[ N , 4 ], param %b: f32[4]) {

  # ---- forward ----
  %y: f32[N,4] = add %x,%b   #mlp.py:3 @fc
  %z: f32[N,4] = relu %y
  return %z, %y
}"""
    g = parse_graph(text)
    assert g.nodes[0].loc == SourceLoc("mlp.py", 3) and g.nodes[0].scope == "fc"
    assert print_graph(g).startswith("func @f(\n    input %x: f32[N,4],\n    param %b: f32[4],\n) {\n")
    assert print_graph(parse_graph(TINY.replace("\n", "\r\n"))) == TINY


def test_notes_that_do_not_survive_still_print_the_same():
    """A comment only has to read back to the same text, not to the same fields."""
    b = GraphBuilder("f")
    x = b.arg("x", f32(2))
    b.emit1("neg", x, note="line one\nline two", loc=SourceLoc("my model.py", 3))
    b.emit1("neg", x, note="f.py:3@fc")
    text = print_graph(b.finish([]))
    assert "# line one line two · my model.py:3\n" in text
    assert print_graph(parse_graph(text)) == text


@pytest.mark.parametrize("text, fields", [
    ("mlp.py:14 @fc1", (None, SourceLoc("mlp.py", 14), "fc1")),
    ("@fc1", (None, None, "fc1")),
    ("c:/x.py:7", (None, SourceLoc("c:/x.py", 7), "")),
    ("vjp(relu) of %h: g*(x>0) · mlp.py:14 @fc1", ("vjp(relu) of %h: g*(x>0)", SourceLoc("mlp.py", 14), "fc1")),
    ("a · b · @s", ("a · b", None, "s")),
    ("just a note", ("just a note", None, "")),
    ("a · b", ("a · b", None, "")),
    ("mlp.py:07", ("mlp.py:07", None, "")),
    ("mlp.py:7@fc", ("mlp.py:7@fc", None, "")),
    (" · mlp.py:7", (" · mlp.py:7", None, "")),
    ("", (None, None, "")),
])
def test_parse_comment(text, fields):
    assert parse_comment(text) == fields


# ---- errors ----------------------------------------------------------------------------------

HEAD = "func @f(\n    input %x: f32[N,4],\n    param %w: f32[4,3],\n) {\n"


ERRORS = [
    ("", 1, 1, "expected 'func', found end of input"),
    ("fun @f() {", 1, 1, "expected 'func', found 'fun'"),
    ("func f() {", 1, 6, "expected a function name like @model, found 'f'"),
    ("func @f(%x: f32[2]) {", 1, 9, "expected an argument kind (input, param or state), found '%x'"),
    ("func @f(inptu %x: f32[2]) {", 1, 9, "expected an argument kind (input, param or state), found 'inptu'"),
    ("func @f(input %x f32[2]) {", 1, 18, "expected ':' after %x, found 'f32'"),
    ("func @f(input %x: f16[2]) {", 1, 19, "unknown dtype 'f16'"),
    ("func @f(input %x: f32[-2]) {", 1, 23, "expected a dimension (a size or a symbol like N), found '-2'"),
    ("func @f(input %x: f32[2.5]) {", 1, 23, "expected a dimension"),
    ("func @f(input %x: f32[2 3]) {", 1, 25, "expected ',' or ']' in the shape, found '3'"),
    ("func @f(input %x: f32[2] input %y: f32[2]) {", 1, 26, "expected ',' or ')' after argument, found 'input'"),
    ("func @f(input %x: f32[2], input %x: f32[2]) {", 1, 33, "redefinition of value %x"),
    ("func @f(input %x: f32[2]) {\n  return %y\n}", 2, 10, "use of undefined value %y"),
    ("func @f(input %x: f32[2]) { return %x }", 1, 29, "expected end of line after '{', found 'return'"),
    ("func @f(input %x: f32[2]) {\n  return %x %x\n}", 2, 13,
     "expected ',' or end of line after a return value, found '%x'"),
    ("func @f(input %x: f32[2]) {\n  return %x\n", 3, 1, "expected 'update' or '}', found end of input"),
    ("func @f(input %x: f32[2]) {\n  return %x\n} junk", 3, 3, "expected end of input after '}', found 'junk'"),
    ("func @f(input %x: f32[2]) {\n  return %x\n  update %x <- %x\n}", 2, 3,
     "update of %x, which is not a"),
    ("func @f(input %x: f32[2]) {\n  return %x\n  update %x = %x\n}", 3, 13,
     "expected '<-' after the updated state, found '='"),
    ("func @f(input %x: f32[2]) {\n  %x.1: f32[2] = neg %x\n  retrun %x\n}", 3, 3,
     "expected a node ('%name: type = op ...') or 'return', found 'retrun'"),
    (HEAD + "  %y: f32[N,3] = matmull %x, %w\n", 5, 18, "unknown op 'matmull'"),
    (HEAD + "  %y: f32[N,3] = matmul %x, %v\n", 5, 29, "use of undefined value %v"),
    (HEAD + "  %y: f32[N,3] = matmul %x %w\n", 5, 28,
     "expected ',' or '{' or end of line after an operand, found '%w'"),
    (HEAD + "  %y: f32[N,3] = matmul %x,\n", 5, 28, "expected a value '%name', found end of line"),
    (HEAD + "  %y: f32[N,3] = neg 3\n", 5, 22, "expected an operand '%name' or '{' or end of line, found '3'"),
    (HEAD + "  %x: f32[N,4] = neg %x\n", 5, 3, "redefinition of value %x"),
    (HEAD + "  %y: f32[N,4], %y: f32[N,4] = neg %x\n", 5, 17, "redefinition of value %y"),
    (HEAD + "  %y f32[N,4] = neg %x\n", 5, 6, "expected ':' after %y, found 'f32'"),
    (HEAD + "  %y: f32[N,4] neg %x\n", 5, 16, "expected ',' or '=' after the result type, found 'neg'"),
    (HEAD + "  %y: f32[N,4] = add %x, %w\n", 5, 18, "add: cannot broadcast f32[N,4] and f32[4,3]"),
    (HEAD + "  %y: f32[N,4] = matmul %x, %w\n", 5, 18,
     "matmul: declared result type f32[N,4] but its operands give f32[N,3]"),
    (HEAD + "  %y: f32[N,4] = neg %x, %x\n", 5, 18, "neg: neg takes 1 operand(s), got 2"),
    (HEAD + "  %y: f32[N,4], %z: f32[N,4] = neg %x\n", 5, 32, "neg: declared result type"),
    (HEAD + "  %y: f32[N,4] = neg %x {alpha=1}\n", 5, 18, "neg: unknown attribute alpha (it takes: none)"),
    (HEAD + "  %y: f32[N,4] = sum %x {keepdims=true}\n", 5, 18, "sum: missing required attribute axes"),
    (HEAD + "  %y: f32[N] = sum %x {axes=1}\n", 5, 16, "sum: attribute axes=1 should be a list of ints"),
    (HEAD + "  %y: f32[] = const {value=none}\n", 5, 15, "const: attribute value=None should be a number"),
    (HEAD + "  %y: f32[4] = sum %x {axes=[0], axes=[0]}\n", 5, 34, "duplicate attribute axes"),
    (HEAD + "  %y: f32[4] = sum %x {axes=[0] keepdims=true}\n", 5, 33,
     "expected ',' or '}' after attribute, found 'keepdims'"),
    (HEAD + "  %y: f32[4] = sum %x {axes:[0]}\n", 5, 28, "expected '=' after attribute name axes, found ':'"),
    (HEAD + "  %y: f32[4] = sum %x {axes=[0]} %w\n", 5, 34, "expected end of line after the attributes, found '%w'"),
    (HEAD + "  %y: f32[4] = sum %x {axes=[0,}\n", 5, 32, "expected an attribute value"),
    (HEAD + "  %y: f32[N,4] = gelu %x {approximate=\"\\q\"}\n", 5, 39, "bad string literal"),
    (HEAD + "  %y: f32[N,4] = gelu %x {approximate=\"tanh}\n", 5, 39, "unterminated string"),
    (HEAD + "  %y: f32[N,4] = gelu %x {approximate=\"a\\nb\"}\n", 5, 18,
     'gelu: approximate must be "none" (erf form) or "tanh", got "a b"'),
    (HEAD + "  %y: f32[] = const {value=" + "9" * 5000 + "}\n", 5, 28, "integer literal too long"),
    (HEAD + "  %y: f32[] = const {value=" + "[" * 20 + "}\n", 5, 44, "lists nested too deeply"),
    (HEAD + "  %y: f32[N,4] = neg %x;\n", 5, 24, "unexpected character ';'"),
    (HEAD + "  % y: f32[N,4] = neg %x\n", 5, 3, "expected a value name after '%'"),
    ("func @f(input %x: f32[2]) {\x00", 1, 28, "unexpected character '\\x00'"),
]


@pytest.mark.parametrize("text, line, col, message", ERRORS, ids=[e[3][:60] for e in ERRORS])
def test_parse_errors(text, line, col, message):
    with pytest.raises(IRParseError) as info:
        parse_graph(text, file="model.gfir")
    err = info.value
    assert str(err).startswith(f"model.gfir:{line}:{col}: ")
    assert message in str(err)
    assert "\n" not in str(err)
    assert (err.file, err.line, err.col) == ("model.gfir", line, col)


# ---- properties ----------------------------------------------------------------------------

@settings(max_examples=75, deadline=None)
@given(graphs())
def test_generated_graphs_round_trip(g):
    assert_round_trip(g, comments=False)


TOKENS = ["func", "@f", "(", ")", "{", "}", "input", "param", "state", "%x", "%y", "%x.1", ":", "f32",
          "i64", "[", "]", "N", "4", "-1", ",", "=", "add", "neg", "sum", "const", "matmul", "return",
          "update", "<-", "\n", " ", "  ", "#", " · ", "@s", "f.py:3", "1e999", "-inf", "nan", "none",
          "true", '"', '"a"', "\\", "axes", "value", "{axes=[0]}", "[[[[", "\t", "\x00", "é", "·"]


def parse_or_user_error(text: str) -> None:
    """Parsing ``text`` yields a graph that prints stably, or a located one-line IRParseError
    (op and verifier errors included)."""
    try:
        g = parse_graph(text)
    except IRParseError as e:
        assert re.match(r"<text>:\d+:\d+: ", str(e)) and "\n" not in str(e)
    else:
        assert print_graph(parse_graph(print_graph(g))) == print_graph(g)


@settings(max_examples=100, deadline=None)
@given(st.text() | st.lists(st.sampled_from(TOKENS)).map("".join))
def test_random_text_raises_only_user_errors(text):
    parse_or_user_error(text)


@st.composite
def mutated_graph_texts(draw):
    """A printed graph with a few edits: tokens or characters spliced in, spans cut, lines
    duplicated or swapped, or the text truncated."""
    text = print_graph(draw(graphs(max_nodes=4)))
    for _ in range(draw(st.integers(1, 3))):
        kind = draw(st.sampled_from(["splice", "lines", "truncate"]))
        if kind == "lines":
            lines = text.split("\n")
            i, j = draw(st.integers(0, len(lines) - 1)), draw(st.integers(0, len(lines) - 1))
            if draw(st.booleans()):
                lines[i], lines[j] = lines[j], lines[i]
            else:
                lines.insert(j, lines[i])
            text = "\n".join(lines)
        else:
            i = draw(st.integers(0, len(text)))
            j = len(text) if kind == "truncate" else draw(st.integers(i, min(len(text), i + 8)))
            text = text[:i] + draw(st.sampled_from(TOKENS) | st.text(max_size=3)) + text[j:]
    return text


@settings(max_examples=100, deadline=None)
@given(mutated_graph_texts())
def test_mutated_text_raises_only_user_errors(text):
    parse_or_user_error(text)


# ---- DOT ---------------------------------------------------------------------------------------

def test_dot_keeps_parallel_edges_and_escapes():
    b = GraphBuilder('say "hi"')
    x = b.arg("x", f32(2))
    sq = b.emit1("mul", x, x, scope="fc1")
    g = b.emit1("neg", sq, note='vjp(neg) of "x" \\ done')
    dot = to_dot(b.finish([g, sq]))
    assert dot.startswith('digraph "say \\"hi\\"" {\n')
    assert 'a0 -> n0 [label="0"];' in dot and 'a0 -> n0 [label="1"];' in dot
    assert 'tooltip="vjp(neg) of \\"x\\" \\\\ done"' in dot
    assert 'subgraph cluster_0 {\n    label="fc1";\n    n0 ' in dot
    assert f'n1 [label="neg\\n%neg: f32[2]", shape="box", style="filled", fillcolor="{BACKWARD_COLOR}"' in dot
    assert 'n1 -> ret [label="0"];' in dot and 'n0 -> ret [label="1"];' in dot


def test_dot_is_deterministic_and_names_multi_output_edges():
    g = training_graph()
    dot = to_dot(g)
    assert dot == to_dot(parse_graph(print_graph(g)))
    y, new_mean, _ = g.nodes[2].outputs
    assert f'n2 -> n3 [label="%{y.name}"];' in dot
    assert f'n2 -> u0 [label="%{new_mean.name}"];' in dot


@pytest.mark.skipif(shutil.which("dot") is None, reason="graphviz is not installed")
def test_svg_renders():
    assert "<svg" in to_svg(training_graph())


def test_svg_without_graphviz(monkeypatch):
    monkeypatch.setattr(shutil, "which", lambda name: None)
    assert to_svg(tiny_graph()) is None
