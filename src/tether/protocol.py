"""The connection state machine, sans I/O.

Theory of operation: a :class:`Connection` sits between a byte stream and the
application. The I/O layer feeds it received bytes (:meth:`receive_data`,
:meth:`receive_eof`) and writes out whatever :meth:`data_to_send` returns. The
application calls the ``send_*`` methods, which only append frames to the
outgoing buffer. Nothing here blocks, sleeps, or touches a socket, descriptor,
mapping, thread or event loop, and nothing here is process-wide, so every I/O
layer (asyncio, blocking, browser bridge) shares it. Out-of-band attachments
(descriptors, shared-memory segments, leases) go through the
:class:`AttachmentStore` the I/O layer injects per connection
(:class:`tether.attachments.MemfdStore`); a connection without one passes no
descriptors and needs none.

States (only this class changes them; the I/O layer calls :meth:`abort`)::

    HANDSHAKE --peer's HELLO (and, with a secret, its valid AUTH)--> OPEN
        |                         |
        | send_goodbye            | send_goodbye / peer's GOODBYE
        v                         v
        +-----------------------> CLOSING
    any state --EOF / ProtocolError / abort()--> CLOSED

:attr:`Connection.our_goodbye` and :attr:`Connection.their_goodbye` say which
side said goodbye (h11's ``our_state``/``their_state``): after our GOODBYE we
send nothing more and still take RESULT/ERROR for our own calls; after theirs
every later frame is ignored, whatever read it arrives in.

Each side sends HELLO first and may pipeline other frames right after it. The
first frame received must be a HELLO of protocol ``tether`` and a supported
version; anything else is a :class:`ProtocolError`.

Shared-secret authentication (``secret=``): each side's HELLO carries a fresh
random ``nonce``; as soon as the peer's HELLO is in, each side queues an AUTH
frame whose body is HMAC-SHA256(secret, context, own direction, peer's nonce,
own nonce) and checks the peer's AUTH with :func:`hmac.compare_digest`. The
secret never crosses the wire, and a recorded handshake replayed to a new
connection fails because the other side's nonce is new. Until the peer's AUTH
is verified the connection stays in HANDSHAKE, :attr:`Connection.peer_hello`
stays ``None``, nothing is returned to the application, and this side's own
frames other than HELLO are held back (they leave after our AUTH). Any other
frame in place of the AUTH, a wrong proof, or a secret on one side only is an
:class:`AuthenticationError` (a :class:`ProtocolError`).

Bad-message policy: :meth:`receive_data` raises :class:`ProtocolError` for any
malformed frame and the connection moves to CLOSED (its store is closed); the
I/O layer closes the transport and fails every pending call (and a main kills
a spawned child).

Bodies are MessagePack, or JSON on a connection made with ``encoding="json"``
(a browser page over a WebSocket, which has JSON built in and no MessagePack):
then every body this side writes is JSON, the HELLOs say ``"encoding": "json"``,
and the peer's INVOKE, EVENT, RESULT and ERROR bodies are re-encoded as
MessagePack as they arrive, so the layers above decode and validate them as
they do any other peer's (a body that is not JSON reads as malformed).
Attachments cannot ride on such a connection.
"""

from __future__ import annotations

import collections
import enum
import hashlib
import hmac
import pickle as _pickle
import secrets
from collections.abc import Iterable
from typing import Any, Final, Protocol

import msgspec

from . import codec
from . import tracing as _tracing
from .errors import (
    AuthenticationError,
    ConnectionClosed,
    ConsumedError,
    PayloadTooLarge,
    ProtocolError,
    StreamMismatch,
)
from .routes import RouteTable
from .streams import credit_body, is_a_stream
from .wire import (
    ATT,
    DEFAULT_MAX_FRAME_SIZE,
    FLAG_HANDLE,
    FLAG_LEASE,
    FLAG_MOVED,
    HEADER,
    HEADER_SIZE,
    K_CANCEL,
    K_ERROR,
    K_EVENT,
    K_GOODBYE,
    K_HELLO,
    K_INVOKE,
    K_ITEM,
    K_RESULT,
    K_STREAM,
    MIN_MAX_FRAME_SIZE,
    SHM_THRESHOLD,
    WHERE_FD,
    WHERE_INLINE,
    Frame,
    FrameParser,
    Kind,
)

__all__ = [
    "AttachmentStore",
    "Connection",
    "MAX_UNCLAIMED_FDS",
    "MIN_SECRET_SIZE",
    "State",
    "auth_proof",
    "check_secret",
]

_U32: Final = 0xFFFFFFFF
_BYTESLIKE: Final = (bytes, bytearray, memoryview)
#: descriptors received that no frame claimed, past which the peer broke the protocol;
#: also the most descriptors one frame, or one chunk of :meth:`Connection.data_to_send`, carries
MAX_UNCLAIMED_FDS: Final = 16
#: PONG/ROUTE_CLOSE replies the core may queue before the I/O layer takes them
MAX_AUTO_REPLIES: Final = 4096
_BLANK_HEADER: Final = bytes(HEADER_SIZE)
_WHILE_CLOSING: Final = frozenset((K_RESULT, K_ERROR))  # after our GOODBYE: answers to our calls
#: kinds passed to the application that name no request this side serves
_PLAIN: Final = frozenset(
    int(k)
    for k in (
        Kind.RESULT,
        Kind.ERROR,
        Kind.EVENT,
        Kind.ROUTE_CLOSE,  # routes change state when dispatched, in order (tether.routes)
    )
)
_K_ROUTE_OPEN: Final = int(Kind.ROUTE_OPEN)
#: STREAM, ITEM, CREDIT: passed to the application when both sides announced ``stream``
_STREAM_KINDS: Final = frozenset(int(k) for k in (Kind.STREAM, Kind.ITEM, Kind.CREDIT))
_NO_FDS: Final[list[int]] = []
#: kinds whose body a JSON peer writes as JSON and the layers above read as MessagePack
_JSON_BODIES: Final = frozenset((K_INVOKE, K_EVENT, K_RESULT, K_ERROR, int(Kind.ROUTE_OPEN)))
_NO_FRAMES: Final[list[Frame]] = []
#: room kept in an ERROR frame for everything but its message and traceback
_ERROR_OVERHEAD: Final = 512
#: bytes of random nonce each side puts in its HELLO when it has a secret
NONCE_SIZE: Final = 32
#: prefix of every AUTH proof (HMAC-SHA256 input), so it can't stand for another protocol's MAC
AUTH_CONTEXT: Final = b"tether-auth-v1\0"
_AUTH_LABEL: Final = {True: b"initiator", False: b"acceptor"}


