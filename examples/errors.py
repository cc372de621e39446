"""Every error a caller can get, and how to catch it. Per-call errors keep the connection open."""

import asyncio
import os
import tempfile
from collections.abc import Awaitable

import tether
from tether.aio.loop import run


async def crasher(peer: tether.Peer) -> None:
    peer.handle("crash", lambda call: os._exit(3))  # the child dies in the middle of a call
    await peer.wait_closed()


async def expect(error: type[tether.TetherError], call: Awaitable[object]) -> None:
    try:
        await call
    except error as exc:  # the first line of str(exc) says what happened
        print(f"{error.__name__}: {str(exc).splitlines()[0]}")
    else:
        raise AssertionError(f"expected {error.__name__}")


async def main() -> None:
    folder = tempfile.mkdtemp(prefix="tether-", dir="/tmp")
    async with tether.Main() as hub:  # handlers for a client with role "guest"

        @hub.handle("add")
        def add(call: tether.Call, a: int, b: int) -> int:
            return a + b

        @hub.handle("slow")
        async def slow(call: tether.Call) -> None:
            await asyncio.sleep(60)  # cancelled when the caller gives up

        hub.handle("divide", lambda call, a, b: a / b)
        hub.handle("shutdown", lambda call: None, roles={"admin"})
        await hub.listen(f"unix://{folder}/app.sock", role="guest")

        async with tether.connect(f"unix://{folder}/app.sock", max_frame_size=65536) as peer:
            await expect(tether.RemoteError, peer.invoke("divide", 1, 0))  # the handler raised
            await expect(tether.NoHandler, peer.invoke("no-such-channel"))
            await expect(tether.BadRequest, peer.invoke("add", 1, "two"))  # failed type hints
            await expect(tether.Forbidden, peer.invoke("shutdown"))  # role "guest" may not
            await expect(tether.InvokeTimeout, peer.invoke("slow", timeout=0.2))
            await expect(tether.PayloadTooLarge, peer.invoke("add", "x" * 100_000, 1))  # unsent
        await expect(tether.ConnectionClosed, peer.invoke("add", 1, 2))  # used after close
        await expect(tether.PeerGone, tether.connect(f"unix://{folder}/nobody.sock"))

        child = await hub.spawn(crasher)
        await expect(tether.PeerGone, child.invoke("crash"))  # PeerGone.exitcode is 3
    os.rmdir(folder)  # the server removed its socket file when main closed
    print("every error caught")


if __name__ == "__main__":
    run(main())
