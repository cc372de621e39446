"""File descriptors as values: :class:`Handle`.

A Handle owns one descriptor (a pipe end, a socket, an open file...) and
travels in the arguments and results of ``invoke``/``send`` over unix
sockets and socketpairs (SCM_RIGHTS), *moved* like a :class:`tether.Buffer`:

* the sender's Handle is consumed by the send, whether it worked or not
  (every later use raises :class:`ConsumedError`), and its descriptor is
  closed on the sender's side once written or once the send failed;
* the receiver gets a new Handle owning its copy of the descriptor; it takes
  it with :meth:`Handle.detach`, :meth:`Handle.open` or :meth:`Handle.socket`.

The ownership rule, on both sides: a Handle closes its descriptor when it is
closed or garbage-collected while it still owns it. So a received Handle
nobody claimed (the handler never ran, validation failed, the connection was
lost, or the handler returned without taking it and kept no reference) is
closed, never leaked; keep a reference to use it later.

Over a connection that passes no descriptors (TCP, WebSocket; a peer that
did not announce ``fd``) sending a Handle raises :class:`HandleRefused`.
"""

from __future__ import annotations

import contextlib
import io
import os
import socket as _socket
import weakref
from typing import IO, Any, Final

from .errors import ConsumedError, HandleRefused

__all__ = ["MAX_LIVE_HANDLES", "Handle", "HandleRefused", "held_size", "received"]

#: received Handles one connection may have alive and not taken (detached, opened,
#: closed); one more is a protocol error (a peer must not exhaust this side's descriptors)
MAX_LIVE_HANDLES: Final = 1024
#: received Handles alive and not taken past which a connection stops reading (flow
#: control, well under :data:`MAX_LIVE_HANDLES`: a well-behaved peer is paused, never dropped)
HANDLES_HIGH: Final = 256
#: ...and under which it reads again
HANDLES_LOW: Final = 64
#: bytes a received Handle counts for in a paused peer's backlog (bounds held descriptors)
HELD_SIZE: Final = 4096


class Handle:
    """An owned file descriptor that can be sent to another process.

    Args:
        fd: the descriptor. The Handle owns it from now on: it is closed once
            sent, or when the Handle is closed or garbage-collected without
            having been taken (:meth:`detach`, :meth:`open`, :meth:`socket`).
            Use :meth:`from_file` or :meth:`from_socket` to keep your object open.

    Raises:
        TypeError, ValueError: ``fd`` is not a non-negative int.
        OSError: ``fd`` is not an open descriptor.

    Example::

        r, w = os.pipe()
        await child.invoke("write_to", tether.Handle(w))   # w is closed here now
        # in the child:
        @peer.handle("write_to")
        def write_to(call: tether.Call, h: tether.Handle) -> None:
            with h.open("wb") as f:
                f.write(b"hello")
    """

    __slots__ = ("__weakref__", "_fd", "_live")

    #: how the protocol core recognizes a Handle without importing this module
    __tether_handle__: Final = True

    def __init__(self, fd: int) -> None:
        if not isinstance(fd, int) or isinstance(fd, bool):
            raise TypeError(f"fd must be an int, not {type(fd).__name__}")
        if fd < 0:
            raise ValueError(f"fd must be >= 0, not {fd}")
        os.fstat(fd)  # OSError (EBADF) now, not a failed write that drops the connection later
        self._fd: int | None = fd
        #: the receiving connection's untaken Handles (see :func:`received`)
        self._live: weakref.WeakSet[Handle] | None = None

    @classmethod
    def from_file(cls, f: IO[Any] | io.IOBase | int) -> Handle:
        """A Handle owning a duplicate of ``f``'s descriptor; ``f`` stays open and yours."""
        fd = f if isinstance(f, int) else f.fileno()
        return cls(os.dup(fd))

    @classmethod
    def from_socket(cls, sock: _socket.socket) -> Handle:
        """A Handle owning a duplicate of ``sock``'s descriptor; ``sock`` stays open and yours."""
        return cls(os.dup(sock.fileno()))

    @property
    def consumed(self) -> bool:
        """True once the Handle was sent, detached or closed."""
        return self._fd is None

    def _check(self) -> int:
        fd = self._fd
        if fd is None:
            raise ConsumedError(
                "this Handle was sent, detached or closed and can no longer be used"
            )
        return fd

    def fileno(self) -> int:
        """The descriptor, still owned by the Handle (for ``select``, ``os.fstat``...)."""
        return self._check()

    def detach(self) -> int:
        """Take the descriptor: it is yours to close; the Handle is consumed."""
        fd = self._check()
        self._fd = None
        self._taken()
        return fd

    def _taken(self) -> None:
        live, self._live = self._live, None
        if live is not None:
            live.discard(self)

    def open(self, mode: str = "rb", **kw: Any) -> IO[Any]:
        """The descriptor as a file object (:func:`open` with ``closefd=True``); consumed."""
        fd = self._check()
        f = open(fd, mode, **kw)  # noqa: SIM115 (the caller closes it)
        self._fd = None
        self._taken()
        return f

    def socket(self) -> _socket.socket:
        """The descriptor as a :class:`socket.socket` (family and type read from it); consumed."""
        fd = self._check()
        s = _socket.socket(fileno=fd)
        self._fd = None
        self._taken()
        return s

    def take(self) -> int:
        """Consume the Handle for sending: the caller owns the returned descriptor.

        Called by the send path (see :mod:`tether.protocol`).
        """
        return self.detach()

    def refuse(self, why: str) -> HandleRefused:
        """Consume the Handle (closing its descriptor) and return the error to raise.

        Raises:
            ConsumedError: it was already consumed (that is the error to see).
        """
        self._check()
        self.close()
        return HandleRefused(why)

    def close(self) -> None:
        """Close the descriptor if the Handle still owns it; idempotent."""
        fd, self._fd = self._fd, None
        if fd is not None:
            self._taken()
            with contextlib.suppress(OSError):
                os.close(fd)

    def __enter__(self) -> Handle:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        if getattr(self, "_fd", None) is not None:
            self.close()

    def __repr__(self) -> str:
        return f"<tether.Handle {'consumed' if self._fd is None else f'fd={self._fd}'}>"


def received(fd: int, live: weakref.WeakSet[Handle]) -> Handle:
    """A Handle for a descriptor a connection received, counted in ``live`` until taken."""
    h = Handle(fd)
    h._live = live
    live.add(h)
    return h


def held_size(att: Any) -> int:
    """Bytes an attachment counts for while held: its size, or :data:`HELD_SIZE` for a Handle."""
    if isinstance(att, Handle):
        return HELD_SIZE
    return memoryview(att).nbytes
