"""Every exception tether raises, under one base class.

::

    TetherError
    ├── PeerGone              the other side went away (EOF, reset, exit, kill)
    │   └── ConnectError      nothing answered at the address (refused, absent, unreachable)
    ├── InvokeTimeout         an invoke got no answer in time (also TimeoutError)
    ├── RemoteError           the remote handler raised; type, message, traceback kept
    ├── NoHandler             nothing handles that channel on the other side
    ├── Forbidden             the channel is not exposed to this peer's role
    ├── BadRequest            arguments failed validation; ``path`` names the field
    ├── ProtocolError         the bytes on the wire broke the protocol
    │   └── AuthenticationError   the handshake's shared-secret proof failed or is missing
    ├── ConsumedError         an object was moved into a message and is gone
    ├── PayloadTooLarge       a frame would exceed the size limit (also ValueError)
    ├── ConnectionClosed      this side closed the connection (or pipe end) already
    ├── EndOfStream           a pipe's writer closed; no more messages will come
    ├── BufferInUse           a Buffer was sent while views of it were alive (also BufferError)
    ├── HandleRefused         a Handle was sent where no descriptors pass (also TypeError)
    ├── Busy                  the callee has too many of this caller's invokes in flight
    ├── RouteClosed           the route ended (either side closed it, a send failed, the
    │                         connection was lost); its pending invokes fail with this
    ├── SandboxError          the OS refused part of a child's sandbox; ``part`` names it
    └── StreamMismatch        invoke of a generator handler, or stream of a plain one

The split answers "whose fault, and what now?":

* ``RemoteError``, ``NoHandler``, ``Forbidden``, ``BadRequest``, ``Busy`` and
  ``StreamMismatch`` concern one call. The connection stays open and other calls are unaffected.
* ``InvokeTimeout`` concerns one call too; a cancel frame was sent, so the
  handler on the other side is cancelled as well.
* ``PeerGone`` and ``ProtocolError`` mean the connection is closed. Every call
  pending on it failed with the same exception. A spawned child that sent a
  malformed frame is killed.
* ``ConnectionClosed`` means *you* closed it; ``PeerGone`` means something
  outside did (its ``__cause__`` holds the ``OSError`` when there was one).
* ``PayloadTooLarge`` and ``HandleRefused`` raised by ``invoke``/``send``
  mean nothing was sent and the connection is still open.
"""

from __future__ import annotations

__all__ = [
    "AuthenticationError",
    "BadRequest",
    "BufferInUse",
    "Busy",
    "ConnectError",
    "ConnectionClosed",
    "ConsumedError",
    "EndOfStream",
    "Forbidden",
    "HandleRefused",
    "InvokeTimeout",
    "NoHandler",
    "PayloadTooLarge",
    "PeerGone",
    "ProtocolError",
    "RemoteError",
    "RouteClosed",
    "SandboxError",
    "StreamMismatch",
    "TetherError",
]


class TetherError(Exception):
    """Base class of every error tether raises."""


class PeerGone(TetherError, ConnectionError):
    """The peer went away; pending calls on that connection fail with this.

    Attributes:
        exitcode: for a child process, its exit code, or ``-N`` when it was
            killed by signal N; ``None`` when unknown or not a child.
    """

    def __init__(self, message: str, *, exitcode: int | None = None) -> None:
        super().__init__(message)
        self.exitcode = exitcode

    def __reduce__(self) -> tuple[object, ...]:
        return (_rebuild, (type(self), self.args, {"exitcode": self.exitcode}))


class ConnectError(PeerGone):
    """Connecting failed: nothing listens at the address, or it refused or is unreachable.

    A :class:`PeerGone`, so ``except PeerGone`` still catches it; its own type
    tells "never connected" from "connected, then lost". The ``OSError`` is
    its ``__cause__``.

    Attributes:
        address: the address that was tried, as given (``unix:///...``, ``tcp://...``).
    """

    def __init__(self, message: str, *, address: str = "") -> None:
        super().__init__(message)
        self.address = address

    def __reduce__(self) -> tuple[object, ...]:
        return (_rebuild, (type(self), self.args, {"address": self.address}))


class InvokeTimeout(TetherError, TimeoutError):
    """An invoke got no result within its timeout; the remote was told to cancel."""


class RemoteError(TetherError):
    """The remote handler raised.

    Attributes:
        type_name: the qualified name of the remote exception's type.
        remote_message: ``str()`` of the remote exception.
        remote_traceback: the formatted traceback from the remote side.
    """

    def __init__(self, type_name: str, remote_message: str, remote_traceback: str = "") -> None:
        super().__init__(f"{type_name}: {remote_message}")
        self.type_name = type_name
        self.remote_message = remote_message
        self.remote_traceback = remote_traceback

    def __reduce__(self) -> tuple[object, ...]:
        return (type(self), (self.type_name, self.remote_message, self.remote_traceback))

    def __str__(self) -> str:
        text = f"{self.type_name}: {self.remote_message}"
        if self.remote_traceback:
            text += "\n\nRemote traceback:\n" + self.remote_traceback.rstrip()
        return text


