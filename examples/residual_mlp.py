"""A residual MLP with BatchNorm and Dropout for the 8x8 digits, taking the images as 8x8.

    gradfuse show examples/residual_mlp.py
"""

import gradfuse as gf
from gradfuse import datasets, nn
from gradfuse import functional as F


class Block(nn.Module):
    """x + Dropout(Linear(ReLU(BatchNorm(Linear(x)))))"""

    def __init__(self, width: int, p: float):
        self.fc1 = nn.Linear(width, width)
        self.norm = nn.BatchNorm(width)
        self.fc2 = nn.Linear(width, width)
        self.drop = nn.Dropout(p)

    def forward(self, x):
        h = F.relu(self.norm(self.fc1(x)))
        return self.drop(self.fc2(h))


class ResidualMLP(nn.Module):
    def __init__(self, width: int = 96, depth: int = 2, p: float = 0.1):
        self.flatten = nn.Flatten()
        self.stem = nn.Linear(64, width)
        self.blocks = nn.Sequential(*[nn.Residual(Block(width, p)) for _ in range(depth)])
        self.head = nn.Linear(width, 10)

    def forward(self, x):
        h = F.relu(self.stem(self.flatten(x)))
        return self.head(self.blocks(h))


model = gf.Model(
    ResidualMLP(),
    inputs={"x": "f32[N,8,8]"},
    targets={"y": "i64[N]"},
    loss=F.cross_entropy,
    data=lambda: datasets.digits(images=True),
)
