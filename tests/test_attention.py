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
