"""Handlers that leave the event loop: thread=True, call.cancelled, call.send; bytes by hint."""

from __future__ import annotations

import asyncio
import time

import tether
from tether.aio.loop import run


def crunch(call: tether.Call, n: int) -> int:
    """CPU-bound: runs on a worker thread, reports progress, stops if the caller gives up."""
    total = 0
    for i in range(n):
        if i % (n // 4) == 0:
            call.send("progress", 100 * i // n)  # reaches main before the result, in order
            if call.cancelled:
                return -1
        total += i * i
    return total


def wait_for_cancel(call: tether.Call) -> None:
    while not call.cancelled:  # set by main's timeout (a CANCEL frame)
        time.sleep(0.01)
    call.send("stopped", "the thread saw call.cancelled and stopped")


async def worker(peer: tether.Peer) -> None:  # in the child
    peer.handle("crunch", crunch, thread=True)
    peer.handle("wait-for-cancel", wait_for_cancel, thread=True)

    @peer.handle("reverse")
    def reverse(call: tether.Call, data: bytes) -> bytes:  # bytes at every size
        return data[::-1]

    await peer.wait_closed()


async def main() -> None:
    async with tether.Main(timeout=10.0) as hub:
        stopped: asyncio.Queue[str] = asyncio.Queue()

        @hub.on("progress")
        def progress(call: tether.Call, percent: int) -> None:
            print(f"main: progress {percent}%")

        @hub.on("stopped")
        def on_stopped(call: tether.Call, why: str) -> None:
            stopped.put_nowait(why)

        child = await hub.spawn(worker)
        print(f"main: crunch = {await child.invoke('crunch', 400_000)}")
        try:
            await child.invoke("wait-for-cancel", timeout=0.2)
        except tether.InvokeTimeout:
            print(f"main: child: {await asyncio.wait_for(stopped.get(), 10.0)}")
        data = await child.invoke("reverse", bytes(range(256)) * 4096, result_type=bytes)
        print(f"main: got {type(data).__name__} of {len(data)} bytes back")  # 1 MiB: still bytes


if __name__ == "__main__":
    run(main())
