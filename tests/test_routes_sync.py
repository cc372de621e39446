"""Routes on blocking peers: a tether.sync peer opens routes on an asyncio main, and hosts them."""

from __future__ import annotations

import asyncio
import socket
import threading
import time
from collections.abc import Callable, Iterator

import pytest

import tether
import tether.sync

pytestmark = pytest.mark.timeout(60)


def until(cond: Callable[[], bool], timeout: float = 10.0) -> None:
    end = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < end, "timed out waiting"
        time.sleep(0.01)


class Counter:
    def __init__(self, route: tether.sync.Route | tether.Route, start: int) -> None:
        self.n = start
        self.route = route
        self.closes = 0
        COUNTERS.append(self)

        @route.handle("add")
        def add(call: tether.Call, k: int) -> int:
            self.n += k
            return self.n

        @route.handle("wait")
        def wait(call: tether.Call, seconds: float) -> None:
            time.sleep(seconds)

    def close(self) -> None:
        self.closes += 1


COUNTERS: list[Counter] = []


@pytest.fixture(autouse=True)
def _clear() -> None:
    COUNTERS.clear()


@pytest.fixture
def peers() -> Iterator[tuple[tether.sync.Peer, tether.sync.Peer]]:
    """``host`` (hosts ``counter`` for role ``client``) and ``opener``: blocking, one socketpair."""
    a, b = socket.socketpair()
    host = tether.sync.Peer(a, role="client", name="host", timeout=10.0)
    opener = tether.sync.Peer(b, role="client", name="opener", timeout=10.0)
    host.host("counter", Counter, roles={"client"})  # it serves from here on
    try:
        yield host, opener
    finally:
        opener.close()
        host.close()


def test_sync_open_invoke_close_and_host_closes_once(
    peers: tuple[tether.sync.Peer, tether.sync.Peer],
) -> None:
    _, opener = peers
    with opener.open("counter", 5) as route:
        assert isinstance(route, tether.sync.Route)
        assert (route.id, route.kind) == (1, "counter")
        assert route.invoke("add", 2) == 7
        route.send("add", 1)  # no listener on the host: dropped, the route stays
        assert route.invoke("add", 1) == 8
    assert route.closed
    (c,) = COUNTERS
    until(lambda: c.closes == 1)
    with pytest.raises(tether.RouteClosed, match=r"route 1 \('counter'\), channel 'add'"):
        route.invoke("add", 1)
    time.sleep(0.05)
    assert c.closes == 1


def test_sync_refusals(peers: tuple[tether.sync.Peer, tether.sync.Peer]) -> None:
    host, opener = peers
    with pytest.raises(tether.NoHandler):
        opener.open("nope")
    host.host("admins", Counter, roles={"admin"})
    with pytest.raises(tether.Forbidden):
        opener.open("admins", 1)

    def broken(route: tether.sync.Route) -> None:
        raise ValueError("no")

    host.host("broken", broken, roles={"client"})
    with pytest.raises(tether.RemoteError, match="no"):
        opener.open("broken")
    host.max_routes = 1
    opener.open("counter", 0)
    with pytest.raises(tether.Busy, match="1 routes are open"):
        opener.open("counter", 0)


def test_sync_pending_invoke_fails_when_the_host_closes_the_route(
    peers: tuple[tether.sync.Peer, tether.sync.Peer],
) -> None:
    _, opener = peers
    route = opener.open("counter", 0)
    (c,) = COUNTERS
    out: list[BaseException] = []

    def call() -> None:
        try:
            route.invoke("wait", 0.5)
        except BaseException as exc:
            out.append(exc)

    t = threading.Thread(target=call)
    t.start()
    time.sleep(0.1)
    c.route.close()  # the host's end, from another thread than the worker
    t.join(10)
    assert len(out) == 1 and isinstance(out[0], tether.RouteClosed)
    assert "closed by the other side" in str(out[0])
    assert c.closes == 1


