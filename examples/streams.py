"""Streams: a child's generator yields tokens; main reads them with ``async for``, paced by credit.

Also: leaving the loop early stops the generator (its ``finally`` runs in the
child), an exception in the generator reaches the reader after the items sent
before it, and the blocking API iterates a stream with a plain ``for``.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator, Iterator

import tether
import tether.sync
from tether.aio.loop import run


async def worker(peer: tether.Peer) -> None:
    """The child: three stream handlers, until main closes it."""

    @peer.handle("tokens")
    async def tokens(call: tether.Call, prompt: str) -> AsyncIterator[str]:
        for word in prompt.split():
            await asyncio.sleep(0)  # e.g. waiting for a model
            yield word

    @peer.handle("numbers")
    async def numbers(call: tether.Call) -> AsyncIterator[int]:
        n = 0
        try:
            while True:
                yield n
                n += 1
        finally:  # runs when main stops reading
            await call.peer.send("stopped", n)  # how many it yielded

    @peer.handle("flaky")
    async def flaky(call: tether.Call) -> AsyncIterator[int]:
        yield 1
        yield 2
        raise ValueError("ran out of luck")

    await peer.wait_closed()


async def main() -> None:
    async with tether.Main(timeout=10.0) as hub:
        stopped: asyncio.Queue[int] = asyncio.Queue()
        hub.on("stopped", lambda call, n: stopped.put_nowait(n))

        child = await hub.spawn(worker)
        words = [w async for w in child.stream("tokens", "the quick brown fox", item_type=str)]
        print(f"main: tokens {words}")

        # window: at most 8 items in flight, however slowly we read
        async for n in child.stream("numbers", item_type=int, window=8):
            if n == 99:
                break  # CANCEL: the generator in the child is closed
        made = await asyncio.wait_for(stopped.get(), 10.0)  # sent from its finally
        print(f"child: numbers stopped, at most 8 ahead of main: {made - 100 <= 8}")

        got: list[int] = []
        try:
            async for x in child.stream("flaky"):
                got.append(x)
        except tether.RemoteError as exc:
            print(f"main: got {got}, then {exc.type_name}: {exc.remote_message}")

        # The blocking API, from a plain thread: a for loop.
        server = await hub.listen("tcp://127.0.0.1:0")

        @hub.handle("countdown", roles="client")
        def countdown(call: tether.Call, n: int) -> Iterator[int]:  # a plain generator
            yield from range(n, 0, -1)

        def blocking_client() -> list[int]:
            with tether.sync.connect(str(server.address)) as peer:
                return [x for x in peer.stream("countdown", 3)]

        result: list[list[int]] = []
        t = threading.Thread(target=lambda: result.append(blocking_client()))
        t.start()
        while t.is_alive():
            await asyncio.sleep(0.01)
        print(f"sync client: countdown {result[0]}")
        await child.close()


if __name__ == "__main__":
    run(main())
