"""Routes on an asyncio :class:`~tether.Peer`: :class:`Route`, opening, hosting, SendOrDrop.

The route state (routing ids, open/close, the cap) lives in the protocol core
(:mod:`tether.routes`); this module makes the :class:`Route` objects, runs
host factories and their ``close``, and is called by the peer when it
dispatches a frame addressed to a route, in order with every other frame.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
from typing import TYPE_CHECKING, Any, Final, TypeVar

from .. import codec
from ..errors import InvokeTimeout, ProtocolError, RouteClosed, TetherError
from ..protocol import State
from ..registry import Handlers, Registry
from ..results import DEFAULT, decode_result
from ..routes import HOST_BIT, MAX_ROUTES
from ..shm import consume_all
from ..streams import DEFAULT_WINDOW
from ..wire import Frame, Kind

if TYPE_CHECKING:
    from .peer import Peer
    from .streaming import Stream

__all__ = ["MAX_ROUTES", "ROUTE_FRAMES", "Route"]

log = logging.getLogger("tether")

T = TypeVar("T")

_MASK: Final = HOST_BIT - 1
#: the frame kinds a peer hands to this module, in order with the others
ROUTE_FRAMES: Final = frozenset((int(Kind.ROUTE_OPEN), int(Kind.ROUTE_CLOSE)))
#: host ``close()`` coroutines still running (held so they are not collected)
_CLOSING: set[asyncio.Task[Any]] = set()
#: how long ``Route.close()`` waits for this side's host ``close()`` by default
CLOSE_TIMEOUT: Final = 5.0
#: how long a host's async ``close()`` may run before it is cancelled (and logged)
HOST_CLOSE_TIMEOUT = 30.0


def _describe(exc: BaseException) -> str:
    try:
        text = str(exc)
    except Exception:
        text = ""
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


class Route(Handlers):
    """A logical channel to one host object on the other side, on the peer's connection.

    Made by ``await peer.open(kind, *args)`` (the opener's end) or given to
    the factory registered with ``@main.host(kind)`` (the host's end). Both
    ends have a peer's verbs, scoped to the route: ``invoke``/``send`` reach
    the handlers and listeners registered on the other end's route with
    ``handle``/``on``. Route handlers answer whoever holds the route: the
    role check was made when it was opened.

    A route lives until either end closes it, a send on it fails
    (SendOrDrop), or the connection ends; then the host object's ``close()``
    runs exactly once and every pending invoke on it fails with
    :class:`~tether.RouteClosed`, as does every later use.

    Attributes:
        id: the routing id (chosen by the opener; unique among the routes it
            opened on this connection while they are open).
        kind: the route kind named by ``open``.
        peer: the connection it rides on.
        host: on the host's end, the object the factory returned; else ``None``.
    """

    def __init__(self, peer: Peer, key: int, kind: str, hosting: bool) -> None:
        self.peer = peer
        self._key = key  # route_id of the frames this end receives
        self.id = key & _MASK
        self.kind = kind
        self.hosting = hosting
        self.host: Any = None
        self.registry = Registry()
        self._closed: RouteClosed | None = None
        self._pending: dict[int, asyncio.Future[Any]] = {}
        self._close_task: asyncio.Task[Any] | None = None
        self._ended: asyncio.Future[None] | None = None  # made by wait_closed

    @property
    def closed(self) -> bool:
        """Whether the route has ended (closed by either end, dropped, or the connection lost)."""
        return self._closed is not None

    @property
    def close_reason(self) -> RouteClosed | None:
        """Why the route ended (``None`` while open)."""
        return self._closed

    async def wait_closed(self) -> None:
        """Wait until the route has ended, by either end or with the connection."""
        if self._closed is not None:
            return
        if self._ended is None:
            self._ended = self.peer._loop.create_future()
        await asyncio.shield(self._ended)

    def __repr__(self) -> str:
        state = "closed" if self._closed is not None else "open"
        return f"<Route {self.kind!r} #{self.id} on {self.peer!r} {state}>"

    async def __aenter__(self) -> Route:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    def _what(self, channel: object) -> str:
        """The route and channel, for an error message: taken before a send."""
        return f"route {self.id} ({self.kind!r}), channel {channel!r}"

    def _refuse(self, what: str, args: tuple[Any, ...]) -> RouteClosed:
        consume_all(args)  # a message not sent is consumed all the same
        err = RouteClosed(f"{what}: the route is closed", kind=self.kind, route_id=self.id)
        err.__cause__ = self._closed
        return err

    def _drop(self, what: str, exc: BaseException) -> RouteClosed:
        """SendOrDrop: a send on this route failed. Drop the route, return the error to raise.

        ``what`` was captured before the send; nothing of the message is read here.
        """
        err = RouteClosed(
            f"sending on {what} failed ({_describe(exc)}): route dropped",
            kind=self.kind,
            route_id=self.id,
        )
        err.__cause__ = exc
        self._finish(err, notify=True)
        return err

    # -- calling ----------------------------------------------------------

    def stream(
        self,
        channel: str,
        *args: Any,
        item_type: Any = Any,
        window: int = DEFAULT_WINDOW,
        item_timeout: float | None = DEFAULT,
        timeout: float | None = None,
    ) -> Stream[Any]:
        """Iterate a stream handler (a generator) of the other end of the route.

        As :meth:`tether.Peer.stream`, on this route's handlers; when the route
        ends the loop ends with :class:`RouteClosed` (after the items already
        received).

        Raises:
            RouteClosed: the route is closed (the arguments were consumed).
        """
        if self._closed is not None:
            raise self._refuse(self._what(channel), args)
        from .streaming import stream

        return stream(
            self.peer, channel, args, item_type, window, item_timeout, timeout, route=self
        )

    async def invoke(
        self,
        channel: str,
        *args: Any,
        timeout: float | None = DEFAULT,
        result_type: type[T] | Any = Any,
    ) -> Any:
        """Call ``channel`` on the other end of the route and return its result.

        As :meth:`tether.Peer.invoke`. If the INVOKE cannot be sent (the route
        or the connection is closed, the peer lags past its limits, the
        arguments do not encode or fit) the route is dropped (SendOrDrop).

        Raises:
            RouteClosed: the route ended before the answer came, or the send
                failed (``__cause__`` says why); the arguments were consumed.
            InvokeTimeout, RemoteError, NoHandler, BadRequest.
        """
        what = self._what(channel)
        if self._closed is not None:
            raise self._refuse(what, args)
        peer = self.peer
        if timeout is DEFAULT:
            timeout = peer.timeout
        conn = peer._conn
        fut: asyncio.Future[Any] = peer._loop.create_future()
        try:
            if type(channel) is not str:
                raise TypeError(f"channel must be a str, not {type(channel).__name__}")
            if (gone := _gone(peer)) is not None:
                raise gone
            rid = conn.send_invoke(channel.encode(), args, fut, self._key ^ HOST_BIT)
        except Exception as exc:
            consume_all(args)
            raise self._drop(what, exc) from exc
        self._pending[rid] = fut
        if peer._paused:
            peer._set_reading()  # answers to this call must still be read
        try:
            await self._push(what)
            if timeout is None:
                frame: Frame = await fut
            else:
                try:
                    async with asyncio.timeout(timeout):
                        frame = await fut
                except TimeoutError:
                    if not fut.done() or fut.cancelled():
                        conn.send_cancel(rid, "timeout")
                        peer._kick()
                        raise InvokeTimeout(f"no answer on {what} within {timeout} s") from None
                    frame = fut.result()  # answered as the time ran out (or its error)
        except asyncio.CancelledError:
            conn.send_cancel(rid)
            peer._kick()
            raise
        finally:
            self._pending.pop(rid, None)
        return decode_result(frame, result_type)

    async def send(self, channel: str, *args: Any) -> None:
        """Send a one-way event to the other end of the route; SendOrDrop.

        If the event cannot be sent -- the route or the connection is
        closed, the peer stopped reading (its limits), the arguments do not
        encode or do not fit -- the route is dropped: its host's ``close()``
        runs, the other end is told (ROUTE_CLOSE) if it still can be, and
        :class:`~tether.RouteClosed` is raised naming the kind, routing id and
        channel (captured before the send: nothing of the message is read
        afterwards). Whatever the message carried (a :class:`tether.Buffer`)
        is consumed either way.

        Raises:
            RouteClosed: see above; ``__cause__`` says why the send failed.
        """
        what = self._what(channel)  # before the send: the message is given away by it
        if self._closed is not None:
            raise self._refuse(what, args)
        peer = self.peer
        try:
            if type(channel) is not str:
                raise TypeError(f"channel must be a str, not {type(channel).__name__}")
            if (gone := _gone(peer)) is not None:
                raise gone
            peer._conn.send_event(channel.encode(), args, self._key ^ HOST_BIT)
        except Exception as exc:
            consume_all(args)
            raise self._drop(what, exc) from exc
        await self._push(what)

    async def _push(self, what: str) -> None:
        """Write now, so a failure known at once drops the route; wait (bounded) for a lagging peer.

        A route's sends are written one by one (Chromium's ``Send`` reports
        each): what the kernel took and the peer never read is lost with the
        connection, and the route ends then.
        """
        peer = self.peer
        try:
            peer._flush(poll=False)
            if (gone := _gone(peer)) is not None:
                raise gone
            queued = peer._stream.buffered + peer._conn.buffered_out
            if queued > peer_high_water():
                peer._check_queued(queued)
                await peer._wait_read()
        except TetherError as exc:
            raise self._drop(what, exc) from exc

    async def close(self, timeout: float = CLOSE_TIMEOUT) -> None:
        """End the route: the other end is told, pending invokes fail with RouteClosed.

        On the host's end this waits (at most ``timeout`` seconds) for the
        host object's ``close()``. Idempotent.
        """
        self._finish(
            RouteClosed(
                f"route {self.id} ({self.kind!r}) was closed", kind=self.kind, route_id=self.id
            ),
            notify=True,
        )
        task = self._close_task
        if task is not None and not task.done() and task is not asyncio.current_task():
            await asyncio.wait([task], timeout=timeout)  # (not from the host's close() itself)

    # -- ending -----------------------------------------------------------

    def _finish(self, err: RouteClosed, notify: bool) -> None:
        """End the route, once: tell the peer (``notify``), fail pending invokes, close the host."""
        if self._closed is not None:
            return
        self._closed = err
        peer = self.peer
        conn = peer._conn
        table = conn.routes
        if notify and table is not None and table.close(self._key):
            peer._kick()
        pending, self._pending = self._pending, {}
        for rid, fut in pending.items():
            conn.take_pending(rid)
            if not fut.done():
                fut.set_exception(err)
                fut.exception()  # retrieved: a send that dropped the route raises err itself
        if self._ended is not None and not self._ended.done():
            self._ended.set_result(None)
        if self.hosting:
            self._close_host()

    def _close_host(self) -> None:
        """Run the host object's ``close()`` (plain or async), exactly once."""
        fn = getattr(self.host, "close", None)
        if fn is None:
            return
        try:
            result = fn()
        except Exception:
            log.exception("close() of the host of %r raised", self)
            return
        if inspect.isawaitable(result):
            task = asyncio.ensure_future(_bounded(result, self))
            _CLOSING.add(task)
            task.add_done_callback(_closed_host)
            self._close_task = task
            tasks = self.peer._tasks  # so Peer.close() lets it finish (bounded), as a listener
            tasks.add(task)
            task.add_done_callback(tasks.discard)


async def _bounded(closing: Any, route: Route) -> None:
    """Await a host's ``close()`` at most :data:`HOST_CLOSE_TIMEOUT` seconds; then log, move on."""
    try:
        async with asyncio.timeout(HOST_CLOSE_TIMEOUT) as deadline:
            await closing
    except TimeoutError:
        if not deadline.expired():
            raise
        log.warning(
            "close() of the host of %r did not return within %.0fs: cancelled",
            route,
            HOST_CLOSE_TIMEOUT,
        )


def _closed_host(task: asyncio.Task[Any]) -> None:
    _CLOSING.discard(task)
    if not task.cancelled() and (exc := task.exception()) is not None:
        log.error("close() of a route host raised", exc_info=exc)


def _gone(peer: Peer) -> TetherError | None:
    """Why nothing more reaches the peer: closed, or (a child) its end already gone."""
    ending: TetherError | None = getattr(peer, "_ending", None)  # Child: a write failed, EOF due
    return peer._closed or ending


def peer_high_water() -> int:
    from .peer import HIGH_WATER

    return HIGH_WATER


# -- called by the Peer ------------------------------------------------------


async def open_route(peer: Peer, kind: str, args: tuple[Any, ...], timeout: float | None) -> Route:
    """``peer.open``: send ROUTE_OPEN, wait for the answer, return the route."""
    if type(kind) is not str:
        consume_all(args)
        raise TypeError(f"route kind must be a str, not {type(kind).__name__}")
    conn = peer._conn
    if conn.state is not State.OPEN:
        timeout = await peer._until_open(args, timeout)
    table = conn.route_table()
    table.max_routes = peer.max_routes
    route = Route(peer, 0, kind, hosting=False)
    fut: asyncio.Future[Any] = peer._loop.create_future()
    rid, key = table.open(kind.encode(), args, fut, route)
    route._key = key
    route.id = key & _MASK
    if peer._paused:
        peer._set_reading()  # the answer must still be read
    peer._flush()
    try:
        if timeout is None:
            await fut
        else:
            async with asyncio.timeout(timeout):
                await fut
    except BaseException as exc:
        answer = fut.exception() if fut.done() and not fut.cancelled() else None
        if answer is not None:  # refused (or the connection ended): the id is free
            table.refused(key)
            route._closed = RouteClosed(f"opening route {kind!r} failed: {answer}", kind=kind)
            if answer is exc:
                raise
            raise answer from None  # it came as the time ran out
        if isinstance(exc, TimeoutError) and fut.done() and not fut.cancelled():
            return route  # opened just as the time ran out
        # No answer, or cancelled once open: the host may make it still; our
        # ROUTE_CLOSE ends it (or, if it refused, is answered all the same).
        conn.take_pending(rid)
        route._finish(RouteClosed(f"opening {kind!r} was abandoned", kind=kind), notify=True)
        if isinstance(exc, TimeoutError):
            raise InvokeTimeout(f"no answer to opening route {kind!r} within {timeout} s") from None
        raise
    return route


def dispatch_route_frame(peer: Peer, f: Frame) -> None:
    """A ROUTE_OPEN or ROUTE_CLOSE, dispatched in order with the other frames."""
    table = peer._conn.route_table()
    if f.kind == Kind.ROUTE_CLOSE:
        route: Route | None = table.closed_by_peer(f.route_id)
        if route is not None:
            route._finish(
                RouteClosed(
                    f"route {route.id} ({route.kind!r}) was closed by the other side",
                    kind=route.kind,
                    route_id=route.id,
                ),
                notify=False,
            )
        peer._kick()
        return
    rid = f.request_id
    if not rid:
        peer.abort(ProtocolError("ROUTE_OPEN with request id 0"))
        return
    table.max_routes = peer.max_routes
    try:
        refusal = table.accept(f.route_id)
    except ProtocolError as exc:
        peer.abort(exc)
        return
    if refusal is None:
        found = peer.registry.resolve_host(f, peer.role, peer.local)
        if isinstance(found, codec.ErrorInfo):
            refusal = found
    if refusal is not None:
        peer._send_error(rid, refusal)
        peer._kick()
        return
    assert not isinstance(found, codec.ErrorInfo)
    h, args = found
    route = Route(peer, f.route_id, f.channel, hosting=True)
    table.add(f.route_id, route)
    try:
        route.host = h.fn(route, *args)
    except BaseException as exc:
        # The factory raised: the route never opened (no ROUTE_CLOSE; the id is free).
        if table.routes.pop(f.route_id, None) is not None:
            table.hosted -= 1
        route._closed = RouteClosed(f"the host factory of {f.channel!r} raised", kind=f.channel)
        peer._send_error(rid, peer._describe(exc))
        peer._kick()
        if not isinstance(exc, Exception):
            raise
        return
    if route._closed is not None:
        route._close_host()  # the factory closed its own route: it had no host to close yet
    peer._answer(rid, None)
    peer._kick()


def end_routes(peer: Peer, exc: TetherError) -> None:
    """The connection ended: every route ends with it (hosts closed, pending invokes failed)."""
    table = peer._conn.routes
    if table is None:
        return
    for route in table.drop_all():
        err = RouteClosed(
            f"route {route.id} ({route.kind!r}) ended with its connection: {exc}",
            kind=route.kind,
            route_id=route.id,
        )
        err.__cause__ = exc
        route._finish(err, notify=False)
