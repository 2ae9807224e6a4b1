"""Attention done well: causal and masked self-attention, the functional scaled_dot_product_attention
against PyTorch, the masked softmax inside its row kernel, and gradients by finite differences."""

from __future__ import annotations

import math

import numpy as np
import numpy_reference as ref
import pytest
from dsl_helpers import Fn, check_layer, perturbed, randn

import gradfuse as gf
from gradfuse import functional as F
from gradfuse import nn
from gradfuse.errors import GradfuseError
from gradfuse.gradcheck import gradcheck


def causal_attention(x, p, heads, mask=None):
    """``ref.self_attention`` with position t seeing positions <= t (and ``mask``, [N, 1, 1, T])."""
    x = ref.f64(x)
    n, t, dim = x.shape
    d = dim // heads
    q, k, v = (ref.linear(x, p[f"{m}.weight"], p[f"{m}.bias"]) for m in "qkv")
    mixed = np.zeros_like(x)
    keep = np.tril(np.ones((t, t), bool))
    for b in range(n):
        for h in range(heads):
            cols = slice(h * d, (h + 1) * d)
            scores = q[b, :, cols] @ k[b, :, cols].T / math.sqrt(d)
            ok = keep if mask is None else keep & mask[b, 0]
            mixed[b, :, cols] = ref.softmax(np.where(ok, scores, -np.inf), axis=-1) @ v[b, :, cols]
    return ref.linear(mixed, p["out.weight"], p["out.bias"])


@pytest.mark.parametrize("heads", [1, 2])
def test_causal_self_attention_matches_numpy(heads):
    net = nn.MultiHeadSelfAttention(6, heads, causal=True)
    assert "causal=True" in repr(net)
    check_layer(net, "f32[N,5,6]", lambda x, p: causal_attention(x, p, heads), params=perturbed(net.initial_values()))


def test_a_later_position_does_not_change_an_earlier_output():
    net = nn.MultiHeadSelfAttention(8, 2, causal=True)
    compiled = gf.compile(gf.Model(net, inputs={"x": "f32[N,6,8]"}))
    x = randn((3, 6, 8))
    y = x.copy()
    y[:, 4:] += 1.0
    np.testing.assert_allclose(compiled.predict(x)[:, :4], compiled.predict(y)[:, :4], rtol=1e-5, atol=1e-6)
    assert not np.allclose(compiled.predict(x)[:, 4:], compiled.predict(y)[:, 4:])


def test_scaled_dot_product_attention_matches_pytorch():
    torch = pytest.importorskip("torch")
    q, k, v = randn((2, 3, 5, 4), 0), randn((2, 3, 5, 4), 1), randn((2, 3, 5, 7), 2)
    pad = np.ones((2, 1, 1, 5), bool)
    pad[1, ..., 3:] = False

    def fn(q, k, v, m):
        return F.scaled_dot_product_attention(q, k, v, mask=m, causal=True)

    model = gf.Model(Fn(fn), inputs={"q": "f32[N,3,5,4]", "k": "f32[N,3,5,4]", "v": "f32[N,3,5,7]",
                                     "m": "bool[N,1,1,5]"})
    got = gf.compile(model).predict(q, k, v, pad)
    t = [torch.from_numpy(a) for a in (q, k, v)]
    keep = torch.from_numpy(pad) & torch.ones(5, 5, dtype=torch.bool).tril()
    want = torch.nn.functional.scaled_dot_product_attention(*t, attn_mask=keep).numpy()
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_the_mask_runs_inside_the_fused_kernels():
    """The where(mask, scores, -inf) costs no kernel of its own: it runs in the score GEMM's
    epilogue (or the softmax's prologue), and only the 1-byte causal mask is materialised."""
    from gradfuse.codegen.kernel_ir import lower
    from gradfuse.compiler import PIPELINE
    from gradfuse.passes.manager import run_pipeline

    net = nn.MultiHeadSelfAttention(8, 2, causal=True)
    prog = lower(run_pipeline(gf.Model(net, inputs={"x": "f32[N,6,8]"}).trace(), PIPELINE).graph)
    kinds = {n.op: k.kind for k in prog.kernels for n in k.nodes}
    assert kinds["where"] in ("gemm", "row") and kinds["softmax"] == "row"
    assert not any(k.kind == "elementwise" and [n.op for n in k.nodes] == ["where"] for k in prog.kernels)


def test_causal_attention_gradients_pass_finite_differences():
    class Block(nn.Module):
        def __init__(self):
            self.attn = nn.MultiHeadSelfAttention(4, 2, causal=True)

        def forward(self, x):
            return self.attn(x)

    model = gf.Model(Block(), inputs={"x": "f32[N,3,4]"}, targets={"y": "f32[N,3,4]"}, loss=F.mse_loss)
    report = gradcheck(model, batch=2, directions=2)
    assert report and all(r.passed for r in report), report


