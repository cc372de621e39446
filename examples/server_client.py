"""A main listening on a unix socket and on TCP; clients connect with the async and blocking API.

Any process can connect the same way: here the blocking client runs in a thread.
A same-user unix client reaches every handler; a TCP client is a stranger and
reaches only the handlers that name its role.
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

            @hub.handle("version", roles="client")  # names the role: TCP clients reach it
            def version(call: tether.Call) -> str:
                return f"tether {tether.__version__}"

            await hub.listen(address)  # a private directory: the socket is for this user
            print(f"main: listening on {address}")
            tcp = await hub.listen("tcp://127.0.0.1:0")  # strangers: only what names their role

            async with tether.connect(address) as peer:  # the asyncio client
                print(f"async client: {await peer.invoke('greet', 'async client', timeout=5.0)}")
                await peer.send("log", "async client was here")

            print(f"sync client: {await asyncio.to_thread(blocking_client, address)}")

            async with tether.connect(str(tcp.address)) as remote:  # a TCP client
                print(f"tcp client: {await remote.invoke('version', timeout=5.0)}")
                try:
                    await remote.invoke("greet", "tcp client", timeout=5.0)
                except tether.Forbidden:  # greet names no roles: local peers only
                    print("tcp client: greet is Forbidden")
    finally:
        shutil.rmtree(folder, ignore_errors=True)


if __name__ == "__main__":
    run(main())
