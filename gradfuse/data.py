"""Training data, checked against the model before the first step.

Data is a dict of numpy arrays (a ``.npz`` from ``--data``, or the model's ``data()``) holding,
for every input and target of the model, ``<name>_train`` and optionally ``<name>_test``
(``x_train``, ``y_train``, ... for the usual ``x`` and ``y``; a model with one input and one
target may also use ``x_*`` and ``y_*`` whatever their names). Every array is checked for its
name, dtype, shape, length and finite values, and labels for their range, so that a mistake
is one error naming the array and the fix instead of a crash in the middle of an epoch.
"""

from __future__ import annotations

import zipfile
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

from gradfuse.errors import InputError
from gradfuse.files import read_error
from gradfuse.ir.types import TensorType


class DataError(InputError):
    """Training data that does not fit the model."""


@dataclass
class Dataset:
    """Arrays in the model's argument order (inputs, then targets), converted to its dtypes."""

    names: list[str]
    train: list[np.ndarray]
    test: list[np.ndarray] | None
    notes: list[str]  # conversions made, e.g. "x_train, x_test: float64 converted to float32"

    def __len__(self) -> int:
        return len(self.train[0])


def read_numpy(path: str, what: str) -> np.ndarray | dict[str, np.ndarray]:
    """The array of a ``.npy`` or the named arrays of a ``.npz`` (no pickle), or a one-line
    error about ``what`` the file should hold."""
    try:
        loaded = np.load(path, allow_pickle=False)
        if isinstance(loaded, np.ndarray):
            return loaded
        with loaded:
            return {k: loaded[k] for k in loaded.files}
    except (OSError, ValueError, EOFError, zipfile.BadZipFile, KeyError) as e:
        raise read_error(what, path, e) from None


def load_npz(path: str, what: str = "data") -> dict[str, np.ndarray]:
    """The named arrays of a ``.npz``, or a one-line error about ``what`` it should hold."""
    arrays = read_numpy(path, what)
    if isinstance(arrays, np.ndarray):
        raise DataError(f"{what} {path}: a single array, not a .npz archive of named arrays "
                        "(np.savez(path, x_train=..., y_train=...))")
    return arrays


def _fix_hint(got: tuple[int, ...], want: TensorType, name: str) -> str:
    fixed = [d for d in want.shape[1:]]
    if all(isinstance(d, int) for d in fixed) and int(np.prod(got[1:])) == int(np.prod(fixed)):
        return f"reshape it: {name}.reshape(len({name}), {', '.join(map(str, fixed))})"
    if len(got) == want.rank - 1:
        return f"add the missing axis: {name}[..., None]"
    return "check the model's input signature"


def convert(name: str, a: np.ndarray, want: TensorType, notes: list[str]) -> np.ndarray:
    dt = want.dtype.np
    if a.dtype == dt:
        return a
    if want.dtype.is_float and (a.dtype.kind == "f" or a.dtype.kind in "iub"):
        notes.append(f"{name}: {a.dtype} converted to {dt}")
        return a.astype(dt)
    if not want.dtype.is_float and a.dtype.kind in "iu":
        if a.size and (a.min() < np.iinfo(dt).min or a.max() > np.iinfo(dt).max):
            raise DataError(f"{name}: values up to {a.max()} do not fit {want.dtype}")
        return a.astype(dt)
    if not want.dtype.is_float and a.dtype.kind == "f":
        raise DataError(f"{name} is {a.dtype}, but the model wants {want}: labels are integer classes "
                        f"({name}.astype(np.int64)), not one-hot vectors or floats")
    raise DataError(f"{name} is {a.dtype}, but the model wants {want} (convert it with .astype(np.{dt.name}))")


def _check_array(name: str, a, want: TensorType, notes: list[str]) -> np.ndarray:
    if not isinstance(a, np.ndarray):
        try:
            a = np.asarray(a)
        except (TypeError, ValueError) as e:
            raise DataError(f"{name}: not an array ({e})") from None
    if a.dtype == object:
        raise DataError(f"{name}: an array of Python objects; the model wants {want}")
    if a.ndim != want.rank:
        raise DataError(f"{name} has shape {list(a.shape)}, the model wants {want} (one row per example): "
                        f"{_fix_hint(a.shape, want, name)}")
    if len(a) == 0:
        raise DataError(f"{name} is empty (shape {list(a.shape)})")
    for axis, (d, got) in enumerate(zip(want.shape, a.shape, strict=True)):
        if isinstance(d, int) and d != got:
            raise DataError(f"{name} has shape {list(a.shape)}, the model wants {want} (axis {axis} is {got}, "
                            f"not {d}): {_fix_hint(a.shape, want, name)}")
    a = convert(name, a, want, notes)
    if want.dtype.is_float:
        bad = ~np.isfinite(a)
        if bad.any():
            rows = np.nonzero(bad.reshape(len(a), -1).any(axis=1))[0]
            raise DataError(f"{name} holds {int(bad.sum())} NaN/Inf values in {len(rows)} rows (first: row "
                            f"{rows[0]}): drop or repair those rows (np.isfinite) before training")
    return np.ascontiguousarray(a)


