"""Fuzz dispatch past the parser: Registry.resolve / listeners and ArgsSpec.decode.

A peer controls an INVOKE's channel, body and attachments completely; whatever
it sends, ``Registry.resolve`` must return the handler with arguments that
match its type hints, or an :class:`~tether.codec.ErrorInfo` to answer with
(``no_handler``, ``forbidden``, ``bad_request``), and ``ArgsSpec.decode`` must
raise nothing but :class:`~tether.BadRequest`. Anything else escaping is a
finding: in an I/O layer it would leave the invoke without an answer.

Run with atheris (coverage-guided)::

    python fuzz/fuzz_registry.py -atheris_runs=20000
    python fuzz/fuzz_registry.py -max_total_time=300 .fuzz/fuzz_registry fuzz/corpus/fuzz_registry

``make fuzz`` runs the second form (new inputs go to the first directory; the second holds
the committed seeds, written by fuzz/make_corpus.py).

``TestOneInput`` is also driven by ``tests/test_fuzz_registry.py`` without atheris.

Input layout: byte 0 picks the handler (``HANDLERS``, plus one channel that
has none) and whether the caller's role may reach it; byte 1 picks how the
rest becomes the body (bits 0-1: raw bytes / a recipe of msgpack values, see
:func:`value_from` / that recipe's encoding with one byte flipped / cut short)
and the number of attachments (bits 2-3). Attachment sizes come next, one
byte each, then the body.
"""

from __future__ import annotations

import dataclasses
import enum
import importlib
import logging
import struct
import sys
from typing import Any, Literal, NamedTuple, Optional, TypedDict, Union

if __name__ == "__main__":  # coverage-instrument the code under test before it is imported
    import atheris

    with atheris.instrument_imports(include=["tether", "msgspec"]):
        for _name in ("tether.codec", "tether.registry"):
            importlib.import_module(_name)

import msgspec
import numpy as np

from tether.codec import EXT_BYTES, EXT_NDARRAY, ArgsSpec, ErrorInfo, encoder
from tether.errors import BadRequest
from tether.registry import Call, Handler, Registry
from tether.wire import Frame, Kind

# --- handlers with the kinds of type hints applications use ---------------------------


class Point(msgspec.Struct):
    x: int
    y: float = 0.0


class Tagged(msgspec.Struct, tag=True):
    name: str
    data: bytes = b""


@dataclasses.dataclass
class Box:
    w: int
    h: int


class Color(enum.Enum):
    RED = "red"
    BLUE = "blue"


class Level(enum.IntEnum):
    LOW = 1
    HIGH = 2


class Opts(TypedDict):
    depth: int
    label: str


class Pair(NamedTuple):
    a: int
    b: str


EMPTY = bytearray()


def h_none(call: Call) -> None: ...
def h_int(call: Call, x: int) -> None: ...
def h_str_float(call: Call, s: str, f: float) -> None: ...
def h_bool_default(call: Call, b: bool, n: int = 3) -> None: ...
def h_bytes(call: Call, data: bytes) -> None: ...
def h_memoryview(call: Call, data: memoryview, tail: bytearray = EMPTY) -> None: ...
def h_list(call: Call, xs: list[int], m: dict[str, float]) -> None: ...
def h_tuple(call: Call, t: tuple[int, str], s: set[int], fs: frozenset[str]) -> None: ...
def h_optional(call: Call, x: Optional[int], y: Union[int, str, None]) -> None: ...  # noqa: UP007, UP045
def h_struct(call: Call, p: Point, t: Tagged, box: Box) -> None: ...
def h_enum(call: Call, c: Color, lv: Level, lit: Literal["a", "b", 3]) -> None: ...
def h_typeddict(call: Call, o: Opts, pair: Pair) -> None: ...
def h_ndarray(call: Call, arr: np.ndarray, *, scale: float = 1.0) -> None: ...
def h_any(call: Call, a: Any, b, c: object = None) -> None: ...  # type: ignore[no-untyped-def]
def h_variadic(call: Call, *args: int) -> None: ...
def h_nested(call: Call, tree: dict[str, list[Point | None]], raw: list[bytes]) -> None: ...
def h_unresolvable(call: Call, x: NoSuchType, y: int) -> None: ...  # type: ignore[name-defined]  # noqa: F821


def _is_bytes(v: object) -> bool:
    return isinstance(v, (bytes, bytearray, memoryview))


