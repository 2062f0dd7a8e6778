"""A small Go text/template + Helm renderer, so the chart is rendered and checked without `helm` installed.

It covers what deploy/helm/turbofleet uses, with Helm's semantics: `{{-`/`-}}` trimming, comments, define,
include, if/else if/else, with, range (with `$k, $v :=`), variables (`:=`, `=`), pipelines, parentheses,
missing map keys as nil (printed "<no value>", which Helm strips), short-circuit and/or, and the Sprig
functions below. Numbers from values files are floats, as in Helm (which reads values through JSON).
Anything else raises, so a template that starts using more fails here loudly instead of rendering wrongly.
The renderer's own tests are at the bottom; test_deploy_helm.py renders the chart with it.
"""

from __future__ import annotations

import base64
import functools
import hashlib
import json
import re
import secrets
import string
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml

_ACTION = re.compile(r"\{\{(-\s)?(.*?)(\s-)?\}\}", re.S)
_TOKEN = re.compile(
    r"""\s*(?:(?P<str>"(?:[^"\\]|\\.)*")|(?P<raw>`[^`]*`)|(?P<num>-?\d+(?:\.\d+)?)|(?P<op>:=|[()|=,])
    |(?P<var>\$\w*(?:\.\w+)*)|(?P<field>(?:\.\w+)+|\.)|(?P<ident>[A-Za-z_]\w*))""",
    re.X,
)


def _identity(v: Any) -> Any:
    return v


class TemplateError(Exception):
    """The template cannot be parsed or executed."""


# ---------------------------------------------------------------------------------------------- values


def go_str(v: Any) -> str:
    """fmt.Sprint of a value as Go prints it in a template."""
    if v is None:
        return "<no value>"
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, float):
        return _go_float(v)
    if isinstance(v, list):
        return "[" + " ".join(go_str(x) for x in v) + "]"
    if isinstance(v, dict):
        return "map[" + " ".join(f"{k}:{go_str(v[k])}" for k in sorted(v)) + "]"
    return str(v)


def _go_float(f: float) -> str:
    # fmt's %v of a float64 is %g with the shortest digits, in exponent form when the exponent is < -4 or
    # >= 6 (hence Helm's famous 1e+06 for a replica count of 1000000)
    if f == int(f) and abs(f) < 1e6:
        return str(int(f))
    exp = int(f"{f:e}".split("e")[1])
    if exp < -4 or exp >= 6:
        mant = repr(f / 10**exp).rstrip("0").rstrip(".")
        return f"{mant}e{'+' if exp >= 0 else '-'}{abs(exp):02d}"
    return repr(f)


def truth(v: Any) -> bool:
    return not (v is None or v is False or v == 0 or (isinstance(v, str | list | dict) and len(v) == 0))


def as_helm_values(v: Any) -> Any:
    """Values as Helm holds them: every number a float64."""
    if isinstance(v, dict):
        return {k: as_helm_values(x) for k, x in v.items()}
    if isinstance(v, list):
        return [as_helm_values(x) for x in v]
    if isinstance(v, int) and not isinstance(v, bool):
        return float(v)
    return v


def _plain(v: Any) -> Any:
    if isinstance(v, dict):
        return {k: _plain(x) for k, x in v.items()}
    if isinstance(v, list):
        return [_plain(x) for x in v]
    if isinstance(v, float) and v == int(v):
        return int(v)
    return v


def to_yaml(v: Any) -> str:
    out: str = yaml.safe_dump(_plain(v), default_flow_style=False, sort_keys=True)
    return out.removesuffix("\n").removesuffix("\n...")


