"""What the README's Platforms table says works without Linux's own calls: run with them removed.

Run as a script (``python tests/_platform_probe.py``): it deletes
``os.memfd_create``, ``os.pidfd_open`` and ``socket.SO_PEERCRED`` before
tether is imported, then prints one line per claim.
"""

from __future__ import annotations

import os
import socket
import sys
import tempfile

del os.memfd_create, os.pidfd_open, socket.SO_PEERCRED

import numpy as np  # noqa: E402

import tether  # noqa: E402


async def child(peer: tether.Peer) -> None:
    @peer.handle("size")
    def size(call: tether.Call, data: bytes) -> int:
        return len(data)

    await peer.wait_closed()


async def amain() -> None:
    async with tether.Main(start_method="fork") as main:

        @main.handle("size", roles="client")
        def size(call: tether.Call, data: np.ndarray) -> int:
            return int(data.nbytes)

        tcp = await main.listen("tcp://127.0.0.1:0")
        async with tether.connect(str(tcp.address)) as peer:
            print("tcp large:", await peer.invoke("size", np.zeros(1 << 17), timeout=10.0))
        c = await main.spawn(child)
        print("child small:", await c.invoke("size", b"abc", timeout=10.0))
        try:
            await c.invoke("size", bytes(1 << 20), timeout=10.0)
        except AttributeError as exc:
            print("child large:", type(exc).__name__, "memfd_create" in str(exc))
        address = f"unix://{tempfile.mkdtemp()}/s.sock"
        server = await main.listen(address)
        try:
            async with tether.connect(address, connect_timeout=5.0, timeout=5.0) as peer:
                await peer.invoke("size", np.zeros(1), timeout=5.0)
        except tether.TetherError:
            print("unix refused:", server.refused)
        c.kill()
        print("child exit seen:", await c.wait(10.0))


if __name__ == "__main__":
    tether.run(amain())
    sys.exit(0)
