"""The sandboxed renderer of examples/broker/main.py: no network, WebSockets through main.

Runs in a child started with ``sandbox=True``. It proves it cannot open a
socket itself, then asks main (the broker) for WebSockets: one the policy
refuses, and one to main's echo server, which it talks to until the server
goes away.
"""

from __future__ import annotations

import errno
import socket

import tether
from tether.broker import open_websocket


async def renderer(peer: tether.Peer, host: str, port: int) -> None:
    try:
        socket.create_connection((host, port), timeout=5.0).close()
        print("renderer: opened a socket itself (no network sandbox here)", flush=True)
    except OSError as exc:
        print(f"renderer: own socket refused: {errno.errorcode.get(exc.errno or 0)}", flush=True)

    try:
        await open_websocket(peer, "ws://example.com/")
    except tether.Forbidden as exc:
        print(f"renderer: ws://example.com/ is Forbidden: {exc}", flush=True)

    ws = await open_websocket(peer, f"ws://{host}:{port}/echo")
    print(f"renderer: websocket open on route {ws.route.id}", flush=True)
    for text in ("Hola, mundo!", "second message"):
        await ws.send(text)
        print(f"renderer: echoed {await ws.recv(timeout=10.0)!r}", flush=True)
    await peer.invoke("stop-echo-server", timeout=10.0)  # main kills the server mid-conversation
    try:
        await ws.send("anyone there?")
        print(f"renderer: echoed {await ws.recv(timeout=10.0)!r}", flush=True)
    except tether.RouteClosed:
        pass
    try:
        await ws.recv(timeout=10.0)
    except tether.RouteClosed:
        print(f"renderer: socket closed cleanly (code {ws.close_code})", flush=True)
