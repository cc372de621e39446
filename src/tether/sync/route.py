"""Routes on a blocking :class:`tether.sync.Peer`: the verbs of :class:`tether.Route`, blocking.

The route state lives in the protocol core (:mod:`tether.routes`); this
module makes the blocking :class:`Route` objects. ROUTE_OPEN and ROUTE_CLOSE
frames are jobs of the peer's worker thread, in order with the invokes and
events around them, so a route's frames before its close still find it.
Host objects' ``close()`` runs without any of the peer's locks held.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Final

from .. import codec
from ..errors import InvokeTimeout, ProtocolError, RouteClosed, TetherError
from ..registry import Handler, Handlers, Registry
from ..results import DEFAULT, decode_result
from ..routes import HOST_BIT, MAX_ROUTES
from ..shm import consume_all
from ..streams import DEFAULT_WINDOW
from ..wire import K_EVENT, K_INVOKE, Frame, Kind

if TYPE_CHECKING:
    from .peer import Peer, _Slot
    from .streaming import Stream

__all__ = ["JOBS", "MAX_ROUTES", "ROUTE_FRAMES", "Route"]

log = logging.getLogger("tether")

_MASK: Final = HOST_BIT - 1
ROUTE_FRAMES: Final = frozenset((int(Kind.ROUTE_OPEN), int(Kind.ROUTE_CLOSE)))
#: the frame kinds a blocking peer's worker handles, in order
JOBS: Final = frozenset((K_INVOKE, K_EVENT)) | ROUTE_FRAMES
_WRITE: Final = 10.0  # seconds to write a ROUTE_CLOSE or a refusal


def _describe(exc: BaseException) -> str:
    try:
        text = str(exc)
    except Exception:
        text = ""
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


class Route(Handlers):
    """A route on a blocking peer; see :class:`tether.Route` (same attributes and rules).

    ``invoke``, ``send`` and ``close`` block; handlers registered with
    ``handle``/``on`` run on the peer's worker thread, in order.
    """

    def __init__(self, peer: Peer, key: int, kind: str, hosting: bool) -> None:
        self.peer = peer
        self._key = key
        self.id = key & _MASK
        self.kind = kind
        self.hosting = hosting
        self.host: Any = None
        self.registry = Registry()
        self._closed: RouteClosed | None = None
        self._pending: dict[int, _Slot] = {}

    @property
    def closed(self) -> bool:
        """Whether the route has ended."""
        return self._closed is not None

    @property
    def close_reason(self) -> RouteClosed | None:
        """Why the route ended (``None`` while open)."""
        return self._closed

    def wait_closed(self, timeout: float | None = None) -> None:
        """Wait until the route has ended (by either end or with the connection).

        Raises:
            TimeoutError: still open after ``timeout`` seconds.
        """
        peer = self.peer
        peer._start_serving(force=True)  # someone must read the ROUTE_CLOSE
        deadline = None if timeout is None else time.monotonic() + timeout
        with peer._cv:
            while self._closed is None:
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    raise TimeoutError(f"{self!r} still open")
                peer._cv.wait(left)

    def __repr__(self) -> str:
        state = "closed" if self._closed is not None else "open"
        return f"<sync.Route {self.kind!r} #{self.id} on {self.peer!r} {state}>"

    def __enter__(self) -> Route:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _what(self, channel: object) -> str:
        """The route and channel, for an error message: taken before a send."""
        return f"route {self.id} ({self.kind!r}), channel {channel!r}"

    def _refuse(self, what: str, args: tuple[Any, ...]) -> RouteClosed:
        consume_all(args)
        err = RouteClosed(f"{what}: the route is closed", kind=self.kind, route_id=self.id)
        err.__cause__ = self._closed
        return err

    def _drop(self, what: str, exc: BaseException) -> RouteClosed:
        """SendOrDrop (see :meth:`tether.Route.send`); ``what`` was taken before the send."""
        err = RouteClosed(
            f"sending on {what} failed ({_describe(exc)}): route dropped",
            kind=self.kind,
            route_id=self.id,
        )
        err.__cause__ = exc
        self._end(err, notify=True)
        return err

    def invoke(
        self, channel: str, *args: Any, timeout: float | None = DEFAULT, result_type: Any = Any
    ) -> Any:
        """Blocking :meth:`tether.Route.invoke`: same errors, same SendOrDrop."""
        from .peer import _Slot

        what = self._what(channel)
        if self._closed is not None:
            raise self._refuse(what, args)
        peer = self.peer
        conn = peer._conn
        if timeout is DEFAULT:
            timeout = peer.timeout
        deadline = None if timeout is None else time.monotonic() + timeout
        slot = _Slot()
        try:
            chan = peer._chan(channel, args)
            if peer._lazy:
                peer._start_serving()
            with peer._lock:
                if peer._closed is not None or conn.their_goodbye:
                    raise peer._refused(args)
                if self._closed is not None:
                    raise self._refuse(what, args)
                rid = conn.send_invoke(chan, args, slot, self._key ^ HOST_BIT)
                self._pending[rid] = slot
            peer._flush(deadline)
        except Exception as exc:
            consume_all(args)
            raise self._drop(what, exc) from exc
        worker = peer._worker_tid != 0 and peer._worker_tid == threading.get_ident()
        if worker:
            peer._set_worker_waits(True)
        try:
            peer._wait(slot, deadline)
        except InvokeTimeout:
            with peer._lock:
                conn.send_cancel(rid)
            with contextlib.suppress(TetherError):
                peer._flush(time.monotonic() + 1.0, block=False)
            raise InvokeTimeout(f"no answer on {what} within {timeout} s") from None
        finally:
            if worker:
                peer._set_worker_waits(False)
            with peer._lock:
                self._pending.pop(rid, None)
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
    ) -> Stream[Any]:
        """Blocking :meth:`tether.Route.stream`: iterate a stream handler of the route's other end.

        Raises:
            RouteClosed: the route is closed (the arguments were consumed).
        """
        if self._closed is not None:
            raise self._refuse(self._what(channel), args)
        from .streaming import stream

        return stream(
            self.peer, channel, args, item_type, window, item_timeout, timeout, route=self
        )

    def send(self, channel: str, *args: Any) -> None:
        """Blocking :meth:`tether.Route.send`: SendOrDrop, the message consumed either way.

        Raises:
            RouteClosed: the route was closed, or the send failed and the
                route was dropped (``__cause__`` says why).
        """
        what = self._what(channel)  # before the send: the message is given away by it
        if self._closed is not None:
            raise self._refuse(what, args)
        peer = self.peer
        conn = peer._conn
        try:
            chan = peer._chan(channel, args)
            if peer._lazy:
                peer._start_serving()
            with peer._lock:
                if peer._closed is not None or conn.their_goodbye:
                    raise peer._refused(args)
                if self._closed is not None:
                    raise self._refuse(what, args)
                before = conn.buffered_out
                conn.send_event(chan, args, self._key ^ HOST_BIT)
                block = peer._may_block(before)
            timeout = peer.timeout
            peer._flush(None if timeout is None else time.monotonic() + timeout, block)
            if peer._closed is not None:
                raise peer._closed
        except Exception as exc:
            consume_all(args)
            raise self._drop(what, exc) from exc

    def close(self) -> None:
        """End the route: the other end is told, pending invokes fail, this side's host closes."""
        self._end(
            RouteClosed(
                f"route {self.id} ({self.kind!r}) was closed", kind=self.kind, route_id=self.id
            ),
            notify=True,
        )

    def _end(self, err: RouteClosed, notify: bool) -> None:
        """End the route once (takes the peer's locks: call it holding none of them)."""
        peer = self.peer
        with peer._lock:
            if self._closed is not None:
                return
            self._closed = err
            table = peer._conn.routes
            sent = notify and table is not None and table.close(self._key)
            pending, self._pending = self._pending, {}
            for rid in pending:
                peer._conn.take_pending(rid)
        with peer._mu:
            for slot in pending.values():
                if not slot.done:
                    slot.exc = err
                    slot.done = True
            peer._cv.notify_all()
        if sent:
            with contextlib.suppress(TetherError):
                peer._flush(time.monotonic() + _WRITE, block=False)
        if self.hosting:
            self._close_host()

    def _close_host(self) -> None:
        """Run the host object's ``close()``, exactly once (a coroutine cannot run here)."""
        fn = getattr(self.host, "close", None)
        if fn is None:
            return
        try:
            result = fn()
        except Exception:
            log.exception("close() of the host of %r raised", self)
            return
        if hasattr(result, "close") and hasattr(result, "send"):  # a coroutine: no loop here
            result.close()
            log.error("close() of the host of %r is async: a blocking peer cannot run it", self)


