"""The blocking API: one connection driven by plain threads, no event loop.

Reading is shared leader/follower style: a thread waiting for a result reads
the socket itself (spinning briefly before it sleeps, which saves a wake-up on
each round trip) and hands other threads their results. Once handlers are
registered, a dispatcher thread reads instead, and handlers run in order on
one worker thread, so a handler may itself invoke.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import logging
import os
import select
import socket
import threading
import time
from typing import Any, Final

from .. import codec
from ..errors import (
    ConnectionClosed,
    InvokeTimeout,
    PeerGone,
    ProtocolError,
    TetherError,
)
from ..protocol import Connection
from ..registry import Call, Handlers, Registry
from ..results import DEFAULT, DEFAULT_TIMEOUT, decode_error, decode_result
from ..shm import consume_all
from ..wire import (
    DEFAULT_MAX_FRAME_SIZE,
    K_ERROR,
    K_EVENT,
    K_GOODBYE,
    K_INVOKE,
    K_RESULT,
    Frame,
)

__all__ = ["Call", "Peer"]

log = logging.getLogger("tether")

SPIN_SECONDS: Final = 0.0002
_READ_SIZE: Final = 256 * 1024
_POLL_SLICE: Final = 0.25


class _Slot:
    __slots__ = ("done", "exc", "frame")

    def __init__(self) -> None:
        self.done = False
        self.frame: Frame | None = None
        self.exc: BaseException | None = None


class Peer(Handlers):
    """A blocking peer, safe to share between threads.

    Args:
        spin: seconds a waiting thread polls the socket before it sleeps
            (200 us by default: a sleeping thread takes 20-30 us to wake).
        lazy: don't start serving handlers when they are registered; start at
            the first blocking call instead (used for a child's sync target, so
            every handler is in place before anything is read).
    """

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
        spin: float = SPIN_SECONDS,
    ) -> None:
        sock.setblocking(False)
        self._sock = sock
        self._conn = Connection(
            local_role, name=name, pid=os.getpid(), max_frame_size=max_frame_size
        )
        self.registry = registry if registry is not None else Registry()
        self.role = role
        self.timeout = timeout
        self.name = name
        self._lazy = lazy
        self.spin = spin
        self._wlock = threading.Lock()  # the Connection and writes to the socket
        self._cv = threading.Condition(threading.Lock())  # who reads; results
        self._reading = False
        self._rbuf = bytearray(_READ_SIZE)  # only the reading thread touches it
        self._rview = memoryview(self._rbuf)
        self._closed: TetherError | None = None
        self._serving: threading.Thread | None = None
        self._worker: concurrent.futures.ThreadPoolExecutor | None = None
        with self._wlock:
            self._write(self._conn.data_to_send()[0], time.monotonic() + 10.0)

    # -- lifecycle --------------------------------------------------------

    def __enter__(self) -> Peer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def closed(self) -> bool:
        return self._closed is not None

    def close(self, reason: str = "closed") -> None:
        """Say goodbye and close; pending invokes fail with ConnectionClosed."""
        with self._wlock:
            if self._closed is not None:
                return
            self._conn.send_goodbye(reason)
            with contextlib.suppress(TetherError):
                self._write(self._conn.data_to_send()[0], time.monotonic() + 1.0)
        self._end(ConnectionClosed(f"connection to {self.name or 'peer'} was closed: {reason}"))
        if self._serving is not None and self._serving is not threading.current_thread():
            self._serving.join(2.0)
        if self._worker is not None:
            self._worker.shutdown(wait=False, cancel_futures=True)

    def wait_closed(self, timeout: float | None = None) -> None:
        """Serve handlers until the connection closes (or ``timeout`` passes)."""
        self._start_serving(force=True)
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._cv:
            while self._closed is None:
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    raise TimeoutError("connection still open")
                self._cv.wait(left)

    def __repr__(self) -> str:
        return f"<sync.Peer {self.name or self._sock.fileno()} role={self.role}>"

    # -- registering ------------------------------------------------------

    def _registered(self) -> None:
        # Handlers run on a worker thread, in order; serving starts at the first
        # registration (a lazy child peer waits for its first blocking call).
        if not self._lazy:
            self._start_serving()

    def _start_serving(self, force: bool = False) -> None:
        if self._serving is not None or self._closed is not None:
            return
        if not force and not (self.registry.invokes or self.registry.events):
            return
        with self._cv:
            if self._serving is not None:
                return
            self._worker = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="tether-h")
            self._serving = threading.Thread(target=self._serve, name="tether-reader", daemon=True)
            self._serving.start()

    def _serve(self) -> None:
        while self._closed is None:
            slot = _Slot()  # never completes: read until closed
            try:
                self._wait(slot, None, leader_only=True)
            except TetherError:
                return

    # -- calling ----------------------------------------------------------

    def invoke(
        self, channel: str, *args: Any, timeout: float | None = DEFAULT, result_type: Any = Any
    ) -> Any:
        """Blocking invoke; same errors as :meth:`tether.Peer.invoke`."""
        if self._lazy:
            self._start_serving()
        if timeout is DEFAULT:
            timeout = self.timeout
        deadline = None if timeout is None else time.monotonic() + timeout
        slot = _Slot()
        with self._wlock:
            if self._closed is not None:
                consume_all(args)
                raise self._closed
            rid = self._conn.send_invoke(channel.encode(), args, slot)
            self._write(self._conn.data_to_send()[0], deadline)
        try:
            self._wait(slot, deadline)
        except InvokeTimeout:
            with self._wlock:
                if self._closed is None:
                    self._conn.send_cancel(rid)
                    self._write(self._conn.data_to_send()[0], time.monotonic() + 1.0)
            raise InvokeTimeout(f"no answer on {channel!r} within {timeout} s") from None
        if slot.exc is not None:
            raise slot.exc
        assert slot.frame is not None
        return decode_result(slot.frame, result_type)

    def send(self, channel: str, *args: Any) -> None:
        """Send a one-way event; blocks only while the peer is not reading."""
        if self._lazy:
            self._start_serving()
        with self._wlock:
            if self._closed is not None:
                consume_all(args)
                raise self._closed
            self._conn.send_event(channel.encode(), args)
            deadline = None if self.timeout is None else time.monotonic() + self.timeout
            self._write(self._conn.data_to_send()[0], deadline)

    # -- I/O --------------------------------------------------------------

    def _write(self, data: bytearray, deadline: float | None) -> None:
        """Write all of ``data`` (caller holds _wlock); a stalled peer is bounded by deadline."""
        view = memoryview(data)
        sock = self._sock
        while view:
            try:
                n = sock.send(view)
            except (BlockingIOError, InterruptedError):
                n = 0
            except OSError as exc:
                err = PeerGone(f"{self!r}: connection lost: {exc}")
                err.__cause__ = exc
                self._end(err)
                raise err from exc
            view = view[n:]
            if view:
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    # Half a frame is on the wire: the stream cannot continue.
                    err = PeerGone(f"{self!r}: peer stopped reading; connection dropped")
                    self._end(err)
                    raise err
                select.select([], [sock], [], left)

    def _wait(self, slot: _Slot, deadline: float | None, leader_only: bool = False) -> None:
        cv = self._cv
        with cv:
            while True:
                if slot.done:
                    return
                if self._closed is not None:
                    raise self._closed
                if not self._reading and (leader_only or self._serving is None):
                    self._reading = True
                    break
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    raise InvokeTimeout("timed out")
                cv.wait(left)
        try:
            while not slot.done:
                frames = self._read(deadline)
                if frames:
                    self._dispatch(frames)
        finally:
            with cv:
                self._reading = False
                cv.notify_all()

    def _read(self, deadline: float | None) -> list[Frame]:
        sock = self._sock
        spin_until = time.perf_counter() + self.spin
        while True:
            if self._closed is not None:
                raise self._closed
            try:
                n = sock.recv_into(self._rbuf)
                data = self._rview[:n].tobytes()
            except (BlockingIOError, InterruptedError):
                if time.perf_counter() < spin_until:
                    os.sched_yield()  # the peer may share this CPU: let it run
                    continue
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    raise InvokeTimeout("timed out") from None
                wait = _POLL_SLICE if left is None else min(left, _POLL_SLICE)
                try:
                    select.select([sock], [], [], wait)
                except (OSError, ValueError):
                    if self._closed is not None:
                        raise self._closed from None
                    raise
                continue
            except OSError as exc:
                self._end(PeerGone(f"{self!r}: connection lost: {exc}"))
                raise self._closed from exc  # type: ignore[misc]
            break
        with self._wlock:
            if not data:
                try:
                    self._conn.receive_eof()
                except ProtocolError as exc:
                    self._end(exc)
                    raise
                self._end(PeerGone(f"{self!r}: connection lost (EOF)"))
                raise self._closed  # type: ignore[misc]
            try:
                return self._conn.receive_data(data)
            except ProtocolError as exc:
                self._end(exc)
                raise
            finally:
                if self._conn.buffered_out and self._closed is None:
                    self._write(self._conn.data_to_send()[0], time.monotonic() + 10.0)

    def _dispatch(self, frames: list[Frame]) -> None:
        wake = False
        for f in frames:
            k = f.kind
            if k in (K_RESULT, K_ERROR):
                slot = self._conn.take_pending(f.request_id)
                if slot is None:
                    continue
                if k == K_ERROR:
                    slot.exc = decode_error(f)
                else:
                    slot.frame = f
                slot.done = True
                wake = True
            elif k in (K_INVOKE, K_EVENT):
                self._start_serving(force=True)
                if self._worker is not None:
                    self._worker.submit(self._run_handler, f)
            elif k == K_GOODBYE:
                reason = self._conn.goodbye_reason or "no reason given"
                self._end(PeerGone(f"{self!r} said goodbye: {reason}"))
                return
            # CANCEL: a blocking handler cannot be interrupted; its result is dropped.
        if wake:
            with self._cv:
                self._cv.notify_all()

    def _run_handler(self, f: Frame) -> None:
        rid = f.request_id
        reply: codec.ErrorInfo | None = None
        result: Any = None
        if f.kind == K_EVENT:
            for h in self.registry.events.get(f.channel, ()):
                if not h.allows(self.role):
                    continue
                try:
                    args = h.spec.decode(f.body, f.attachments)
                    h.fn(Call(self, f.channel, 0, f.route_id), *args)
                except Exception:
                    log.exception("listener for %r raised", f.channel)
            return
        found = self.registry.resolve(f, self.role)
        if isinstance(found, codec.ErrorInfo):
            reply = found
        else:
            handler, args = found
            try:
                result = handler.fn(Call(self, f.channel, rid, f.route_id), *args)
            except Exception as exc:
                reply = codec.error_info(exc)
        with self._wlock:
            if self._closed is not None:
                return
            if reply is None:
                self._conn.answer(rid, result)
            else:
                self._conn.send_error(rid, reply)
            with contextlib.suppress(TetherError):
                self._write(self._conn.data_to_send()[0], time.monotonic() + 30.0)

    def _end(self, exc: TetherError) -> None:
        with self._cv:
            if self._closed is not None:
                return
            self._closed = exc
            for slot in self._conn.fail_all():
                slot.exc = exc
                slot.done = True
            self._cv.notify_all()
        with contextlib.suppress(OSError):
            self._sock.shutdown(socket.SHUT_RDWR)  # wakes a thread blocked in select()
        with contextlib.suppress(OSError):
            self._sock.close()
