"""The blocking API: one connection driven by plain threads, no event loop.

Reading. One thread at a time reads the socket: the *reader*. Until the peer
has handlers, a thread waiting for its result reads itself (leader/follower:
it polls the socket briefly before it sleeps while that pays, which saves a
wake-up per round trip: :mod:`tether.polling`) and
hands other threads their results. Once handlers are registered (or the other
side invokes or sends), a dispatcher thread reads instead, and handlers run in
order on one worker thread, so a handler may itself invoke or send. A handler
registered with ``thread=True`` runs on the process's handler pool
(:mod:`tether.threads`) instead, beside the others, and counts against
``max_inflight`` until answered. A running handler cannot be interrupted: a
CANCEL (or the connection lost) sets its ``call.cancelled``, and an invoke
still queued is dropped.

Writing. ``send_*`` only queues frames in the :class:`Connection`; whoever
holds the write lock then writes everything queued, its own frames and those
other threads queued meanwhile. A writer blocked on a full socket keeps
reading while no other thread reads, and the reader never waits for the write
lock (it writes only when the lock is free, else the holder writes for it):
two blocking peers writing to each other at once both make progress. The
worker leaves its answers to the holder the same way (until it has queued
:data:`OUT_HIGH` bytes), so it keeps draining the job queue while a caller's
write is stuck. ``close()`` waits at most a second for the lock.

Shared memory. On unix sockets the peer announces ``fd`` (descriptors ride
with the bytes: ``recvmsg``/``sendmsg``) and, unless it is a main, ``lease``
(it accepts segments lent by the privileged side). Large arrays and bytes then
cross as memory, not inline. A lent segment is released once its views are
gone, checked after each handler, read and call: no timer.

Inbound flow control. Invokes and events wait in a queue for the worker. Past
:data:`HIGH_JOBS` jobs or :data:`HIGH_BYTES` bytes the reader stops reading
until the worker has drained the queue to :data:`LOW_JOBS`/:data:`LOW_BYTES`;
the kernel's socket buffer then pushes back on the sender. Frames of the last
read that do not fit wait in the reader's backlog (one read at most). The
one exception:
while the worker itself waits in an ``invoke`` (a handler calling back), the
reader keeps reading, since the answer it waits for may be behind the queue.
Invokes queued at once (the worker's queue and the backlog) are bounded by
``max_inflight`` even then: one more is answered at once with ERROR ``busy``.

Locks, always taken in this order, never the reverse:

1. ``_wlock``: the right to write the socket; held across a blocking write.
   The reader only ever *tries* it.
2. ``_lock``: the :class:`Connection` (protocol state, queued output);
   held briefly, never across a blocking call.
3. ``_mu`` (and the conditions on it): who reads, results, the job queue,
   the closed state.

A handler that raises answers its invoke with an ERROR whatever it raised.
``SystemExit`` and ``KeyboardInterrupt`` then stop the process as Python
would: the peer closes, and ``SystemExit`` is raised again in the thread
that waits in :meth:`Peer.wait_closed` (a blocking child's main thread) or
calls the peer next, ``KeyboardInterrupt`` in the main thread. Any other
``BaseException`` is answered and logged.
"""

from __future__ import annotations

import _thread
import array
import asyncio
import collections
import contextlib
import logging
import os
import select
import socket
import ssl
import struct
import threading
import time
from collections.abc import Callable, Iterable
from typing import Any, Final, TypeVar, overload

from .. import codec, direct, threads
from ..attachments import store_for
from ..errors import (
    ConnectionClosed,
    InvokeTimeout,
    PeerGone,
    ProtocolError,
    TetherError,
)
from ..handles import MAX_LIVE_HANDLES, held_size
from ..identity import Credentials, peer_address, peer_credentials
from ..polling import SpinPolicy
from ..protocol import Connection
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
    K_ITEM,
    K_RESULT,
    K_STREAM,
    Frame,
)
from . import streaming
from .route import (
    JOBS,
    MAX_ROUTES,
    ROUTE_FRAMES,
    Route,
    dispatch_route_frame,
    end_routes,
    open_route,
)

__all__ = ["Call", "Peer"]

log = logging.getLogger("tether")

#: jobs (and their bytes) queued for the worker at which the reader pauses
HIGH_JOBS: Final = 64
HIGH_BYTES: Final = 16 * 1024 * 1024
#: ... and at which it resumes
LOW_JOBS: Final = 16
LOW_BYTES: Final = 4 * 1024 * 1024
_READ_SIZE: Final = 256 * 1024
_POLL_SLICE: Final = 0.25
_TAKE_TURN: Final = 0.01  # a blocked writer re-checks this often whether it may read
_REPLY_WRITE: Final = 10.0  # seconds to write what the reader queued (PONG, RELEASE)
_ANSWER_WRITE: Final = 30.0  # seconds to write a handler's answer
#: queued output past which the worker waits for the write lock (below it, the holder writes)
OUT_HIGH: Final = 4 * 1024 * 1024
#: received Handles past which reading stops even while the worker waits in ``invoke``
HANDLES_WAITING: Final = MAX_LIVE_HANDLES * 3 // 4
_ROOM_SLICE: Final = 0.05  # a paused reader rechecks for room this often
#: default ``max_inflight``: invokes from the other side queued for the worker at once
MAX_INFLIGHT: Final = 1024
_ANC_SPACE: Final = socket.CMSG_SPACE(253 * 4)  # SCM_MAX_FD descriptors
_SCM: Final = (socket.SOL_SOCKET, socket.SCM_RIGHTS)
#: "try again later" from a non-blocking socket, plain or TLS (``ssl.SSLSocket``)
_AGAIN: Final = (BlockingIOError, InterruptedError, ssl.SSLWantReadError, ssl.SSLWantWriteError)
_FATAL: Final = (SystemExit, KeyboardInterrupt)
_INF: Final = float("inf")
_NUMBERS: Final = (float, int)  # exactly: a bool is no timeout