# -- called by the Peer ----------------------------------------------------------


def open_route(peer: Peer, kind: str, args: tuple[Any, ...], timeout: float | None) -> Route:
    """Blocking ``peer.open``: send ROUTE_OPEN, wait for the answer, return the route."""
    from .peer import _Slot

    if type(kind) is not str:
        consume_all(args)
        raise TypeError(f"route kind must be a str, not {type(kind).__name__}")
    if peer._lazy:
        peer._start_serving()
    deadline = None if timeout is None else time.monotonic() + timeout
    slot = _Slot()
    route = Route(peer, 0, kind, hosting=False)
    conn = peer._conn
    with peer._lock:
        if peer._closed is not None or conn.their_goodbye:
            raise peer._refused(args)
        table = conn.route_table()
        table.max_routes = peer.max_routes
        rid, key = table.open(kind.encode(), args, slot, route)
    route._key = key
    route.id = key & _MASK
    peer._flush(deadline)
    worker = peer._worker_tid != 0 and peer._worker_tid == threading.get_ident()
    if worker:
        peer._set_worker_waits(True)
    try:
        peer._wait(slot, deadline)
    except InvokeTimeout:
        with peer._lock:
            conn.take_pending(rid)
        route._end(RouteClosed(f"opening {kind!r} was abandoned", kind=kind), notify=True)
        raise InvokeTimeout(f"no answer to opening route {kind!r} within {timeout} s") from None
    finally:
        if worker:
            peer._set_worker_waits(False)
    if slot.exc is not None:
        with peer._lock:
            table.refused(key)
        route._closed = RouteClosed(f"opening route {kind!r} failed: {slot.exc}", kind=kind)
        raise slot.exc
    return route


