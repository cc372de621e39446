"""tether over a real nats-server (started per module on a free loopback port)."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator

import pytest

import tether
from tether import Main

from _nats_server import NatsServer, running

pytestmark = pytest.mark.timeout(120)


@pytest.fixture(scope="module")
def nats() -> Iterator[NatsServer]:
    with running() as server:
        yield server


async def test_invoke_and_events_both_ways(nats: NatsServer) -> None:
    url = f"{nats.url}/t1"
    async with Main() as main:
        got: list[str] = []

        @main.handle("add", roles="nats")
        async def add(call: tether.Call, a: int, b: int) -> int:
            return await call.peer.invoke("twice", a + b)

        @main.on("note", roles="nats")
        def note(call: tether.Call, text: str) -> None:
            got.append(text)

        await main.listen(url)
        async with tether.connect(url) as peer:

            @peer.handle("twice")
            def twice(call: tether.Call, x: int) -> int:
                return 2 * x

            assert await peer.invoke("add", 2, 3) == 10
            await peer.send("note", "hi")
            with pytest.raises(tether.NoHandler):
                await peer.invoke("nothing")
            for _ in range(200):
                if got:
                    break
                await asyncio.sleep(0.01)
            assert got == ["hi"]
