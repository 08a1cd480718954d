"""The SQL-like `expression` of EnOS search APIs, enough of it to filter like EnOS does.

Grammar: or-terms of and-terms of (expr) | exists(path) | not exists(path) |
path (= | != | like) literal | path in (literal, ...). Literals are quoted with ' or ".
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

Predicate = Callable[[dict[str, Any]], bool]

_TOKEN = re.compile(
    r"""\s*(?:
        (?P<str>'[^']*'|"[^"]*")
      | (?P<num>-?\d+(?:\.\d+)?)
      | (?P<op>!=|=|\(|\)|,)
      | (?P<word>[A-Za-z_][A-Za-z0-9_.\-]*)
    )""",
    re.VERBOSE,
)


class ExpressionError(ValueError):
    pass


def _tokens(text: str) -> list[tuple[str, str]]:
    out: list[tuple[str, str]] = []
    pos = 0
    text = text.strip()
    while pos < len(text):
        m = _TOKEN.match(text, pos)
        if not m or m.end() == pos:
            raise ExpressionError(f"cannot parse expression near {text[pos : pos + 20]!r}")
        kind = m.lastgroup or ""
        value = m.group(kind)
        if kind == "word" and value.lower() in ("and", "or", "in", "like", "exists", "not"):
            kind, value = "kw", value.lower()
        out.append((kind, value))
        pos = m.end()
    return out


def lookup(doc: dict[str, Any], path: str) -> tuple[bool, Any]:
    """(found, value) of a dotted path; an i18n object compares by its default value."""
    cur: Any = doc
    for part in path.split("."):
        if isinstance(cur, dict) and "defaultValue" in cur and part not in cur:
            if part == "default":
                cur = cur.get("defaultValue")
                continue
            cur = (cur.get("i18nValue") or {}).get(part)
            if cur is None:
                return False, None
            continue
        if not isinstance(cur, dict) or part not in cur:
            return False, None
        cur = cur[part]
    if isinstance(cur, dict) and "defaultValue" in cur:
        cur = cur["defaultValue"]
    return True, cur


def _same(a: Any, literal: Any) -> bool:
    if isinstance(a, bool):
        return str(a).lower() == str(literal).lower()
    return bool(a == literal)


class _Parser:
    def __init__(self, tokens: list[tuple[str, str]]) -> None:
        self.t = tokens
        self.i = 0

    def peek(self) -> tuple[str, str] | None:
        return self.t[self.i] if self.i < len(self.t) else None

    def take(self, kind: str | None = None, value: str | None = None) -> tuple[str, str]:
        tok = self.peek()
        if tok is None or (kind and tok[0] != kind) or (value and tok[1] != value):
            want = value or kind or "more"
            raise ExpressionError(f"expected {want} in expression, got {tok[1] if tok else 'end'}")
        self.i += 1
        return tok

    def literal(self) -> Any:
        kind, value = self.take()
        if kind == "str":
            return value[1:-1]
        if kind == "num":
            return float(value) if "." in value else int(value)
        if kind == "word" and value in ("true", "false"):
            return value == "true"
        raise ExpressionError(f"expected a literal, got {value}")

    def parse(self) -> Predicate:
        pred = self.or_expr()
        left = self.peek()
        if left is not None:
            raise ExpressionError(f"unexpected {left[1]!r} in expression")
        return pred

    def or_expr(self) -> Predicate:
        terms = [self.and_expr()]
        while self.peek() == ("kw", "or"):
            self.take()
            terms.append(self.and_expr())
        return terms[0] if len(terms) == 1 else (lambda d: any(t(d) for t in terms))

    def and_expr(self) -> Predicate:
        terms = [self.atom()]
        while self.peek() == ("kw", "and"):
            self.take()
            terms.append(self.atom())
        return terms[0] if len(terms) == 1 else (lambda d: all(t(d) for t in terms))

    def atom(self) -> Predicate:
        tok = self.peek()
        if tok == ("op", "("):
            self.take()
            inner = self.or_expr()
            self.take("op", ")")
            return inner
        if tok == ("kw", "not"):
            self.take()
            inner = self.atom()
            return lambda d: not inner(d)
        if tok == ("kw", "exists"):
            self.take()
            self.take("op", "(")
            path = self.take("word")[1]
            self.take("op", ")")
            return lambda d: lookup(d, path)[0]
        path = self.take("word")[1]
        kind, op = self.take()
        if (kind, op) == ("op", "="):
            lit = self.literal()
            return lambda d: _same(lookup(d, path)[1], lit)
        if (kind, op) == ("op", "!="):
            lit = self.literal()
            return lambda d: not _same(lookup(d, path)[1], lit)
        if (kind, op) == ("kw", "like"):
            lit = str(self.literal()).lower()
            return lambda d: lit in str(lookup(d, path)[1] or "").lower()
        if (kind, op) == ("kw", "in"):
            self.take("op", "(")
            values = [self.literal()]
            while self.peek() == ("op", ","):
                self.take()
                values.append(self.literal())
            self.take("op", ")")
            return lambda d: any(_same(lookup(d, path)[1], v) for v in values)
        raise ExpressionError(f"unknown operator {op!r} in expression")


def compile_expression(text: str | None) -> Predicate:
    """A predicate over API documents; an empty expression matches everything."""
    if text is None or not str(text).strip():
        return lambda _d: True
    return _Parser(_tokens(str(text))).parse()
