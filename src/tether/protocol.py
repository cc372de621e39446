"""The connection state machine, sans I/O.

Theory of operation: a :class:`Connection` sits between a byte stream and the
application. The I/O layer feeds it received bytes (:meth:`receive_data`,
:meth:`receive_eof`) and writes out whatever :meth:`data_to_send` returns. The
application calls the ``send_*`` methods, which only append frames to the
outgoing buffer. Nothing here blocks, sleeps, or touches a socket, thread or
event loop, so every I/O layer (asyncio, blocking, browser bridge) shares it.

States::

    HANDSHAKE --peer's HELLO--> OPEN --send_goodbye / GOODBYE--> CLOSING
        \\________________________ \\_______ EOF / ProtocolError ___\\--> CLOSED

Each side sends HELLO first and may pipeline other frames right after it. The
first frame received must be a HELLO of protocol ``tether`` and a supported
version; anything else is a :class:`ProtocolError`.

Bad-message policy: :meth:`receive_data` raises :class:`ProtocolError` for any
malformed frame and the connection moves to CLOSED; the I/O layer closes the
transport and fails every pending call (and a main kills a spawned child).
"""

from __future__ import annotations

import collections
import enum
import os
from collections.abc import Iterable
from typing import Any, Final

import msgspec

from . import codec, pool, shm
from .errors import ConnectionClosed, PayloadTooLarge, ProtocolError, TetherError
from .wire import (
    ATT,
    ATT_FD,
    ATT_INLINE,
    ATT_LEASE,
    ATT_MOVED,
    DEFAULT_MAX_FRAME_SIZE,
    HEADER,
    HEADER_SIZE,
    K_EVENT,
    K_INVOKE,
    MAX_FIRST_FRAME,
    Frame,
    FrameParser,
    Kind,
)

__all__ = ["Connection", "State"]

_U32: Final = 0xFFFFFFFF
_BYTESLIKE: Final = (bytes, bytearray, memoryview)
#: leases one connection may have out at once; past it, segments are sealed one-offs
MAX_LEASES: Final = 64
_BLANK_HEADER: Final = bytes(HEADER_SIZE)
_WHILE_CLOSING: Final = frozenset(int(k) for k in (Kind.GOODBYE, Kind.RESULT, Kind.ERROR))
_TO_APP: Final = frozenset(
    int(k) for k in (Kind.INVOKE, Kind.RESULT, Kind.ERROR, Kind.EVENT, Kind.CANCEL)
)


class _Blob:
    """Marks a large top-level bytes-like argument to travel out of band."""

    __slots__ = ("data",)

    def __init__(self, data: Any) -> None:
        self.data = data


class State(enum.Enum):
    HANDSHAKE = "handshake"
    OPEN = "open"
    CLOSING = "closing"
    CLOSED = "closed"


