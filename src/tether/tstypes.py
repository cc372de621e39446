"""TypeScript declarations for the channels a :class:`~tether.Main` exposes to pages.

``tether types --ts MODULE:ATTR`` prints them. Only handlers whose ``roles=``
name ``"web"`` appear: the rest answer a page ``Forbidden``, so typing them
would only mislead. Types come from the handlers' type hints, through
msgspec's JSON Schema of each hint: what a page sees is what the JSON
encoding produces (bytes are base64 strings, datetimes ISO 8601 strings,
Structs and TypedDicts objects, ``array_like`` Structs and tuples arrays),
so the declarations describe the JSON, not the Python objects. A page
cannot send bytes (JSON has none, and a bytes argument refuses a string);
the header comment of the output says so.

The output declares ``WebChannels`` (channel -> ``[[arguments], result]``)
and ``WebEvents`` (channel -> ``[arguments]``, for ``send``), and merges
``WebChannels`` into the ``Channels`` map of ``tether.d.ts`` (a module
augmentation of ``"/tether.js"``), through which tether.js's ``invoke`` is
typed::

    import { connect } from "/tether.js";
    import "./channels";  // the file `tether types --ts app:main` wrote
    const ipc = await connect();
    const text: string = await ipc.invoke("message-from-renderer", "Hola");
"""

from __future__ import annotations

import importlib
import importlib.util
import inspect
import json
import os
import re
import sys
import typing
from collections.abc import AsyncIterator, Callable, Iterable, Iterator
from typing import Any, Final

import msgspec

__all__ = ["WEB_ROLE", "load_main", "typescript"]

#: the role of a page's connection; only handlers naming it are declared
WEB_ROLE: Final = "web"

_REF: Final = "#/$defs/{name}"
_IDENT: Final = re.compile(r"^[A-Za-z_$][A-Za-z0-9_$]*$")
# Reserved words cannot name a parameter in a TypeScript function type.
# fmt: off
_RESERVED: Final = frozenset((
    "break", "case", "catch", "class", "const", "continue", "debugger", "default", "delete",
    "do", "else", "enum", "export", "extends", "false", "finally", "for", "function", "if",
    "import", "in", "instanceof", "new", "null", "return", "super", "switch", "this", "throw",
    "true", "try", "typeof", "var", "void", "while", "with", "implements", "interface", "let",
    "package", "private", "protected", "public", "static", "yield", "await", "arguments", "eval",
))
# fmt: on
_STREAMS: Final = (AsyncIterator, Iterator)


def load_main(target: str) -> Any:
    """The object ``MODULE:ATTR`` names; MODULE is a dotted name or a path to a .py file.

    The current directory goes on ``sys.path`` first (as ``python -m`` does),
    so ``app:main`` finds ``./app.py``.

    Raises:
        ValueError: ``target`` is not ``MODULE:ATTR``, or ATTR is not a Main.
        ImportError: the module cannot be imported.
        AttributeError: the module has no ATTR.
    """
    module_name, sep, attr = target.rpartition(":")
    if not sep or not module_name or not attr:
        raise ValueError(f"expected MODULE:ATTR (e.g. app:main), not {target!r}")
    if module_name.endswith(".py") or os.sep in module_name:
        path = os.path.abspath(module_name)
        if not os.path.isfile(path):
            raise ImportError(f"no such file: {module_name}")
        name = "_tether_types_" + re.sub(r"\W", "_", os.path.splitext(os.path.basename(path))[0])
        spec = importlib.util.spec_from_file_location(name, path)
        if spec is None or spec.loader is None:
            raise ImportError(f"cannot import {module_name}")
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module  # dataclasses and Structs look their module up
        sys.path.insert(0, os.path.dirname(path))
        spec.loader.exec_module(module)
    else:
        if "" not in sys.path and os.getcwd() not in sys.path:
            sys.path.insert(0, os.getcwd())
        module = importlib.import_module(module_name)
    obj = module
    where = module_name  # the file or module as the user wrote it, not its import name
    for part in attr.split("."):
        try:
            obj = getattr(obj, part)
        except AttributeError:
            raise AttributeError(f"{where} has no attribute {part!r}") from None
        where = f"{where}:{part}" if where == module_name else f"{where}.{part}"
    if not hasattr(obj, "registry"):
        raise ValueError(f"{target} is a {type(obj).__name__}, not a tether.Main")
    return obj


