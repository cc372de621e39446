"""Behaviour of one asyncio connection to a listening Main, over real unix and tcp sockets.

Covers concurrency, every per-call error, timeouts and cancellation reaching
the handler, close semantics, listener addresses, malformed input from raw
sockets (the bad-message rule) and backpressure against a peer that stops
reading.
"""

from __future__ import annotations

import asyncio
import os
import socket
import stat
import struct
import time
from collections.abc import AsyncIterator
from typing import Any

import pytest

import tether
from _targets import Recorder, install_main_handlers
from tether.protocol import Connection

pytestmark = pytest.mark.timeout(60)


class Hub:
    def __init__(self, main: tether.Main, server: tether.Server, rec: Recorder) -> None:
        self.main = main
        self.server = server
        self.rec = rec
        self.address = str(server.address)


@pytest.fixture(params=["unix", "tcp"])
async def hub(request: pytest.FixtureRequest, sock_path: str) -> AsyncIterator[Hub]:
    """A listening Main with the standard handlers, on a unix socket or on tcp."""
    main = tether.Main(timeout=10.0)
    rec = install_main_handlers(main)
    async with main:
        url = f"unix://{sock_path}" if request.param == "unix" else "tcp://127.0.0.1:0"
        server = await main.listen(url)
        yield Hub(main, server, rec)


@pytest.fixture
async def unix_hub(sock_path: str) -> AsyncIterator[Hub]:
    main = tether.Main(timeout=10.0)
    rec = install_main_handlers(main)
    async with main:
        server = await main.listen(f"unix://{sock_path}")
        yield Hub(main, server, rec)


# -- concurrency ----------------------------------------------------------------------


async def test_thousand_concurrent_invokes_one_connection(hub: Hub) -> None:
    async with tether.connect(hub.address, timeout=30.0) as peer:
        results = await asyncio.gather(
            *(peer.invoke("echo" if i % 2 else "aecho", [i, f"s{i}"]) for i in range(1000))
        )
        assert results == [[i, f"s{i}"] for i in range(1000)]
        sums = await asyncio.gather(*(peer.invoke("add", i, 2 * i) for i in range(1000)))
        assert sums == [3 * i for i in range(1000)]


async def test_many_clients_are_independent(unix_hub: Hub) -> None:
    peers = [await tether.connect(unix_hub.address) for _ in range(5)]
    try:
        got = await asyncio.gather(
            *(p.invoke("echo", [n, i]) for n, p in enumerate(peers) for i in range(50))
        )
        assert got == [[n, i] for n in range(5) for i in range(50)]
        assert len(unix_hub.main.peers) == 5
    finally:
        for p in peers:
            await p.close()


# -- errors ---------------------------------------------------------------------------


async def test_sync_handler_error_keeps_type_message_and_traceback(hub: Hub) -> None:
    async with tether.connect(hub.address) as peer:
        with pytest.raises(tether.RemoteError) as ei:
            await peer.invoke("boom", 42)
        err = ei.value
        assert err.type_name in ("ValueError", "builtins.ValueError")
        assert err.remote_message == "bad value 42"
        assert "boom_handler" in err.remote_traceback
        assert "bad value 42" in str(err)
        # One call failed; the connection did not.
        assert await peer.invoke("echo", "still here") == "still here"


async def test_async_handler_error_keeps_qualified_type(hub: Hub) -> None:
    async with tether.connect(hub.address) as peer:
        with pytest.raises(tether.RemoteError) as ei:
            await peer.invoke("aboom", 7)
        err = ei.value
        assert err.type_name.endswith("CustomError")
        assert err.type_name != "CustomError"  # qualified with its module
        assert err.remote_message == "async bad value 7"
        assert "aboom_handler" in err.remote_traceback
        assert await peer.invoke("add", 1, 2) == 3


async def test_no_handler(hub: Hub) -> None:
    async with tether.connect(hub.address) as peer:
        with pytest.raises(tether.NoHandler) as ei:
            await peer.invoke("no-such-channel", 1)
        assert "no-such-channel" in str(ei.value)
        assert isinstance(ei.value, LookupError)
        assert await peer.invoke("echo", 1) == 1


