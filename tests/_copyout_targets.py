"""Child targets for tests/test_copyout.py (module-level: children import them by name)."""

from __future__ import annotations

import contextlib
import threading
from typing import Any

import numpy as np

import tether
import tether.sync
from tether.attachments import MemfdStore


def _store(peer: Any) -> MemfdStore:
    store = peer._conn.store
    assert isinstance(store, MemfdStore)
    return store


async def lender(peer: tether.Peer) -> None:
    """Returns arrays main asked for, and tells main about its pool."""

    @peer.handle("give")
    def give(call: tether.Call, n: int, value: int) -> Any:
        return np.full(n, value, np.uint8)

    @peer.handle("pool")
    def pool(call: tether.Call) -> dict[str, int]:
        st = _store(call.peer)
        return {"idle": st.idle_segments, "out": st.leases_out, "lent_bytes": st._lent_bytes}

    @peer.handle("flood")
    async def flood(call: tether.Call, count: int, n: int) -> int:
        for i in range(count):
            await call.peer.send("blob", np.full(n, i % 251, np.uint8))
        return count

    await peer.wait_closed()


async def scribbler(peer: tether.Peer) -> None:
    """A hostile child: a thread keeps writing into every segment it lends, even after sending."""
    store = _store(peer)
    stop = threading.Event()

    def scribble() -> None:
        value = 0
        while not stop.is_set():
            value = (value + 1) % 256
            segs = list(store._leases.values())
            for free in list(store._pool._free.values()):
                segs += list(free)
            for seg in segs:
                with contextlib.suppress(ValueError):  # closed meanwhile
                    seg.map[: seg.size] = bytes([value]) * seg.size
            stop.wait(0.001)

    @peer.handle("give")
    def give(call: tether.Call, n: int, value: int) -> Any:
        return np.full(n, value, np.uint8)

    thread = threading.Thread(target=scribble, daemon=True)
    thread.start()
    try:
        await peer.wait_closed()
    finally:
        stop.set()
        thread.join(5.0)


def blocking_lender(peer: tether.sync.Peer, n: int, count: int) -> None:
    """A blocking child: sends ``count`` arrays to main as events, then waits to be closed."""
    for i in range(count):
        peer.send("blob", np.full(n, i, np.uint8))
    peer.wait_closed(30)
