"""Errors a user can cause, as typed exceptions with messages in the user's terms.

Internal invariants stay ``assert``s; everything here is something a user can fix, and the
CLI prints it as one line without a traceback.
"""

from __future__ import annotations


class GradfuseError(Exception):
    """Base of every error a user can cause; ``str(err)`` is the whole message."""


class ShapeError(GradfuseError):
    """An op got operands whose shapes or dtypes it cannot accept.

    Raised by an op's shape rule in op terms; the tracer adds where it happened (the user's
    file and line, the layer) with :meth:`located`.
    """

    def __init__(self, message: str, hint: str | None = None):
        self.message = message
        self.hint = hint
        self.where: str | None = None
        super().__init__(self._render())

    def located(self, where: str) -> ShapeError:
        self.where = where
        self.args = (self._render(),)
        return self

    def _render(self) -> str:
        text = f"{self.where}: {self.message}" if self.where else self.message
        return f"{text} — {self.hint}" if self.hint else text


class AttrError(GradfuseError):
    """An op was given an attribute it does not have, or one of the wrong kind."""


class IRParseError(GradfuseError):
    """Malformed IR text; the message starts with ``file:line:col``."""

    def __init__(self, file: str, line: int, col: int, message: str):
        self.file, self.line, self.col = file, line, col
        super().__init__(f"{file}:{line}:{col}: {message}")


class VerifyError(GradfuseError):
    """A graph breaks an IR invariant (use before definition, wrong type, ...)."""


class InputError(GradfuseError):
    """Arrays passed to a graph or program do not match its signature."""


class ModelFileError(GradfuseError):
    """A model file given on the command line cannot be loaded or lacks what is needed."""


class NumericError(GradfuseError):
    """A value became NaN or infinite (reported by the runtime's check mode)."""
