"""Routes on asyncio peers: hosts by routing id, their lifecycle, errors, the cap, SendOrDrop."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import time
from collections.abc import AsyncIterator, Callable
from typing import Any, ClassVar

import pytest

import _route_targets
import tether
from tether.protocol import Connection
from tether.routes import HOST_BIT
from tether.wire import Frame, Kind

pytestmark = pytest.mark.timeout(90)


class Counter:
    """The issue's example host; records its life in ``log``."""

    log: ClassVar[list[tuple[str, int]]] = []

    def __init__(self, route: tether.Route, start: int) -> None:
        self.n = start
        self.route = route
        Counter.log.append(("open", route.id))

        @route.handle("add")
        def add(call: tether.Call, k: int) -> int:
            self.n += k
            return self.n

        @route.on("reset")
        async def reset(call: tether.Call) -> None:
            self.n = 0
            await route.send("changed", self.n)

        @route.handle("wait")
        async def wait(call: tether.Call) -> None:
            await asyncio.sleep(30)

        @route.handle("close_me")
        async def close_me(call: tether.Call) -> str:
            await route.close()
            return "closed"

    async def close(self) -> None:
        await asyncio.sleep(0)
        Counter.log.append(("close", self.route.id))


@pytest.fixture(autouse=True)
def _clear_log() -> None:
    Counter.log = []


async def until(cond: Callable[[], bool], timeout: float = 10.0) -> None:
    """Wait (bounded) until ``cond()`` holds."""
    end = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < end, "timed out waiting"
        await asyncio.sleep(0.01)


class Pair:
    def __init__(self, host: tether.Peer, opener: tether.Peer) -> None:
        self.host = host
        self.opener = opener


@pytest.fixture
async def pair() -> AsyncIterator[Pair]:
    """Two peers on a socketpair; ``host`` hosts ``counter`` for the role ``child``."""
    a, b = socket.socketpair()
    host = tether.Peer(a, role="child", local_role="main", timeout=10.0)
    opener = tether.Peer(b, role="main", local_role="child", timeout=10.0)
    host.host("counter", Counter, roles={"child"})
    host.start()
    opener.start()
    try:
        yield Pair(host, opener)
    finally:
        await opener.close()
        await host.close()


def closes(kind: str = "close") -> list[int]:
    return [rid for what, rid in Counter.log if what == kind]


# -- the example ---------------------------------------------------------


async def test_open_invoke_send_on_close(pair: Pair) -> None:
    route = await pair.opener.open("counter", 5)
    assert isinstance(route, tether.Route)
    assert (route.id, route.kind, route.closed) == (1, "counter", False)
    assert await route.invoke("add", 2) == 7
    changed: list[int] = []
    route.on("changed", lambda call, n: changed.append(n))
    await route.send("reset")
    await until(lambda: changed == [0])
    assert await route.invoke("add", 3) == 3
    await route.close()
    assert route.closed
    await until(lambda: closes() == [1])
    assert Counter.log == [("open", 1), ("close", 1)]
    with pytest.raises(tether.RouteClosed, match=r"route 1 \('counter'\), channel 'add'"):
        await route.invoke("add", 1)
    await route.close()  # idempotent
    await asyncio.sleep(0.05)
    assert closes() == [1]


async def test_async_with_and_ids(pair: Pair) -> None:
    async with (
        await pair.opener.open("counter", 1) as r1,
        await pair.opener.open("counter", 2) as r2,
    ):
        assert (r1.id, r2.id) == (1, 2)
        assert await r1.invoke("add", 1) == 2
        assert await r2.invoke("add", 1) == 3
    assert r1.closed and r2.closed
    await until(lambda: sorted(closes()) == [1, 2])
    # The host's table is empty again: both ROUTE_CLOSEs went through.
    table = pair.host._conn.routes
    await until(lambda: table is not None and not table.routes and not table.closing)


async def test_route_invoke_timeout_keeps_the_route(pair: Pair) -> None:
    route = await pair.opener.open("counter", 1)
    with pytest.raises(tether.InvokeTimeout, match=r"route 1 \('counter'\), channel 'wait'"):
        await route.invoke("wait", timeout=0.1)
    assert not route.closed  # a late answer is not a failed send
    assert await route.invoke("add", 1) == 2
    await until(lambda: not pair.host._serving)  # the handler was cancelled (CANCEL)