def auth_proof(secret: bytes, initiator: bool, peer_nonce: bytes, own_nonce: bytes) -> bytes:
    """The body of an AUTH frame: HMAC-SHA256 of context, sender's direction and both nonces.

    The direction (``initiator``: the side that connected; else ``acceptor``)
    keeps a proof one side made from being reflected back as the other's.
    """
    msg = AUTH_CONTEXT + _AUTH_LABEL[initiator] + peer_nonce + own_nonce
    return hmac.new(secret, msg, hashlib.sha256).digest()


class AttachmentStore(Protocol):
    """What a :class:`Connection` asks of its store (see :mod:`tether.attachments`)."""

    lend: bool
    features: tuple[str, ...]

    def receive_fds(self, fds: Iterable[int]) -> None: ...
    @property
    def unclaimed(self) -> int: ...

    @property
    def handles_held(self) -> int: ...
    def claim(self, nbytes: int, flags: int, aux: int) -> Any: ...
    def released(self) -> list[int]: ...
    @property
    def outstanding(self) -> int: ...
    def seal(self, data: memoryview) -> tuple[int, int]: ...
    def lend_segment(self, data: memoryview, pooled: bool = ...) -> tuple[int, int] | None: ...
    def move(self, buf: Any, trusted: bool) -> tuple[int, int]: ...
    def returned(self, lease: int) -> None: ...
    def unsent(self, fd: int, lease: int) -> None: ...
    def close_fds(self, fds: Iterable[int]) -> None: ...
    def close(self) -> None: ...


class _Att:
    """One attachment of the frame being encoded."""

    __slots__ = ("aux", "data", "fd", "flags", "length", "where")

    def __init__(
        self, where: int, length: int, data: Any = None, fd: int = -1, flags: int = 0, aux: int = 0
    ) -> None:
        self.where = where  # WHERE_INLINE (``data`` follows the body) or WHERE_FD (``fd``)
        self.length = length
        self.data = data
        self.fd = fd
        self.flags = flags  # FLAG_LEASE (``aux`` = lease id) or FLAG_MOVED
        self.aux = aux


class _Blob:
    """Marks a large top-level bytes-like argument to travel out of band."""

    __slots__ = ("data",)

    def __init__(self, data: Any) -> None:
        self.data = data


#: the shortest shared secret accepted (bytes)
MIN_SECRET_SIZE: Final = 16


def check_secret(secret: object) -> None:
    """Refuse a ``secret=`` that is not bytes of at least :data:`MIN_SECRET_SIZE`.

    Raises:
        TypeError: not bytes.
        ValueError: too short to resist guessing.
    """
    if not isinstance(secret, bytes):
        raise TypeError(f"secret must be bytes, not {type(secret).__name__}")
    if len(secret) < MIN_SECRET_SIZE:
        raise ValueError(f"secret must be at least {MIN_SECRET_SIZE} bytes, not {len(secret)}")


class State(enum.Enum):
    HANDSHAKE = "handshake"
    OPEN = "open"
    CLOSING = "closing"
    CLOSED = "closed"


_OPEN: Final = State.OPEN