def _check_labels(name: str, a: np.ndarray, classes: int) -> None:
    lo, hi = int(a.min()), int(a.max())
    if lo < 0 or hi >= classes:
        raise DataError(f"{name}: labels must lie in [0, {classes}) for a model predicting {classes} classes, "
                        f"got min {lo}, max {hi}")


def check_data(data: Mapping[str, np.ndarray], inputs: Mapping[str, TensorType],
               targets: Mapping[str, TensorType], prediction: TensorType | None = None,
               source: str = "the data") -> Dataset:
    """``data`` checked against the model's ``inputs`` and ``targets`` (and labels against the
    number of classes of ``prediction``); a DataError names the array and the fix."""
    signature = {**inputs, **targets}
    aliases = {}
    if len(inputs) == 1 and len(targets) == 1:
        aliases = {next(iter(inputs)): "x", next(iter(targets)): "y"}
    notes: list[str] = []

    def key(name: str, split: str) -> str | None:
        for k in (f"{name}_{split}", f"{aliases.get(name, name)}_{split}"):
            if k in data:
                return k
        return None

    missing = [f"{name}_train" for name in signature if key(name, "train") is None]
    if missing:
        has = ", ".join(sorted(data)) or "nothing"
        want = ", ".join(f"{n}_train {t}" for n, t in signature.items())
        raise DataError(f"{source} lacks {', '.join(missing)} (it has {has}); the model needs {want} "
                        "and optionally the same with _test")
    test_keys = {name: key(name, "test") for name in signature}
    if any(test_keys.values()) and not all(test_keys.values()):
        absent = [f"{n}_test" for n, k in test_keys.items() if k is None]
        raise DataError(f"{source} has a test split without {', '.join(absent)}: give all of them or none")
    classes = prediction.shape[-1] if prediction is not None and prediction.rank else None
    splits = {}
    for split in ("train", "test"):
        if split == "test" and not all(test_keys.values()):
            continue
        arrays = []
        for name, want in signature.items():
            k = key(name, split)
            a = _check_array(k, data[k], want, notes)
            if name in targets and not want.dtype.is_float and isinstance(classes, int) \
                    and want.shape == prediction.shape[:-1]:
                _check_labels(k, a, classes)
            arrays.append(a)
        lengths = {key(n, split): len(a) for n, a in zip(signature, arrays, strict=True)}
        if len(set(lengths.values())) > 1:
            listed = ", ".join(f"{k} {n}" for k, n in lengths.items())
            raise DataError(f"{source}: the {split} arrays have different lengths ({listed}): each example needs "
                            "its inputs and its targets, row for row")
        splits[split] = arrays
    merged: dict[str, list[str]] = {}  # "float64 converted to float32" -> the arrays it happened to
    for note in notes:
        name, _, what = note.partition(": ")
        merged.setdefault(what, []).append(name)
    return Dataset(list(signature), splits["train"], splits.get("test"),
                   [f"{', '.join(names)}: {what}" for what, names in merged.items()])


def read_batch(spec: str, compiled):
    """The batch ``gradfuse run`` feeds ``compiled``: a .npy file, or one array of a .npz
    (``data.npz:x_test``, or the array named after the model's input), converted to the model's
    dtype where that loses nothing but precision."""
    import os

    from gradfuse.errors import GradfuseError
    from gradfuse.files import FileError

    path, name = spec, None
    if not os.path.exists(spec) and ":" in spec:
        path, name = spec.rsplit(":", 1)
    (input_name, want), *more = compiled.inputs.items()
    if more:
        raise GradfuseError(f"gradfuse run feeds one input, but {compiled.name} has "
                            f"{', '.join(compiled.inputs)}: call it from Python (compiled.predict)")
    x = read_numpy(path, "input")
    if isinstance(x, dict):
        name = name or next((k for k in (input_name, "x_test", "x") if k in x), None)
        if name not in x:
            raise FileError("input", path, f"a .npz of {', '.join(x) or 'nothing'}: say which array to run, e.g. "
                                           f"--input {path}:{next(iter(x), 'x')}")
        x = x[name]
    if isinstance(x, np.ndarray) and x.ndim == len(want.shape) - 1 and x.ndim and x.dtype.kind in "fiub":
        x = x[None]  # one example without its batch axis
    try:
        x = convert(f"input {spec}", np.asarray(x), want, [])
    except DataError as e:
        raise GradfuseError(str(e)) from None
    return x