async def test_the_host_invokes_the_opener_on_the_route(pair: Pair) -> None:
    route = await pair.opener.open("counter", 0)

    @route.handle("ask")
    def ask(call: tether.Call, q: str) -> str:
        assert call.route_id == route.id | HOST_BIT  # as it arrived: from the host's end
        return q.upper()

    (host_route,) = pair.host._conn.route_table().routes.values()
    assert await host_route.invoke("ask", "why") == "WHY"
    with pytest.raises(tether.NoHandler):
        await host_route.invoke("add", 1)  # the opener's end has no "add"
    await route.close()


async def test_route_handlers_are_separate_from_the_peers(pair: Pair) -> None:
    @pair.host.handle("add")
    def peer_add(call: tether.Call, k: int) -> int:
        return -k

    route = await pair.opener.open("counter", 10)
    assert await pair.opener.invoke("add", 1) == -1  # the peer's handler
    assert await route.invoke("add", 1) == 11  # the route's
    with pytest.raises(tether.NoHandler):
        await route.invoke("nothing")
    await route.close()


# -- lifecycle: close runs exactly once ---------------------------------------------


async def test_close_from_the_host_side(pair: Pair) -> None:
    route = await pair.opener.open("counter", 0)
    waiting = asyncio.ensure_future(route.invoke("wait"))
    await asyncio.sleep(0.05)
    # The host closes the route from a handler: its ROUTE_CLOSE overtakes the
    # handler's own answer, so that call is pending when the route ends too.
    with pytest.raises(tether.RouteClosed, match="closed by the other side"):
        await route.invoke("close_me")
    with pytest.raises(tether.RouteClosed, match="closed by the other side"):
        await asyncio.wait_for(waiting, 10)
    assert route.closed
    await until(lambda: closes() == [1])
    await asyncio.sleep(0.05)
    assert closes() == [1]


async def test_wait_closed_sees_the_other_end_close(pair: Pair) -> None:
    route = await pair.opener.open("counter", 0)
    waiting = asyncio.ensure_future(route.wait_closed())
    await asyncio.sleep(0.05)
    assert not waiting.done()
    (host_route,) = pair.host._conn.route_table().routes.values()
    await host_route.close()
    await asyncio.wait_for(waiting, 10)
    assert route.closed
    await asyncio.wait_for(route.wait_closed(), 1)  # at once, once closed


async def test_a_factory_that_closes_its_own_route(pair: Pair) -> None:
    closed: list[str] = []

    class Quitter:
        def __init__(self, route: tether.Route) -> None:
            self.closing = asyncio.ensure_future(route.close())  # e.g. what it needed is gone
            self.route = route

        def close(self) -> None:
            closed.append("closed")

    pair.host.host("quitter", Quitter, roles={"child"})
    route = await pair.opener.open("quitter")
    await asyncio.wait_for(route.wait_closed(), 10)
    await until(lambda: closed == ["closed"])


async def test_a_host_close_that_closes_its_route_does_not_wait_for_itself(pair: Pair) -> None:
    done: list[float] = []

    class Tidy:
        def __init__(self, route: tether.Route) -> None:
            self.route = route

        async def close(self) -> None:
            t = time.monotonic()
            await self.route.close()  # already closed: returns at once
            done.append(time.monotonic() - t)

    pair.host.host("tidy", Tidy, roles={"child"})
    await pair.opener.open("tidy")
    (host_route,) = pair.host._conn.route_table().routes.values()
    await asyncio.wait_for(host_route.close(), 10)
    assert len(done) == 1 and done[0] < 1.0


async def test_pending_invokes_fail_with_route_closed_when_the_opener_closes(pair: Pair) -> None:
    route = await pair.opener.open("counter", 0)
    calls = [asyncio.ensure_future(route.invoke("wait")) for _ in range(3)]
    await asyncio.sleep(0.05)
    await route.close()
    for c in calls:
        with pytest.raises(tether.RouteClosed, match=r"route 1 \('counter'\) was closed"):
            await asyncio.wait_for(c, 10)
    await until(lambda: closes() == [1])


