"""PyTorch's ``state_dict`` to gradfuse's and back: names and layouts.

    import gradfuse as gf
    model = gf.Model(net, inputs={"x": "f32[N,64]"}, ...)
    model.load_state_dict(gf.from_pytorch(torch_module.state_dict(), model))
    compiled = gf.compile(model)
    ...
    torch_module.load_state_dict(gf.to_pytorch(compiled.state_dict(), model, tensors=True))

Names: a gradfuse tensor is named by its attribute path (``blocks.0.fc1.weight``), as PyTorch
names its state_dict entries, so a gradfuse model whose layers sit under the same attribute names
as the PyTorch module's (Sequential children are ``0``, ``1``, ... in both) maps name for name.
Layers without tensors (activations, Dropout, Flatten, pooling) only need to keep the Sequential
indices aligned: ``nn.ReLU()`` inside a PyTorch Sequential takes an index, so put ``nn.ReLU()`` at
the same place in gradfuse's.

Layouts, per layer (each mapping is the layer's own ``state_from_pytorch`` /
``state_to_pytorch`` method in :mod:`gradfuse.nn`):

=================================  ==========================================================
gradfuse                           PyTorch
=================================  ==========================================================
``Linear(i, o)`` weight [i, o]     ``nn.Linear(i, o)`` weight [o, i]: **transposed**; bias same
``BatchNorm(f)``                   ``nn.BatchNorm1d(f)`` on [N, f]: weight, bias, running_mean,
                                   running_var; ``num_batches_tracked`` is ignored
``LayerNorm(f)``                   ``nn.LayerNorm(f)``: weight, bias (``LayerNorm((C, H, W))``:
                                   weight and bias [C, H, W], as PyTorch's)
``Conv2d(i, o, k, ...)``           ``nn.Conv2d(i, o, k, ...)``: weight [o, i/groups, kh, kw], bias [o]:
                                   the same layout
``BatchNorm2d(c)``                 ``nn.BatchNorm2d(c)``: as BatchNorm (statistics per channel of NCHW)
``Embedding(n, d)``                ``nn.Embedding(n, d)``: weight [n, d]
``MultiHeadSelfAttention(d, h)``   ``nn.MultiheadAttention(d, h, batch_first=True)``:
                                   in_proj_weight [3d, d] / in_proj_bias [3d] split into the
                                   q, k, v Linears (each transposed), out_proj -> out
``SinusoidalPositionalEncoding``   its fixed ``table`` if present, else computed; not written back
=================================  ==========================================================

MultiheadAttention's weights do not depend on ``batch_first``; gradfuse's layer takes [N, T, d]
as ``batch_first=True`` does. Not modelled (the function differs, whatever the weights): attention
masks, dropout > 0, ``add_bias_kv`` (its ``bias_k``/``bias_v`` are reported as unexpected),
BatchNorm1d on [N, C, L] (gradfuse's BatchNorm normalises the last axis; BatchNorm2d axis 1 of NCHW),
Embedding's ``padding_idx``/``max_norm``.

The trap: a square ``Linear`` weight ([64, 64]) loaded into gradfuse *without* this mapping has
the right shape and the wrong layout: it loads silently and computes ``x W`` instead of ``x Wᵀ``.
Non-square ones are refused with a hint pointing here. Convert PyTorch weights with
:func:`from_pytorch` always.

torch is imported only by ``to_pytorch(..., tensors=True)``; ``from_pytorch`` takes tensors or
numpy arrays and reads tensors through their ``detach().cpu().numpy()``.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from gradfuse.nn import Module, Parameter
from gradfuse.state_dict import StateDictError, StateView, to_numpy


def _net(model) -> tuple[Module, str]:
    from gradfuse.model import Model

    if isinstance(model, Model):
        return model.net, f"model {model.name}"
    if isinstance(model, Module):
        return model, f"{type(model).__name__}"
    raise StateDictError(f"expected a gradfuse.Model or gradfuse.nn.Module, got {type(model).__name__}")


def _paths(module: Module, prefix: str = "") -> set[str]:
    """Every path a tensor is reachable under, shared modules included (PyTorch lists those twice)."""
    out = set()
    for name, child in module.children().items():
        path = f"{prefix}{name}"
        out |= {path} if isinstance(child, Parameter) else _paths(child, f"{path}.")
    return out


def _mapped(state: Mapping, model, strict: bool, layout: str, direction: str) -> tuple[Module, dict]:
    """(the net, ``state`` mapped by every layer's ``state_<direction>``), or one StateDictError."""
    net, what = _net(model)
    if not isinstance(state, Mapping):
        raise StateDictError(f"{direction} takes a state_dict (a mapping from names to arrays), "
                             f"got {type(state).__name__}")
    src = StateView({k: to_numpy(v) for k, v in state.items()}, layout=layout)
    out = getattr(net, f"state_{direction}")(src)
    problems = src.problems(strict)
    if problems:
        kind = "PyTorch state_dict" if layout == "PyTorch" else "state_dict"
        raise StateDictError(f"the {kind} does not fit {what}: " + "; ".join(problems))
    return net, out


def from_pytorch(state_dict: Mapping, model, *, strict: bool = True) -> dict[str, np.ndarray]:
    """A ``torch.nn.Module.state_dict()`` (tensors or numpy arrays) in gradfuse's names and
    layouts, for ``model`` (a :class:`gradfuse.Model` or :class:`gradfuse.nn.Module`): pass the
    result to ``Model.load_state_dict`` or ``CompiledModel.load_state_dict``.

    Each layer maps its own entries (``Linear`` transposes its weight; ``MultiHeadSelfAttention``
    splits ``in_proj_weight``; ``BatchNorm`` drops ``num_batches_tracked``; see the module
    docstring). Raises one StateDictError naming, in PyTorch's names, every entry that is missing,
    unexpected (``strict=False`` tolerates those two) or not the shape PyTorch's layer would have.
    The arrays keep their dtype; loading converts them."""
    net, out = _mapped(state_dict, model, strict, "PyTorch", "from_pytorch")
    known = dict(net.named_tensors())
    aliases = _paths(net)
    assert all(k in aliases for k in out), sorted(set(out) - aliases)  # a layer's mapping names its own tensors
    return {k: v for k, v in out.items() if k in known}  # a shared module's second path: the same tensor


def to_pytorch(state: Mapping, model, *, tensors: bool = False, strict: bool = True) -> dict:
    """The inverse of :func:`from_pytorch`: gradfuse's state_dict (``CompiledModel.state_dict()``,
    ``Model.initial_values()``) in PyTorch's names and layouts, as numpy arrays, or as
    ``torch.Tensor`` with ``tensors=True`` (what ``torch.nn.Module.load_state_dict`` takes; that
    imports torch). BatchNorm's ``num_batches_tracked`` is not written: PyTorch fills it in."""
    _, out = _mapped(state, model, strict, "gradfuse", "to_pytorch")
    if tensors:
        import torch

        return {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in out.items()}
    return out
