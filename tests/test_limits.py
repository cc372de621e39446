"""Per-peer limits (README, "Limits"): each one hit, and what happens then."""

from __future__ import annotations

import asyncio
import socket
import time

import pytest

import tether
from tether.aio import peer as peer_module
from tether.protocol import Connection

MiB = 1 << 20


def _hello() -> bytes:
    return bytes(Connection("client").data_to_send()[0])


def _raw(path: str, hello: bool = True) -> socket.socket:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.connect(path)
    if hello:
        s.sendall(_hello())
    return s


async def _until(cond: object, what: str, limit: float = 10.0) -> None:
    deadline = time.monotonic() + limit
    while not cond():  # type: ignore[operator]
        assert time.monotonic() < deadline, what
        await asyncio.sleep(0.005)


async def _handshaken(main: tether.Main, n: int = 1) -> list[tether.Peer]:
    await _until(
        lambda: sum(p.remote_hello is not None for p in main.peers) >= n,
        "the raw clients never completed their handshake",
    )
    return [p for p in main.peers if p.remote_hello is not None]


# -- max_inflight ------------------------------------------------------------------------


async def test_invokes_past_max_inflight_get_busy_at_once(sock_path: str) -> None:
    async with tether.Main(timeout=10.0, max_inflight=4) as main:
        gate = asyncio.Event()

        @main.handle("wait")
        async def wait(call: tether.Call, i: int) -> int:
            await gate.wait()
            return i

        @main.handle("quick")
        def quick(call: tether.Call) -> str:  # answered inline: never counted
            return "ok"

        server = await main.listen(f"unix://{sock_path}")
        async with tether.connect(str(server.address), timeout=10.0) as client:
            running = [asyncio.ensure_future(client.invoke("wait", i)) for i in range(4)]
            (side,) = main.peers
            await _until(lambda: len(side._serving) == 4, "the four handlers never started")
            t0 = time.monotonic()
            with pytest.raises(tether.Busy, match="4 invokes"):
                await client.invoke("wait", 99)
            assert time.monotonic() - t0 < 1.0  # refused at once, not queued
            assert await client.invoke("quick") == "ok"
            gate.set()
            assert await asyncio.gather(*running) == [0, 1, 2, 3]
            assert await client.invoke("wait", 5) == 5  # room again
            assert not client.closed


def test_max_inflight_and_max_queued_are_checked_on_main() -> None:
    with pytest.raises(ValueError, match="max_inflight"):
        tether.Main(max_inflight=0)
    with pytest.raises(TypeError, match="max_queued"):
        tether.Main(max_queued=1.5)  # type: ignore[arg-type]
    main = tether.Main()
    assert main.max_inflight == peer_module.MAX_INFLIGHT == 1024
    assert main.max_queued == peer_module.MAX_QUEUED == 64 * MiB


# -- max_queued --------------------------------------------------------------------------


async def test_a_peer_that_never_reads_is_dropped_and_the_sender_sees_peer_gone(
    sock_path: str,
) -> None:
    async with tether.Main(timeout=5.0, max_queued=MiB) as main:
        server = await main.listen(f"unix://{sock_path}")
        raw = _raw(str(server.address.path))
        try:
            (side,) = await _handshaken(main)
            blob = bytes(256 * 1024)
            sent = 0
            with pytest.raises(tether.PeerGone, match="stopped reading"):
                async with asyncio.timeout(10.0):  # never blocks for good
                    while True:
                        await side.send("blob", blob)
                        sent += 1
            assert side.closed
            # What main held for it stayed near the flow-control mark, then was freed.
            assert sent * len(blob) < peer_module.HIGH_WATER + 2 * MiB
            assert side._stream.buffered == 0
            await _until(lambda: side not in main.peers, "the dropped peer stayed in main.peers")
            with pytest.raises(tether.PeerGone):
                await side.send("blob", b"x")
        finally:
            raw.close()


