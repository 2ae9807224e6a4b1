"""Reads the text form written by :mod:`.printer` back into a :class:`~.graph.Graph`.

A small tokenizer (one regex per token kind) feeds a recursive-descent parser that builds the
graph with :class:`~.graph.GraphBuilder`, so every node's shape rule runs again and the verifier
checks the result. Any malformed text raises :class:`~gradfuse.errors.IRParseError` with
``file:line:col``; errors of the ops themselves (bad shapes, attributes) are located at the op.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from gradfuse.errors import GradfuseError, IRParseError

from .graph import ArgKind, Graph, GraphBuilder, SourceLoc, Value
from .printer import NOTE_SEP, format_where
from .registry import OpDef, get_op
from .types import Dim, DType, TensorType

_TOKEN_RE = re.compile(r"""
    (?P<space>[ \t]+)
  | (?P<comment>\#.*)
  | (?P<value>%[A-Za-z0-9_][A-Za-z0-9_.]*)
  | (?P<global>@[A-Za-z0-9_][A-Za-z0-9_.]*)
  | (?P<number>-?[0-9]+(?:\.[0-9]+)?(?:[eE][+-]?[0-9]+)?|-inf(?![A-Za-z0-9_]))
  | (?P<ident>[A-Za-z_][A-Za-z0-9_]*)
  | (?P<string>"(?:[^"\\]|\\.)*")
  | (?P<punct><-|[(){}\[\],:=*])
""", re.VERBOSE)
_INT_RE = re.compile(r"-?[0-9]+")
_WHERE_RE = re.compile(r"(?:(\S+):([0-9]+))?(?: ?@(\S+))?")
_KEYWORDS = {"true": True, "false": False, "none": None, "inf": math.inf, "nan": math.nan}
_MAX_LIST_DEPTH = 16


@dataclass(frozen=True)
class Token:
    kind: str  # value, global, number, ident, string, punct, comment, newline, eof
    text: str
    line: int
    col: int

    def describe(self) -> str:
        if self.kind in ("newline", "eof"):
            return "end of line" if self.kind == "newline" else "end of input"
        if self.kind == "comment":
            return "a comment"
        return repr(self.text if len(self.text) <= 40 else self.text[:37] + "...")


def tokenize(text: str, file: str = "<text>") -> Iterator[Token]:
    """Tokens of ``text``, with a ``newline`` token ending every line and ``eof`` at the end."""
    lines = [line.removesuffix("\r") for line in text.split("\n")]  # the printer writes no "\r"
    for lineno, line in enumerate(lines, 1):
        pos = 0
        while pos < len(line):
            m = _TOKEN_RE.match(line, pos)
            if m is None:
                ch = line[pos]
                message = {"%": "expected a value name after '%'", "@": "expected a name after '@'",
                           '"': "unterminated string"}.get(ch, f"unexpected character {ch!r}")
                raise IRParseError(file, lineno, pos + 1, message)
            if m.lastgroup != "space":
                yield Token(m.lastgroup, m.group(), lineno, pos + 1)
            pos = m.end()
        yield Token("newline", "", lineno, len(line) + 1)
    yield Token("eof", "", len(lines), len(lines[-1]) + 1)


def parse_comment(text: str) -> tuple[str | None, SourceLoc | None, str]:
    """``note · file:line @scope`` -> (note, loc, scope); the inverse of the printer's comment.

    The part after the last `` · `` (or the whole text) is a location only if it prints back
    exactly the same, so that any printed comment reads back to the same text.
    """
    head, sep, tail = text.rpartition(NOTE_SEP)
    where = _parse_where(tail)
    if where is None or (sep and not head):
        return text or None, None, ""
    return head or None, *where


def _parse_where(text: str) -> tuple[SourceLoc | None, str] | None:
    m = _WHERE_RE.fullmatch(text)
    if not text or m is None:
        return None
    file, line, scope = m.groups()
    try:
        loc = SourceLoc(file, int(line)) if file else None
    except ValueError:  # more digits than int() takes
        return None
    scope = scope or ""
    return (loc, scope) if format_where(loc, scope) == text else None


def parse_graph(text: str, file: str = "<text>") -> Graph:
    """Parse one ``func`` in the printer's text form; raises IRParseError on any bad input."""
    return _Parser(text, file).graph()


