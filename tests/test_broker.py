"""The WebSocket broker (``tether.broker``): policy, relaying, SendOrDrop, the example end to end.

Main hosts the ``websocket`` route kind; a sandboxed child opens sockets
through it to a local echo server (``websockets``, 127.0.0.1, port 0).
"""

from __future__ import annotations

import asyncio
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from websockets.asyncio.server import ServerConnection, serve
from websockets.exceptions import ConnectionClosed

import tether
from _broker_targets import echo_client, flood_reader, open_and_wait, open_unreachable
from tether.broker import BrokeredWebSocket, Policy, WebSocketBroker, open_websocket

# -- the policy -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("url", "reason"),
    [
        ("ws://example.com/", "host 'example.com' is not allowed"),
        ("ws://127.0.0.1:81/", "port 81 is not allowed"),
        ("ws://127.0.0.1/", "port 80 is not allowed"),
        ("http://127.0.0.1:8080/", "scheme 'http' is not allowed"),
        ("wss://127.0.0.1:8080/", "scheme 'wss' is not allowed"),
        ("ws://me:pw@127.0.0.1:8080/", "credentials in the URL are not allowed"),
        ("ws://127.0.0.1:99999/", "not a WebSocket URL"),
        ("ws://127.0.0.1.evil.example:8080/", "host '127.0.0.1.evil.example' is not allowed"),
    ],
)
def test_policy_refuses_what_it_does_not_name(url: str, reason: str) -> None:
    policy = Policy(
        hosts=frozenset({"127.0.0.1"}), ports=frozenset({8080}), schemes=frozenset({"ws"})
    )
    with pytest.raises(tether.Forbidden, match=reason):
        policy.check(url)


def test_policy_allows_what_it_names() -> None:
    policy = Policy(hosts=frozenset({"LocalHost", "127.0.0.1"}), ports=frozenset({8080, 443}))
    assert policy.check("ws://127.0.0.1:8080/chat?x=1") == "ws://127.0.0.1:8080/chat?x=1"
    assert policy.check("WS://localhost:8080") == "WS://localhost:8080"
    assert policy.check("wss://localhost/") == "wss://localhost/"


async def test_a_handler_raising_forbidden_answers_forbidden(sock_path: str) -> None:
    """A refusal on purpose reaches the caller as Forbidden, not as a RemoteError."""
    async with tether.Main() as main:

        @main.handle("door")
        def door(call: tether.Call, who: str) -> str:
            if who != "friend":
                raise tether.Forbidden(f"{who} may not enter")
            return "welcome"

        await main.listen(f"unix://{sock_path}")
        async with tether.connect(f"unix://{sock_path}") as peer:
            assert await peer.invoke("door", "friend", timeout=10.0) == "welcome"
            with pytest.raises(tether.Forbidden, match=r"^stranger may not enter$"):
                await peer.invoke("door", "stranger", timeout=10.0)


# -- relaying, end to end with a sandboxed child ------------------------------------


class Echo:
    """A local WebSocket server (127.0.0.1, port 0): echoes, or ticks without being asked."""

    def __init__(self, tick: bool = False) -> None:
        self.tick = tick
        self.connections = 0
        self.ended = 0  # server-side handlers that saw their connection end
        self.server: Any = None

    async def handler(self, ws: ServerConnection) -> None:
        self.connections += 1
        try:
            if self.tick:
                n = 0
                while True:
                    await ws.send(f"tick {n}")
                    n += 1
                    await asyncio.sleep(0.005)
            async for message in ws:
                await ws.send(message)
        except ConnectionClosed:
            pass
        finally:
            self.ended += 1

    async def __aenter__(self) -> Echo:
        self.server = await serve(self.handler, "127.0.0.1", 0)
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.server.close()
        await self.server.wait_closed()

    @property
    def port(self) -> int:
        return int(next(iter(self.server.sockets)).getsockname()[1])

    @property
    def url(self) -> str:
        return f"ws://127.0.0.1:{self.port}/"