async def test_a_lone_sender_to_a_stalled_peer_waits_at_most_drain_timeout(sock_path: str) -> None:
    """Under max_queued, one sender waits at the flow-control mark: not forever."""
    async with tether.Main(timeout=5.0, drain_timeout=0.5) as main:
        assert main.max_queued == 64 * MiB
        server = await main.listen(f"unix://{sock_path}")
        raw = _raw(str(server.address.path))
        try:
            (side,) = await _handshaken(main)
            blob = bytes(256 * 1024)
            with pytest.raises(tether.PeerGone, match="stopped reading"):
                async with asyncio.timeout(10.0):
                    while True:
                        await side.send("blob", blob)
            t0 = time.monotonic()
            assert side.closed
            await _until(lambda: side not in main.peers, "the dropped peer stayed in main.peers")
            assert time.monotonic() - t0 < 1.0
        finally:
            raw.close()


async def test_a_slow_reader_within_drain_timeout_is_kept(sock_path: str) -> None:
    async with tether.Main(timeout=5.0, drain_timeout=2.0) as main:
        server = await main.listen(f"unix://{sock_path}")
        raw = _raw(str(server.address.path))
        got = 0
        stop = False

        def read_slowly() -> None:
            nonlocal got
            raw.settimeout(0.1)
            while not stop:
                try:
                    data = raw.recv(1 << 20)
                except TimeoutError:
                    continue
                if not data:
                    return
                got += len(data)
                time.sleep(0.01)

        try:
            (side,) = await _handshaken(main)
            reader = asyncio.ensure_future(asyncio.to_thread(read_slowly))
            blob = bytes(256 * 1024)
            for _ in range(40):  # 10 MiB: the sender waits for the reader, several times
                await side.send("blob", blob)
            await asyncio.wait_for(side._wait_drained(0), 10.0)
            assert not side.closed
            assert got > 8 * MiB
            stop = True
            await asyncio.wait_for(reader, 5.0)
        finally:
            raw.close()


async def test_many_senders_to_a_stalled_peer_hold_at_most_max_queued(sock_path: str) -> None:
    """Each sender adds a frame before it waits: max_queued bounds what they add up to."""
    limit = 8 * MiB
    async with tether.Main(timeout=5.0, max_queued=limit) as main:
        server = await main.listen(f"unix://{sock_path}")
        raw = _raw(str(server.address.path))
        try:
            (side,) = await _handshaken(main)
            blob = bytes(256 * 1024)
            peak = 0

            async def sender() -> None:
                nonlocal peak
                while True:
                    await side.send("blob", blob)
                    peak = max(peak, side._stream.buffered + side._conn.buffered_out)

            tasks = [asyncio.ensure_future(sender()) for _ in range(64)]
            done, _ = await asyncio.wait(tasks, timeout=10.0)
            assert len(done) == 64, "senders still blocked on a stalled peer"
            for t in tasks:
                assert isinstance(t.exception(), tether.PeerGone)
            assert peak <= limit + len(blob) + 1024
            assert side.closed
        finally:
            raw.close()


# -- max_connections and max_handshaking ---------------------------------------------------


def _closed_by_main(s: socket.socket, limit: float = 5.0) -> bool:
    """Whether main closed ``s`` (EOF or reset) within ``limit`` seconds; reads what came."""
    s.settimeout(limit)
    try:
        while s.recv(65536):
            pass
    except ConnectionResetError:
        return True
    except TimeoutError:
        return False
    return True


async def test_connections_past_max_connections_are_refused_and_counted(sock_path: str) -> None:
    async with tether.Main(timeout=5.0) as main:
        main.handle("echo", lambda call, x: x)
        server = await main.listen(f"unix://{sock_path}", max_connections=2)
        assert server.refused == 0
        async with (
            tether.connect(str(server.address)) as a,
            tether.connect(str(server.address)) as b,
        ):
            extra = _raw(sock_path)
            try:
                assert await asyncio.to_thread(_closed_by_main, extra)
            finally:
                extra.close()
            assert server.refused == 1
            with pytest.raises(tether.PeerGone):
                await tether.connect(str(server.address), connect_timeout=2.0)
            assert server.refused == 2
            assert await a.invoke("echo", 1) == 1  # those held are unaffected
            assert await b.invoke("echo", 2) == 2
            await a.close()
            await _until(lambda: len(main.peers) == 1, "main still holds the closed peer")
        async with tether.connect(str(server.address)) as c:  # room again
            assert await c.invoke("echo", 3) == 3
        assert server.refused == 2


