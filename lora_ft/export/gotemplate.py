"""A small renderer for the subset of Go's text/template that lora_ft's Ollama TEMPLATEs use, to check them here.

No ollama binary is needed to know what a Modelfile's TEMPLATE renders: text, `{{- ... -}}` whitespace trimming,
`{{ range $i, $m := .Messages }}`, `{{ if }} / {{ else }} / {{ end }}`, fields (`.Role`, `$m.Content`, `$.Messages`),
string literals, and the builtins eq, ne, and, or, not, len. Anything else is an error, so a template that uses
more than this subset is never passed off as checked.
"""

from __future__ import annotations

import json
import re

_ACTION = re.compile(r"\{\{(-\s)?(.*?)(\s-)?\}\}", re.S)
_TOKEN = re.compile(r'\s*("(?:[^"\\]|\\.)*"|\(|\)|\$?[A-Za-z_][A-Za-z0-9_]*(?:\.[A-Za-z_][A-Za-z0-9_]*)*|\$(?:\.[A-Za-z_]\w*)*|\.[A-Za-z_]\w*(?:\.[A-Za-z_]\w*)*|-?\d+)')


class TemplateError(ValueError):
    pass


def _lex(text: str) -> list:
    """[("text", s) | ("action", s)] with Go's trim markers applied to the neighbouring text."""
    out, pos = [], 0
    for m in _ACTION.finditer(text):
        chunk = text[pos:m.start()]
        if m.group(1):
            chunk = chunk.rstrip()
        out.append(["text", chunk])
        out.append(["action", m.group(2).strip(), bool(m.group(3))])
        pos = m.end()
    out.append(["text", text[pos:]])
    for i, item in enumerate(out):
        if item[0] == "action" and item[2] and i + 1 < len(out):
            out[i + 1][1] = out[i + 1][1].lstrip()
    return [(k, v) for k, v, *_ in out if k == "action" or v]


def _parse(items: list, i: int = 0, stop=("end",)):
    """A node list up to one of `stop` (range/if bodies); returns (nodes, index of the stop action, its word)."""
    nodes = []
    while i < len(items):
        kind, val = items[i]
        if kind == "text":
            nodes.append(("text", val))
            i += 1
            continue
        word = val.split(None, 1)[0] if val else ""
        if word in stop:
            return nodes, i, word
        if word == "range":
            m = re.fullmatch(r"range\s+(?:(\$\w+)\s*,\s*(\$\w+)\s*:=\s*)?(.+)", val, re.S)
            if not m:
                raise TemplateError(f"unsupported range: {{{{ {val} }}}}")
            body, j, _ = _parse(items, i + 1, ("end",))
            nodes.append(("range", m.group(1), m.group(2), m.group(3), body))
            i = j + 1
        elif word == "if":
            branches, cond, j = [], val[2:].strip(), i + 1
            while True:
                body, j, w = _parse(items, j, ("end", "else"))
                branches.append((cond, body))
                if w == "end":
                    break
                rest = items[j][1][4:].strip()
                cond = rest[2:].strip() if rest.startswith("if ") else "true"
                j += 1
            nodes.append(("if", branches))
            i = j + 1
        elif word in ("end", "else"):
            raise TemplateError(f"unexpected {{{{ {val} }}}}")
        else:
            nodes.append(("expr", val))
            i += 1
    if stop != ("__top__",):
        raise TemplateError("missing {{ end }}")
    return nodes, i, None


def _tokens(expr: str) -> list[str]:
    toks, pos = [], 0
    expr = expr.strip()
    while pos < len(expr):
        m = _TOKEN.match(expr, pos)
        if not m:
            raise TemplateError(f"cannot read {expr[pos:]!r}")
        toks.append(m.group(1))
        pos = m.end()
        while pos < len(expr) and expr[pos].isspace():
            pos += 1
    return toks


def _field(obj, names: list[str]):
    for n in names:
        if not isinstance(obj, dict) or n not in obj:
            raise TemplateError(f"no field {n}")
        obj = obj[n]
    return obj


def _truth(v) -> bool:
    return bool(v)


def _eval(toks: list[str], scope: dict):
    """A pipeline without `|`: a value, or a function applied to the arguments after it."""
    args, i = [], 0
    while i < len(toks):
        t = toks[i]
        if t == "(":
            depth, j = 1, i + 1
            while depth:
                depth += {"(": 1, ")": -1}.get(toks[j], 0)
                j += 1
            args.append(_eval(toks[i + 1:j - 1], scope))
            i = j
            continue
        args.append(("fn", t) if t in FUNCS else _value(t, scope))
        i += 1
    if args and isinstance(args[0], tuple) and len(args[0]) == 2 and args[0][0] == "fn":
        return FUNCS[args[0][1]](*args[1:])
    if len(args) != 1:
        raise TemplateError(f"cannot evaluate {' '.join(toks)!r}")
    return args[0]


def _value(t: str, scope: dict):
    if t.startswith('"'):
        return json.loads(t)
    if re.fullmatch(r"-?\d+", t):
        return int(t)
    if t == "true":
        return True
    if t.startswith("$"):
        var, _, rest = t.partition(".")
        if var not in scope["vars"]:
            raise TemplateError(f"undefined variable {var}")
        base = scope["vars"][var]
        return _field(base, rest.split(".")) if rest else base
    if t.startswith("."):
        return _field(scope["dot"], t[1:].split(".")) if t != "." else scope["dot"]
    raise TemplateError(f"unsupported word {t!r}")


FUNCS = {"eq": lambda a, *b: any(a == x for x in b), "ne": lambda a, b: a != b, "not": lambda a: not _truth(a),
         "and": lambda *a: next((x for x in a if not _truth(x)), a[-1]), "or": lambda *a: next((x for x in a if _truth(x)), a[-1]),
         "len": len, "slice": lambda a, i, j=None: a[i:j]}


def _run(nodes: list, scope: dict, out: list) -> None:
    for node in nodes:
        if node[0] == "text":
            out.append(node[1])
        elif node[0] == "expr":
            v = _eval(_tokens(node[1]), scope)
            out.append("" if v is None else str(v))
        elif node[0] == "if":
            for cond, body in node[1]:
                if cond == "true" or _truth(_eval(_tokens(cond), scope)):
                    _run(body, scope, out)
                    break
        else:
            _, ivar, mvar, src, body = node
            for i, item in enumerate(_eval(_tokens(src), scope)):
                inner = {"dot": item, "vars": {**scope["vars"], **({ivar: i, mvar: item} if ivar else {})}}
                _run(body, inner, out)


def render(template: str, data: dict) -> str:
    """Render `template` with `data` as the dot (Ollama passes Messages with Role and Content, System, ...)."""
    nodes, _, _ = _parse(_lex(template), 0, ("__top__",))
    out = []
    _run(nodes, {"dot": data, "vars": {"$": data}}, out)
    return "".join(out)
