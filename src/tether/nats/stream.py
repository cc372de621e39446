"""One tether connection carried by NATS messages: a :class:`~tether.aio.stream.Stream`.

Each side subscribes to its own subject and publishes to the other's. A
message holds whole tether frames (several, when they fit under the
server's ``max_payload``); NATS keeps one publisher's messages on one
subject in order, so the two subjects behave as the byte stream a
:class:`~tether.Peer` expects. An empty message is the end of the stream
(the other side closed).
"""

from __future__ import annotations

import array
import asyncio
import collections
import contextlib
import struct
from collections.abc import Callable
from typing import Any, Final

from ..aio.stream import DrainWaiters
from ..errors import PayloadTooLarge, TetherError

__all__ = ["NatsStream", "spawn"]

_SIZE: Final = struct.Struct("<I")
_tasks: set[asyncio.Task[Any]] = set()


def spawn(coro: Any) -> None:
    """Run ``coro`` in the background, held until it ends."""
    task = asyncio.get_running_loop().create_task(coro)
    _tasks.add(task)
    task.add_done_callback(_tasks.discard)


def _ignore(*args: object) -> None:
    """Stands in for the peer's callbacks once the stream is closed."""


class NatsStream:
    """Frames to ``subject`` through the NATS client ``nc``, frames in through :meth:`feed`.

    Args:
        nc: a connected ``nats.aio.client.Client``.
        subject: where the other side reads (``None`` until it is known).
        max_payload: the server's ``max_payload``; no message is larger.
    """

    unix = False

    def __init__(self, nc: Any, subject: str | None, max_payload: int) -> None:
        self._nc = nc
        self.subject = subject
        self._max = max_payload
        self._loop = asyncio.get_running_loop()
        self._on_readable: Callable[[], None] = _ignore
        self._on_error: Callable[[OSError], None] = _ignore
        self._inbox: collections.deque[bytes] = collections.deque()
        self._eof = False
        self._reading = False
        self._outbox: collections.deque[bytes] = collections.deque()
        self._wake = asyncio.Event()
        #: bytes accepted by :meth:`write` and not yet handed to the NATS client
        self.buffered = 0
        self._drain_waiters = DrainWaiters(self._loop)
        self.closed_with: TetherError | None = None
        self._writer = self._loop.create_task(self._write_messages())

    def attach(self, on_readable: Callable[[], None], on_error: Callable[[OSError], None]) -> None:
        self._on_readable = on_readable
        self._on_error = on_error

    def fileno(self) -> int:
        return -1

    def start(self) -> None:
        if self.closed_with is None:
            self._reading = True
            if self._inbox or self._eof:
                self._loop.call_soon(self._readable)

    def stop_reading(self) -> None:
        self._reading = False

    def _readable(self) -> None:
        if self._reading and self.closed_with is None:
            self._on_readable()

    def feed(self, data: bytes) -> None:
        """A message arrived for this side (empty: the other side closed)."""
        if self.closed_with is not None or self._eof:
            return
        if data:
            self._inbox.append(data)
        else:
            self._eof = True
        self._readable()

    def recv(self, on_fds: Callable[[array.array[int]], None]) -> bytes | None:
        inbox = self._inbox
        if inbox:
            data = inbox.popleft() if len(inbox) == 1 else b"".join(inbox)
            inbox.clear()
            if self._eof:
                self._loop.call_soon(self._readable)
            return data
        return b"" if self._eof else None

    def write(self, data: bytearray, fds: list[int] | None = None) -> bool:
        """Queue ``data`` (whole frames), grouped into messages of at most ``max_payload``.

        Raises:
            PayloadTooLarge: descriptors were passed (they never cross NATS).
        """
        if fds:
            raise PayloadTooLarge("file descriptors and Handles cannot cross NATS")
        if self.closed_with is not None:
            return False
        view = memoryview(data)
        i, n, start, limit = 0, len(data), 0, self._max
        while i < n:
            end = i + 4 + _SIZE.unpack_from(view, i)[0]
            if end - start > limit and i > start:
                self._outbox.append(bytes(view[start:i]))
                start = i
            i = end
        self._outbox.append(bytes(view[start:n]))
        self.buffered += n
        self._wake.set()
        return False

    async def _write_messages(self) -> None:
        outbox = self._outbox
        while True:
            await self._wake.wait()
            self._wake.clear()
            while outbox and self.subject is not None:
                message = outbox.popleft()
                try:
                    await self._nc.publish(self.subject, message)
                except Exception as exc:  # the NATS client closed for good
                    self._on_error(ConnectionResetError(f"NATS: {exc}"))
                    return
                self.buffered -= len(message)
                self._drain_waiters.wake(self.buffered)

    async def drain(self, low: int) -> None:
        await self._drain_waiters.wait(low, lambda: self.buffered, lambda: self.closed_with is None)

    def set_subject(self, subject: str) -> None:
        """The other side's subject became known: send what waited for it."""
        self.subject = subject
        self._wake.set()

    def close(self, exc: TetherError) -> None:
        """Stop now; the other side learns it from an empty message (once the queue went)."""
        if self.closed_with is not None:
            return
        self.closed_with = exc
        self._on_readable = self._on_error = _ignore
        self._reading = False
        self._writer.cancel()
        queued, self._outbox = list(self._outbox), collections.deque()
        self.buffered = 0
        self._drain_waiters.fail(exc)
        subject, nc = self.subject, self._nc
        if subject is not None and not nc.is_closed:
            spawn(_say_end(nc, subject, queued))


async def _say_end(nc: Any, subject: str, queued: list[bytes]) -> None:
    """Send what was queued (a GOODBYE, typically), then the empty end-of-stream message."""
    with contextlib.suppress(Exception):
        for message in queued:
            await nc.publish(subject, message)
        await nc.publish(subject, b"")