async def test_connection_loss_closes_every_host_once(pair: Pair) -> None:
    routes = [await pair.opener.open("counter", i) for i in range(3)]
    pending = asyncio.ensure_future(routes[0].invoke("wait"))
    await asyncio.sleep(0.05)
    pair.opener.abort(tether.PeerGone("gone"))  # no goodbye: the socket just closes
    with pytest.raises(tether.RouteClosed, match="ended with its connection") as ei:
        await asyncio.wait_for(pending, 10)
    assert isinstance(ei.value.__cause__, tether.PeerGone)
    assert all(r.closed for r in routes)
    await until(lambda: sorted(closes()) == [1, 2, 3])
    await asyncio.sleep(0.05)
    assert sorted(closes()) == [1, 2, 3]


async def test_goodbye_closes_every_host_once(pair: Pair) -> None:
    await pair.opener.open("counter", 1)
    await pair.opener.close()
    await until(lambda: closes() == [1])


async def test_a_killed_child_closes_its_hosts_once() -> None:
    opened: list[tuple[int, int]] = []
    async with tether.Main(timeout=20.0) as main:
        main.host("counter", Counter, roles={"child"})

        @main.handle("opened")
        def on_opened(call: tether.Call, route_id: int, total: int) -> None:
            opened.append((route_id, total))

        child = await main.spawn(_route_targets.open_and_wait, "counter", 5, start_method="fork")
        await until(lambda: opened == [(1, 6)], 20)
        child.kill()
        await asyncio.wait_for(child.wait_closed(), 20)
        await until(lambda: closes() == [1], 20)
        await asyncio.sleep(0.05)
        assert Counter.log == [("open", 1), ("close", 1)]


async def test_a_child_hosts_kinds_main_opens() -> None:
    closed: list[str] = []
    async with tether.Main(timeout=20.0) as main:
        main.on("echoer-closed", lambda call, prefix: closed.append(prefix))
        child = await main.spawn(_route_targets.host_echoer, start_method="fork")
        async with await child.open("echoer", "> ") as route:
            assert await route.invoke("echo", "hi") == "> hi"
            got: list[int] = []
            route.on("poked", lambda call, n: got.append(n))
            await route.send("poke", 1)
            await until(lambda: got == [2])
        await until(lambda: closed == ["> "])


async def test_an_open_that_times_out_closes_the_id_it_may_have_been_given() -> None:
    """The opener gives up; its ROUTE_CLOSE ends whatever the host makes late, and frees the id.

    The host is a bare protocol core driven by the test, so the late answer
    comes exactly when the test says.
    """
    a, b = socket.socketpair()
    a.setblocking(False)
    loop = asyncio.get_running_loop()
    opener = tether.Peer(b, role="main", local_role="child", timeout=10.0)
    opener.start()
    host = Connection("main")

    async def exchange() -> list[Frame]:
        await loop.sock_sendall(a, bytes(host.data_to_send()[0]))
        return host.receive_data(await asyncio.wait_for(loop.sock_recv(a, 65536), 10))

    try:
        assert await exchange() == []  # HELLOs
        opening = asyncio.ensure_future(opener.open("slow", 1, timeout=0.2))
        (f,) = await exchange()
        assert (f.kind, f.route_id, f.channel) == (Kind.ROUTE_OPEN, 1, "slow")
        with pytest.raises(tether.InvokeTimeout, match="opening route 'slow'"):
            await opening
        (close,) = await exchange()  # the opener closes the id it may have been given
        assert (close.kind, close.route_id) == (Kind.ROUTE_CLOSE, 1)
        table = opener._conn.route_table()
        assert not table.routes and table.closing == {1 | HOST_BIT}
        # The host made it late: it answers the open (dropped), then the close.
        host_table = host.route_table()
        assert host_table.accept(1) is None
        host_table.add(1, "late host")
        host.answer(f.request_id, None)
        assert host_table.closed_by_peer(1) == "late host"
        await loop.sock_sendall(a, bytes(host.data_to_send()[0]))
        await until(lambda: not table.closing)  # both ROUTE_CLOSEs through: the id is free
        assert not opener.closed
    finally:
        await opener.close()
        a.close()


