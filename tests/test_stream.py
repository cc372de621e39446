"""The socket stream under a peer: small per connection, nothing kept after close."""

from __future__ import annotations

import array
import asyncio
import gc
import socket
import tracemalloc
import weakref

import pytest

from tether.aio.stream import READ_SIZE, SocketStream
from tether.errors import ConnectionClosed

pytestmark = pytest.mark.timeout(30)


class Owner:
    """Stands in for a peer: the stream's callbacks are its bound methods."""

    def __init__(self) -> None:
        self.readable = 0
        self.errors: list[OSError] = []

    def on_readable(self) -> None:
        self.readable += 1

    def on_error(self, exc: OSError) -> None:
        self.errors.append(exc)


def _stream(sock: socket.socket, owner: Owner) -> SocketStream:
    return SocketStream(
        sock, asyncio.get_running_loop(), owner.on_readable, owner.on_error, 1 << 20
    )


def _no_fds(fds: array.array[int]) -> None:
    raise AssertionError("no descriptors were sent")


async def test_an_idle_stream_costs_far_less_than_its_read_size() -> None:
    """Reads share one buffer per thread: 200 streams do not cost 200 read buffers."""
    owner = Owner()
    pairs = [socket.socketpair() for _ in range(200)]
    try:
        first, other = socket.socketpair()
        _stream(first, owner).close(ConnectionClosed("x"))  # the thread's buffer is made
        other.close()
        tracemalloc.start()
        try:
            before = tracemalloc.get_traced_memory()[0]
            streams = [_stream(a, owner) for a, _ in pairs]
            for s in streams:
                s.start()
            per_stream = (tracemalloc.get_traced_memory()[0] - before) / len(streams)
        finally:
            tracemalloc.stop()
        assert per_stream < 4096, f"{per_stream:.0f} bytes per idle stream"
        assert per_stream < READ_SIZE / 64
        for s in streams:
            s.close(ConnectionClosed("done"))
    finally:
        for a, b in pairs:
            a.close()
            b.close()


async def test_what_one_read_returned_survives_the_next_read_of_another_stream() -> None:
    owner = Owner()
    (a1, b1), (a2, b2) = socket.socketpair(), socket.socketpair()
    s1, s2 = _stream(a1, owner), _stream(a2, owner)
    try:
        b1.sendall(b"first" * 1000)
        b2.sendall(b"other" * 10)
        got1 = s1.recv(_no_fds)
        got2 = s2.recv(_no_fds)
        assert got1 == b"first" * 1000
        assert got2 == b"other" * 10
        assert s1.recv(_no_fds) is None  # nothing more yet
        b1.close()
        assert s1.recv(_no_fds) == b""  # EOF
    finally:
        s1.close(ConnectionClosed("done"))
        s2.close(ConnectionClosed("done"))
        b2.close()


async def test_a_closed_stream_keeps_no_reference_to_its_owner() -> None:
    """The callbacks are dropped at close: no cycle keeps a closed peer alive."""
    a, b = socket.socketpair()
    owner = Owner()
    stream = _stream(a, owner)
    stream.start()
    ref = weakref.ref(owner)
    gc.disable()
    try:
        stream.close(ConnectionClosed("done"))
        del owner
        assert ref() is None
    finally:
        gc.enable()
        b.close()


async def test_queued_writes_go_out_in_order_and_the_queue_empties() -> None:
    a, b = socket.socketpair()
    owner = Owner()
    stream = _stream(a, owner)
    stream.start()
    chunk = bytes(range(256)) * 4096  # 1 MiB: more than the socket takes at once
    try:
        assert stream.write(bytearray(chunk)) is False
        assert stream.write(bytearray(b"tail")) is False
        assert stream.buffered > 0
        got = bytearray()
        loop = asyncio.get_running_loop()
        b.setblocking(False)
        while len(got) < len(chunk) + 4:
            got += await asyncio.wait_for(loop.sock_recv(b, 1 << 20), 5.0)
        assert bytes(got) == chunk + b"tail"
        await asyncio.wait_for(stream.drain(0), 5.0)
        assert stream.buffered == 0
        assert stream.write(bytearray(b"now")) is True  # an empty queue writes at once
        assert await asyncio.wait_for(loop.sock_recv(b, 16), 5.0) == b"now"
    finally:
        stream.close(ConnectionClosed("done"))
        b.close()
