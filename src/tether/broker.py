"""The privileged WebSocket broker: Chromium's ``WebSocketDispatcherHost``, on routes.

A sandboxed child has no network (``spawn(..., sandbox=True)``). It asks main
for each WebSocket by opening a route of kind ``"websocket"``
(:func:`open_websocket`); main checks the URL against its :class:`Policy`,
owns the real socket (a ``websockets`` client), and relays frames both ways
on that route, whose routing id names the socket, as Chromium keeps one
``WebSocketHost`` per routing id for a renderer::

    main                                        sandboxed child
    WebSocketBroker(policy).install(main)       ws = await open_websocket(peer, url)
      factory: policy check -> Forbidden          ROUTE_OPEN "websocket" (url)
      WebSocketHost: connects the real socket     await ws.send("hi")   -> INVOKE "send"
      server frame -> route.send("message")       await ws.recv()       <- EVENT "message"
      server gone  -> route.send("closed"), close  RouteClosed after the "closed" event
      a full window: stops reading the socket     recv() gives credit: EVENT "ack" (n, bytes)

SendOrDrop: when relaying to the child fails (the child died, its route or
connection closed, it stopped reading), ``route.send`` drops the route and
raises :class:`~tether.RouteClosed`, whose message was made before the send;
the host's ``close`` then closes the real socket (code 1001). When the real
socket fails or the server closes it, the host tells the child (``closed``
with the close code and reason) and closes the route: the child's ``recv``
raises ``RouteClosed`` and its iteration ends cleanly. Either way the host's
``close`` runs exactly once.

Needs the ``websockets`` package in main (``pip install 'tether-ipc[broker]'``);
the child needs nothing but tether.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import functools
import logging
from collections.abc import AsyncIterator, Callable, Collection
from typing import TYPE_CHECKING, Any, Final
from urllib.parse import urlsplit

from .errors import Forbidden, RouteClosed

if TYPE_CHECKING:
    from .aio.main import Main
    from .aio.peer import Peer
    from .aio.route import Route
    from .registry import Call

__all__ = [
    "KIND",
    "BrokeredWebSocket",
    "Policy",
    "WebSocketBroker",
    "WebSocketHost",
    "open_websocket",
]

log = logging.getLogger("tether")

#: the route kind the broker hosts
KIND: Final = "websocket"
_DEFAULT_PORTS: Final = {"ws": 80, "wss": 443}


@dataclasses.dataclass(frozen=True)
class Policy:
    """Which WebSocket URLs main opens for a child: hosts and ports it names, nothing else.

    Attributes:
        hosts: allowed host names or addresses, compared lower-case
            (``"127.0.0.1"``, ``"example.com"``); no wildcards.
        ports: allowed ports (the scheme's default when the URL has none).
        schemes: ``"ws"`` and/or ``"wss"``.

    A host name is resolved by main when it connects (no proxy is used):
    name addresses rather than names where DNS is not trusted. Redirects
    are not followed (the server's ``Location`` could name anything): the
    open fails with ``Forbidden`` naming the redirect's target.
    """

    hosts: frozenset[str]
    ports: frozenset[int]
    schemes: frozenset[str] = frozenset({"ws", "wss"})

    def __post_init__(self) -> None:
        object.__setattr__(self, "hosts", frozenset(h.lower() for h in self.hosts))
        object.__setattr__(self, "ports", frozenset(self.ports))
        object.__setattr__(self, "schemes", frozenset(self.schemes))

    def check(self, url: str) -> str:
        """Return ``url`` if the policy allows it.

        Raises:
            Forbidden: not a ws/wss URL, credentials in it, or a host, port or
                scheme the policy does not name (the message says which).
        """
        try:
            parts = urlsplit(url)
            port = parts.port
        except ValueError as exc:
            raise Forbidden(f"not a WebSocket URL: {url!r} ({exc})") from None
        scheme = parts.scheme.lower()
        if scheme not in _DEFAULT_PORTS or scheme not in self.schemes:
            raise Forbidden(f"scheme {scheme!r} is not allowed (url {url!r})")
        if parts.username is not None or parts.password is not None:
            raise Forbidden(f"credentials in the URL are not allowed (url {url!r})")
        host = (parts.hostname or "").lower()
        if host not in self.hosts:
            raise Forbidden(f"host {host!r} is not allowed (url {url!r})")
        port = _DEFAULT_PORTS[scheme] if port is None else port
        if port not in self.ports:
            raise Forbidden(f"port {port} is not allowed (url {url!r})")
        return url


class WebSocketHost:
    """Main's end of one brokered WebSocket: owns the real socket, relays both ways.

    Made by :class:`WebSocketBroker` for each route a child opens (after the
    policy check); it connects at once. Route handlers: ``ready`` (waits
    until the real socket is open, raises if it could not be, and starts
    relaying: the child invokes it once its listeners are in place, so no
    message arrives before them; answers ``{"subprotocol", "window",
    "window_bytes"}``), ``send(data)`` (one message to the server). Events
    to the child: ``message(data)``, then ``closed(code, reason)``; from the
    child: ``ack(messages, nbytes)``, credit for messages it consumed.

    Flow control: at most ``window`` messages (and ``window_bytes`` bytes,
    though one message of any allowed size always fits an empty window) are
    relayed and not yet acknowledged. While the window is full the host
    stops reading the real socket, so ``websockets`` pauses the transport
    and TCP pushes back on the server; neither main nor the child queues
    more than a window for a child that does not read.

    Attributes:
        closes: how many times :meth:`close` ran (exactly once per route).
        inflight: messages relayed to the child and not yet acknowledged.
        inflight_bytes: their size (``len`` of each message).
    """

    def __init__(self, route: Route, url: str, broker: WebSocketBroker) -> None:
        self.route = route
        self.url = url
        self.closes = 0
        self._broker = broker
        self._ws: Any = None
        self._ended = False
        self._connected: asyncio.Task[Any] = asyncio.ensure_future(self._connect())
        self._connected.add_done_callback(_retrieve)  # a failure nobody asked about is no warning
        self._relay: asyncio.Task[None] | None = None
        self._relay_ending = False  # _end runs (it closes the route): the relay is not cancelled
        self.inflight = 0
        self.inflight_bytes = 0
        self._credit = asyncio.Event()
        route.handle("ready", self._ready)
        route.handle("send", self._send)
        route.on("ack", self._ack)

    async def _connect(self) -> Any:
        broker = self._broker
        ws = await _no_redirects()(
            self.url,
            open_timeout=broker.open_timeout,
            max_size=broker.max_message,
            proxy=None,
            compression=None,  # a read of compressed frames could inflate without bound in main
        )
        if self._ended:  # the route ended while connecting
            await ws.close(1001, "going away")
            raise RouteClosed(f"route {self.route.id} ended while connecting", kind=KIND)
        self._ws = ws
        return ws

    async def _ready(self, call: Call) -> dict[str, Any]:
        """Answer once the real socket is open: its subprotocol and the window. Raises why not."""
        try:
            ws = await asyncio.shield(self._connected)
        except Forbidden:
            raise  # a redirect: the child gets Forbidden naming its target
        except (OSError, TimeoutError) as exc:
            raise ConnectionError(f"cannot connect to {self.url}: {exc}") from None
        except Exception as exc:  # websockets' handshake errors
            raise ConnectionError(
                f"cannot connect to {self.url}: {type(exc).__name__}: {exc}"
            ) from None
        if self._relay is None:  # the child listens now: relay the server's messages from here on
            self._relay = asyncio.ensure_future(self._pump(ws))
        broker = self._broker
        return {
            "subprotocol": str(ws.subprotocol) if ws.subprotocol else None,
            "window": broker.window,
            "window_bytes": broker.window_bytes,
        }

    def _ack(self, call: Call, messages: int, nbytes: int) -> None:
        """The child consumed ``messages`` (``nbytes``): room in the window again.

        Credit beyond what is in flight is ignored (a child cannot widen its window).
        """
        self.inflight = max(0, self.inflight - max(0, messages))
        self.inflight_bytes = max(0, self.inflight_bytes - max(0, nbytes))
        if self.inflight == 0:
            self.inflight_bytes = 0
        self._credit.set()

    async def _room(self, size: int) -> None:
        """Wait for room in the window for a message of ``size`` (bounded by the route's life)."""
        broker = self._broker
        while self.inflight and (
            self.inflight >= broker.window or self.inflight_bytes + size > broker.window_bytes
        ):
            self._credit.clear()
            await self._credit.wait()  # the relay is cancelled when the route ends

    async def _send(self, call: Call, data: str | bytes) -> None:
        """Relay one message from the child to the server.

        If the real socket is closed the route is closed first (the child's
        invoke then fails with ``RouteClosed``, after the ``closed`` event).
        """
        from websockets.exceptions import ConnectionClosed

        ws = await asyncio.shield(self._connected)
        try:
            await ws.send(data)
        except ConnectionClosed:
            await self._end(ws)
            raise RouteClosed(f"websocket {self.url} is closed", kind=KIND) from None

    async def _pump(self, ws: Any) -> None:
        """Server -> child, until either side ends; then the route ends too."""
        from websockets.exceptions import ConnectionClosed

        route = self.route
        try:
            async for message in ws:
                size = len(message)
                await self._room(size)  # a full window: stop reading, TCP pushes back
                self.inflight += 1
                self.inflight_bytes += size
                await route.send("message", message)  # SendOrDrop: raises RouteClosed, dropped
        except RouteClosed as exc:
            log.debug("broker: %s", exc)  # its message was made before the send
            return  # the route is gone; close() closes the real socket
        except ConnectionClosed:
            pass  # the real socket failed: the child is told and the route closed
        await self._end(ws)

    async def _end(self, ws: Any) -> None:
        """The real socket ended: tell the child how (``closed``), then close the route; once."""
        if self._relay_ending:
            return
        self._relay_ending = True
        code, reason = ws.close_code, ws.close_reason
        with contextlib.suppress(RouteClosed):
            await self.route.send("closed", 1006 if code is None else int(code), str(reason or ""))
        await self.route.close()

    async def close(self) -> None:
        """The route ended (either side, or the connection): close the real socket, once."""
        self.closes += 1
        self._ended = True
        if not self._connected.done():
            self._connected.cancel()
        relay = self._relay
        if relay is not None and not self._relay_ending and not relay.done():
            relay.cancel()
        ws = self._ws
        if ws is not None:
            with contextlib.suppress(Exception):
                async with asyncio.timeout(self._broker.close_timeout):
                    await ws.close(1001, "the other side went away")
        self._broker._closed(self)


@functools.cache
def _no_redirects() -> Any:
    """``websockets``' ``connect``, refusing HTTP redirects instead of following them.

    The policy checked the URL the child asked for, not where a server
    redirects it (another host or port, one the policy does not name): a
    redirect fails the open with :class:`~tether.Forbidden` naming its target.
    """
    from websockets.asyncio.client import connect

    class NoRedirects(connect):
        def process_redirect(self, exc: Exception) -> Exception | str:
            target = super().process_redirect(exc)
            if isinstance(target, str):  # a redirect websockets would follow
                return Forbidden(
                    f"redirect to {target!r} refused (url {self.uri!r}):"
                    " the broker follows no redirects"
                )
            return target

    return NoRedirects


def _retrieve(task: asyncio.Task[Any]) -> None:
    if not task.cancelled():
        task.exception()


class WebSocketBroker:
    """Hosts the ``websocket`` route kind in main: a :class:`WebSocketHost` per allowed URL.

    Args:
        policy: which URLs may be opened; anything else answers ``Forbidden``.
        open_timeout: seconds to open the real socket.
        close_timeout: seconds to close it when the route ends.
        max_message: largest message accepted from the server (bytes).
        window: messages relayed to a child and not yet consumed by it, at
            most (flow control, per socket; see :class:`WebSocketHost`).
        window_bytes: their total size at most (one message always fits).

    Attributes:
        hosts: the hosts alive now.
        closed_hosts: every host that ended, in order (its ``closes`` is 1).
        refused: how many opens the policy refused.
    """

    def __init__(
        self,
        policy: Policy,
        *,
        open_timeout: float = 10.0,
        close_timeout: float = 5.0,
        max_message: int = 1 << 20,
        window: int = 32,
        window_bytes: int = 1 << 20,
    ) -> None:
        if window < 1 or window_bytes < 1:
            raise ValueError(f"window and window_bytes must be >= 1, not {window}, {window_bytes}")
        self.policy = policy
        self.open_timeout = open_timeout
        self.close_timeout = close_timeout
        self.max_message = max_message
        self.window = window
        self.window_bytes = window_bytes
        self._hosts: set[WebSocketHost] = set()
        self.closed_hosts: list[WebSocketHost] = []
        self.refused = 0
        self.on_close: Callable[[WebSocketHost], None] | None = None

    @property
    def hosts(self) -> frozenset[WebSocketHost]:
        return frozenset(self._hosts)

    def install(self, main: Main, *, roles: Collection[str] | str | None = None) -> None:
        """Host :data:`KIND` on ``main`` for peers of ``roles`` (``None``: local peers only)."""
        main.host(KIND, self.open, roles=roles)

    def open(self, route: Route, url: str) -> WebSocketHost:
        """The route factory: check ``url``, then make its host (which connects in the background).

        Raises:
            Forbidden: the policy refuses ``url``; the opener gets ``Forbidden``.
        """
        try:
            self.policy.check(url)
        except Forbidden:
            self.refused += 1
            raise
        host = WebSocketHost(route, url, self)
        self._hosts.add(host)
        return host

    async def wait_idle(self, timeout: float) -> None:
        """Wait until every host has closed (its real socket too).

        Raises:
            TimeoutError: some host is still open after ``timeout`` seconds.
        """
        async with asyncio.timeout(timeout):
            while self._hosts:
                await asyncio.sleep(0.01)

    def _closed(self, host: WebSocketHost) -> None:
        self._hosts.discard(host)
        self.closed_hosts.append(host)
        if self.on_close is not None:
            self.on_close(host)


# -- the child's side -------------------------------------------------------------


class BrokeredWebSocket:
    """A sandboxed child's WebSocket, whose real socket main owns (:func:`open_websocket`).

    ``recv`` returns the server's messages in order; after the server (or
    main) closed the socket it raises :class:`~tether.RouteClosed`, and
    ``async for message in ws`` ends. ``close_code`` and ``close_reason``
    then say how it closed (1006: abnormally, no close frame).

    ``recv`` gives main credit (an ``ack`` event) for what it consumed, every
    half window or when nothing is left queued: main relays at most a
    window ahead of ``recv``, so ``queued`` stays within the window.
    """

    def __init__(
        self, route: Route, url: str, window: int = 32, window_bytes: int = 1 << 20
    ) -> None:
        self.route = route
        self.url = url
        self.close_code: int | None = None
        self.close_reason = ""
        self.subprotocol: str | None = None
        self._inbox: asyncio.Queue[str | bytes | None] = asyncio.Queue()
        self._window = (max(1, window // 2), max(1, window_bytes // 2))  # ack thresholds
        self._queued_bytes = 0
        self._unacked = 0
        self._unacked_bytes = 0
        self._acking: set[asyncio.Task[None]] = set()
        route.on("message", self._message)
        route.on("closed", self._closed)

    @property
    def queued(self) -> tuple[int, int]:
        """Messages received from main and not yet returned by ``recv``: (count, bytes)."""
        n = self._inbox.qsize() - (1 if self.close_code is not None else 0)
        return max(0, n), self._queued_bytes

    def _message(self, call: Call, data: str | bytes) -> None:
        self._queued_bytes += len(data)
        self._inbox.put_nowait(data)

    def _consumed(self, data: str | bytes) -> None:
        """Count one message ``recv`` returns; give main credit every half window or when idle."""
        size = len(data)
        self._queued_bytes -= size
        self._unacked += 1
        self._unacked_bytes += size
        n, nbytes = self._window
        if self._unacked >= n or self._unacked_bytes >= nbytes or self._inbox.empty():
            ack = (self._unacked, self._unacked_bytes)
            self._unacked = self._unacked_bytes = 0
            # Its own task: a recv timed out or cancelled while the ack waits loses no message.
            task = asyncio.ensure_future(self._ack(*ack))
            self._acking.add(task)
            task.add_done_callback(self._acking.discard)

    async def _ack(self, messages: int, nbytes: int) -> None:
        with contextlib.suppress(RouteClosed):  # the next recv says the socket ended
            await self.route.send("ack", messages, nbytes)

    def _closed(self, call: Call, code: int, reason: str) -> None:
        self.close_code, self.close_reason = code, reason
        self._inbox.put_nowait(None)

    def _ended(self) -> RouteClosed:
        how = f"code {self.close_code} {self.close_reason!r}" if self.close_code else "closed"
        return RouteClosed(
            f"websocket {self.url} on route {self.route.id}: {how}",
            kind=self.route.kind,
            route_id=self.route.id,
        )

    async def send(self, data: str | bytes, *, timeout: float | None = 30.0) -> None:
        """Send one message to the server (returns once main has written it).

        Raises:
            RouteClosed: the socket or the route is closed.
        """
        await self.route.invoke("send", data, timeout=timeout)

    async def recv(self, timeout: float = 30.0) -> str | bytes:
        """The next message from the server.

        Raises:
            RouteClosed: the socket was closed (by the server, main, or a lost connection).
            TimeoutError: nothing arrived within ``timeout`` seconds.
        """
        async with asyncio.timeout(timeout):
            while True:
                if self._inbox.empty() and (self.route.closed or self.close_code is not None):
                    raise self._ended()
                try:  # short slices: a route dropped without a "closed" event is noticed too
                    item = await asyncio.wait_for(self._inbox.get(), 0.25)
                except TimeoutError:
                    continue
                if item is None:
                    self._inbox.put_nowait(None)  # every later recv raises as well
                    raise self._ended()
                self._consumed(item)
                return item

    async def __aiter__(self) -> AsyncIterator[str | bytes]:
        """Messages until the socket closes (no error at a close)."""
        while True:
            try:
                yield await self.recv(timeout=3600.0)
            except RouteClosed:
                return

    async def close(self) -> None:
        """Close the socket: main's host closes the real one."""
        await self.route.close()

    async def __aenter__(self) -> BrokeredWebSocket:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()


async def open_websocket(peer: Peer, url: str, *, timeout: float = 30.0) -> BrokeredWebSocket:
    """Ask main for a WebSocket to ``url``; return it once the real socket is open.

    Raises:
        Forbidden: main's policy refuses ``url``.
        NoHandler: main runs no broker.
        RemoteError: main could not connect (``ConnectionError`` there).
    """
    route = await peer.open(KIND, url, timeout=timeout)
    ws = BrokeredWebSocket(route, url)
    try:
        ready = await route.invoke("ready", timeout=timeout)
    except BaseException:
        await route.close()
        raise
    ws.subprotocol = ready["subprotocol"]
    ws._window = (max(1, int(ready["window"]) // 2), max(1, int(ready["window_bytes"]) // 2))
    return ws
