"""A module that imports in main but fails to import in a child started with TETHER_TEST_FAIL=1."""

from __future__ import annotations

import os

import tether

if os.environ.get("TETHER_TEST_FAIL") == "1":
    raise ImportError("simulated: a dependency missing in the child")


async def target(peer: tether.Peer) -> None:
    await peer.wait_closed()
