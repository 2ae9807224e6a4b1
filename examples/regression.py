"""Regression with a mean squared error: disease progression from ten clinical measurements
(scikit-learn's bundled diabetes data, standardised).

    gradfuse train examples/regression.py --epochs 40 --lr 0.01 --plot curves.png
"""

import gradfuse as gf
from gradfuse import datasets, nn
from gradfuse import functional as F


class Regressor(nn.Module):
    def __init__(self, features: int = 10, hidden: int = 32):
        self.fc1 = nn.Linear(features, hidden)
        self.fc2 = nn.Linear(hidden, 1)

    def forward(self, x):
        return self.fc2(F.relu(self.fc1(x)))


model = gf.Model(
    Regressor(),
    inputs={"x": "f32[N,10]"},
    targets={"y": "f32[N,1]"},
    loss=F.mse_loss,
    data=datasets.diabetes,
)