def test_sync_wait_closed(peers: tuple[tether.sync.Peer, tether.sync.Peer]) -> None:
    _, opener = peers
    route = opener.open("counter", 0)
    with pytest.raises(TimeoutError):
        route.wait_closed(0.05)
    threading.Timer(0.1, COUNTERS[0].route.close).start()
    route.wait_closed(10)
    assert route.closed


def test_sync_factory_that_closes_its_own_route(
    peers: tuple[tether.sync.Peer, tether.sync.Peer],
) -> None:
    host, opener = peers
    closed: list[int] = []

    class Quitter:
        def __init__(self, route: tether.sync.Route) -> None:
            self.route = route
            route.close()  # before the factory returned: no host object to close yet

        def close(self) -> None:
            closed.append(self.route.id)

    host.host("quitter", Quitter, roles={"client"})
    route = opener.open("quitter")
    route.wait_closed(10)
    until(lambda: closed == [1])
    time.sleep(0.05)
    assert closed == [1]


def test_sync_connection_loss_closes_hosts_once(
    peers: tuple[tether.sync.Peer, tether.sync.Peer],
) -> None:
    host, opener = peers
    routes = [opener.open("counter", i) for i in range(3)]
    opener.close()
    until(lambda: [c.closes for c in COUNTERS] == [1, 1, 1])
    assert all(r.closed for r in routes)
    host.close()
    assert [c.closes for c in COUNTERS] == [1, 1, 1]


def test_sync_send_or_drop(peers: tuple[tether.sync.Peer, tether.sync.Peer]) -> None:
    _, opener = peers
    route = opener.open("counter", 0)
    buf = tether.Buffer(8)
    with pytest.raises(tether.RouteClosed) as ei:
        route.send("add", buf, object())  # an object msgspec cannot encode
    assert str(ei.value).startswith("sending on route 1 ('counter'), channel 'add' failed")
    assert isinstance(ei.value.__cause__, TypeError)
    with pytest.raises(tether.ConsumedError):
        buf.view()
    assert route.closed
    until(lambda: COUNTERS[0].closes == 1)


async def test_a_sync_client_opens_routes_on_an_asyncio_main(sock_path: str) -> None:
    closed: list[int] = []

    class Echo:
        def __init__(self, route: tether.Route, prefix: str) -> None:
            self.route = route

            @route.handle("echo")
            async def echo(call: tether.Call, text: str) -> str:
                await route.send("echoed", text)
                return prefix + text

        async def close(self) -> None:
            closed.append(self.route.id)

    def client() -> list[object]:
        got: list[str] = []
        with tether.sync.connect(f"unix://{sock_path}", timeout=10.0) as peer:
            route = peer.open("echo", "> ")
            route.on("echoed", lambda call, text: got.append(text))
            answer = route.invoke("echo", "hi")
            until(lambda: got == ["hi"])
            route.close()
            try:
                peer.open("missing")
            except tether.NoHandler as exc:
                refused = str(exc)
        return [answer, got, refused]

    async with tether.Main(timeout=10.0) as main:
        main.host("echo", Echo)  # no roles=: local peers only (a unix peer of this uid is)
        await main.listen(f"unix://{sock_path}")
        answer, got, refused = await asyncio.wait_for(asyncio.to_thread(client), 30)
        assert answer == "> hi" and got == ["hi"]
        assert refused == "no host for route kind 'missing'"
        for _ in range(500):
            if closed:
                break
            await asyncio.sleep(0.01)
        assert closed == [1]


def test_a_blocking_host_with_an_async_close_is_refused_at_host() -> None:
    a, b = socket.socketpair()
    with tether.sync.Peer(a, role="main", local_role="child") as peer:

        class Doc:
            def __init__(self, route: tether.sync.Route) -> None: ...

            async def close(self) -> None: ...

        with pytest.raises(TypeError, match="async close"):
            peer.host("doc", Doc)
        assert "doc" not in peer.registry.hosts
    b.close()
