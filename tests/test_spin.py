"""Low-latency mode (``spin``): same behaviour, answered without sleeping."""

from __future__ import annotations

import asyncio

import pytest

import tether


async def spin_child(peer: tether.Peer) -> None:
    @peer.handle("double")
    def double(call: tether.Call, x: int) -> int:
        return 2 * x

    @peer.handle("slow_double")
    async def slow_double(call: tether.Call, x: int) -> int:
        await asyncio.sleep(0.001)
        return 2 * x

    @peer.handle("ask_main")
    async def ask_main(call: tether.Call, x: int) -> int:
        return int(await call.peer.invoke("triple", x)) + 1

    await peer.wait_closed()


@pytest.mark.timeout(60)
async def test_spinning_main_and_child_answer_every_kind_of_call() -> None:
    main = tether.Main(spin=0.0005)
    seen: list[int] = []

    @main.handle("triple")
    def triple(call: tether.Call, x: int) -> int:
        return 3 * x

    @main.on("seen")
    def on_seen(call: tether.Call, x: int) -> None:
        seen.append(x)

    async with main:
        child = await main.spawn(spin_child)
        assert child.spin == 0.0005
        for i in range(200):
            assert await child.invoke("double", i) == 2 * i
        # async handlers are not starved by the poll loop
        for i in range(50):
            assert await child.invoke("slow_double", i) == 2 * i
        # nested: the child invokes main while main waits on the child
        assert await child.invoke("ask_main", 5) == 16
        results = await asyncio.gather(*(child.invoke("double", i) for i in range(500)))
        assert results == [2 * i for i in range(500)]
        with pytest.raises(tether.InvokeTimeout):
            await child.invoke("slow_double", 1, timeout=0.0)


def test_sync_spin_is_configurable() -> None:
    import socket

    a, b = socket.socketpair()
    try:
        peer = tether.sync.Peer(a, spin=0.0)
        assert peer.spin == 0.0
        peer.close()
    finally:
        b.close()