def dispatch_route_frame(peer: Peer, f: Frame) -> None:
    """A ROUTE_OPEN or ROUTE_CLOSE, on the worker thread, in order with the other jobs."""
    conn = peer._conn
    if f.kind == Kind.ROUTE_CLOSE:
        with peer._lock:
            route: Route | None = conn.route_table().closed_by_peer(f.route_id)
        if route is not None:
            route._end(
                RouteClosed(
                    f"route {route.id} ({route.kind!r}) was closed by the other side",
                    kind=route.kind,
                    route_id=route.id,
                ),
                notify=False,
            )
        with contextlib.suppress(TetherError):
            peer._flush(time.monotonic() + _WRITE, block=False)
        return
    rid = f.request_id
    refusal: codec.ErrorInfo | None = None
    with peer._lock:
        table = conn.route_table()
        table.max_routes = peer.max_routes
        try:
            if not rid:
                raise ProtocolError("ROUTE_OPEN with request id 0")
            refusal = table.accept(f.route_id)
        except ProtocolError as exc:
            bad: ProtocolError | None = exc
        else:
            bad = None
    if bad is not None:
        peer._bad_message(bad)
        return
    found: tuple[Handler, tuple[Any, ...]] | codec.ErrorInfo | None = None
    if refusal is None:
        found = peer.registry.resolve_host(f, peer.role, peer.local)
        if isinstance(found, codec.ErrorInfo):
            refusal = found
    if refusal is not None or found is None or isinstance(found, codec.ErrorInfo):
        peer._answer(rid, None, refusal)
        return
    h, args = found
    route = Route(peer, f.route_id, f.channel, hosting=True)
    with peer._lock:
        table.add(f.route_id, route)
    try:
        route.host = h.fn(route, *args)
    except BaseException as exc:
        with peer._lock:
            if table.routes.pop(f.route_id, None) is not None:
                table.hosted -= 1
        route._closed = RouteClosed(f"the host factory of {f.channel!r} raised", kind=f.channel)
        peer._answer(rid, None, codec.error_info(exc, traceback=peer.tracebacks))
        if not isinstance(exc, Exception):
            peer._stop_process(exc)
        return
    if route._closed is not None:
        route._close_host()  # the factory closed its own route: it had no host to close yet
    peer._answer(rid, None, None)


def end_routes(peer: Peer, exc: TetherError) -> Callable[[], None]:
    """The connection ended (the caller holds ``_lock``): end every route.

    Pending invokes on them are failed here (before the connection's own
    waiters); returns what closes the hosts, to call once no lock is held.
    """
    table = peer._conn.routes
    ended: list[Route] = []
    for route in table.drop_all() if table is not None else []:
        if route._closed is not None:
            continue
        ended.append(route)
        err = RouteClosed(
            f"route {route.id} ({route.kind!r}) ended with its connection: {exc}",
            kind=route.kind,
            route_id=route.id,
        )
        err.__cause__ = exc
        route._closed = err
        pending, route._pending = route._pending, {}
        for rid, slot in pending.items():
            peer._conn.take_pending(rid)
            slot.exc = err
            slot.done = True  # woken by the peer's notify_all that follows

    def close_hosts() -> None:
        for route in ended:
            if route.hosting:
                route._close_host()

    return close_hosts
