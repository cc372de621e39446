"""The asyncio side of one connection: :class:`Peer`.

Thin over the protocol core: bytes from the :class:`~.stream.SocketStream`
go to :class:`~tether.protocol.Connection`, the frames it returns are
dispatched by plain calls (a task only for ``async`` handlers), and what the
connection queued is written once per loop turn, so frames issued together
share one ``send`` syscall.

Inbound flow control (websockets' ``Assembler`` pattern): what a peer makes
this side hold -- answers not yet written, handler and listener tasks still
running -- is bounded. Past a high-water mark the peer's socket is no longer
read (the kernel's buffer then pushes back on the sender); under the low-water
mark reading resumes. The bound is on reading, not parsing: frames already
parsed when the mark is passed wait, in order, in a backlog. While paused,
the answers to this side's own calls are still read (a handler awaiting this
peer can finish), within a bound.

Per-peer limits (see README, "Limits"): at most ``max_inflight`` invokes from
the peer run as handler tasks at once; one more is answered at once with an
ERROR ``busy`` (:class:`~tether.Busy` for the caller) instead of costing a
task. Outgoing bytes queued for a peer that stops reading are bounded by
``max_queued``: a ``send``/``invoke`` that finds more queued drops the peer
(it and every caller see :class:`~tether.PeerGone`); and a sender waits for a
lagging peer to read at most ``drain_timeout`` seconds before the peer is
dropped the same way. So a stalled reader holds neither memory nor a sender
forever.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import os
import select
import socket
import time
import traceback
from collections.abc import Callable, Iterable, Iterator
from typing import Any, Final, TypeVar, overload

from .. import codec, direct, otel
from ..attachments import MemfdStore, store_for
from ..errors import (
    ConnectionClosed,
    InvokeTimeout,
    PeerGone,
    ProtocolError,
    TetherError,
)
from ..handles import HANDLES_HIGH, HANDLES_LOW, held_size
from ..identity import NO_CREDENTIALS, Credentials, peer_address, peer_credentials
from ..polling import Solo, SpinPolicy
from ..protocol import Connection, State
from ..registry import Call, Handler, Handlers, Registry
from ..results import (
    DEFAULT,
    DEFAULT_TIMEOUT,
    checked_timeout,
    decode_error,
    decode_result,
    timeout_message,
)
from ..routes import route_handler, route_listeners
from ..shm import consume_all
from ..streams import DEFAULT_WINDOW
from ..wire import (
    DEFAULT_MAX_FRAME_SIZE,
    K_CANCEL,
    K_ERROR,
    K_EVENT,
    K_GOODBYE,
    K_INVOKE,
    K_RESULT,
    K_STREAM,
    Frame,
)
from . import streaming
from .route import (
    MAX_ROUTES,
    ROUTE_FRAMES,
    Route,
    dispatch_route_frame,
    end_routes,
    open_route,
)
from .stream import SocketStream, Stream

__all__ = ["Peer"]

log = logging.getLogger("tether")

T = TypeVar("T")


HIGH_WATER: Final = 4 * 1024 * 1024  # unsent bytes past which senders wait and reading stops
LOW_WATER: Final = 1024 * 1024  # ...and under which they go on
MAX_TASKS: Final = 1024  # handler and listener tasks past which reading stops
TASKS_LOW: Final = 256  # ...and under which it resumes
MAX_HELD: Final = 1024 * 1024  # bytes read while paused (for answers) before reading stops
#: default ``max_inflight``: invokes from one peer running in handler tasks at once
MAX_INFLIGHT: Final = 1024
#: default ``max_queued``: bytes queued for a peer that stops reading before it is dropped
MAX_QUEUED: Final = 64 * 1024 * 1024
#: default ``drain_timeout``: seconds a sender waits for a lagging peer to read
DRAIN_TIMEOUT: Final = 60.0
#: seconds between checks, while reading is paused, that the peer has not hung up
HANGUP_CHECK: Final = 1.0
FLUSH_SIZE: Final = 64 * 1024  # queued bytes that are written at once, not at the next turn
_BURST: Final = 10e-6  # invokes closer together than this are coalesced into one write
_LEASE_POLL: Final = 0.002  # first wait between checks for dropped views of lent segments
_LEASE_POLL_MAX: Final = 1.0  # the wait doubles up to this while nothing is released
FD_CLAIM_TIMEOUT: Final = 5.0  # seconds received descriptors may wait for their frame
_REAP_GRACE: Final = 0.5  # how long close() waits for listeners it had to cancel
_HELLO_WAIT: Final = 10.0  # a call with no timeout waits this long for the peer's HELLO
_INF: Final = float("inf")
_NUMBERS: Final = (float, int)  # exactly: a bool is no timeout
_THREAD_POLL: Final = 1.0  # how often send_threadsafe checks that the loop still runs
_OPEN: Final = State.OPEN
_ANSWERS: Final = frozenset((K_RESULT, K_ERROR))
_EXITS: Final = (SystemExit, KeyboardInterrupt)
_SOLO: Final = Solo()  # polling only while one peer of the process is busy


_warned_at = 0.0
_warned = 0
#: "broke the protocol" lines logged per second at most, per process (the rest
#: are counted and reported once): a flood of bad peers is not a flood of lines
WARNINGS_PER_SECOND: Final = 10


def _may_warn() -> bool:
    global _warned_at, _warned
    now = time.monotonic()
    if now - _warned_at >= 1.0:
        if _warned > WARNINGS_PER_SECOND:
            log.warning("%d more protocol errors were not logged", _warned - WARNINGS_PER_SECOND)
        _warned_at, _warned = now, 0
    _warned += 1
    return _warned <= WARNINGS_PER_SECOND


def _descriptors(conn: Connection, atts: Iterable[Any]) -> int:
    """How many of a frame's attachments count as received descriptors held (Handles, maps)."""
    store = conn.store
    if not isinstance(store, MemfdStore):
        return 0
    return sum(store.holds_descriptor(a) for a in atts)


def _drop_locals(exc: BaseException) -> None:
    """Clear the locals of ``exc``'s finished frames: it is about to end a task that keeps it.

    A handler's frames would otherwise hold its arguments (received
    attachments) for as long as the task object lives, often in a cycle
    that only a garbage collection breaks.
    """
    traceback.clear_frames(exc.__traceback__)


