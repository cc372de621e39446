"""A direct channel between two children: main.connect, then they talk without main."""

from __future__ import annotations

import os

import tether
from tether.aio.loop import run


async def worker(peer: tether.Peer) -> None:  # in each child
    siblings: list[tether.Peer] = []

    @peer.on_connect  # main.connect(...) hands this child a Peer for the other one
    def connected(sibling: tether.Peer) -> None:
        siblings.append(sibling)

        @sibling.handle("add")  # register before the first await: nothing is missed
        def add(call: tether.Call, a: int, b: int) -> int:
            return a + b

        @sibling.handle("pid")
        def pid(call: tether.Call) -> int:
            return os.getpid()

    @peer.handle("sum-with-sibling")
    async def sum_with_sibling(call: tether.Call, n: int) -> int:
        total = 0
        for i in range(n):  # each invoke goes straight to the sibling
            total = await siblings[0].invoke("add", total, i)
        return total

    @peer.handle("sibling-pid")
    async def sibling_pid(call: tether.Call) -> int:
        return int(await siblings[0].invoke("pid"))

    @peer.handle("check-sibling")
    async def check_sibling(call: tether.Call) -> str:
        await siblings[0].wait_closed()
        return f"sibling {type(siblings[0].close_reason).__name__}"

    await peer.wait_closed()


async def main() -> None:
    async with tether.Main(timeout=10.0) as hub:
        a = await hub.spawn(worker, name="a")
        b = await hub.spawn(worker, name="b")
        await hub.connect(a, b)  # a socketpair, one end to each
        print(f"main: a's sibling is b: {await a.invoke('sibling-pid') == b.pid}")
        print(f"main: a summed 0..9999 through b: {await a.invoke('sum-with-sibling', 10_000)}")
        b.kill()
        print(f"main: a says {await a.invoke('check-sibling')}")  # a's link to main is up
        print(f"main: b exited: {await b.wait(10.0) != 0}")


if __name__ == "__main__":
    run(main())
