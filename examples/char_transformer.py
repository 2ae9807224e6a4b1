"""A character-level transformer (a small GPT): embeddings, sinusoidal positions, pre-LayerNorm
blocks of causal multi-head self-attention and a GELU MLP with residuals, trained to predict the
next character of the help topics that ship with Python (``pydoc_data``, 465 KB).

    python examples/char_transformer.py        # trains ~5 minutes, reports, samples, writes out/char_transformer
    python examples/char_transformer.py --minutes 1 --layers 1
    python examples/char_transformer.py sample out/char_transformer --prompt "The with statement"
    gradfuse sample out/char_transformer --prompt "The with statement"    # the same, from the CLI
    gradfuse train examples/char_transformer.py --optimizer adam --lr 0.004 --batch-size 16 --epochs 1 -o out/ct

The loss is in nats per character; the report sets it beside bits per character and the unigram
entropy of the text (3.25 nats: what predicting from character frequencies alone gives).
"""

from __future__ import annotations

import argparse
import math
import os
import time

import numpy as np

import gradfuse as gf
from gradfuse import datasets, nn
from gradfuse import functional as F
from gradfuse.sampling import sample

LENGTH = 64  # characters of context
VOCABULARY = 103  # len(set(datasets.python_topics()))


class Block(nn.Module):
    def __init__(self, dim: int, heads: int):
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.attn = nn.MultiHeadSelfAttention(dim, heads, causal=True)
        self.mlp = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(approximate="tanh"), nn.Linear(4 * dim, dim))

    def forward(self, x):
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class CharTransformer(nn.Module):
    def __init__(self, vocabulary: int = VOCABULARY, dim: int = 128, heads: int = 4, layers: int = 2,
                 length: int = LENGTH):
        self.embed = nn.Embedding(vocabulary, dim)
        self.position = nn.SinusoidalPositionalEncoding(length, dim)
        self.blocks = nn.Sequential(*[Block(dim, heads) for _ in range(layers)])
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, vocabulary)

    def forward(self, ids):  # ids: [N, T]
        h = self.position(self.embed(ids) * 0.1)  # N(0, 0.1²) embeddings beside unit-size positions
        return self.head(self.norm(self.blocks(h)))  # [N, T, vocabulary]: logits of the next character


def next_char_loss(logits, y):
    """Cross-entropy over every position: [N, T, V] flattened to [N*T, V] against [N*T]."""
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1))


def data(length: int = LENGTH) -> dict[str, np.ndarray]:
    return datasets.characters(length, text=datasets.python_topics())


def make_model(layers: int = 2, dim: int = 128, heads: int = 4, length: int = LENGTH) -> gf.Model:
    return gf.Model(CharTransformer(dim=dim, heads=heads, layers=layers, length=length),
                    inputs={"x": f"i64[N,{length}]"}, targets={"y": f"i64[N,{length}]"},
                    loss=next_char_loss, data=lambda: data(length))


model = make_model()


def unigram_entropy(ids: np.ndarray, vocabulary: int) -> float:
    p = np.bincount(ids.reshape(-1), minlength=vocabulary) / ids.size
    p = p[p > 0]
    return float(-(p * np.log(p)).sum())


def held_out_loss(compiled, x: np.ndarray, y: np.ndarray, batch: int = 256) -> float:
    """Mean nats per character of the test windows, in float64."""
    total = 0.0
    for s in range(0, len(x), batch):
        logits = compiled.predict(x[s:s + batch]).astype(np.float64)
        logits -= logits.max(-1, keepdims=True)
        logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
        total -= np.take_along_axis(logp, y[s:s + batch, :, None], -1).sum()
    return total / y.size


def train(minutes: float = 5.0, layers: int = 2, dim: int = 128, heads: int = 4, batch: int = 16, lr: float = 4e-3,
          output: str | None = "out/char_transformer", max_steps: int | None = None, quiet: bool = False):
    """Adam with a short warm-up and a cosine decay over the time budget; returns (compiled, report)."""
    say = (lambda *a: None) if quiet else print
    d = data()
    m = make_model(layers, dim, heads)
    start = time.perf_counter()
    compiled = gf.compile(m, gf.Adam())
    from gradfuse.runtime.artifact import warm_up

    warm_up(compiled, (batch,))  # Numba compiles the kernels here, outside the training time
    counts = [p.kernel_counts for p in (compiled.predict_program, compiled.train_program)]
    say(f"compiled in {time.perf_counter() - start:.1f} s (kernels compiled + reused: predict {counts[0][0]} + "
        f"{counts[0][1]}, train {counts[1][0]} + {counts[1][1]})")
    x, y = d["x_train"], d["y_train"]
    rng = np.random.default_rng(0)
    budget, step, t0 = minutes * 60.0, 0, time.perf_counter()
    while True:
        elapsed = time.perf_counter() - t0
        if elapsed >= budget or (max_steps is not None and step >= max_steps):
            break
        rows = rng.integers(0, len(x), batch)
        frac = elapsed / budget
        rate = lr * min(1.0, (step + 1) / 100) * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * frac)))
        loss = compiled.train_step(x[rows], y[rows], lr=rate)
        if not math.isfinite(loss):
            raise SystemExit(f"error: the loss became {loss} at step {step}; try a smaller --lr")
        step += 1
        if step % 200 == 0:
            say(f"step {step:5d}  {elapsed:6.1f} s  train loss {loss:.3f} nats/char")
    test = held_out_loss(compiled, d["x_test"], d["y_test"])
    entropy = unigram_entropy(d["y_train"], len(d["vocabulary"]))
    report = {"steps": step, "seconds": time.perf_counter() - t0, "nats": test, "bits": test / math.log(2),
              "unigram_nats": entropy}
    say(f"held-out: {test:.3f} nats/char = {test / math.log(2):.3f} bits/char "
        f"(unigram entropy {entropy:.2f} nats = {entropy / math.log(2):.2f} bits) after {step} steps, "
        f"{report['seconds']:.0f} s")
    if output:
        from gradfuse.runtime.artifact import save

        save(compiled, output)
        np.save(os.path.join(output, "vocabulary.npy"), d["vocabulary"])
        say(f"wrote {output}; sample with: gradfuse sample {output} --prompt 'The '")
    return compiled, d["vocabulary"], report


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="command")
    s = sub.add_parser("sample", help="continue a prompt with a trained artifact")
    s.add_argument("artifact")
    s.add_argument("--prompt", default="The ")
    s.add_argument("--chars", type=int, default=300)
    s.add_argument("--temperature", type=float, default=0.8)
    s.add_argument("--seed", type=int, default=0)
    for q in (p,):
        q.add_argument("--minutes", type=float, default=5.0)
        q.add_argument("--layers", type=int, default=2)
        q.add_argument("--dim", type=int, default=128)
        q.add_argument("--batch-size", type=int, default=16)
        q.add_argument("--lr", type=float, default=4e-3)
        q.add_argument("-o", "--output", default="out/char_transformer")
    a = p.parse_args(argv)
    if a.command == "sample":
        compiled = gf.load(a.artifact)
        vocab_path = os.path.join(a.artifact, "vocabulary.npy")
        vocabulary = np.load(vocab_path) if os.path.exists(vocab_path) else data()["vocabulary"]
        print(sample(compiled, vocabulary, a.prompt, a.chars, a.temperature, a.seed))
        return
    compiled, vocabulary, _ = train(a.minutes, a.layers, a.dim, batch=a.batch_size, lr=a.lr, output=a.output)
    print("---- sample ----")
    print(sample(compiled, vocabulary, "The ", 300))


if __name__ == "__main__":
    main()
