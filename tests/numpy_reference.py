"""Hand-written float64 numpy forwards of the gradfuse.nn layers: the oracle of tests/test_dsl.py.

Written from the textbook definitions, not from gradfuse's op references, so that a test
comparing the two checks the DSL, the IR and the interpreter together. Weights use gradfuse's
layout (Linear weight is [in, out]).
"""

from __future__ import annotations

import math

import numpy as np


def f64(a) -> np.ndarray:
    return np.asarray(a, dtype=np.float64)


def linear(x, w, b=None):
    y = f64(x) @ f64(w)
    return y if b is None else y + f64(b)


def relu(x):
    return np.maximum(f64(x), 0.0)


def sigmoid(x):
    return 1.0 / (1.0 + np.exp(-f64(x)))


def tanh(x):
    return np.tanh(f64(x))


def leaky_relu(x, alpha):
    x = f64(x)
    return np.where(x > 0, x, alpha * x)


def gelu_erf(x):
    """x * Phi(x) with the exact normal CDF."""
    x = f64(x)
    return 0.5 * x * (1.0 + np.vectorize(math.erf)(x / math.sqrt(2.0)))


def gelu_tanh(x):
    """The tanh approximation of Hendrycks & Gimpel."""
    x = f64(x)
    return 0.5 * x * (1.0 + np.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x**3)))


def softmax(x, axis=-1):
    x = f64(x)
    e = np.exp(x - x.max(axis=axis, keepdims=True))
    return e / e.sum(axis=axis, keepdims=True)


def layer_norm(x, gamma, beta, eps=1e-5):
    x = f64(x)
    mu = x.mean(axis=-1, keepdims=True)
    var = ((x - mu) ** 2).mean(axis=-1, keepdims=True)
    return (x - mu) / np.sqrt(var + eps) * f64(gamma) + f64(beta)


def batch_norm_train(x, gamma, beta, running_mean, running_var, momentum=0.1, eps=1e-5):
    """Returns (y, new running mean, new running var); statistics over every axis but the last,
    the running variance updated with the unbiased (n - 1) batch variance, as PyTorch does."""
    x = f64(x)
    rows = x.reshape(-1, x.shape[-1])
    n = rows.shape[0]
    mu = rows.mean(axis=0)
    biased = ((rows - mu) ** 2).sum(axis=0) / n
    unbiased = ((rows - mu) ** 2).sum(axis=0) / (n - 1)
    y = (x - mu) / np.sqrt(biased + eps) * f64(gamma) + f64(beta)
    new_mean = (1 - momentum) * f64(running_mean) + momentum * mu
    new_var = (1 - momentum) * f64(running_var) + momentum * unbiased
    return y, new_mean, new_var


def batch_norm_eval(x, gamma, beta, running_mean, running_var, eps=1e-5):
    return (f64(x) - f64(running_mean)) / np.sqrt(f64(running_var) + eps) * f64(gamma) + f64(beta)


def sinusoidal_encoding(max_len, dim):
    """PE(pos, 2i) = sin(pos / 10000^(2i/d)), PE(pos, 2i+1) = cos(pos / 10000^(2i/d))
    ("Attention Is All You Need", section 3.5), written as the formula reads."""
    pe = np.zeros((max_len, dim))
    for pos in range(max_len):
        for j in range(dim):
            i = j // 2
            angle = pos / 10000 ** (2 * i / dim)
            pe[pos, j] = math.sin(angle) if j % 2 == 0 else math.cos(angle)
    return pe


def self_attention(x, params, prefix, heads):
    """Multi-head self-attention on x[N, T, D], one head and one example at a time:
    head h uses columns h*d:(h+1)*d of Q, K, V; out = concat_h(softmax(Q_h K_hᵀ / sqrt(d)) V_h) W_o + b_o."""
    x = f64(x)
    n, t, dim = x.shape
    d = dim // heads

    def proj(name):
        return linear(x, params[f"{prefix}{name}.weight"], params[f"{prefix}{name}.bias"])

    q, k, v = proj("q"), proj("k"), proj("v")
    mixed = np.zeros_like(x)
    for b in range(n):
        for h in range(heads):
            cols = slice(h * d, (h + 1) * d)
            scores = q[b, :, cols] @ k[b, :, cols].T / math.sqrt(d)  # [T, T]
            mixed[b, :, cols] = softmax(scores, axis=-1) @ v[b, :, cols]
    return linear(mixed, params[f"{prefix}out.weight"], params[f"{prefix}out.bias"])


def cross_entropy(logits, labels):
    """Mean over rows of -log softmax(logits)[label]."""
    logits = f64(logits)
    return -np.mean([math.log(softmax(row)[label]) for row, label in zip(logits, labels, strict=True)])


def mse(pred, target):
    return np.mean((f64(pred) - f64(target)) ** 2)
