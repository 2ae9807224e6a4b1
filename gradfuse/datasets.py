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
