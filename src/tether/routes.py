"""Route state of one connection, sans I/O: routing ids, open/close, the cap.

A *route* is a logical channel to one host object on the other side, carried
on the same connection under its own routing id (Chromium's routing ids:
``WebSocketDispatcherHost`` keeps one host per id). The side that opens a
route (the *opener*) picks its id ``n`` (1 .. 2**31-1) from its own space;
the other side (the *host*) makes the host object. Both sides may open routes
at the same time, so the two id spaces are told apart on the wire by
:data:`HOST_BIT`: frames the opener sends carry ``n``, frames the host sends
carry ``n | HOST_BIT``. A receiver therefore looks every incoming
``route_id`` up in one table (:attr:`RouteTable.routes`) keyed by the id as
it arrives, and answers with ``key ^ HOST_BIT``.

Lifecycle of one id (docs/protocol.md, 8.2):

* ROUTE_OPEN (opener -> host, a fresh request id, channel = kind, body =
  arguments) is answered like an INVOKE: RESULT = open, ERROR = refused (the
  id is free again at once).
* Either side ends the route with one ROUTE_CLOSE. The other side answers
  with its own ROUTE_CLOSE unless it had sent one already; an id is free once
  a side has both sent and received ROUTE_CLOSE. A host that gets a
  ROUTE_CLOSE for an id it does not know answers it too (the opener gave up
  an open it then had no answer to); an opener ignores an unknown one.

Nothing here runs host code or touches I/O: the I/O layer calls these methods
when it dispatches ROUTE_OPEN/ROUTE_CLOSE frames, in order with the others,
so frames on a route before its close still find it.
"""

from __future__ import annotations

import inspect
import logging
import typing
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Final

from .codec import ErrorInfo, _hints_one_by_one
from .errors import Busy, ProtocolError

if TYPE_CHECKING:
    from .protocol import Connection
    from .registry import Handler
    from .wire import Frame

__all__ = [
    "HOST_BIT",
    "MAX_ROUTES",
    "RouteTable",
    "host_spec_target",
    "route_handler",
    "route_listeners",
]

log = logging.getLogger("tether")

#: set in the ``route_id`` of every frame the route's host sends
HOST_BIT: Final = 0x80000000
_ID_MASK: Final = 0x7FFFFFFF
#: default cap on open routes per peer (Chromium's per-renderer cap on pending WebSockets)
MAX_ROUTES: Final = 255


class RouteTable:
    """The routes of one :class:`~tether.protocol.Connection`.

    Attributes:
        routes: incoming ``route_id`` -> the I/O layer's route object, for
            every route open (or opening) on this connection.
        closing: ids (keyed as ``routes``) this side closed, awaiting the
            peer's ROUTE_CLOSE.
        max_routes: the most routes this side hosts for the peer at once, and
            the most it opens to it; past it an open is refused with ``busy``.
    """

    __slots__ = ("_conn", "_next", "closing", "hosted", "max_routes", "routes")

    def __init__(self, conn: Connection, max_routes: int = MAX_ROUTES) -> None:
        self._conn = conn
        self.routes: dict[int, Any] = {}
        self.closing: set[int] = set()
        self.max_routes = max_routes
        self.hosted = 0  # routes in ``routes`` this side hosts
        self._next = 0

    # -- opening ----------------------------------------------------------

    def open(self, kind: bytes, args: tuple[Any, ...], waiter: Any, route: Any) -> tuple[int, int]:
        """Queue a ROUTE_OPEN of ``kind``; return (request id, key of the new route).

        ``route`` is registered at once (frames the host sends before its
        answer find it); the answer to the request id says whether it opened
        (:meth:`refused` forgets it).

        Raises:
            Busy: this side already opened ``max_routes`` routes to the peer
                (nothing is sent; ``args`` are consumed).
            ConnectionClosed, PayloadTooLarge, TypeError: as ``send_invoke``.
        """
        if len(self.routes) - self.hosted >= self.max_routes:
            from .protocol import _consume_all

            _consume_all(args)
            raise Busy(
                f"{self.max_routes} routes opened to this peer already (max_routes): "
                "close some first"
            )
        n = self._next
        for _ in range(_ID_MASK):
            n = n % _ID_MASK + 1
            key = n | HOST_BIT
            if key not in self.routes and key not in self.closing:
                break
        self._next = n
        rid = self._conn.send_route_open(n, kind, args, waiter)
        self.routes[key] = route
        return rid, key

    def refused(self, key: int) -> None:
        """The ROUTE_OPEN of ``key`` was answered with an ERROR: the id is free."""
        self.routes.pop(key, None)

    def accept(self, route_id: int) -> ErrorInfo | None:
        """Check a received ROUTE_OPEN: ``None`` if the I/O layer may make the host.

        Returns the ERROR to answer when this side hosts ``max_routes`` routes
        for the peer already.

        Raises:
            ProtocolError: the id is 0, has :data:`HOST_BIT` set, or is in use.
        """
        if not route_id or route_id & HOST_BIT:
            raise ProtocolError(f"ROUTE_OPEN with route id {route_id:#x}: must be 1..2**31-1")
        if route_id in self.routes or route_id in self.closing:
            raise ProtocolError(f"ROUTE_OPEN of route {route_id}, which is still in use")
        if self.hosted >= self.max_routes:
            return ErrorInfo(
                "busy",
                f"{self.max_routes} routes are open on this connection already (max_routes)",
            )
        return None

    def add(self, key: int, route: Any) -> None:
        """The host object of a ROUTE_OPEN accepted with :meth:`accept` is being made."""
        self.routes[key] = route
        self.hosted += 1

    # -- closing ----------------------------------------------------------

    def close(self, key: int) -> bool:
        """This side ends route ``key``: queue its ROUTE_CLOSE. False if it was not open.

        Nothing is sent once the connection is closing; the route is forgotten
        all the same.
        """
        route = self.routes.pop(key, None)
        if route is None:
            return False
        if not key & HOST_BIT:
            self.hosted -= 1
        if self._conn.route_frame_allowed():
            self.closing.add(key)
            self._conn.emit_route_close(key ^ HOST_BIT, auto=False)
        return True

    def closed_by_peer(self, key: int) -> Any:
        """The peer's ROUTE_CLOSE for ``key``: return the route object it ended, or ``None``.

        Answers it with this side's ROUTE_CLOSE when this side had not sent
        one, and when this side hosts an id it does not know (an open the
        opener gave up on).
        """
        route = self.routes.pop(key, None)
        if route is not None:
            if not key & HOST_BIT:
                self.hosted -= 1
            self._answer(key)
            return route
        if key in self.closing:
            self.closing.discard(key)  # both ROUTE_CLOSEs are through: the id is free
        elif key and not key & HOST_BIT:
            self._answer(key)
        return None

    def _answer(self, key: int) -> None:
        if self._conn.route_frame_allowed():
            self._conn.emit_route_close(key ^ HOST_BIT, auto=True)

    def drop_all(self) -> list[Any]:
        """The connection ended: forget every route; return their objects, oldest first."""
        out = list(self.routes.values())
        self.routes.clear()
        self.closing.clear()
        self.hosted = 0
        return out


