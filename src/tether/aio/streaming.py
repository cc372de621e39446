"""Streams on an asyncio :class:`~tether.Peer`: the reader's :class:`Stream`, the producer's task.

The accounting is :mod:`tether.streams` (sans I/O); the frames are in
``docs/protocol.md`` 7.6. A peer keeps two tables keyed by request id:
``_streams_in`` (streams this side reads) and ``_streams_out`` (streams it
produces); both are connection-wide, so routes can share them.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import logging
import threading
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any, Generic, TypeVar

from .. import codec
from ..errors import InvokeTimeout, ProtocolError, RouteClosed, TetherError
from ..protocol import State
from ..registry import Call, Handler
from ..results import DEFAULT, decode_result
from ..routes import HOST_BIT, route_handler
from ..streams import MAX_CREDIT, Inbound, check_window, credit_of, is_streaming, not_a_stream
from ..wire import K_CREDIT, K_ITEM, K_STREAM, Frame

if TYPE_CHECKING:
    from .peer import Peer
    from .route import Route

__all__ = ["Stream", "on_frame"]

log = logging.getLogger("tether")

T = TypeVar("T")

_HIGH_WATER = 4 * 1024 * 1024  # as aio.peer.HIGH_WATER: a producer past it waits for the reader
_FLUSH_SIZE = 64 * 1024  # as aio.peer.FLUSH_SIZE


class _State:
    """One stream as the peer's tables hold it: never the :class:`Stream`, so dropping that ends it.

    The peer settles it as it settles an invoke's future (RESULT, ERROR,
    connection lost): ``done``, ``cancelled``, ``set_result`` and
    ``set_exception`` are what it calls on a waiter.
    """

    __slots__ = ("end", "inb", "waiter")

    def __init__(self, window: int) -> None:
        self.inb = Inbound(window)
        self.end: Frame | BaseException | None = None  # the RESULT frame, or the error
        self.waiter: asyncio.Future[None] | None = None

    def done(self) -> bool:
        return self.end is not None

    def cancelled(self) -> bool:
        return False

    def set_result(self, f: Frame) -> None:
        self.end = f
        self._wake()

    def set_exception(self, exc: BaseException) -> None:
        self.end = exc
        self._wake()

    def exception(self) -> BaseException | None:
        return self.end if isinstance(self.end, BaseException) else None

    def _wake(self) -> None:
        w = self.waiter
        if w is not None and not w.done():
            w.set_result(None)

    def on_item(self, f: Frame) -> None:
        """An ITEM of this stream arrived (ProtocolError: beyond the credit)."""
        self.inb.on_item(f)
        w = self.waiter
        if w is not None and not w.done():
            w.set_result(None)


class Stream(AsyncIterator[T], Generic[T]):
    """The items of a stream handler on the other side, as an async iterator.

    Made by :meth:`tether.Peer.stream`; nothing is sent until the first
    ``__anext__``. Leaving the ``async for`` early -- ``break``, an exception,
    cancellation, a timeout -- sends CANCEL, which stops the generator on the
    other side and runs its ``finally``. ``async with peer.stream(...) as s:``
    (or :meth:`aclose`) does it at a known point; otherwise it happens when the
    stream is dropped.

    Raises (from ``__anext__``): :class:`~tether.InvokeTimeout` (no item
    within ``item_timeout``, or the whole stream past ``timeout``),
    :class:`~tether.RemoteError` (the generator raised, after the items it
    yielded before), :class:`~tether.StreamMismatch` (the channel does not
    stream), :class:`~tether.PeerGone`, and the errors of
    :meth:`~tether.Peer.invoke`.
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
        self._rid = 0  # 0: not opened yet (set first: __del__ runs even if check_window raises)
        self._over = False  # the reader is done with it (ended, abandoned, closed)
        self._peer = peer
        self._route = route  # a route's stream: registered with the route, ended with it
        self._channel = channel
        self._args: tuple[Any, ...] | None = args
        self._item_type = item_type
        self._st = _State(check_window(window))
        self._in = self._st.inb
        self._item_timeout = item_timeout
        self._timeout = timeout
        self._route_id = route._key ^ HOST_BIT if route is not None else 0
        self._deadline: float | None = None
        self._thread = threading.get_ident()

    @property
    def request_id(self) -> int:
        """The stream's request id (0 until the first item is asked for)."""
        return self._rid

    async def _open(self) -> None:
        peer = self._peer
        args = self._args
        assert args is not None
        self._args = None
        loop = peer._loop
        timeout = self._timeout
        if timeout is not None:
            self._deadline = loop.time() + timeout
        conn = peer._conn
        if conn.state is not State.OPEN:
            await peer._until_open(args, timeout)
        route = self._route
        if route is not None and route._closed is not None:
            raise route._refuse(route._what(self._channel), args)
        chan = peer._chan_cache.get(self._channel) if type(self._channel) is str else None
        if chan is None:
            chan = peer._new_chan(self._channel, args)
        self._rid = conn.send_stream(chan, args, self._st, self._in.window, self._route_id)
        peer._streams_in[self._rid] = self._st
        if self._route is not None:
            self._route._pending[self._rid] = self._st  # type: ignore[assignment]
        if peer._paused:
            peer._set_reading()  # items and the end must still be read
        peer._flush()

    def __aiter__(self) -> Stream[T]:
        return self

    async def __anext__(self) -> T:
        if self._over:
            raise StopAsyncIteration
        peer = self._peer
        if not self._rid:
            try:
                await self._open()
            except BaseException:
                self._over = True
                raise
        inb = self._in
        if self._deadline is not None and peer._loop.time() >= self._deadline:
            self._abandon()
            raise InvokeTimeout(f"stream {self._channel!r}: not finished within {self._timeout} s")
        while True:
            if inb.items:
                f = inb.take()
                n = inb.regrant()
                if n:
                    peer._conn.send_credit(self._rid, n)
                    peer._flush(poll=False)  # now: the producer refills while we go on
                try:
                    item: T = decode_result(f, self._item_type, "item")
                except BaseException:
                    self._abandon()
                    raise
                return item
            end = self._st.end
            if end is not None:
                self._finish()
                if isinstance(end, RouteClosed):  # ended here, not by the producer: stop it
                    peer._conn.send_cancel(self._rid)
                    peer._kick()
                if isinstance(end, BaseException):
                    raise end
                raise StopAsyncIteration
            wait = self._item_timeout
            if self._deadline is not None:
                left = max(0.0, self._deadline - peer._loop.time())
                wait = left if wait is None else min(wait, left)
            fut = self._st.waiter = peer._loop.create_future()
            try:
                await asyncio.wait_for(fut, wait)
            except TimeoutError:
                self._abandon()
                whole = self._deadline is not None and peer._loop.time() >= self._deadline
                raise InvokeTimeout(
                    f"stream {self._channel!r}: "
                    + (
                        f"not finished within {self._timeout} s"
                        if whole
                        else f"no item within {self._item_timeout} s"
                    )
                ) from None
            except BaseException:  # cancelled
                self._abandon()
                raise
            finally:
                self._st.waiter = None

    def _finish(self) -> None:
        self._over = True
        self._peer._streams_in.pop(self._rid, None)
        if self._route is not None:
            self._route._pending.pop(self._rid, None)
        self._in.items.clear()

    def _abandon(self) -> None:
        """Stop reading: CANCEL unless the stream ended; the producer's generator is closed."""
        if self._over:
            return
        self._over = True
        peer = self._peer
        if self._rid and self._st.end is None:
            peer._conn.send_cancel(self._rid)
            peer._kick()
        peer._streams_in.pop(self._rid, None)
        if self._route is not None:
            self._route._pending.pop(self._rid, None)
        self._in.items.clear()

    async def aclose(self) -> None:
        """Stop the stream now (CANCEL to the producer unless it ended); idempotent."""
        self._abandon()

    async def __aenter__(self) -> Stream[T]:
        return self

    async def __aexit__(self, *exc: object) -> None:
        self._abandon()

    def __del__(self) -> None:
        if self._over or not self._rid:
            return
        with contextlib.suppress(Exception):  # the loop may be closed or gone
            if threading.get_ident() == self._thread:
                self._abandon()
            else:
                self._peer._loop.call_soon_threadsafe(self._abandon)

    def __repr__(self) -> str:
        return f"<Stream {self._channel!r} #{self._rid} of {self._peer!r}>"


