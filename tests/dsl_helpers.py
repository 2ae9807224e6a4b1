"""Helpers and small models shared by the DSL tests (test_dsl*.py)."""

from __future__ import annotations

import sys

import numpy as np
import numpy_reference as ref

import gradfuse as gf
from gradfuse import nn

DType, TensorType, ArgKind = gf.DType, gf.TensorType, gf.ir.graph.ArgKind

BATCHES = (1, 3)  # one traced graph (symbolic N) runs every batch size
TOL = {"rtol": 2e-5, "atol": 2e-5}  # f32 graph vs float64 numpy


# ---- helpers -----------------------------------------------------------------------------
def line() -> int:
    """The caller's line number: ``y, at = layer(x), line()`` records the line of the call."""
    return sys._getframe(1).f_lineno


def body_line(fn) -> int:
    """The line of the first statement of a one-statement function."""
    return fn.__code__.co_firstlineno + 1


def concrete(type_text: str, n: int) -> tuple[int, ...]:
    return gf.ir.types.as_type(type_text).concrete({"N": n})


def randn(shape, seed=0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


def perturbed(params: dict[str, np.ndarray], seed=1) -> dict[str, np.ndarray]:
    """Random values of the same shapes (positive for variances), so that a zero bias or a unit
    scale cannot hide a wrongly wired parameter."""
    rng = np.random.default_rng(seed)
    out = {}
    for name, a in params.items():
        r = rng.standard_normal(a.shape)
        out[name] = (np.abs(r) + 0.5 if name.endswith("var") else r).astype(a.dtype)
    return out


class Fn(nn.Module):
    """A function as a module, to trace functional code."""

    def __init__(self, fn):
        self.fn = fn

    def forward(self, *args):
        return self.fn(*args)


def trace_fn(fn, **inputs) -> gf.ir.graph.Graph:
    return gf.trace(Fn(fn), inputs=inputs)


def check_layer(net, in_type, expected, *, train=False, params=None, batches=BATCHES, out_type=None):
    """Trace ``net`` once on ``x: in_type`` and compare its interpreted output with
    ``expected(x, params)`` for every batch size."""
    g = gf.trace(net, inputs={"x": in_type}, train=train)
    if out_type is not None:
        assert str(g.outputs[0].type) == out_type
    params = net.initial_values(seed=7) if params is None else params
    for n in batches:
        x = randn(concrete(in_type, n), seed=n)
        got = gf.interpret(g, {"x": x, **params}).outputs[0]
        assert got.dtype == np.float32
        assert got.shape == g.outputs[0].type.concrete({"N": n})
        np.testing.assert_allclose(got, expected(x, params), **TOL)
    return g


def op_names(g) -> list[str]:
    return [n.op for n in g.nodes]


# ---- models used by several tests ----------------------------------------------------------
class MLP(nn.Module):
    def __init__(self, hidden: int = 16):
        self.fc1 = nn.Linear(64, hidden)
        self.act = nn.ReLU()
        self.fc2 = nn.Linear(hidden, 10)
        self.lines: dict[str, int] = {}

    def forward(self, x):
        flat, self.lines["flatten"] = x.flatten(), line()
        h, self.lines["fc1"] = self.fc1(flat), line()
        a, self.lines["act"] = self.act(h), line()
        out, self.lines["fc2"] = self.fc2(a), line()
        return out


def mlp_numpy(x, p):
    h = ref.relu(ref.linear(x.reshape(len(x), -1), p["fc1.weight"], p["fc1.bias"]))
    return ref.linear(h, p["fc2.weight"], p["fc2.bias"])


class Block(nn.Module):
    def __init__(self, dim: int):
        self.norm = nn.LayerNorm(dim)
        self.fc = nn.Linear(dim, dim)

    def forward(self, x):
        return x + self.fc(self.norm(x))


class Tower(nn.Module):
    def __init__(self):
        self.blocks = nn.Sequential(Block(8), Block(8))
        self.head = nn.Linear(8, 2)

    def forward(self, x):
        return self.head(self.blocks(x))
