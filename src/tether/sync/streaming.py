"""Streams on a blocking :class:`tether.sync.Peer`: the reader's iterator, the producer's loop.

The accounting is :mod:`tether.streams` (sans I/O), the frames
``docs/protocol.md`` 7.6. The peer's reader thread files ITEMs into the
stream's slot and CREDITs into the producer's account; the thread that
iterates (reader side) or the worker thread (producer side) does the rest.
"""

from __future__ import annotations

import contextlib
import inspect
import threading
import time
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any, Generic, TypeVar, cast

from .. import codec
from ..errors import InvokeTimeout, ProtocolError, RouteClosed, TetherError
from ..registry import Call
from ..results import DEFAULT, decode_result
from ..routes import HOST_BIT, route_handler
from ..shm import consume_all
from ..streams import MAX_CREDIT, Inbound, check_window, credit_of, is_streaming, not_a_stream
from ..wire import Frame

if TYPE_CHECKING:
    from .peer import Peer
    from .route import Route

__all__ = ["Stream"]

T = TypeVar("T")

_WRITE: float = 10.0  # seconds to write a CREDIT or CANCEL
_SLICE: float = 0.25  # a producer without credit re-checks the connection this often


class StreamSlot:
    """A stream's waiter: an invoke's slot (RESULT, ERROR, loss settle it) that also holds items.

    The peer sets ``done`` when an item or the end arrives; the reader clears it before waiting.
    """

    __slots__ = ("done", "exc", "frame", "inb")

    def __init__(self, window: int) -> None:
        self.done = False
        self.frame: Frame | None = None
        self.exc: BaseException | None = None
        self.inb = Inbound(window)


