"""Child targets for tests/test_broker.py (importable by every start method)."""

from __future__ import annotations

import asyncio
from typing import Any

import tether
from tether.broker import open_websocket


async def echo_client(peer: tether.Peer, url: str, forbidden: str, messages: list[str]) -> None:
    """Refused once, then echo ``messages``; then main stops the server: report how it ended."""
    found: dict[str, Any] = {}
    try:
        await open_websocket(peer, forbidden, timeout=10.0)
    except tether.Forbidden as exc:
        found["forbidden"] = str(exc)
    ws = await open_websocket(peer, url, timeout=10.0)
    found["route"] = ws.route.id
    found["echoes"] = []
    for text in messages:
        await ws.send(text)
    for _ in messages:
        found["echoes"].append(await ws.recv(timeout=10.0))
    await peer.invoke("stop-server", timeout=10.0)  # the real socket dies mid-conversation
    try:
        found["after"] = await ws.recv(timeout=10.0)
    except tether.RouteClosed as exc:
        found["after"] = f"RouteClosed: {exc}"
    try:
        await ws.send("too late", timeout=10.0)
    except tether.RouteClosed:
        found["send_after"] = "RouteClosed"
    found["close_code"] = ws.close_code
    found["route_closed"] = ws.route.closed
    await peer.invoke("report", found, timeout=10.0)


async def open_and_wait(peer: tether.Peer, url: str) -> None:
    """Open ``url``, read one message, tell main, then wait to be killed."""
    ws = await open_websocket(peer, url, timeout=10.0)
    first = await ws.recv(timeout=10.0)
    await peer.invoke("report", {"first": first}, timeout=10.0)
    await asyncio.sleep(60)


async def open_unreachable(peer: tether.Peer, url: str) -> None:
    """Open a URL the policy allows but nothing answers: report the error."""
    try:
        await open_websocket(peer, url, timeout=10.0)
        found = "opened"
    except tether.TetherError as exc:
        found = f"{type(exc).__name__}: {exc}"
    await peer.invoke("report", {"error": found}, timeout=10.0)


async def flood_reader(peer: tether.Peer, url: str) -> None:
    """Start a flood, don't read while main watches it stall, then read it all in order."""
    ws = await open_websocket(peer, url, timeout=10.0)
    await ws.send("go")
    await peer.invoke("flooding", timeout=90.0)  # returns once the server stalled
    count, nbytes = ws.queued
    received, in_order = 0, True
    while (message := await ws.recv(timeout=30.0)) != "end":
        in_order = in_order and message.startswith(f"{received:08d}")
        received += 1
    found = {"queued": count, "queued_bytes": nbytes, "received": received, "in_order": in_order}
    await peer.invoke("report", found, timeout=10.0)
