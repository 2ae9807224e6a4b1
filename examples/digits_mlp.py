"""A two-layer perceptron for scikit-learn's 8x8 handwritten digits.

    gradfuse show examples/digits_mlp.py            # the forward IR
"""

import gradfuse as gf
from gradfuse import datasets, nn
from gradfuse import functional as F


class DigitsMLP(nn.Module):
    def __init__(self, hidden: int = 128):
        self.fc1 = nn.Linear(64, hidden)
        self.fc2 = nn.Linear(hidden, 10)

    def forward(self, x):
        h = F.relu(self.fc1(x))
        return self.fc2(h)


model = gf.Model(
    DigitsMLP(),
    inputs={"x": "f32[N,64]"},
    targets={"y": "i64[N]"},
    loss=F.cross_entropy,
    data=datasets.digits,
)