def test_bad_masks_are_one_line_errors():
    class FloatMask(nn.Module):
        def __init__(self):
            self.attn = nn.MultiHeadSelfAttention(4, 2)

        def forward(self, x):
            return self.attn(x, x[:, :, :1])

    with pytest.raises(GradfuseError, match="mask must be bool"):
        gf.trace(FloatMask(), inputs={"x": "f32[N,3,4]"})
    with pytest.raises(GradfuseError, match="do not match"):
        gf.trace(Fn(lambda q, k: F.scaled_dot_product_attention(q, k, q, causal=True)),
                 inputs={"q": "f32[N,3,4]", "k": "f32[N,5,4]"})


# ---- reshape with -1 over symbolic dimensions ------------------------------------------------
def test_reshape_minus_one_over_the_batch_makes_a_product_dimension():
    from gradfuse.ir.parser import parse_graph

    g = gf.trace(Fn(lambda x: F.relu(x.reshape(-1, 94)).reshape(-1, 32, 94)), inputs={"x": "f32[N,32,94]"})
    assert [str(v.type) for v in g.values()][1:] == ["f32[N*32,94]", "f32[N*32,94]", "f32[N,32,94]"]
    assert str(parse_graph(str(g))) == str(g)  # prints and parses back
    x = randn((3, 32, 94))
    np.testing.assert_allclose(gf.interpret(g, {"x": x}).outputs[0], np.maximum(x, 0))
    assert gf.ir.types.as_type("f32[32*N,4]").shape == ("N*32", 4)  # canonical: symbols, then the int


def test_flattened_logits_train_with_cross_entropy():
    """The language-model idiom: logits [N, T, V] -> [N*T, V] against labels [N, T] -> [N*T]."""

    class LM(nn.Module):
        def __init__(self):
            self.embed, self.head = nn.Embedding(7, 8), nn.Linear(8, 7)

        def forward(self, ids):
            return self.head(self.embed(ids)).reshape(-1, 7)

    model = gf.Model(LM(), inputs={"x": "i64[N,5]"}, targets={"y": "i64[N,5]"},
                     loss=lambda logits, y: F.cross_entropy(logits, y.reshape(-1)))
    compiled = gf.compile(model, gf.SGD())
    rng = np.random.default_rng(0)
    x = rng.integers(0, 7, (4, 5))
    assert compiled.predict(x).shape == (20, 7)
    losses = [compiled.train_step(x, (x + 1) % 7, lr=0.5) for _ in range(30)]
    assert losses[-1] < 0.5 * losses[0]


def test_reshape_errors_stay_one_line():
    with pytest.raises(GradfuseError, match=r"cannot reshape f32\[N,3\] to \[-1, 4\]"):
        gf.trace(Fn(lambda x: x.reshape(-1, 4)), inputs={"x": "f32[N,3]"})
    with pytest.raises(GradfuseError, match="product dimension"):
        gf.trace(Fn(lambda x: x), inputs={"x": "f32[N*2,3]"})


# ---- the backward of one head, as a student reads it ----------------------------------------
class OneHead(nn.Module):
    def __init__(self):
        self.attn = nn.MultiHeadSelfAttention(8, 1, causal=True)

    def forward(self, x):
        return self.attn(x)


def one_head_model() -> gf.Model:
    return gf.Model(OneHead(), inputs={"x": "f32[N,4,8]"}, targets={"y": "f32[N,4,8]"}, loss=F.mse_loss)


def test_one_head_backward_ir_is_golden_and_round_trips(golden):
    from gradfuse.ir.parser import parse_graph
    from gradfuse.stages import backward

    text = str(backward(one_head_model()).graph)
    golden("attention_head.backward.gfir", text)
    assert str(parse_graph(text)) == text


def test_weight_gradients_are_single_gemms_over_the_flattened_batch():
    """dW of each projection: [N*4, 8]ᵀ·[N*4, 8], one 2-D GEMM, not [N, 8, 8] products summed over N."""
    from gradfuse.stages import backward

    g = backward(one_head_model()).graph
    producers = {n.outputs[0].name: n for n in g.nodes}
    for m in ("q", "k", "v", "out"):
        n = producers[f"grad.attn.{m}.weight"]
        assert n.op == "matmul" and [str(v.type) for v in n.inputs] == ["f32[N*4,8]", "f32[N*4,8]"], n
    assert not any(n.op == "sum" and n.outputs[0].type.shape == (8, 8) for n in g.nodes)
