"""A main listening on a unix socket; clients connect with the async and the blocking API.

Any process can connect the same way: here the blocking client runs in a thread.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import tempfile

import tether
from tether.aio.loop import run


def blocking_client(address: str) -> str:
    """What a plain script (no asyncio) does: tether.sync.connect."""
    with tether.sync.connect(address, timeout=5.0) as peer:
        result: str = peer.invoke("greet", "sync client")
        return result


async def main() -> None:
    folder = tempfile.mkdtemp(prefix="tether-", dir="/tmp")
    address = f"unix://{os.path.join(folder, 'app.sock')}"
    try:
        async with tether.Main() as hub:

            @hub.handle("greet")
            def greet(call: tether.Call, who: str) -> str:
                return f"hello, {who} (role {call.peer.role})"

            @hub.on("log")
            def log(call: tether.Call, line: str) -> None:
                print(f"main log: {line}")

            await hub.listen(address)
            print(f"main: listening on {address}")

            async with tether.connect(address) as peer:  # the asyncio client
                print(f"async client: {await peer.invoke('greet', 'async client', timeout=5.0)}")
                await peer.send("log", "async client was here")

            print(f"sync client: {await asyncio.to_thread(blocking_client, address)}")
    finally:
        shutil.rmtree(folder, ignore_errors=True)


if __name__ == "__main__":
    run(main())
