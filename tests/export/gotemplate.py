"""A small evaluator of Go's text/template, enough to run the TEMPLATE lines chattune writes for Ollama.

No Go toolchain or Ollama is installed here, so the tests run the Go templates with this instead and compare
with the run's Jinja template. Supported: text, {{- -}} trimming, output of variables and fields,
`range $i, $m := .Messages`, if / else if / else / end, `$x := expr`, `$x = expr`, and the functions the
templates use (eq, ne, and, or, not, len, slice, printf "%s").
"""

from __future__ import annotations

import re
from typing import Any

_ACTION = re.compile(r"\{\{(-?)\s*(.*?)\s*(-?)\}\}", re.S)
_TOKEN = re.compile(r'\s*("(?:[^"\\]|\\.)*"|\(|\)|:=|=|,|[$.\w][\w.$]*|\d+)')


def _parse(src: str) -> list[Any]:
    """Text and actions, trimming applied: [str | ('act', text)]."""
    out: list[Any] = []
    pos = 0
    for m in _ACTION.finditer(src):
        text = src[pos:m.start()]
        if m.group(1):
            text = text.rstrip()
        out.append(text)
        out.append(("act", m.group(2)))
        pos = m.end()
        if m.group(3):
            rest = src[pos:]
            pos += len(rest) - len(rest.lstrip())
    out.append(src[pos:])
    return out


def _tokens(expr: str) -> list[str]:
    toks, pos = [], 0
    while pos < len(expr.rstrip()):
        m = _TOKEN.match(expr, pos)
        if not m:
            raise ValueError(f"cannot read {expr[pos:]!r}")
        toks.append(m.group(1))
        pos = m.end()
    return toks


_FUNCS = {
    "eq": lambda a, b: a == b, "ne": lambda a, b: a != b, "not": lambda a: not a,
    "and": lambda *a: all(a), "or": lambda *a: any(a), "len": len,
    "slice": lambda x, i: x[i:], "printf": lambda f, *a: f.replace("%s", "{}").format(*a),
}


def _value(tok: str, scope: dict[str, Any]) -> Any:
    if tok.startswith('"'):
        return tok[1:-1].encode().decode("unicode_escape")
    if tok.isdigit():
        return int(tok)
    head, *fields = tok.split(".")
    obj = scope["$"] if head in ("", "$") else scope[head]
    for f in fields:
        obj = obj[f]
    return obj


def _eval(toks: list[str], scope: dict[str, Any]) -> Any:
    def term(i: int) -> tuple[Any, int]:
        if toks[i] == "(":
            val, i = call(i + 1)
            return val, i + 1  # past ')'
        return _value(toks[i], scope), i + 1

    def call(i: int) -> tuple[Any, int]:
        if toks[i] in _FUNCS:
            fn, args, i = _FUNCS[toks[i]], [], i + 1
            while i < len(toks) and toks[i] != ")":
                val, i = term(i)
                args.append(val)
            return fn(*args), i
        return term(i)

    return call(0)[0]


def render(src: str, data: dict[str, Any]) -> str:
    """Run a Go template on data (field names as Go writes them: Messages, Role, Content)."""
    parts = _parse(src)
    out: list[str] = []
    scopes = [{"$": data}]

    def lookup() -> dict[str, Any]:
        merged: dict[str, Any] = {}
        for s in scopes:
            merged.update(s)
        return merged

    def block(i: int, emit: bool) -> tuple[int, str]:
        """Run parts from i until an else/end at this level; returns (index of that action, its text)."""
        while i < len(parts):
            p = parts[i]
            if isinstance(p, str):
                if emit:
                    out.append(p)
                i += 1
                continue
            act = p[1]
            if act == "end" or act.startswith("else"):
                return i, act
            if act.startswith("range "):
                m = re.match(r"range \$(\w+), \$(\w+) := (.+)", act)
                items = _eval(_tokens(m.group(3)), lookup()) if emit else []
                end = i
                for k, item in enumerate(items or [None]):
                    scopes.append({"$" + m.group(1): k, "$" + m.group(2): item})
                    end, _ = block(i + 1, emit and bool(items))
                    scopes.pop()
                i = end + 1
            elif act.startswith("if "):
                i = cond(i, act[3:], emit)
            elif re.match(r"\$\w+ :?= ", act):
                var, _, expr = re.match(r"(\$\w+) (:?=) (.+)", act, re.S).groups()
                if emit:
                    target = next((s for s in reversed(scopes) if var in s), scopes[-1])
                    target[var] = _eval(_tokens(expr), lookup())
            else:
                if emit:
                    out.append(str(_eval(_tokens(act), lookup())))
                i += 1
                continue
            if not act.startswith(("range ", "if ")):
                i += 1
        return i, ""

    def cond(i: int, expr: str, emit: bool) -> int:
        taken = emit and bool(_eval(_tokens(expr), lookup()))
        i, act = block(i + 1, taken)
        done = taken
        while act.startswith("else"):
            rest = act[4:].strip()
            branch = emit and not done and (not rest.startswith("if ") or bool(_eval(_tokens(rest[3:]), lookup())))
            i, act = block(i + 1, branch)
            done = done or branch
        return i + 1

    block(0, True)
    return "".join(out)
