"""One WebSocket as a tether transport: each binary message carries exactly one frame.

:class:`WebSocketStream` gives a :class:`~tether.Peer` the same
:class:`~tether.aio.stream.Stream` a socket does, over a ``websockets``
server connection. Inbound, every message is checked to be one whole frame
(its length field equal to the message's length less 4; a text message, a
message that is not one frame, or one larger than ``max_frame_size`` is a
:class:`~tether.ProtocolError`), then handed to the peer as bytes. Outbound,
the bytes the peer writes (whole frames) are cut back into one message per
frame. No descriptors ever cross.

Back-pressure works as on a socket: :meth:`stop_reading` stops taking
messages from websockets (whose small queue then stops reading the TCP
socket), and :attr:`buffered` counts what websockets has not taken yet.
"""

from __future__ import annotations

import array
import asyncio
import collections
import contextlib
import struct
from collections.abc import Callable
from typing import Final

from websockets.asyncio.server import ServerConnection
from websockets.exceptions import ConnectionClosed as WsClosed
from websockets.frames import CloseCode

from ..aio.stream import DrainWaiters
from ..errors import PayloadTooLarge, ProtocolError, TetherError
from ..wire import HEADER_SIZE

__all__ = ["WebSocketStream"]

_SIZE: Final = struct.Struct("<I")
#: close codes websockets sends when the other side broke the WebSocket protocol
_BROKEN: Final = frozenset(
    (CloseCode.PROTOCOL_ERROR, CloseCode.UNSUPPORTED_DATA, CloseCode.INVALID_DATA)
)


def _ignore(*args: object) -> None:
    """Stands in for the peer's callbacks once the stream is closed."""