class Connection:
    """Protocol state for one connection. See the module docstring.

    Args:
        local_role: the role *this* side announces in its HELLO (``main``,
            ``child``, ``client``, ``page``); the receiving side decides what
            it grants. (A peer's ``role`` is the other side's.)
        name: a free-form label for logs.
        pid: this process's id, announced in the HELLO (the I/O layer knows it;
            0 announces none).
        max_frame_size: the largest frame accepted or sent, checked on the
            length header before anything is allocated; at least
            :data:`~tether.wire.MIN_MAX_FRAME_SIZE`.
        store: the attachment store of this connection; with one, this side
            announces ``fd`` (and ``lease`` if the store borrows). ``None``:
            no descriptors cross (TCP, or a peer without descriptor support).
        secret: a shared secret (bytes, at least 16): the handshake then needs
            the peer's AUTH proof made with the same secret (module docstring).
        initiator: this side opened the connection (``False`` on the
            accepting side); only the AUTH proof uses it.
        encoding: ``"msgpack"`` (the default) or ``"json"``: the encoding of
            every body on this connection, both ways (the transport decided
            it before the first frame, e.g. a WebSocket subprotocol). A JSON
            connection takes no store, secret or pickle.

    Raises:
        ValueError: ``max_frame_size`` is below the floor, or the HELLO would
            not fit in it.
    """

    #: what a PayloadTooLarge advises (a transport with another limit says its own)
    too_large_hint = "max_frame_size: raise it on both sides for larger transfers"

    def __init__(
        self,
        local_role: str,
        *,
        name: str = "",
        pid: int = 0,
        max_frame_size: int = DEFAULT_MAX_FRAME_SIZE,
        store: AttachmentStore | None = None,
        secret: bytes | None = None,
        initiator: bool = True,
        pickle: bool = False,
        encoding: str = "msgpack",
        trace_context: bool = False,
    ) -> None:
        if secret is not None:
            check_secret(secret)
        if encoding not in codec.ENCODINGS:
            raise ValueError(f"encoding must be one of {codec.ENCODINGS}, not {encoding!r}")
        #: bodies are JSON both ways (a browser page), not MessagePack
        self.json = encoding == "json"
        if self.json and (store is not None or secret is not None or pickle):
            raise ValueError("a JSON connection carries no attachments, secret or pickle")
        if max_frame_size < MIN_MAX_FRAME_SIZE:
            raise ValueError(
                f"max_frame_size must be at least {MIN_MAX_FRAME_SIZE} bytes, not {max_frame_size}"
            )
        self.state = State.HANDSHAKE
        self.max_frame_size = max_frame_size
        #: the largest frame we send: our limit, lowered to the peer's at handshake
        self.send_limit = max_frame_size
        self.peer_hello: codec.Hello | None = None
        self.goodbye_reason: str | None = None
        #: this side sent GOODBYE (it sends nothing more)
        self.our_goodbye = False
        #: the peer sent GOODBYE (what it sends after is ignored)
        self.their_goodbye = False
        self._store = store
        self._send_fds = False  # both sides pass descriptors: set at handshake
        self._send_moved = False  # the peer trusts our pages (``lease``): set at handshake
        self._send_leases = False  # ... and our store lends to it: set at handshake
        self._peer_copies = False  # the peer copies lent segments out (``copy``): set at handshake
        # our store copies out what the peer lends: release each at once
        self._copying = store is not None and "copy" in store.features
        self._peer_fd = False  # the peer announced ``fd``: set at handshake
        self._handshaking = True  # the peer's HELLO (and AUTH) not yet all taken off the frames
        self._hello: codec.Hello | None = None  # the peer's HELLO, before it is authenticated
        self._taken = 0  # frames of this read the parser's fd callback took for the handshake
        self._secret = secret
        self._initiator = initiator
        self._nonce = secrets.token_bytes(NONCE_SIZE) if secret is not None else b""
        #: with a secret, our frames wait here until our AUTH is queued (HELLO goes at once)
        self._holding = secret is not None
        self._proof_due = False  # the peer's HELLO is in and its AUTH is not
        self._fds_in = False  # descriptors arrived that frames may not have claimed yet
        self._auto = 0  # PONG/ROUTE_CLOSE queued since data_to_send was last called
        self._pickle_local = pickle  # this side opted in to pickle
        #: both ends opted in to pickle (set at handshake): objects msgspec cannot
        #: encode travel pickled, and received pickles are unpickled
        self.pickle = False
        #: both ends announced ``stream`` (set at handshake): STREAM, ITEM and CREDIT may cross
        self.streams = False
        #: leave this connection out of traces (a ``tether trace`` watcher's own)
        self.trace_off = False
        self._ctx_local = trace_context  # this side announced ``trace``
        #: both ends announced ``trace`` (set at handshake): an INVOKE may carry a
        #: W3C trace context after its channel name (docs/protocol.md 7.7)
        self.trace_context = False
        #: request id -> the ``traceparent`` an INVOKE of this read carried (the peer pops it)
        self.contexts: dict[int, str] = {}
        self._parser = FrameParser(
            max_frame_size,
            self._claim if store is not None else None,
            # The HELLO (and the AUTH, with a secret) of a peer not yet known:
            # every HELLO fits the floor, an AUTH is 32 bytes of proof.
            first_limit=MIN_MAX_FRAME_SIZE,
            first_count=2 if secret is not None else 1,
        )
        self._out = bytearray()
        self._fds_out: list[int] = []
        # chunks cut off so that none carries more than MAX_UNCLAIMED_FDS descriptors
        self._ready: collections.deque[tuple[bytearray, list[int]]] = collections.deque()
        self._atts: list[_Att] = []  # the encoder's attachments for the frame being built
        self._handles_sent: list[Any] = []  # the Handles taken for the frame being built
        self._released: collections.deque[int] = collections.deque()
        self.encoder: msgspec.msgpack.Encoder | msgspec.json.Encoder = (
            msgspec.json.Encoder(enc_hook=_json_hook)
            if self.json
            else msgspec.msgpack.Encoder(enc_hook=self._enc_hook)
        )
        self._next_rid = 0
        #: request id -> the application's waiter, for invokes awaiting an answer
        self.pending: dict[int, Any] = {}
        #: ids of the peer's INVOKEs and STREAMs returned and not yet answered (RESULT or
        #: ERROR sent) nor cancelled: one arriving again is a protocol error (9.1)
        self.served: set[int] = set()
        #: the routes of this connection, made by :meth:`route_table` on first use
        self.routes: RouteTable | None = None
        hello = (codec.json_encoder if self.json else codec.encoder).encode(
            codec.Hello(
                protocol=codec.PROTOCOL_NAME,
                version=codec.PROTOCOL_VERSION,
                role=local_role,
                name=name,
                pid=pid,
                max_frame_size=max_frame_size,
                features=(list(store.features) if store is not None else [])
                + (["pickle"] if pickle else [])
                + ([] if self.json else ["stream"])  # pages (tether.js) take no streams
                + (["trace"] if trace_context else []),
                nonce=self._nonce,
                encoding="json" if self.json else "",
            )
        )
        if HEADER_SIZE + len(hello) > MIN_MAX_FRAME_SIZE:
            raise ValueError(f"HELLO of {len(hello)} bytes: role or name too long")
        self._emit(Kind.HELLO, 0, 0, b"", hello)
        self._pre = bytearray()
        if self._holding:
            self._pre, self._out = self._out, bytearray()

    # -- receiving --------------------------------------------------------

    def receive_fds(self, fds: Iterable[int]) -> None:
        """Hand over descriptors received beside the bytes; frames claim them in order.

        Call it before :meth:`receive_data` with the bytes they came with.

        Raises:
            ProtocolError: this connection takes no descriptors (then they are
                still the caller's to close), the peer did not announce ``fd``,
                or passed more than :data:`MAX_UNCLAIMED_FDS` in one write (then
                they are closed); the state is now CLOSED.
        """
        store = self._store
        if store is None:
            self.state = State.CLOSED
            raise ProtocolError("received file descriptors on a connection that takes none")
        fds = list(fds)
        if len(fds) > MAX_UNCLAIMED_FDS:  # the sender MUST pass at most 16 per sendmsg
            store.close_fds(fds)
            self.abort()
            raise ProtocolError(
                f"{len(fds)} file descriptors in one write: more than {MAX_UNCLAIMED_FDS}"
            )
        store.receive_fds(fds)
        self._fds_in = True
        if self._hello is not None and not self._peer_fd:
            self.abort()
            raise ProtocolError("received file descriptors from a peer that did not announce fd")

    def _claim(self, nbytes: int, flags: int, aux: int) -> Any:
        """The parser's callback for a descriptor attachment."""
        if self._handshaking:
            # A frame right behind the HELLO (and AUTH), in the same read: they
            # were parsed first, so take them now and know whether fds are allowed.
            self._taken += self._take_handshake(self._parser.parsed, self._taken)
            if self._handshaking:
                what = "AUTH" if self._proof_due else "HELLO"
                raise ProtocolError(f"expected {what}, got a frame with a file descriptor")
        if not self._peer_fd:
            raise ProtocolError("file descriptor attachment from a peer that did not announce fd")
        assert self._store is not None
        return self._store.claim(nbytes, flags, aux)

    def poll_releases(self) -> bool:
        """Queue RELEASE for every lent segment this side no longer views.

        Call it when views may have been dropped (after handling frames, and
        now and then while the store has leases from the peer). Returns
        whether anything was queued: then write :meth:`data_to_send`.
        """
        if self._store is None:
            return False
        done = self._store.released()
        if done and self.state is not State.CLOSED and not self.our_goodbye:
            self._released.extend(done)
        return bool(done)

    def receive_data(self, data: bytes | bytearray | memoryview) -> list[Frame]:
        """Feed received bytes; return the frames the application must act on.

        Frames returned are INVOKE, RESULT, ERROR, EVENT, CANCEL, ROUTE_OPEN,
        ROUTE_CLOSE (see :mod:`tether.routes`) and GOODBYE. HELLO, PING, PONG
        and RELEASE are answered here. Nothing
        after the peer's GOODBYE is returned, in this read or a later one.
        ``data`` must not be modified afterwards: frames may hold views into
        it. After this returns, call :meth:`data_to_send` and write what it gives.

        Raises:
            ProtocolError: the peer broke the protocol (also: an INVOKE, STREAM
                or ROUTE_OPEN reusing the id of a request in :attr:`served`);
                the state is now CLOSED and the store closed.
        """
        if self.state is State.CLOSED or self.their_goodbye:
            return []
        try:
            parser = self._parser
            try:
                frames = parser.feed(data)
            except ProtocolError:
                # Whatever follows a GOODBYE is ignored, even bytes that don't parse.
                frames = parser.parsed
                if not any(f.kind == K_GOODBYE for f in frames):
                    raise
            parser.parsed = _NO_FRAMES  # (it would keep this read's frames alive)
            taken = self._taken  # handshake frames taken while parsing, see _claim
            if taken or self._handshaking:
                self._taken = 0
                if self._handshaking:
                    taken += self._take_handshake(frames, taken)
                frames = frames[taken:]
            take_all = self.state is State.OPEN  # checked again after each GOODBYE
            if take_all:
                for f in frames:  # a read of events and answers only: nothing to do per frame
                    if f.kind not in _PLAIN:
                        break
                else:
                    return self._passed(frames)
            out: list[Frame] = []
            append = out.append
            served = self.served
            for f in frames:
                k = f.kind
                if k in _PLAIN:  # the common case, kept short
                    if take_all or (k in _WHILE_CLOSING and not self.their_goodbye):
                        append(f)
                    continue
                if k == K_INVOKE:
                    rid = f.request_id
                    if not rid:
                        raise ProtocolError("INVOKE with request id 0")
                    if take_all:
                        if rid in served:
                            raise _reused(rid)
                        served.add(rid)
                        append(f)
                    continue
                if k == K_CANCEL:
                    served.discard(f.request_id)  # its id may be used again (9.1)
                    if take_all:
                        append(f)
                    continue
                if k == _K_ROUTE_OPEN:  # answered as it is dispatched: checked, not kept
                    if f.request_id in served:
                        raise _reused(f.request_id)
                    if take_all:
                        append(f)
                    continue
                if k == K_HELLO:
                    raise ProtocolError("second HELLO on an open connection")
                if k == Kind.AUTH:
                    raise ProtocolError("AUTH outside the handshake")
                if self.their_goodbye:
                    continue  # nothing the peer sends after its GOODBYE counts
                if k == K_GOODBYE:
                    self.goodbye_reason = self._goodbye_reason(f)
                    self.their_goodbye = True
                    self.state = State.CLOSING
                    take_all = False
                    append(f)
                elif k == Kind.RELEASE:
                    if self._store is not None:
                        self._store.returned(f.request_id)
                elif not take_all:
                    continue  # we said goodbye: no PONG or ROUTE_CLOSE any more
                elif k == Kind.PING:
                    self._auto_reply()
                    self._emit(Kind.PONG, f.request_id, 0, b"", b"")
                elif k in _STREAM_KINDS:  # docs/protocol.md 7.6
                    if not self.streams:
                        raise ProtocolError(
                            f"frame kind {k} from a peer that did not announce stream"
                        )
                    if k == K_STREAM:
                        rid = f.request_id
                        if not rid:
                            raise ProtocolError("STREAM with request id 0")
                        if rid in served:
                            raise _reused(rid)
                        served.add(rid)
                    append(f)
                # PONG: nothing to do
            return self._passed(out, frames)
        except ProtocolError:
            self.abort()
            raise

    def _passed(self, out: list[Frame], frames: list[Frame] | None = None) -> list[Frame]:
        """The last steps of :meth:`receive_data` (``frames``: all of the read, if not ``out``).

        Raises:
            ProtocolError: descriptors arrived that no frame claims (the caller aborts).
        """
        if self.json:
            _from_json(out if frames is None else frames)
        if self._fds_in:
            self._check_unclaimed()
            if self._copying:
                self._release_copies()
        if self.pickle:
            for f in out:
                f.pickle = True
        if self.trace_context:
            self._take_contexts(out)
        if _tracing.hook is not None and out:  # tracing: once per read, not per frame
            _tracing.hook.received(self, out)
        return out

    def _take_contexts(self, frames: list[Frame]) -> None:
        """Split a trace context off the channel of each INVOKE that carries one (7.7)."""
        for f in frames:
            if f.kind == K_INVOKE and "\0" in f.channel:
                f.channel, ctx = f.channel.split("\0", 1)
                self.contexts[f.request_id] = ctx.split("\0", 1)[0]

    def _auto_reply(self) -> None:
        """Count a reply the core makes by itself (PONG, ROUTE_CLOSE).

        A peer that sends PINGs faster than the I/O layer takes their PONGs
        (it does not read them) would grow this side's memory without a
        handler ever running: past :data:`MAX_AUTO_REPLIES` untaken, it is
        a protocol error.
        """
        self._auto += 1
        if self._auto > MAX_AUTO_REPLIES:
            raise ProtocolError(
                f"more than {MAX_AUTO_REPLIES} PONG/ROUTE_CLOSE replies queued: "
                "the peer does not read what it asks for"
            )

    def _check_unclaimed(self) -> None:
        store = self._store
        assert store is not None
        n = store.unclaimed
        if n > MAX_UNCLAIMED_FDS:
            raise ProtocolError(f"{n} file descriptors arrived that no frame claims")
        self._fds_in = n > 0

    def _release_copies(self) -> None:
        """RELEASE at once every lent segment this read copied out (docs/protocol.md 3.5)."""
        assert self._store is not None
        done = self._store.released()
        if done and self.state is not State.CLOSED and not self.our_goodbye:
            for lease in done:
                self._emit(Kind.RELEASE, lease, 0, b"", b"")

    def receive_eof(self) -> None:
        """The peer closed its end; the state is now CLOSED.

        Raises:
            ProtocolError: the stream ended in the middle of a frame.
            AuthenticationError: it ended after the peer's HELLO and before its AUTH.
        """
        buffered = self._parser.buffered
        self.state = State.CLOSED
        if self._proof_due:
            raise AuthenticationError(
                "the peer closed the connection instead of proving the shared secret: "
                "it refused ours (the secrets differ)"
            )
        if buffered:
            raise ProtocolError(f"connection closed in the middle of a frame ({buffered} bytes)")

    def _take_handshake(self, frames: list[Frame], start: int) -> int:
        """Take the peer's HELLO (and AUTH) from ``frames[start:]``; return how many were taken."""
        i = start
        if self._hello is None:
            if i >= len(frames):
                return 0
            self._handshake(frames[i])
            i += 1
        if self._proof_due and i < len(frames):
            self._check_proof(frames[i])
            i += 1
        if not self._proof_due:
            self._handshaking = False
        return i - start

    def _check_proof(self, f: Frame) -> None:
        """Verify the peer's AUTH frame; the handshake is then complete."""
        if f.kind != Kind.AUTH:
            raise AuthenticationError(
                f"expected the peer's AUTH proof, got frame kind {f.kind}: "
                "nothing is accepted before the shared secret is proven"
            )
        hello = self._hello
        assert hello is not None and self._secret is not None
        expected = auth_proof(self._secret, not self._initiator, self._nonce, hello.nonce)
        if not hmac.compare_digest(bytes(f.body), expected):
            raise AuthenticationError("the peer's AUTH proof is wrong: it has another secret")
        self._proof_due = False
        self._open(hello)

    def _handshake(self, f: Frame) -> None:
        if f.kind != Kind.HELLO:
            raise ProtocolError(f"not a tether peer: expected HELLO, got frame kind {f.kind}")
        try:
            hello = (codec.json_hello_decoder if self.json else codec.hello_decoder).decode(f.body)
        except (msgspec.MsgspecError, RecursionError) as exc:
            raise ProtocolError(f"not a tether peer: malformed HELLO: {exc}") from None
        if (hello.encoding or "msgpack") != ("json" if self.json else "msgpack"):
            raise ProtocolError(
                f"peer's bodies are {hello.encoding or 'msgpack'!r}, this connection's "
                f"{'json' if self.json else 'msgpack'!r}"
            )
        if hello.protocol != codec.PROTOCOL_NAME:
            raise ProtocolError(
                f"not a tether peer: it speaks {hello.protocol!r}, not {codec.PROTOCOL_NAME!r}"
            )
        if hello.version != codec.PROTOCOL_VERSION:
            raise ProtocolError(
                f"peer speaks protocol version {hello.version}; "
                f"this side supports {codec.PROTOCOL_VERSION}"
            )
        if hello.max_frame_size < 0 or 0 < hello.max_frame_size < MIN_MAX_FRAME_SIZE:
            raise ProtocolError(
                f"peer's max_frame_size {hello.max_frame_size} is below the floor "
                f"of {MIN_MAX_FRAME_SIZE} bytes"
            )
        self._hello = hello
        if self._secret is not None:
            if not hello.nonce:
                raise AuthenticationError(
                    "the peer has no shared secret (its HELLO has no nonce); this side requires one"
                )
            if len(hello.nonce) != NONCE_SIZE or hello.nonce == self._nonce:
                raise AuthenticationError(f"the peer's nonce is not {NONCE_SIZE} fresh bytes")
            proof = auth_proof(self._secret, self._initiator, hello.nonce, self._nonce)
            auth = bytearray(HEADER.pack(HEADER_SIZE - 4 + len(proof), Kind.AUTH, 0, 0, 0, 0, 0, 0))
            auth += proof
            self._out = self._pre + auth + self._out  # AUTH right behind our HELLO
            self._pre = bytearray()
            self._holding = False
            self._proof_due = True
            return
        if hello.nonce:
            raise AuthenticationError(
                "the peer requires a shared secret (its HELLO has a nonce) and this side has none"
            )
        self._open(hello)

    def _open(self, hello: codec.Hello) -> None:
        """The handshake is complete: take the peer's announced limits and features."""
        self._peer_fd = "fd" in hello.features
        self.peer_hello = hello
        store = self._store
        self._send_fds = store is not None and self._peer_fd
        self._send_moved = self._send_fds and "lease" in hello.features
        self._peer_copies = self._send_fds and "copy" in hello.features
        self._send_leases = (
            (self._send_moved or self._peer_copies) and store is not None and store.lend
        )
        self.pickle = self._pickle_local and "pickle" in hello.features
        self.streams = "stream" in hello.features
        self.trace_context = self._ctx_local and "trace" in hello.features
        if hello.max_frame_size and hello.max_frame_size < self.send_limit:
            self.send_limit = hello.max_frame_size  # never send what the peer must refuse
        if self.state is State.HANDSHAKE:
            self.state = State.OPEN

    def _goodbye_reason(self, f: Frame) -> str:
        try:
            return (
                (codec.json_goodbye_decoder if self.json else codec.goodbye_decoder)
                .decode(f.body)
                .reason
            )
        except (msgspec.MsgspecError, RecursionError):
            return ""

    def take_pending(self, request_id: int) -> Any:
        """Remove and return the waiter for ``request_id``; ``None`` if unknown.

        A result for an unknown id (a call that timed out or was cancelled)
        is not an error: it is simply dropped.
        """
        return self.pending.pop(request_id, None)

    def fail_all(self) -> list[Any]:
        """Close for good and hand back every pending waiter, to be failed."""
        if _tracing.hook is not None:  # tracing: end this connection's open spans
            _tracing.hook.conn_ended(self)
        self.abort()
        waiters = list(self.pending.values())
        self.pending.clear()
        return waiters

    def abort(self) -> None:
        """End the connection now: CLOSED, nothing more to send, the store closed.

        The I/O layer calls it when the transport is gone or it drops the
        peer; every descriptor and mapping the store holds is released (views
        the application still holds keep their own mappings). Idempotent.
        """
        self.state = State.CLOSED
        self._out = bytearray()
        self._released.clear()
        # A partial frame can be max_frame_size: free it now, and break the
        # cycles through bound methods so the rest goes without the cyclic GC.
        self._parser.reset()
        self._parser.parsed = _NO_FRAMES
        self.encoder = codec.encoder
        fds, self._fds_out = self._fds_out, []
        ready, self._ready = self._ready, collections.deque()
        store = self._store
        if store is not None:
            for _, chunk_fds in ready:
                store.close_fds(chunk_fds)
            store.close_fds(fds)
            self._drop_atts()
            store.close()

    # -- sending ----------------------------------------------------------

    def data_to_send(self) -> tuple[bytearray, list[int]]:
        """Return (and forget) the bytes to write and the descriptors that go with them.

        Send the descriptors with the first byte of the bytes, then close
        them. You must write all of the bytes. When frames queued carry more
        than :data:`MAX_UNCLAIMED_FDS` descriptors in all, they come in
        several chunks: call again until the bytes are empty.
        """
        self._auto = 0
        if self._holding:  # our AUTH can't be made yet: only the HELLO may go
            pre, self._pre = self._pre, bytearray()
            return pre, _NO_FDS
        if self._ready:
            chunk = self._ready.popleft()
        else:
            released = self._released
            while released:
                self._emit(Kind.RELEASE, released.popleft(), 0, b"", b"")
            out = self._out
            if out:
                self._out = bytearray()
            fds = self._fds_out
            if fds:
                self._fds_out = []
            chunk = out, fds or _NO_FDS
        if _tracing.hook is not None and chunk[0]:  # tracing: once per write, not per frame
            _tracing.hook.sent(self, chunk[0])
        return chunk

    @property
    def store(self) -> AttachmentStore | None:
        """The attachment store injected at construction (``None``: no descriptors)."""
        return self._store

    @property
    def handles_held(self) -> int:
        """Descriptors received as :class:`tether.Handle` alive and not yet taken."""
        return self._store.handles_held if self._store is not None else 0

    @property
    def leases_held(self) -> int:
        """Segments the peer lent this side whose views are still alive.

        While it is not 0, call :meth:`poll_releases` now and then.
        """
        return self._store.outstanding if self._store is not None else 0

    @property
    def unclaimed_fds(self) -> int:
        """Descriptors received that no frame has claimed yet."""
        return self._store.unclaimed if self._fds_in and self._store is not None else 0

    @property
    def buffered_in(self) -> int:
        """Bytes held for a frame not yet complete."""
        return self._parser.buffered

    @property
    def buffered_out(self) -> int:
        """Bytes queued by ``send_*`` and not yet taken by :meth:`data_to_send`."""
        if self._holding:
            return len(self._pre)  # the rest can't be taken before our AUTH
        if self._ready:
            return len(self._out) + sum(len(c) for c, _ in self._ready)
        return len(self._out)

    @property
    def passes_fds(self) -> bool:
        """Whether descriptors can be sent: both HELLOs listed ``fd`` (False before the peer's)."""
        return self._send_fds

    @property
    def fds_queued(self) -> bool:
        """Whether descriptors are queued (write them soon: each holds a segment open)."""
        return bool(self._fds_out or self._ready)

    def send_invoke(self, channel: bytes, args: Any, waiter: Any, route_id: int = 0) -> int:
        """Queue an INVOKE of ``channel`` with ``args`` (a tuple); return its request id."""
        if self.state is not _OPEN:
            self._check_open(args)
        rid = self._next_rid = (self._next_rid + 1) & _U32 or 1
        while rid in self.pending:  # wrapped onto a call still in flight
            rid = self._next_rid = (rid + 1) & _U32 or 1
        for a in args:  # (_wrap's test, inline)
            if type(a) in _BYTESLIKE and len(a) >= SHM_THRESHOLD:
                args = _wrap(args)
                break
        self._emit_obj(K_INVOKE, rid, route_id, channel, args)
        self.pending[rid] = waiter
        return rid

    def send_route_open(self, route_id: int, kind: bytes, args: Any, waiter: Any) -> int:
        """Queue a ROUTE_OPEN of ``kind``; return its request id (use :meth:`RouteTable.open`)."""
        if self.state is not State.OPEN:
            self._check_open(args)
        rid = self._next_rid = (self._next_rid + 1) & _U32 or 1
        while rid in self.pending:
            rid = self._next_rid = (rid + 1) & _U32 or 1
        self._emit_obj(Kind.ROUTE_OPEN, rid, route_id, kind, _wrap(args))
        self.pending[rid] = waiter
        return rid

    def route_table(self) -> RouteTable:
        """The routes of this connection (made on first use: most connections have none)."""
        if self.routes is None:
            self.routes = RouteTable(self)
        return self.routes

    def route_frame_allowed(self) -> bool:
        """Whether this side may still send frames (open, or handshaking, and no GOODBYE sent)."""
        return self.state is State.OPEN or self.state is State.HANDSHAKE

    def emit_route_close(self, route_id: int, auto: bool) -> None:
        """Queue a ROUTE_CLOSE (``auto``: an answer the peer asked for, counted like a PONG)."""
        if auto:
            self._auto_reply()
        self._emit(Kind.ROUTE_CLOSE, 0, route_id, b"", b"")

    def send_event(self, channel: bytes, args: Any, route_id: int = 0) -> None:
        """Queue a one-way EVENT on ``channel``."""
        if self.state is not _OPEN:
            self._check_open(args)
        for a in args:  # (_wrap's test, inline: this runs for every event)
            if type(a) in _BYTESLIKE and len(a) >= SHM_THRESHOLD:
                args = _wrap(args)
                break
        self._emit_obj(K_EVENT, 0, route_id, channel, args)

    def send_result(self, request_id: int, value: Any) -> None:
        """Queue the RESULT of an incoming invoke (dropped once this side said goodbye).

        Raises:
            PayloadTooLarge: the value does not fit; send an error instead.
            Exception: whatever encoding ``value`` raised (nothing was queued).
        """
        if self.state is not _OPEN and (self.state is State.CLOSED or self.our_goodbye):
            _consume_all(value)
            return
        if type(value) in _BYTESLIKE and len(value) >= SHM_THRESHOLD:
            value = _Blob(value)
        self._emit_obj(K_RESULT, request_id, 0, b"", value)
        self.served.discard(request_id)

    def answer(self, request_id: int, value: Any) -> None:
        """Queue the RESULT of an incoming invoke, or the ERROR saying why it can't be sent.

        Every invoke gets exactly one answer: a value that does not encode
        (any exception: TypeError, OverflowError, RecursionError...) or does
        not fit becomes an error for the caller, never a lost reply. The
        error carries no traceback: it would show tether's encoder, not the
        handler.
        """
        try:
            self.send_result(request_id, value)
        except PayloadTooLarge as exc:
            self.send_error(request_id, codec.ErrorInfo("too_large", f"result too large: {exc}"))
        except Exception as exc:
            info = is_a_stream(value)  # invoke() on a generator handler
            self.send_error(request_id, info or codec.error_info(exc, traceback=False))

    def send_error(self, request_id: int, info: codec.ErrorInfo) -> None:
        """Queue an ERROR answer to an incoming invoke; it always fits.

        An ERROR larger than the peer accepts is cut down: first its
        traceback (the end kept), then to a bare code and message (the
        message truncated). Dropped once this side said goodbye.
        """
        if self.state is not State.OPEN and (self.state is State.CLOSED or self.our_goodbye):
            return
        self.served.discard(request_id)
        for attempt in _smaller_errors(info, self.send_limit):
            try:
                self._emit_obj(K_ERROR, request_id, 0, b"", attempt)
                return
            except Exception:  # too large, or a str that does not encode: smaller
                continue

    def send_cancel(self, request_id: int, reason: str = "cancelled") -> None:
        """Forget the call ``request_id`` and ask the peer to cancel its handler.

        ``reason`` (``"timeout"``, ``"cancelled"``) ends the call's span in a trace.
        """
        self.pending.pop(request_id, None)
        if _tracing.hook is not None:
            _tracing.hook.call_ended(self, request_id, reason)
        if self.state in (State.OPEN, State.HANDSHAKE):
            self._emit(Kind.CANCEL, request_id, 0, b"", b"")

    def send_ping(self, nonce: int) -> None:
        """Queue a PING; the peer answers with a PONG carrying ``nonce``.

        A PING is not a barrier: the PONG says the peer's reader is alive,
        not that answers to earlier invokes were sent.
        """
        self._check_open()
        self._emit(Kind.PING, nonce, 0, b"", b"")

    def send_goodbye(self, reason: str = "") -> None:
        """Queue a GOODBYE; it is the last frame this side sends."""
        if self.state in (State.OPEN, State.HANDSHAKE):
            enc = codec.json_encoder if self.json else codec.encoder
            self._emit(Kind.GOODBYE, 0, 0, b"", enc.encode(codec.Goodbye(reason)))
            self.our_goodbye = True
            self._released.clear()
            self.state = State.CLOSING

    def _check_open(self, args: Any = ()) -> None:
        if self.state is State.CLOSING or self.state is State.CLOSED:
            _consume_all(args)  # a failed send moves its Buffers too
            raise ConnectionClosed("the connection is closing or closed")

    def _emit(self, kind: int, rid: int, route: int, channel: bytes, body: bytes) -> None:
        size = HEADER_SIZE - 4 + len(channel) + len(body)
        out = self._out
        out += HEADER.pack(size, kind, 0, len(channel), rid, route, 0, 0)
        out += channel
        out += body

    def _emit_obj(self, kind: int, rid: int, route: int, channel: bytes, obj: Any) -> None:
        """Append a frame whose body is ``obj`` encoded in place (no temporary bytes).

        On any failure nothing of the frame stays queued and its attachments
        are undone (descriptors closed, lent segments taken back).
        """
        out = self._out
        start = len(out)
        out += _BLANK_HEADER  # filled in once the size is known
        out += channel
        try:
            self.encoder.encode_into(obj, out, -1)
        except BaseException:
            del out[start:]
            self._drop_atts()
            _consume_all(obj)  # Buffers the encoder did not reach are moved too
            raise
        if self._atts:
            self._place_atts(out, start, kind, rid, route, channel)
            return
        size = len(out) - start - 4
        if size > self.send_limit:
            del out[start:]
            raise self._too_large(size, 0)
        HEADER.pack_into(out, start, size, kind, 0, len(channel), rid, route, 0, 0)

    def _too_large(self, size: int, fd_bytes: int) -> PayloadTooLarge:
        return PayloadTooLarge(
            f"frame of {size} bytes (and {fd_bytes} in descriptors) exceeds "
            f"the limit of {self.send_limit} bytes ({self.too_large_hint})"
        )

    def _place_atts(
        self, out: bytearray, start: int, kind: int, rid: int, route: int, channel: bytes
    ) -> None:
        """Finish a frame whose body, just encoded, took attachments: table, body, inline data."""
        atts = self._atts
        n_att = len(atts)
        fd_bytes = 0
        body_start = start + HEADER_SIZE + len(channel)
        body = bytes(out[body_start:])
        del out[body_start:]
        for a in atts:
            out += ATT.pack(a.where, a.flags, 0, a.aux, a.length)
            if a.where == WHERE_FD:
                fd_bytes += a.length
        out += body
        for a in atts:
            if a.where == WHERE_INLINE:
                out += a.data
        size = len(out) - start - 4
        if size > self.send_limit or fd_bytes > self.send_limit:
            del out[start:]
            self._drop_atts()
            raise self._too_large(size, fd_bytes)
        HEADER.pack_into(out, start, size, kind, 0, len(channel), rid, route, n_att, 0)
        self._atts = []
        self._handles_sent.clear()
        if fd_bytes or any(a.where == WHERE_FD for a in atts):
            fds = [a.fd for a in atts if a.where == WHERE_FD]
            if self._fds_out and len(self._fds_out) + len(fds) > MAX_UNCLAIMED_FDS:
                # Cut here: the peer holds at most one chunk's descriptors unclaimed.
                self._ready.append((out[:start], self._fds_out))
                del out[:start]
                self._fds_out = []
            self._fds_out.extend(fds)

    # -- streams (docs/protocol.md 7.6; their accounting: tether.streams) ---

    def send_stream(
        self, channel: bytes, args: Any, waiter: Any, credit: int, route_id: int = 0
    ) -> int:
        """Queue a STREAM of ``channel`` and the CREDIT of ``credit`` items; return its request id.

        ``waiter`` gets the RESULT or ERROR that ends the stream, as an
        invoke's does (:attr:`pending`).

        Raises:
            StreamMismatch: the peer did not announce ``stream``.
        """
        if self.state is not State.OPEN:
            self._check_open(args)
        if not self.streams:
            _consume_all(args)
            raise StreamMismatch("the peer does not take streams (its HELLO lists no 'stream')")
        rid = self._next_rid = (self._next_rid + 1) & _U32 or 1
        while rid in self.pending:
            rid = self._next_rid = (rid + 1) & _U32 or 1
        self._emit_obj(K_STREAM, rid, route_id, channel, _wrap(args))
        self.pending[rid] = waiter
        self._emit(Kind.CREDIT, rid, 0, b"", credit_body(credit))
        return rid

    def send_credit(self, request_id: int, n: int) -> None:
        """Grant the producer of stream ``request_id`` ``n`` more items (dropped once closing)."""
        if self.state is State.OPEN and request_id in self.pending:
            self._emit(Kind.CREDIT, request_id, 0, b"", credit_body(n))

    def send_item(self, request_id: int, value: Any) -> None:
        """Queue one ITEM of stream ``request_id`` (the producer holds credit for it).

        Raises:
            ConnectionClosed: this side said goodbye or the connection is closed.
            PayloadTooLarge: the item does not fit in a frame.
            Exception: whatever encoding ``value`` raised (nothing was queued).
        """
        if self.state is not State.OPEN and (self.state is State.CLOSED or self.our_goodbye):
            _consume_all(value)
            raise ConnectionClosed("the connection is closing or closed")
        if type(value) in _BYTESLIKE and len(value) >= SHM_THRESHOLD:
            value = _Blob(value)
        self._emit_obj(K_ITEM, request_id, 0, b"", value)

    # -- attachments ------------------------------------------------------

    def _enc_hook(self, obj: Any) -> Any:
        """Move buffers, arrays and :class:`~tether.Buffer` out of the body."""
        if isinstance(obj, _Blob):
            return self._attach_ext(memoryview(obj.data).cast("B"))
        if getattr(obj, "__tether_buffer__", False):
            store = self._store
            if store is None or not self._send_fds or self._fd_count() >= MAX_UNCLAIMED_FDS:
                view = obj.take_bytes()
                return self._ext(_Att(WHERE_INLINE, view.nbytes, data=view))
            if self._send_moved:  # the peer trusts us: O(1) handoff
                fd, n = store.move(obj, True)
                return self._ext(_Att(WHERE_FD, n, fd=fd, flags=FLAG_MOVED))
            fd, n = store.move(obj, False)
            return self._ext(_Att(WHERE_FD, n, fd=fd))
        if getattr(obj, "__tether_handle__", False):
            return self._handle_ext(obj)
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
        if self.pickle:  # both ends opted in (a main and its child): pickle the rest
            return msgspec.msgpack.Ext(codec.EXT_PICKLE, _pickle.dumps(obj, protocol=5))
        raise TypeError(f"objects of type {type(obj).__name__} cannot be sent")

    def _handle_ext(self, handle: Any) -> msgspec.msgpack.Ext:
        """A :class:`~tether.Handle`: its descriptor passed as a value (EXT_HANDLE)."""
        if self._store is None or not self._send_fds:
            raise handle.refuse(
                "a tether.Handle cannot be sent on this connection: it passes no file "
                "descriptors (the peer did not announce 'fd'; only unix sockets and "
                "socketpairs carry them, not TCP, WebSocket or NATS)"
            )
        if handle.consumed and any(h is handle for h in self._handles_sent):
            raise ConsumedError(
                "the same tether.Handle was passed twice in one call: a Handle is one "
                "descriptor, sent once (Handle.from_file(h) before sending makes a second)"
            )
        if self._fd_count() >= MAX_UNCLAIMED_FDS:
            raise handle.refuse(
                f"more than {MAX_UNCLAIMED_FDS} descriptors in one message (Handles, large buffers)"
            )
        self._ext(_Att(WHERE_FD, 0, fd=handle.take(), flags=FLAG_HANDLE))
        self._handles_sent.append(handle)
        return msgspec.msgpack.Ext(codec.EXT_HANDLE, (len(self._atts) - 1).to_bytes(4, "little"))

    def _fd_count(self) -> int:
        return sum(1 for a in self._atts if a.where == WHERE_FD)

    def _attach_ext(self, view: memoryview) -> msgspec.msgpack.Ext:
        n = view.nbytes
        store = self._store
        if (
            store is None
            or not self._send_fds
            or n < SHM_THRESHOLD
            or self._fd_count() >= MAX_UNCLAIMED_FDS
        ):
            return self._ext(_Att(WHERE_INLINE, n, data=view))
        if self._send_leases:
            # Lend a pooled segment: pages already faulted in, one copy at memory speed
            # (a copying peer makes its own copy and gives the segment back at once).
            lent = store.lend_segment(view, self._peer_copies)
            if lent is not None:
                fd, lease = lent
                return self._ext(_Att(WHERE_FD, n, fd=fd, flags=FLAG_LEASE, aux=lease))
        # Sealed and given away: nothing stays held here however long the peer keeps it.
        fd, n = store.seal(view)
        return self._ext(_Att(WHERE_FD, n, fd=fd))

    def _ext(self, att: _Att) -> msgspec.msgpack.Ext:
        index = len(self._atts)
        self._atts.append(att)
        return msgspec.msgpack.Ext(codec.EXT_BYTES, index.to_bytes(4, "little"))

    def _drop_atts(self) -> None:
        """Undo the attachments of a frame that will not be sent."""
        atts, self._atts = self._atts, []
        self._handles_sent.clear()
        store = self._store
        if store is None:
            return
        for a in atts:
            if a.where == WHERE_FD:
                store.unsent(a.fd, a.aux if a.flags & FLAG_LEASE else 0)


