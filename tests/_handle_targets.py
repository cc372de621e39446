"""Child targets for tests/test_handles.py (importable by name under every start method)."""

from __future__ import annotations

import asyncio
import os
import socket
import tempfile

import tether


async def handle_child(peer: tether.Peer) -> None:
    """Uses the descriptors main sends, and sends some back."""

    @peer.handle("write_pipe")
    def write_pipe(call: tether.Call, h: tether.Handle, data: bytes) -> None:
        with h.open("wb") as f:
            f.write(data)

    @peer.handle("socket_echo")
    def socket_echo(call: tether.Call, h: tether.Handle) -> None:
        with h.socket() as s:
            s.sendall(s.recv(100).upper())

    @peer.handle("read_file")
    def read_file(call: tether.Call, h: tether.Handle) -> str:
        with h.open("r") as f:
            f.seek(0)
            return f.read()

    @peer.handle("pipe_back")
    def pipe_back(call: tether.Call, data: bytes) -> tether.Handle:
        r, w = os.pipe()
        os.write(w, data)
        os.close(w)
        return tether.Handle(r)

    @peer.handle("socket_back")
    def socket_back(call: tether.Call, data: bytes) -> tether.Handle:
        a, b = socket.socketpair()
        with a, b:
            a.sendall(data)
            return tether.Handle.from_socket(b)

    @peer.handle("file_back")
    def file_back(call: tether.Call, text: str) -> tether.Handle:
        with tempfile.TemporaryFile("w+") as f:
            f.write(text)
            f.flush()
            return tether.Handle.from_file(f)

    @peer.handle("slow")
    async def slow(call: tether.Call, h: tether.Handle) -> None:
        await asyncio.sleep(60)

    await peer.wait_closed()


async def direct_child(peer: tether.Peer) -> None:
    """Accepts a direct channel from main; talks to its sibling when asked."""
    siblings: list[tether.Peer] = []

    @peer.on_connect
    def connected(sib: tether.Peer) -> None:
        siblings.append(sib)

        @sib.handle("add")
        def add(call: tether.Call, a: int, b: int) -> int:
            return a + b

        @sib.handle("size")
        def size(call: tether.Call, data: bytes) -> int:
            return len(data)

        @sib.handle("whoami")
        def whoami(call: tether.Call) -> list[object]:
            return [os.getpid(), call.peer.role]

        @sib.handle("write_pipe")
        def write_pipe(call: tether.Call, h: tether.Handle, data: bytes) -> None:
            with h.open("wb") as f:
                f.write(data)

    @peer.handle("ping")
    def ping(call: tether.Call) -> str:
        return "pong"

    @peer.handle("siblings")
    def count(call: tether.Call) -> int:
        return len(siblings)

    @peer.handle("sibling_call")
    async def sibling_call(call: tether.Call) -> str:
        try:
            await siblings[-1].invoke("add", 1, 2, timeout=10)
        except tether.TetherError as exc:
            return type(exc).__name__
        return "answered"

    @peer.handle("hammer")
    async def hammer(call: tether.Call, n: int) -> int:
        sib = siblings[-1]
        total = 0
        for i in range(n):
            total += await sib.invoke("add", i, 1)
        return total

    @peer.handle("big")
    async def big(call: tether.Call, n: int) -> int:
        return int(await siblings[-1].invoke("size", b"x" * n))

    @peer.handle("ask")
    async def ask(call: tether.Call) -> list[object]:
        return [*await siblings[-1].invoke("whoami"), siblings[-1].pid]

    @peer.handle("sibling_gone")
    async def sibling_gone(call: tether.Call) -> str:
        sib = siblings[-1]
        await asyncio.wait_for(sib.wait_closed(), 30)
        try:
            await sib.invoke("add", 1, 2)
        except tether.TetherError as exc:
            return type(exc).__name__
        return "still open"

    await peer.wait_closed()


async def no_connect_child(peer: tether.Peer) -> None:
    """Registers no on_connect: main.connect must fail with NoHandler."""
    await peer.wait_closed()


async def refusing_child(peer: tether.Peer) -> None:
    @peer.on_connect
    def connected(sib: tether.Peer) -> None:
        raise PermissionError("no siblings here")

    await peer.wait_closed()


def direct_child_sync(peer: tether.sync.Peer) -> None:
    """A blocking child on a direct channel: answers its sibling, and asks it."""
    siblings: list[tether.sync.Peer] = []

    @peer.on_connect
    def connected(sib: tether.sync.Peer) -> None:
        siblings.append(sib)

        @sib.handle("add")
        def add(call: tether.sync.Call, a: int, b: int) -> int:
            return a + b

        @sib.handle("whoami")
        def whoami(call: tether.sync.Call) -> list[object]:
            return [os.getpid(), call.peer.role]

    @peer.handle("ask")
    def ask(call: tether.sync.Call) -> list[object]:
        return [*siblings[-1].invoke("whoami"), siblings[-1].pid]

    @peer.handle("read_handle")
    def read_handle(call: tether.sync.Call, h: tether.Handle) -> bytes:
        with h.open("rb") as f:
            return f.read()

    @peer.handle("pipe_to_sibling")
    def pipe_to_sibling(call: tether.sync.Call, data: bytes) -> bytes:
        r, w = os.pipe()
        siblings[-1].invoke("write_pipe", tether.Handle(w), data)
        with open(r, "rb") as f:
            return f.read()

    peer.wait_closed()