# channel -> (handler, check of the decoded arguments' types, roles)
HANDLERS: list[tuple[str, Any, Any]] = [
    ("none", h_none, lambda a: a == ()),
    ("int", h_int, lambda a: type(a[0]) is int),
    ("str_float", h_str_float, lambda a: isinstance(a[0], str) and isinstance(a[1], float)),
    ("bool_default", h_bool_default, lambda a: type(a[0]) is bool and type(a[1]) is int),
    ("bytes", h_bytes, lambda a: _is_bytes(a[0])),
    ("memoryview", h_memoryview, lambda a: _is_bytes(a[0]) and _is_bytes(a[1])),
    ("list", h_list, lambda a: all(type(x) is int for x in a[0]) and isinstance(a[1], dict)),
    ("tuple", h_tuple, lambda a: isinstance(a[1], set) and isinstance(a[2], frozenset)),
    ("optional", h_optional, lambda a: a[0] is None or type(a[0]) is int),
    ("struct", h_struct, lambda a: isinstance(a[0], Point) and isinstance(a[2], Box)),
    ("enum", h_enum, lambda a: isinstance(a[0], Color) and isinstance(a[1], Level)),
    ("typeddict", h_typeddict, lambda a: isinstance(a[0], dict) and isinstance(a[1], Pair)),
    ("ndarray", h_ndarray, lambda a: True),
    ("any", h_any, lambda a: len(a) in (2, 3)),
    ("variadic", h_variadic, lambda a: isinstance(a, tuple)),
    ("nested", h_nested, lambda a: isinstance(a[0], dict) and isinstance(a[1], list)),
    ("unresolvable", h_unresolvable, lambda a: type(a[1]) is int),
]
CHECKS = {name: check for name, _, check in HANDLERS}
ROLE = "child"
ERROR_CODES = frozenset({"no_handler", "forbidden", "bad_request"})


def make_registry() -> Registry:
    """Every handler twice: open to all (``name``) and to role ``admin`` only (``name!``)."""
    reg = Registry()
    for name, fn, _ in HANDLERS:
        reg.handle(name, fn)
        reg.handle(name + "!", fn, roles={"admin"})
        reg.on(name, fn)
        reg.on(name, fn, roles={"admin"})
    return reg


REGISTRY = make_registry()


def check_resolve(channel: str, body: bytes | memoryview, attachments: list[Any]) -> None:
    """One INVOKE and one EVENT through the registry; assert the dispatch contract."""
    frame = Frame(Kind.INVOKE, 1, 0, channel, body, attachments)
    out = REGISTRY.resolve(frame, ROLE)
    if isinstance(out, ErrorInfo):
        assert out.code in ERROR_CODES, out
        assert isinstance(out.message, str) and isinstance(out.path, str)
        encoder.encode(out)  # the ERROR must be sendable
        if out.code == "forbidden":
            assert channel.endswith("!")
        if out.code == "no_handler":
            assert channel not in REGISTRY.invokes
    else:
        handler, args = out
        assert isinstance(handler, Handler) and isinstance(args, tuple)
        assert not channel.endswith("!"), "a forbidden handler was resolved"
        assert CHECKS[channel](args), (channel, args)
    # The same frame as an EVENT: listeners never raise; the admin-only ones are skipped.
    frame.kind = Kind.EVENT
    got = REGISTRY.listeners(frame, ROLE)
    assert isinstance(got, list) and len(got) <= 1
    if channel in REGISTRY.invokes:
        check_decode(REGISTRY.invokes[channel].spec, body, attachments)


def check_decode(spec: ArgsSpec, body: bytes | memoryview, attachments: list[Any]) -> None:
    """``ArgsSpec.decode`` returns a tuple or raises BadRequest, nothing else."""
    try:
        args = spec.decode(body, attachments)
    except BadRequest as exc:
        assert isinstance(exc.path, str)
        str(exc)
    else:
        assert isinstance(args, tuple)


# --- turning fuzzer bytes into msgpack values -------------------------------------------


class _Reader:
    __slots__ = ("data", "pos")

    def __init__(self, data: bytes) -> None:
        self.data = data
        self.pos = 0

    def byte(self) -> int:
        if self.pos >= len(self.data):
            return 0
        self.pos += 1
        return self.data[self.pos - 1]

    def take(self, n: int) -> bytes:
        piece = self.data[self.pos : self.pos + n]
        self.pos += n
        return piece

    def more(self) -> bool:
        return self.pos < len(self.data)


