"""Self-attention over the 8 rows of a digit image: each row is a token of 8 pixels.

    gradfuse show examples/digits_attention.py
"""

import gradfuse as gf
from gradfuse import datasets, nn
from gradfuse import functional as F


class RowAttention(nn.Module):
    def __init__(self, dim: int = 32, heads: int = 4):
        self.embed = nn.Linear(8, dim)
        self.position = nn.SinusoidalPositionalEncoding(8, dim)
        self.attn = nn.MultiHeadSelfAttention(dim, heads)
        self.norm = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(approximate="tanh"), nn.Linear(2 * dim, dim))
        self.head = nn.Linear(dim, 10)

    def forward(self, x):  # x: [N, 8 rows, 8 pixels]
        h = self.position(self.embed(x))
        h = self.norm(h + self.attn(h))
        h = h + self.mlp(h)
        return self.head(F.mean(h, axis=1))


model = gf.Model(
    RowAttention(),
    inputs={"x": "f32[N,8,8]"},
    targets={"y": "i64[N]"},
    loss=F.cross_entropy,
    data=lambda: datasets.digits(images=True),
)
