"""Child targets of the route tests (module level, so every start method can import them)."""

from __future__ import annotations

import asyncio

import tether


async def open_and_wait(peer: tether.Peer, kind: str, start: int) -> None:
    """Open a route of ``kind`` on main, use it once, tell main, wait to be killed or closed."""
    route = await peer.open(kind, start, timeout=20.0)
    total = await route.invoke("add", 1, timeout=20.0)
    await peer.invoke("opened", route.id, total, timeout=20.0)
    await asyncio.wait_for(peer.wait_closed(), 60.0)


async def host_echoer(peer: tether.Peer) -> None:
    """Host the ``echoer`` kind (main opens it); its close() tells main over the route's peer."""

    @peer.host("echoer", roles={"main"})
    class Echoer:
        def __init__(self, route: tether.Route, prefix: str) -> None:
            self.prefix = prefix
            self.route = route

            @route.handle("echo")
            def echo(call: tether.Call, text: str) -> str:
                return prefix + text

            @route.on("poke")
            async def poke(call: tether.Call, n: int) -> None:
                await route.send("poked", n + 1)

        async def close(self) -> None:
            await self.route.peer.send("echoer-closed", self.prefix)

    await asyncio.wait_for(peer.wait_closed(), 60.0)


async def open_many(peer: tether.Peer, n: int) -> None:
    """Open ``n`` counters on main, then one more; report how many opened and what refused it."""
    routes = [await peer.open("counter", i, timeout=20.0) for i in range(n)]
    try:
        await peer.open("counter", n, timeout=20.0)
        refused = ""
    except tether.TetherError as exc:
        refused = f"{type(exc).__name__}: {exc}"
    await peer.invoke("opened", len(routes), refused, timeout=20.0)
    await asyncio.wait_for(peer.wait_closed(), 60.0)
