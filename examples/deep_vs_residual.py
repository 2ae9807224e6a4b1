"""Why residual connections and normalisation: two 16-layer networks on the 8x8 digits.

- ``plain``: 16 Linear + sigmoid layers. Each sigmoid passes back at most 1/4 of the gradient, so
  the gradient reaching the first layers is orders of magnitude smaller than at the last: they
  barely learn, and the network stays near chance for many epochs.
- ``residual``: the same depth as 8 blocks x + Linear(ReLU(BatchNorm(Linear(x)))): the identity
  path carries the gradient back unchanged, and BatchNorm keeps each block's input in range.

    gradfuse gradcheck examples/deep_vs_residual.py:plain       # gradient health: "vanishing?" on the first layers
    gradfuse gradcheck examples/deep_vs_residual.py:residual    # no flags
    gradfuse train examples/deep_vs_residual.py:plain --epochs 10 --lr 0.1
    gradfuse train examples/deep_vs_residual.py:residual --epochs 10 --lr 0.1
    python examples/deep_vs_residual.py                          # both: gradient health, then 10 epochs each
"""

from __future__ import annotations

import numpy as np

import gradfuse as gf
from gradfuse import datasets, nn
from gradfuse import functional as F

WIDTH, DEPTH = 64, 16


class PlainSigmoidMLP(nn.Module):
    def __init__(self, width: int = WIDTH, depth: int = DEPTH):
        layers = [nn.Linear(64, width), nn.Sigmoid()]
        for _ in range(depth - 2):
            layers += [nn.Linear(width, width), nn.Sigmoid()]
        self.body = nn.Sequential(*layers)
        self.head = nn.Linear(width, 10)

    def forward(self, x):
        return self.head(self.body(x))


class Block(nn.Module):
    def __init__(self, width: int):
        self.fc1, self.norm, self.fc2 = nn.Linear(width, width), nn.BatchNorm(width), nn.Linear(width, width)

    def forward(self, x):
        return x + self.fc2(F.relu(self.norm(self.fc1(x))))


class ResidualMLP(nn.Module):
    def __init__(self, width: int = WIDTH, depth: int = DEPTH):
        self.stem = nn.Linear(64, width)
        self.blocks = nn.Sequential(*[Block(width) for _ in range((depth - 2) // 2)])
        self.head = nn.Linear(width, 10)

    def forward(self, x):
        return self.head(self.blocks(F.relu(self.stem(x))))


def digits_model(net: nn.Module) -> gf.Model:
    return gf.Model(net, inputs={"x": "f32[N,64]"}, targets={"y": "i64[N]"}, loss=F.cross_entropy,
                    data=datasets.digits)


plain = digits_model(PlainSigmoidMLP())
residual = digits_model(ResidualMLP())
model = residual


def first_to_last(model: gf.Model, batch: int = 64) -> float:
    """‖∂L/∂(first layer's output)‖ / ‖∂L/∂(last layer's output)‖ (gradfuse gradcheck's health report)."""
    from gradfuse.gradcheck import gradient_health

    rows = gradient_health(model, batch=batch)
    return rows[0].grad_norm / rows[-1].grad_norm


def train(model: gf.Model, epochs: int = 10, lr: float = 0.1, batch: int = 64, seed: int = 0) -> float:
    """Test accuracy after ``epochs`` of SGD with momentum."""
    d = datasets.digits()
    compiled = gf.compile(model, gf.SGD(momentum=0.9))
    rng = np.random.default_rng(seed)
    for _ in range(epochs):
        order = rng.permutation(len(d["x_train"]))
        for s in range(0, len(order) - batch + 1, batch):
            rows = order[s:s + batch]
            compiled.train_step(d["x_train"][rows], d["y_train"][rows], lr=lr)
    return float((compiled.predict(d["x_test"]).argmax(-1) == d["y_test"]).mean())


def main() -> None:
    for name, m in (("plain sigmoid", plain), ("residual + BatchNorm", residual)):
        ratio = first_to_last(m)
        print(f"{name:22s} ‖∂L/∂first‖ / ‖∂L/∂last‖ = {ratio:.1e}"
              + ("  (vanishing: the first layers barely learn)" if ratio < 1e-4 else ""))
    for name, m in (("plain sigmoid", plain), ("residual + BatchNorm", residual)):
        print(f"{name:22s} test accuracy after 10 epochs: {train(m):.1%}")


if __name__ == "__main__":
    main()