def host_spec_target(factory: Callable[..., Any]) -> Callable[..., Any]:
    """What to build a host factory's :class:`ArgsSpec` from.

    A class's own type hints describe its attributes, not its constructor's
    parameters: use a stand-in with the signature of ``factory(route, ...)``
    and the hints of ``__init__``.
    """
    if not isinstance(factory, type):
        return factory

    def stand_in(*args: Any) -> None:  # never called
        raise AssertionError

    init = vars(factory).get("__init__") or next(
        (vars(c)["__init__"] for c in factory.__mro__ if "__init__" in vars(c)), None
    )
    try:
        hints = typing.get_type_hints(init) if init is not None else {}
    except Exception:
        hints = _hints_one_by_one(init) if init is not None else {}
    hints.pop("return", None)
    stand_in.__signature__ = inspect.signature(factory)  # type: ignore[attr-defined]
    stand_in.__annotations__ = hints
    stand_in.__name__, stand_in.__qualname__ = factory.__name__, factory.__qualname__
    stand_in.__module__ = factory.__module__
    return stand_in


def _open_route(conn: Connection, route_id: int) -> Any:
    """The route (asyncio or blocking) of ``route_id`` on ``conn``, if it is open."""
    table = conn.routes
    route = table.routes.get(route_id) if table is not None else None
    return route if route is not None and route._closed is None else None


def route_handler(
    conn: Connection, f: Frame, role: str
) -> tuple[Handler, tuple[Any, ...]] | ErrorInfo:
    """The route handler of an INVOKE (or STREAM) with a route id, or the ERROR to answer.

    Both peers' routes share this: the opener's role was checked at open.
    """
    route = _open_route(conn, f.route_id)
    if route is None:
        return ErrorInfo(
            "route_closed", f"route {f.route_id & _ID_MASK} is not open (channel {f.channel!r})"
        )
    found: tuple[Handler, tuple[Any, ...]] | ErrorInfo = route.registry.resolve(f, role, True)
    return found


def route_listeners(conn: Connection, f: Frame, role: str) -> list[tuple[Handler, tuple[Any, ...]]]:
    """The listeners of an EVENT with a route id (none if the route is not open: dropped)."""
    route = _open_route(conn, f.route_id)
    if route is None:
        log.debug("event %r on route %d, which is not open: dropped", f.channel, f.route_id)
        return []
    found: list[tuple[Handler, tuple[Any, ...]]] = route.registry.listeners(f, role, True)
    return found
