"""The benchmarks' networks in JAX, jitted, from gradfuse's initial weights (its names and its
[in, out] layouts): one SGD training step each, for ``gradfuse bench`` to time beside gradfuse,
PyTorch eager and torch.compile. Each returns a function running one step (until its results are
ready) and the seconds the first step took (tracing and XLA's compile)."""

from __future__ import annotations

import time
from collections.abc import Callable

import numpy as np


def _stepper(jax, step, params, *batch) -> tuple[Callable[[], object], float]:
    state = {"p": params}

    def run():
        state["p"] = step(state["p"], *batch)
        return jax.block_until_ready(state["p"])

    start = time.perf_counter()
    run()
    return run, time.perf_counter() - start


def _sgd(jax, loss, lr: float):
    @jax.jit
    def step(params, *batch):
        grads = jax.grad(loss)(params, *batch)
        return jax.tree_util.tree_map(lambda p, g: p - lr * g, params, grads)

    return step


def block_step(weights: dict[str, np.ndarray], x: np.ndarray, y: np.ndarray, heads: int, lr: float = 1e-3):
    """x + MHSA(LN(x)), then h + MLP(LN(h)) (exact GELU), MSE against ``y`` (bench.TransformerBlock)."""
    import jax
    import jax.numpy as jnp

    def layer_norm(p, name, h):
        mean = h.mean(-1, keepdims=True)
        var = ((h - mean) ** 2).mean(-1, keepdims=True)
        return (h - mean) / jnp.sqrt(var + 1e-5) * p[f"{name}.weight"] + p[f"{name}.bias"]

    def linear(p, name, h):
        return h @ p[f"{name}.weight"] + p[f"{name}.bias"]

    def attention(p, h):
        n, t, d = h.shape

        def split(z):
            return z.reshape(n, t, heads, d // heads).transpose(0, 2, 1, 3)

        q, k, v = (split(linear(p, f"attn.{w}", h)) for w in "qkv")
        scores = q @ k.transpose(0, 1, 3, 2) / np.sqrt(d // heads).astype(np.float32)
        mixed = jax.nn.softmax(scores, axis=-1) @ v
        return linear(p, "attn.out", mixed.transpose(0, 2, 1, 3).reshape(n, t, d))

    def loss(p, x, y):
        h = x + attention(p, layer_norm(p, "norm1", x))
        out = h + linear(p, "mlp.2", jax.nn.gelu(linear(p, "mlp.0", layer_norm(p, "norm2", h)), approximate=False))
        return jnp.mean((out - y) ** 2)

    params = {k: jnp.asarray(v) for k, v in weights.items()}
    return _stepper(jax, _sgd(jax, loss, lr), params, jnp.asarray(x), jnp.asarray(y))


def cnn_step(weights: dict[str, np.ndarray], x: np.ndarray, y: np.ndarray, lr: float = 1e-3):
    """conv3x3-BatchNorm2d-ReLU-maxpool, conv3x3-ReLU-maxpool, Linear, cross-entropy (bench.CNN); the
    BatchNorm's running statistics are not kept (they do not enter the step's loss or gradients)."""
    import jax
    import jax.numpy as jnp
    from jax import lax

    def conv(p, name, h):
        out = lax.conv_general_dilated(h, p[f"{name}.weight"], (1, 1), ((1, 1), (1, 1)),
                                       dimension_numbers=("NCHW", "OIHW", "NCHW"))
        return out + p[f"{name}.bias"][None, :, None, None]

    def pool(h):
        return lax.reduce_window(h, -jnp.inf, lax.max, (1, 1, 2, 2), (1, 1, 2, 2), "VALID")

    def batch_norm(p, name, h):
        mean = h.mean((0, 2, 3), keepdims=True)
        var = ((h - mean) ** 2).mean((0, 2, 3), keepdims=True)
        scale, shift = p[f"{name}.weight"][None, :, None, None], p[f"{name}.bias"][None, :, None, None]
        return (h - mean) / jnp.sqrt(var + 1e-5) * scale + shift

    def loss(p, x, y):
        h = pool(jax.nn.relu(batch_norm(p, "features.1", conv(p, "features.0", x))))
        h = pool(jax.nn.relu(conv(p, "features.4", h)))
        logits = h.reshape(h.shape[0], -1) @ p["head.weight"] + p["head.bias"]
        return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), y[:, None], axis=1))

    params = {k: jnp.asarray(v) for k, v in weights.items() if "running" not in k}
    return _stepper(jax, _sgd(jax, loss, lr), params, jnp.asarray(x), jnp.asarray(y))