async def _until(predicate: Any, timeout: float = 10.0) -> None:
    async with asyncio.timeout(timeout):
        while not predicate():
            await asyncio.sleep(0.01)


def _main_with(broker: WebSocketBroker, got: dict[str, Any]) -> tether.Main:
    main = tether.Main()
    broker.install(main, roles={"child"})

    @main.handle("report")
    def report(call: tether.Call, found: dict[str, Any]) -> None:
        got.update(found)

    return main


async def test_broker_end_to_end_and_the_server_dying_mid_conversation() -> None:
    async with Echo() as echo:
        policy = Policy(hosts=frozenset({"127.0.0.1"}), ports=frozenset({echo.port}))
        broker = WebSocketBroker(policy)
        got: dict[str, Any] = {}
        async with _main_with(broker, got) as main:

            @main.handle("stop-server")
            async def stop_server(call: tether.Call) -> None:
                echo.server.close()
                await echo.server.wait_closed()

            messages = ["Hola, mundo!", "dos", "x" * 100_000]
            child = await main.spawn(
                echo_client, echo.url, "ws://example.com/", messages, sandbox=True
            )
            assert await child.wait(30.0) == 0
            await broker.wait_idle(10.0)
    assert got["forbidden"] == "host 'example.com' is not allowed (url 'ws://example.com/')"
    assert got["echoes"] == messages  # in order, through main, by routing id
    assert got["after"].startswith("RouteClosed: websocket ws://127.0.0.1:")
    assert got["send_after"] == "RouteClosed"
    assert got["close_code"] == 1001  # the server went away: a clean close
    assert got["route_closed"] is True
    assert broker.refused == 1
    assert [(h.route.id, h.closes) for h in broker.closed_hosts] == [(got["route"], 1)]
    assert echo.connections == 1 and echo.ended == 1


async def test_child_killed_mid_stream_drops_the_route_and_closes_the_real_socket() -> None:
    """SendOrDrop: relaying to a dead child fails; the host closes the real socket, once."""
    async with Echo(tick=True) as ticker:
        policy = Policy(hosts=frozenset({"127.0.0.1"}), ports=frozenset({ticker.port}))
        broker = WebSocketBroker(policy)
        got: dict[str, Any] = {}
        async with _main_with(broker, got) as main:
            child = await main.spawn(open_and_wait, ticker.url, sandbox=True)
            await _until(lambda: "first" in got)
            assert got["first"] == "tick 0"
            (host,) = broker.hosts
            child.kill()
            await broker.wait_idle(10.0)
            await _until(lambda: ticker.ended == 1)  # the server saw the real socket close
            assert host.closes == 1
            assert host.route.closed
            assert broker.closed_hosts == [host]


async def test_peer_closing_its_socket_closes_the_real_one_once(sock_path: str) -> None:
    async with Echo() as echo:
        policy = Policy(hosts=frozenset({"127.0.0.1"}), ports=frozenset({echo.port}))
        broker = WebSocketBroker(policy)
        async with tether.Main() as main:
            broker.install(main)  # no roles: local peers (this unix client) may open
            await main.listen(f"unix://{sock_path}")
            async with tether.connect(f"unix://{sock_path}") as peer:
                ws = await open_websocket(peer, echo.url)
                await ws.send(b"\x00bytes\xff")
                assert await ws.recv(timeout=10.0) == b"\x00bytes\xff"
                await ws.close()
                with pytest.raises(tether.RouteClosed):
                    await ws.send("after close")
                await broker.wait_idle(10.0)
            await _until(lambda: echo.ended == 1)
    assert [h.closes for h in broker.closed_hosts] == [1]


async def test_unreachable_server_fails_the_open_and_closes_the_host() -> None:
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    broker = WebSocketBroker(Policy(hosts=frozenset({"127.0.0.1"}), ports=frozenset({port})))
    got: dict[str, Any] = {}
    async with _main_with(broker, got) as main:
        child = await main.spawn(open_unreachable, f"ws://127.0.0.1:{port}/", sandbox=True)
        assert await child.wait(30.0) == 0
        await broker.wait_idle(10.0)
    expected = f"RemoteError: ConnectionError: cannot connect to ws://127.0.0.1:{port}/"
    assert got["error"].startswith(expected), got
    assert [h.closes for h in broker.closed_hosts] == [1]