async def test_peer_close_waits_for_async_host_closes(pair: Pair) -> None:
    await pair.opener.open("counter", 1)
    await pair.host.close()  # the host's own end closes: its hosts' close() finish first
    assert closes() == [1]


# -- refusals ------------------------------------------------------------------------


async def test_unknown_kind_is_no_handler(pair: Pair) -> None:
    with pytest.raises(tether.NoHandler, match="no host for route kind 'nope'"):
        await pair.opener.open("nope")


async def test_forbidden_kind(pair: Pair) -> None:
    pair.host.host("admin-only", Counter, roles={"admin"})
    with pytest.raises(tether.Forbidden, match="may not be opened by role 'child'"):
        await pair.opener.open("admin-only", 1)
    # No roles=: local peers only, as for handlers.
    pair.host.host("local-only", Counter)
    assert pair.host.local
    route = await pair.opener.open("local-only", 1)
    await route.close()
    pair.host.local = False
    with pytest.raises(tether.Forbidden, match="may not be opened by role 'child'"):
        await pair.opener.open("local-only", 1)


async def test_factory_raising_is_remote_error_and_nothing_stays_open(pair: Pair) -> None:
    def broken(route: tether.Route, n: int) -> None:
        raise ValueError(f"cannot host {n}")

    pair.host.host("broken", broken, roles={"child"})
    with pytest.raises(tether.RemoteError, match="cannot host 3") as ei:
        await pair.opener.open("broken", 3)
    assert ei.value.type_name == "ValueError"
    table = pair.host._conn.routes
    assert table is not None and not table.routes and table.hosted == 0
    assert not pair.opener._conn.route_table().routes


async def test_factory_args_are_validated_from_its_hints(pair: Pair) -> None:
    with pytest.raises(tether.BadRequest, match="start") as ei:
        await pair.opener.open("counter", "five")
    assert ei.value.path == "start"
    with pytest.raises(tether.BadRequest):
        await pair.opener.open("counter")
    assert Counter.log == []


def test_host_registration_errors() -> None:
    async def factory(route: tether.Route) -> None: ...

    main = tether.Main()
    with pytest.raises(TypeError, match="not async"):
        main.host("k", factory)
    main.host("k", Counter)
    with pytest.raises(ValueError, match="second host"):
        main.host("k", Counter)
    with pytest.raises(TypeError):
        main.host("k2", Counter, roles=5)  # type: ignore[arg-type]


async def test_invoke_on_a_route_the_receiver_does_not_know_is_route_closed(pair: Pair) -> None:
    """An INVOKE on a routing id not open is answered ``route_closed``: not a protocol error."""
    fut = asyncio.get_running_loop().create_future()
    pair.opener._conn.send_invoke(b"add", (1,), fut, route_id=42)
    pair.opener._flush()
    with pytest.raises(tether.RouteClosed, match="route 42 is not open"):
        await asyncio.wait_for(fut, 10)
    pair.opener._conn.send_event(b"add", (1,), route_id=42)  # dropped
    assert await pair.opener.open("counter", 1)  # the connection is fine


async def test_route_open_with_request_id_zero_drops_the_peer(pair: Pair) -> None:
    from tether.wire import Kind

    pair.opener._conn._emit(Kind.ROUTE_OPEN, 0, 1, b"counter", b"\x91\x01")
    pair.opener._flush()
    await asyncio.wait_for(pair.opener.wait_closed(), 10)
    assert isinstance(pair.host.close_reason, tether.ProtocolError)


# -- the cap --------------------------------------------------------------------------


async def test_the_default_cap_is_255_routes_per_peer(pair: Pair) -> None:
    routes = [await pair.opener.open("counter", i) for i in range(255)]
    pair.opener.max_routes = 1000  # the opener would open more: the host refuses
    with pytest.raises(tether.Busy, match=r"255 routes are open on this connection already"):
        await pair.opener.open("counter", 255)
    assert len(Counter.log) == 255
    await routes[0].close()
    await until(lambda: closes() == [1])
    extra = await pair.opener.open("counter", 0)  # room again
    assert extra.id == 257  # ids count on: 256 was refused, 1 stays unused for a while
    assert await extra.invoke("add", 1) == 1