class WebSocketStream:
    """A ``websockets`` server connection as a :class:`~tether.aio.stream.Stream`.

    Args:
        ws: the connection, its opening handshake done.
        max_frame_size: the largest frame accepted (websockets itself refuses
            larger messages with close code 1009, which ends up here as a
            :class:`~tether.ProtocolError` too).
    """

    unix = False

    def __init__(self, ws: ServerConnection, max_frame_size: int) -> None:
        self._ws = ws
        self._loop = asyncio.get_running_loop()
        self._max = max_frame_size
        self._on_readable: Callable[[], None] = _ignore
        self._on_error: Callable[[OSError], None] = _ignore
        self._inbox: collections.deque[bytes] = collections.deque()
        self._failed: TetherError | None = None  # why reading ended badly (after the inbox)
        self._eof = False
        self._reading = asyncio.Event()
        self._outbox: collections.deque[memoryview] = collections.deque()
        self._wake_writer = asyncio.Event()
        #: bytes accepted by :meth:`write` and not yet taken by websockets
        self.buffered = 0
        self._drain_waiters = DrainWaiters(self._loop)
        #: why the stream closed, once it did (the WebSocket close code follows from it)
        self.closed_with: TetherError | None = None
        #: the close code and reason to send instead of the one closed_with implies
        self.close_as: tuple[int, str] | None = None
        self._closed = asyncio.Event()
        sock = ws.transport.get_extra_info("socket")
        self._fd = sock.fileno() if sock is not None else -1
        self._tasks = [
            self._loop.create_task(self._read_messages()),
            self._loop.create_task(self._write_messages()),
        ]

    def attach(self, on_readable: Callable[[], None], on_error: Callable[[OSError], None]) -> None:
        self._on_readable = on_readable
        self._on_error = on_error

    def fileno(self) -> int:
        return -1 if self.closed_with is not None else self._fd

    def start(self) -> None:
        if self.closed_with is None:
            self._reading.set()
            if self._inbox or self._eof:
                self._loop.call_soon(self._readable)

    def stop_reading(self) -> None:
        self._reading.clear()

    def _readable(self) -> None:
        if self._reading.is_set() and self.closed_with is None:
            self._on_readable()

    # -- reading ----------------------------------------------------------

    async def _read_messages(self) -> None:
        ws = self._ws
        try:
            while True:
                await self._reading.wait()
                message = await ws.recv()
                if isinstance(message, str):
                    raise ProtocolError("a text WebSocket message: frames travel in binary ones")
                self._check(message)
                self._inbox.append(message)
                self._readable()
        except WsClosed as exc:
            code = exc.sent.code if exc.sent is not None else None
            if code == CloseCode.MESSAGE_TOO_BIG:
                self._failed = ProtocolError(
                    f"a WebSocket message larger than max_frame_size ({self._max} bytes)"
                )
            elif code in _BROKEN:
                self._failed = ProtocolError(f"broke the WebSocket protocol: {exc}")
            self._eof = True
        except ProtocolError as exc:
            self._failed = exc
        self._readable()

    def _check(self, message: bytes) -> None:
        """Exactly one frame: its length field says the message's length, less 4."""
        n = len(message)
        if n < HEADER_SIZE:
            raise ProtocolError(f"a WebSocket message of {n} bytes: shorter than a frame header")
        size = _SIZE.unpack_from(message)[0]
        if size + 4 != n:
            raise ProtocolError(
                f"a WebSocket message of {n} bytes holding a frame of {size + 4}: "
                "each message carries exactly one frame"
            )

    def recv(self, on_fds: Callable[[array.array[int]], None]) -> bytes | None:
        """The frames that arrived, ``b""`` once the WebSocket closed, ``None`` if none yet.

        Raises:
            ProtocolError: a message was not one frame (after the frames before it).
        """
        inbox = self._inbox
        if inbox:
            data = inbox.popleft() if len(inbox) == 1 else b"".join(inbox)
            inbox.clear()
            if self._failed is not None or self._eof:
                self._loop.call_soon(self._readable)  # then say how it ended
            return data
        if self._failed is not None:
            raise self._failed
        if self._eof:
            return b""
        return None

    # -- writing ----------------------------------------------------------

    def write(self, data: bytearray, fds: list[int] | None = None) -> bool:
        """Queue ``data`` (whole frames) as one message per frame.

        Raises:
            PayloadTooLarge: descriptors were passed (they never cross a WebSocket).
        """
        if fds:
            raise PayloadTooLarge("file descriptors cannot cross a WebSocket")
        if self.closed_with is not None:
            return False
        view = memoryview(data)
        i, n = 0, len(data)
        while i < n:
            end = i + 4 + _SIZE.unpack_from(view, i)[0]
            self._outbox.append(view[i:end])
            i = end
        self.buffered += n
        self._wake_writer.set()
        return False

    async def _write_messages(self) -> None:
        outbox = self._outbox
        while True:
            await self._wake_writer.wait()
            self._wake_writer.clear()
            while outbox:
                message = outbox.popleft()
                try:
                    await self._ws.send(message)
                except WsClosed as exc:
                    self._on_error(ConnectionResetError(f"WebSocket closed: {exc}"))
                    return
                self.buffered -= len(message)
                self._drain_waiters.wake(self.buffered)

    async def drain(self, low: int) -> None:
        await self._drain_waiters.wait(low, lambda: self.buffered, lambda: self.closed_with is None)

    # -- ending -----------------------------------------------------------

    def close(self, exc: TetherError) -> None:
        """Stop now; the WebSocket itself is closed by :meth:`finish` (it must be awaited)."""
        if self.closed_with is not None:
            return
        self.closed_with = exc
        self._on_readable = self._on_error = _ignore
        self._reading.clear()
        self._outbox.clear()
        self.buffered = 0
        for task in self._tasks:
            task.cancel()
        self._drain_waiters.fail(exc)
        self._closed.set()

    async def finish(self) -> None:
        """Wait until the peer closed the stream, then close the WebSocket with a fitting code.

        :attr:`close_as` if set (1013 for a page dropped to make room), 1002
        (protocol error) for a peer that broke the tether protocol, 1000
        otherwise. Bounded by websockets' own ``close_timeout``.
        """
        await self._closed.wait()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        if self.close_as is not None:
            await self._ws.close(*self.close_as)
        elif isinstance(self.closed_with, ProtocolError):
            await self._ws.close(CloseCode.PROTOCOL_ERROR, "tether protocol error")
        else:
            await self._ws.close()