class _Parser:
    def __init__(self, text: str, file: str):
        self.file = file
        self.tokens = tokenize(text, file)
        self.tok = next(self.tokens)
        self.values: dict[str, Value] = {}

    # ---- token helpers ---------------------------------------------------------------------
    def error(self, tok: Token, message: str) -> IRParseError:
        # one line, even where an op's message quotes a string attribute holding a line break
        return IRParseError(self.file, tok.line, tok.col, " ".join(message.splitlines()))

    def advance(self) -> Token:
        tok = self.tok
        if tok.kind != "eof":
            self.tok = next(self.tokens)
        return tok

    def at(self, kind: str, text: str | None = None) -> bool:
        return self.tok.kind == kind and (text is None or self.tok.text == text)

    def expect(self, kind: str, text: str | None, expected: str) -> Token:
        """The current token if it is ``kind`` (and ``text``); else an error naming ``expected``."""
        if not self.at(kind, text):
            raise self.error(self.tok, f"expected {expected}, found {self.tok.describe()}")
        return self.advance()

    def skip_blank_lines(self) -> None:
        while self.tok.kind in ("newline", "comment"):
            self.advance()

    def end_of_line(self, after: str) -> None:
        if self.at("comment"):
            self.advance()
        if not (self.at("newline") or self.at("eof")):
            raise self.error(self.tok, f"expected end of line after {after}, found {self.tok.describe()}")
        self.advance()

    # ---- values --------------------------------------------------------------------------
    def define(self, tok: Token) -> str:
        name = tok.text[1:]
        if name in self.values:
            raise self.error(tok, f"redefinition of value %{name}")
        return name

    def use(self) -> Value:
        tok = self.expect("value", None, "a value '%name'")
        try:
            return self.values[tok.text[1:]]
        except KeyError:
            raise self.error(tok, f"use of undefined value {tok.text}") from None

    def value_list(self, what: str, attrs_may_follow: bool) -> list[Value]:
        """``%a, %b, ...`` (possibly empty) up to the end of the line (or an attribute block)."""
        values = []
        if self.at("value"):
            values.append(self.use())
            while self.at("punct", ","):
                self.advance()
                values.append(self.use())
        if self.tok.kind in ("newline", "eof", "comment") or (attrs_may_follow and self.at("punct", "{")):
            return values
        then = "'{' or end of line" if attrs_may_follow else "end of line"
        expected = f"',' or {then} after {what}" if values else f"{what} '%name' or {then}"
        raise self.error(self.tok, f"expected {expected}, found {self.tok.describe()}")

    # ---- types and attributes ------------------------------------------------------------------
    def type(self) -> TensorType:
        tok = self.expect("ident", None, "a tensor type like f32[N,64]")
        if tok.text not in DType.__members__:
            raise self.error(tok, f"unknown dtype '{tok.text}' (expected f32, f64, i32, i64 or bool)")
        self.expect("punct", "[", "'[' after the dtype")
        dims: list[Dim] = []
        if not self.at("punct", "]"):
            dims.append(self.dim())
            while self.at("punct", ","):
                self.advance()
                dims.append(self.dim())
        self.expect("punct", "]", "',' or ']' in the shape")
        return TensorType(DType[tok.text], tuple(dims))

    def dim(self) -> Dim:
        tok = self.tok
        if tok.kind == "ident":
            return self.product(self.advance().text)
        if tok.kind == "number" and tok.text.isdigit():
            return self.integer(self.advance())
        raise self.error(tok, f"expected a dimension (a size or a symbol like N), found {tok.describe()}")

    def product(self, first: str) -> str:
        """``N*32``: a symbol times further symbols or ints (a dimension reshape made)."""
        parts = [first]
        while self.at("punct", "*"):
            self.advance()
            tok = self.tok
            if tok.kind != "ident" and not (tok.kind == "number" and tok.text.isdigit()):
                raise self.error(tok, f"expected a symbol or a size after '*', found {tok.describe()}")
            parts.append(self.advance().text)
        return "*".join(parts)

    def integer(self, tok: Token) -> int:
        try:
            return int(tok.text)
        except ValueError:  # more digits than int() takes
            raise self.error(tok, "integer literal too long") from None

    def attrs(self, opdef: OpDef) -> dict[str, Any]:
        """``{name=value, ...}``; the current token is the ``{``."""
        self.advance()
        attrs: dict[str, Any] = {}
        while not self.at("punct", "}"):
            if attrs:
                self.expect("punct", ",", "',' or '}' after attribute")
            tok = self.expect("ident", None, "an attribute name")
            if tok.text in attrs:
                raise self.error(tok, f"duplicate attribute {tok.text}")
            self.expect("punct", "=", f"'=' after attribute name {tok.text}")
            spec = opdef.attrs.get(tok.text)
            # A symbol of a shape may be called e.g. ``inf``: keep dims' names as written.
            attrs[tok.text] = self.attr_value(keywords=spec is None or spec.kind != "dims")
        self.advance()
        return attrs

    def attr_value(self, keywords: bool, depth: int = 0) -> Any:
        tok = self.tok
        if tok.kind == "number":
            self.advance()
            return self.integer(tok) if _INT_RE.fullmatch(tok.text) else float(tok.text)
        if tok.kind == "string":
            self.advance()
            try:
                return json.loads(tok.text)
            except ValueError as e:
                raise self.error(tok, f"bad string literal: {e}") from None
        if tok.kind == "ident":
            self.advance()
            if self.at("punct", "*"):  # a product dimension, N*32
                return self.product(tok.text)
            return _KEYWORDS[tok.text] if keywords and tok.text in _KEYWORDS else tok.text
        if self.at("punct", "["):
            if depth == _MAX_LIST_DEPTH:
                raise self.error(tok, "lists nested too deeply")
            self.advance()
            items = []
            while not self.at("punct", "]"):
                if items:
                    self.expect("punct", ",", "',' or ']' in the list")
                items.append(self.attr_value(keywords, depth + 1))
            self.advance()
            return items
        raise self.error(tok, "expected an attribute value (a number, true, false, none, a \"string\", "
                              f"a name or a [list]), found {tok.describe()}")

    # ---- graph structure ---------------------------------------------------------------------
    def graph(self) -> Graph:
        self.skip_blank_lines()
        self.expect("ident", "func", "'func'")
        name = self.expect("global", None, "a function name like @model").text[1:]
        b = GraphBuilder(name)
        self.expect("punct", "(", "'(' after the function name")
        self.skip_blank_lines()
        while not self.at("punct", ")"):
            self.argument(b)
            self.skip_blank_lines()
            if self.at("punct", ","):
                self.advance()
                self.skip_blank_lines()
            elif not self.at("punct", ")"):
                raise self.error(self.tok, f"expected ',' or ')' after argument, found {self.tok.describe()}")
        self.advance()
        self.expect("punct", "{", "'{' after the arguments")
        self.end_of_line("'{'")
        self.skip_blank_lines()
        kernels: set[str] = set()
        while not self.at("ident", "return"):
            if self.at("ident", "kernel"):
                self.kernel(b, kernels)
            elif not self.at("value"):
                raise self.error(self.tok, f"expected a node ('%name: type = op ...'), 'kernel' or 'return', "
                                           f"found {self.tok.describe()}")
            else:
                self.node(b)
            self.skip_blank_lines()
        ret = self.advance()
        outputs = self.value_list("a return value", attrs_may_follow=False)
        self.end_of_line("return")
        updates = []
        self.skip_blank_lines()
        while self.at("ident", "update"):
            self.advance()
            old = self.use()
            self.expect("punct", "<-", "'<-' after the updated state")
            updates.append((old, self.use()))
            self.end_of_line("update")
            self.skip_blank_lines()
        self.expect("punct", "}", "'update' or '}'")
        self.skip_blank_lines()
        self.expect("eof", None, "end of input after '}'")
        try:
            return b.finish(outputs, updates)
        except GradfuseError as e:
            raise self.error(ret, str(e)) from None

    def argument(self, b: GraphBuilder) -> None:
        kinds = {k.value: k for k in ArgKind}
        if not self.at("ident") or self.tok.text not in kinds:
            raise self.error(self.tok, f"expected an argument kind (input, param or state), "
                                       f"found {self.tok.describe()}")
        kind = kinds[self.advance().text]
        name = self.define(self.expect("value", None, "an argument name '%name'"))
        self.expect("punct", ":", f"':' after %{name}")
        self.values[name] = b.arg(name, self.type(), kind, exact=True)

    def kernel(self, b: GraphBuilder, seen: set[str]) -> None:
        """``kernel @k0 {`` nodes ``}``: the nodes the fusion pass put in one kernel."""
        self.advance()
        tok = self.expect("global", None, "a kernel name like @k0")
        name = tok.text[1:]
        if name in seen:
            raise self.error(tok, f"kernel @{name} appears twice")
        seen.add(name)
        self.expect("punct", "{", f"'{{' after @{name}")
        self.end_of_line("'{'")
        self.skip_blank_lines()
        if not self.at("value"):
            raise self.error(self.tok, f"expected a node in kernel @{name}, found {self.tok.describe()}")
        while self.at("value"):
            self.node(b, name)
            self.skip_blank_lines()
        self.expect("punct", "}", f"a node or '}}' closing kernel @{name}")
        self.end_of_line("'}'")

    def node(self, b: GraphBuilder, kernel: str | None = None) -> None:
        names: list[str] = []
        types: list[TensorType] = []
        while True:
            tok = self.expect("value", None, "a result name '%name'")
            name = self.define(tok)
            if name in names:
                raise self.error(tok, f"redefinition of value %{name}")
            self.expect("punct", ":", f"':' after %{name}")
            names.append(name)
            types.append(self.type())
            if not self.at("punct", ","):
                break
            self.advance()
        self.expect("punct", "=", "',' or '=' after the result type")
        optok = self.expect("ident", None, "an op name")
        op = optok.text
        try:
            opdef = get_op(op)
        except GradfuseError as e:
            raise self.error(optok, str(e)) from None
        inputs = self.value_list("an operand", attrs_may_follow=True)
        attrs = self.attrs(opdef) if self.at("punct", "{") else {}
        note, loc, scope = None, None, ""
        if self.at("comment"):
            text = self.advance().text
            note, loc, scope = parse_comment(text[2:] if text.startswith("# ") else text[1:])
        self.end_of_line("the attributes")
        try:
            outs = b.emit(op, inputs, attrs, names=names, types=types, loc=loc, scope=scope, note=note,
                          kernel=kernel)
        except GradfuseError as e:
            message = str(e)
            raise self.error(optok, message if message.startswith(f"{op}:") else f"{op}: {message}") from None
        self.values.update((v.name, v) for v in outs)
