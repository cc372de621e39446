"""What a call gives back: results decoded, ERROR frames turned into exceptions.

Shared by the asyncio and blocking layers, so both raise the same errors for
the same frames.
"""

from __future__ import annotations

import math
from typing import Any, Final

import msgspec

from . import codec
from .errors import (
    BadRequest,
    Busy,
    Forbidden,
    NoHandler,
    PayloadTooLarge,
    PeerGone,
    ProtocolError,
    RemoteError,
    RouteClosed,
    StreamMismatch,
    TetherError,
)
from .shm import consume_all
from .wire import Frame

__all__ = [
    "DEFAULT",
    "DEFAULT_TIMEOUT",
    "checked_timeout",
    "decode_result",
    "error_from_info",
    "timeout_message",
]


class _Default:
    def __repr__(self) -> str:
        return "DEFAULT"


#: "use the peer's default" for ``timeout=`` (``None`` already means "forever")
DEFAULT: Final[Any] = _Default()
DEFAULT_TIMEOUT: Final = 30.0


def checked_timeout(timeout: object, args: tuple[Any, ...] = ()) -> float | None:
    """An invoke's ``timeout`` as seconds (``None``, or ``inf``: wait forever).

    Called only when the fast check fails (not a finite int or float >= 0), so a
    valid float costs the invoke nothing more. On error ``args`` are
    consumed, as by any failed send (their Buffers are moved).

    Raises:
        TypeError: ``timeout`` is not a number.
        ValueError: it is negative or NaN.
    """
    if timeout is None:
        return None
    if isinstance(timeout, bool) or not isinstance(timeout, int | float):
        consume_all(args)
        raise TypeError(
            f"timeout must be a number of seconds or None, not {type(timeout).__name__}: "
            f"{timeout!r}"
        )
    if timeout == math.inf:
        return None
    if not timeout >= 0:  # also NaN
        consume_all(args)
        raise ValueError(f"timeout must be >= 0 seconds (or None: no limit), not {timeout!r}")
    return float(timeout)


def timeout_message(channel: str, timeout: float, default: bool) -> str:
    """What an expired invoke says; when the timeout was the peer's default, how to change it."""
    text = f"no answer on {channel!r} within {timeout} s"
    if default:
        text += (
            " (the default timeout: pass timeout= to invoke(), or to Main()/connect() for "
            "every call; None waits forever)"
        )
    return text


def error_from_info(info: codec.ErrorInfo) -> TetherError:
    """Turn an ERROR frame's body into the exception the caller sees."""
    code = info.code
    if code == "no_handler":
        return NoHandler(info.message)
    if code == "forbidden":
        return Forbidden(info.message)
    if code == "bad_request":
        return BadRequest(info.message, info.path)
    if code == "too_large":
        return PayloadTooLarge(info.message)
    if code == "busy":
        return Busy(info.message)
    if code == "stream_mismatch":
        return StreamMismatch(info.message)
    if code == "route_closed":
        return RouteClosed(info.message)
    if code == "closed":
        return PeerGone(info.message)
    return RemoteError(info.type or code, info.message, info.traceback)


def decode_error(frame: Frame) -> TetherError:
    """The exception an ERROR frame stands for; a malformed body is a ProtocolError."""
    try:
        return error_from_info(codec.error_decoder.decode(frame.body))
    except (msgspec.MsgspecError, RecursionError) as exc:
        return ProtocolError(f"malformed error frame: {exc}")


def decode_result(frame: Frame, result_type: Any, what: str = "result") -> Any:
    """Decode a RESULT body; a body that is not valid MessagePack is a ProtocolError.

    ``what`` names the value in errors (``"item"`` for a stream's ITEM).

    ``result_type`` ``bytes``/``bytearray`` gives that type at every size
    (large results arrive as views of an attachment); ``memoryview`` or
    :class:`tether.Buffer` a read-only view.
    """
    target = None if result_type is Any else codec.buffer_target(result_type)
    if result_type is Any or target is not None:
        decoder = codec.any_decoder
    else:
        decoder = _typed_decoder(result_type)
    try:
        try:
            value = codec.decode_with(decoder, frame.body, frame.attachments, frame.pickle)
        except msgspec.ValidationError as exc:
            if not (frame.attachments and codec.EXT_MISMATCH in str(exc)):
                raise
            # a large buffer nested in the typed result: the slow way (see codec)
            value = codec.nested_buffers(decoder, frame.body, frame.attachments, frame.pickle, exc)
    except msgspec.ValidationError as exc:
        msg, _, where = str(exc).rpartition(" - at `")
        if not msg:
            msg, where = str(exc), "$`"
        path = what + where.rstrip("`")[1:]
        raise BadRequest(
            f"{path} does not match {_type_name(result_type)}: {codec.python_words(msg)}",
            path=path,
        ) from None
    except msgspec.DecodeError as exc:
        raise ProtocolError(f"malformed {what}: {codec.malformed(frame.body, exc)}") from None
    except RecursionError:
        raise ProtocolError(f"malformed {what}: nested too deeply") from None
    if target is not None:  # a buffer type: the same type at every size (see ArgsSpec)
        if not isinstance(value, (bytes, bytearray, memoryview)):
            raise BadRequest(
                f"{what} does not match {_type_name(result_type)}: expected {target.__name__}, "
                f"got {type(value).__name__}"
            )
        return codec.as_buffer(value, target)
    return value


def _type_name(tp: Any) -> str:
    return tp.__name__ if isinstance(tp, type) else repr(tp)  # list[int] reads as list[int]


_typed: dict[Any, msgspec.msgpack.Decoder[Any]] = {}


def _typed_decoder(tp: Any) -> msgspec.msgpack.Decoder[Any]:
    d = _typed.get(tp)
    if d is None:
        d = _typed[tp] = msgspec.msgpack.Decoder(tp, ext_hook=codec.ext_hook)
    return d
