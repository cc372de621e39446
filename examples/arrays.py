"""Large arrays cross without pickling: attachments, lent segments and tether.Buffer.

Run: python examples/arrays.py
"""

from __future__ import annotations

import asyncio

import numpy as np

import tether


async def analyst(peer: tether.Peer) -> None:  # runs in the child
    @peer.handle("stats")
    def stats(call: tether.Call, frame: np.ndarray) -> list[float]:
        # `frame` is read-only and maps main's pages: nothing was copied to get here
        return [float(frame.mean()), float(frame.max()), float(frame.flags.writeable)]

    @peer.handle("checksum")
    def checksum(call: tether.Call, data: memoryview) -> int:  # the view: no copy
        return int(np.frombuffer(data, np.uint8).sum(dtype=np.uint64))

    await peer.wait_closed()


async def main() -> None:
    async with tether.Main() as hub:
        child = await hub.spawn(analyst)

        frame = np.arange(1_000_000, dtype=np.float32).reshape(1000, 1000)
        mean, top, writeable = await child.invoke("stats", frame)
        print(f"stats of a 4 MB array: mean {mean:.1f}, max {top:.0f}, writeable {writeable}")

        # A producer fills shared memory in place, then hands the pages over.
        buf = tether.Buffer(64 << 20)
        buf.array(np.uint8)[:] = 1
        print(f"checksum of a 64 MiB Buffer: {await child.invoke('checksum', buf)}")
        try:
            buf.view()
        except tether.ConsumedError:
            print("the sent Buffer is gone from main: ConsumedError")


if __name__ == "__main__":
    asyncio.run(main())
