"""Small real data sets that ship with installed packages (no downloads)."""

from __future__ import annotations

import numpy as np


def digits(test_fraction: float = 0.25, seed: int = 0, images: bool = False) -> dict[str, np.ndarray]:
    """scikit-learn's bundled 8x8 handwritten digits (1797 images, 10 classes), pixels scaled to
    [0, 1], split into train and test sets with a fixed shuffle.

    Returns ``x_train`` f32[n,64] (f32[n,8,8] with ``images``), ``y_train`` i64[n], ``x_test``,
    ``y_test``.
    """
    from sklearn.datasets import load_digits

    data = load_digits()
    x = (data.data / 16.0).astype(np.float32)
    if images:
        x = x.reshape(-1, 8, 8)
    y = data.target.astype(np.int64)
    order = np.random.default_rng(seed).permutation(len(x))
    n_test = int(round(len(x) * test_fraction))
    test, train = order[:n_test], order[n_test:]
    return {"x_train": x[train], "y_train": y[train], "x_test": x[test], "y_test": y[test]}


def _split(arrays: dict[str, np.ndarray], test_fraction: float, seed: int) -> dict[str, np.ndarray]:
    """``{name}_train`` and ``{name}_test`` for every array, split with a fixed shuffle."""
    n = len(next(iter(arrays.values())))
    order = np.random.default_rng(seed).permutation(n)
    n_test = int(round(n * test_fraction))
    test, train = order[:n_test], order[n_test:]
    return {f"{k}_{split}": a[rows] for k, a in arrays.items() for split, rows in (("train", train), ("test", test))}


def diabetes(test_fraction: float = 0.2, seed: int = 0) -> dict[str, np.ndarray]:
    """scikit-learn's bundled diabetes regression set: 442 patients, 10 features, and a measure
    of disease progression a year later. Features and target are standardised (zero mean, unit
    variance), so a mean squared error of 0.5 explains half the target's variance.

    Returns ``x_train`` f32[n,10], ``y_train`` f32[n,1], ``x_test``, ``y_test``.
    """
    from sklearn.datasets import load_diabetes

    data = load_diabetes()
    x = (data.data - data.data.mean(0)) / data.data.std(0)
    y = (data.target - data.target.mean()) / data.target.std()
    return _split({"x": x.astype(np.float32), "y": y[:, None].astype(np.float32)}, test_fraction, seed)


def text_corpus() -> str:
    """About 48 KB of English prose that every installation has: the descriptions of
    scikit-learn's data sets (its ``datasets/descr/*.rst``), in a fixed order."""
    import glob
    import os

    import sklearn.datasets

    folder = os.path.join(os.path.dirname(sklearn.datasets.__file__), "descr")
    parts = []
    for path in sorted(glob.glob(os.path.join(folder, "*.rst"))):
        with open(path, encoding="utf-8") as f:
            parts.append(f.read())
    return "\n".join(parts)


def python_topics() -> str:
    """About 465 KB of English prose and code that every Python has: the help topics of the
    standard library's ``pydoc_data`` (what ``help("FORMATTING")`` prints), in a fixed order."""
    from pydoc_data.topics import topics

    return "\n".join(topics[k] for k in sorted(topics))


def characters(length: int = 32, test_fraction: float = 0.1, text: str | None = None) -> dict[str, np.ndarray]:
    """A character-level language-modelling set from :func:`text_corpus`: windows of ``length``
    characters ``x`` and the same windows one character later ``y`` (next-character targets),
    as ids into ``vocabulary`` (the sorted characters of the text). The windows overlap by half;
    the test windows come from the last ``test_fraction`` of the text, which no training window
    sees.

    Returns ``x_train`` i64[n,length], ``y_train`` i64[n,length], ``x_test``, ``y_test``,
    ``vocabulary`` (a str array of one character per id).
    """
    text = text_corpus() if text is None else text
    vocabulary = sorted(set(text))
    index = {c: i for i, c in enumerate(vocabulary)}
    ids = np.array([index[c] for c in text], dtype=np.int64)
    cut = int(len(ids) * (1 - test_fraction))
    out = {"vocabulary": np.array(vocabulary)}
    for split, part in (("train", ids[:cut]), ("test", ids[cut:])):
        starts = np.arange(0, len(part) - length - 1, length // 2)
        out[f"x_{split}"] = np.stack([part[s:s + length] for s in starts])
        out[f"y_{split}"] = np.stack([part[s + 1:s + length + 1] for s in starts])
    return out