def _hints(fn: Callable[..., Any]) -> dict[str, Any]:
    try:
        return typing.get_type_hints(fn)
    except Exception:  # one unresolvable hint: resolve the others one by one
        out: dict[str, Any] = {}
        ns = getattr(fn, "__globals__", {})
        for name, ann in getattr(fn, "__annotations__", {}).items():
            try:
                out[name] = eval(ann, ns) if isinstance(ann, str) else ann
            except Exception:
                out[name] = Any
        return out


class _Param(msgspec.Struct):
    name: str
    hint: Any
    optional: bool
    rest: bool = False


def _params(fn: Callable[..., Any], hints: dict[str, Any]) -> list[_Param]:
    """The positional parameters a page passes (the first, the Call, is skipped)."""
    out: list[_Param] = []
    for p in list(inspect.signature(fn).parameters.values())[1:]:
        if p.kind is p.VAR_POSITIONAL:
            out.append(_Param(p.name, hints.get(p.name, Any), False, rest=True))
            break
        if p.kind in (p.KEYWORD_ONLY, p.VAR_KEYWORD):
            continue
        out.append(_Param(p.name, hints.get(p.name, Any), p.default is not p.empty))
    return out


def _result_hint(fn: Callable[..., Any], hints: dict[str, Any]) -> Any:
    if "return" not in hints:
        return Any
    hint = hints["return"]
    origin = typing.get_origin(hint) or hint
    if isinstance(origin, type) and issubclass(origin, _STREAMS):
        return Any  # a streaming handler: its items do not come back from invoke
    return hint


class _Schemas:
    """Every hint's JSON Schema at once, so shared types become one named declaration."""

    def __init__(self, hints: list[Any]) -> None:
        self.unknown: set[int] = set()
        ok: list[Any] = []
        for i, hint in enumerate(hints):
            try:
                msgspec.json.schema(hint)
                ok.append(hint)
            except Exception:  # numpy arrays, Buffers, arbitrary classes: no JSON form
                self.unknown.add(i)
                ok.append(Any)
        schemas, components = msgspec.json.schema_components(ok, ref_template=_REF)
        # msgspec tells same-named classes apart by their full dotted path
        # (``app.models.<locals>.Item``); the page gets the class name, numbered on a clash.
        short: dict[str, str] = {}
        for key, comp in sorted(components.items()):
            base = _ident(str(comp.get("title", key)))
            name, n = base, 1
            while name in short.values():
                n += 1
                name = f"{base}_{n}"
            short[key] = name
        order = _typeddict_order(ok)
        self.components = {
            short[k]: _in_order(_renamed(v, short), order) for k, v in components.items()
        }
        self.schemas = [_renamed(x, short) for x in schemas]

    def ts(self, i: int) -> str:
        return "unknown" if i in self.unknown else _ts(self.schemas[i])

    def arg_ts(self, i: int) -> str:
        """An argument's type: as :meth:`ts`, but bytes are ``never`` (a page cannot send them)."""
        return "unknown" if i in self.unknown else _ts(self.schemas[i], sending=True)

    def may_be_options(self, i: int) -> bool:
        """Whether an argument of this type could be a plain ``{timeout}``/``{signal}`` object."""
        return i in self.unknown or self._options(self.schemas[i], 0)

    def _options(self, s: Any, depth: int) -> bool:
        if s is True or s == {}:
            return True
        if s is False or depth > 20:  # depth: a self-referencing type
            return False
        if "$ref" in s:
            return self._options(self.components.get(_name(s["$ref"]), {}), depth + 1)
        if "anyOf" in s:
            return any(self._options(x, depth + 1) for x in s["anyOf"])
        tp = s.get("type")
        if isinstance(tp, list):
            return any(self._options({**s, "type": t}, depth + 1) for t in tp)
        if tp != "object":
            return False
        props = s.get("properties")
        if props is None:  # a Record: {timeout: 5000} fits if its values may be numbers
            return self._number(s.get("additionalProperties", {}), depth + 1)
        if not set(s.get("required", ())) <= _OPTION_KEYS:
            return False
        return "signal" in props or ("timeout" in props and self._number(props["timeout"], depth))

    def _number(self, s: Any, depth: int) -> bool:
        if s is True or s == {}:
            return True
        if s is False or depth > 20:
            return False
        if "$ref" in s:
            return self._number(self.components.get(_name(s["$ref"]), {}), depth + 1)
        if "anyOf" in s:
            return any(self._number(x, depth + 1) for x in s["anyOf"])
        tp = s.get("type")
        return bool({"number", "integer"} & set(tp if isinstance(tp, list) else [tp]))


