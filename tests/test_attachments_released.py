"""Received attachments are released when their handler ends, without a garbage collection.

A peer's sealed attachments cost main a descriptor and a mapping each while
something refers to them. However an invoke's handler ends (an answer, its
exception, the caller's CANCEL, the peer hanging up or breaking the
protocol), nothing may keep them: not the handler task, not the exception it
ended with (whose traceback holds the handler's frames). With the cyclic
collector off, main's open descriptors must come back to where they were.
"""

from __future__ import annotations

import array
import asyncio
import gc
import os
import socket
from collections.abc import Iterator
from typing import Any

import pytest

import tether
from tether.attachments import MemfdStore
from tether.handles import HANDLES_HIGH
from tether.protocol import Connection
from tether.shm import MAPS_WITHOUT_FD
from tether.wire import HEADER

pytestmark = pytest.mark.timeout(60)

PARTS = 4
INVOKES = 5


@pytest.fixture
def no_gc() -> Iterator[None]:
    gc.collect()
    gc.disable()
    try:
        yield
    finally:
        gc.enable()


def _fds() -> int:
    return len(os.listdir("/proc/self/fd"))


class _Client:
    """A bare protocol core over a blocking unix socket: its attachments go sealed."""

    def __init__(self, path: str) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.connect(path)
        self.sock.settimeout(10)
        self.conn = Connection("client", store=MemfdStore())  # seals, never lends
        self.frames: list[Any] = []
        self._write()
        while self.conn.peer_hello is None:
            self._read()

    def _write(self) -> None:
        data, fds = self.conn.data_to_send()
        if fds:
            anc = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))]
            self.sock.sendmsg([data], anc)
            for fd in fds:
                os.close(fd)
        elif data:
            self.sock.sendall(data)

    def _read(self) -> None:
        data = self.sock.recv(1 << 20)
        if not data:
            raise EOFError
        self.frames += self.conn.receive_data(data)

    def invoke(self, channel: str) -> int:
        parts = tuple(bytes([i]) * (64 << 10) for i in range(PARTS))
        rid = self.conn.send_invoke(channel.encode(), parts, object())
        self._write()
        return rid

    def cancel(self, rid: int) -> None:
        self.conn.send_cancel(rid)
        self._write()

    def answers(self, n: int) -> None:
        while sum(f.request_id != 0 for f in self.frames) < n:
            self._read()


async def _settle(base: int, within: float = 10.0) -> int:
    """Main's open descriptors above ``base`` once they stop falling (bounded)."""
    loop = asyncio.get_running_loop()
    end = loop.time() + within
    while _fds() > base and loop.time() < end:
        await asyncio.sleep(0.02)
    return _fds() - base


@pytest.mark.parametrize("ending", ["answer", "raise", "cancel", "hangup", "protocol error"])
async def test_a_handlers_attachments_are_released_however_it_ends(
    no_gc: None, sock_path: str, ending: str
) -> None:
    started = asyncio.Event()
    async with tether.Main(timeout=30.0) as main:

        @main.handle("hold")
        async def hold(call: tether.Call, *parts: memoryview) -> int:
            assert len(parts) == PARTS and all(len(p) == 64 << 10 for p in parts)
            started.set()
            if ending == "raise":
                raise ValueError("refused")
            if ending != "answer":
                await asyncio.sleep(30)  # until cancelled
            return len(parts)

        await main.listen(f"unix://{sock_path}")
        client = await asyncio.to_thread(_Client, sock_path)
        base = _fds()  # the client's socket, main's side of it
        rids = [client.invoke("hold") for _ in range(INVOKES)]
        await asyncio.wait_for(started.wait(), 10)
        if ending in ("answer", "raise"):
            await asyncio.to_thread(client.answers, INVOKES)
        elif ending == "cancel":
            for rid in rids:
                client.cancel(rid)
        elif ending == "hangup":
            client.sock.close()
            base -= 1
        else:
            client.sock.sendall(HEADER.pack(HEADER.size - 4, 99, 0, 0, 0, 0, 0, 0))
        assert await _settle(base) <= 0, f"{ending}: main holds its descriptors"
        if ending != "hangup":
            client.sock.close()


@pytest.mark.skipif(MAPS_WITHOUT_FD, reason="a mapping keeps no descriptor from Python 3.13 on")
async def test_kept_attachments_pause_their_peer_like_handles(sock_path: str) -> None:
    # Before 3.13 each received sealed attachment the application keeps costs
    # a descriptor: past HANDLES_HIGH of them reading the peer pauses (it is
    # not dropped), and resumes once the application lets them go.
    kept: list[memoryview] = []
    async with tether.Main(timeout=30.0) as main:

        @main.handle("keep")
        def keep(call: tether.Call, *parts: memoryview) -> int:
            kept.extend(parts)
            return len(kept)

        await main.listen(f"unix://{sock_path}")
        client = await asyncio.to_thread(_Client, sock_path)
        per = HANDLES_HIGH // PARTS + 1  # invokes that take main past the mark
        for _ in range(per + 3):
            client.invoke("keep")
        await asyncio.to_thread(client.answers, per)
        (peer,) = main.peers
        assert peer._paused
        assert len(kept) == per * PARTS
        kept.clear()
        await asyncio.to_thread(client.answers, per + 3)
        assert len(kept) == 3 * PARTS
        kept.clear()
        client.sock.close()
