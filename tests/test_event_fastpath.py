"""Events with one plain listener take a cached fast path in the asyncio peer.

The cache (per channel: listener, decoder, Call) must never serve a stale
listener: it is dropped whenever the registry's listeners, the peer's role
or its ``local`` flag change. What the slow path does (warnings for bad
arguments, a listener that raises) stays the same.
"""

from __future__ import annotations

import asyncio
import logging
import socket
from typing import Any

import pytest

import tether
from tether.registry import Registry


async def _until(cond: Any, timeout: float = 20.0) -> None:
    end = asyncio.get_running_loop().time() + timeout
    while not cond():
        assert asyncio.get_running_loop().time() < end, "timed out waiting"
        await asyncio.sleep(0.005)


def test_plain_listener_only_for_one_plain_reachable_listener() -> None:
    reg = Registry()
    assert reg.plain_listener("ev", "child") is None
    v0 = reg.version

    def a(call: tether.Call, x: int) -> None: ...

    reg.on("ev", a)
    assert reg.version > v0
    found = reg.plain_listener("ev", "child")
    assert found is not None and found[0] is a and found[1](b"\x91\x05") == (5,)
    assert reg.plain_listener("ev", "web", local=False) is None  # not exposed to it
    reg.on("ev", a)
    assert reg.plain_listener("ev", "child") is None  # two: the general path
    reg.remove("ev")
    assert reg.plain_listener("ev", "child") is None

    async def b(call: tether.Call) -> None: ...

    def c(call: tether.Call, data: bytes) -> None: ...

    reg.on("async", b)
    reg.on("buf", c)
    assert reg.plain_listener("async", "child") is None
    assert reg.plain_listener("buf", "child") is None  # buffer hints: decoded the long way


async def test_the_cached_listener_follows_the_registry_and_the_peer(
    caplog: pytest.LogCaptureFixture,
) -> None:
    a, b = socket.socketpair()
    recv = tether.Peer(a, role="main", local_role="child", timeout=10.0)
    send = tether.Peer(b, role="child", local_role="main", timeout=10.0)
    got: list[tuple[str, Any]] = []

    def first(call: tether.Call, x: int) -> None:
        assert call.channel == "ev" and call.request_id == 0 and call.peer is recv
        got.append(("first", x))
        if x == 13:
            raise ValueError("unlucky")

    def second(call: tether.Call, x: int) -> None:
        got.append(("second", x))

    recv.on("ev", first)
    recv.handle("ping", lambda call: "pong", roles="main")
    recv.start()
    send.start()
    try:

        async def sent(*xs: Any) -> None:
            for x in xs:
                await send.send("ev", x)
            assert await send.invoke("ping") == "pong"  # answered after the events ran

        await sent(1, 2)
        assert got == [("first", 1), ("first", 2)]
        recv.on("ev", second)  # a second listener: both hear the next event
        await sent(3)
        assert got[2:] == [("first", 3), ("second", 3)]
        recv.registry.remove("ev")
        recv.on("ev", second)
        await sent(4)
        assert got[4:] == [("second", 4)]
        recv.registry.remove("ev")
        recv.on("ev", first)
        with caplog.at_level(logging.WARNING, logger="tether"):
            await sent("not an int", 13, 14)
        assert got[5:] == [("first", 13), ("first", 14)]  # the bad one dropped, the raise logged
        assert "dropped event on 'ev'" in caplog.text
        assert "listener for 'ev' raised" in caplog.text
        recv.local = False  # a listener without roles= hears local peers only
        await sent(15)
        assert got[7:] == []
        recv.local = True
        await sent(16)
        assert got[7:] == [("first", 16)]
    finally:
        await send.close()
        await recv.close()
