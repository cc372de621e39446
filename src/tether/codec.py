"""Payload encodings and the typed decoders built from handler signatures.

Bodies are MessagePack (msgspec). A handler's arguments are decoded straight
into a named tuple built from its type hints, so validation happens in the
decoder, before the handler runs, and a mismatch names the bad argument.
"""

from __future__ import annotations

import collections
import inspect
import pickle
import re
import threading
import traceback as _traceback
import typing
from collections.abc import Callable
from typing import Any, Final

import msgspec

from .errors import BadRequest

__all__ = [
    "ErrorInfo",
    "Goodbye",
    "Hello",
    "PROTOCOL_NAME",
    "PROTOCOL_VERSION",
    "ArgsSpec",
    "error_info",
]

PROTOCOL_NAME: Final = "tether"
PROTOCOL_VERSION: Final = 1

#: MessagePack extension codes for attachments (see docs/protocol.md).
EXT_BYTES: Final = 1  # data: u32 LE attachment index -> read-only memoryview
EXT_NDARRAY: Final = 2  # data: msgpack [index, dtype str, shape] -> read-only ndarray
#: data: a pickle, only between two ends that both opted in (a main and the
#: child it spawned with ``pickle=True``); anywhere else a validation error,
#: and never unpickled
EXT_PICKLE: Final = 3

_local = threading.local()


def ext_hook(code: int, data: memoryview) -> Any:
    """Resolve an attachment reference against the frame being decoded."""
    if code == EXT_PICKLE:
        if not getattr(_local, "pickle", False):
            raise msgspec.ValidationError("pickle is not allowed on this connection")
        try:
            return pickle.loads(data)
        except Exception as exc:
            raise msgspec.ValidationError(f"cannot unpickle: {exc}") from None
    atts = getattr(_local, "attachments", None)
    if code == EXT_BYTES and atts is not None:
        if len(data) != 4:
            raise msgspec.ValidationError("malformed attachment reference")
        return _attachment(atts, int.from_bytes(data, "little"))
    if code == EXT_NDARRAY and atts is not None:
        import numpy as np

        try:
            index, dtype, shape = msgspec.msgpack.decode(data, type=tuple[int, str, list[int]])
            if any(d < 0 for d in shape):
                raise ValueError(f"negative dimension in shape {shape}")
            view = _attachment(atts, index)
            return np.frombuffer(view, dtype=np.dtype(dtype)).reshape(shape)
        except (TypeError, ValueError, SyntaxError) as exc:  # bad dtype string, shape
            raise msgspec.ValidationError(f"malformed array attachment: {exc}") from None
    return msgspec.msgpack.Ext(code, bytes(data))


def _attachment(atts: Any, index: int) -> memoryview:
    if not 0 <= index < len(atts):
        raise msgspec.ValidationError(f"attachment {index} does not exist")
    return memoryview(atts[index]).toreadonly()


def decode_with(
    decoder: msgspec.msgpack.Decoder[Any], body: Any, attachments: Any, pickled: bool = False
) -> Any:
    """Decode ``body``; extension references resolve to ``attachments``.

    ``pickled``: the connection's two ends opted in to pickle (EXT_PICKLE).
    """
    if pickled:
        _local.pickle = True
        try:
            return decode_with(decoder, body, attachments)
        finally:
            _local.pickle = False
    if not attachments:
        return decoder.decode(body)
    _local.attachments = attachments
    try:
        return decoder.decode(body)
    finally:
        _local.attachments = None


encoder: Final = msgspec.msgpack.Encoder()
any_decoder: Final = msgspec.msgpack.Decoder(ext_hook=ext_hook)


_BUFFER_TYPES: Final = (bytes, bytearray, memoryview)


def _decodable(tp: Any) -> Any:
    """``tp`` if msgspec can decode it, else ``Any`` (e.g. numpy arrays from attachments).

    Buffer types become ``Any`` too, checked after decoding: large buffers
    arrive as attachments (read-only memoryviews), which msgspec would reject.
    """
    if tp in _BUFFER_TYPES:
        return Any
    try:
        msgspec.msgpack.Decoder(tp)
    except TypeError:
        return Any
    return tp


class Hello(msgspec.Struct, omit_defaults=True):
    """First frame each side sends. Unknown fields are ignored (forward compatible)."""

    protocol: str = ""
    version: int = 0
    role: str = ""
    name: str = ""
    pid: int = 0
    max_frame_size: int = 0
    features: list[str] = []
    credentials: dict[str, str] = {}
    #: fresh random bytes for the shared-secret proof (AUTH); empty without a secret
    nonce: bytes = b""
    #: the encoding of the sender's bodies: "" (MessagePack) or "json" (WebSocket pages)
    encoding: str = ""


class ErrorInfo(msgspec.Struct, omit_defaults=True):
    """Body of an ERROR frame.

    ``code`` is one of ``remote``, ``no_handler``, ``forbidden``,
    ``bad_request``, ``too_large``, ``cancelled``, ``closed``.
    """

    code: str
    message: str
    type: str = ""
    traceback: str = ""
    path: str = ""


class Goodbye(msgspec.Struct, omit_defaults=True):
    """Body of a GOODBYE frame: why the sender is closing."""

    reason: str = ""


hello_decoder: Final = msgspec.msgpack.Decoder(Hello)
error_decoder: Final = msgspec.msgpack.Decoder(ErrorInfo)
goodbye_decoder: Final = msgspec.msgpack.Decoder(Goodbye)