def to_json(v: Any) -> str:
    # encoding/json: sorted keys, compact, and <, >, & escaped for HTML
    out = json.dumps(_plain(v), sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return out.replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")


def _quote(*args: Any) -> str:
    out = []
    for a in args:
        if a is None:
            continue
        s = a if isinstance(a, str) else go_str(a)
        out.append('"' + s.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n").replace("\t", "\\t") + '"')
    return " ".join(out)


def _printf(fmt: str, *args: Any) -> str:
    it = iter(args)

    def one(m: re.Match[str]) -> str:
        if m.group(0) == "%%":
            return "%"
        v = next(it)
        return str(int(v)) if m.group(0) == "%d" else (v if isinstance(v, str) else go_str(v))

    return re.sub(r"%[svd%]", one, fmt)


def _print(*args: Any) -> str:
    out = ""
    for i, a in enumerate(args):
        if i and not isinstance(a, str) and not isinstance(args[i - 1], str):
            out += " "
        out += a if isinstance(a, str) else go_str(a)
    return out


def _required(msg: str, v: Any) -> Any:
    if v is None or v == "":
        raise TemplateError(msg)
    return v


def _trunc(n: Any, s: str) -> str:
    n = int(n)
    return (s[:n] if len(s) > n else s) if n >= 0 else (s[n:] if len(s) > -n else s)


def _default(d: Any, *given: Any) -> Any:
    return given[0] if given and truth(given[0]) else d


FUNCS: dict[str, Callable[..., Any]] = {
    "default": _default,
    "trunc": _trunc,
    "trimSuffix": lambda suffix, s: s.removesuffix(suffix),
    "contains": lambda sub, s: sub in s,
    "replace": lambda old, new, s: s.replace(old, new),
    "printf": _printf,
    "print": _print,
    "quote": _quote,
    "toYaml": to_yaml,
    "toJson": to_json,
    "indent": lambda n, s: " " * int(n) + s.replace("\n", "\n" + " " * int(n)),
    "nindent": lambda n, s: "\n" + " " * int(n) + s.replace("\n", "\n" + " " * int(n)),
    "required": _required,
    "dict": lambda *kv: {kv[i]: kv[i + 1] for i in range(0, len(kv), 2)},
    "sha256sum": lambda s: hashlib.sha256(s.encode()).hexdigest(),
    "add": lambda *xs: sum(int(x) for x in xs),
    "int": lambda x: int(x or 0),
    "join": lambda sep, xs: sep.join(go_str(x) if not isinstance(x, str) else x for x in (xs or [])),
    "b64enc": lambda s: base64.b64encode(s.encode()).decode(),
    "b64dec": lambda s: base64.b64decode(s).decode(),
    "randAlphaNum": lambda n: "".join(secrets.choice(string.ascii_letters + string.digits) for _ in range(int(n))),
    "lookup": lambda *_: {},
    "index": lambda c, *keys: _index(c, keys),
    "empty": lambda v: not truth(v),
    "not": lambda v: not truth(v),
    "eq": lambda a, *bs: any(a == b for b in bs),
    "ne": lambda a, b: a != b,
    "gt": lambda a, b: a > b,
    "ge": lambda a, b: a >= b,
    "lt": lambda a, b: a < b,
    "le": lambda a, b: a <= b,
}


def _index(c: Any, keys: tuple[Any, ...]) -> Any:
    for k in keys:
        c = c.get(k) if isinstance(c, dict) else c[int(k)]
    return c


# ---------------------------------------------------------------------------------------------- parsing

Node = tuple[Any, ...]


def _lex(src: str) -> list[tuple[str, str]]:
    """[("text", s) | ("action", body)] with `{{-` / `-}}` whitespace trimming applied."""
    out: list[tuple[str, str]] = []
    pos, trim_next = 0, False
    for m in _ACTION.finditer(src):
        text = src[pos : m.start()]
        if trim_next:
            text = text.lstrip()
        if m.group(1):
            text = text.rstrip()
        out.append(("text", text))
        body = m.group(2).strip()
        if not (body.startswith("/*") and body.endswith("*/")):
            out.append(("action", body))
        pos, trim_next = m.end(), bool(m.group(3))
    text = src[pos:]
    out.append(("text", text.lstrip() if trim_next else text))
    return out


def _tokens(expr: str) -> list[tuple[str, str]]:
    toks, pos = [], 0
    while pos < len(expr):
        m = _TOKEN.match(expr, pos)
        if not m or m.end() == pos:
            if expr[pos:].strip():
                raise TemplateError(f"cannot parse {expr!r} at {expr[pos:]!r}")
            break
        kind = m.lastgroup or ""
        toks.append((kind, m.group(kind)))
        pos = m.end()
    return toks


def _parse_pipeline(toks: list[tuple[str, str]]) -> Node:
    """("pipe", decl_vars, decl_op, [command, ...]); a command is a list of operands."""
    decl: list[str] = []
    op = ""
    if any(t == ("op", ":=") or t == ("op", "=") for t in toks):
        i = next(i for i, t in enumerate(toks) if t[1] in (":=", "="))
        decl = [v for k, v in toks[:i] if k == "var"]
        op, toks = toks[i][1], toks[i + 1 :]
    cmds: list[list[Node]] = [[]]
    depth_stack: list[list[list[Node]]] = []
    for kind, val in toks:
        if val == "(" and kind == "op":
            depth_stack.append(cmds)
            cmds = [[]]
        elif val == ")" and kind == "op":
            inner: tuple[Any, ...] = ("pipe", [], "", cmds)
            cmds = depth_stack.pop()
            cmds[-1].append(inner)
        elif val == "|" and kind == "op":
            cmds.append([])
        else:
            cmds[-1].append((kind, val))
    if depth_stack:
        raise TemplateError("unbalanced parentheses")
    return ("pipe", decl, op, cmds)


def _parse(items: list[tuple[str, str]], defines: dict[str, list[Node]]) -> list[Node]:
    pos = 0

    def block(stops: tuple[str, ...]) -> tuple[list[Node], str]:
        nonlocal pos
        nodes: list[Node] = []
        while pos < len(items):
            kind, body = items[pos]
            pos += 1
            if kind == "text":
                if body:
                    nodes.append(("text", body))
                continue
            word = body.split(None, 1)[0] if body else ""
            rest = body[len(word) :].strip()
            if word in stops:
                return nodes, body
            if word in ("if", "with"):
                branches = [(_parse_pipeline(_tokens(rest)), block(("else", "end")))]
                (body_nodes, stop) = branches[0][1]
                arms = [(branches[0][0], body_nodes)]
                else_nodes: list[Any] = []
                while stop.startswith("else"):
                    cond = stop[4:].strip()
                    if cond.startswith("if "):
                        sub, stop = block(("else", "end"))
                        arms.append((_parse_pipeline(_tokens(cond[3:])), sub))
                    else:
                        else_nodes, stop = block(("end",))
                nodes.append((word, arms, else_nodes))
            elif word == "range":
                body_nodes, stop = block(("else", "end"))
                else_nodes = block(("end",))[0] if stop == "else" else []
                nodes.append(("range", _parse_pipeline(_tokens(rest)), body_nodes, else_nodes))
            elif word == "define":
                name = yaml.safe_load(rest)
                defines[name] = block(("end",))[0]
            elif word in ("else", "end"):
                raise TemplateError(f"unexpected {{{{{body}}}}}")
            else:
                nodes.append(("action", _parse_pipeline(_tokens(body))))
        if stops:
            raise TemplateError(f"missing {{{{end}}}} (wanted {stops})")
        return nodes, ""

    return block(())[0]


# ---------------------------------------------------------------------------------------------- execution


class Renderer:
    """Templates parsed into one set (as Helm does), executed with `render(name, data)`."""

    def __init__(self) -> None:
        self.templates: dict[str, list[Node]] = {}
        #: every `.a.b` path that hit a missing key, for tests that want none
        self.missing: list[str] = []

    def add(self, name: str, src: str) -> None:
        self.templates[name] = _parse(_lex(src), self.templates)

    def render(self, name: str, data: Any) -> str:
        if name not in self.templates:
            raise TemplateError(f"no template {name!r}")
        out: list[str] = []
        self._run(self.templates[name], data, [{"$": data}], out)
        return "".join(out)

    def _run(self, nodes: list[Node], dot: Any, scopes: list[dict[str, Any]], out: list[str]) -> None:
        for node in nodes:
            kind = node[0]
            if kind == "text":
                out.append(node[1])
            elif kind == "action":
                v = self._pipe(node[1], dot, scopes)
                if not node[1][1]:  # a declaration prints nothing
                    out.append(go_str(v))
            elif kind in ("if", "with"):
                for pipe, body in node[1]:
                    v = self._pipe(pipe, dot, scopes)
                    if truth(v):
                        self._run(body, v if kind == "with" else dot, [*scopes, {}], out)
                        break
                else:
                    self._run(node[2], dot, [*scopes, {}], out)
            elif kind == "range":
                pipe = node[1]
                coll = self._pipe(("pipe", [], "", pipe[3]), dot, scopes)
                pairs = sorted(coll.items()) if isinstance(coll, dict) else list(enumerate(coll or []))
                for k, v in pairs:
                    scope: dict[str, Any] = {}
                    if len(pipe[1]) == 2:
                        scope = {pipe[1][0]: k, pipe[1][1]: v}
                    elif len(pipe[1]) == 1:
                        scope = {pipe[1][0]: v}
                    self._run(node[2], v, [*scopes, scope], out)
                if not pairs:
                    self._run(node[3], dot, [*scopes, {}], out)

    def _pipe(self, pipe: Node, dot: Any, scopes: list[dict[str, Any]]) -> Any:
        _, decl, op, cmds = pipe
        value: Any = None
        for i, cmd in enumerate(cmds):
            value = self._command(cmd, dot, scopes, value, i > 0)
        if decl:
            if op == ":=":
                scopes[-1][decl[0]] = value
            else:
                next(s for s in reversed(scopes) if decl[0] in s)[decl[0]] = value
        return value

    def _command(self, cmd: list[Node], dot: Any, scopes: list[dict[str, Any]], piped: Any, has_pipe: bool) -> Any:
        head = cmd[0]
        if head[0] == "ident" and head[1] not in ("true", "false", "nil"):
            name = head[1]
            if name in ("and", "or"):  # short-circuit, returning the deciding operand
                thunks: list[Callable[[], Any]] = [
                    functools.partial(self._operand, a, dot, scopes) for a in cmd[1:]
                ]
                if has_pipe:
                    thunks.append(functools.partial(_identity, piped))
                v: Any = None
                for thunk in thunks:
                    v = thunk()
                    if truth(v) != (name == "and"):
                        return v
                return v
            vals = [self._operand(a, dot, scopes) for a in cmd[1:]]
            if has_pipe:
                vals.append(piped)
            if name == "include":
                return self.render(vals[0], vals[1])
            if name not in FUNCS:
                raise TemplateError(f"function {name!r} not supported by this renderer")
            return FUNCS[name](*vals)
        if len(cmd) != 1 or has_pipe:
            raise TemplateError(f"cannot call a non-function: {cmd}")
        return self._operand(head, dot, scopes)

    def _operand(self, tok: Node, dot: Any, scopes: list[dict[str, Any]]) -> Any:
        kind, val = tok[0], tok[1]
        if kind == "pipe":
            return self._pipe(tok, dot, scopes)
        if kind == "str":
            return json.loads(val)
        if kind == "raw":
            return val[1:-1]
        if kind == "num":
            return float(val) if "." in val else int(val)
        if kind == "ident":
            if val in ("true", "false", "nil"):
                return {"true": True, "false": False, "nil": None}[val]
            return self._command([tok], dot, scopes, None, False)
        if kind == "var":
            name, _, path = val.partition(".")
            scope = next((s for s in reversed(scopes) if name in s), None)
            if scope is None:
                raise TemplateError(f"undefined variable {name}")
            return self._fields(scope[name], path.split(".") if path else [], val)
        if kind == "field":
            return dot if val == "." else self._fields(dot, val[1:].split("."), val)
        raise TemplateError(f"unexpected {val!r}")

    def _fields(self, v: Any, path: list[str], where: str) -> Any:
        for f in path:
            if not isinstance(v, dict):
                raise TemplateError(f"nil pointer evaluating {where} (at .{f})")
            if f not in v:
                self.missing.append(where)
            v = v.get(f)
        return v


def render_chart(
    chart: Path, overrides: dict[str, Any] | None = None, *, release: str = "rel", namespace: str = "ns"
) -> tuple[dict[str, str], Renderer]:
    """Render every template of `chart` like `helm template`: {template name: output}, plus the renderer."""
    meta = yaml.safe_load((chart / "Chart.yaml").read_text())
    values = yaml.safe_load((chart / "values.yaml").read_text()) or {}
    values = _merge(values, overrides or {})
    r = Renderer()
    name = meta["name"]
    files = sorted((chart / "templates").iterdir())
    for f in files:
        r.add(f"{name}/templates/{f.name}", f.read_text())
    outputs: dict[str, str] = {}
    for f in files:
        if f.name.startswith("_"):
            continue
        tname = f"{name}/templates/{f.name}"
        data = {
            "Values": as_helm_values(values),
            "Release": {
                "Name": release,
                "Namespace": namespace,
                "Service": "Helm",
                "IsInstall": True,
                "IsUpgrade": False,
                "Revision": 1,
            },
            "Chart": {"Name": name, "Version": meta["version"], "AppVersion": meta.get("appVersion")},
            "Capabilities": {"KubeVersion": {"Version": "v1.30.0", "Major": "1", "Minor": "30"}},
            "Template": {"Name": tname, "BasePath": f"{name}/templates"},
        }
        outputs[tname] = r.render(tname, data).replace("<no value>", "")
    return outputs, r


def _merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in over.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


# ---------------------------------------------------------------------------------------------- self-tests
# Expected outputs are what Go's text/template + Sprig print for the same input.


def _one(src: str, data: Any = None, defines: str = "") -> str:
    r = Renderer()
    r.add("_helpers.tpl", defines)
    r.add("t", src)
    return r.render("t", data if data is not None else {}).replace("<no value>", "")


def test_trim_markers_eat_whitespace_and_newlines_on_their_side_only() -> None:
    assert _one("a  \n  {{- 1 }}  \n b") == "a1  \n b"
    assert _one("a \n{{ 1 -}}\n\n  b") == "a \n1b"
    assert _one("x\n{{- /* a comment */}}\ny") == "x\ny"


def test_if_else_if_else_and_truthiness() -> None:
    src = "{{ if .a }}A{{ else if .b }}B{{ else }}C{{ end }}"
    assert _one(src, {"a": 1, "b": 1}) == "A"
    assert _one(src, {"a": 0, "b": "x"}) == "B"
    assert _one(src, {"a": [], "b": {}}) == "C"
    assert _one(src, {"a": None, "b": ""}) == "C"


def test_range_over_maps_is_sorted_and_binds_key_and_value() -> None:
    assert _one("{{ range $k, $v := .m }}{{ $k }}={{ $v }};{{ end }}", {"m": {"b": 2, "a": 1.0}}) == "a=1;b=2;"
    assert _one("{{ range .l }}[{{ . }}]{{ else }}none{{ end }}", {"l": []}) == "none"


def test_variables_scope_and_assignment() -> None:
    assert _one("{{ $x := 1 }}{{ if true }}{{ $x = 2 }}{{ end }}{{ $x }}") == "2"
    with pytest.raises(TemplateError):
        _one("{{ if true }}{{ $y := 1 }}{{ end }}{{ $y }}")


def test_with_changes_dot_and_include_renders_a_define() -> None:
    assert (
        _one(
            '{{ with .a }}{{ .b }}{{ end }}|{{ include "d" (dict "x" 5) }}',
            {"a": {"b": "B"}},
            defines='{{ define "d" }}x={{ .x }}{{ end }}',
        )
        == "B|x=5"
    )


def test_pipelines_pass_the_value_as_the_last_argument() -> None:
    assert _one('{{ "abc-" | trimSuffix "-" | quote }}') == '"abc"'
    assert _one("{{ .v | default 7 }}", {"v": 0}) == "7"
    assert _one("{{ toYaml .m | nindent 2 }}", {"m": {"b": [1], "a": "x"}}) == "\n  a: x\n  b:\n  - 1"


def test_to_json_matches_go_encoding() -> None:
    assert _one("{{ toJson .m }}", as_helm_values({"m": {"b": [1, "x<y"], "a": {"c": None}}})) == (
        '{"a":{"c":null},"b":[1,"x\\u003cy"]}'
    )


def test_numbers_print_as_go_prints_float64() -> None:
    assert _one("{{ .a }} {{ .b }} {{ .c }} {{ add .a 1 }}", as_helm_values({"a": 30, "b": 0.8, "c": 1000000})) == (
        "30 0.8 1e+06 31"
    )


def test_and_or_short_circuit_and_return_operands() -> None:
    assert _one("{{ or .a .b }}", {"a": "", "b": "B"}) == "B"
    assert _one("{{ if and .m .m.x }}yes{{ else }}no{{ end }}", {"m": {}}) == "no"


def test_missing_keys_are_nil_and_recorded_but_nil_dereference_fails() -> None:
    r = Renderer()
    r.add("t", "{{ .a.missing }}")
    assert r.render("t", {"a": {}}) == "<no value>"
    assert r.missing == [".a.missing"]
    with pytest.raises(TemplateError):
        _one("{{ .a.b.c }}", {"a": {}})


def test_required_and_unknown_functions_fail_loudly() -> None:
    with pytest.raises(TemplateError, match="need x"):
        _one('{{ required "need x" .x }}', {"x": ""})
    with pytest.raises(TemplateError, match="not supported"):
        _one("{{ tpl .x . }}", {"x": "y"})
