"""A non-blocking socket driven by the event loop: bytes and descriptors, no frames.

This is the transport under an asyncio :class:`~tether.Peer`. It only moves
bytes, and on unix sockets file descriptors with ``SCM_RIGHTS``; the peer
decides what they mean. Owning the socket (rather than using an asyncio
transport) is what makes descriptor passing possible, and keeps the read and
write paths to one syscall each.
"""

from __future__ import annotations

import array
import asyncio
import collections
import contextlib
import os
import socket
import ssl
import threading
from collections.abc import Callable, Iterable
from typing import Final, Protocol

from ..errors import ProtocolError, TetherError

__all__ = ["AGAIN", "SocketStream", "Stream", "close_all", "tls_handshake"]

READ_SIZE: Final = 256 * 1024
_ANC_SPACE: Final = socket.CMSG_SPACE(253 * 4)  # SCM_MAX_FD descriptors
_SCM: Final = (socket.SOL_SOCKET, socket.SCM_RIGHTS)
#: bytes a queued descriptor counts for in :attr:`SocketStream.buffered`: each one pins an
#: entry of this process's descriptor table, so senders wait (at the peer's high water)
#: once ~256 are queued, not once 4 MiB of ~50-byte frames carrying them are
FD_QUEUED_SIZE: Final = 16 * 1024
_local = threading.local()
#: "try again later" from a non-blocking socket, plain or TLS (``ssl.SSLSocket``)
AGAIN: Final = (BlockingIOError, InterruptedError, ssl.SSLWantReadError, ssl.SSLWantWriteError)


def _read_buffer() -> tuple[bytearray, memoryview, list[bytearray]]:
    """This thread's read buffer, shared by every stream its loop drives.

    A read fills it and copies out only what arrived before returning, so
    streams never hold on to it; one buffer per connection would cost each
    idle connection 256 KiB.
    """
    try:
        buf: tuple[bytearray, memoryview, list[bytearray]] = _local.buf
    except AttributeError:
        b = bytearray(READ_SIZE)
        buf = _local.buf = (b, memoryview(b), [b])
    return buf


def _ignore(*args: object) -> None:
    """Stands in for a closed stream's callbacks, so it keeps no peer alive."""


def close_all(fds: Iterable[int]) -> None:
    """Close descriptors, ignoring those already closed."""
    for fd in fds:
        with contextlib.suppress(OSError):
            os.close(fd)


class Stream(Protocol):
    """What a :class:`~tether.Peer` needs of its transport: bytes in and out, and back-pressure.

    :class:`SocketStream` is the one for sockets; :mod:`tether.web` has one
    for WebSockets. The peer calls :meth:`attach` once (a SocketStream gets
    its callbacks when made), then :meth:`start`.
    """

    #: whether file descriptors can ride along (unix sockets only)
    unix: bool
    #: bytes accepted by :meth:`write` and not yet handed to the OS
    buffered: int

    def attach(self, on_readable: Callable[[], None], on_error: Callable[[OSError], None]) -> None:
        """Set the callbacks: bytes (or EOF) can be read; a queued write failed."""

    def fileno(self) -> int:
        """The underlying socket's descriptor (-1 once closed)."""

    def start(self) -> None:
        """Start (or resume) calling ``on_readable`` when there is something to read."""

    def stop_reading(self) -> None:
        """Stop reading until :meth:`start`: the other side is pushed back on."""

    def recv(self, on_fds: Callable[[array.array[int]], None]) -> bytes | None:
        """The bytes that arrived, ``b""`` at EOF, ``None`` if none yet."""

    def write(self, data: bytearray, fds: list[int] | None = None) -> bool:
        """Send ``data`` (whole frames), queueing what cannot go now; True if all went."""

    async def drain(self, low: int) -> None:
        """Wait until at most ``low`` bytes are queued."""

    def close(self, exc: TetherError) -> None:
        """Close the transport now and drop what is queued; drain waiters get ``exc``."""


class DrainWaiters:
    """Futures waiting for a message-based stream's queue to shrink to their ``low`` mark.

    Shared by the WebSocket and NATS streams, whose writers empty the queue one
    message at a time: :meth:`wake` after each, :meth:`fail` when the stream closes.
    """

    __slots__ = ("_loop", "_waiting")

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._waiting: list[tuple[int, asyncio.Future[None]]] = []

    async def wait(self, low: int, queued: Callable[[], int], open_: Callable[[], bool]) -> None:
        """Return once ``queued()`` is at most ``low`` (or the stream closed, or failed)."""
        while queued() > low and open_():
            w = self._loop.create_future()
            self._waiting.append((low, w))
            await w

    def wake(self, buffered: int) -> None:
        """Wake every waiter whose mark ``buffered`` has reached."""
        if self._waiting:
            keep = []
            for low, w in self._waiting:
                if buffered > low:
                    keep.append((low, w))
                elif not w.done():
                    w.set_result(None)
            self._waiting = keep

    def fail(self, exc: BaseException) -> None:
        """The stream closed: every waiter gets ``exc``."""
        waiting, self._waiting = self._waiting, []
        for _, w in waiting:
            if not w.done():
                w.set_exception(exc)


