"""Child targets for tests/test_tracing.py (module-level: children import them by name)."""

from __future__ import annotations

import asyncio

import tether


async def serve(peer: tether.Peer) -> None:
    """Answers ``double`` until main sends ``quit``."""
    done = asyncio.Event()
    peer.handle("double", lambda call, x: 2 * x)
    peer.on("quit", lambda call: done.set())
    await asyncio.wait_for(done.wait(), 60)


async def slow(peer: tether.Peer) -> None:
    """Answers ``double``; ``hang`` never answers (for timeouts and deaths in a trace)."""
    peer.handle("double", lambda call, x: 2 * x)

    async def hang(call: tether.Call) -> None:
        await asyncio.sleep(120)

    peer.handle("hang", hang)
    await asyncio.wait_for(peer.wait_closed(), 120)
