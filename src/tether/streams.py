"""Streams, sans I/O: a generator handler's items, paced by the reader's credit.

Shared by the asyncio (:mod:`tether.aio.streaming`) and blocking
(:mod:`tether.sync.peer`) layers. The frames are specified in
``docs/protocol.md`` (7.6): the caller opens a stream with STREAM (an INVOKE
that expects items) followed by CREDIT, the callee sends one ITEM per item
while it has credit and ends with RESULT (done) or ERROR (failed); CANCEL
from the caller stops it.

State is keyed by request id alone, which is connection-wide (routes share
the id space), so a route's stream uses the same tables as the peer's.

Bounds: the reader grants ``window`` items at first and gives credit back
only for items its application took, so at most ``window`` items are ever in
flight or buffered on the reading side; the producer asks its generator for
the next item only while it holds credit, so it has produced at most
``window`` items more than the application consumed. A producer that sends
more items than it was granted, or a reader that grants more than 2**32 - 1
in all, breaks the protocol.
"""

from __future__ import annotations

import collections
import inspect
from collections.abc import Callable
from typing import Any, Final

import msgspec

from .codec import ErrorInfo
from .errors import ProtocolError
from .wire import Frame

__all__ = [
    "DEFAULT_WINDOW",
    "MAX_CREDIT",
    "Inbound",
    "credit_body",
    "credit_of",
    "is_a_stream",
    "is_streaming",
    "not_a_stream",
]

#: items a reader lets be in flight at once unless ``window=`` says otherwise
DEFAULT_WINDOW: Final = 64
#: the most credit a producer may hold (and the largest ``window``)
MAX_CREDIT: Final = 0xFFFFFFFF


def is_streaming(fn: Callable[..., Any]) -> bool:
    """Whether ``fn`` is a stream handler: an async generator or generator function."""
    return inspect.isasyncgenfunction(fn) or inspect.isgeneratorfunction(fn)


def not_a_stream(channel: str) -> ErrorInfo:
    """The ERROR for STREAM on a channel whose handler returns one value."""
    return ErrorInfo(
        "stream_mismatch",
        f"channel {channel!r} answers with one value, not a stream: call invoke(), not stream()",
    )


def is_a_stream(value: Any) -> ErrorInfo | None:
    """The ERROR for INVOKE on a stream handler (it returned ``value``, a generator), else None."""
    if inspect.isgenerator(value) or inspect.isasyncgen(value):
        return ErrorInfo(
            "stream_mismatch",
            "the channel's handler is a generator, it streams: iterate stream(), not invoke()",
        )
    return None


def credit_body(n: int) -> bytes:
    """The body of a CREDIT frame granting ``n`` more items (a MessagePack uint)."""
    return msgspec.msgpack.encode(n)


def credit_of(f: Frame) -> int:
    """The items a CREDIT frame grants.

    Raises:
        ProtocolError: the body is not a MessagePack integer in 1..2**32-1.
    """
    try:
        n = msgspec.msgpack.decode(f.body, type=int)
    except msgspec.MsgspecError as exc:
        raise ProtocolError(f"malformed CREDIT: {exc}") from None
    if not 0 < n <= MAX_CREDIT:
        raise ProtocolError(f"CREDIT of {n} items: must be 1..{MAX_CREDIT}")
    return n


def check_window(window: object) -> int:
    """``window`` if it is a valid credit window (an int in 1..:data:`MAX_CREDIT`).

    Raises:
        TypeError: not an int.
        ValueError: out of range.
    """
    if type(window) is not int:
        raise TypeError(f"window must be an int, not {type(window).__name__}")
    if not 0 < window <= MAX_CREDIT:
        raise ValueError(f"window must be 1..{MAX_CREDIT}, not {window}")
    return window


class Inbound:
    """The reading side's account of one stream: items held, credit out.

    ``outstanding`` is the credit granted and not yet used by an ITEM; items
    arrive only against it. Credit goes back to the producer in batches of
    half the window, counted from items the application took.
    """

    __slots__ = ("consumed", "items", "outstanding", "window")

    def __init__(self, window: int) -> None:
        self.window = window
        self.outstanding = window  # granted by the first CREDIT
        self.consumed = 0  # taken since credit was last given back
        self.items: collections.deque[Frame] = collections.deque()

    def on_item(self, f: Frame) -> None:
        """An ITEM arrived.

        Raises:
            ProtocolError: the producer had no credit left for it.
        """
        if self.outstanding <= 0:
            raise ProtocolError(f"ITEM for stream {f.request_id} beyond the credit granted")
        self.outstanding -= 1
        self.items.append(f)

    def take(self) -> Frame:
        """The next item's frame (there must be one)."""
        self.consumed += 1
        return self.items.popleft()

    def regrant(self) -> int:
        """Credit to give back now (0: not yet): every half window taken."""
        n = self.consumed
        if n and n >= (self.window + 1) // 2:
            self.consumed = 0
            self.outstanding += n
            return n
        return 0
