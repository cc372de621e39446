"""The asyncio side of one connection: :class:`Peer`.

Thin over the protocol core: bytes from the :class:`~.stream.SocketStream`
go to :class:`~tether.protocol.Connection`, the frames it returns are
dispatched by plain calls (a task only for ``async`` handlers), and what the
connection queued is written once per loop turn, so frames issued together
share one ``send`` syscall.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import time
from collections.abc import Callable
from typing import Any, Final, TypeVar

from .. import codec
from ..attachments import MemfdStore
from ..errors import (
    BadRequest,
    ConnectionClosed,
    InvokeTimeout,
    PeerGone,
    ProtocolError,
    TetherError,
)
from ..protocol import Connection
from ..registry import Call, Handler, Handlers, Registry
from ..results import DEFAULT, DEFAULT_TIMEOUT, decode_error, decode_result
from ..shm import consume_all
from ..wire import (
    DEFAULT_MAX_FRAME_SIZE,
    K_CANCEL,
    K_ERROR,
    K_EVENT,
    K_GOODBYE,
    K_INVOKE,
    K_RESULT,
    Frame,
)
from .stream import SocketStream

__all__ = ["Peer"]

log = logging.getLogger("tether")

T = TypeVar("T")


HIGH_WATER: Final = 4 * 1024 * 1024
LOW_WATER: Final = 1024 * 1024
FLUSH_SIZE: Final = 64 * 1024  # queued bytes that are written at once, not at the next turn
_BURST: Final = 10e-6  # invokes closer together than this are coalesced into one write
_LEASE_POLL: Final = 0.002  # seconds between checks for dropped views of lent segments


class Peer(Handlers):
    """One connection to another tether endpoint, driven by asyncio.

    Both sides may ``invoke``/``send`` and ``handle``/``on``. A peer made by
    :func:`tether.connect` or passed to a child's target owns its handlers; a
    peer that connected to a :class:`~tether.Main` shares the main's handlers.

    Attributes:
        role: the role granted to the *other* side (``child``, ``client``,
            ``main``...). Handlers restricted with ``roles=`` check it.
        timeout: the default invoke timeout in seconds (``None``: wait forever).
        spin: low-latency mode: seconds to keep polling the socket, instead of
            sleeping, while an answer or the next request is expected. It
            blocks the event loop while it polls; 0 (the default) turns it off.
    """

    def __init__(
        self,
        sock: socket.socket,
        *,
        role: str,
        local_role: str,
        registry: Registry | None = None,
        timeout: float | None = DEFAULT_TIMEOUT,
        max_frame_size: int = DEFAULT_MAX_FRAME_SIZE,
        name: str = "",
        on_close: Callable[[Peer], None] | None = None,
        spin: float = 0.0,
        tracebacks: bool = True,
    ) -> None:
        self._loop = asyncio.get_running_loop()
        self._sock = sock
        self._stream = SocketStream(
            sock, self._loop, self._on_readable, self._write_failed, LOW_WATER
        )
        self._fd = self._stream.fd
        self._conn = Connection(
            local_role,
            name=name,
            pid=os.getpid(),
            max_frame_size=max_frame_size,
            # On unix sockets: pass descriptors. A main lends its segments only
            # to the children it spawned; the other sides accept segments lent
            # by the (trusted, privileged) main.
            store=MemfdStore(lend=role == "child", borrow=local_role != "main")
            if self._stream.unix
            else None,
        )
        self.registry = registry if registry is not None else Registry()
        self.role = role
        self.timeout = timeout
        self.name = name
        #: whether ERRORs sent to the other side carry the handler's traceback
        self.tracebacks = tracebacks
        self._on_close = on_close
        self._lease_timer: asyncio.TimerHandle | None = None
        store = self._conn.store
        if isinstance(store, MemfdStore):
            store.on_release = self._lease_released
        self._last_direct = 0.0  # when an invoke last flushed on its own
        # rid -> (deadline, future, channel, timeout) of invokes with a timeout
        self._deadlines: dict[int, tuple[float, asyncio.Future[Any], str, float]] = {}
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at = 0.0
        #: seconds to poll the socket before the loop sleeps (0: never; low-latency mode)
        self.spin = spin
        self._spinning = False
        self._woke = False  # the last read resolved a future or started a task
        self._chan_cache: dict[str, bytes] = {}
        self._serving: dict[int, asyncio.Task[Any]] = {}
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
        self._stream.start()
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
        return self._sock.fileno()

    def abort(self, exc: TetherError) -> None:
        """Drop the connection now, without a goodbye: pending invokes fail with ``exc``."""
        self._shutdown(exc)

    @property
    def remote_hello(self) -> codec.Hello | None:
        """The other side's HELLO (role it claims, name, pid), once received."""
        return self._conn.peer_hello

    async def wait_closed(self) -> None:
        """Wait until the connection is closed, by either side."""
        await asyncio.shield(self._closed_fut)

    async def close(self, reason: str = "closed", timeout: float = 1.0) -> None:
        """Say goodbye, flush what is queued (bounded by ``timeout``) and close.

        Pending invokes fail with :class:`ConnectionClosed`.
        """
        if self._closed is not None:
            return
        self._conn.send_goodbye(reason)
        self._flush()
        if self._stream.buffered:
            with contextlib.suppress(TimeoutError, TetherError):
                await asyncio.wait_for(self._wait_drained(0), timeout)
        self._shutdown(
            ConnectionClosed(f"connection to {self.name or self._fd} was closed: {reason}")
        )

    async def __aenter__(self) -> Peer:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    def __repr__(self) -> str:
        state = "closed" if self._closed else "open"
        return f"<Peer {self.name or self._fd} role={self.role} {state}>"

    # -- registering ------------------------------------------------------

    # -- calling ----------------------------------------------------------

    def _chan(self, channel: str) -> bytes:
        b = self._chan_cache.get(channel)
        if b is None:
            b = self._chan_cache[channel] = channel.encode()
        return b

    async def invoke(
        self,
        channel: str,
        *args: Any,
        timeout: float | None = DEFAULT,
        result_type: type[T] | Any = Any,
    ) -> Any:
        """Call ``channel`` on the other side and return its result.

        Args:
            timeout: seconds to wait; defaults to the peer's ``timeout``.
                ``None`` waits forever. On expiry the remote handler is cancelled.
            result_type: decode and validate the result as this type.

        Raises:
            InvokeTimeout, RemoteError, NoHandler, Forbidden, BadRequest,
            PeerGone, ProtocolError, ConnectionClosed, PayloadTooLarge.
        """
        if self._closed is not None:
            consume_all(args)
            raise self._closed
        loop = self._loop
        fut = loop.create_future()
        rid = self._conn.send_invoke(self._chan(channel), args, fut)
        now = time.perf_counter()
        if self._conn.fds_queued or (
            now - self._last_direct > _BURST and self._flush_handle is None
        ):
            # A lone invoke goes out now, saving a turn of the loop on the round
            # trip; invokes issued back to back share one write at the next turn.
            self._last_direct = now
            self._flush()
        else:
            self._kick()
        if timeout is DEFAULT:
            timeout = self.timeout
        deadlines = self._deadlines
        if timeout is not None:
            at = loop.time() + timeout
            deadlines[rid] = (at, fut, channel, timeout)
            if self._timer is None or at < self._timer_at:
                self._arm(at)
        try:
            if self._stream.buffered + self._conn.buffered_out > HIGH_WATER:
                await self._wait_drained(LOW_WATER)
            frame: Frame = await fut
        except asyncio.CancelledError:
            self._conn.send_cancel(rid)
            self._kick()
            raise
        finally:
            deadlines.pop(rid, None)
        return decode_result(frame, result_type)

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
            _, fut, channel, timeout = self._deadlines.pop(rid)
            self._expire(rid, fut, channel, timeout)
        if self._deadlines and self._closed is None:
            self._arm(min(d[0] for d in self._deadlines.values()))

    def _expire(self, rid: int, fut: asyncio.Future[Any], channel: str, timeout: float) -> None:
        if not fut.done():
            self._conn.send_cancel(rid)
            self._kick()
            fut.set_exception(InvokeTimeout(f"no answer on {channel!r} within {timeout} s"))

    async def send(self, channel: str, *args: Any) -> None:
        """Send a one-way event on ``channel``. Waits only when the peer lags.

        Raises:
            ConnectionClosed, PeerGone, ProtocolError, PayloadTooLarge.
        """
        if self._closed is not None:
            consume_all(args)
            raise self._closed
        conn = self._conn
        chan = self._chan_cache.get(channel)
        conn.send_event(chan if chan is not None else self._chan(channel), args)
        queued = conn.buffered_out
        if queued >= FLUSH_SIZE or conn.fds_queued:
            # Write now rather than when the loop turns: the peer starts reading
            # while this side keeps producing (a loop that never yields would
            # otherwise alternate with its reader instead of overlapping).
            self._flush()
        else:
            self._kick()
        if self._stream.buffered + queued > HIGH_WATER:
            await self._wait_drained(LOW_WATER)

    # -- writing ----------------------------------------------------------

    def _poll_leases(self) -> None:
        """Release lent segments whose views are gone; re-check while some are out."""
        self._lease_timer = None
        if self._closed is not None:
            return
        if self._conn.poll_releases():
            self._kick()
        store = self._conn.store
        if self._conn.leases_held and not (isinstance(store, MemfdStore) and store.notifies):
            self._lease_timer = self._loop.call_later(_LEASE_POLL, self._poll_leases)

    def _lease_released(self) -> None:
        """The store saw a lent segment's last view go (any thread): release it."""
        with contextlib.suppress(RuntimeError):  # the loop is closed: nothing to release
            self._loop.call_soon_threadsafe(self._poll_leases)

    def _kick(self) -> None:
        if self._flush_handle is None and self._started:
            self._flush_handle = self._loop.call_soon(self._flush)

    def _flush(self) -> None:
        """Write what the connection queued (the stream keeps what the socket won't take)."""
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
            self._lost(self._gone(exc))
            return
        if done and self.spin and self._conn.pending and not self._spinning:
            self._spin()  # our caller awaits an answer: poll for it

    def _write_failed(self, exc: OSError) -> None:
        self._lost(self._gone(exc))

    async def _wait_drained(self, low: int) -> None:
        self._flush()
        await self._stream.drain(low)
        if self._closed is not None:
            raise self._closed

    # -- reading ----------------------------------------------------------

    def _on_readable(self) -> None:
        if self._read_once():
            if self._conn.leases_held and self._lease_timer is None:
                self._poll_leases()  # handlers may have dropped what they were lent
            if self.spin and not self._spinning:
                self._spin()  # more is likely on its way: answer it without sleeping

    def _spin(self) -> None:
        """Low-latency mode: poll the socket for up to ``spin`` seconds.

        Blocks the event loop while it polls, trading CPU for the 20-30 us a
        sleeping process takes to wake; only used when asked for.
        """
        self._spinning = True
        try:
            deadline = time.perf_counter() + self.spin
            while self._closed is None and time.perf_counter() < deadline:
                if self._read_once():
                    if self._woke:
                        return  # a result or a task is ready: let the loop run it
                    deadline = time.perf_counter() + self.spin
                else:
                    os.sched_yield()  # the peer may share this CPU: let it run
        finally:
            self._spinning = False

    def _read_once(self) -> bool:
        """Read and handle what is available; True if bytes arrived."""
        self._woke = False
        try:
            data = self._stream.recv(self._conn.receive_fds)
        except OSError as exc:
            self._lost(self._gone(exc))
            return False
        except ProtocolError as exc:
            self._bad_message(exc)
            return False
        if data is None:
            return False
        if not data:
            try:
                self._conn.receive_eof()
            except ProtocolError as exc:
                self._bad_message(exc)  # EOF mid-frame: logged like any protocol error
            else:
                self._lost(self._gone(None))
            return False
        try:
            frames = self._conn.receive_data(data)
        except ProtocolError as exc:
            self._bad_message(exc)
            return False
        if self._awaiting_hello and self._conn.peer_hello is not None:
            self._awaiting_hello = False
            self._hello_fut.set_result(None)
        take = self._conn.take_pending
        for f in frames:
            k = f.kind
            if k == K_INVOKE:
                self._on_invoke(f)  # answered inline, or a task (which sets _woke)
                continue
            self._woke = True  # anything else hands work to the loop
            if k == K_RESULT:
                fut = take(f.request_id)
                if fut is not None and not fut.done():
                    fut.set_result(f)
            elif k == K_EVENT:
                self._on_event(f)
            elif k == K_ERROR:
                self._on_error(f)
            elif k == K_CANCEL:
                task = self._serving.pop(f.request_id, None)
                if task is not None:
                    task.cancel()
            elif k == K_GOODBYE:
                reason = self._conn.goodbye_reason or "no reason given"
                self._lost(PeerGone(f"{self!r} said goodbye: {reason}"))
                return True
        if self._conn.buffered_out:
            self._flush()
        return True

    def _on_error(self, f: Frame) -> None:
        fut = self._conn.take_pending(f.request_id)
        if fut is None or fut.done():
            return
        fut.set_exception(decode_error(f))

    def _on_invoke(self, f: Frame) -> None:
        rid = f.request_id
        found = self.registry.resolve(f, self.role)
        if isinstance(found, codec.ErrorInfo):
            self._conn.send_error(rid, found)
            return
        h, args = found
        call = Call(self, f.channel, rid, f.route_id)
        if h.is_async:
            self._serving[rid] = self._loop.create_task(self._run_async(h, call, args))
            self._woke = True
            return
        try:
            result = h.fn(call, *args)
        except Exception as exc:
            self._conn.send_error(rid, codec.error_info(exc))
        else:
            self._conn.answer(rid, result)

    async def _run_async(self, h: Handler, call: Call, args: tuple[Any, ...]) -> None:
        rid = call.request_id
        try:
            result = await h.fn(call, *args)
        except asyncio.CancelledError:
            self._serving.pop(rid, None)
            raise
        except Exception as exc:
            self._serving.pop(rid, None)
            self._conn.send_error(rid, codec.error_info(exc))
        else:
            if self._serving.pop(rid, None) is None:
                return  # cancelled by the caller meanwhile
            self._conn.answer(rid, result)
        self._kick()

    def _on_event(self, f: Frame) -> None:
        handlers = self.registry.events.get(f.channel)
        if not handlers:
            log.debug("no listener for event %r from %r", f.channel, self)
            return
        for h in handlers:
            if h.roles is not None and self.role not in h.roles:
                continue
            try:
                args = h.spec.decode(f.body, f.attachments)
            except BadRequest as exc:
                log.warning("dropped event on %r from %r: %s", f.channel, self, exc)
                continue
            call = Call(self, f.channel, 0, f.route_id)
            if h.is_async:
                self._loop.create_task(self._run_event(h, call, args))
                continue
            try:
                h.fn(call, *args)
            except Exception:
                log.exception("listener for %r raised", f.channel)

    @staticmethod
    async def _run_event(h: Handler, call: Call, args: tuple[Any, ...]) -> None:
        try:
            await h.fn(call, *args)
        except Exception:
            log.exception("listener for %r raised", call.channel)

    # -- ending -----------------------------------------------------------

    def _gone(self, exc: OSError | None) -> PeerGone:
        err = PeerGone(f"{self!r}: connection lost" + (f": {exc}" if exc else " (EOF)"))
        err.__cause__ = exc
        return err

    def _bad_message(self, exc: ProtocolError) -> None:
        """Chromium's bad-message rule: drop the peer that broke the protocol."""
        log.warning("%r broke the protocol: %s", self, exc)
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
        self._deadlines.clear()
        for fut in self._conn.fail_all():
            if not fut.done():
                fut.set_exception(exc)
        for task in self._serving.values():
            task.cancel()
        self._serving.clear()
        if not self._hello_fut.done():
            self._hello_fut.set_exception(exc)
            self._hello_fut.exception()  # mark retrieved
        self._closed_fut.set_result(None)
        if self._on_close is not None:
            self._on_close(self)