class Peer(Handlers):
    """One connection to another tether endpoint, driven by asyncio.

    Both sides may ``invoke``/``send`` and ``handle``/``on``. A peer made by
    :func:`tether.connect` or passed to a child's target owns its handlers; a
    peer that connected to a :class:`~tether.Main` shares the main's handlers.

    Every invoke this side receives gets exactly one answer. A handler that
    raises any exception -- also a ``BaseException`` such as ``SystemExit``,
    ``KeyboardInterrupt``, ``GeneratorExit`` or a ``CancelledError`` it raised
    itself -- is answered with an ERROR (code ``remote``, the exception's type
    name). Then ``SystemExit`` and ``KeyboardInterrupt`` propagate, as Python
    would (the event loop stops), once the ERROR was written; any other
    ``BaseException`` is only answered and logged. A handler cancelled because
    the caller sent CANCEL (or timed out) is not answered: the caller forgot
    the call (its ``call.cancelled`` is set first, and a ``thread=True``
    handler, which cannot be interrupted, sees only that); nor is one
    cancelled from outside (its task cancelled, as when the loop ends with the
    process): the caller gets :class:`PeerGone` then.

    Attributes:
        role: the role granted to the *other* side (``child``, ``client``,
            ``main``...). Handlers restricted with ``roles=`` check it.
        timeout: the default invoke timeout in seconds (``None``: wait forever).
        spin: polling the socket instead of sleeping while an answer or the
            next request is due (it saves the 20-30 us a sleeping process
            takes to wake). ``None`` (the default): adaptive, learned from this
            peer's recent answer times and request gaps, only while they
            average under :data:`tether.polling.HIT_BOUND`, backing off when polling
            does not pay, never on an idle connection or with fewer than 2
            usable CPUs (:mod:`tether.polling`). 0 turns it off; a number of
            seconds polls that long at every chance (low-latency mode). Polling
            runs when the loop has nothing else ready, and blocks it for at most
            one window at a time, so other peers get their turn.
        tracebacks: whether ERRORs this side sends carry the handler's
            traceback (file paths, source lines): only for peers trusted to see them.
        local: whether the other side is *local*: a spawned child, a unix
            peer of main's own user, or (on a client or child) the main it
            talks to. Handlers registered without ``roles=`` answer only
            local peers; a stranger (TCP, another uid) reaches only handlers
            that name its role.
        uid, gid: the other process's user and group ids (``SO_PEERCRED`` on
            unix sockets and socketpairs; ``None`` over TCP).
        address: the other end: ``tcp://host:port``, ``unix://<path>`` (the
            listener's address for an accepted unix peer), ``child:<pid>``.
        origin: a web page's origin; ``None`` for every other peer.
        max_inflight: the most invokes from the other side that may run in
            ``async`` handler tasks, or run or wait in ``thread=True``
            handlers, at once (default :data:`MAX_INFLIGHT`); one more is
            answered at once with ERROR ``busy`` (the caller gets
            :class:`~tether.Busy`). Plain handlers answer inline and never count.
        max_routes: the most routes this side hosts for the other side at
            once, and opens to it (default 255); past it ``open`` gets
            :class:`~tether.Busy` (docs/protocol.md, 8.2).
        max_queued: the most bytes that may wait to be written to the other
            side (default :data:`MAX_QUEUED`). A ``send`` or ``invoke`` that
            finds more queued (the other side stopped reading) drops the
            connection and raises :class:`PeerGone`.
        drain_timeout: the longest a ``send``/``invoke`` waits for the other
            side to read what is queued for it (past :data:`HIGH_WATER`) down
            to :data:`LOW_WATER` (default :data:`DRAIN_TIMEOUT` seconds;
            ``None``: no limit). Then the peer is dropped as one that stopped
            reading, and the sender gets :class:`PeerGone`.
        secret: a shared secret both sides must prove in the handshake
            (docs/protocol.md, 6.1); ``initiator``: this side opened the connection.
        pickle: this side opts in to pickle (``Main.spawn(..., pickle=True)``
            sets it on both ends of a child's connection). Only when both
            ends do, objects msgspec cannot encode travel pickled; otherwise
            a pickle received is a ``BadRequest`` and is never unpickled.
        encoding: the bodies' encoding, ``"msgpack"`` or ``"json"`` (a page).

    ``sock`` is a connected socket, or any other :class:`~tether.aio.stream.Stream`
    (a WebSocket: :mod:`tether.web`), which then says nothing about who is on
    the other end: pass ``credentials`` and ``address``, or they stay unknown.
    """

    def __init__(
        self,
        sock: socket.socket | Stream,
        *,
        role: str,
        local_role: str,
        registry: Registry | None = None,
        timeout: float | None = DEFAULT_TIMEOUT,
        max_frame_size: int = DEFAULT_MAX_FRAME_SIZE,
        name: str = "",
        on_close: Callable[[Peer], None] | None = None,
        spin: float | None = None,
        tracebacks: bool = True,
        credentials: Credentials | None = None,
        address: str = "",
        local: bool = True,
        max_inflight: int = MAX_INFLIGHT,
        max_routes: int = MAX_ROUTES,
        max_queued: int = MAX_QUEUED,
        drain_timeout: float | None = DRAIN_TIMEOUT,
        secret: bytes | None = None,
        initiator: bool = True,
        pickle: bool = False,
        encoding: str = "msgpack",
    ) -> None:
        self._loop = asyncio.get_running_loop()
        self._stream: Stream
        #: the socket, for a peer on one (``None`` over another Stream)
        self._sock = sock if isinstance(sock, socket.socket) else None
        if isinstance(sock, socket.socket):
            self._stream = SocketStream(
                sock, self._loop, self._on_readable, self._write_failed, LOW_WATER
            )
        else:
            self._stream = sock
            sock.attach(self._on_readable, self._write_failed)
        self._fd = self._stream.fileno()
        self._conn = Connection(
            local_role,
            name=name,
            pid=os.getpid(),
            max_frame_size=max_frame_size,
            store=store_for(self._stream.unix, role, local_role),
            secret=secret,
            initiator=initiator,
            pickle=pickle,
            encoding=encoding,
            trace_context=encoding == "msgpack" and otel.available(),
        )
        self.registry = registry if registry is not None else Registry()
        self.role = role
        # Who is on the other end, read once here (see tether.identity).
        if credentials is None:
            credentials = (
                peer_credentials(sock) if isinstance(sock, socket.socket) else NO_CREDENTIALS
            )
        cred = credentials
        self._peer_pid = cred.pid
        self.uid: int | None = cred.uid
        self.gid: int | None = cred.gid
        if not address and isinstance(sock, socket.socket):
            address = peer_address(sock)
        self.address: str = address
        self.origin: str | None = None
        self.local = local
        self.timeout = timeout
        self.name = name
        #: whether ERRORs sent to the other side carry the handler's traceback
        self.tracebacks = tracebacks
        #: invokes from the other side allowed in handler tasks at once (more: ERROR ``busy``)
        self.max_inflight = max_inflight
        #: routes this side hosts for the other side at once (more: ``Busy``), and opens to it
        self.max_routes = max_routes
        #: bytes allowed to wait for a peer that does not read (more: the peer is dropped)
        self.max_queued = max_queued
        #: seconds a sender waits for the other side to read (then: dropped; None: forever)
        self.drain_timeout = drain_timeout
        self._on_close = on_close
        self._lease_timer: asyncio.TimerHandle | None = None
        self._lease_wait = _LEASE_POLL
        store = self._conn.store
        if isinstance(store, MemfdStore):
            store.on_release = self._lease_released
        self._last_direct = 0.0  # when an invoke last flushed on its own
        # rid -> (deadline, future, channel, timeout) of invokes with a timeout
        self._deadlines: dict[int, tuple[float, asyncio.Future[Any], str, float, bool]] = {}
        self._timer: asyncio.TimerHandle | None = None
        self._fd_timer: asyncio.TimerHandle | None = None
        self._timer_at = 0.0
        #: polling: None adaptive, 0 off, else a fixed window in seconds (tether.polling)
        self.spin = spin
        self._answer_poll = SpinPolicy(spin)  # waiting for answers to our invokes
        self._request_poll = SpinPolicy(spin)  # waiting for the next request after answering
        self._spin_handle: asyncio.Handle | None = None  # a poll queued behind ready callbacks
        self._spinning = False
        self._wrote = False  # something was written since the read began (an answer...)
        self._woke = False  # the last read resolved a future or started a task
        self._chan_cache: dict[str, bytes] = {}
        # channel -> (listener, decode, Call) of events dispatched inline (see _event_entry)
        self._ev_cache: dict[str, tuple[Any, ...]] = {}
        self._ev_version = -1
        self._ev_for: tuple[str, bool] = ("", False)
        # invokes being served by a task and still owing an answer (CANCEL pops them)
        self._serving: dict[int, Call | None] = {}  # each with its task in ``_task``
        # every handler and listener task until it ends: held, counted, cancelled on close
        self._tasks: set[asyncio.Task[Any]] = set()
        # streams by request id (tether.aio.streaming): read here / produced here
        self._streams_in: dict[int, Any] = {}
        self._streams_out: dict[int, Any] = {}
        # inbound flow control
        self._paused = False
        self._backlog: collections.deque[Frame] = collections.deque()
        self._held = 0  # bytes read, and attachment bytes held, while paused
        self._backlog_handles = 0  # received Handles in frames of the backlog
        self._handle_timer: asyncio.TimerHandle | None = None  # rechecks Handles while paused
        self._hup_timer: asyncio.TimerHandle | None = None  # looks for a hangup while paused
        self._drainer: asyncio.Task[None] | None = None
        self._dropped = False  # the connection dropped; reading never resumes
        self._flush_handle: asyncio.Handle | None = None
        self._closed: TetherError | None = None
        self._closed_fut: asyncio.Future[None] = self._loop.create_future()
        self._hello_fut: asyncio.Future[None] = self._loop.create_future()
        self._awaiting_hello = True
        self._started = False

    # -- lifecycle --------------------------------------------------------

    def start(self) -> None:
        """Start reading and writing. Frames queued before this are kept."""
        if self._started:
            return
        self._started = True
        self._set_reading()
        self._flush()

    async def wait_hello(self, timeout: float | None) -> None:
        """Wait for the other side's HELLO (bounded)."""
        try:
            await asyncio.wait_for(asyncio.shield(self._hello_fut), timeout)
        except TimeoutError:
            raise PeerGone(f"{self!r} sent no HELLO within {timeout} s") from None

    @property
    def closed(self) -> bool:
        """Whether the connection is closed (by either side)."""
        return self._closed is not None

    def fileno(self) -> int:
        """The connection's socket descriptor (-1 once closed)."""
        return self._stream.fileno()

    @property
    def close_reason(self) -> TetherError | None:
        """Why the connection closed (``None`` while open)."""
        return self._closed

    @property
    def remote_hello(self) -> codec.Hello | None:
        """The other side's HELLO (role it claims, name, pid), once received."""
        return self._conn.peer_hello

    @property
    def pid(self) -> int | None:
        """The other process's id, as the kernel says (``SO_PEERCRED``); ``None`` over TCP.

        Not the pid its HELLO claims (see :attr:`remote_hello`): that one is
        the peer's word, this one the kernel's.
        """
        return self._peer_pid

    def on_connect(self, fn: Callable[[Peer], Any]) -> Callable[[Peer], Any]:
        """Accept direct channels main opens with :meth:`Main.connect`; a decorator.

        ``fn(peer)`` gets the new :class:`Peer` for the other child (already
        started: register its handlers before the first ``await``); it may be
        a coroutine function. Raising refuses the channel. See :mod:`tether.direct`.
        """
        direct.register(self.registry, direct.aio_accept(self, fn))
        return fn

    async def wait_closed(self) -> None:
        """Wait until the connection is closed, by either side."""
        await asyncio.shield(self._closed_fut)

    async def close(self, reason: str = "closed", timeout: float = 1.0) -> None:
        """Say goodbye, flush what is queued and close; all bounded by ``timeout``.

        Pending invokes fail with :class:`ConnectionClosed`. Invoke handlers
        still running are cancelled (nobody will take their answers); event
        listeners still running may finish within what is left of ``timeout``,
        then they are cancelled too. When the *other* side goes away, running
        listeners are not cancelled: an event delivered is an event handled.
        """
        end = self._loop.time() + timeout
        if self._closed is None:
            self._conn.send_goodbye(reason)
            if not self._started:
                self.start()  # closed before it started: HELLO and GOODBYE still go out
            self._flush()
            if self._stream.buffered:
                with contextlib.suppress(TimeoutError, TetherError):
                    await asyncio.wait_for(self._wait_drained(0), timeout)
            self._shutdown(
                ConnectionClosed(f"connection to {self.name or self._fd} was closed: {reason}")
            )
        await self._reap(max(0.0, end - self._loop.time()))

    async def _reap(self, timeout: float) -> None:
        """Let running listeners finish within ``timeout``, then cancel what is left."""
        me = asyncio.current_task()
        tasks = [t for t in self._tasks if t is not me]
        if tasks:
            _, late = await asyncio.wait(tasks, timeout=timeout)
            for task in late:
                task.cancel()
            if late:
                await asyncio.wait(late, timeout=_REAP_GRACE)

    def abort(self, exc: TetherError) -> None:
        """Drop this peer now: pending calls fail with ``exc``, the socket closes.

        The bad-message rule (Chromium's): a peer that broke the protocol is
        dropped without a goodbye, and a spawned child is killed. Use it for
        any reason to end a connection at once; a :class:`ProtocolError` is
        logged as a warning.
        """
        if self._closed is not None:
            return
        if isinstance(exc, ProtocolError):
            if not self._hello_fut.done():  # who awaits the handshake reports it: one line
                log.debug("%r broke the protocol: %s", self, exc, extra=self._who())
            elif _may_warn():
                log.warning("%r broke the protocol: %s", self, exc, extra=self._who())
        self._dropped = True
        if isinstance(exc, PeerGone):
            self._shutdown(exc)
        else:
            self._lost(exc)

    def fail_calls(self, exc: TetherError) -> None:
        """Fail this side's pending invokes with ``exc`` and cancel them, keeping the connection.

        For a transport that outlives a lost link (NATS reconnects by
        itself): waiting callers learn at once, later calls go through.
        """
        conn = self._conn
        for rid, waiter in list(conn.pending.items()):
            if isinstance(waiter, asyncio.Future) and not waiter.done():
                conn.send_cancel(rid, "peer gone")
                waiter.set_exception(exc)
        self._kick()

    async def __aenter__(self) -> Peer:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    def _who(self) -> dict[str, Any]:
        """``extra=`` for a log record about this peer: its identity as ``record.peer``."""
        return {"peer": repr(self), "peer_pid": self.pid, "peer_address": self.address}

    def __repr__(self) -> str:
        # (no "open": the repr goes into the message of the error that closes it)
        state = " closed" if self._closed else "" if self._hello_fut.done() else " handshaking"
        return f"<Peer {self.name or self._fd} role={self.role}{state}>"

    # -- calling ----------------------------------------------------------

    def _new_chan(self, channel: object, args: tuple[Any, ...]) -> bytes:
        if type(channel) is not str:
            consume_all(args)  # a failed send moves its Buffers too
            raise TypeError(f"channel must be a str, not {type(channel).__name__}")
        b = self._chan_cache[channel] = channel.encode()
        return b

    @overload
    async def invoke(
        self, channel: str, *args: Any, timeout: float | None = ..., result_type: type[T]
    ) -> T: ...
    @overload
    async def invoke(
        self, channel: str, *args: Any, timeout: float | None = ..., result_type: Any = ...
    ) -> Any: ...
    async def invoke(
        self,
        channel: str,
        *args: Any,
        timeout: float | None = DEFAULT,
        result_type: type[T] | Any = Any,
    ) -> Any:
        """Call ``channel`` on the other side and return its result.

        A call made before the other side's HELLO arrived waits for it (within
        ``timeout``), so it is encoded with the features the peer announced
        (shared memory for large arrays).

        Args:
            timeout: seconds to wait; defaults to the peer's ``timeout``.
                ``None`` waits forever. On expiry the remote handler is cancelled.
            result_type: decode and validate the result as this type (and
                the type checker sees it). ``bytes`` gives bytes at every
                size; ``memoryview`` keeps a large result's zero-copy view.

        Raises:
            InvokeTimeout, RemoteError, NoHandler, Forbidden, BadRequest,
            PeerGone (also when the peer said goodbye), ProtocolError,
            ConnectionClosed (this side closed it), PayloadTooLarge.
            TypeError: ``channel`` is not a str, or ``timeout`` not a number.
            ValueError: ``timeout`` is negative or NaN.
        """
        default = timeout is DEFAULT
        if default:
            timeout = self.timeout
        if timeout is not None and not (type(timeout) in _NUMBERS and 0 <= timeout < _INF):
            timeout = checked_timeout(timeout, args)
        conn = self._conn
        if conn.state is not _OPEN:
            timeout = await self._until_open(args, timeout)
        try:
            chan = self._chan_cache[channel]
        except (KeyError, TypeError):
            chan = self._new_chan(channel, args)
        loop = self._loop
        fut = loop.create_future()
        if conn.trace_context:  # OpenTelemetry: a span, its context after the channel name
            chan = otel.client_span(chan, fut)
        rid = conn.send_invoke(chan, args, fut)
        deadlines = self._deadlines
        if timeout is not None:
            # Before anything is written: writing may read (spin) and run handlers.
            at = loop.time() + timeout
            deadlines[rid] = (at, fut, channel, timeout, default)
            if self._timer is None or at < self._timer_at:
                self._arm(at)
        if self._paused:
            self._set_reading()  # answers to this call must still be read
        now = time.perf_counter()
        if conn.fds_queued or (now - self._last_direct > _BURST and self._flush_handle is None):
            # A lone invoke goes out now, saving a turn of the loop on the round
            # trip; invokes issued back to back share one write at the next turn.
            self._last_direct = now
            self._flush()
        else:
            self._kick()
        try:
            if (queued := self._stream.buffered + conn.buffered_out) > HIGH_WATER:
                self._check_queued(queued)
                await self._wait_read()
            frame: Frame = await fut
        except asyncio.CancelledError:
            conn.send_cancel(rid)
            self._kick()
            raise
        except TetherError:
            if fut.done() and not fut.cancelled():
                fut.exception()  # failed with the connection while we waited to write
            raise
        finally:
            deadlines.pop(rid, None)
        return decode_result(frame, result_type)

    async def open(self, kind: str, *args: Any, timeout: float | None = DEFAULT) -> Route:
        """Open a route of ``kind`` to a host object the other side makes with ``args``.

        The other side registered the kind with ``@main.host(kind)`` (or
        ``peer.host``); its factory is called as ``factory(route, *args)``.
        Use the result as ``async with await peer.open(...) as route``, or
        close it with ``await route.close()``.

        Raises:
            NoHandler: the other side hosts no such kind.
            Forbidden: the kind is not exposed to this side's role.
            BadRequest: ``args`` do not match the factory's type hints.
            RemoteError: the factory raised.
            Busy: ``max_routes`` routes are open already (on either side).
            InvokeTimeout, PeerGone, ConnectionClosed, PayloadTooLarge.
            TypeError: ``kind`` is not a str.
        """
        return await open_route(self, kind, args, self.timeout if timeout is DEFAULT else timeout)

    async def _until_open(self, args: tuple[Any, ...], timeout: float | None) -> float | None:
        """Wait for the peer's HELLO, or raise why nothing can be sent; the time left."""
        conn = self._conn
        while conn.state is State.HANDSHAKE and self._closed is None:
            t0 = self._loop.time()
            try:
                await asyncio.wait_for(
                    asyncio.shield(self._hello_fut), _HELLO_WAIT if timeout is None else timeout
                )
            except TimeoutError:
                if timeout is None:
                    return None  # no HELLO yet: the call waits behind our own
                consume_all(args)
                raise InvokeTimeout(f"{self!r} sent no HELLO within {timeout} s") from None
            except TetherError:
                break  # closed meanwhile
            if timeout is not None:
                timeout = max(0.0, timeout - (self._loop.time() - t0))
        if conn.state is _OPEN:
            return timeout
        consume_all(args)  # a failed send moves its Buffers too
        if self._closed is not None:
            raise self._closed
        if conn.their_goodbye:
            raise PeerGone(f"{self!r} said goodbye: {conn.goodbye_reason or 'no reason given'}")
        if conn.state is State.CLOSED:
            raise PeerGone(f"{self!r}: connection lost")
        raise ConnectionClosed("the connection is closing or closed")

    def _arm(self, at: float) -> None:
        # One timer per peer, set for the earliest deadline: cheaper than a
        # timer per invoke, which a sequence of calls would create and cancel.
        if self._timer is not None:
            self._timer.cancel()
        self._timer = self._loop.call_at(at, self._on_deadline)
        self._timer_at = at

    def _on_deadline(self) -> None:
        self._timer = None
        now = self._loop.time()
        due = [rid for rid, d in self._deadlines.items() if d[0] <= now]
        for rid in due:
            _, fut, channel, timeout, default = self._deadlines.pop(rid)
            self._expire(rid, fut, channel, timeout, default)
        if self._deadlines and self._closed is None:
            self._arm(min(d[0] for d in self._deadlines.values()))

    def _expire(
        self, rid: int, fut: asyncio.Future[Any], channel: str, timeout: float, default: bool
    ) -> None:
        if not fut.done():
            log.debug(
                "%r: invoke %r (request %d) timed out after %s s; cancelled",
                self,
                channel,
                rid,
                timeout,
                extra=self._who(),
            )
            self._conn.send_cancel(rid, "timeout")
            self._kick()
            fut.set_exception(InvokeTimeout(timeout_message(channel, timeout, default)))

    async def send(self, channel: str, *args: Any) -> None:
        """Send a one-way event on ``channel``. Waits only when the peer lags.

        Like :meth:`invoke`, an event sent before the peer's HELLO waits for it.

        Raises:
            ConnectionClosed (this side closed it), PeerGone (also when the
            peer said goodbye), ProtocolError, PayloadTooLarge.
            TypeError: ``channel`` is not a str.
        """
        conn = self._conn
        if conn.state is not _OPEN:
            await self._until_open(args, None)
        try:
            chan = self._chan_cache[channel]
        except (KeyError, TypeError):
            chan = self._new_chan(channel, args)
        conn.send_event(chan, args)
        queued = conn.buffered_out
        if queued >= FLUSH_SIZE or conn.fds_queued:
            # Write now rather than when the loop turns: the peer starts reading
            # while this side keeps producing (a loop that never yields would
            # otherwise alternate with its reader instead of overlapping).
            self._flush()
        elif self._flush_handle is None:  # (else a write is due this turn already)
            self._kick()
        if (queued := self._stream.buffered + queued) > HIGH_WATER:
            self._check_queued(queued)
            await self._wait_read()

    def stream(
        self,
        channel: str,
        *args: Any,
        item_type: type[T] | Any = Any,
        window: int = DEFAULT_WINDOW,
        item_timeout: float | None = DEFAULT,
        timeout: float | None = None,
    ) -> streaming.Stream[Any]:
        """Iterate the items a stream handler (a generator) on the other side yields.

        ``async for x in peer.stream("tokens", "a b c"): ...``; nothing is
        sent before the first item is asked for. See :class:`~tether.aio.streaming.Stream`.

        Args:
            item_type: decode and validate each item as this type.
            window: items the producer may send ahead of what this side took
                (credit, docs/protocol.md 7.6): a reader that stops reading
                stops the producer after at most ``window`` items.
            item_timeout: seconds to wait for each item; defaults to the
                peer's ``timeout``; ``None`` waits forever.
            timeout: seconds for the whole stream (default ``None``: no limit).
            On either expiry the producer is stopped and
            :class:`~tether.InvokeTimeout` raised.
        """
        return streaming.stream(self, channel, args, item_type, window, item_timeout, timeout)

    def send_threadsafe(self, channel: str, *args: Any) -> None:
        """:meth:`send` from another thread (a ``thread=True`` handler); blocks until queued.

        Returns once the event is queued on the connection, so events sent
        by a threaded handler precede its result, in order. Waits while the
        other side lags, as :meth:`send` does (bounded by ``max_queued`` and
        ``drain_timeout``), and gives up with :class:`ConnectionClosed` if
        the event loop stops meanwhile. :meth:`tether.Call.send` calls this.

        Raises:
            RuntimeError: called on the event loop's own thread (``await
                send(...)`` there; waiting here would block the loop forever).
            The errors of :meth:`send`.
        """
        loop = self._loop
        if loop.is_closed() or not loop.is_running():
            consume_all(args)
            raise ConnectionClosed(f"{self!r}: its event loop is not running")
        try:
            running = asyncio.get_running_loop()
        except RuntimeError:
            running = None
        if running is loop:
            consume_all(args)
            raise RuntimeError(
                "send_threadsafe (call.send) blocks: on the event loop's thread "
                "use `await call.peer.send(...)`, or register the handler with thread=True"
            )
        fut = asyncio.run_coroutine_threadsafe(self.send(channel, *args), loop)
        while True:
            try:
                return fut.result(_THREAD_POLL)
            except TimeoutError:
                if loop.is_closed() or not loop.is_running():
                    fut.cancel()
                    raise ConnectionClosed(f"{self!r}: its event loop stopped") from None

    def _check_queued(self, queued: int) -> None:
        """More than ``max_queued`` bytes wait for the other side: drop it, raise PeerGone."""
        if queued > self.max_queued and self._closed is None:
            log.warning(
                "%r stopped reading: %d bytes queued (max_queued %d); dropped",
                self,
                queued,
                self.max_queued,
                extra=self._who(),
            )
            self.abort(PeerGone(f"{self!r} stopped reading: over {self.max_queued} bytes queued"))
        if self._closed is not None:
            raise self._closed

    async def _wait_read(self) -> None:
        """A sender waits (``drain_timeout`` at most) for the other side to read its queue down."""
        bound = self.drain_timeout
        if bound is None:
            await self._wait_drained(LOW_WATER)
            return
        try:
            await asyncio.wait_for(self._wait_drained(LOW_WATER), bound)
        except TimeoutError:
            queued = self._stream.buffered + self._conn.buffered_out
            log.warning(
                "%r stopped reading: %d bytes still queued after %s s (drain_timeout); dropped",
                self,
                queued,
                bound,
                extra=self._who(),
            )
            self.abort(PeerGone(f"{self!r} stopped reading: nothing drained for {bound} s"))
            raise self._closed or PeerGone("dropped") from None

    # -- writing ----------------------------------------------------------

    def _poll_leases(self) -> None:
        """Release lent segments whose views are gone; re-check, backing off, while some are out."""
        self._lease_timer = None
        if self._closed is not None:
            return
        if self._conn.poll_releases():
            self._lease_wait = _LEASE_POLL
            self._kick()
        else:
            # Nothing dropped lately: wait longer (an idle peer holding a view
            # costs a timer a second, not one every 2 ms).
            self._lease_wait = min(2 * self._lease_wait, _LEASE_POLL_MAX)
        store = self._conn.store
        if self._conn.leases_held and not (isinstance(store, MemfdStore) and store.notifies):
            # Only without release notifications (no numpy): poll, backing off.
            self._lease_timer = self._loop.call_later(self._lease_wait, self._poll_leases)

    def _leases_active(self) -> None:
        """Frames were handled while leases are out: views may go soon, check soon."""
        self._lease_wait = _LEASE_POLL
        timer = self._lease_timer
        if timer is None:
            self._poll_leases()
        elif timer.when() - self._loop.time() > 2 * _LEASE_POLL:
            timer.cancel()
            self._lease_timer = self._loop.call_later(_LEASE_POLL, self._poll_leases)

    def _lease_released(self) -> None:
        """The store saw a lent segment's last view go (any thread): release it."""
        with contextlib.suppress(RuntimeError):  # the loop is closed: nothing to release
            self._loop.call_soon_threadsafe(self._poll_leases)

    def _kick(self) -> None:
        if self._flush_handle is None and self._started:
            self._flush_handle = self._loop.call_soon(self._flush)

    def _flush(self, poll: bool = True) -> None:
        """Write what the connection queued (the stream keeps what the socket won't take).

        Once all went out and an answer is awaited, poll for it if the
        answers' :class:`~tether.polling.SpinPolicy` says so (unless ``poll``
        is false).
        """
        self._flush_handle = None
        if not self._started or self._closed is not None:
            return
        data, fds = self._conn.data_to_send()
        if not data:
            return
        try:
            done = self._stream.write(data, fds)
            while self._conn.fds_queued:  # more descriptors than one chunk carries
                data, fds = self._conn.data_to_send()
                done = self._stream.write(data, fds)
        except OSError as exc:
            self._lost(self._gone(exc))  # only the write failed: what was sent may still be read
            return
        self._wrote = True
        if (
            done
            and poll
            and self._conn.pending  # our caller awaits an answer
            and self._spin_handle is None
            and (window := self._answer_poll.window())
        ):
            self._spin_handle = self._loop.call_soon(self._spin, self._answer_poll, window)

    def _write_failed(self, exc: OSError) -> None:
        self._lost(self._gone(exc))

    async def _wait_drained(self, low: int) -> None:
        self._flush()
        await self._stream.drain(low)
        if self._closed is not None:
            raise self._closed

    # -- inbound flow control ---------------------------------------------

    def _overloaded(self) -> bool:
        return (
            self._stream.buffered + self._conn.buffered_out > HIGH_WATER
            or len(self._tasks) > MAX_TASKS
            or self._handles_out() > HANDLES_HIGH
        )

    def _handles_out(self) -> int:
        """Received Handles alive and untaken outside the backlog (in handlers, tasks, app)."""
        return self._conn.handles_held - self._backlog_handles

    def _pause(self) -> None:
        """Stop reading: this peer made this side hold too much (unless the kernel takes it)."""
        self._flush(poll=False)
        if not self._overloaded():
            return
        self._paused = True
        self._set_reading()
        if self._stream.buffered > LOW_WATER:
            self._watch_drain()
        if self._handle_timer is None and self._handles_out() > HANDLES_HIGH:
            # held descriptors go in many ways (dropped, taken, collected), often
            # with no task ending to look again: poll (see _maybe_resume)
            self._handle_timer = self._loop.call_later(0.02, self._recheck_handles)
        if self._hup_timer is None:
            self._hup_timer = self._loop.call_later(HANGUP_CHECK, self._check_hangup)

    def _check_hangup(self) -> None:
        """Paused: end the peer if it hung up. Not reading, its EOF would go unseen.

        A peer whose handlers never end keeps this side paused; once it is
        gone, nothing else would release it (the connection, its tasks).
        """
        self._hup_timer = None
        if not self._paused or self._closed is not None:
            return
        fd = self._stream.fileno()
        if fd < 0:
            return
        poller = select.poll()
        poller.register(fd, getattr(select, "POLLRDHUP", 0))
        hangup = select.POLLHUP | select.POLLERR | getattr(select, "POLLRDHUP", 0)
        try:
            events = poller.poll(0)
        except OSError:
            events = []
        if any(ev & hangup for _, ev in events):
            self._end(self._gone(None))  # what it sent and this side did not read is dropped
        else:
            self._hup_timer = self._loop.call_later(HANGUP_CHECK, self._check_hangup)

    def _set_reading(self) -> None:
        """Read the socket unless paused; while paused, only for answers owed to us."""
        if not self._started or self._closed is not None or self._dropped:
            return
        if not self._paused or (self._conn.pending and self._held < MAX_HELD):
            self._stream.start()
        else:
            self._stream.stop_reading()

    def _watch_drain(self) -> None:
        if self._drainer is None:
            self._drainer = self._loop.create_task(self._resume_when_drained())

    async def _resume_when_drained(self) -> None:
        try:
            await self._stream.drain(LOW_WATER)
        except TetherError:
            return  # closed
        finally:
            self._drainer = None
        self._maybe_resume()

    def _maybe_resume(self) -> None:
        """Resume reading once answers and tasks are back under the low-water marks."""
        if not self._paused or self._closed is not None:
            return
        self._flush(poll=False)
        if self._stream.buffered + self._conn.buffered_out > LOW_WATER:
            self._watch_drain()
            return
        if len(self._tasks) > TASKS_LOW:
            return  # the next task to end checks again
        if self._handles_out() > HANDLES_LOW:
            # Handles end in many ways (taken, closed, collected): look again soon
            if self._handle_timer is None:
                self._handle_timer = self._loop.call_later(0.02, self._recheck_handles)
            return
        self._paused = False
        self._held = 0
        backlog = self._backlog
        while backlog and not self._paused and self._closed is None:
            f = backlog.popleft()
            if f.attachments:
                self._backlog_handles -= _descriptors(self._conn, f.attachments)
            self._dispatch(iter((f,)))
            if f.attachments and not self._paused and self._handles_out() > HANDLES_HIGH:
                self._pause()
        if self._conn.buffered_out:
            self._flush()
        self._set_reading()

    def _recheck_handles(self) -> None:
        self._handle_timer = None
        self._maybe_resume()

    def _hold(self, frames: Iterable[Frame]) -> None:
        """Paused: answers to our calls are handled now, everything else waits in order."""
        if self._closed is not None:
            return  # dropped midway: nothing more is acted on
        backlog = self._backlog
        for f in frames:
            k = f.kind
            if k in _ANSWERS:
                self._woke = True
                self._on_answer(f)
            elif k == K_CANCEL and (served := self._serving.get(f.request_id)) is not None:
                del self._serving[f.request_id]
                served._abandon()  # running already: cancelling it now means less to hold
            else:
                backlog.append(f)
                for a in f.attachments:  # mapped segments count as held too
                    self._held += held_size(a)
                if f.attachments:
                    self._backlog_handles += _descriptors(self._conn, f.attachments)

    # -- reading ----------------------------------------------------------

    def _on_readable(self) -> None:
        self._wrote = False
        if self._read_once():
            if self._conn.leases_held:
                self._leases_active()  # handlers may have dropped what they were lent
            if self._wrote and not self._woke:
                self._spin_for_request()

    def _spin_for_request(self) -> None:
        """A read was answered inline: poll for the next request if the policy says so."""
        if self._spin_handle is None and (window := self._request_poll.window()):
            self._spin_handle = self._loop.call_soon(self._spin, self._request_poll, window)

    def _spin(self, policy: SpinPolicy, window: float) -> None:
        """Poll the socket for up to ``window`` seconds instead of sleeping; tell ``policy``.

        Queued with ``call_soon`` by :meth:`_flush` (an answer is awaited) or
        :meth:`_on_readable` (requests were answered inline), so it runs once
        the callbacks ready then have run, when the loop would otherwise go to
        sleep. Blocks the loop while it polls, trading CPU for the 20-30 us a
        sleeping process takes to wake; it returns at the first bytes, so
        every other peer gets a turn at least once a window.
        """
        self._spin_handle = None
        if self._closed is not None or self._paused:
            return
        if policy is self._answer_poll and not self._conn.pending:
            return  # answered meanwhile
        start = time.perf_counter()
        if not _SOLO.claim(self, start):
            return  # other peers are busy too: polling for this one would hold them up
        self._spinning = True
        self._wrote = False
        try:
            deadline = start + window
            while not self._read_once():
                if self._closed is not None or time.perf_counter() >= deadline:
                    policy.spun(None)
                    return
                os.sched_yield()  # the peer may share this CPU: let it run
            policy.spun(time.perf_counter() - start)
        finally:
            self._spinning = False
        if self._wrote and not self._woke and self._closed is None and not self._paused:
            self._spin_for_request()  # answered inline: the next request may follow

    def _read_once(self) -> bool:
        """Read and handle what is available; True if bytes arrived."""
        self._woke = False
        try:
            data = self._stream.recv(self._conn.receive_fds)
        except OSError as exc:
            self._end(self._gone(exc))
            return False
        except ProtocolError as exc:
            self.abort(exc)
            return False
        if data is None:
            return False
        if not data:
            try:
                self._conn.receive_eof()
            except ProtocolError as exc:
                self.abort(exc)  # EOF mid-frame: logged like any protocol error
            else:
                self._end(self._gone(None))
            return False
        try:
            frames = self._conn.receive_data(data)
        except ProtocolError as exc:
            self.abort(exc)
            return False
        if self._awaiting_hello and self._conn.peer_hello is not None:
            self._awaiting_hello = False
            self._hello_fut.set_result(None)
            self._woke = True  # whoever waits for the HELLO runs next: no poll before it
        if self._paused or self._backlog:
            self._held += len(data)
            self._hold(frames)
            self._set_reading()
        else:
            it = iter(frames)
            if self._dispatch(it):
                self._hold(it)  # paused midway: the rest waits
        if self._conn.buffered_out:
            self._flush()
        if not self._paused and self._stream.buffered > HIGH_WATER:
            self._pause()  # answers made without a handler (no_handler, PONG...) pile up too
        elif not self._paused and self._handles_out() > HANDLES_HIGH:
            self._pause()  # received Handles pile up: pause long before MAX_LIVE_HANDLES
        if self._conn.unclaimed_fds and self._fd_timer is None:
            self._fd_timer = self._loop.call_later(FD_CLAIM_TIMEOUT, self._check_unclaimed)
        return True

    def _check_unclaimed(self) -> None:
        """Descriptors still unclaimed after :data:`FD_CLAIM_TIMEOUT` of reading: drop the peer.

        A frame's descriptors arrive with its first byte, and the rest of the
        frame follows at once; a peer that sends descriptors and then stalls
        only pins this process's descriptor table.
        """
        self._fd_timer = None
        if self._closed is not None or not self._conn.unclaimed_fds:
            return
        if self._paused:  # not reading: the claiming frame may be waiting in the kernel
            self._fd_timer = self._loop.call_later(FD_CLAIM_TIMEOUT, self._check_unclaimed)
            return
        self.abort(ProtocolError(f"descriptors unclaimed by any frame for {FD_CLAIM_TIMEOUT} s"))

    def _dispatch(self, frames: Iterator[Frame]) -> bool:
        """Act on frames in order; True if reading paused midway (the rest is left in ``frames``).

        Nothing a handler raises stops the frames after it: each invoke gets
        its answer (see :class:`Peer`). Only ``SystemExit`` and
        ``KeyboardInterrupt`` propagate, after the ERROR was written.
        """
        reg = self.registry
        if reg.version != self._ev_version or self._ev_for != (self.role, self.local):
            self._ev_cache.clear()
            self._ev_version, self._ev_for = reg.version, (self.role, self.local)
        events = self._ev_cache
        for f in frames:
            k = f.kind
            if k == K_INVOKE:
                self._on_invoke(f)  # answered inline, or a task (which sets _woke)
                if self._paused:
                    return True
                continue
            self._woke = True  # anything else hands work to the loop
            if k == K_EVENT and not f.route_id and not f.attachments:
                # The common event: one plain listener, called here (Registry.plain_listener).
                ent = events.get(f.channel)
                if ent is None:
                    ent = self._event_entry(f.channel)
                if ent:
                    fn, decode, call = ent
                    try:
                        args = decode(f.body)
                    except Exception:  # malformed, or a pickle: the full path says why
                        self._on_event(f)
                    else:
                        try:
                            fn(call, *args)
                        except Exception:
                            log.exception("listener for %r raised", f.channel, extra=self._who())
                        except BaseException as exc:
                            if self._listener_raised(call, exc):
                                raise
                else:
                    self._on_event(f)
                if self._paused:
                    return True
            elif k == K_RESULT:
                fut = self._conn.take_pending(f.request_id)
                if fut is not None and not fut.done():
                    fut.set_result(f)
            elif k == K_EVENT:  # on a route, or with attachments
                self._on_event(f)
                if self._paused:
                    return True
            elif k == K_ERROR:
                self._on_answer(f)
            elif k == K_CANCEL:
                served = self._serving.pop(f.request_id, None)
                if served is not None:
                    served._abandon()  # sets call.cancelled, cancels the task
            elif k == K_GOODBYE:
                self._flush(poll=False)  # answers to what it asked before leaving
                reason = self._conn.goodbye_reason or "no reason given"
                self._end(PeerGone(f"{self!r} said goodbye: {reason}"))
                return False
            elif k in ROUTE_FRAMES:
                dispatch_route_frame(self, f)
                if self._paused:
                    return True
            elif k >= K_STREAM:  # STREAM, ITEM, CREDIT
                streaming.on_frame(self, f)
                if self._paused:
                    return True
        return False

    def _event_entry(self, channel: str) -> tuple[Any, ...]:
        """(listener, decode, its Call) for the fast path, or ``()``: take :meth:`_on_event`.

        Kept per channel that has listeners (so a peer's made-up channels
        don't grow it) until the registry, role or ``local`` changes. The
        Call is shared by the events of the channel: its fields are the same.
        """
        found = self.registry.plain_listener(channel, self.role, self.local)
        ent: tuple[Any, ...] = () if found is None else (*found, Call(self, channel, 0, 0))
        if channel in self.registry.events:
            self._ev_cache[channel] = ent
        return ent

    def _on_answer(self, f: Frame) -> None:
        fut = self._conn.take_pending(f.request_id)
        if fut is None or fut.done():
            return
        if f.kind == K_RESULT:
            fut.set_result(f)
        else:
            fut.set_exception(decode_error(f))

    def _on_invoke(self, f: Frame) -> None:
        rid = f.request_id  # (a reused one was refused by the core: Connection.served)
        ctx = self._conn.contexts.pop(rid, None) if self._conn.contexts else None
        if f.route_id:
            found = route_handler(self._conn, f, self.role)
        else:
            found = self.registry.resolve(f, self.role, self.local)
        if isinstance(found, codec.ErrorInfo):
            self._send_error(rid, found)
            return
        h, args = found
        if ctx is not None:  # the caller's OpenTelemetry trace continues in this handler
            h = otel.traced_handler(h, f.channel, ctx)
        call = Call(self, f.channel, rid, f.route_id)
        if h.is_async:
            serving = self._serving
            if len(serving) >= self.max_inflight:
                self._send_error(rid, self._busy())
                return
            serving[rid] = None  # the task may end inside create_task (eager task factories)
            task = self._loop.create_task(self._run_async(h, call, args))
            if not task.done():
                call._task = task
                serving[rid] = call
                self._tasks.add(task)
                if len(self._tasks) > MAX_TASKS:
                    self._pause()
            self._woke = True
            return
        try:
            result = h.fn(call, *args)
        except BaseException as exc:
            if self._fail(call, exc):
                raise
        else:
            try:
                self._conn.answer(rid, result)
            except Exception as exc:  # a value the core could not even turn into an ERROR
                self._send_error(rid, self._describe(exc))
        if self._stream.buffered + self._conn.buffered_out > HIGH_WATER:
            self._pause()

    def _busy(self) -> codec.ErrorInfo:
        return codec.ErrorInfo(
            "busy", f"{self.max_inflight} invokes from this connection are in flight already"
        )

    def _answer(self, rid: int, result: Any) -> None:
        try:
            self._conn.answer(rid, result)
        except Exception as exc:  # see _on_invoke
            self._send_error(rid, self._describe(exc))

    def _describe(self, exc: BaseException) -> codec.ErrorInfo:
        try:
            return codec.error_info(exc, traceback=self.tracebacks)
        except Exception:
            return codec.ErrorInfo("remote", "the handler's exception cannot be described")

    def _send_error(self, rid: int, info: codec.ErrorInfo) -> None:
        try:
            self._conn.send_error(rid, info)
        except Exception:  # too large even without its traceback
            self._conn.send_error(rid, codec.ErrorInfo(info.code, "(error too large)", info.type))

    def _fail(self, call: Call, exc: BaseException) -> bool:
        """Answer a handler's exception with an ERROR; True if it must propagate.

        ``SystemExit`` and ``KeyboardInterrupt`` propagate (their ERROR, and
        every answer queued before it, written first); other exceptions that
        are not ``Exception`` are logged, since nothing else would show them.
        """
        self._send_error(call.request_id, self._describe(exc))
        if isinstance(exc, Exception):
            log.debug(
                "%r: handler for %r raised %s: %s; answered with an ERROR",
                self,
                call.channel,
                type(exc).__name__,
                exc,
                extra=self._who(),
            )
            return False
        if isinstance(exc, _EXITS):
            self._flush(poll=False)
            return True
        log.error(
            "handler for %r raised %s; answered with an ERROR",
            call.channel,
            type(exc).__name__,
            exc_info=exc,
            extra=self._who(),
        )
        return False

    async def _run_async(self, h: Handler, call: Call, args: tuple[Any, ...]) -> None:
        rid = call.request_id
        try:
            result = await h.run(call, *args)
        except BaseException as exc:
            if self._serving.pop(rid, None) is None:
                # The caller's CANCEL or timeout, or the connection ended: no
                # one awaits an answer any more.
                if isinstance(exc, (asyncio.CancelledError, *_EXITS)):
                    _drop_locals(exc)
                    raise
                return
            task = asyncio.current_task()
            if isinstance(exc, asyncio.CancelledError) and task is not None and task.cancelling():
                # Cancelled from outside, e.g. by the loop ending with the process:
                # the caller learns it from the connection (PeerGone, exit code).
                _drop_locals(exc)
                raise
            if self._fail(call, exc):
                _drop_locals(exc)
                raise
        else:
            if self._serving.pop(rid, None) is None:
                return  # cancelled by the caller meanwhile
            self._answer(rid, result)
        finally:
            # The task keeps the exception it ends with, whose traceback keeps
            # this frame: its arguments (received attachments: descriptors,
            # mappings) would wait for a garbage collection. Drop them now.
            args = call = None  # type: ignore[assignment]
            self._tasks.discard(asyncio.current_task())
            if self._paused:
                self._maybe_resume()
        self._kick()

    def _on_event(self, f: Frame) -> None:
        if f.route_id:
            found = route_listeners(self._conn, f, self.role)
        else:
            found = self.registry.listeners(f, self.role, self.local)
        for h, args in found:
            call = Call(self, f.channel, 0, f.route_id)
            if h.is_async:
                task = self._loop.create_task(self._run_event(h, call, args))
                if not task.done():
                    self._tasks.add(task)
                    if len(self._tasks) > MAX_TASKS:
                        self._pause()
                continue
            try:
                h.fn(call, *args)
            except Exception:
                log.exception("listener for %r raised", f.channel, extra=self._who())
            except BaseException as exc:
                if self._listener_raised(call, exc):
                    raise

    def _listener_raised(self, call: Call, exc: BaseException) -> bool:
        if isinstance(exc, _EXITS):
            self._flush(poll=False)
            return True
        log.error(
            "listener for %r raised %s",
            call.channel,
            type(exc).__name__,
            exc_info=exc,
            extra=self._who(),
        )
        return False

    async def _run_event(self, h: Handler, call: Call, args: tuple[Any, ...]) -> None:
        try:
            await h.fn(call, *args)
        except Exception:
            log.exception("listener for %r raised", call.channel, extra=self._who())
        except asyncio.CancelledError as exc:
            task = asyncio.current_task()
            if task is not None and task.cancelling():
                _drop_locals(exc)  # the peer closed (or the loop is ending)
                raise
            log.error("listener for %r raised CancelledError", call.channel, extra=self._who())
        except BaseException as exc:
            if self._listener_raised(call, exc):
                _drop_locals(exc)
                raise
        finally:
            args = call = None  # type: ignore[assignment]  # (see _run_async)
            self._tasks.discard(asyncio.current_task())
            if self._paused:
                self._maybe_resume()

    # -- ending -----------------------------------------------------------

    def _gone(self, exc: OSError | None) -> PeerGone:
        err = PeerGone(f"{self!r}: connection lost" + (f": {exc}" if exc else " (EOF)"))
        err.__cause__ = exc
        return err

    def _end(self, exc: TetherError) -> None:
        """The connection dropped (EOF, a failed read or write, the peer's GOODBYE)."""
        self._dropped = True
        self._lost(exc)

    def _lost(self, exc: TetherError) -> None:
        """The connection ended from outside; subclasses may refine ``exc``."""
        self._shutdown(exc)

    def _shutdown(self, exc: TetherError) -> None:
        if self._closed is not None:
            return
        # Tracebacks hold this peer's frames: without them a closed peer is
        # freed at once, not at the next cyclic garbage collection.
        e: BaseException | None = exc
        for _ in range(8):
            if e is None:
                break
            e.__traceback__ = None
            e = e.__cause__ or e.__context__
        self._closed = exc
        self._stream.close(exc)
        self._conn.abort()
        if self._flush_handle is not None:
            self._flush_handle.cancel()
        if self._lease_timer is not None:
            self._lease_timer.cancel()
        if self._timer is not None:
            self._timer.cancel()
        if self._fd_timer is not None:
            self._fd_timer.cancel()
        if self._handle_timer is not None:
            self._handle_timer.cancel()
        if self._hup_timer is not None:
            self._hup_timer.cancel()
        self._deadlines.clear()
        self._backlog.clear()
        if self._conn.routes is not None:
            end_routes(self, exc)  # before fail_all: invokes on routes fail with RouteClosed
        for fut in self._conn.fail_all():
            if not fut.done():
                fut.set_exception(exc)
        # Invoke handlers are cancelled: nobody is left to take their answers.
        # Event listeners run on: the event was delivered, so it is handled
        # (they stay held in _tasks until they end; close() bounds them).
        serving = [c for c in self._serving.values() if c is not None]
        self._serving.clear()
        for call in serving:
            call._abandon()
        if not self._hello_fut.done():
            self._hello_fut.set_exception(exc)
            self._hello_fut.exception()  # mark retrieved
        self._closed_fut.set_result(None)
        if self._on_close is not None:
            self._on_close(self)