#: body encodings a connection may use (docs/protocol.md, section 2); "json" only for pages
ENCODINGS: Final = ("msgpack", "json")
json_encoder: Final = msgspec.json.Encoder()
json_any_decoder: Final = msgspec.json.Decoder()
json_hello_decoder: Final = msgspec.json.Decoder(Hello)
json_goodbye_decoder: Final = msgspec.json.Decoder(Goodbye)


def error_info(exc: BaseException, *, traceback: bool = True) -> ErrorInfo:
    """Describe a handler's exception for the caller; never raises.

    Args:
        traceback: include the formatted traceback (for peers this side
            trusts: it shows paths and source lines). ``False``: type and
            message only.

    An exception whose ``__str__`` (or formatting) raises is still described,
    by its type; text that is not valid UTF-8 (lone surrogates) is replaced,
    so the result always encodes.
    """
    tp = type(exc)
    try:
        mod, qual = tp.__module__, tp.__qualname__
        name = qual if mod == "builtins" else f"{mod}.{qual}"
    except Exception:
        name = "<unknown>"
    try:
        message = _clean(str(exc))
    except BaseException:
        message = f"<{name} whose message could not be read>"
    tb = ""
    if traceback:
        try:
            tb = _clean("".join(_traceback.format_exception(exc)))
        except BaseException:
            tb = ""
    return ErrorInfo(code="remote", message=message, type=_clean(name), traceback=tb)


def _clean(text: str) -> str:
    """``text`` as a str that encodes to UTF-8 (lone surrogates replaced)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return text.encode("utf-8", "replace").decode("utf-8")
    return text


_INDEX: Final = re.compile(r"^\$\[(\d+)\]")


def _hints_one_by_one(fn: Callable[..., Any]) -> dict[str, Any]:
    hints: dict[str, Any] = {}
    ns = getattr(fn, "__globals__", {})
    for name, ann in getattr(fn, "__annotations__", {}).items():
        try:
            hints[name] = eval(ann, ns) if isinstance(ann, str) else ann
        except Exception:
            hints[name] = Any
    return hints


class ArgsSpec:
    """Decodes a call's positional arguments for one handler.

    Built once per handler from its signature (the first parameter, the
    :class:`~tether.Call`, is skipped). Unannotated parameters accept anything;
    ``*args`` makes the whole argument list untyped.
    """

    __slots__ = ("buffers", "decoder", "names")

    def __init__(self, fn: Callable[..., Any]) -> None:
        sig = inspect.signature(fn)
        try:
            hints = typing.get_type_hints(fn)
        except Exception:  # one unresolvable hint: resolve the others one by one
            hints = _hints_one_by_one(fn)
        params = list(sig.parameters.values())[1:]
        names: list[str] = []
        types: dict[str, Any] = {}
        defaults: list[Any] = []
        variadic = False
        for p in params:
            if p.kind is p.VAR_POSITIONAL:
                variadic = True
                break
            if p.kind in (p.KEYWORD_ONLY, p.VAR_KEYWORD):
                if p.kind is p.KEYWORD_ONLY and p.default is p.empty:
                    raise TypeError(
                        f"handler {fn!r}: keyword-only parameter {p.name!r} is unsupported"
                    )
                continue
            names.append(p.name)
            types[p.name] = _decodable(hints.get(p.name, Any))
            if p.default is not p.empty:
                defaults.append(p.default)
            elif defaults:
                raise TypeError(f"handler {fn!r}: parameter {p.name!r} follows a default")
        self.names = tuple(names)
        self.buffers = tuple(
            i for i, n in enumerate(names) if types.get(n) is Any and hints.get(n) in _BUFFER_TYPES
        )
        if variadic:
            self.decoder: msgspec.msgpack.Decoder[Any] = msgspec.msgpack.Decoder(
                tuple[Any, ...], ext_hook=ext_hook
            )
            return
        nt = collections.namedtuple("Args", names, defaults=defaults)  # type: ignore[misc]
        nt.__annotations__ = types
        self.decoder = msgspec.msgpack.Decoder(nt, ext_hook=ext_hook)

    def decode(
        self, body: bytes | memoryview, attachments: Any = (), pickled: bool = False
    ) -> tuple[Any, ...]:
        """Decode and validate; raises :class:`BadRequest` naming the bad argument.

        ``pickled``: the frame came over a connection whose ends opted in to pickle.
        """
        try:
            if attachments or pickled:
                args: tuple[Any, ...] = decode_with(self.decoder, body, attachments, pickled)
            else:
                args = self.decoder.decode(body)
            for i in self.buffers:
                if i < len(args) and not isinstance(args[i], _BUFFER_TYPES):
                    got = type(args[i]).__name__
                    raise BadRequest(
                        f"bad argument `{self.names[i]}`: Expected `bytes`, got `{got}`",
                        path=self.names[i],
                    )
            return args
        except msgspec.ValidationError as exc:
            raise self._bad(str(exc)) from None
        except msgspec.DecodeError as exc:
            raise BadRequest(f"malformed arguments: {exc}") from None
        except RecursionError:  # msgspec's depth guard, for values decoded as Any
            raise BadRequest("malformed arguments: nested too deeply") from None

    def _bad(self, text: str) -> BadRequest:
        msg, _, where = text.rpartition(" - at `")
        if not msg:
            return BadRequest(f"bad arguments: {text}")
        where = where.rstrip("`")
        m = _INDEX.match(where)
        if m and int(m.group(1)) < len(self.names):
            path = self.names[int(m.group(1))] + where[m.end() :]
        else:
            path = where
        return BadRequest(f"bad argument `{path}`: {msg}", path=path)
