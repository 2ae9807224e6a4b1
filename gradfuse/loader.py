"""Loading a model from a user's Python file: ``path/to/model.py`` or ``model.py:object``."""

from __future__ import annotations

import os
import runpy
import sys
import traceback

from gradfuse.errors import GradfuseError, ModelFileError
from gradfuse.model import Model
from gradfuse.nn import Module


def load_model(spec: str) -> Model:
    """Run the file and return its model: the object named after ``:``, else ``model``.

    The object may be a :class:`gradfuse.Model`, a Module (its inputs then come from a
    module-level ``inputs`` dict), or a function returning either.
    """
    path, _, name = spec.partition(":")
    if not os.path.isfile(path):
        raise ModelFileError(f"{path}: no such file (expected a Python file defining a model, e.g. "
                             "examples/digits_mlp.py)")
    namespace = _run(path)
    name = name or "model"
    if name not in namespace:
        models = sorted(k for k, v in namespace.items() if isinstance(v, Model | Module) and not k.startswith("_"))
        hint = f"; it defines {', '.join(models)}: use {path}:{models[0]}" if models else \
            "; define `model = gradfuse.Model(net, inputs={...})`"
        raise ModelFileError(f"{path}: no object named '{name}'{hint}")
    obj = namespace[name]
    if callable(obj) and not isinstance(obj, Model | Module):
        obj = obj()
    if isinstance(obj, Module):
        if "inputs" not in namespace:
            raise ModelFileError(f"{path}: '{name}' is a Module, but the file has no `inputs` dict giving its "
                                 "input types (e.g. inputs = {'x': 'f32[N,64]'})")
        obj = Model(obj, inputs=namespace["inputs"], name=name)
    if not isinstance(obj, Model):
        raise ModelFileError(f"{path}: '{name}' is a {type(obj).__name__}, not a gradfuse.Model or nn.Module")
    return obj


def _run(path: str) -> dict:
    folder = os.path.dirname(os.path.abspath(path))
    sys.path.insert(0, folder)
    try:
        return runpy.run_path(path, run_name="__gradfuse_model__")
    except GradfuseError:
        raise
    except SyntaxError as e:
        raise ModelFileError(f"{e.filename}:{e.lineno}: syntax error: {e.msg}") from None
    except Exception as e:  # the user's code failed: point at their line, not ours
        frames = [f for f in traceback.extract_tb(e.__traceback__) if os.path.abspath(f.filename) ==
                  os.path.abspath(path)] or traceback.extract_tb(e.__traceback__)[-1:]
        where = f"{frames[-1].filename}:{frames[-1].lineno}" if frames else path
        raise ModelFileError(f"{where}: {type(e).__name__}: {e}") from None
    finally:
        sys.path.remove(folder)
