"""``--where``: a small, safe row filter for ``export`` (never Python's ``eval``).

Grammar (keywords case-insensitive)::

    expr       := term ("or" term)*
    term       := factor ("and" factor)*
    factor     := "not" factor | "(" expr ")" | comparison
    comparison := COLUMN OP value
    OP         := "<" | "<=" | ">" | ">=" | "==" | "=" | "!="
    value      := NUMBER | 'text' | "text" | null

Examples: ``pq_score_after >= 0.6``, ``pq_score >= 0.5 and (aq_score >= 0.4 or aq_score == null)``,
``grefine_route != "reverted"``. A comparison with a null value is false (so ``aq_score >= 0.4``
leaves out rows without a prompt unless ``or aq_score == null`` is added). The result is a pyarrow
compute expression, evaluated column-wise on record batches; columns and types are checked against
the data's schema before any row is read.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import pyarrow as pa
import pyarrow.compute as pc

from grefine_curate.curate.errors import ConfigError

_TOKEN = re.compile(r"""\s*(?:(?P<num>[-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?)|(?P<op><=|>=|==|!=|<|>|=)|"""
                    r"""(?P<str>'[^']*'|"[^"]*")|(?P<name>[A-Za-z_][A-Za-z0-9_.\-]*)|(?P<paren>[()]))""")
_OPS = {"<": "less", "<=": "less_equal", ">": "greater", ">=": "greater_equal", "==": "equal", "=": "equal",
        "!=": "not_equal"}


@dataclass
class _Tok:
    kind: str  # num | op | str | name | paren | end
    text: str
    pos: int


def _tokens(text: str) -> list[_Tok]:
    out, pos = [], 0
    while pos < len(text):
        if text[pos:].strip() == "":
            break
        m = _TOKEN.match(text, pos)
        if m is None or m.end() == pos:
            raise _error(text, pos, "unexpected character")
        kind = m.lastgroup
        out.append(_Tok(kind, m.group(kind), m.start(kind)))
        pos = m.end()
    out.append(_Tok("end", "", len(text)))
    return out


def _error(text: str, pos: int, what: str) -> ConfigError:
    return ConfigError(f"--where: {what} at position {pos + 1}:\n  {text}\n  {' ' * pos}^\n"
                       "expected comparisons 'COLUMN OP VALUE' (OP: < <= > >= == !=; VALUE: a number, 'text' or "
                       "null) joined with and / or / not and parentheses, e.g. \"pq_score_after >= 0.6\"")


class _Parser:
    def __init__(self, text: str, schema: pa.Schema):
        self.text, self.schema, self.toks, self.i = text, schema, _tokens(text), 0

    def peek(self) -> _Tok:
        return self.toks[self.i]

    def next(self) -> _Tok:
        t = self.toks[self.i]
        self.i += 1
        return t

    def keyword(self, word: str) -> bool:
        t = self.peek()
        if t.kind == "name" and t.text.lower() == word:
            self.i += 1
            return True
        return False

    def expr(self) -> pc.Expression:
        e = self.term()
        while self.keyword("or"):
            e = e | self.term()
        return e

    def term(self) -> pc.Expression:
        e = self.factor()
        while self.keyword("and"):
            e = e & self.factor()
        return e

    def factor(self) -> pc.Expression:
        if self.keyword("not"):
            return ~self.factor()
        t = self.peek()
        if t.kind == "paren" and t.text == "(":
            self.next()
            e = self.expr()
            close = self.next()
            if close.kind != "paren" or close.text != ")":
                raise _error(self.text, close.pos, "missing ')'")
            return e
        return self.comparison()

    def comparison(self) -> pc.Expression:
        col = self.next()
        if col.kind != "name" or col.text.lower() in ("and", "or", "not", "null"):
            raise _error(self.text, col.pos, "expected a column name")
        if col.text not in self.schema.names:
            raise ConfigError(f"--where: no column {col.text!r}; columns: {', '.join(self.schema.names)}")
        op = self.next()
        if op.kind != "op":
            raise _error(self.text, op.pos, f"expected a comparison after {col.text!r}")
        val = self.next()
        field = pc.field(col.text)
        if val.kind == "name" and val.text.lower() == "null":
            if op.text in ("==", "="):
                return field.is_null()
            if op.text == "!=":
                return field.is_valid()
            raise _error(self.text, op.pos, "null compares only with == or !=")
        t = self.schema.field(col.text).type
        if val.kind == "num":
            if not (pa.types.is_integer(t) or pa.types.is_floating(t)):
                raise ConfigError(f"--where: column {col.text!r} holds {t}, not numbers; compare it with 'text'")
            value = float(val.text)
        elif val.kind == "str":
            if not (pa.types.is_string(t) or pa.types.is_large_string(t)):
                raise ConfigError(f"--where: column {col.text!r} holds {t}, not text; compare it with a number")
            if op.text not in ("==", "=", "!="):
                raise _error(self.text, op.pos, "text compares only with == or !=")
            value = val.text[1:-1]
        else:
            raise _error(self.text, val.pos, "expected a number, 'text' or null")
        return getattr(pc, _OPS[op.text])(field, pa.scalar(value))


def parse_where(text: str, schema: pa.Schema) -> pc.Expression:
    """A filter expression over ``schema``'s columns; ConfigError (exit 2) naming the problem otherwise."""
    if not text or not text.strip():
        raise ConfigError("--where is empty; give a condition such as \"pq_score_after >= 0.6\"")
    p = _Parser(text, schema)
    e = p.expr()
    if p.peek().kind != "end":
        raise _error(text, p.peek().pos, f"unexpected {p.peek().text!r}")
    return e


def columns_of(text: str) -> set[str]:
    """The column names an expression mentions (without checking them)."""
    return {t.text for t in _tokens(text) if t.kind == "name" and t.text.lower() not in ("and", "or", "not", "null")}


__all__ = ["columns_of", "parse_where"]
