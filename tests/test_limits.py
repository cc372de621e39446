"""Per-peer limits (README, "Limits"): each one hit, and what happens then."""

from __future__ import annotations

import array
import asyncio
import fcntl
import os
import socket
import time
from typing import Any

import msgspec
import pytest

import tether
from tether import codec as _codec
from tether.aio import peer as peer_module
from tether.attachments import MemfdStore
from tether.protocol import MAX_UNCLAIMED_FDS, Connection
from tether.wire import ATT, HEADER, MAX_FRAME_FDS, WHERE_FD, Kind

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


async def test_connections_past_max_connections_are_refused_and_counted(
    sock_path: str, caplog: pytest.LogCaptureFixture
) -> None:
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
            assert any("max_connections" in r.getMessage() for r in caplog.records)
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


# -- descriptors and attachment bytes per frame --------------------------------------------


def _memfds(n: int, size: int = 4096, sealed: bool = False) -> list[int]:
    fds = []
    for _ in range(n):
        fd = os.memfd_create("tether-limits", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
        os.ftruncate(fd, size)
        if sealed:
            seals = fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | fcntl.F_SEAL_WRITE
            fcntl.fcntl(fd, fcntl.F_ADD_SEALS, seals | fcntl.F_SEAL_SEAL)
        fds.append(fd)
    return fds


def _is_closed(fd: int) -> bool:
    try:
        os.fstat(fd)
    except OSError:
        return True
    return False


def _stored_pair(**kw: Any) -> tuple[Connection, Connection]:
    a = Connection("main", store=MemfdStore(), **kw)
    b = Connection("child", store=MemfdStore(), **kw)
    b.receive_data(a.data_to_send()[0])
    a.receive_data(b.data_to_send()[0])
    return a, b


def _fd_frame(lengths: list[int]) -> bytes:
    """An EVENT with one descriptor attachment per entry of ``lengths``."""
    refs = [
        msgspec.msgpack.Ext(_codec.EXT_BYTES, i.to_bytes(4, "little")) for i in range(len(lengths))
    ]
    body = _codec.encoder.encode(refs)
    table = b"".join(ATT.pack(WHERE_FD, 0, 0, 0, n) for n in lengths)
    size = HEADER.size - 4 + 1 + len(table) + len(body)
    return HEADER.pack(size, Kind.EVENT, 0, 1, 0, 0, len(lengths), 0) + b"e" + table + body


def test_a_frame_with_more_than_max_frame_fds_descriptors_is_a_protocol_error() -> None:
    assert MAX_FRAME_FDS == MAX_UNCLAIMED_FDS == 16
    a, b = _stored_pair()
    big = [bytes(256 * 1024) for _ in range(MAX_FRAME_FDS + 2)]
    a.send_event(b"e", tuple(big))  # the sender puts 16 in segments, the rest inline
    data, fds = a.data_to_send()
    assert len(fds) == MAX_FRAME_FDS
    b.receive_fds(fds)
    (f,) = b.receive_data(data)  # at the limit: taken
    assert len(f.attachments) == MAX_FRAME_FDS + 2
    del f
    # Seventeen, passed in two writes (each within the per-write limit): the frame is refused.
    more = _memfds(MAX_FRAME_FDS + 1, sealed=True)
    b.receive_fds(more[:9])
    b.receive_fds(more[9:])
    with pytest.raises(tether.ProtocolError, match="17 descriptor attachments"):
        b.receive_data(_fd_frame([4096] * (MAX_FRAME_FDS + 1)))
    assert all(_is_closed(fd) for fd in more)
    a.abort()


def test_more_than_sixteen_descriptors_in_one_write_are_a_protocol_error_and_closed() -> None:
    a, b = _stored_pair()
    fds = _memfds(MAX_UNCLAIMED_FDS + 1, sealed=True)
    with pytest.raises(tether.ProtocolError, match="17 file descriptors in one write"):
        b.receive_fds(fds)
    assert all(_is_closed(fd) for fd in fds)
    a.abort()


def test_descriptor_attachment_bytes_past_max_frame_size_are_a_protocol_error() -> None:
    limit = 1 << 20
    a, b = _stored_pair(max_frame_size=limit)
    fds = _memfds(2, size=limit // 2 + 4096, sealed=True)
    b.receive_fds(fds)
    with pytest.raises(tether.ProtocolError, match="bytes of descriptor attachments"):
        b.receive_data(_fd_frame([limit // 2 + 4096] * 2))  # each fits, both do not
    assert all(_is_closed(fd) for fd in fds)
    a.abort()


def test_inline_attachment_bytes_count_against_max_frame_size() -> None:
    limit = 1 << 20
    a = Connection("main", max_frame_size=limit)  # no descriptors: everything inline
    b = Connection("child", max_frame_size=limit)
    b.receive_data(bytes(a.data_to_send()[0]))
    a.send_event(b"e", (bytes(limit // 2), bytes(limit // 2 - 4096)))
    assert len(b.receive_data(bytes(a.data_to_send()[0]))) == 1  # fits
    with pytest.raises(tether.PayloadTooLarge, match="exceeds"):
        a.send_event(b"e", (bytes(limit // 2), bytes(limit // 2)))
    # A receiver refuses such a frame before reading its body.
    header = HEADER.pack(limit + 1, Kind.EVENT, 0, 1, 0, 0, 1, 0)
    with pytest.raises(tether.ProtocolError, match="exceeds the limit"):
        b.receive_data(header)


async def test_main_drops_a_client_that_passes_seventeen_descriptors_at_once(
    sock_path: str,
) -> None:
    async with tether.Main(timeout=5.0) as main:
        main.handle("echo", lambda call, x: x)
        server = await main.listen(f"unix://{sock_path}")
        raw = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        raw.connect(sock_path)
        try:
            raw.sendall(bytes(Connection("client", store=MemfdStore()).data_to_send()[0]))
            (side,) = await _handshaken(main)
            fds = _memfds(MAX_FRAME_FDS + 1, sealed=True)
            frame = _fd_frame([4096] * len(fds))
            raw.sendmsg([frame], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))])
            for fd in fds:
                os.close(fd)
            await _until(lambda: side.closed, "main kept a client that broke the fd limit")
            async with tether.connect(str(server.address)) as good:  # others unaffected
                assert await good.invoke("echo", 1) == 1
        finally:
            raw.close()


async def test_an_invoke_to_a_stalled_peer_raises_peer_gone_and_leaves_nothing_unretrieved(
    sock_path: str, caplog: pytest.LogCaptureFixture
) -> None:
    import gc

    async with tether.Main(timeout=5.0, max_queued=MiB, drain_timeout=None) as main:
        server = await main.listen(f"unix://{sock_path}")
        raw = _raw(str(server.address.path))
        try:
            (side,) = await _handshaken(main)
            blob = bytes(256 * 1024)
            calls = [side.invoke("x", blob, timeout=None) for _ in range(40)]
            async with asyncio.timeout(10.0):
                got = await asyncio.gather(*calls, return_exceptions=True)
            assert all(isinstance(e, tether.PeerGone) for e in got)
            assert any("stopped reading" in str(e) for e in got)
        finally:
            raw.close()
    gc.collect()
    await asyncio.sleep(0)
    assert not [r for r in caplog.records if "never retrieved" in r.getMessage()]
    assert any("stopped reading" in r.getMessage() for r in caplog.records)  # logged
