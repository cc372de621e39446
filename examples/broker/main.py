"""Chromium's WebSocket broker: a privileged main owns the WebSockets of a sandboxed renderer.

Run: ``python examples/broker/main.py``. Main starts a local WebSocket echo
server (127.0.0.1, port 0), hosts the ``websocket`` route kind through a
broker whose policy allows only that server, and spawns the renderer with
``sandbox=True`` (no network, resource limits, no privileges). Each socket
the renderer opens is a route: main checks the URL, owns the real socket,
relays frames both ways by routing id, and closes the route (SendOrDrop)
when either side fails. Halfway through main stops the echo server; the
renderer sees a clean close and main's host for that socket closes once.
"""

from __future__ import annotations

from renderer import renderer
from websockets.asyncio.server import ServerConnection, serve

import tether
from tether.aio.loop import run
from tether.broker import Policy, WebSocketBroker


async def echo(ws: ServerConnection) -> None:
    async for message in ws:
        await ws.send(message)


async def main() -> None:
    server = await serve(echo, "127.0.0.1", 0)
    port = next(iter(server.sockets)).getsockname()[1]
    broker = WebSocketBroker(Policy(hosts=frozenset({"127.0.0.1"}), ports=frozenset({port})))

    async with tether.Main() as hub:
        broker.install(hub, roles={"child"})

        @hub.handle("stop-echo-server")
        async def stop_echo_server(call: tether.Call) -> None:
            server.close()  # every connection to it is closed (1001 going away)
            await server.wait_closed()
            print("main: echo server stopped", flush=True)

        try:
            child = await hub.spawn(renderer, "127.0.0.1", port, sandbox=True)
        except tether.SandboxError as exc:  # no namespaces here: say so, run without
            print(f"main: {exc}; running with best effort", flush=True)
            box = tether.Sandbox(best_effort=True)
            child = await hub.spawn(renderer, "127.0.0.1", port, sandbox=box)
        code = await child.wait(30.0)  # main prints after: lines from two processes never mix
        applied = child.sandbox.applied if child.sandbox else ()
        print(f"main: renderer was sandboxed: {', '.join(applied)}", flush=True)
        await broker.wait_idle(10.0)
        for host in broker.closed_hosts:
            print(f"main: host of route {host.route.id} closed {host.closes} time(s)", flush=True)
        print(f"main: {broker.refused} URL refused; renderer exited with code {code}", flush=True)


if __name__ == "__main__":
    run(main())