@pytest.mark.parametrize(
    ("channel", "args", "path"),
    [
        ("typed", ("str",), "x"),
        ("add", (1, "two"), "b"),
        ("point", ("lbl", {"x": 1, "y": "no"}), "p.y"),
        ("items", ([1, 2, "three"],), "items[2]"),
    ],
)
async def test_bad_request_names_the_argument(
    unix_hub: Hub, channel: str, args: tuple[Any, ...], path: str
) -> None:
    async with tether.connect(unix_hub.address) as peer:
        with pytest.raises(tether.BadRequest) as ei:
            await peer.invoke(channel, *args)
        assert ei.value.path == path
        assert isinstance(ei.value, ValueError)
        # Valid arguments on the same channels work.
        assert await peer.invoke("typed", 1) == 2
        assert await peer.invoke("point", "p", {"x": 1, "y": 2}) == "p:3"
        assert await peer.invoke("items", [1, 2, 3]) == 6


async def test_bad_request_wrong_argument_count(unix_hub: Hub) -> None:
    async with tether.connect(unix_hub.address) as peer:
        with pytest.raises(tether.BadRequest):
            await peer.invoke("add", 1)
        with pytest.raises(tether.BadRequest):
            await peer.invoke("add", 1, 2, 3)


async def test_forbidden_for_client_role(hub: Hub) -> None:
    async with tether.connect(hub.address) as peer:
        with pytest.raises(tether.Forbidden) as ei:
            await peer.invoke("child_only")
        assert isinstance(ei.value, PermissionError)
        assert "client" in str(ei.value)
        assert await peer.invoke("echo", "ok") == "ok"


async def test_listener_role_decides_access(sock_path: str) -> None:
    """A listener that grants role "child" lets its peers reach child-only channels."""
    async with tether.Main() as main:
        install_main_handlers(main)
        server = await main.listen(f"unix://{sock_path}", role="child")
        async with tether.connect(str(server.address)) as peer:
            assert await peer.invoke("child_only") == "secret for child"


# -- timeouts and cancellation -------------------------------------------------------


async def test_invoke_timeout_cancels_remote_handler(hub: Hub) -> None:
    async with tether.connect(hub.address) as peer:
        t0 = time.monotonic()
        with pytest.raises(tether.InvokeTimeout) as ei:
            await peer.invoke("sleepy", "t1", 5.0, timeout=0.2)
        elapsed = time.monotonic() - t0
        assert isinstance(ei.value, TimeoutError)
        assert 0.19 <= elapsed < 1.0
        # The handler on the other side was cancelled, well before its 5 s sleep.
        await hub.rec.wait_until(lambda: "t1" in hub.rec.cancelled, timeout=2.0)
        assert hub.rec.started == ["t1"]
        assert hub.rec.finished == []
        assert await peer.invoke("echo", 5) == 5


async def test_peer_default_timeout_applies(unix_hub: Hub) -> None:
    async with tether.connect(unix_hub.address, timeout=0.3) as peer:
        t0 = time.monotonic()
        with pytest.raises(tether.InvokeTimeout):
            await peer.invoke("sleepy", "d1", 5.0)
        assert 0.29 <= time.monotonic() - t0 < 1.5
        await unix_hub.rec.wait_until(lambda: "d1" in unix_hub.rec.cancelled, timeout=2.0)


async def test_main_default_timeout_applies_to_its_peers(sock_path: str) -> None:
    """Main(timeout=0.3): main's invokes of a connected peer default to 0.3 s."""
    async with tether.Main(timeout=0.3) as main:
        rec = install_main_handlers(main)
        server = await main.listen(f"unix://{sock_path}")
        async with tether.connect(str(server.address), timeout=10.0) as client:
            cancelled = asyncio.Event()

            @client.handle("client_sleep")
            async def client_sleep(call: tether.Call) -> str:
                try:
                    await asyncio.sleep(5)
                except asyncio.CancelledError:
                    cancelled.set()
                    raise
                return "late"

            @client.handle("triple")
            def triple(call: tether.Call, x: int) -> int:
                return 3 * x

            assert await client.invoke("register", 4) == 13
            (server_side,) = rec.peers
            t0 = time.monotonic()
            with pytest.raises(tether.InvokeTimeout):
                await server_side.invoke("client_sleep")
            assert 0.29 <= time.monotonic() - t0 < 1.5
            await asyncio.wait_for(cancelled.wait(), 2.0)


async def test_timeout_none_waits_past_default(unix_hub: Hub) -> None:
    async with tether.connect(unix_hub.address, timeout=0.1) as peer:
        t0 = time.monotonic()
        result = await asyncio.wait_for(peer.invoke("sleepy", "n1", 0.5, timeout=None), 5.0)
        assert result == "slept n1"
        assert time.monotonic() - t0 >= 0.45
        assert unix_hub.rec.cancelled == []


