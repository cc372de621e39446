"""``tether demo``, scenario 4: Chromium's broker, a sandboxed renderer's WebSockets.

Main starts a local WebSocket echo server (127.0.0.1, port 0), hosts the
``websocket`` route kind with a :class:`~tether.broker.WebSocketBroker` whose
policy allows only that server, and spawns a sandboxed renderer
(``sandbox=True``: no network). The renderer:

1. tries to open a TCP socket to the echo server itself, and fails;
2. asks main for ``ws://example.com/``, and is refused with ``Forbidden``
   (main never connects anywhere);
3. asks main for the echo server, sends ``Hola, mundo!`` and gets it back,
   relayed by main on the route's routing id;
4. closes its socket; main's host for it closes the real one, once.

Where the OS refuses the sandbox (no namespaces), the renderer runs with
``best_effort`` and says so instead of step 1's refusal.
"""

from __future__ import annotations

import errno
import socket
from typing import Final

from .aio.main import Main
from .aio.peer import Peer
from .broker import Policy, WebSocketBroker, open_websocket
from .errors import Forbidden
from .sandbox import Sandbox

__all__ = ["FORBIDDEN_URL", "broker_demo", "sandboxed_renderer"]

FORBIDDEN_URL: Final = "ws://example.com/"
_TIMEOUT = 30.0


async def sandboxed_renderer(peer: Peer, host: str, port: int, message: str) -> None:
    """The renderer: no network of its own; every WebSocket goes through main."""
    try:
        with socket.create_connection((host, port), timeout=5.0):
            print(
                "Renderer opening a socket itself: connected (no network sandbox here)", flush=True
            )
    except OSError as exc:
        name = errno.errorcode.get(exc.errno or 0, type(exc).__name__)
        print(f"Renderer opening a socket itself: OSError {name}", flush=True)

    try:
        await open_websocket(peer, FORBIDDEN_URL, timeout=_TIMEOUT)
        print(f"Renderer asked for {FORBIDDEN_URL}: opened?!", flush=True)
    except Forbidden as exc:
        print(f"Renderer asked for {FORBIDDEN_URL}: Forbidden: {exc}", flush=True)

    async with await open_websocket(peer, f"ws://{host}:{port}/", timeout=_TIMEOUT) as ws:
        await ws.send(message)
        echoed = await ws.recv(timeout=_TIMEOUT)
        print(f"Renderer sent {message!r} through the broker, got back {echoed!r}", flush=True)


async def broker_demo(message: str) -> int:
    """Run scenario 4; return the renderer's exit code (0: every step as described)."""
    from websockets.asyncio.server import ServerConnection, serve

    async def echo(ws: ServerConnection) -> None:
        async for data in ws:
            await ws.send(data)

    async with serve(echo, "127.0.0.1", 0) as server:
        port = next(iter(server.sockets)).getsockname()[1]
        broker = WebSocketBroker(Policy(hosts=frozenset({"127.0.0.1"}), ports=frozenset({port})))
        async with Main() as main:
            broker.install(main, roles={"child"})
            child = await main.spawn(
                sandboxed_renderer, "127.0.0.1", port, message, sandbox=Sandbox(best_effort=True)
            )
            code = await child.wait(_TIMEOUT)  # main prints after: lines never mix
            if child.sandbox is not None and child.sandbox.skipped:
                print(f"(sandbox parts refused here: {child.sandbox.skipped})", flush=True)
            await broker.wait_idle(_TIMEOUT)
            closes = [host.closes for host in broker.closed_hosts]
            print(
                f"Main: {broker.refused} URL refused, {len(closes)} socket brokered, "
                f"its host closed {sum(closes)} time(s)",
                flush=True,
            )
            return code
