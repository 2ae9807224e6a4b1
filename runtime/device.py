"""Device-resident execution for the CUDA backends: what lives in device memory between steps,
and what crosses the bus in one.

A step on the device reads its parameters, optimizer state and memory-plan arena where they
already are; only the batch goes host→device and only the outputs (the loss, a prediction) come
back. :class:`DeviceWeights` keeps a model's weights on the device and hands out host copies
when Python asks for one (``state_dict``, saving, ``weights[name]``), so no caller has to know
where they are. ``TRANSFERS`` counts every copy, so tests can say how many a step made.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, MutableMapping

import numpy as np

TRANSFERS: Counter = Counter()  # "to_device" / "to_host": copies made, by direction (what tests count)


def on_device(a) -> bool:
    """Whether ``a`` is a Numba device array (a real one, or the simulator's)."""
    return not isinstance(a, np.ndarray) and hasattr(a, "copy_to_host")


def device_shape(shape: tuple) -> tuple:
    """A 0-d value is stored on the device as one element: kernels index it as ``x[0]``."""
    return tuple(shape) or (1,)


def to_device(a: np.ndarray):
    from numba import cuda

    TRANSFERS["to_device"] += 1
    return cuda.to_device(np.ascontiguousarray(a).reshape(device_shape(a.shape)))


def to_host(d, shape: tuple | None = None) -> np.ndarray:
    """A host copy of device array ``d`` (reshaped to ``shape``: a 0-d value comes back 0-d)."""
    TRANSFERS["to_host"] += 1
    out = d.copy_to_host()
    return out.reshape(shape) if shape is not None else out


def empty(shape: tuple, dtype):
    from numba import cuda

    return cuda.device_array(device_shape(shape), dtype)


def run_step(step, launch, arrays: list, written: list[bool], host_outputs: bool = True) -> list | None:
    """Run a device ``step`` once: host arguments go across (and those it updates come back, so
    a caller passing numpy arrays sees them updated as on the CPU); device arguments stay where
    they are. The memory-plan arena (``launch.buffers``) is device memory already; outputs are
    copied to the host once, at the end (that copy waits for the kernels), or left on the device
    (``host_outputs=False``: an output that is an argument is that argument's device array)."""
    device = [a if on_device(a) else to_device(a) for a in arrays]
    bufs = launch.buffers.copy()
    for at, shape, dtype in launch.fresh:
        bufs[at] = empty(shape, dtype)
    for at, arg, shape in launch.in_place:
        bufs[at] = device[arg].reshape(device_shape(shape))
    before = {arg: to_host(device[arg], arrays[arg].shape) for arg in launch.updated_outputs}
    if step(*device, *bufs):
        return None  # a wrong shape: nothing ran
    for a, d, w in zip(arrays, device, written, strict=True):
        if w and d is not a and a.size:
            TRANSFERS["to_host"] += 1
            d.copy_to_host(a.reshape(device_shape(a.shape)))
    if not host_outputs:
        return [bufs[at] if at is not None else device[arg] for at, arg in launch.outputs]
    shapes = {at: shape for at, shape, _ in launch.fresh}
    outs = []
    for at, arg in launch.outputs:
        if at is not None:
            outs.append(to_host(bufs[at], shapes[at]))
        elif arg in before:
            outs.append(before[arg])
        else:
            outs.append(to_host(device[arg], tuple(arrays[arg].shape)))
    return outs


class DeviceWeights(MutableMapping):
    """A compiled model's weights (parameters, optimizer state, running statistics) kept in
    device memory between steps. Reading an entry from Python copies it to its host array first
    (the same array object each time) and counts that array as possibly changed by the caller,
    so the next step uploads it again; a step marks what it updated as newer on the device."""

    def __init__(self, host: dict[str, np.ndarray]):
        self._host = host
        self._device: dict = {}
        self._device_newer: set[str] = set()
        self._host_newer: set[str] = set(host)

    def for_step(self) -> dict:
        """Every weight as a device array, uploading those Python may have changed."""
        for name in self._host_newer:
            h = self._host[name]
            if name in self._device:
                TRANSFERS["to_device"] += 1
                self._device[name].copy_to_device(np.ascontiguousarray(h).reshape(device_shape(h.shape)))
            else:
                self._device[name] = to_device(h)
        self._host_newer.clear()
        return self._device

    def updated(self, names: Iterable[str]) -> None:
        """A step wrote these on the device: their host copies are stale."""
        self._device_newer.update(n for n in names if n in self._host)

    def __getitem__(self, name: str) -> np.ndarray:
        h = self._host[name]
        if name in self._device_newer:
            TRANSFERS["to_host"] += 1
            self._device[name].copy_to_host(h.reshape(device_shape(h.shape)))
            self._device_newer.discard(name)
        self._host_newer.add(name)  # the caller holds the host array now and may write into it
        return h

    def __setitem__(self, name: str, value: np.ndarray) -> None:
        self._host[name] = value
        self._device.pop(name, None)
        self._device_newer.discard(name)
        self._host_newer.add(name)

    def __delitem__(self, name: str) -> None:
        del self._host[name]
        self._device.pop(name, None)
        self._device_newer.discard(name)
        self._host_newer.discard(name)

    def __iter__(self):
        return iter(self._host)

    def __len__(self) -> int:
        return len(self._host)