def _reused(rid: int) -> ProtocolError:
    """A request id reused while its request is still served (docs/protocol.md 9.1).

    The receiver would lose track of the first request (never cancelled,
    outliving the connection): a protocol error, whatever the I/O layer.
    """
    return ProtocolError(f"request id {rid} reused while its request is still served")


def _from_json(frames: Iterable[Frame]) -> None:
    """Re-encode a JSON peer's bodies as MessagePack, in place (module docstring).

    A body that is not JSON becomes one that is not MessagePack either, so it
    meets the rule for malformed bodies: ``bad_request`` for an INVOKE, a
    dropped EVENT, a decoding error for the caller of a RESULT or ERROR.

    Raises:
        ProtocolError: a frame has attachments (JSON has nowhere to refer to them).
    """
    for f in frames:
        if f.attachments:
            raise ProtocolError("attachments on a JSON connection")
        if f.kind in _JSON_BODIES:
            try:
                f.body = codec.encoder.encode(codec.json_any_decoder.decode(f.body))
            except Exception as exc:  # not JSON, too deep, an integer beyond 64 bits...
                f.body = codec.bad_json(exc)


def _json_hook(obj: Any) -> Any:
    """What JSON bodies make of values MessagePack would carry as attachments.

    Large bytes and :class:`~tether.Buffer` contents become bytes (base64
    strings in JSON), NumPy arrays nested lists; nothing is ever pickled.
    """
    if isinstance(obj, _Blob):
        return memoryview(obj.data).cast("B")
    if getattr(obj, "__tether_buffer__", False):
        return obj.take_bytes()
    if hasattr(obj, "__array_interface__") and type(obj).__module__ == "numpy":
        return obj.tolist()
    raise TypeError(f"objects of type {type(obj).__name__} cannot be sent")