class Connection:
    """Protocol state for one connection. See the module docstring.

    Args:
        role: the role this side announces in its HELLO (``main``, ``child``,
            ``client``, ``page``). The receiving side decides what it grants.
        name: a free-form label for logs.
        max_frame_size: the largest frame accepted or sent, checked on the
            length header before anything is allocated.
    """

    def __init__(
        self,
        role: str,
        *,
        name: str = "",
        max_frame_size: int = DEFAULT_MAX_FRAME_SIZE,
        features: Iterable[str] = (),
    ) -> None:
        self.state = State.HANDSHAKE
        self.max_frame_size = max_frame_size
        #: the largest frame we send: our limit, lowered to the peer's at handshake
        self.send_limit = max_frame_size
        self.peer_hello: codec.Hello | None = None
        self.goodbye_reason: str | None = None
        features = list(features)
        self._fd_local = "fd" in features
        self._accept_leases = "lease" in features  # this side trusts the peer's pages
        self._send_fds = False  # both sides pass descriptors: set at handshake
        self._send_leases = False  # the peer accepts lent segments: set at handshake
        self._parser = FrameParser(
            max_frame_size,
            self._map_fd if self._fd_local else None,
            first_limit=min(MAX_FIRST_FRAME, max_frame_size),
        )
        self._out = bytearray()
        self._fds_out: list[int] = []
        # encoder's attachments for the frame being built: (where, data, flags, aux)
        self._atts: list[tuple[int, Any, int, int]] = []
        self._leases: dict[int, pool.Segment] = {}  # lent out, awaiting RELEASE
        self._next_lease = 0
        self._released: collections.deque[int] = collections.deque()
        #: segments the peer lent this side (see :meth:`poll_releases`)
        self.borrowed = pool.Borrowed()
        self.encoder = msgspec.msgpack.Encoder(enc_hook=self._enc_hook)
        self._next_rid = 0
        #: request id -> the application's waiter, for invokes awaiting an answer
        self.pending: dict[int, Any] = {}
        hello = codec.Hello(
            protocol=codec.PROTOCOL_NAME,
            version=codec.PROTOCOL_VERSION,
            role=role,
            name=name,
            pid=os.getpid(),
            max_frame_size=max_frame_size,
            features=features,
        )
        self._emit(Kind.HELLO, 0, 0, b"", codec.encoder.encode(hello))

    # -- receiving --------------------------------------------------------

    def receive_fds(self, fds: Iterable[int]) -> None:
        """Queue descriptors received beside the bytes; frames claim them in order."""
        if not self._fd_local:
            for fd in fds:
                os.close(fd)
            raise ProtocolError("received file descriptors on a connection that takes none")
        self._parser.fds.extend(fds)

    def close_fds(self) -> None:
        """Close every descriptor received or queued but not yet used (on teardown).

        Segments still lent out are discarded, never reused: without a
        RELEASE there is no telling whether the receiver still reads them.
        """
        q = self._parser.fds
        while q:
            os.close(q.popleft())
        fds, self._fds_out = self._fds_out, []
        for fd in fds:
            os.close(fd)
        leases, self._leases = self._leases, {}
        for seg in leases.values():
            seg.close()
        self.borrowed.clear()

    def _map_fd(self, fd: int, nbytes: int, flags: int, lease: int) -> memoryview:
        """Map a received descriptor: sealed, or lent by a peer this side trusts."""
        if not flags & (ATT_LEASE | ATT_MOVED):
            return shm.map_sealed(fd, nbytes)
        if not self._accept_leases:
            os.close(fd)
            raise ProtocolError("a lent or moved segment from a peer this side does not trust")
        if flags & ATT_MOVED:
            return shm.map_moved(fd, nbytes)
        return self.borrowed.take(fd, nbytes, lease)

    def poll_releases(self) -> bool:
        """Queue RELEASE for every lent segment this side no longer views.

        Call it when views may have been dropped (after handling frames, and
        now and then while :attr:`borrowed` has leases out). Returns whether
        anything was queued: then write :meth:`data_to_send`.
        """
        done = self.borrowed.released()
        if done and self.state is not State.CLOSED:
            self._released.extend(done)
        return bool(done)

    def receive_data(self, data: bytes | bytearray | memoryview) -> list[Frame]:
        """Feed received bytes; return the frames the application must act on.

        Frames returned are INVOKE, RESULT, ERROR, EVENT, CANCEL and GOODBYE.
        HELLO, PING, PONG and ROUTE_OPEN are answered here. ``data`` must not
        be modified afterwards: frames may hold views into it. After this
        returns, call :meth:`data_to_send` and write what it gives.

        Raises:
            ProtocolError: the peer broke the protocol; the state is now CLOSED.
        """
        if self.state is State.CLOSED:
            return []
        try:
            frames = self._parser.feed(data)
            if self.state is State.HANDSHAKE and frames:
                self._handshake(frames[0])
                frames = frames[1:]
            out: list[Frame] = []
            append = out.append
            is_open = self.state is State.OPEN
            for f in frames:
                k = f.kind
                if k in _TO_APP:  # the common case, kept short
                    if k == K_INVOKE and not f.request_id:
                        raise ProtocolError("INVOKE with request id 0")
                    if is_open or k in _WHILE_CLOSING:
                        append(f)
                    continue
                if k == Kind.HELLO:
                    raise ProtocolError("second HELLO on an open connection")
                if k == Kind.INVOKE and not f.request_id:
                    raise ProtocolError("INVOKE with request id 0")
                if self.state is not State.OPEN and k not in _WHILE_CLOSING:
                    continue  # closing: only answers to our own calls still matter
                if k == Kind.PING:
                    self._emit(Kind.PONG, f.request_id, 0, b"", b"")
                elif k == Kind.PONG:
                    continue
                elif k == Kind.ROUTE_OPEN:
                    # Routes are reserved in protocol version 1: refuse each one.
                    self._emit(Kind.ROUTE_CLOSE, 0, f.route_id, b"", b"")
                elif k == Kind.ROUTE_CLOSE:
                    continue
                elif k == Kind.RELEASE:
                    seg = self._leases.pop(f.request_id, None)
                    if seg is not None:
                        pool.POOL.put(seg)
                else:
                    if k == Kind.GOODBYE:
                        self.goodbye_reason = self._goodbye_reason(f)
                        self.state = State.CLOSING
                    out.append(f)
            return out
        except ProtocolError:
            self.state = State.CLOSED
            raise

    def receive_eof(self) -> None:
        """The peer closed its end. Raises :class:`ProtocolError` mid-frame."""
        buffered = self._parser.buffered
        self.state = State.CLOSED
        if buffered:
            raise ProtocolError(f"connection closed in the middle of a frame ({buffered} bytes)")

    def _handshake(self, f: Frame) -> None:
        if f.kind != Kind.HELLO:
            raise ProtocolError(f"expected HELLO, got frame kind {f.kind}")
        try:
            hello = codec.hello_decoder.decode(f.body)
        except msgspec.MsgspecError as exc:
            raise ProtocolError(f"malformed HELLO: {exc}") from None
        if hello.protocol != codec.PROTOCOL_NAME:
            raise ProtocolError(f"peer speaks {hello.protocol!r}, not {codec.PROTOCOL_NAME!r}")
        if hello.version != codec.PROTOCOL_VERSION:
            raise ProtocolError(
                f"peer speaks protocol version {hello.version}; "
                f"this side supports {codec.PROTOCOL_VERSION}"
            )
        self.peer_hello = hello
        self._send_fds = self._fd_local and "fd" in hello.features
        self._send_leases = self._send_fds and "lease" in hello.features
        if 0 < hello.max_frame_size < self.send_limit:
            self.send_limit = hello.max_frame_size  # never send what the peer must refuse
        if self.state is State.HANDSHAKE:
            self.state = State.OPEN

    @staticmethod
    def _goodbye_reason(f: Frame) -> str:
        try:
            return codec.goodbye_decoder.decode(f.body).reason
        except msgspec.MsgspecError:
            return ""

    def take_pending(self, request_id: int) -> Any:
        """Remove and return the waiter for ``request_id``; ``None`` if unknown.

        A result for an unknown id (a call that timed out or was cancelled)
        is not an error: it is simply dropped.
        """
        return self.pending.pop(request_id, None)

    def fail_all(self) -> list[Any]:
        """Close for good and hand back every pending waiter, to be failed."""
        self.state = State.CLOSED
        waiters = list(self.pending.values())
        self.pending.clear()
        return waiters

    # -- sending ----------------------------------------------------------

    def data_to_send(self) -> bytearray:
        """Return (and forget) the bytes to write. You must write all of them."""
        released = self._released
        while released and self.state is not State.CLOSED:
            self._emit(Kind.RELEASE, released.popleft(), 0, b"", b"")
        out = self._out
        if out:
            self._out = bytearray()
        return out

    def take_fds(self) -> list[int]:
        """Return (and forget) descriptors to pass with the next bytes written.

        Send them with the first byte of the :meth:`data_to_send` chunk taken
        together with them, then close them.
        """
        fds = self._fds_out
        if fds:
            self._fds_out = []
        return fds

    @property
    def buffered_out(self) -> int:
        """Bytes queued by ``send_*`` and not yet taken by :meth:`data_to_send`."""
        return len(self._out)

    def send_invoke(self, channel: bytes, args: Any, waiter: Any, route_id: int = 0) -> int:
        """Queue an INVOKE of ``channel`` with ``args`` (a tuple); return its request id."""
        if self.state is not State.OPEN:
            self._check_open(args)
        rid = self._next_rid = (self._next_rid + 1) & _U32 or 1
        while rid in self.pending:  # wrapped onto a call still in flight
            rid = self._next_rid = (rid + 1) & _U32 or 1
        self._emit_obj(K_INVOKE, rid, route_id, channel, _wrap(args))
        self.pending[rid] = waiter
        return rid

    def send_event(self, channel: bytes, args: Any, route_id: int = 0) -> None:
        """Queue a one-way EVENT on ``channel``."""
        if self.state is not State.OPEN:
            self._check_open(args)
        self._emit_obj(K_EVENT, 0, route_id, channel, _wrap(args))

    def send_result(self, request_id: int, value: Any) -> None:
        """Queue the RESULT of an incoming invoke.

        Raises:
            PayloadTooLarge: the value does not fit; send an error instead.
        """
        if self.state is not State.CLOSED:
            if type(value) in _BYTESLIKE and len(value) >= shm.SHM_THRESHOLD:
                value = _Blob(value)
            self._emit_obj(Kind.RESULT, request_id, 0, b"", value)

    def answer(self, request_id: int, value: Any) -> None:
        """Queue the RESULT of an incoming invoke, or the ERROR saying why it can't be sent.

        Every invoke gets exactly one answer: a value that does not encode or
        does not fit becomes an error for the caller, never a lost reply.
        """
        try:
            self.send_result(request_id, value)
        except PayloadTooLarge as exc:
            self.send_error(request_id, codec.ErrorInfo("too_large", f"result too large: {exc}"))
        except (TypeError, ValueError, msgspec.EncodeError, TetherError) as exc:
            self.send_error(request_id, codec.error_info(exc))

    def send_error(self, request_id: int, info: codec.ErrorInfo) -> None:
        """Queue an ERROR answer to an incoming invoke."""
        if self.state is not State.CLOSED:
            self._emit_obj(Kind.ERROR, request_id, 0, b"", info)

    def send_cancel(self, request_id: int) -> None:
        """Forget the call ``request_id`` and ask the peer to cancel its handler."""
        self.pending.pop(request_id, None)
        if self.state in (State.OPEN, State.HANDSHAKE):
            self._emit(Kind.CANCEL, request_id, 0, b"", b"")

    def send_ping(self, nonce: int) -> None:
        """Queue a PING; the peer answers with a PONG carrying ``nonce``."""
        self._check_open()
        self._emit(Kind.PING, nonce, 0, b"", b"")

    def send_goodbye(self, reason: str = "") -> None:
        """Queue a GOODBYE; after it, nothing else may be sent."""
        if self.state in (State.OPEN, State.HANDSHAKE):
            self._emit(Kind.GOODBYE, 0, 0, b"", codec.encoder.encode(codec.Goodbye(reason)))
            self.state = State.CLOSING

    def _check_open(self, args: Any = ()) -> None:
        if self.state is State.CLOSING or self.state is State.CLOSED:
            shm.consume_all(args)  # a failed send moves its Buffers too
            raise ConnectionClosed("the connection is closing or closed")

    def _emit(self, kind: int, rid: int, route: int, channel: bytes, body: bytes) -> None:
        size = HEADER_SIZE - 4 + len(channel) + len(body)
        out = self._out
        out += HEADER.pack(size, kind, 0, len(channel), rid, route, 0, 0)
        out += channel
        out += body

    def _emit_obj(self, kind: int, rid: int, route: int, channel: bytes, obj: Any) -> None:
        """Append a frame whose body is ``obj`` encoded in place (no temporary bytes)."""
        out = self._out
        start = len(out)
        out += _BLANK_HEADER  # filled in once the size is known
        out += channel
        body_start = len(out)
        try:
            self.encoder.encode_into(obj, out, -1)
        except BaseException:
            del out[start:]
            self._drop_atts()
            shm.consume_all(obj)  # Buffers the encoder did not reach are moved too
            raise
        atts = self._atts
        n_att = len(atts)
        if n_att:
            body = bytes(out[body_start:])
            del out[body_start:]
            for where, a, flags, aux in atts:
                length = a[1] if where == ATT_FD else len(a)
                out += ATT.pack(where, flags, 0, aux, length)
            out += body
            for where, a, _, _ in atts:
                if where == ATT_INLINE:
                    out += a
        size = len(out) - start - 4
        if size > self.send_limit:
            del out[start:]
            self._drop_atts()
            raise PayloadTooLarge(
                f"frame of {size} bytes exceeds the limit of {self.send_limit} bytes"
            )
        HEADER.pack_into(out, start, size, kind, 0, len(channel), rid, route, n_att, 0)
        if n_att:
            self._atts = []
            self._fds_out.extend(a[0] for where, a, _, _ in atts if where == ATT_FD)

    # -- attachments ------------------------------------------------------

    def _enc_hook(self, obj: Any) -> Any:
        """Move buffers, arrays and :class:`~tether.Buffer` out of the body."""
        if isinstance(obj, _Blob):
            return self._attach_ext(memoryview(obj.data).cast("B"))
        if isinstance(obj, shm.Buffer):
            if self._send_leases:  # the peer trusts us: O(1) handoff
                return self._ext_bytes(ATT_FD, obj.take(trusted=True), ATT_MOVED)
            fd, n = obj.take()
            if self._send_fds:
                return self._ext_bytes(ATT_FD, (fd, n))
            return self._ext_bytes(ATT_INLINE, shm.map_sealed(fd, n))
        if hasattr(obj, "__array_interface__") and type(obj).__module__ == "numpy":
            import numpy as np

            arr = np.asarray(obj, order="C")  # not ascontiguousarray: it turns 0-d into 1-d
            if arr.dtype.hasobject:
                raise TypeError("numpy arrays of Python objects cannot be sent")
            if np.dtype(arr.dtype.str) != arr.dtype:  # structured: .str would drop the fields
                raise TypeError(f"numpy arrays of dtype {arr.dtype} cannot be sent")
            ext = self._attach_ext(memoryview(arr.reshape(-1).view(np.uint8)))  # type: ignore[arg-type]
            index = int.from_bytes(ext.data, "little")
            ref = codec.encoder.encode((index, arr.dtype.str, list(arr.shape)))
            return msgspec.msgpack.Ext(codec.EXT_NDARRAY, ref)
        raise TypeError(f"objects of type {type(obj).__name__} cannot be sent")

    def _attach_ext(self, view: memoryview) -> msgspec.msgpack.Ext:
        n = view.nbytes
        if not self._send_fds or n < shm.SHM_THRESHOLD:
            return self._ext_bytes(ATT_INLINE, view)
        if not self._send_leases or len(self._leases) >= MAX_LEASES:
            # Sealed and given away: nothing stays held here however long the
            # peer keeps it (a lease holds two descriptors until released).
            return self._ext_bytes(ATT_FD, shm.segment_from(view))
        # Lend a pooled segment: pages already faulted in, one copy at memory speed.
        seg = pool.POOL.get(n)
        try:
            seg.fill(view)
            fd = os.dup(seg.fd)
        except BaseException:
            pool.POOL.put(seg)
            raise
        lease = self._next_lease = (self._next_lease + 1) & _U32 or 1
        while lease in self._leases:  # wrapped onto a lease still out
            lease = self._next_lease = (lease + 1) & _U32 or 1
        self._leases[lease] = seg
        return self._ext_bytes(ATT_FD, (fd, n), ATT_LEASE, lease)

    def _ext_bytes(self, where: int, att: Any, flags: int = 0, aux: int = 0) -> msgspec.msgpack.Ext:
        index = len(self._atts)
        self._atts.append((where, att, flags, aux))
        return msgspec.msgpack.Ext(codec.EXT_BYTES, index.to_bytes(4, "little"))

    def _drop_atts(self) -> None:
        """Undo the attachments of a frame that will not be sent."""
        atts, self._atts = self._atts, []
        for where, a, flags, aux in atts:
            if where == ATT_FD:
                os.close(a[0])
                if flags & ATT_LEASE:
                    seg = self._leases.pop(aux, None)
                    if seg is not None:
                        pool.POOL.put(seg)  # never reached the peer: safe to reuse


def _wrap(args: tuple[Any, ...]) -> tuple[Any, ...]:
    """Mark large top-level bytes-like arguments to travel out of band."""
    for a in args:
        if type(a) in _BYTESLIKE and len(a) >= shm.SHM_THRESHOLD:
            return tuple(
                _Blob(x) if type(x) in _BYTESLIKE and len(x) >= shm.SHM_THRESHOLD else x
                for x in args
            )
    return args