T = TypeVar("T")


class _Slot:
    __slots__ = ("done", "exc", "frame")

    def __init__(self) -> None:
        self.done = False
        self.frame: Frame | None = None
        self.exc: BaseException | None = None


def _close_all(fds: Iterable[int]) -> None:
    for fd in fds:
        with contextlib.suppress(OSError):
            os.close(fd)


def _job_size(f: Frame) -> int:
    n = len(f.body)
    for a in f.attachments:
        n += held_size(a)
    return n


class Peer(Handlers):
    """A blocking peer, safe to share between threads.

    Args:
        spin: how a thread waiting for bytes polls the socket before it
            sleeps (a sleeping thread takes 20-30 us to wake). ``None`` (the
            default): adaptive, as for :class:`tether.Peer` -- learned from
            recent answer times (a caller waiting) and request gaps (the
            reader serving handlers), only while they average under
            :data:`tether.polling.HIT_BOUND`, backing off when polling does
            not pay, never with fewer than 2 usable CPUs. 0: never; a number
            of seconds: poll that long each time.
        lazy: don't start serving handlers when they are registered; start at
            the first blocking call instead (used for a child's sync target, so
            every handler is in place before anything is read).
        tracebacks: send the handler's traceback with an ERROR (default); off,
            the caller gets the exception's type and message only.
        max_inflight: the most invokes from the other side queued for the
            worker at once (default :data:`MAX_INFLIGHT`); one more is
            answered at once with ERROR ``busy`` (the caller gets
            :class:`~tether.Busy`) and its handler does not run.
        secret: a shared secret both sides must prove in the handshake
            (docs/protocol.md, 6.1); ``initiator``: this side opened the connection.
        pickle: this side opts in to pickle (``Main.spawn(..., pickle=True)``
            sets it on both ends of a child's connection). Only when both
            ends do, objects msgspec cannot encode travel pickled; otherwise
            a pickle received is a ``BadRequest`` and is never unpickled.

    Attributes:
        max_queued: the most jobs ever queued for the worker at once (never
            above :data:`HIGH_JOBS` unless a handler waited in ``invoke``).
        pid, uid, gid: the other process's ids from ``SO_PEERCRED`` (unix
            sockets and socketpairs), read once; ``None`` over TCP.
        address: the other end (``tcp://host:port``, ``unix://<path>``, ``main:<pid>``).
        origin: a web page's origin; ``None`` here.
        local: whether handlers registered without ``roles=`` answer the
            other side (as :attr:`tether.Peer.local`; the main a blocking
            peer talks to is).
    """

    _blocking = True

    #: the most routes this side hosts for the other side at once, and opens to it
    max_routes: int = MAX_ROUTES

    def __init__(
        self,
        sock: socket.socket,
        *,
        role: str = "main",
        local_role: str = "client",
        registry: Registry | None = None,
        timeout: float | None = DEFAULT_TIMEOUT,
        max_frame_size: int = DEFAULT_MAX_FRAME_SIZE,
        name: str = "",
        lazy: bool = False,
        spin: float | None = None,
        tracebacks: bool = True,
        credentials: Credentials | None = None,
        address: str = "",
        local: bool = True,
        max_inflight: int = MAX_INFLIGHT,
        secret: bytes | None = None,
        initiator: bool = True,
        pickle: bool = False,
    ) -> None:
        sock.setblocking(False)
        self._sock = sock
        self._unix = sock.family == socket.AF_UNIX
        self._conn = Connection(
            local_role,
            name=name,
            pid=os.getpid(),
            max_frame_size=max_frame_size,
            store=store_for(self._unix, role, local_role),
            secret=secret,
            initiator=initiator,
            pickle=pickle,
        )
        self.registry = registry if registry is not None else Registry()
        self.role = role
        cred = credentials if credentials is not None else peer_credentials(sock)
        self.pid: int | None = cred.pid
        self.uid: int | None = cred.uid
        self.gid: int | None = cred.gid
        self.address: str = address or peer_address(sock)
        self.origin: str | None = None
        self.local = local
        self.timeout = timeout
        self.name = name
        self.tracebacks = tracebacks
        self._lazy = lazy
        self.spin = spin
        self._answer_poll = SpinPolicy(spin)  # a caller waits for its answer
        self._request_poll = SpinPolicy(spin)  # the reader waits for the next request
        self._wlock = threading.Lock()  # 1: writing the socket
        self._lock = threading.Lock()  # 2: the Connection
        self._mu = threading.Lock()  # 3: reader role, results, jobs, closed
        self._cv = threading.Condition(self._mu)  # results; the reader role
        self._work_cv = threading.Condition(self._mu)  # the worker waits for jobs
        self._room_cv = threading.Condition(self._mu)  # the reader waits for room
        self._reading = False
        self._reader_tid = 0  # thread that holds the reader role
        self._releases_due = False  # poll_releases queued RELEASEs not yet taken
        self._leased = False  # frames with attachments came: leases may be held (under _lock)
        self._worker_out = 0  # bytes the worker queued since the last take (under _lock)
        self._rbuf = bytearray(_READ_SIZE)  # only the reading thread touches it
        self._rview = memoryview(self._rbuf)
        self._rbufs = [self._rbuf]
        self._chan_cache: dict[str, bytes] = {}
        self._closed: TetherError | None = None
        self._fatal: BaseException | None = None  # SystemExit from a handler, raised again
        self._hello = _Slot()
        self._serving: threading.Thread | None = None
        self._worker: threading.Thread | None = None
        self._worker_tid = 0
        self._worker_waits = False  # the worker is in invoke(): never pause reading
        self._jobs: collections.deque[tuple[Frame, int]] = collections.deque()
        self._jobs_bytes = 0
        # streams by request id (tether.sync.streaming): read here / produced here
        self._streams_in: dict[int, Any] = {}
        self._streams_out: dict[int, Any] = {}
        self._backlog: collections.deque[tuple[Frame, int]] = collections.deque()
        #: invokes from the other side allowed in the queue at once (more: ERROR ``busy``)
        self.max_inflight = max_inflight
        self._inflight = 0  # invokes in the worker's queue and the backlog (under _mu)
        self._running: dict[int, Call] = {}  # invokes whose handler runs (for call.cancelled)
        #: the most jobs ever queued for the worker at once (flow control)
        self.max_queued = 0
        self._flush(time.monotonic() + 10.0)

    # -- lifecycle --------------------------------------------------------

    def __enter__(self) -> Peer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def closed(self) -> bool:
        return self._closed is not None

    @property
    def remote_hello(self) -> codec.Hello | None:
        """The other side's HELLO (role it claims, name, pid), once received."""
        return self._conn.peer_hello

    def wait_hello(self, timeout: float | None) -> None:
        """Wait (bounded) for the other side's HELLO, reading the socket meanwhile.

        Raises:
            PeerGone: no HELLO within ``timeout``, or the connection ended.
        """
        deadline = None if timeout is None else time.monotonic() + timeout
        try:
            self._wait(self._hello, deadline)
        except InvokeTimeout:
            raise PeerGone(f"{self!r} sent no HELLO within {timeout} s") from None
        if self._hello.exc is not None:
            raise self._hello.exc

    def close(self, reason: str = "closed") -> None:
        """Say goodbye and close; pending invokes fail with ConnectionClosed."""
        with self._lock:
            if self._closed is not None:
                return
            self._conn.send_goodbye(reason)
        with contextlib.suppress(TetherError):  # bounded: a stuck writer holds the lock
            self._flush(time.monotonic() + 1.0, True, 1.0)
        self._end(ConnectionClosed(f"connection to {self.name or 'peer'} was closed: {reason}"))
        with self._mu:
            self._jobs.clear()  # handlers not started yet don't run
            self._backlog.clear()
            self._jobs_bytes = 0
            self._inflight = 0
        if self._serving is not None and self._serving is not threading.current_thread():
            self._serving.join(2.0)

    def wait_closed(self, timeout: float | None = None) -> None:
        """Serve handlers until the connection closes (or ``timeout`` passes).

        Raises:
            TimeoutError: still open after ``timeout``.
            SystemExit: a handler raised it (the peer closed; see the module docstring).
        """
        self._start_serving(force=True)
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._cv:
            while self._closed is None:
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    raise TimeoutError("connection still open")
                self._cv.wait(left)
        self._raise_fatal()

    def __repr__(self) -> str:
        return f"<sync.Peer {self.name or self._sock.fileno()} role={self.role}>"

    # -- registering ------------------------------------------------------

    def on_connect(self, fn: Callable[[Peer], Any]) -> Callable[[Peer], Any]:
        """Accept direct channels main opens with :meth:`tether.Main.connect`; a decorator.

        ``fn(peer)`` gets a new blocking :class:`Peer` for the other child, on
        this peer's handler thread; it starts serving once ``fn`` returned
        (register its handlers there). Raising refuses the channel.
        """
        direct.register(self.registry, direct.sync_accept(self, fn))
        self._registered()
        return fn

    def _registered(self) -> None:
        # Handlers run on a worker thread, in order; serving starts at the first
        # registration (a lazy child peer waits for its first blocking call).
        if not self._lazy:
            self._start_serving()

    def _start_serving(self, force: bool = False) -> None:
        if self._serving is not None or self._closed is not None:
            return
        reg = self.registry
        if not force and not (reg.invokes or reg.events or reg.hosts):
            return
        with self._cv:
            if self._serving is not None:
                return
            self._worker = threading.Thread(target=self._work, name="tether-h", daemon=True)
            self._serving = threading.Thread(target=self._serve, name="tether-reader", daemon=True)
            self._worker.start()
            self._serving.start()

    def _serve(self) -> None:
        slot = _Slot()  # never completes: read until closed
        with contextlib.suppress(TetherError):
            self._wait(slot, None, serve=True)

    # -- calling ----------------------------------------------------------

    def _chan(self, channel: str, args: tuple[Any, ...]) -> bytes:
        b = self._chan_cache.get(channel) if type(channel) is str else None
        if b is None:
            if not isinstance(channel, str):
                consume_all(args)
                raise TypeError(f"channel must be a str, not {type(channel).__name__}")
            b = self._chan_cache[channel] = channel.encode()
        return b

    def _refused(self, args: tuple[Any, ...]) -> BaseException:
        """Why nothing can be sent now (the peer said goodbye: PeerGone); moves ``args``."""
        consume_all(args)
        self._raise_fatal()
        if self._closed is not None:
            return self._closed
        reason = self._conn.goodbye_reason
        return PeerGone(f"{self!r} said goodbye: {reason or 'no reason given'}")

    @overload
    def invoke(
        self, channel: str, *args: Any, timeout: float | None = ..., result_type: type[T]
    ) -> T: ...
    @overload
    def invoke(
        self, channel: str, *args: Any, timeout: float | None = ..., result_type: Any = ...
    ) -> Any: ...
    def invoke(
        self, channel: str, *args: Any, timeout: float | None = DEFAULT, result_type: Any = Any
    ) -> Any:
        """Blocking invoke; same errors and ``result_type`` as :meth:`tether.Peer.invoke`.

        Raises:
            TypeError: ``channel`` is not a str, or ``timeout`` not a number.
            ValueError: ``timeout`` is negative or NaN.
        """
        chan = self._chan_cache.get(channel) if type(channel) is str else None
        if chan is None:
            chan = self._chan(channel, args)
        if self._lazy:
            self._start_serving()
        default = timeout is DEFAULT
        if default:
            timeout = self.timeout
        if timeout is not None and not (type(timeout) in _NUMBERS and 0 <= timeout < _INF):
            timeout = checked_timeout(timeout, args)
        deadline = None if timeout is None else time.monotonic() + timeout
        if self._leased:
            self._poll_releases()
        slot = _Slot()
        conn = self._conn
        with self._wlock:  # (the common case: queue and write under one hold)
            with self._lock:
                if self._closed is not None or conn.their_goodbye:
                    raise self._refused(args)
                rid = conn.send_invoke(chan, args, slot)
                data, fds = self._take_out()
            self._write(data, fds, deadline)
        if conn.buffered_out or self._releases_due:  # queued by a thread that left it to us
            self._flush(deadline)
        worker = self._worker_tid != 0 and self._worker_tid == threading.get_ident()
        if worker:
            self._set_worker_waits(True)
        try:
            self._wait(slot, deadline)
        except InvokeTimeout:
            with self._lock:
                self._conn.send_cancel(rid, "timeout")
            with contextlib.suppress(TetherError):
                self._flush(time.monotonic() + 1.0, block=False)
            assert timeout is not None
            raise InvokeTimeout(timeout_message(channel, timeout, default)) from None
        finally:
            if worker:
                self._set_worker_waits(False)
        if slot.exc is not None:
            raise slot.exc
        assert slot.frame is not None
        return decode_result(slot.frame, result_type)

    def stream(
        self,
        channel: str,
        *args: Any,
        item_type: Any = Any,
        window: int = DEFAULT_WINDOW,
        item_timeout: float | None = DEFAULT,
        timeout: float | None = None,
    ) -> streaming.Stream[Any]:
        """Iterate what a stream handler (a generator) on the other side yields; blocking.

        ``for x in peer.stream("tokens", "a b c"): ...``. Arguments and errors as
        :meth:`tether.Peer.stream`; closing the iterator early (``close()``,
        ``with``, or dropping it) stops the producer.
        """
        return streaming.stream(self, channel, args, item_type, window, item_timeout, timeout)

    def open(self, kind: str, *args: Any, timeout: float | None = DEFAULT) -> Route:
        """Blocking :meth:`tether.Peer.open`: a route to a host object the other side makes.

        Use it as ``with peer.open(kind, *args) as route:``, or close it with
        ``route.close()``. Same errors as :meth:`tether.Peer.open`.
        """
        return open_route(self, kind, args, self.timeout if timeout is DEFAULT else timeout)

    def send(self, channel: str, *args: Any) -> None:
        """Send a one-way event; blocks only while the peer is not reading.

        Safe from a handler (it runs on the worker thread).

        Raises:
            TypeError: ``channel`` is not a str.
        """
        chan = self._chan(channel, args)
        if self._lazy:
            self._start_serving()
        if self._leased:
            self._poll_releases()
        with self._lock:
            if self._closed is not None or self._conn.their_goodbye:
                raise self._refused(args)
            before = self._conn.buffered_out
            self._conn.send_event(chan, args)
            block = self._may_block(before)
        self._flush(None if self.timeout is None else time.monotonic() + self.timeout, block)

    def send_threadsafe(self, channel: str, *args: Any) -> None:
        """:meth:`send`: every blocking call is thread-safe (:meth:`tether.Call.send` uses it)."""
        self.send(channel, *args)

    def _may_block(self, before: int) -> bool:
        """Whether this thread waits for the write lock, rather than leave its frames to the holder.

        Called holding ``_lock`` after queueing, with the queue's size before.
        The worker waits only once it queued :data:`OUT_HIGH` bytes since the
        holder last took the queue: blocked on the lock it would stop draining
        the job queue, and a paused reader with it, while the peer may be
        waiting for this side to read (both sides flooding each other).
        """
        if self._worker_tid != threading.get_ident():
            return True
        self._worker_out += self._conn.buffered_out - before
        return self._worker_out > OUT_HIGH

    def _raise_fatal(self) -> None:
        if self._fatal is not None:
            raise self._fatal

    # -- writing ----------------------------------------------------------

    def _take_out(self) -> tuple[bytearray, list[int]]:
        """What the Connection queued: bytes, and descriptors for their first byte (holds _lock)."""
        self._releases_due = False
        self._worker_out = 0
        return self._conn.data_to_send()

    def _flush(self, deadline: float | None, block: bool = True, wait: float = -1) -> None:
        """Write everything queued (waiting at most ``wait`` seconds for the write lock).

        With ``block=False`` (the reader; the worker, unless much is queued)
        return at once if another thread holds the write lock: that thread
        writes what was queued, since each holder checks for more after it
        lets go of the lock.
        """
        wlock = self._wlock
        conn = self._conn
        while True:
            if not wlock.acquire(block, wait if block else -1):
                return
            try:
                with self._lock:
                    data, fds = self._take_out()
                if data:
                    self._write(data, fds, deadline)
            finally:
                wlock.release()
            if not (conn.buffered_out or self._releases_due) or self._closed is not None:
                return

    def _write(self, data: bytearray, fds: list[int], deadline: float | None) -> None:
        """Write all of ``data`` (holding _wlock); ``fds`` ride on its first byte and are closed.

        A stalled peer is bounded by ``deadline``; meanwhile this thread reads
        when nobody else does.
        """
        sock = self._sock
        n = 0
        if not fds:  # the common case: one send takes it all
            try:
                n = sock.send(data)
            except _AGAIN:
                n = 0
            except (OSError, ValueError) as exc:
                raise self._lost(exc) from exc
            if n == len(data):
                return
        view = memoryview(data)[n:]
        try:
            while view:
                try:
                    if fds:
                        n = sock.sendmsg([view], [(*_SCM, array.array("i", fds))])
                        _close_all(fds)
                        fds = []
                    else:
                        n = sock.send(view)
                except _AGAIN:
                    n = 0
                except (OSError, ValueError) as exc:
                    raise self._lost(exc) from exc
                view = view[n:]
                if view:
                    left = None if deadline is None else deadline - time.monotonic()
                    if left is not None and left <= 0:
                        # Part of a frame is on the wire: the stream cannot continue.
                        self._end(PeerGone(f"{self!r}: peer stopped reading; connection dropped"))
                        raise self._closed  # type: ignore[misc]
                    self._await_writable(left)
        finally:
            _close_all(fds)

    def _await_writable(self, left: float | None) -> None:
        """Wait for room in the socket, reading meanwhile if this thread may."""
        me = threading.get_ident()
        claimed = False
        if self._reader_tid != me:
            with self._mu:
                if not self._reading and self._serving is None and self._closed is None:
                    self._reading = claimed = True
                    self._reader_tid = me
        try:
            may_read = self._reader_tid == me and self._make_room(wait=False)
            if may_read:
                wait = left
            elif self._serving is None:
                wait = _TAKE_TURN  # another waiter reads; take over when it is done
            else:
                wait = _POLL_SLICE
            if wait is not None and left is not None:
                wait = min(wait, left)
            sock = self._sock
            try:
                r, _, _ = select.select([sock] if may_read else [], [sock], [], wait)
            except (OSError, ValueError) as exc:
                raise self._lost(exc) from exc
            if r:
                data = self._recv()
                if data is not None:
                    self._handle(data)
                    if self._leased:
                        self._poll_releases()
        finally:
            if claimed:
                with self._mu:
                    self._reading = False
                    self._reader_tid = 0
                    self._cv.notify_all()

    # -- reading ----------------------------------------------------------

    def _wait(self, slot: _Slot, deadline: float | None, serve: bool = False) -> None:
        cv = self._cv
        with cv:
            while True:
                if slot.done:
                    return
                if self._closed is not None:
                    raise self._closed
                if not self._reading and (serve or self._serving is None):
                    self._reading = True
                    self._reader_tid = threading.get_ident()
                    break
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    raise InvokeTimeout("timed out")
                cv.wait(left)
        try:
            after_read = False
            while not slot.done:
                if self._backlog:
                    self._make_room(wait=True, deadline=deadline)
                data = self._recv_wait(deadline, after_read)
                after_read = True
                self._handle(data)
                if self._leased:
                    # After _handle let go of the frames; the worker checks
                    # again after each handler: one of the two sees them dropped.
                    self._poll_releases()
        finally:
            with cv:
                self._reading = False
                self._reader_tid = 0
                cv.notify_all()

    def _recv(self) -> bytes | None:
        """One read: the bytes that arrived, ``b""`` at EOF, ``None`` if none yet.

        On unix sockets descriptors that came along go to the Connection first.
        """
        sock = self._sock
        try:
            if self._unix:
                n, anc, flags, _ = sock.recvmsg_into(self._rbufs, _ANC_SPACE)
                if anc:
                    self._take_fds(anc, flags)
            else:
                n = sock.recv_into(self._rbuf)
        except _AGAIN:
            return None
        except (OSError, ValueError) as exc:
            raise self._lost(exc) from exc
        return self._rview[:n].tobytes()

    def _take_fds(self, anc: list[tuple[int, int, bytes]], flags: int) -> None:
        fds = array.array("i")
        for level, kind, cdata in anc:
            if (level, kind) == _SCM:
                fds.frombytes(cdata[: len(cdata) - len(cdata) % fds.itemsize])
        err: ProtocolError | None = None
        if flags & socket.MSG_CTRUNC:
            _close_all(fds)
            err = ProtocolError("too many file descriptors in one message")
        else:
            with self._lock:
                try:
                    self._conn.receive_fds(fds)
                except ProtocolError as exc:
                    err = exc
        if err is not None:
            self._bad_message(err)
            raise err

    def _recv_wait(self, deadline: float | None, after_read: bool = False) -> bytes:
        """The next bytes: polled for while a policy says they are due soon, else slept for.

        A chance to poll: an answer is awaited (the answers' policy), or this
        thread just handled a read (the requests' policy: more may follow).
        """
        sock = self._sock
        if self._conn.pending:
            policy: SpinPolicy | None = self._answer_poll
        else:
            policy = self._request_poll if after_read else None
        if policy is not None and (window := policy.window()):
            start = time.perf_counter()
            while True:
                if self._closed is not None:
                    raise self._closed
                data = self._recv()
                if data is not None:
                    policy.spun(time.perf_counter() - start)
                    return data
                if time.perf_counter() - start >= window:
                    policy.spun(None)
                    break
                os.sched_yield()  # the peer may share this CPU: let it run
        while True:
            if self._closed is not None:
                raise self._closed
            data = self._recv()
            if data is not None:
                return data
            left = None if deadline is None else deadline - time.monotonic()
            if left is not None and left <= 0:
                raise InvokeTimeout("timed out")
            wait = _POLL_SLICE if left is None else min(left, _POLL_SLICE)
            try:
                select.select([sock], [], [], wait)
            except (OSError, ValueError) as exc:
                raise self._lost(exc) from exc

    def _handle(self, data: bytes) -> None:
        """Feed what the reader got to the Connection and act on the frames."""
        conn = self._conn
        err: TetherError | None = None
        settled: list[_Slot] = []
        errors: list[tuple[_Slot, Frame]] = []
        jobs: list[tuple[Frame, int]] | None = None
        cancels: list[int] | None = None
        credits: list[Frame] | None = None
        goodbye = False
        with self._lock:
            try:
                if data:
                    frames = conn.receive_data(data)
                else:
                    frames = []
                    conn.receive_eof()
                    err = PeerGone(f"{self!r}: connection lost (EOF)")
            except ProtocolError as exc:
                frames = []
                err = exc
            for f in frames:
                k = f.kind
                if f.attachments:
                    self._leased = True
                if k == K_RESULT:
                    slot = conn.take_pending(f.request_id)
                    if slot is not None:
                        slot.frame = f  # (read once done is set, below)
                        settled.append(slot)
                elif k == K_ERROR:
                    slot = conn.take_pending(f.request_id)
                    if slot is not None:
                        errors.append((slot, f))
                        settled.append(slot)
                elif k in JOBS:  # (a reused request id was refused by the core, 9.1)
                    if jobs is None:
                        jobs = []
                    jobs.append((f, _job_size(f)))
                elif k >= K_STREAM:  # STREAM, ITEM, CREDIT (tether.sync.streaming)
                    if k == K_STREAM:
                        if jobs is None:
                            jobs = []
                        jobs.append((f, _job_size(f)))
                        # its account, before the CREDIT that follows it is taken
                        self._streams_out[f.request_id] = streaming.Outbound()
                    elif k == K_ITEM:
                        st = self._streams_in.get(f.request_id)
                        if st is not None:
                            try:
                                st.inb.on_item(f)
                            except ProtocolError as exc:
                                err = exc
                                break
                            settled.append(st)
                    else:
                        if credits is None:
                            credits = []
                        credits.append(f)
                elif k == K_CANCEL:
                    if cancels is None:
                        cancels = []
                    cancels.append(f.request_id)
                elif k == K_GOODBYE:
                    goodbye = True
                    break  # anything after it is ignored
            reply = conn.buffered_out > 0
            hello = not self._hello.done and conn.peer_hello is not None
        if err is not None:
            if isinstance(err, ProtocolError) and data:
                self._bad_message(err)
            else:
                self._end(err)
            raise self._closed  # type: ignore[misc]
        if credits:
            try:
                for f in credits:
                    streaming.on_credit(self, f)
            except ProtocolError as exc:
                self._bad_message(exc)
                raise self._closed from None  # type: ignore[misc]
        if reply:
            with contextlib.suppress(TetherError):
                self._flush(time.monotonic() + _REPLY_WRITE, block=False)
        if settled or hello:
            for slot, f in errors:
                slot.exc = decode_error(f)
            with self._mu:
                for slot in settled:
                    slot.done = True
                if hello:
                    self._hello.done = True
                self._cv.notify_all()
        if jobs:
            self._start_serving(force=True)
            self._enqueue(jobs)
        if cancels:
            self._cancel_queued(cancels)
            for rid in cancels:
                out = self._streams_out.pop(rid, None)
                if out is not None:
                    out.cancel()
        if goodbye:
            reason = conn.goodbye_reason or "no reason given"
            self._end(PeerGone(f"{self!r} said goodbye: {reason}"))

    # -- the job queue (flow control) -----------------------------------------

    def _enqueue(self, jobs: list[tuple[Frame, int]]) -> None:
        busy: list[int] = []
        with self._mu:
            for job in jobs:
                if job[0].kind == K_INVOKE or job[0].kind == K_STREAM:
                    if self._inflight >= self.max_inflight:
                        busy.append(job[0].request_id)
                        self._streams_out.pop(job[0].request_id, None)
                        continue
                    self._inflight += 1
                self._backlog.append(job)
            self._fill()
        if busy:
            self._refuse_busy(busy)

    def _refuse_busy(self, rids: list[int]) -> None:
        """Answer invokes past ``max_inflight`` at once with ERROR ``busy``."""
        info = codec.ErrorInfo(
            "busy", f"{self.max_inflight} invokes from this connection are in flight already"
        )
        with self._lock:
            if self._closed is not None:
                return
            for rid in rids:
                self._conn.send_error(rid, info)
        with contextlib.suppress(TetherError):
            self._flush(time.monotonic() + _REPLY_WRITE, block=False)

    def _fill(self) -> None:
        """Move jobs from the reader's backlog to the worker's queue while there is room.

        The caller holds ``_mu``.
        """
        backlog, q = self._backlog, self._jobs
        moved = False
        while backlog and (
            (len(q) < HIGH_JOBS and self._jobs_bytes < HIGH_BYTES) or self._unbounded()
        ):
            job = backlog.popleft()
            q.append(job)
            self._jobs_bytes += job[1]
            moved = True
        if moved:
            if len(q) > self.max_queued:
                self.max_queued = len(q)
            self._work_cv.notify()

    def _make_room(self, wait: bool, deadline: float | None = None) -> bool:
        """Queue the backlog for the worker; True once it is empty.

        With ``wait``, pause (not reading) until the worker drains to low water.
        """
        with self._mu:
            while True:
                self._fill()
                if not self._backlog:
                    return True
                if not wait:
                    return False
                if self._closed is not None:
                    raise self._closed
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    raise InvokeTimeout("timed out")
                while (
                    (len(self._jobs) > LOW_JOBS or self._jobs_bytes > LOW_BYTES)
                    and not self._unbounded()
                    and self._closed is None
                ):
                    # (bounded slices: received Handles also go when taken on other threads)
                    if not self._room_cv.wait(
                        _ROOM_SLICE if left is None else min(left, _ROOM_SLICE)
                    ):
                        break

    def _unbounded(self) -> bool:
        """Whether the queue takes every job read: the worker waits in ``invoke`` for an answer.

        Not once :data:`HANDLES_WAITING` received Handles are untaken: reading
        stops there (the answer waits behind them, up to the invoke's timeout)
        rather than pass :data:`MAX_LIVE_HANDLES`, where the peer would be dropped.
        """
        return self._worker_waits and self._conn.handles_held < HANDLES_WAITING

    def _set_worker_waits(self, waits: bool) -> None:
        with self._mu:
            self._worker_waits = waits
            if waits:
                self._room_cv.notify_all()

    def _cancel_queued(self, rids: list[int]) -> None:
        # CANCEL: an invoke still queued is dropped (the caller no longer waits for
        # it). A handler already running cannot be interrupted: its call.cancelled
        # is set (it may stop early); its answer is still sent, the caller ignores it.
        for rid in rids:
            running = self._running.get(rid)
            if running is not None:
                running._set_cancelled()
        with self._mu:
            for q in (self._jobs, self._backlog):
                for job in list(q):
                    f = job[0]
                    if f.kind in (K_INVOKE, K_STREAM) and f.request_id in rids:
                        q.remove(job)
                        self._inflight -= 1
                        if q is self._jobs:
                            self._jobs_bytes -= job[1]

    def _work(self) -> None:
        """The worker thread: run queued handlers in order."""
        self._worker_tid = threading.get_ident()
        q = self._jobs
        while True:
            with self._mu:
                while not q and self._closed is None:
                    self._work_cv.wait()
                if not q:
                    return
                f, size = q.popleft()
                self._jobs_bytes -= size
                if f.kind == K_INVOKE or f.kind == K_STREAM:
                    self._inflight -= 1
                if len(q) <= LOW_JOBS and self._jobs_bytes <= LOW_BYTES:
                    self._room_cv.notify_all()
                closed = self._closed is not None
            if f.kind == K_EVENT:
                self._run_listeners(f)  # events that came before the end still run
            elif f.kind in ROUTE_FRAMES:
                if not closed:
                    dispatch_route_frame(self, f)
            elif not closed:
                self._run_handler(f)
            del f
            if self._leased:
                self._poll_releases()
            if self._fatal is not None:
                return

    def _run_listeners(self, f: Frame) -> None:
        if f.route_id:
            found = route_listeners(self._conn, f, self.role)
        else:
            found = self.registry.listeners(f, self.role, self.local)
        for h, args in found:
            try:
                h.fn(Call(self, f.channel, 0, f.route_id), *args)
            except _FATAL as exc:
                self._stop_process(exc)
                return
            except BaseException:
                log.exception("listener for %r raised", f.channel)

    def _run_handler(self, f: Frame) -> None:
        if f.kind == K_STREAM:
            streaming.produce(self, f)
            return
        rid = f.request_id
        if f.route_id:
            found = route_handler(self._conn, f, self.role)
        else:
            found = self.registry.resolve(f, self.role, self.local)
        if isinstance(found, codec.ErrorInfo):
            self._answer(rid, None, found)
            return
        handler, args = found
        del found
        call = Call(self, f.channel, rid, f.route_id)
        self._running[rid] = call  # so a CANCEL, or the end, sets call.cancelled
        if handler.thread:
            # Off the in-order worker, onto the shared pool: the worker goes on
            # with the next job. The invoke counts in flight until answered.
            with self._mu:
                self._inflight += 1
            try:
                threads.submit(self._run_threaded, handler, call, args)
            except RuntimeError:  # the pool is shutting down with the process
                self._running.pop(rid, None)
                with self._mu:
                    self._inflight -= 1
                self._answer(rid, None, codec.ErrorInfo("closed", "shutting down"))
            return
        self._call(handler, call, args)

    def _run_threaded(self, handler: Handler, call: Call, args: tuple[Any, ...]) -> None:
        """A ``thread=True`` handler, on a pool thread."""
        try:
            if self._closed is None and not call.cancelled:
                self._call(handler, call, args)
            else:
                self._running.pop(call.request_id, None)
        finally:
            with self._mu:
                self._inflight -= 1

    def _call(self, handler: Handler, call: Call, args: tuple[Any, ...]) -> None:
        """Run one invoke's handler and answer it (worker or pool thread)."""
        rid = call.request_id
        fatal: BaseException | None = None
        try:
            result = handler.fn(call, *args)
        except BaseException as exc:
            if not isinstance(exc, (Exception, *_FATAL)):
                log.exception("handler for %r raised %s", call.channel, type(exc).__name__)
            if isinstance(exc, _FATAL):
                fatal = exc
            self._answer(rid, None, codec.error_info(exc, traceback=self.tracebacks))
        else:
            self._answer(rid, result, None)
        finally:
            self._running.pop(rid, None)
        if fatal is not None:
            self._stop_process(fatal)

    def _answer(self, rid: int, result: Any, info: codec.ErrorInfo | None) -> None:
        """Queue and write exactly one answer to invoke ``rid``."""
        conn = self._conn
        with self._lock:
            if self._closed is not None:
                return
            before = conn.buffered_out
            try:
                if info is None:
                    conn.answer(rid, result)
                else:
                    conn.send_error(rid, info)
            except BaseException as exc:  # the result or the error does not encode or fit
                if info is None:
                    info = codec.error_info(exc, traceback=False)
                try:  # cut down: no traceback, a short message
                    conn.send_error(rid, codec.ErrorInfo(info.code, info.message[:1000], info.type))
                except BaseException:
                    conn.send_error(rid, codec.ErrorInfo("remote", "the error could not be sent"))
            block = self._may_block(before)
        with contextlib.suppress(TetherError):
            self._flush(time.monotonic() + _ANSWER_WRITE, block)

    def _stop_process(self, exc: BaseException) -> None:
        """A handler raised SystemExit or KeyboardInterrupt: stop as Python would."""
        if isinstance(exc, SystemExit):
            self._fatal = exc
        else:
            _thread.interrupt_main()  # raised in the main thread once it runs again
        self.close(f"handler raised {type(exc).__name__}")

    def _poll_releases(self) -> None:
        """RELEASE lent segments whose views are gone (after handlers and results)."""
        with self._lock:
            due = self._conn.poll_releases()
            if due:
                self._releases_due = True
            self._leased = self._conn.leases_held > 0
        if due:
            with contextlib.suppress(TetherError):
                self._flush(time.monotonic() + _REPLY_WRITE, block=False)

    # -- ending -----------------------------------------------------------

    def _lost(self, exc: BaseException) -> TetherError:
        """The socket failed (or was closed under us): end, return what callers get."""
        err = PeerGone(f"{self!r}: connection lost: {exc}")
        err.__cause__ = exc
        self._end(err)
        assert self._closed is not None
        return self._closed

    def _bad_message(self, exc: ProtocolError) -> None:
        """Chromium's bad-message rule: drop the peer that broke the protocol."""
        log.warning("%r broke the protocol: %s", self, exc)
        self._end(exc)

    def _end(self, exc: TetherError) -> None:
        with self._mu:
            if self._closed is not None:
                return
            self._closed = exc
        with self._lock:
            routes_ended = end_routes(self, exc) if self._conn.routes is not None else None
            waiters = self._conn.fail_all()  # and closes the attachment store
        with self._mu:
            for slot in (*waiters, self._hello):
                if not slot.done:
                    slot.exc = exc
                    slot.done = True
            self._cv.notify_all()
            self._work_cv.notify_all()
            self._room_cv.notify_all()
        for call in self._running.copy().values():
            call._set_cancelled()  # nobody is left to take the answer
        with contextlib.suppress(OSError):
            self._sock.shutdown(socket.SHUT_RDWR)  # wakes a thread blocked in select()
        with contextlib.suppress(OSError):
            self._sock.close()
        if routes_ended is not None:
            routes_ended()  # hosts' close(), holding no lock


def loop_serves(sock: socket.socket) -> bool:
    """Whether this thread runs an event loop and ``sock``'s listener lives in this process.

    Then a blocking connect would wait for a HELLO that loop can never send.
    """
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return False
    if sock.family == socket.AF_UNIX:
        cred = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
        pid: int = struct.unpack("3i", cred)[0]
        return pid == os.getpid()
    return _listens_here(sock.getpeername()[1])


def _listens_here(port: int) -> bool:
    """Whether a TCP socket listening on ``port`` belongs to this process (Linux /proc)."""
    try:
        mine = set()
        for fd in os.listdir("/proc/self/fd"):
            with contextlib.suppress(OSError):
                link = os.readlink(f"/proc/self/fd/{fd}")
                if link.startswith("socket:["):
                    mine.add(link[8:-1])
        for table in ("/proc/net/tcp", "/proc/net/tcp6"):
            with contextlib.suppress(OSError), open(table) as f:
                next(f)
                for line in f:
                    cols = line.split()
                    listening = cols[3] == "0A" and int(cols[1].rsplit(":", 1)[1], 16) == port
                    if listening and cols[9] in mine:
                        return True
    except (OSError, ValueError, IndexError):
        return False
    return False
