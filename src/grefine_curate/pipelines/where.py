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

Numbers compare exactly: on an integer column (``grefine_seed``, int64 beyond 2^53) the literal is
read as an exact rational and the comparison made on integers (``row_key > 1.5`` is ``row_key >= 2``),
never through float64. Limits, each refused with one line (exit 2) instead of a crash: parentheses
and ``not`` nested deeper than MAX_NESTING (Python's recursion), and more than MAX_COMPARISONS
comparisons (Arrow flattens an ``or`` / ``and`` chain and evaluates it recursively: 10,000 crash the
process). A list or struct column cannot be compared; the error says which columns can.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from fractions import Fraction

import pyarrow as pa
import pyarrow.compute as pc

from grefine_curate.curate.errors import ConfigError

_TOKEN = re.compile(r"""\s*(?:(?P<num>[-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?)|(?P<op><=|>=|==|!=|<|>|=)|"""
                    r"""(?P<str>'[^']*'|"[^"]*")|(?P<name>[A-Za-z_][A-Za-z0-9_.\-]*)|(?P<paren>[()]))""")
MAX_NESTING = 100  # parentheses and `not` inside each other
MAX_COMPARISONS = 1000  # comparisons in one expression (Arrow's evaluation recurses along and / or chains)
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
        self.comparisons = 0

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

    def expr(self, nesting: int = 0) -> pc.Expression:
        e = self.term(nesting)
        while self.keyword("or"):
            e = e | self.term(nesting)
        return e

    def term(self, nesting: int) -> pc.Expression:
        e = self.factor(nesting)
        while self.keyword("and"):
            e = e & self.factor(nesting)
        return e

    def factor(self, nesting: int) -> pc.Expression:
        t = self.peek()
        if (t.kind == "paren" and t.text == "(") or (t.kind == "name" and t.text.lower() == "not"):
            if nesting >= MAX_NESTING:
                raise ConfigError(f"--where: parentheses and 'not' nested more than {MAX_NESTING} deep at position "
                                  f"{t.pos + 1}; write the condition flatter")
        if self.keyword("not"):
            return ~self.factor(nesting + 1)
        if t.kind == "paren" and t.text == "(":
            self.next()
            e = self.expr(nesting + 1)
            close = self.next()
            if close.kind != "paren" or close.text != ")":
                raise _error(self.text, close.pos, "missing ')'")
            return e
        self.comparisons += 1
        if self.comparisons > MAX_COMPARISONS:
            raise ConfigError(f"--where: more than {MAX_COMPARISONS} comparisons (at position {t.pos + 1}); "
                              "filter in steps, or export and filter the Parquet output")
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
        if not _comparable(t):
            raise ConfigError(f"--where: column {col.text!r} holds {t}, which --where cannot compare; it compares "
                              f"numbers, text and null (columns: {', '.join(_comparable_columns(self.schema))})")
        if val.kind == "num":
            if not (pa.types.is_integer(t) or pa.types.is_floating(t)):
                raise ConfigError(f"--where: column {col.text!r} holds {t}, not numbers; compare it with 'text'")
            if pa.types.is_integer(t):
                return _integer_comparison(field, op.text, _exact(val.text, col.text), t)
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


def _comparable(t: pa.DataType) -> bool:
    return (pa.types.is_integer(t) or pa.types.is_floating(t) or pa.types.is_string(t) or pa.types.is_large_string(t)
            or pa.types.is_null(t))


def _comparable_columns(schema: pa.Schema) -> list[str]:
    return [f.name for f in schema if _comparable(f.type)]


def _exact(number: str, column: str) -> Fraction:
    """A number literal as an exact rational (1e400 would need a 400-digit integer: refused past 1e±400)."""
    exponent = re.search(r"[eE]([-+]?\d+)$", number)
    if exponent is not None and abs(int(exponent.group(1))) > 400:
        raise ConfigError(f"--where: the number {number} is out of range for the integer column {column!r}")
    return Fraction(number)


def _integer_comparison(field: pc.Expression, op: str, value: Fraction, t: pa.DataType) -> pc.Expression:
    """``field OP value`` on an integer column, exactly: integers compare as integers, never via float64."""
    lo, hi = (-(1 << (t.bit_width - 1)), (1 << (t.bit_width - 1)) - 1) if pa.types.is_signed_integer(t) \
        else (0, (1 << t.bit_width) - 1)
    never = field.is_valid() & pc.scalar(False)  # false, and null rows stay out as in any comparison
    if op in ("==", "=", "!="):
        if value.denominator != 1 or not lo <= value <= hi:  # no integer of the column equals it
            return never if op != "!=" else field.is_valid()
        return getattr(pc, _OPS[op])(field, pa.scalar(int(value), t))
    if op in ("<", "<="):  # x < v  <=>  x <= ceil(v) - 1;  x <= v  <=>  x <= floor(v)
        bound = -((-value.numerator) // value.denominator) - 1 if op == "<" else value.numerator // value.denominator
        if bound >= hi:
            return field.is_valid()
        return never if bound < lo else pc.less_equal(field, pa.scalar(bound, t))
    # x > v  <=>  x >= floor(v) + 1;  x >= v  <=>  x >= ceil(v)
    bound = value.numerator // value.denominator + 1 if op == ">" else -((-value.numerator) // value.denominator)
    if bound <= lo:
        return field.is_valid()
    return never if bound > hi else pc.greater_equal(field, pa.scalar(bound, t))


def parse_where(text: str, schema: pa.Schema) -> pc.Expression:
    """A filter expression over ``schema``'s columns; ConfigError (exit 2) naming the problem otherwise."""
    if text is None or not text.strip():
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