#: the keys of invoke()'s options in tether.js
_OPTION_KEYS: Final = frozenset(("timeout", "signal"))


def _typeddict_order(hints: list[Any]) -> dict[str, list[str]]:
    """TypedDict name -> its fields in declared order (msgspec's schema sorts them)."""
    out: dict[str, list[str]] = {}
    seen: set[int] = set()
    todo = list(hints)
    while todo:
        hint = todo.pop()
        if id(hint) in seen:
            continue
        seen.add(id(hint))
        todo.extend(typing.get_args(hint))
        if typing.is_typeddict(hint):
            try:
                fields = typing.get_type_hints(hint)
            except Exception:
                fields = dict(getattr(hint, "__annotations__", {}))
            out.setdefault(hint.__name__, list(fields))
            todo.extend(fields.values())
        elif isinstance(hint, type) and issubclass(hint, msgspec.Struct):
            todo.extend(f.type for f in msgspec.structs.fields(hint))
    return out


def _in_order(schema: Any, order: dict[str, list[str]]) -> Any:
    """A TypedDict's object schema with its properties in declared order."""
    fields = order.get(str(schema.get("title", ""))) if isinstance(schema, dict) else None
    props = schema.get("properties") if fields else None
    if not fields or not isinstance(props, dict) or set(props) != set(fields):
        return schema
    return {**schema, "properties": {k: props[k] for k in fields}}


def _renamed(schema: Any, short: dict[str, str]) -> Any:
    """``schema`` with every ``$ref`` pointing at its short name."""
    if isinstance(schema, dict):
        return {
            k: _REF.format(name=short[v.rsplit("/", 1)[-1]])
            if k == "$ref" and isinstance(v, str)
            else _renamed(v, short)
            for k, v in schema.items()
        }
    if isinstance(schema, list):
        return [_renamed(x, short) for x in schema]
    return schema


def _name(ref: str) -> str:
    return _ident(ref.rsplit("/", 1)[-1])


def _ident(text: str) -> str:
    name = re.sub(r"[^A-Za-z0-9_$]", "_", text)
    return name if _IDENT.match(name) else "_" + name


def _key(name: str) -> str:
    return name if _IDENT.match(name) else json.dumps(name)


def _union(parts: Iterable[str]) -> str:
    seen: list[str] = []
    for p in parts:
        if p not in seen:
            seen.append(p)
    if not seen:
        return "never"
    return " | ".join(f"({p})" if "=>" in p else p for p in seen)


def _array_of(item: str) -> str:
    return f"({item})[]" if " " in item else f"{item}[]"