class _Outbound:
    """The producing side of one stream: credit left, and the producer's wake-up."""

    __slots__ = ("credit", "waiter")

    def __init__(self) -> None:
        self.credit = 0
        self.waiter: asyncio.Future[None] | None = None

    def grant(self, n: int) -> None:
        if self.credit + n > MAX_CREDIT:
            raise ProtocolError(f"CREDIT past {MAX_CREDIT} items outstanding")
        self.credit += n
        w = self.waiter
        if w is not None and not w.done():
            w.set_result(None)


def on_frame(peer: Peer, f: Frame) -> None:
    """Act on a STREAM, ITEM or CREDIT frame (the peer's dispatch calls this for kinds >= 14)."""
    k = f.kind
    rid = f.request_id
    try:
        if k == K_ITEM:
            st = peer._streams_in.get(rid)
            if st is not None:
                st.on_item(f)
            # else: the reader left; items in flight before its CANCEL are dropped
        elif k == K_CREDIT:
            n = credit_of(f)
            out = peer._streams_out.get(rid)
            if out is not None:
                out.grant(n)
        elif k == K_STREAM:
            _open_stream(peer, f)
    except ProtocolError as exc:
        peer.abort(exc)


def _open_stream(peer: Peer, f: Frame) -> None:
    rid = f.request_id  # (a reused one was refused by the core: Connection.served)
    if f.route_id:  # a stream on a route: that route's handlers
        found = route_handler(peer._conn, f, peer.role)
    else:
        found = peer.registry.resolve(f, peer.role, peer.local)
    if isinstance(found, codec.ErrorInfo):
        peer._send_error(rid, found)
        return
    h, args = found
    if not is_streaming(h.fn):
        peer._send_error(rid, not_a_stream(f.channel))
        return
    serving = peer._serving
    if len(serving) >= peer.max_inflight:
        peer._send_error(rid, peer._busy())
        return
    out = _Outbound()
    peer._streams_out[rid] = out
    serving[rid] = None
    call = Call(peer, f.channel, rid, f.route_id)
    task = peer._loop.create_task(_produce(peer, h, call, args, out))
    if not task.done():
        call._task = task  # CANCEL and the connection's end cancel it (Call._abandon)
        serving[rid] = call
        peer._tasks.add(task)
        if len(peer._tasks) > 1024:  # MAX_TASKS
            peer._pause()
    peer._woke = True