class Stream(Iterator[T], Generic[T]):
    """The items of a stream handler on the other side, as a blocking iterator.

    Made by :meth:`tether.sync.Peer.stream`; nothing is sent until the first
    ``next()``. Closing it early (:meth:`close`, leaving a ``with`` block, or
    dropping it, as a ``for`` loop left by ``break`` or an exception does)
    sends CANCEL: the generator on the other side stops and its ``finally``
    runs. Errors as :class:`tether.aio.streaming.Stream`.
    """

    def __init__(
        self,
        peer: Peer,
        channel: str,
        args: tuple[Any, ...],
        item_type: Any,
        window: int,
        item_timeout: float | None,
        timeout: float | None,
        route: Route | None = None,
    ) -> None:
        self._peer = peer
        self._route = route  # a route's stream: registered with the route, ended with it
        self._channel = channel
        self._args: tuple[Any, ...] | None = args
        self._item_type = item_type
        self._slot = StreamSlot(check_window(window))
        self._item_timeout = item_timeout
        self._timeout = timeout
        self._deadline: float | None = None
        self._rid = 0
        self._over = False

    def _open(self) -> None:
        peer = self._peer
        args = self._args
        assert args is not None
        self._args = None
        if self._timeout is not None:
            self._deadline = time.monotonic() + self._timeout
        chan = peer._chan(self._channel, args)
        if peer._lazy:
            peer._start_serving()
        conn = peer._conn
        if conn.peer_hello is None:
            try:
                peer.wait_hello(self._timeout if self._timeout is not None else 10.0)
            except BaseException:
                consume_all(args)
                raise
        with peer._wlock:
            with peer._lock:
                if peer._closed is not None or conn.their_goodbye:
                    raise peer._refused(args)
                route = self._route
                if route is not None and route._closed is not None:
                    raise route._refuse(route._what(self._channel), args)
                self._rid = conn.send_stream(
                    chan,
                    args,
                    self._slot,
                    self._slot.inb.window,
                    route._key ^ HOST_BIT if route is not None else 0,
                )
                peer._streams_in[self._rid] = self._slot
                if route is not None:
                    route._pending[self._rid] = self._slot  # type: ignore[assignment]
                data, fds = peer._take_out()
            peer._write(data, fds, self._deadline)

    def __iter__(self) -> Stream[T]:
        return self

    def __next__(self) -> T:
        if self._over:
            raise StopIteration
        peer = self._peer
        if not self._rid:
            try:
                self._open()
            except BaseException:
                self._over = True
                raise
        slot = self._slot
        inb = slot.inb
        if self._deadline is not None and time.monotonic() >= self._deadline:
            self.close()
            raise InvokeTimeout(f"stream {self._channel!r}: not finished within {self._timeout} s")
        while True:
            if inb.items:
                f = inb.take()
                n = 0
                if inb.consumed >= (inb.window + 1) // 2:  # the lock only to give credit back
                    with peer._lock:
                        n = inb.regrant()
                        if n:
                            peer._conn.send_credit(self._rid, n)
                if n:
                    with contextlib.suppress(TetherError):
                        peer._flush(time.monotonic() + _WRITE, block=False)
                try:
                    item: T = decode_result(f, self._item_type, "item")
                except BaseException:
                    self.close()
                    raise
                return item
            if slot.frame is not None or slot.exc is not None:
                self._finish()
                if isinstance(slot.exc, RouteClosed):  # ended here, not by the producer
                    self._cancel(self._rid)
                if slot.exc is not None:
                    raise slot.exc
                raise StopIteration
            with peer._mu:
                if not inb.items and slot.frame is None and slot.exc is None:
                    if peer._closed is not None:
                        self._finish()
                        raise peer._closed
                    if self._route is not None and self._route._closed is not None:
                        self._finish()
                        self._cancel(self._rid)
                        raise self._route._refuse(self._route._what(self._channel), ())
                    slot.done = False  # wake me at the next item or at the end
            now = time.monotonic()
            deadline = None if self._item_timeout is None else now + self._item_timeout
            if self._deadline is not None:
                deadline = self._deadline if deadline is None else min(deadline, self._deadline)
            try:
                peer._wait(cast(Any, slot), deadline)  # a _Slot, duck-typed
            except InvokeTimeout:
                self.close()
                whole = self._deadline is not None and time.monotonic() >= self._deadline
                raise InvokeTimeout(
                    f"stream {self._channel!r}: "
                    + (
                        f"not finished within {self._timeout} s"
                        if whole
                        else f"no item within {self._item_timeout} s"
                    )
                ) from None
            except TetherError:
                self._finish()
                raise

    def _cancel(self, rid: int) -> None:
        """CANCEL the producer (the stream ended on this side only, with its route)."""
        peer = self._peer
        with peer._lock:
            if peer._closed is None:
                peer._conn.send_cancel(rid)
        with contextlib.suppress(TetherError):
            peer._flush(time.monotonic() + _WRITE, block=False)

    def _finish(self) -> None:
        self._over = True
        self._peer._streams_in.pop(self._rid, None)
        if self._route is not None:
            self._route._pending.pop(self._rid, None)
        self._slot.inb.items.clear()

    def close(self, _blocking: bool = True) -> None:
        """Stop the stream (CANCEL to the producer unless it ended); idempotent."""
        if self._over:
            return
        self._over = True
        peer = self._peer
        rid = self._rid
        peer._streams_in.pop(rid, None)
        if self._route is not None:
            self._route._pending.pop(rid, None)
        self._slot.inb.items.clear()
        slot = self._slot
        if not rid or slot.frame is not None or slot.exc is not None:
            return
        if not peer._lock.acquire(_blocking):
            # Dropped while this thread holds the lock (a garbage collection
            # inside tether): another thread sends the CANCEL once it is free.
            threading.Thread(
                target=self._cancel, args=(rid,), name="tether-stream-cancel", daemon=True
            ).start()
            return
        try:
            if peer._closed is None:
                peer._conn.send_cancel(rid)
        finally:
            peer._lock.release()
        with contextlib.suppress(TetherError):
            peer._flush(time.monotonic() + _WRITE, block=_blocking)

    def __enter__(self) -> Stream[T]:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        with contextlib.suppress(Exception):
            self.close(_blocking=False)

    def __repr__(self) -> str:
        return f"<Stream {self._channel!r} #{self._rid} of {self._peer!r}>"