async def test_cancelling_the_caller_cancels_the_handler(hub: Hub) -> None:
    async with tether.connect(hub.address) as peer:
        task = asyncio.ensure_future(peer.invoke("sleepy", "c1", 5.0, timeout=None))
        await hub.rec.wait_until(lambda: "c1" in hub.rec.started, timeout=5.0)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        await hub.rec.wait_until(lambda: "c1" in hub.rec.cancelled, timeout=2.0)
        assert hub.rec.finished == []
        # Only that call was cancelled.
        assert await peer.invoke("sleepy", "c2", 0.01) == "slept c2"


# -- close semantics -----------------------------------------------------------------


async def test_main_close_fails_pending_client_invokes(sock_path: str) -> None:
    main = tether.Main()
    install_main_handlers(main)
    server = await main.listen(f"unix://{sock_path}")
    peer = await tether.connect(str(server.address))
    try:
        pending = [asyncio.ensure_future(peer.invoke("sleepy", f"p{i}", 30.0)) for i in range(10)]
        assert await peer.invoke("echo", 1) == 1  # FIFO: the sleepy invokes arrived
        await asyncio.wait_for(main.close(), 10.0)
        results = await asyncio.wait_for(asyncio.gather(*pending, return_exceptions=True), 2.0)
        assert all(isinstance(r, tether.PeerGone) for r in results), results
        with pytest.raises(tether.PeerGone):
            await peer.invoke("echo", 2)
        await asyncio.wait_for(peer.wait_closed(), 1.0)
        assert not os.path.exists(sock_path)
        with pytest.raises(tether.PeerGone):
            await tether.connect(str(server.address), connect_timeout=2.0)
    finally:
        await peer.close()


async def test_peer_close_then_invoke_raises_connection_closed(unix_hub: Hub) -> None:
    peer = await tether.connect(unix_hub.address)
    pending = asyncio.ensure_future(peer.invoke("sleepy", "x", 30.0))
    await unix_hub.rec.wait_until(lambda: "x" in unix_hub.rec.started, timeout=5.0)
    await peer.close()
    with pytest.raises(tether.ConnectionClosed):
        await asyncio.wait_for(pending, 1.0)
    with pytest.raises(tether.ConnectionClosed):
        await peer.invoke("echo", 1)
    with pytest.raises(tether.ConnectionClosed):
        await peer.send("num", 1)
    assert peer.closed
    # Main notices the goodbye, forgets the peer and cancels its handler.
    await unix_hub.rec.wait_until(lambda: not unix_hub.main.peers, timeout=2.0)
    await unix_hub.rec.wait_until(lambda: "x" in unix_hub.rec.cancelled, timeout=2.0)


async def test_async_with_connect_closes(unix_hub: Hub) -> None:
    async with tether.connect(unix_hub.address) as peer:
        assert await peer.invoke("echo", "a") == "a"
    assert peer.closed
    with pytest.raises(tether.ConnectionClosed):
        await peer.invoke("echo", "b")


# -- addresses -----------------------------------------------------------------------


async def test_unix_socket_mode_is_0600(unix_hub: Hub, sock_path: str) -> None:
    st = os.stat(sock_path)
    assert stat.S_ISSOCK(st.st_mode)
    assert stat.S_IMODE(st.st_mode) == 0o600


async def test_tcp_listen_port_zero_gives_real_port() -> None:
    async with tether.Main() as main:
        install_main_handlers(main)
        server = await main.listen("tcp://127.0.0.1:0")
        assert server.address.port > 0
        assert str(server.address) == f"tcp://127.0.0.1:{server.address.port}"
        async with tether.connect(str(server.address)) as peer:
            assert await peer.invoke("add", 2, 2) == 4


async def test_connect_to_nothing_fails_fast(sock_path: str) -> None:
    t0 = time.monotonic()
    with pytest.raises(tether.PeerGone):
        await tether.connect(f"unix://{sock_path}")
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    with pytest.raises(tether.PeerGone):
        await tether.connect(f"tcp://127.0.0.1:{port}")
    assert time.monotonic() - t0 < 2.0


# -- malformed input from a raw socket ------------------------------------------------


def _raw_connect(address: tether.Server) -> socket.socket:
    addr = address.address
    if addr.scheme == "unix":
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.connect(addr.path)
    else:
        s = socket.create_connection((addr.host, addr.port))
    return s


async def _closed_by_main(s: socket.socket, within: float) -> bool:
    """Read until EOF (or reset); False if the socket is still open after ``within`` s."""
    loop = asyncio.get_running_loop()
    s.setblocking(False)
    deadline = loop.time() + within
    while True:
        left = deadline - loop.time()
        if left <= 0:
            return False
        try:
            data = await asyncio.wait_for(loop.sock_recv(s, 65536), left)
        except TimeoutError:
            return False
        except ConnectionResetError:
            return True
        if not data:
            return True