async def _produce(
    peer: Peer, h: Handler, call: Call, args: tuple[Any, ...], out: _Outbound
) -> None:
    """Run a stream handler: one ITEM per item while credit lasts, then RESULT or ERROR."""
    rid = call.request_id
    conn = peer._conn
    loop = peer._loop
    gen: Any = None
    try:
        gen = h.fn(call, *args)
        is_async = inspect.isasyncgen(gen)
        if not is_async and getattr(h, "thread", False):
            gen = _Threaded(gen, call)  # thread=True: each step on a worker thread
            is_async = True
        send_item = conn.send_item
        kick = peer._kick
        while True:
            while out.credit <= 0:
                out.waiter = loop.create_future()
                try:
                    await out.waiter
                finally:
                    out.waiter = None
            if is_async:
                try:
                    item = await gen.__anext__()
                except StopAsyncIteration:
                    break
            else:
                try:
                    item = next(gen)
                except StopIteration:
                    break
            send_item(rid, item)
            out.credit -= 1
            if out.credit and conn.buffered_out < _FLUSH_SIZE and not conn.fds_queued:
                kick()  # written at the next turn of the loop, with the items after it
                continue
            peer._flush(poll=False)  # credit used up (we wait next), or much queued: write now
            queued = peer._stream.buffered + conn.buffered_out
            if queued > _HIGH_WATER:
                peer._check_queued(queued)
                await peer._wait_read()
    except BaseException as exc:
        if peer._serving.pop(rid, None) is None:
            # The reader's CANCEL (it left), or the connection ended: no answer.
            if isinstance(exc, (asyncio.CancelledError, SystemExit, KeyboardInterrupt)):
                raise
            return
        task = asyncio.current_task()
        if isinstance(exc, asyncio.CancelledError) and task is not None and task.cancelling():
            raise  # cancelled from outside (the loop ending)
        if isinstance(exc, TetherError) and peer._closed is not None:
            return  # the connection is gone: nobody to tell
        if peer._fail(call, exc):
            raise
    else:
        if peer._serving.pop(rid, None) is not None:
            peer._answer(rid, None)  # RESULT nil: the stream is complete
    finally:
        peer._streams_out.pop(rid, None)
        if gen is not None:
            await _close_gen(gen)
        peer._tasks.discard(asyncio.current_task())
        if peer._paused:
            peer._maybe_resume()
    peer._kick()


class _Threaded:
    """A plain generator of a ``thread=True`` handler, stepped and closed on worker threads.

    One lock per generator: a step still running on a thread (its caller
    cancelled) finishes before ``aclose`` closes the generator.
    """

    def __init__(self, gen: Any, call: Call) -> None:
        self._gen = gen
        self._call = call
        self._lock = threading.Lock()

    def _step(self, call: Call) -> Any:
        with self._lock:
            return next(self._gen, _END)

    def _close(self, call: Call) -> None:
        with self._lock:
            self._gen.close()

    async def __anext__(self) -> Any:
        from ..threads import run_in_thread

        item = await run_in_thread(self._step, self._call, ())
        if item is _END:
            raise StopAsyncIteration
        return item

    async def aclose(self) -> None:
        await asyncio.to_thread(self._close, self._call)


_END = object()


async def _close_gen(gen: Any) -> None:
    """Close a generator so its ``finally`` runs (a no-op once it finished)."""
    try:
        if isinstance(gen, _Threaded) or inspect.isasyncgen(gen):
            await gen.aclose()
        elif inspect.isgenerator(gen):
            gen.close()
    except Exception:
        log.exception("closing a stream handler's generator raised")


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
    """What :meth:`tether.Peer.stream` and :meth:`tether.Route.stream` return.

    ``item_timeout`` DEFAULT: the peer's timeout.
    """
    if item_timeout is DEFAULT:
        item_timeout = peer.timeout
    return Stream(peer, channel, args, item_type, window, item_timeout, timeout, route)