# -- the example and the demo ---------------------------------------------------------


@pytest.mark.timeout(120)
def test_broker_example_runs() -> None:
    example = Path(__file__).resolve().parent.parent / "examples" / "broker" / "main.py"
    out = subprocess.run(
        [sys.executable, str(example)], capture_output=True, text=True, timeout=90, check=False
    )
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    for expected in (
        "renderer: own socket refused: ENETUNREACH",
        "renderer: ws://example.com/ is Forbidden: host 'example.com' is not allowed"
        " (url 'ws://example.com/')",
        "renderer: echoed 'Hola, mundo!'",
        "renderer: echoed 'second message'",
        "main: echo server stopped",
        "renderer: socket closed cleanly (code 1001)",
        "main: host of route 2 closed 1 time(s)",
        "main: 1 URL refused; renderer exited with code 0",
    ):
        assert expected in lines, out.stdout


# -- redirects, flow control -----------------------------------------------------------


async def _redirector(location: str) -> asyncio.Server:
    """A loopback HTTP server answering every request ``302 Found`` to ``location``."""

    async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            await reader.readuntil(b"\r\n\r\n")
            writer.write(
                f"HTTP/1.1 302 Found\r\nLocation: {location}\r\nContent-Length: 0\r\n\r\n".encode()
            )
            await writer.drain()
        finally:
            writer.close()

    return await asyncio.start_server(answer, "127.0.0.1", 0)


async def test_a_redirect_is_refused_not_followed(sock_path: str) -> None:
    """An allowed URL whose server redirects to a URL the policy does not name: Forbidden."""
    async with Echo() as secret:
        target = secret.url  # its port is not in the policy
        red = await _redirector(target)
        async with red:
            rport = red.sockets[0].getsockname()[1]
            policy = Policy(hosts=frozenset({"127.0.0.1"}), ports=frozenset({rport}))
            broker = WebSocketBroker(policy)
            async with tether.Main() as main:
                broker.install(main)
                await main.listen(f"unix://{sock_path}")
                async with tether.connect(f"unix://{sock_path}") as peer:
                    with pytest.raises(tether.Forbidden, match="redirect") as info:
                        await open_websocket(peer, f"ws://127.0.0.1:{rport}/", timeout=10.0)
                    assert target in str(info.value)
                    await broker.wait_idle(10.0)
        assert secret.connections == 0  # never reached
    assert [h.closes for h in broker.closed_hosts] == [1]


class Flood:
    """A loopback WebSocket server sending numbered messages as fast as it may, until ``stop``."""

    def __init__(self, size: int) -> None:
        self.size = size
        self.sent = 0
        self.stop = False
        self.server: Any = None

    async def handler(self, ws: ServerConnection) -> None:
        await ws.recv()
        pad = "x" * (self.size - 8)
        try:
            while not self.stop:
                await ws.send(f"{self.sent:08d}{pad}")
                self.sent += 1
            await ws.send("end")
            await ws.wait_closed()
        except ConnectionClosed:
            pass

    async def __aenter__(self) -> Flood:
        self.server = await serve(self.handler, "127.0.0.1", 0, compression=None)
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.server.close()
        await self.server.wait_closed()

    @property
    def port(self) -> int:
        return int(next(iter(self.server.sockets)).getsockname()[1])


