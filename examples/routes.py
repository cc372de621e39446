"""Routes: one host object per routing id, as Chromium's WebSocketDispatcherHost; SendOrDrop."""

from __future__ import annotations

import asyncio
import sys

import tether
from tether.aio.loop import run


def say(line: str) -> None:
    """Print one line in one write: main and the child share stdout."""
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


async def renderer(peer: tether.Peer) -> None:
    """The child: opens routes to hosts that live in main."""
    async with await peer.open("counter", 5) as route:  # main runs Counter(route, 5)
        say(f"child: route {route.id} {route.kind!r}: add(2) = {await route.invoke('add', 2)}")
        changed: asyncio.Queue[int] = asyncio.Queue()
        route.on("changed", lambda call, n: changed.put_nowait(n))
        await route.send("reset")
        say(f"child: counter changed to {await asyncio.wait_for(changed.get(), 10.0)}")
    for kind in ("camera", "admin-panel"):
        try:
            await peer.open(kind)
        except (tether.NoHandler, tether.Forbidden) as exc:
            say(f"child: {type(exc).__name__}: {exc}")
    await peer.open("feed")  # left open: it ends with the connection
    say("child: done")


async def main() -> None:
    feeds: list[Feed] = []

    async with tether.Main(timeout=10.0) as hub:

        @hub.host("counter", roles={"child"})
        class Counter:
            def __init__(self, route: tether.Route, start: int) -> None:
                self.n = start

                @route.handle("add")
                def add(call: tether.Call, k: int) -> int:
                    self.n += k
                    return self.n

                @route.on("reset")
                async def reset(call: tether.Call) -> None:
                    self.n = 0
                    await route.send("changed", self.n)

            async def close(self) -> None:  # exactly once, when the route ends
                say(f"main: counter closed at {self.n}")

        @hub.host("admin-panel", roles={"admin"})
        class AdminPanel:
            def __init__(self, route: tether.Route) -> None: ...

        @hub.host("feed", roles={"child"})
        class Feed:
            def __init__(self, route: tether.Route) -> None:
                self.route = route
                feeds.append(self)

            def close(self) -> None:
                say(f"main: feed {self.route.id} closed")

        child = await hub.spawn(renderer)
        say(f"main: child exited with code {await child.wait(10.0)}")
        await asyncio.wait_for(child.wait_closed(), 10.0)  # its routes ended with it

        # SendOrDrop: relaying to a renderer that is gone drops the route and
        # reports kind, routing id and channel, taken before the send; the
        # Buffer given to the send is consumed whatever happened.
        buf = tether.Buffer(1024)
        try:
            await feeds[0].route.send("frame", buf)
        except tether.RouteClosed as exc:
            say(f"main: RouteClosed: {exc}")
        try:
            buf.view()
        except tether.ConsumedError:
            say("main: the Buffer was consumed by the failed send")


if __name__ == "__main__":
    run(main())