class SocketStream:
    """One connected socket, read when readable and written without blocking.

    Args:
        on_readable: called by the loop when bytes (or EOF) can be read.
        on_error: called when a write the loop retried later failed.
        low_water: :meth:`drain` waiters wake once the queue is this small.
    """

    def __init__(
        self,
        sock: socket.socket,
        loop: asyncio.AbstractEventLoop,
        on_readable: Callable[[], None],
        on_error: Callable[[OSError], None],
        low_water: int,
    ) -> None:
        sock.setblocking(False)
        self.sock = sock
        self.fd = sock.fileno()
        #: a unix socket: descriptors can ride along
        self.unix = sock.family == socket.AF_UNIX
        #: TLS (an ``ssl.SSLSocket`` whose handshake is done): no ``sendmsg``
        self.tls = isinstance(sock, ssl.SSLSocket)
        self._loop = loop
        self._on_readable = on_readable
        self._on_error = on_error
        self._low = low_water
        # Reads go into the thread's reused buffer and only what arrived is
        # copied out: a fresh 256 KiB allocation per read costs more than a
        # round trip, and a buffer per connection costs an idle one 256 KiB.
        self._rbuf, self._rview, self._rbufs = _read_buffer()
        # Unsent chunks (made on first use: most writes go out at once); an
        # empty chunk stands for the next entry of _wfds, whose descriptors
        # must ride on its first byte.
        self._wbuf: collections.deque[memoryview] | None = None
        self._wfds: collections.deque[tuple[memoryview, list[int]]] | None = None
        #: bytes accepted by :meth:`write` and not yet taken by the kernel
        self.buffered = 0
        self._writing = False
        self._reading = False
        self._drain_waiters: list[asyncio.Future[None]] = []
        self._closed = False

    def attach(self, on_readable: Callable[[], None], on_error: Callable[[OSError], None]) -> None:
        self._on_readable = on_readable
        self._on_error = on_error

    def fileno(self) -> int:
        return self.sock.fileno()

    def start(self) -> None:
        """Start watching for readability."""
        if not self._reading and not self._closed:
            self._reading = True
            self._loop.add_reader(self.fd, self._on_readable)

    def stop_reading(self) -> None:
        if self._reading:
            self._reading = False
            self._loop.remove_reader(self.fd)

    # -- reading ----------------------------------------------------------

    def recv(self, on_fds: Callable[[array.array[int]], None]) -> bytes | None:
        """One read: the bytes that arrived, ``b""`` at EOF, ``None`` if none yet.

        Descriptors that came along go to ``on_fds`` before the bytes are returned.

        Raises:
            OSError: the read failed (the connection is broken).
            ProtocolError: more descriptors arrived than fit (they are closed).
        """
        try:
            if self.unix:
                n, anc, flags, _ = self.sock.recvmsg_into(self._rbufs, _ANC_SPACE)
                if anc:
                    fds = array.array("i")
                    for level, kind, cdata in anc:
                        if (level, kind) == _SCM:
                            fds.frombytes(cdata[: len(cdata) - len(cdata) % fds.itemsize])
                    if flags & socket.MSG_CTRUNC:
                        close_all(fds)
                        raise ProtocolError("too many file descriptors in one message")
                    on_fds(fds)
            else:
                n = self.sock.recv_into(self._rbuf)
        except AGAIN:
            return None
        return self._rview[:n].tobytes()

    # -- writing ----------------------------------------------------------

    def write(self, data: bytearray, fds: list[int] | None = None) -> bool:
        """Write ``data`` now, or queue what the socket does not take.

        ``fds`` ride on the first byte of ``data``; they are closed here once
        sent (or when the stream closes). Returns True if everything went out.

        Raises:
            OSError: the write failed (the connection is broken).
        """
        if fds:
            return self._write_fds(data, fds)
        if self._wbuf:
            self._queue(memoryview(data))
            return False
        try:
            n = self.sock.send(data)
        except AGAIN:
            n = 0
        if n == len(data):
            return True
        self._queue(memoryview(data)[n:])
        return False

    def _write_fds(self, data: bytearray, fds: list[int]) -> bool:
        if not self._wbuf:
            try:
                n = self.sock.sendmsg([data], [(*_SCM, array.array("i", fds))])
            except AGAIN:
                n = 0
            except OSError:
                close_all(fds)
                raise
            if n:
                close_all(fds)
                if n == len(data):
                    return True
                self._queue(memoryview(data)[n:])
                return False
        if self._wfds is None:
            self._wfds = collections.deque()
        self._wfds.append((memoryview(data), fds))
        self._queue(memoryview(b""), len(data) + len(fds) * FD_QUEUED_SIZE)
        return False

    def _queue(self, chunk: memoryview, size: int | None = None) -> None:
        if self._wbuf is None:
            self._wbuf = collections.deque()
        self._wbuf.append(chunk)
        self.buffered += len(chunk) if size is None else size
        if not self._writing:
            self._writing = True
            self._loop.add_writer(self.fd, self._on_writable)

    def _on_writable(self) -> None:
        try:
            self._write_queued()
        except OSError as exc:
            self._on_error(exc)

    def _write_queued(self) -> None:
        wbuf = self._wbuf
        if not wbuf:
            return
        if not wbuf[0]:
            assert self._wfds is not None
            data, fds = self._wfds[0]
            try:
                n = self.sock.sendmsg([data], [(*_SCM, array.array("i", fds))])
            except AGAIN:
                return
            self._wfds.popleft()
            close_all(fds)
            self.buffered -= n + len(fds) * FD_QUEUED_SIZE
            if n < len(data):
                wbuf[0] = data[n:]
            else:
                wbuf.popleft()
        else:
            chunks: list[memoryview] = []
            for c in wbuf:
                if not c or len(chunks) >= 512:
                    break
                chunks.append(c)
            try:
                n = self.sock.send(chunks[0]) if self.tls else self.sock.sendmsg(chunks)
            except AGAIN:
                return
            self.buffered -= n
            while n:
                head = wbuf[0]
                if len(head) <= n:
                    n -= len(head)
                    wbuf.popleft()
                else:
                    wbuf[0] = head[n:]
                    n = 0
        if not wbuf:
            self._wbuf = self._wfds = None  # an idle connection keeps no queues
            self._writing = False
            self._loop.remove_writer(self.fd)
        if self._drain_waiters and self.buffered <= self._low:
            waiters, self._drain_waiters = self._drain_waiters, []
            for w in waiters:
                if not w.done():
                    w.set_result(None)

    async def drain(self, low: int) -> None:
        """Wait until at most ``low`` bytes are queued (woken at low water)."""
        while self.buffered > low and not self._closed:
            w = self._loop.create_future()
            self._drain_waiters.append(w)
            await w

    # -- ending -----------------------------------------------------------

    def close(self, exc: TetherError) -> None:
        """Stop watching, close the socket, drop what is queued; waiters get ``exc``."""
        if self._closed:
            return
        self._closed = True
        self.stop_reading()
        if self._writing:
            self._writing = False
            self._loop.remove_writer(self.fd)
        self.sock.close()
        if self._wfds is not None:
            for _, fds in self._wfds:
                close_all(fds)
        self._wbuf = self._wfds = None
        self.buffered = 0
        # The callbacks are the peer's bound methods: dropping them leaves no
        # cycle, so a closed peer is freed at once, without the cyclic GC.
        self._on_readable = self._on_error = _ignore
        waiters, self._drain_waiters = self._drain_waiters, []
        for w in waiters:
            if not w.done():
                w.set_exception(exc)


async def tls_handshake(
    sock: ssl.SSLSocket, loop: asyncio.AbstractEventLoop, timeout: float
) -> None:
    """Run the TLS handshake of a non-blocking ``SSLSocket`` on the loop, within ``timeout``.

    Done before a :class:`SocketStream` owns the socket, so the stream only
    ever sees application bytes (``SSLSocket.recv_into``/``send``).

    Raises:
        TimeoutError: the handshake did not finish in time.
        ssl.SSLError, OSError: it failed (bad certificate, wrong CA, reset...).
    """
    fd = sock.fileno()
    async with asyncio.timeout(timeout):
        while True:
            try:
                sock.do_handshake()
                return
            except ssl.SSLWantReadError:
                add, remove = loop.add_reader, loop.remove_reader
            except ssl.SSLWantWriteError:
                add, remove = loop.add_writer, loop.remove_writer
            ready = loop.create_future()
            add(fd, ready.set_result, None)
            try:
                await ready
            finally:
                remove(fd)