def _ts(s: Any, sending: bool = False) -> str:
    """One JSON Schema (as msgspec writes them) as a TypeScript type.

    ``sending``: the type of what a page sends, in which bytes are ``never``
    (a bytes argument refuses the base64 string a page could send). Only
    where the argument's own schema says bytes: a Struct shared with results
    keeps its one declaration.
    """
    if s is True or s == {}:
        return "unknown"
    if s is False:
        return "never"
    if "$ref" in s:
        return _name(s["$ref"])
    if sending and s.get("contentEncoding") == "base64":
        return "never"
    if "anyOf" in s:
        return _union(_ts(x, sending) for x in s["anyOf"])
    if "enum" in s:
        return _union(json.dumps(v) for v in s["enum"])
    if "const" in s:
        return json.dumps(s["const"])
    tp = s.get("type")
    if isinstance(tp, list):
        return _union(_ts({**s, "type": t}, sending) for t in tp)
    if tp == "null":
        return "null"
    if tp == "boolean":
        return "boolean"
    if tp in ("integer", "number"):
        return "number"
    if tp == "string":
        return "string"
    if tp == "array":
        return _array(s, sending)
    if tp == "object":
        return _object(s, "; ")
    return "unknown"


def _array(s: dict[str, Any], sending: bool = False) -> str:
    prefix = s.get("prefixItems")
    if prefix is None:
        return _array_of(_ts(s.get("items", {}), sending))
    need = s.get("minItems", len(prefix))
    items = [_ts(x, sending) + ("" if i < need else "?") for i, x in enumerate(prefix)]
    rest = s.get("items", False)  # absent: an array_like Struct (extra items are ignored)
    if rest is not False and s.get("maxItems") != len(prefix):
        items.append("..." + _array_of(_ts(rest, sending)))
    return "[" + ", ".join(items) + "]"


def _object(s: dict[str, Any], sep: str, indent: str = "") -> str:
    props = s.get("properties")
    extra = s.get("additionalProperties")
    if props is None:
        return f"Record<string, {_ts(extra if extra is not None else {})}>"
    required = set(s.get("required", ()))
    members = []
    for name, sub in props.items():
        opt = "" if name in required else "?"
        members.append(f"{indent}{_key(name)}{opt}: {_ts(sub)};")
    if sep == "\n":
        return "{\n" + "\n".join(members) + "\n}" if members else "{}"
    return "{ " + " ".join(members) + " }" if members else "{}"


def _doc(text: str | None, indent: str) -> list[str]:
    if not text:
        return []
    first = inspect.cleandoc(text).split("\n\n", 1)[0].replace("\n", " ").strip()
    first = first.replace("*/", "*\\/")
    return [f"{indent}/** {first} */"] if first else []


def _component(name: str, s: dict[str, Any]) -> list[str]:
    lines = _doc(s.get("description"), "")
    ident = _ident(name)
    if s.get("type") == "object" and "properties" in s:
        lines.append(f"export interface {ident} " + _object(s, "\n", "  "))
    else:
        lines.append(f"export type {ident} = {_ts(s)};")
    return lines


def _arguments(params: list[_Param], types: list[str]) -> str:
    """A labelled tuple of the arguments: ``[message: string, opts?: Opts]``."""
    args = []
    for p, t in zip(params, types, strict=True):
        name = p.name + "_" if p.name in _RESERVED else p.name
        if p.rest:
            args.append(f"...{name}: {_array_of(t)}")
        else:
            args.append(f"{name}{'?' if p.optional else ''}: {t}")
    return f"[{', '.join(args)}]"


