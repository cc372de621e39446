"""The Electron example's app with a real browser page as the renderer.

main.js:      ipcMain.handle('message-from-renderer', (event, message) => `Received: ${message}`)
renderer.js:  the page here (index.html + renderer.js), talking to this process through tether.js

One step past the original: when a page says it is ready, main invokes a handler
the page registered (``page.title``) and pushes a line the page shows
(``main-status``). Only channels naming role "web" are reachable from the page.

Run it with ``python examples/electron_style/main.py`` or ``tether demo --web``:
it prints the page's address (with this run's secret) on one line and serves
until Ctrl-C (SIGINT) or SIGTERM. ``tether types --ts
examples/electron_style/main.py:main`` writes the page's TypeScript types.
"""

from __future__ import annotations

import asyncio
import os
import signal
import sys
from collections.abc import Callable

import tether
from tether.aio.loop import run

HERE = os.path.dirname(os.path.abspath(__file__))

main = tether.Main()


@main.handle("message-from-renderer", roles={"web"})
async def reply(call: tether.Call, message: str) -> str:
    """The Electron example's ipcMain.handle: answer the page."""
    return f"Received: {message}"


@main.on("page-ready", roles={"web"})
async def page_ready(call: tether.Call) -> None:
    """A page connected: invoke its handler, then push what it said back to it."""
    title = await call.peer.invoke("page.title", timeout=5.0)
    print(f"page connected: role {call.peer.role}, origin {call.peer.origin}", flush=True)
    await call.peer.send(
        "main-status", f"Main invoked page.title: {title!r} (role {call.peer.role})"
    )


async def serve(
    address: str = "ws://127.0.0.1:0", on_url: Callable[[str], None] | None = None
) -> int:
    """Serve the page at ``address`` until SIGINT or SIGTERM; returns the exit code (0).

    ``on_url`` receives the page's address (secret included) once it is served;
    by default it is printed on one line.
    """
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    try:
        async with main:
            server = await main.listen(address, static=HERE)
            if on_url is None:
                print(server.url, flush=True)
            else:
                on_url(server.url)
            await stop.wait()
    finally:
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(sig)
    return 0


if __name__ == "__main__":
    sys.exit(run(serve(*sys.argv[1:2])))