@pytest.mark.timeout(120)
@pytest.mark.parametrize(
    ("window", "window_bytes", "full"),
    [
        (8, 1 << 20, 8),  # the message count fills the window
        (1000, 64 * 1024, 4),  # the bytes do: 4 messages of 16 KiB
        (1000, 1000, 1),  # one message larger than the window still goes, alone
    ],
)
async def test_a_child_that_does_not_read_pushes_back_on_the_server(
    window: int, window_bytes: int, full: int
) -> None:
    """Flow control: the window bounds the child's queue, TCP stalls the flood; then all arrives."""
    size = 16 * 1024
    async with Flood(size) as flood:
        policy = Policy(hosts=frozenset({"127.0.0.1"}), ports=frozenset({flood.port}))
        broker = WebSocketBroker(policy, window=window, window_bytes=window_bytes)
        got: dict[str, Any] = {}
        seen: dict[str, int] = {}
        async with _main_with(broker, got) as main:

            @main.handle("flooding", roles={"child"})
            async def flooding(call: tether.Call) -> None:
                """Return once the server stalled: neither main nor the child reads on."""
                last = -1
                async with asyncio.timeout(60.0):
                    while flood.sent != last or flood.sent == 0:
                        last = flood.sent
                        await asyncio.sleep(1.0)
                (host,) = broker.hosts
                frames = len(host._ws.recv_messages.frames)  # what websockets holds in main
                seen.update(sent=flood.sent, inflight=host.inflight, frames=frames)
                flood.stop = True  # its send in progress completes once the child reads

            child = await main.spawn(flood_reader, f"ws://127.0.0.1:{flood.port}/", sandbox=True)
            assert await child.wait(90.0) == 0
    assert seen["inflight"] == full, seen
    assert seen["frames"] < 256, seen  # main: one read's worth of frames, no more
    assert got["queued"] <= full, got
    assert got["queued_bytes"] <= full * size, got
    assert got["received"] == flood.sent
    assert got["in_order"] is True


async def test_the_real_socket_is_opened_without_compression(sock_path: str) -> None:
    """Compressed frames could inflate in main beyond any window: none are negotiated."""
    offered: list[str | None] = []

    async def record(ws: ServerConnection) -> None:
        offered.append(ws.request.headers.get("Sec-WebSocket-Extensions") if ws.request else "?")
        await ws.send("hello")
        await ws.wait_closed()

    async with serve(record, "127.0.0.1", 0) as server:  # offers permessage-deflate itself
        port = next(iter(server.sockets)).getsockname()[1]
        broker = WebSocketBroker(Policy(hosts=frozenset({"127.0.0.1"}), ports=frozenset({port})))
        async with tether.Main() as main:
            broker.install(main)
            await main.listen(f"unix://{sock_path}")
            async with tether.connect(f"unix://{sock_path}") as peer:
                ws = await open_websocket(peer, f"ws://127.0.0.1:{port}/", timeout=10.0)
                assert await ws.recv(timeout=10.0) == "hello"
                (host,) = broker.hosts
                assert host._ws.protocol.extensions == []
                await ws.close()
                await broker.wait_idle(10.0)
    assert offered == [None]


class _StuckRoute:
    """A route whose sends never complete (a peer that stopped reading): records listeners."""

    id, kind, closed = 2, "websocket", False

    def __init__(self) -> None:
        self.listeners: dict[str, Any] = {}
        self.acks: list[tuple[int, int]] = []

    def on(self, channel: str, fn: Any) -> None:
        self.listeners[channel] = fn

    async def send(self, channel: str, *args: Any) -> None:
        self.acks.append(args)
        await asyncio.Event().wait()


async def test_recv_returns_its_message_while_the_ack_for_it_cannot_be_sent() -> None:
    """The credit goes out on its own: a recv never waits on it, so none times out holding data."""
    route = _StuckRoute()
    ws = BrokeredWebSocket(route, "ws://127.0.0.1:1/", window=2)  # type: ignore[arg-type]
    for text in ("one", "two"):
        route.listeners["message"](None, text)
    assert ws.queued == (2, 6)
    assert await ws.recv(timeout=5.0) == "one"  # one message is half the window: an ack
    assert await ws.recv(timeout=5.0) == "two"
    assert ws.queued == (0, 0)
    await asyncio.sleep(0)
    assert route.acks == [(1, 3), (1, 3)]
    for task in list(ws._acking):
        task.cancel()