def typescript(main: Any, *, source: str = "") -> str:
    """TypeScript declarations for the channels ``main`` exposes to role ``"web"``.

    Args:
        main: a :class:`~tether.Main` (anything with a ``registry``) with its
            handlers registered.
        source: where ``main`` came from, named in the header comment.

    Returns:
        The text of a ``.d.ts``-style module (see the module docstring).
    """
    registry = main.registry
    invokes = sorted(
        (ch, h) for ch, h in registry.invokes.items() if h.roles and WEB_ROLE in h.roles
    )
    events = []  # the first listener a page reaches types the channel's arguments
    for ch, hs in sorted(registry.events.items()):
        web = [h for h in hs if h.roles and WEB_ROLE in h.roles]
        if web:
            events.append((ch, web[0]))
    entries: list[tuple[str, Any, list[_Param], int, bool]] = []  # ch, fn, params, first, event
    hints: list[Any] = []
    for event, table in ((False, invokes), (True, events)):
        for ch, h in table:
            fn_hints = _hints(h.fn)
            params = _params(h.fn, fn_hints)
            first = len(hints)
            hints.extend(p.hint for p in params)
            if not event:
                hints.append(_result_hint(h.fn, fn_hints))
            entries.append((ch, h.fn, params, first, event))
    schemas = _Schemas(hints)

    out = [
        "// Generated by `tether types --ts" + (f" {source}" if source else "") + "`: do not edit.",
        f'// The channels this Main exposes to pages (handlers whose roles include "{WEB_ROLE}"),',
        "// typed as their JSON encoding: bytes are base64 strings, datetimes ISO 8601 strings.",
        "// (A page can receive bytes, as base64, but not send them: a bytes argument refuses",
        "// a string with BadRequest, so it is typed `never`: no call type-checks.)",
        "",
    ]
    for name, comp in sorted(schemas.components.items()):
        out.extend(_component(name, comp))
        out.append("")
    blocks: dict[str, list[str]] = {"WebChannels": [], "WebEvents": [], "WebAmbiguous": []}
    for ch, fn, params, first, event in entries:
        types = [schemas.arg_ts(first + i) for i in range(len(params))]
        args = _arguments(params, types)
        entry = args if event else f"[{args}, {schemas.ts(first + len(params))}]"
        block = blocks["WebEvents" if event else "WebChannels"]
        block.extend(_doc(inspect.getdoc(fn), "  "))
        if any(t == "never" or t.startswith("never ") for t in types):
            block.append("  // a bytes argument is `never`: a page cannot send bytes")
        block.append(f"  {json.dumps(ch)}: {entry};")
        if not event and any(schemas.may_be_options(first + i) for i in _last_positions(params)):
            blocks["WebAmbiguous"].append(f"  {json.dumps(ch)}: true;")
    for title, body in blocks.items():
        out.append(_TITLES[title])
        out.append(
            f"export interface {title} " + ("{\n" + "\n".join(body) + "\n}" if body else "{}")
        )
        out.append("")
    out.extend(_AUGMENT)
    return "\n".join(out) + "\n"


def _last_positions(params: list[_Param]) -> range:
    """The indexes of the parameters a call's last argument can land on."""
    required = sum(1 for p in params if not p.optional and not p.rest)
    return range(max(required - 1, 0), len(params))


_TITLES: Final = {
    "WebChannels": (
        "/** What `ipc.invoke(channel, ...args)` takes and resolves to: [arguments, result]. */"
    ),
    "WebEvents": (
        "/** The arguments of `ipc.send(channel, ...args)` for the events main listens to. */"
    ),
    "WebAmbiguous": (
        "/** Channels whose last argument could be an object of only `timeout`/`signal`, which\n"
        " *  `invoke` would take for its options: call them with\n"
        " *  `invokeWith(channel, args, options)`. */"
    ),
}

# tether.d.ts types invoke and send through its (empty) Channels, Events and
# InvokeWithOnly maps; this fills them.
_AUGMENT: Final = [
    "// With these, tether.d.ts's `invoke` and `send` check each channel's arguments and result,",
    "// and `invoke` refuses the channels of WebAmbiguous (use `invokeWith`).",
    'declare module "/tether.js" {',
    "  interface Channels extends WebChannels {}",
    "  interface Events extends WebEvents {}",
    "  interface InvokeWithOnly extends WebAmbiguous {}",
    "}",
]
