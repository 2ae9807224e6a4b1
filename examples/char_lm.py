"""A character-level language model: each position predicts the next character from itself
and the two before it (embeddings of three positions, concatenated, through an MLP). Trained
on the descriptions of scikit-learn's data sets, which every installation has.

    gradfuse train examples/char_lm.py --epochs 10 --lr 0.1 --plot curves.png

Its targets are i64[N,T], one next character per position; the trainer reports the loss in
nats per character, bits per character and perplexity.
"""

import gradfuse as gf
from gradfuse import datasets, nn
from gradfuse import functional as F

LENGTH = 32
VOCABULARY = 92  # len(datasets.characters()["vocabulary"])


def earlier(e, k: int):
    """``e`` moved ``k`` positions later along the sequence axis, zeros in front: position t
    sees position t - k, and never a later one."""
    return F.concat([e[:, :k] * 0.0, e[:, :-k]], axis=1)


class CharMLP(nn.Module):
    def __init__(self, vocabulary: int = VOCABULARY, dim: int = 24, hidden: int = 128, context: int = 3):
        self.context = context
        self.embed = nn.Embedding(vocabulary, dim)
        self.fc1 = nn.Linear(context * dim, hidden)
        self.fc2 = nn.Linear(hidden, vocabulary)

    def forward(self, ids):  # ids: [N, T]
        e = self.embed(ids)  # [N, T, dim]
        window = F.concat([e] + [earlier(e, k) for k in range(1, self.context)], axis=-1)
        return self.fc2(F.relu(self.fc1(window)))  # [N, T, vocabulary]: logits of the next character


model = gf.Model(
    CharMLP(),
    inputs={"x": f"i64[N,{LENGTH}]"},
    targets={"y": f"i64[N,{LENGTH}]"},
    loss=F.cross_entropy,
    data=lambda: datasets.characters(LENGTH),
)