def stream(
    peer: Peer,
    channel: str,
    args: tuple[Any, ...],
    item_type: Any,
    window: int,
    item_timeout: Any,
    timeout: float | None,
    route: Route | None = None,
) -> Stream[Any]:
    """What :meth:`tether.sync.Peer.stream` and ``Route.stream`` return.

    ``item_timeout`` DEFAULT: the peer's timeout.
    """
    if item_timeout is DEFAULT:
        item_timeout = peer.timeout
    return Stream(peer, channel, args, item_type, window, item_timeout, timeout, route)


# -- the producing side (runs on the peer's worker thread) ---------------------------


class Outbound:
    """A stream this blocking peer produces: credit left, and whether the reader left."""

    __slots__ = ("cancelled", "credit", "cv")

    def __init__(self) -> None:
        self.cv = threading.Condition(threading.Lock())
        self.credit = 0
        self.cancelled = False

    def grant(self, n: int) -> None:
        with self.cv:
            if self.credit + n > MAX_CREDIT:
                raise ProtocolError(f"CREDIT past {MAX_CREDIT} items outstanding")
            self.credit += n
            self.cv.notify()

    def cancel(self) -> None:
        with self.cv:
            self.cancelled = True
            self.cv.notify()


def on_credit(peer: Peer, f: Frame) -> None:
    """A CREDIT arrived (on the reader thread)."""
    out = peer._streams_out.get(f.request_id)
    n = credit_of(f)
    if out is not None:
        out.grant(n)


def produce(peer: Peer, f: Frame) -> None:
    """Serve a STREAM on the worker thread: ITEMs while credit lasts, then RESULT or ERROR."""
    rid = f.request_id
    out = peer._streams_out.get(rid)  # made by the reader thread with the STREAM
    if out is None:
        return  # cancelled before it started: no answer
    if f.route_id:  # a stream on a route: that route's handlers (tether.sync.route)
        found = route_handler(peer._conn, f, peer.role)
    else:
        found = peer.registry.resolve(f, peer.role, peer.local)
    if isinstance(found, codec.ErrorInfo):
        peer._streams_out.pop(rid, None)
        peer._answer(rid, None, found)
        return
    h, args = found
    del found
    if not is_streaming(h.fn) or inspect.isasyncgenfunction(h.fn):
        info = not_a_stream(f.channel)
        if inspect.isasyncgenfunction(h.fn):
            info = codec.ErrorInfo(
                "stream_mismatch",
                f"channel {f.channel!r} is an async generator: a blocking peer streams "
                "only from plain generators",
            )
        peer._streams_out.pop(rid, None)
        peer._answer(rid, None, info)
        return
    conn = peer._conn
    gen: Any = None
    peer._set_worker_waits(True)  # the reader must go on reading CREDITs meanwhile
    try:
        gen = h.fn(Call(peer, f.channel, rid, f.route_id), *args)
        while True:
            with out.cv:
                while out.credit <= 0 and not out.cancelled and peer._closed is None:
                    out.cv.wait(_SLICE)
                if out.cancelled or peer._closed is not None:
                    return
                out.credit -= 1
            try:
                item = next(gen)
            except StopIteration:
                break
            with peer._lock:
                if peer._closed is not None:
                    return
                before = conn.buffered_out
                conn.send_item(rid, item)
                block = peer._may_block(before)
            peer._flush(time.monotonic() + 30.0, block)
    except BaseException as exc:
        if out.cancelled or peer._closed is not None:
            return
        peer._streams_out.pop(rid, None)  # before the answer: the caller may reuse the id then
        peer._answer(rid, None, codec.error_info(exc, traceback=peer.tracebacks))
        if isinstance(exc, (SystemExit, KeyboardInterrupt)):
            peer._stop_process(exc)
        return
    else:
        if not out.cancelled:
            peer._streams_out.pop(rid, None)  # (as above)
            peer._answer(rid, None, None)  # RESULT nil: complete
    finally:
        peer._set_worker_waits(False)
        if peer._streams_out.get(rid) is out:  # not a later stream's, reusing the id
            del peer._streams_out[rid]
        if gen is not None:
            gen.close()  # its finally runs (a no-op once it finished)
