"""What a call gives back: results decoded, ERROR frames turned into exceptions.

Shared by the asyncio and blocking layers, so both raise the same errors for
the same frames.
"""

from __future__ import annotations

from typing import Any, Final

import msgspec

from . import codec
from .errors import (
    BadRequest,
    Busy,
    Forbidden,
    NoHandler,
    PayloadTooLarge,
    ProtocolError,
    RemoteError,
    RouteClosed,
    TetherError,
)
from .wire import Frame

__all__ = ["DEFAULT", "DEFAULT_TIMEOUT", "decode_result", "error_from_info"]


class _Default:
    def __repr__(self) -> str:
        return "DEFAULT"


#: "use the peer's default" for ``timeout=`` (``None`` already means "forever")
DEFAULT: Final[Any] = _Default()
DEFAULT_TIMEOUT: Final = 30.0


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
    if code == "route_closed":
        return RouteClosed(info.message)
    return RemoteError(info.type or code, info.message, info.traceback)


def decode_error(frame: Frame) -> TetherError:
    """The exception an ERROR frame stands for; a malformed body is a ProtocolError."""
    try:
        return error_from_info(codec.error_decoder.decode(frame.body))
    except (msgspec.MsgspecError, RecursionError) as exc:
        return ProtocolError(f"malformed error frame: {exc}")


def decode_result(frame: Frame, result_type: Any) -> Any:
    """Decode a RESULT body; a body that is not valid MessagePack is a ProtocolError."""
    decoder = codec.any_decoder if result_type is Any else _typed_decoder(result_type)
    try:
        return codec.decode_with(decoder, frame.body, frame.attachments, frame.pickle)
    except msgspec.ValidationError as exc:
        raise BadRequest(f"result does not match {result_type!r}: {exc}") from None
    except msgspec.DecodeError as exc:
        raise ProtocolError(f"malformed result: {exc}") from None
    except RecursionError:
        raise ProtocolError("malformed result: nested too deeply") from None


_typed: dict[Any, msgspec.msgpack.Decoder[Any]] = {}


def _typed_decoder(tp: Any) -> msgspec.msgpack.Decoder[Any]:
    d = _typed.get(tp)
    if d is None:
        d = _typed[tp] = msgspec.msgpack.Decoder(tp, ext_hook=codec.ext_hook)
    return d
