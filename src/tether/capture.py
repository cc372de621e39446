"""A child's stdout and stderr, captured by main: ``spawn(..., capture=True)``.

The child's descriptors 1 and 2 become sockets whose other ends main reads
on its loop as the output arrives, so a child never blocks on a full pipe
that nobody reads (as long as main's loop runs). Main keeps the *last*
lines only: at most :data:`MAX_BYTES` of text per stream, older lines
dropped first (counted in :attr:`Output.dropped`), each line cut at
:data:`MAX_LINE` characters. Memory stays bounded however much a child
prints; register :meth:`Output.on_line` to see every line as it comes.

Output written while Python starts the child, before tether's code runs in
it, still goes to main's stdout/stderr.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import io
import os
import socket
import sys
from collections.abc import Callable
from typing import Final

__all__ = ["MAX_BYTES", "MAX_LINE", "Output", "redirect"]

#: characters of text kept per stream (the last lines)
MAX_BYTES: Final = 1 << 20
#: longest line kept whole; longer ones are split at this length
MAX_LINE: Final = 64 * 1024
_READ: Final = 64 * 1024


class Output:
    """The text a child wrote to one stream (``stdout`` or ``stderr``), line by line.

    Attributes:
        name: ``"stdout"`` or ``"stderr"``.
        dropped: older lines dropped to stay within :data:`MAX_BYTES`.
    """

    def __init__(self, name: str, sock: socket.socket) -> None:
        self.name = name
        self.dropped = 0
        self._sock: socket.socket | None = sock
        self._lines: collections.deque[str] = collections.deque()
        self._size = 0
        self._partial = bytearray()
        self._callbacks: list[Callable[[str], object]] = []
        self._eof = asyncio.get_running_loop().create_future()
        sock.setblocking(False)
        self._loop = asyncio.get_running_loop()
        self._loop.add_reader(sock.fileno(), self._read)

    def lines(self) -> list[str]:
        """The lines kept so far (without their newlines), oldest first."""
        return list(self._lines)

    @property
    def text(self) -> str:
        """The lines kept so far, joined: the stream's tail as text."""
        return "".join(line + "\n" for line in self._lines)

    def on_line(self, fn: Callable[[str], object]) -> None:
        """Call ``fn(line)`` for every line from now on, as it arrives (on main's loop)."""
        self._callbacks.append(fn)

    @property
    def closed(self) -> bool:
        """Whether the stream has ended (the child closed it, or exited)."""
        return self._sock is None

    async def wait_closed(self, timeout: float | None = None) -> None:
        """Wait until the child's end is closed (it exited): every line is then in.

        Raises:
            TimeoutError: still open after ``timeout`` seconds.
        """
        await asyncio.wait_for(asyncio.shield(self._eof), timeout)

    def _read(self) -> None:
        sock = self._sock
        if sock is None:
            return
        for _ in range(16):  # bounded per turn of the loop: other work goes on
            try:
                data = sock.recv(_READ)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                data = b""
            if not data:
                self.close()
                return
            self._feed(data)

    def _feed(self, data: bytes) -> None:
        buf = self._partial
        buf += data
        start = 0
        while True:
            end = buf.find(b"\n", start)
            if end < 0:
                break
            self._add(bytes(buf[start:end]))
            start = end + 1
        del buf[:start]
        while len(buf) >= MAX_LINE:  # a line without end: split, never grow unbounded
            self._add(bytes(buf[:MAX_LINE]))
            del buf[:MAX_LINE]

    def _add(self, raw: bytes) -> None:
        line = raw.decode("utf-8", "replace").removesuffix("\r")[:MAX_LINE]
        self._lines.append(line)
        self._size += len(line) + 1
        while self._size > MAX_BYTES and self._lines:
            self._size -= len(self._lines.popleft()) + 1
            self.dropped += 1
        for fn in list(self._callbacks):
            try:
                fn(line)
            except Exception:  # a callback's bug must not stop the capture
                self._loop.call_exception_handler(
                    {
                        "message": f"error in an on_line callback of {self!r}",
                        "exception": sys.exc_info()[1],
                    }
                )

    def drain(self) -> None:
        """Read what is left without blocking (the child exited), then close."""
        if self._sock is not None:
            self._read()
        self.close()

    def close(self) -> None:
        """Stop reading; a partial last line is kept."""
        if self._sock is None:
            return
        if self._partial:
            self._add(bytes(self._partial))
            self._partial.clear()
        sock, self._sock = self._sock, None
        with contextlib.suppress(OSError, ValueError):
            self._loop.remove_reader(sock.fileno())
        sock.close()
        if not self._eof.done():
            self._eof.set_result(None)

    def __repr__(self) -> str:
        return f"<Output {self.name} lines={len(self._lines)}{' closed' if self.closed else ''}>"


def redirect(stdout: socket.socket, stderr: socket.socket) -> None:
    """In the child: make descriptors 1 and 2 these sockets, with line-buffered text streams."""
    for stream in (sys.stdout, sys.stderr):  # what was written before goes where it was meant
        with contextlib.suppress(AttributeError, ValueError, OSError):
            stream.flush()
    os.dup2(stdout.fileno(), 1)
    os.dup2(stderr.fileno(), 2)
    stdout.close()
    stderr.close()
    # sys.stdout may write elsewhere than descriptor 1 (replaced by a test runner,
    # inherited through fork): new text streams on 1 and 2, line-buffered.
    encoding = getattr(sys.stdout, "encoding", None) or "utf-8"
    sys.stdout = _text_stream(1, encoding, "replace")
    sys.stderr = _text_stream(2, encoding, "backslashreplace")


def _text_stream(fd: int, encoding: str, errors: str) -> io.TextIOWrapper:
    """A line-buffered text stream on ``fd``, which it does not close."""
    return open(fd, "w", buffering=1, encoding=encoding, errors=errors, closefd=False)