async def test_the_cap_is_per_peer_and_settable(pair: Pair) -> None:
    pair.host.max_routes = 2
    await pair.opener.open("counter", 0)
    await pair.opener.open("counter", 0)
    with pytest.raises(tether.Busy, match="2 routes are open"):
        await pair.opener.open("counter", 0)
    # The opener's own cap: refused before anything is sent.
    pair.opener.max_routes = 2
    with pytest.raises(tether.Busy, match="2 routes opened to this peer already"):
        await pair.opener.open("counter", 0)


async def test_main_sets_the_cap_for_its_peers() -> None:
    opened: list[tuple[int, str]] = []
    async with tether.Main(timeout=20.0, max_routes=3) as main:
        main.host("counter", Counter, roles={"child"})

        @main.handle("opened")
        def on_opened(call: tether.Call, count: int, refused: str) -> None:
            opened.append((count, refused))

        child = await main.spawn(_route_targets.open_many, 3, start_method="fork")
        await until(lambda: len(opened) == 1, 20)
        # the child got main's cap too: it refuses the fourth itself, before asking
        assert opened == [
            (3, "Busy: 3 routes opened to this peer already (max_routes): close some first")
        ]
        assert child.max_routes == 3
    with pytest.raises(ValueError, match="max_routes"):
        tether.Main(max_routes=-1)


async def test_a_child_opens_as_many_routes_as_main_allows() -> None:
    """Main(max_routes=) above the default reaches the child's own opener-side cap."""
    opened: list[tuple[int, str]] = []
    async with tether.Main(timeout=20.0, max_routes=300) as main:
        main.host("counter", Counter, roles={"child"})

        @main.handle("opened")
        def on_opened(call: tether.Call, count: int, refused: str) -> None:
            opened.append((count, refused))

        for method in ("fork", "spawn"):
            await main.spawn(_route_targets.open_many, 300, start_method=method)
            await until(lambda: len(opened) == 1, 40)
            assert opened.pop()[0] == 300


# -- ordering ---------------------------------------------------------------------------


async def test_many_routes_interleaved_keep_per_route_fifo_order(pair: Pair) -> None:
    seen: dict[int, list[int]] = {}

    def recorder(route: tether.Route) -> None:
        got = seen.setdefault(route.id, [])

        @route.on("n")
        def n(call: tether.Call, i: int) -> None:
            got.append(i)

        @route.handle("count")
        async def count(call: tether.Call) -> list[int]:
            await asyncio.sleep(0)
            return list(got)

    pair.host.host("rec", recorder, roles={"child"})
    routes = [await pair.opener.open("rec") for _ in range(20)]
    sends = []
    for i in range(100):
        for r in routes:  # round robin: every route's frames interleaved with the others'
            sends.append(r.send("n", i))
    await asyncio.gather(*sends)
    results = await asyncio.gather(*(r.invoke("count") for r in routes))
    assert results == [list(range(100))] * 20
    assert sorted(seen) == [r.id for r in routes]


async def test_route_frames_keep_fifo_order_with_the_peers_frames(pair: Pair) -> None:
    log: list[tuple[int, int]] = []

    def recorder(route: tether.Route) -> None:
        route.on("n", lambda call, i: log.append((route.id, i)))

    pair.host.host("rec", recorder, roles={"child"})
    pair.host.on("n", lambda call, i: log.append((0, i)))
    routes = [await pair.opener.open("rec") for _ in range(3)]
    sent: list[tuple[int, int]] = []
    for i in range(60):
        target = i % 4
        if target:
            await routes[target - 1].send("n", i)
        else:
            await pair.opener.send("n", i)
        sent.append((target, i))
    await until(lambda: len(log) == len(sent))
    assert log == sent


# -- SendOrDrop --------------------------------------------------------------------------


class UseAfterFree(AssertionError):
    """Something read a message after the send had given it away."""