_DTYPES = ["u1", "<i4", ">f8", "?", "O", "V0", "U3", "i4,i4", "M8[s]", "<c16", "S0", "bogus", ""]
_INTS = [0, 1, -1, 3, 255, 2**31, -(2**63), 2**64 - 1, 2**53 + 1]
_STRS = ["", "x", "red", "blue", "a", "b", "depth", "label", "name", "Tagged", "Point", "é\u0000"]


def value_from(r: _Reader, depth: int = 0) -> Any:
    """One msgpack-encodable value chosen by the next bytes (attachment refs included)."""
    op = r.byte() % (17 if depth < 6 else 9)
    if op == 16:  # deeply nested arrays: past any recursion limit
        return deep(r.byte() * 16)
    if op == 0:
        return None
    if op == 1:
        return bool(r.byte() & 1)
    if op == 2:
        return _INTS[r.byte() % len(_INTS)]
    if op == 3:
        return int.from_bytes(r.take(2), "little", signed=True)
    if op == 4:
        return struct.unpack("<d", r.take(8).ljust(8, b"\0"))[0]
    if op == 5:
        return _STRS[r.byte() % len(_STRS)]
    if op == 6:
        return r.take(r.byte() % 8).decode("utf-8", "replace")
    if op == 7:
        return r.take(r.byte() % 8)
    if op == 8:  # a reference to attachment i (often one that does not exist)
        return msgspec.msgpack.Ext(EXT_BYTES, struct.pack("<I", r.byte() % 5))
    if op == 9:  # an ndarray reference: [index, dtype, shape]
        shape = [int.from_bytes(r.take(1), "little", signed=True) for _ in range(r.byte() % 4)]
        ref = [r.byte() % 4, _DTYPES[r.byte() % len(_DTYPES)], shape]
        return msgspec.msgpack.Ext(EXT_NDARRAY, encoder.encode(ref))
    if op == 10:  # an ndarray reference whose payload is arbitrary
        return msgspec.msgpack.Ext(EXT_NDARRAY, r.take(r.byte() % 12))
    if op == 11:  # another extension code, or a short EXT_BYTES payload
        return msgspec.msgpack.Ext(r.byte() % 4, r.take(r.byte() % 6))
    if op in (12, 13):
        return [value_from(r, depth + 1) for _ in range(r.byte() % 5)]
    out: dict[Any, Any] = {}
    for _ in range(r.byte() % 4):
        key = _STRS[r.byte() % len(_STRS)] if r.byte() & 1 else value_from(r, depth + 1)
        if isinstance(key, (list, dict, msgspec.msgpack.Ext, msgspec.Raw)):
            key = repr(key)
        out[key] = value_from(r, depth + 1)
    return out


def deep(depth: int) -> msgspec.Raw:
    """``depth`` nested one-element arrays around a 0, already msgpack-encoded."""
    return msgspec.Raw(b"\x91" * depth + b"\x00")


def body_from(r: _Reader) -> bytes:
    """An argument array of fuzzer-chosen values, msgpack-encoded."""
    args = [value_from(r) for _ in range(r.byte() % 5)]
    try:
        return encoder.encode(args)
    except (TypeError, msgspec.EncodeError):  # a dict key that msgpack cannot carry
        return encoder.encode([a for a in args if not isinstance(a, dict)])


def TestOneInput(data: bytes) -> None:
    if len(data) < 2:
        return
    which, how = data[0], data[1]
    names = [name for name, _, _ in HANDLERS]
    channel = names[which % len(names)] if which % 32 != 31 else "nobody-handles-this"
    if which & 0x80:
        channel += "!"
    r = _Reader(data[2:])
    attachments: list[Any] = [
        memoryview(bytes(range(256)) * 2)[: r.byte()] for _ in range((how >> 2) & 3)
    ]
    mode = how & 3
    if mode == 0:
        body = data[2 + r.pos :]  # the bytes after the attachment sizes
    else:
        body = body_from(r)
        if mode == 2 and body:
            flip = bytearray(body)
            flip[r.byte() % len(flip)] ^= r.byte() or 0xFF
            body = bytes(flip)
        elif mode == 3:
            body = body[: r.byte() % (len(body) + 1)]
    check_resolve(channel, memoryview(body), attachments)


def main() -> None:
    import atheris

    logging.getLogger("tether").setLevel(logging.CRITICAL)  # dropped events are expected

    atheris.Setup(sys.argv, TestOneInput)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