async def test_past_max_handshaking_the_oldest_in_the_handshake_is_dropped(
    sock_path: str,
) -> None:
    async with tether.Main(timeout=5.0, hello_timeout=30.0) as main:
        main.handle("echo", lambda call, x: x)
        server = await main.listen(f"unix://{sock_path}", max_handshaking=3)
        silent = [_raw(sock_path, hello=False) for _ in range(3)]
        try:
            await _until(lambda: len(main.peers) == 3, "main never accepted the silent three")
            async with tether.connect(str(server.address)) as good:  # the fourth: room is made
                assert await good.invoke("echo", 1) == 1
                assert server.handshakes_dropped == 1
                assert await asyncio.to_thread(_closed_by_main, silent[0])  # the oldest went
                assert not await asyncio.to_thread(_closed_by_main, silent[1], 0.2)
                # The peer that finished its handshake no longer counts: one more silent
                # connection fits (silent 1, 2 and it), the next pushes out silent 1 only.
                silent.append(_raw(sock_path, hello=False))
                await _until(lambda: len(main.peers) == 4, "main never accepted it")
                assert server.handshakes_dropped == 1
                silent.append(_raw(sock_path, hello=False))
                await _until(lambda: server.handshakes_dropped == 2, "no room was made")
                assert await asyncio.to_thread(_closed_by_main, silent[1])
                assert not await asyncio.to_thread(_closed_by_main, silent[2], 0.2)
                assert await good.invoke("echo", 2) == 2
                assert server.refused == 0
        finally:
            for s in silent:
                s.close()


async def test_listen_checks_its_limits(sock_path: str) -> None:
    async with tether.Main() as main:
        with pytest.raises(ValueError, match="max_connections"):
            await main.listen(f"unix://{sock_path}", max_connections=0)
        with pytest.raises(TypeError, match="max_handshaking"):
            await main.listen(f"unix://{sock_path}", max_handshaking="3")  # type: ignore[arg-type]
        server = await main.listen(f"unix://{sock_path}")
        assert (server.max_connections, server.max_handshaking) == (4096, 256)


# -- max_inflight in the blocking layer ------------------------------------------------------


def test_the_blocking_peer_answers_busy_past_max_inflight() -> None:
    import threading

    sa, sb = socket.socketpair()
    a = tether.sync.Peer(sa, role="client", name="a", timeout=10.0)
    b = tether.sync.Peer(sb, role="client", name="b", timeout=10.0, max_inflight=3)
    gate = threading.Event()
    started = threading.Event()
    try:

        @b.handle("wait")
        def wait(call: tether.Call, i: int) -> int:
            started.set()
            assert gate.wait(10.0)
            return i

        results: dict[int, object] = {}

        def call(i: int) -> None:
            try:
                results[i] = a.invoke("wait", i)
            except tether.TetherError as exc:
                results[i] = exc

        first = threading.Thread(target=call, args=(0,))
        first.start()
        assert started.wait(5.0)  # 0 runs: it no longer waits in the queue
        queued = [threading.Thread(target=call, args=(i,)) for i in (1, 2, 3)]
        for t in queued:
            t.start()
        deadline = time.monotonic() + 5.0
        while b._inflight < 3:
            assert time.monotonic() < deadline, "the three invokes never queued"
            time.sleep(0.005)
        t0 = time.monotonic()
        with pytest.raises(tether.Busy, match="3 invokes"):
            a.invoke("wait", 4)
        assert time.monotonic() - t0 < 1.0
        gate.set()
        for t in (first, *queued):
            t.join(10.0)
        assert results == {0: 0, 1: 1, 2: 2, 3: 3}
        assert a.invoke("wait", 5) == 5  # room again
    finally:
        gate.set()
        a.close()
        b.close()