def _smaller_errors(info: codec.ErrorInfo, limit: int) -> Iterable[codec.ErrorInfo]:
    """``info``, then ever smaller versions of it, the last one sure to fit ``limit``."""
    yield info
    room = max(limit - _ERROR_OVERHEAD, 64)
    if info.traceback:
        fixed = len(info.message.encode("utf-8", "replace")) + len(info.type) + len(info.path)
        keep = room - fixed
        if keep > 0:
            tb = info.traceback[-keep:]  # the end: where it was raised
            while len(tb.encode("utf-8", "replace")) > keep:
                tb = tb[len(tb) // 8 + 1 :]
            yield codec.ErrorInfo(info.code, info.message, info.type, tb, info.path)
    msg = info.message.encode("utf-8", "replace")[: room // 2].decode("utf-8", "ignore")
    yield codec.ErrorInfo(info.code[:64], msg, info.type[:256])
    yield codec.ErrorInfo("remote", "(the error could not be described)")


def _consume_all(obj: Any, _depth: int = 0) -> None:
    """Consume every :class:`~tether.Buffer` in ``obj`` (also inside containers).

    A send that fails before or while encoding moves its Buffers all the same.
    """
    if getattr(obj, "__tether_buffer__", False) or getattr(obj, "__tether_handle__", False):
        obj.close()
    elif _depth < 64 and isinstance(obj, (list, tuple, set, frozenset, dict)):
        for x in obj.values() if isinstance(obj, dict) else obj:
            _consume_all(x, _depth + 1)


def _wrap(args: tuple[Any, ...]) -> tuple[Any, ...]:
    """Mark large top-level bytes-like arguments to travel out of band."""
    for a in args:
        if type(a) in _BYTESLIKE and len(a) >= SHM_THRESHOLD:
            return tuple(
                _Blob(x) if type(x) in _BYTESLIKE and len(x) >= SHM_THRESHOLD else x for x in args
            )
    return args
