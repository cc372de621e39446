"""Message-framed, unidirectional pipes whose ends survive ``os.fork()``.

The C idiom this replaces -- one ``read(fd, buf, 1024)`` and hope the whole
message arrived -- breaks as soon as a message outgrows the buffer or the
kernel hands it over in pieces. Here every message travels as one frame::

    +-------------------------------------+------------------------+
    | length: 4 bytes, unsigned, little-  | payload: exactly       |
    | endian (struct format "<I")         | ``length`` bytes       |
    +-------------------------------------+------------------------+

so the reader always knows how many bytes belong to the current message. A
length of 0 is a valid, empty message. Frames are at most ``2**32 - 1`` bytes;
each pipe enforces a smaller ``max_message_size`` on both ends, and the reader
checks the length *before* allocating, so a corrupt header cannot make it
allocate gigabytes.

Both ends wrap plain file descriptors from ``os.pipe()``: no threads, no locks,
no event loop, so they work unchanged in parent and child after ``os.fork()``.
As with any pipe, each process should close the end it does not use; the reader
sees end-of-stream only once every copy of the write end is closed. The
descriptors are non-inheritable (``O_CLOEXEC``): they survive ``fork`` but not
``exec``.

One writer process per pipe is assumed: frames of up to ``select.PIPE_BUF``
bytes (header included) are written atomically, larger ones may interleave with
another writer's. Likewise one reader per read end.

Python ignores ``SIGPIPE`` at startup, so writing to a pipe whose reader is gone
fails with ``EPIPE``, reported as :class:`~tether.errors.PeerGone`. A program
that restored ``SIG_DFL`` for ``SIGPIPE`` is killed by the kernel instead.
"""

from __future__ import annotations

import math
import os
import select
import struct
import time
from collections.abc import Iterator
from types import TracebackType
from typing import NoReturn, Self

from .errors import ConnectionClosed, EndOfStream, PayloadTooLarge, PeerGone, ProtocolError

__all__ = ["PipeReader", "PipeWriter", "pipe"]

_HEADER = struct.Struct("<I")
_MAX_FRAME = 0xFFFF_FFFF
# read(2)/write(2) move at most ~2 GiB per call; stay well below that.
_CHUNK = 1 << 30


def pipe(*, max_message_size: int = 64 * 1024 * 1024) -> tuple[PipeReader, PipeWriter]:
    """Create a framed pipe and return its ``(reader, writer)`` ends.

    Args:
        max_message_size: largest payload, in bytes, either end accepts. The
            writer refuses bigger messages; the reader treats a bigger header
            as a protocol violation rather than allocating it.

    Raises:
        ValueError: if ``max_message_size`` is negative or above ``2**32 - 1``.
        OSError: if the pipe cannot be created (e.g. out of descriptors).
    """
    if not 0 <= max_message_size <= _MAX_FRAME:
        raise ValueError(f"max_message_size must be in 0..{_MAX_FRAME}, got {max_message_size}")
    read_fd, write_fd = os.pipe()
    return PipeReader(read_fd, max_message_size), PipeWriter(write_fd, max_message_size)


class _PipeEnd:
    """What both ends share: one owned descriptor, closed exactly once."""

    def __init__(self, fd: int, max_message_size: int) -> None:
        self._fd = fd
        self._max = max_message_size

    @property
    def closed(self) -> bool:
        """Whether :meth:`close` was called (or the end closed itself after an error)."""
        return self._fd < 0

    @property
    def max_message_size(self) -> int:
        """The payload size limit this end enforces, in bytes."""
        return self._max

    def fileno(self) -> int:
        """Return the underlying descriptor, e.g. for ``select`` or ``os.dup2``.

        Raises:
            ConnectionClosed: if this end is closed.
        """
        if self._fd < 0:
            raise ConnectionClosed(f"{type(self).__name__} is closed")
        return self._fd

    def close(self) -> None:
        """Close the descriptor; calling it again does nothing."""
        fd, self._fd = self._fd, -1
        if fd >= 0:
            os.close(fd)

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "closed" if self._fd < 0 else f"fd={self._fd}"
        return f"<{type(self).__name__} {state} max_message_size={self._max}>"