def _hello() -> bytes:
    return bytes(Connection("client").data_to_send()[0])


BAD_INPUTS = {
    "garbage": lambda: b"GET / HTTP/1.1\r\nHost: x\r\n\r\n" + os.urandom(64),
    "four_gib_length": lambda: b"\xff\xff\xff\xff",
    "bad_kind_after_hello": lambda: _hello() + struct.pack("<IBBHIIHH", 16, 99, 0, 0, 1, 0, 0, 0),
    "invoke_before_hello": lambda: struct.pack("<IBBHIIHH", 16, 2, 0, 0, 1, 0, 0, 0),
}


@pytest.mark.parametrize("kind", sorted(BAD_INPUTS))
async def test_malformed_input_closes_only_that_connection(hub: Hub, kind: str) -> None:
    async with tether.connect(hub.address) as good:
        assert await good.invoke("echo", "before") == "before"
        raw = _raw_connect(hub.server)
        try:
            raw.sendall(BAD_INPUTS[kind]())
            assert await _closed_by_main(raw, 1.0), f"main kept the connection after {kind}"
        finally:
            raw.close()
        assert await good.invoke("echo", "after") == "after"
        await hub.rec.wait_until(lambda: len(hub.main.peers) == 1, timeout=2.0)


async def test_truncated_frame_closes_connection(hub: Hub) -> None:
    async with tether.connect(hub.address) as good:
        raw = _raw_connect(hub.server)
        try:
            # A valid HELLO, then a header announcing 1000 bytes of which 10 arrive.
            raw.sendall(_hello() + struct.pack("<IBBHIIHH", 1000, 5, 0, 4, 0, 0, 0, 0) + b"ev" * 5)
            await hub.rec.wait_until(lambda: len(hub.main.peers) == 2, timeout=2.0)
            # Main is waiting for the rest of the frame: the connection stays up...
            assert not await _closed_by_main(raw, 0.2)
            assert await good.invoke("echo", "mid") == "mid"
            # ...until the sender closes mid-frame.
            raw.shutdown(socket.SHUT_WR)
            assert await _closed_by_main(raw, 1.0)
        finally:
            raw.close()
        await hub.rec.wait_until(lambda: len(hub.main.peers) == 1, timeout=2.0)
        assert await good.invoke("echo", "after") == "after"


# -- backpressure --------------------------------------------------------------------


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


@pytest.mark.timeout(60)
async def test_send_blocks_when_peer_stops_reading(unix_hub: Hub) -> None:
    """200 MiB of events to a peer that never reads: send() blocks, memory stays bounded."""
    MiB = 1024 * 1024
    raw = _raw_connect(unix_hub.server)
    try:
        raw.sendall(_hello())  # complete the handshake, then never read again
        await unix_hub.rec.wait_until(
            lambda: any(p.remote_hello is not None for p in unix_hub.main.peers), timeout=5.0
        )
        (stalled,) = unix_hub.main.peers
        payload = os.urandom(MiB)
        sent = 0
        peak = base = _rss()

        async def flood() -> None:
            nonlocal sent, peak
            for _ in range(200):
                await stalled.send("blob", payload)
                sent += 1
                peak = max(peak, _rss())

        async def sample() -> None:
            nonlocal peak
            while True:
                peak = max(peak, _rss())
                await asyncio.sleep(0.01)

        sampler = asyncio.ensure_future(sample())
        try:
            with pytest.raises(TimeoutError):
                await asyncio.wait_for(flood(), 3.0)
        finally:
            sampler.cancel()
        peak = max(peak, _rss())
        assert sent < 32, f"{sent} MiB were queued for a peer that reads nothing"
        assert peak - base < 64 * MiB, f"RSS grew by {(peak - base) / MiB:.1f} MiB"
        # The connection is still usable in the other direction.
        assert not stalled.closed
    finally:
        raw.close()


async def test_silent_connection_is_dropped_at_the_hello_deadline(sock_path: str) -> None:
    main = tether.Main(hello_timeout=0.2)
    async with main:
        await main.listen(f"unix://{sock_path}")
        raw = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        raw.connect(sock_path)
        raw.settimeout(3.0)
        t0 = time.monotonic()

        def drain() -> None:
            # main's own HELLO arrives first; then EOF once the deadline passes
            while raw.recv(4096):
                pass

        try:
            await asyncio.to_thread(drain)
        finally:
            raw.close()
        elapsed = time.monotonic() - t0
        assert 0.15 < elapsed < 2.0
        await asyncio.sleep(0)
        assert not main.peers