class Message:
    """A message the encoder cannot encode; after the send first touches it, every read raises.

    The stand-in for the seed's ``IPC::Message*`` that ``Send`` freed: the
    failure report must not read it.
    """

    def __init__(self, text: str) -> None:
        self.text = text
        self.given_away = False

    def __getattr__(self, name: str) -> Any:
        given = self.__dict__.get("given_away")
        if name == "__tether_buffer__" and not given:
            self.__dict__["given_away"] = True  # the send has it now
            raise AttributeError(name)
        if given and not name.startswith("__"):
            raise UseAfterFree(f"read .{name} of a message that was given away")
        raise AttributeError(name)

    def __getattribute__(self, name: str) -> Any:
        if name in ("text",) and object.__getattribute__(self, "__dict__").get("given_away"):
            raise UseAfterFree(f"read .{name} of a message that was given away")
        return object.__getattribute__(self, name)

    def __repr__(self) -> str:
        if self.__dict__.get("given_away"):
            raise UseAfterFree("repr() of a message that was given away")
        return "Message(...)"

    __str__ = __repr__


async def test_send_or_drop_step_by_step(pair: Pair) -> None:
    """The seed's ``WebSocketDispatcherHost::SendOrDrop``, with the bug it had made impossible.

    1. The host relays a message on its route, and it is delivered.
    2. The other end goes away without a word (killed); the host does not know yet.
    3. The host relays the next message, a Buffer: the write fails.
    4. The route is dropped (SendOrDrop): the host object's close() runs once,
       and the sender gets RouteClosed naming kind, routing id and channel --
       taken before the send -- while the Buffer it gave away is consumed.
    """
    hosts: list[Relay] = []

    class Relay:
        def __init__(self, route: tether.Route) -> None:
            self.route = route
            self.closed = 0
            hosts.append(self)

        def close(self) -> None:
            self.closed += 1

    pair.host.host("websocket", Relay, roles={"child"})
    route = await pair.opener.open("websocket")
    got: list[bytes] = []
    route.on("frame", lambda call, data: got.append(bytes(data)))
    (relay,) = hosts

    # 1. delivered
    await relay.route.send("frame", b"first")
    await until(lambda: got == [b"first"])

    # 2. the renderer dies; no loop turn lets the host read its EOF
    pair.opener.abort(tether.PeerGone("killed"))

    # 3. the send fails
    buf = tether.Buffer(16)
    buf.view()[:4] = b"data"
    with pytest.raises(tether.RouteClosed) as ei:
        await relay.route.send("frame", buf)

    # 4. dropped, reported from what was captured before the send
    err = ei.value
    assert "route 1 ('websocket'), channel 'frame'" in str(err)
    assert (err.kind, err.route_id) == ("websocket", 1)
    assert isinstance(err.__cause__, tether.PeerGone)
    assert relay.route.closed and relay.closed == 1
    with pytest.raises(tether.ConsumedError):
        buf.view()
    late = tether.Buffer(16)
    with pytest.raises(tether.RouteClosed, match="channel 'frame': the route is closed"):
        await relay.route.send("frame", late)
    with pytest.raises(tether.ConsumedError):  # consumed even though nothing was sent
        late.view()
    assert relay.closed == 1  # exactly once
    assert got == [b"first"]


def _wait_dead(pid: int, timeout: float = 10.0) -> None:
    """Block (no loop turn) until ``pid`` is a zombie or gone: main has not read its EOF yet."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        try:
            with open(f"/proc/{pid}/stat") as f:
                if f.read().rsplit(")", 1)[1].split()[0] in ("Z", "X"):
                    return
        except FileNotFoundError:
            return
        time.sleep(0.01)
    raise AssertionError(f"process {pid} still alive")


async def test_send_or_drop_to_a_killed_child() -> None:
    """The seed's case with a real renderer process: main relays to a child that was killed."""
    hosts: list[Counter] = []
    opened: list[tuple[int, int]] = []

    class Relay(Counter):
        def __init__(self, route: tether.Route, start: int) -> None:
            super().__init__(route, start)
            hosts.append(self)

    async with tether.Main(timeout=20.0) as main:
        main.host("relay", Relay, roles={"child"})

        @main.handle("opened")
        def on_opened(call: tether.Call, route_id: int, total: int) -> None:
            opened.append((route_id, total))

        child = await main.spawn(_route_targets.open_and_wait, "relay", 1, start_method="fork")
        await until(lambda: opened == [(1, 2)], 20)
        (relay,) = hosts
        os.kill(child.pid, signal.SIGKILL)
        _wait_dead(child.pid)  # dead, and main has not noticed (no loop turn since)
        buf = tether.Buffer(4096)
        with pytest.raises(tether.RouteClosed) as ei:
            await relay.route.send("frame", buf)
        assert "sending on route 1 ('relay'), channel 'frame' failed (PeerGone" in str(ei.value)
        assert relay.route.closed
        with pytest.raises(tether.ConsumedError):
            buf.view()
        await until(lambda: closes() == [1])
        await asyncio.wait_for(child.wait_closed(), 20)
        await asyncio.sleep(0.05)
        assert closes() == [1]