class NoHandler(TetherError, LookupError):
    """No handler is registered for the channel on the other side."""


class Forbidden(TetherError, PermissionError):
    """The channel exists but is not exposed to the calling peer's role."""


class BadRequest(TetherError, ValueError):
    """The call's arguments did not match the handler's type hints.

    Attributes:
        path: where validation failed, e.g. ``"x"`` or ``"point.y"`` or ``"items[2]"``.
    """

    def __init__(self, message: str, path: str = "") -> None:
        super().__init__(message)
        self.path = path

    def __reduce__(self) -> tuple[object, ...]:
        return (type(self), (str(self), self.path))


class StreamMismatch(TetherError, TypeError):
    """``invoke`` on a channel whose handler streams (a generator), or ``stream`` on a plain one.

    Raised by the caller (ERROR code ``stream_mismatch``); the handler did not run.
    """


class ProtocolError(TetherError):
    """The peer sent bytes that break the protocol; the connection was closed."""


class AuthenticationError(ProtocolError):
    """The handshake's shared-secret proof failed: wrong secret, no secret on one side, or a replay.

    A :class:`ProtocolError`, so every layer drops the connection as for any
    broken handshake; its own type lets a caller tell "refused" from "garbled".
    """


class ConsumedError(TetherError, RuntimeError):
    """The object was moved into a message by send/invoke and may not be used again."""


class HandleRefused(TetherError, TypeError):
    """A :class:`~tether.Handle` was sent on a connection that passes no descriptors.

    Only unix sockets and socketpairs carry descriptors (the ``fd`` feature of
    both HELLOs); over TCP, WebSocket or NATS the send fails and nothing is sent. The
    Handle is consumed (its descriptor closed) all the same, as a sent one is.
    """


class PayloadTooLarge(TetherError, ValueError):
    """A frame is larger than the connection's ``max_frame_size``; nothing was sent."""


class ConnectionClosed(TetherError, ConnectionError):
    """This side already closed the connection or pipe end."""


class EndOfStream(TetherError, EOFError):
    """The writing end of a pipe was closed and every message has been read."""


def _rebuild(cls: type[Exception], args: tuple[object, ...], kw: dict[str, object]) -> Exception:
    """Unpickle an error whose constructor takes keyword-only arguments."""
    return cls(*args, **kw)


class BufferInUse(TetherError, BufferError):
    """A :class:`~tether.Buffer` was sent while views of it were still alive.

    The buffer is consumed anyway and nothing was sent; drop every view
    (``del arr``) before sending so the pages can be handed over.
    """


class Busy(TetherError):
    """The callee refused the call at once: this caller has too many invokes in flight there.

    Raised by ``invoke`` when the other side already runs or queues its
    ``max_inflight`` invokes from this connection (ERROR code ``busy``). The
    handler did not run and the connection stays open: retry later, or wait
    for some of the calls already made.
    """


class SandboxError(TetherError):
    """The OS refused part of a sandboxed child's sandbox; ``spawn`` did not start it.

    Raised by ``Main.spawn(..., sandbox=...)`` unless ``best_effort=True``:
    no network namespace (neither privilege nor user namespaces), or a limit
    or ``prctl`` the kernel refused. The child exited before running any of
    the target's code.

    Attributes:
        part: what was refused: ``"network"``, ``"capabilities"``,
            ``"no_new_privs"``, ``"address_space"``, ``"open_files"`` or ``"cpu_seconds"``.
    """

    def __init__(self, message: str, *, part: str = "") -> None:
        super().__init__(message)
        self.part = part

    def __reduce__(self) -> tuple[object, ...]:
        return (_rebuild, (type(self), self.args, {"part": self.part}))


class RouteClosed(TetherError, ConnectionError):
    """The route ended: either side closed it, the connection was lost, or a send on it failed.

    Pending invokes on the route fail with it, and so does every later use.
    When a send failed (SendOrDrop: the route is dropped and its host closed),
    the message names the route's kind, routing id and the channel sent on,
    all captured before the send, and ``__cause__`` says why the send failed.

    Attributes:
        kind: the route's kind (what ``open`` named).
        route_id: its routing id.
    """

    def __init__(self, message: str, *, kind: str = "", route_id: int = 0) -> None:
        super().__init__(message)
        self.kind = kind
        self.route_id = route_id

    def __reduce__(self) -> tuple[object, ...]:
        return (_rebuild, (type(self), self.args, {"kind": self.kind, "route_id": self.route_id}))
