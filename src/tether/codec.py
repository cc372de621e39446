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

from .errors import BadRequest, Forbidden

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
#: data: u32 LE attachment index (a FLAG_HANDLE descriptor) -> tether.Handle
EXT_HANDLE: Final = 4

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
    if code == EXT_HANDLE and atts is not None:
        att = _att(atts, data)
        if not getattr(att, "__tether_handle__", False):
            raise msgspec.ValidationError(
                "handle reference to an attachment that is not a descriptor"
            )
        return att
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
    att = atts[index]
    if getattr(att, "__tether_handle__", False):
        raise msgspec.ValidationError(f"attachment {index} is a descriptor, not bytes")
    return memoryview(att).toreadonly()


def _att(atts: Any, data: memoryview) -> Any:
    if len(data) != 4:
        raise msgspec.ValidationError("malformed attachment reference")
    index = int.from_bytes(data, "little")
    if not 0 <= index < len(atts):
        raise msgspec.ValidationError(f"attachment {index} does not exist")
    return atts[index]


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
    if tp in _BUFFER_TYPES or buffer_target(tp) is not None:
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

    A :class:`~tether.Forbidden` the handler (or a route's host factory)
    raised is a refusal, not a failure: it is answered ``forbidden``, so the
    caller gets ``Forbidden`` with its message (no type, no traceback).
    """
    if isinstance(exc, Forbidden):
        try:
            return ErrorInfo(code="forbidden", message=_clean(str(exc)))
        except BaseException:
            return ErrorInfo(code="forbidden", message="forbidden")
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
_ARITY: Final = re.compile(r"^Expected `array` of length (\d+)(?: to (\d+))?, got (\d+)$")
_RAW_LIST: Final = msgspec.msgpack.Decoder(list[msgspec.Raw])


def _hints_one_by_one(fn: Callable[..., Any]) -> dict[str, Any]:
    hints: dict[str, Any] = {}
    ns = getattr(fn, "__globals__", {})
    for name, ann in getattr(fn, "__annotations__", {}).items():
        try:
            hints[name] = eval(ann, ns) if isinstance(ann, str) else ann
        except Exception:
            hints[name] = Any
    return hints


def type_hints(fn: Callable[..., Any]) -> dict[str, Any]:
    """``fn``'s resolved type hints; an unresolvable one becomes ``Any``."""
    try:
        return typing.get_type_hints(fn)
    except Exception:  # one unresolvable hint: resolve the others one by one
        return _hints_one_by_one(fn)


def buffer_target(hint: Any) -> type | None:
    """What a buffer hint turns a received buffer into: bytes, bytearray, or a memoryview.

    ``bytes`` and ``bytearray`` copy (the same type at every size: large
    buffers arrive as views of an attachment); ``memoryview`` and
    :class:`tether.Buffer` keep the zero-copy view (small ones are wrapped).
    """
    if hint in _BUFFER_TYPES:
        return hint  # type: ignore[no-any-return]
    if isinstance(hint, type) and getattr(hint, "__tether_buffer__", False):
        return memoryview
    return None


def as_buffer(value: Any, target: type) -> Any:
    """``value`` (bytes or a view) as ``target``; anything else is returned as is."""
    if type(value) is target or not isinstance(value, _BUFFER_TYPES):
        return value
    if target is memoryview:
        return memoryview(value).toreadonly()
    return target(value)


#: msgspec's complaint when a large buffer (an attachment reference) meets a typed field
EXT_MISMATCH: Final = "got `ext`"


def nested_buffers(
    decoder: msgspec.msgpack.Decoder[Any],
    body: Any,
    attachments: Any,
    pickled: bool,
    error: msgspec.ValidationError,
) -> Any:
    """Decode ``body`` untyped, then convert it to the decoder's type.

    The slow path for a large ``bytes`` value *inside* a typed argument or
    result (a Struct field, a ``list[bytes]``): it crossed as an attachment,
    which msgspec's typed decoding refuses (``got `ext```). Converting the
    untyped value gives it the hinted type at every size, as at the top level.
    Raises msgspec's ValidationError for a real mismatch, with its path;
    ``error`` (the typed decoder's) if the value cannot be converted at all
    (an array where the hint wants something else).
    """
    raw = decode_with(any_decoder, body, attachments, pickled)
    try:
        return msgspec.convert(raw, decoder.type)
    except msgspec.ValidationError:
        raise
    except Exception:
        raise error from None


def _plural(n: int) -> str:
    return "argument" if n == 1 else "arguments"


class ArgsSpec:
    """Decodes a call's positional arguments for one handler.

    Built once per handler from its signature (the first parameter, the
    :class:`~tether.Call`, is skipped; with ``call=False`` every parameter is
    an argument, as for a :class:`tether.Pool` job). Unannotated parameters
    accept anything.
    A ``*args`` parameter takes the arguments past the named ones, each
    validated against its hint. A parameter hinted ``bytes`` (or
    ``bytearray``) receives that type at every size; ``memoryview`` or
    :class:`tether.Buffer` receives a read-only view (zero-copy when large).
    Mismatches read like Python's own: ``add() takes 2 arguments (a, b),
    got 1``; ``add() argument 'b': expected int, got str``.
    """

    __slots__ = (
        "buffers",
        "decoder",
        "first",
        "fname",
        "items",
        "names",
        "required",
        "rest",
        "slow",
    )

    def __init__(self, fn: Callable[..., Any], *, call: bool = True) -> None:
        sig = inspect.signature(fn)
        hints = type_hints(fn)
        self.fname = str(getattr(fn, "__name__", None) or "handler")
        every = list(sig.parameters.values())
        # The Call comes first (a handler taking only *args gets it in args[0]); a job has none.
        skip = call and bool(every) and every[0].kind is not every[0].VAR_POSITIONAL
        params = every[1:] if skip else every
        #: the parameter that receives the Call (named in arity errors)
        self.first = every[0].name if skip else ""
        names: list[str] = []
        types: dict[str, Any] = {}
        defaults: list[Any] = []
        rest: Any = None  # the *args item type, when there is one
        for p in params:
            if p.kind is p.VAR_POSITIONAL:
                rest = hints.get(p.name, Any)
                if call and p is every[0]:
                    rest = Any  # its hint is for the call as well
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
        self.required = len(names) - len(defaults)
        self.buffers = tuple(
            (i, t) for i, n in enumerate(names) if (t := buffer_target(hints.get(n))) is not None
        )
        self.rest: tuple[msgspec.msgpack.Decoder[Any], type | None] | None = None
        self.items: tuple[tuple[msgspec.msgpack.Decoder[Any], Any], ...] = ()
        #: buffer hints or *args: decoding takes the longer way
        self.slow = bool(self.buffers) or rest is not None
        if rest is not None:
            # Each argument is decoded on its own: the named ones, then *args.
            self.decoder: msgspec.msgpack.Decoder[Any] = _RAW_LIST
            self.items = tuple(
                (msgspec.msgpack.Decoder(types[n], ext_hook=ext_hook), d)
                for n, d in zip(
                    names, [inspect.Parameter.empty] * self.required + defaults, strict=True
                )
            )
            self.rest = (
                msgspec.msgpack.Decoder(_decodable(rest), ext_hook=ext_hook),
                buffer_target(rest),
            )
            return
        # rename: a name namedtuple refuses (``_k``) gets a stand-in field; errors use self.names
        nt = collections.namedtuple("Args", names, defaults=defaults, rename=True)  # type: ignore[misc]
        fields: tuple[str, ...] = nt._fields
        nt.__annotations__ = {f: types[n] for f, n in zip(fields, names, strict=True)}
        self.decoder = msgspec.msgpack.Decoder(nt, ext_hook=ext_hook)

    def decode(
        self, body: bytes | memoryview, attachments: Any = (), pickled: bool = False
    ) -> tuple[Any, ...]:
        """Decode and validate; raises :class:`BadRequest` naming the bad argument.

        ``pickled``: the frame came over a connection whose ends opted in to pickle.
        """
        try:
            if self.slow:  # one check on the common path
                if self.rest is not None:
                    return self._variadic(body, attachments, pickled)
                return self._buffers(decode_with(self.decoder, body, attachments, pickled))
            if attachments or pickled:
                args: tuple[Any, ...] = decode_with(self.decoder, body, attachments, pickled)
                return args
            args = self.decoder.decode(body)
            return args
        except msgspec.ValidationError as exc:
            if attachments and EXT_MISMATCH in str(exc):
                return self._converted(body, attachments, pickled, exc)
            raise self._bad(str(exc)) from None
        except msgspec.DecodeError as exc:
            raise BadRequest(f"malformed arguments: {exc}") from None
        except RecursionError:  # msgspec's depth guard, for values decoded as Any
            raise BadRequest("malformed arguments: nested too deeply") from None

    def _converted(
        self, body: Any, attachments: Any, pickled: bool, error: msgspec.ValidationError
    ) -> tuple[Any, ...]:
        """Arguments with a large buffer nested in a typed one (see :func:`nested_buffers`)."""
        try:
            args: tuple[Any, ...] = nested_buffers(self.decoder, body, attachments, pickled, error)
        except msgspec.ValidationError as exc:
            raise self._bad(str(exc)) from None
        except msgspec.DecodeError as exc:
            raise BadRequest(f"malformed arguments: {exc}") from None
        except RecursionError:
            raise BadRequest("malformed arguments: nested too deeply") from None
        return self._buffers(args) if self.buffers else args

    def _buffers(self, args: tuple[Any, ...]) -> tuple[Any, ...]:
        """Buffer-hinted arguments as their hinted type (checked: msgspec took them as Any)."""
        out: list[Any] | None = None
        for i, target in self.buffers:
            if i >= len(args):
                continue
            v = args[i]
            if not isinstance(v, _BUFFER_TYPES):
                raise self._type(self.names[i], target, v)
            if type(v) is not target:
                if out is None:
                    out = list(args)
                out[i] = as_buffer(v, target)
        return args if out is None else type(args)(*out)

    def _variadic(self, body: Any, attachments: Any, pickled: bool) -> tuple[Any, ...]:
        raws = _RAW_LIST.decode(body)
        n = len(raws)
        if n < self.required:
            raise BadRequest(self._arity(n))
        assert self.rest is not None
        out: list[Any] = []
        for i, raw in enumerate(raws):
            if i < len(self.items):
                dec, target = self.items[i][0], None
                name = self.names[i]
                for j, t in self.buffers:
                    if j == i:
                        target = t
            else:
                dec, target = self.rest
                name = f"*args[{i - len(self.items)}]"
            try:
                try:
                    v = (
                        decode_with(dec, raw, attachments, pickled)
                        if attachments or pickled
                        else dec.decode(raw)
                    )
                except msgspec.ValidationError as exc:
                    if not (attachments and EXT_MISMATCH in str(exc)):
                        raise
                    v = nested_buffers(dec, raw, attachments, pickled, exc)
            except msgspec.ValidationError as exc:
                msg, _, where = str(exc).rpartition(" - at `")
                if not msg:
                    msg, where = str(exc), "$`"
                path = name + where.rstrip("`")[1:]
                raise BadRequest(
                    f"{self.fname}() argument '{path}': {python_words(msg)}", path=path
                ) from None
            if target is not None:
                if not isinstance(v, _BUFFER_TYPES):
                    raise self._type(name, target, v)
                v = as_buffer(v, target)
            out.append(v)
        for _, default in self.items[n:]:
            out.append(default)
        return tuple(out)

    def _type(self, name: str, target: type, got: Any) -> BadRequest:
        return BadRequest(
            f"{self.fname}() argument '{name}': expected {target.__name__}, "
            f"got {type(got).__name__}",
            path=name,
        )

    def _arity(self, got: int) -> str:
        text = self._arity_text(got)
        if got > len(self.names) and self.rest is None and self.first not in ("", "call"):
            # def h(a): ... registered as a handler: 'a' gets the Call, not the argument
            text += f" (its first parameter, {self.first!r}, receives the tether.Call)"
        return text

    def _arity_text(self, got: int) -> str:
        hi = len(self.names)
        lo = self.required
        shown = f" ({', '.join(self.names)})" if self.names else ""
        if self.rest is not None:
            return f"{self.fname}() takes at least {lo} {_plural(lo)}{shown}, got {got}"
        if hi == 0:
            return f"{self.fname}() takes no arguments, got {got}"
        if lo == hi:
            return f"{self.fname}() takes {hi} {_plural(hi)}{shown}, got {got}"
        return f"{self.fname}() takes {lo} to {hi} arguments{shown}, got {got}"

    def _bad(self, text: str) -> BadRequest:
        m = _ARITY.match(text)
        if m:
            return BadRequest(self._arity(int(m.group(3))))
        msg, _, where = text.rpartition(" - at `")
        if not msg:
            if text.startswith("Expected `array`, got"):
                got = text.rpartition(" ")[2].strip("`")
                return BadRequest(f"{self.fname}() arguments must be an array, got {got}")
            return BadRequest(f"bad arguments to {self.fname}(): {python_words(text)}")
        where = where.rstrip("`")
        m = _INDEX.match(where)
        if m and int(m.group(1)) < len(self.names):
            path = self.names[int(m.group(1))] + where[m.end() :]
        else:
            path = where
        return BadRequest(f"{self.fname}() argument '{path}': {python_words(msg)}", path=path)


def python_words(msg: str) -> str:
    """A msgspec message in Python's style: ``expected int, got str`` (no backticks)."""
    msg = msg.replace("`", "") if msg.startswith("Expected ") else msg.replace("`", "'")
    return msg[:1].lower() + msg[1:]