async def test_send_or_drop_never_reads_the_message_it_gave_away(pair: Pair) -> None:
    """An unencodable payload: the send fails after taking the message; the report reads none."""
    closed: list[int] = []

    class Host:
        def __init__(self, route: tether.Route) -> None:
            self.route = route

        async def close(self) -> None:
            closed.append(self.route.id)

    pair.host.host("ws", Host, roles={"child"})
    route = await pair.opener.open("ws")
    buf = tether.Buffer(8)
    msg = Message("payload")
    assert msg.text == "payload"
    with pytest.raises(tether.RouteClosed) as ei:
        await route.send("relay", buf, msg)
    assert msg.__dict__["given_away"]  # the send took it ...
    with pytest.raises(UseAfterFree):  # ... and from then on every read fails
        repr(msg)
    with pytest.raises(UseAfterFree):
        _ = msg.text
    err = ei.value
    assert str(err).startswith("sending on route 1 ('ws'), channel 'relay' failed (TypeError:")
    assert "route dropped" in str(err)
    assert isinstance(err.__cause__, TypeError)
    assert route.closed
    with pytest.raises(tether.ConsumedError):
        buf.view()
    # The host end was told (ROUTE_CLOSE) and its close ran once.
    await until(lambda: closed == [1])
    with pytest.raises(tether.RouteClosed):
        await route.invoke("x")


async def test_send_or_drop_on_a_limit(pair: Pair) -> None:
    route = await pair.opener.open("counter", 0)
    too_big = b"x" * (pair.opener._conn.send_limit + 1)
    with pytest.raises(tether.RouteClosed, match=r"channel 'add' failed \(PayloadTooLarge") as ei:
        await route.invoke("add", too_big)
    assert isinstance(ei.value.__cause__, tether.PayloadTooLarge)
    assert route.closed
    await until(lambda: closes() == [1])
    # The connection itself is fine.
    assert await (await pair.opener.open("counter", 4)).invoke("add", 1) == 5


async def test_route_id_on_the_wire_has_the_host_bit(pair: Pair) -> None:
    """Frames the host sends carry ``id | HOST_BIT``; the opener keys its route by that."""
    route = await pair.opener.open("counter", 0)
    table = pair.opener._conn.route_table()
    assert table.routes[1 | HOST_BIT] is route
    assert pair.host._conn.route_table().routes[1].kind == "counter"


async def test_a_host_factory_must_take_the_route_first() -> None:
    async with tether.Main() as main:

        class Wrong:
            def __init__(self, route: tether.Call, start: int) -> None: ...

        with pytest.raises(TypeError, match=r"Wrong\(\).*receives the tether.Route"):
            main.host("wrong", Wrong)

        class Right:
            def __init__(self, route: tether.Route, start: int) -> None: ...

        main.host("right", Right)
        assert "right" in main.registry.hosts


async def test_a_host_close_that_never_returns_is_cancelled_and_logged(
    pair: Pair, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """A hung host ``close()`` does not leave a task forever: bounded, then cancelled."""
    import tether.aio.route as aio_route

    monkeypatch.setattr(aio_route, "HOST_CLOSE_TIMEOUT", 0.2)
    cancelled: list[bool] = []

    class Stuck:
        def __init__(self, route: tether.Route) -> None:
            self.route = route

        async def close(self) -> None:
            try:
                await asyncio.Event().wait()  # never set
            except asyncio.CancelledError:
                cancelled.append(True)
                raise

    pair.host.host("stuck", Stuck, roles={"child"})
    route = await pair.opener.open("stuck")
    (host_route,) = pair.host._conn.route_table().routes.values()
    await route.close()
    await until(lambda: host_route._close_task is not None and host_route._close_task.done())
    assert cancelled == [True]
    assert "did not return within" in caplog.text
