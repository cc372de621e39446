"""Main and a spawned child: invoke both ways, events both ways, a timeout."""

from __future__ import annotations

import asyncio

import tether
from tether.aio.loop import run


async def worker(peer: tether.Peer, name: str) -> None:
    done = asyncio.Event()  # runs in the child; handlers registered before the first await

    @peer.handle("compute")
    def compute(call: tether.Call, x: int) -> int:
        return 2 * x

    @peer.handle("slow")
    async def slow(call: tether.Call) -> None:
        await asyncio.sleep(60)  # cancelled when main's invoke times out

    @peer.on("theme")
    def theme(call: tether.Call, value: str) -> None:
        print(f"child: theme is now {value}", flush=True)
        done.set()

    print(f"child: got settings {await peer.invoke('settings', name)}", flush=True)  # child -> main
    await peer.send("progress", 100)  # child -> main event
    await asyncio.wait_for(done.wait(), 30.0)


async def main() -> None:
    async with tether.Main(timeout=10.0) as hub:
        progress: asyncio.Queue[int] = asyncio.Queue()

        @hub.handle("settings")
        def settings(call: tether.Call, name: str) -> dict[str, str]:
            return {"name": name, "mode": "fast"}

        @hub.on("progress")
        def on_progress(call: tether.Call, percent: int) -> None:
            progress.put_nowait(percent)

        child = await hub.spawn(worker, "w1")
        print(f"main: child progress {await asyncio.wait_for(progress.get(), 10.0)}%")
        print(f"main: compute(21) = {await child.invoke('compute', 21)}")  # main -> child
        try:
            await child.invoke("slow", timeout=0.2)
        except tether.InvokeTimeout as exc:  # the child's handler is cancelled too
            print(f"main: InvokeTimeout: {exc}")
        await child.send("theme", "dark")  # main -> child event; the child then ends
        print(f"main: child exited with code {await child.wait(10.0)}")


if __name__ == "__main__":
    run(main())
