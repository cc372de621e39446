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
