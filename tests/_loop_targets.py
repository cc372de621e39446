"""Child targets for tests/test_loop.py (module level: the child imports them)."""

from __future__ import annotations

import asyncio

import tether


async def loop_kind(peer: tether.Peer) -> None:
    """Answer ``loop`` with the module of the event loop this async child runs on."""

    def loop(call: tether.Call) -> str:
        return type(asyncio.get_running_loop()).__module__

    peer.handle("loop", loop)
    await peer.wait_closed()