class PipeWriter(_PipeEnd):
    """The write end: sends whole messages, one frame each."""

    def send(self, data: bytes | bytearray | memoryview | str) -> None:
        """Write one message completely, however many syscalls that takes.

        Header and payload go out through ``os.writev``, so a small message is
        a single syscall; after a short write the rest is sent from the exact
        offset through memoryview slices, without copying the payload. Blocks
        while the pipe is full.

        Args:
            data: the payload. Any C-contiguous buffer is accepted (bytes,
                bytearray, memoryview, array.array, ...); ``str`` is encoded
                as UTF-8.

        Raises:
            PayloadTooLarge: if the payload exceeds ``max_message_size``;
                nothing was written and the writer stays usable.
            PeerGone: if the read end is closed everywhere (``EPIPE``).
            ConnectionClosed: if this end is closed.
            TypeError: if ``data`` is neither ``str`` nor a C-contiguous buffer.
            OSError: any other failure of the write, unchanged.

        If the write fails after part of the frame went out, the writer closes
        itself: the stream cannot be resynchronised, and the reader will see a
        truncated message instead of garbage.
        """
        fd = self.fileno()
        if isinstance(data, str):
            payload = memoryview(data.encode("utf-8"))
        else:
            try:
                payload = memoryview(data).cast("B")
            except TypeError as exc:
                raise TypeError(f"cannot send {type(data).__name__}: {exc}") from exc
        size = payload.nbytes
        if size > self._max:
            raise PayloadTooLarge(
                f"message of {size} bytes exceeds max_message_size={self._max}; nothing was sent"
            )
        header = memoryview(_HEADER.pack(size))
        total, sent = _HEADER.size + size, 0
        try:
            while sent < total:
                if sent < _HEADER.size:
                    sent += os.writev(fd, [header[sent:], payload[:_CHUNK]])
                else:
                    start = sent - _HEADER.size
                    sent += os.writev(fd, [payload[start : start + _CHUNK]])
        except BrokenPipeError as exc:
            raise PeerGone(f"pipe reader closed: {exc.strerror or exc}") from exc
        finally:
            if 0 < sent < total:
                self.close()


class PipeReader(_PipeEnd):
    """The read end: returns whole messages, keeping partial ones across timeouts."""

    def __init__(self, fd: int, max_message_size: int) -> None:
        super().__init__(fd, max_message_size)
        # State of the message in progress; survives a TimeoutError.
        self._header = bytearray(_HEADER.size)
        self._header_fill = 0
        self._payload: bytearray | None = None
        self._payload_fill = 0

    def recv(self, timeout: float | None = None) -> bytes:
        """Read and return the next whole message.

        Args:
            timeout: seconds to wait for the complete message, or ``None`` to
                block. On expiry the bytes read so far stay buffered and the
                next ``recv`` continues the same message.

        Raises:
            TimeoutError: if the message was not complete within ``timeout``.
            EndOfStream: if the writer closed at a message boundary; raised
                again by every further call.
            ProtocolError: on a header above ``max_message_size`` or EOF inside
                a frame; the reader closes itself, as the stream is unusable.
            ConnectionClosed: if this end is closed.
            OSError: any failure of the underlying read, unchanged.
        """
        fd = self.fileno()
        deadline = None if timeout is None else time.monotonic() + max(timeout, 0.0)
        header = memoryview(self._header)
        while self._header_fill < _HEADER.size:
            n = self._read_into(fd, header[self._header_fill :], deadline, timeout)
            if n == 0:
                if self._header_fill == 0:
                    raise EndOfStream("pipe writer closed")
                self._fail(f"got {self._header_fill} of {_HEADER.size} header bytes")
            self._header_fill += n
        if self._payload is None:
            (size,) = _HEADER.unpack(self._header)
            if size > self._max:
                self.close()
                raise ProtocolError(
                    f"message length {size} in header exceeds max_message_size={self._max}"
                )
            self._payload = bytearray(size)
        payload = self._payload
        view = memoryview(payload)
        while self._payload_fill < len(payload):
            start = self._payload_fill
            n = self._read_into(fd, view[start : start + _CHUNK], deadline, timeout)
            if n == 0:
                self._fail(f"got {start} of {len(payload)} bytes")
            self._payload_fill += n
        self._header_fill = self._payload_fill = 0
        self._payload = None
        return bytes(payload)

    def __iter__(self) -> Iterator[bytes]:
        """Yield messages until the writer closes; stop cleanly at EndOfStream."""
        while True:
            try:
                message = self.recv()
            except EndOfStream:
                return
            yield message

    def _read_into(
        self, fd: int, buf: memoryview, deadline: float | None, timeout: float | None
    ) -> int:
        """Fill part of ``buf`` with one read, first waiting until ``deadline`` if given."""
        if deadline is not None:
            poller = select.poll()
            poller.register(fd, select.POLLIN)
            wait_ms = math.ceil(max(deadline - time.monotonic(), 0.0) * 1000)
            if not poller.poll(wait_ms):
                got = self._header_fill + self._payload_fill
                raise TimeoutError(
                    f"no complete message within {timeout} s "
                    f"({got} bytes of the current frame buffered, kept for the next recv)"
                )
        return os.readv(fd, [buf])

    def _fail(self, detail: str) -> NoReturn:
        """Close the reader and raise ProtocolError for a frame cut short by EOF."""
        self.close()
        raise ProtocolError(f"truncated message: {detail}")
