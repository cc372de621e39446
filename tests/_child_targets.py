"""Child targets for tests/test_children.py (module-level: children import them by name)."""

from __future__ import annotations

import os
import sys
import time

import tether
import tether.sync


async def fails_at_once(peer: tether.Peer, message: str) -> None:
    """Raises before its first await: before the connection is up."""
    raise ValueError(message)


def fails_sync(peer: tether.sync.Peer, message: str) -> None:
    """A blocking target that raises at once (its HELLO went out already)."""
    raise KeyError(message)


def report_env(peer: tether.sync.Peer, names: list[str]) -> None:
    """Tell main its working directory and the named environment variables."""
    peer.send("env", os.getcwd(), {n: os.environ.get(n) for n in names})
    peer.wait_closed(30)


def chatter(peer: tether.sync.Peer, lines: int) -> None:
    """Print ``lines`` lines to stdout and one to stderr (once main said go), then wait."""
    peer.invoke("go")
    for i in range(lines):
        print(f"out {i}", flush=True)
    print("err line", file=sys.stderr, flush=True)
    peer.send("printed", lines)
    peer.wait_closed(30)


def idle_sync(peer: tether.sync.Peer, seconds: float) -> None:
    """Wait (blocking) until main closes, at most ``seconds``."""
    deadline = time.monotonic() + seconds
    while not peer.closed and time.monotonic() < deadline:
        time.sleep(0.05)


async def idle_async(peer: tether.Peer) -> None:
    """Wait until main closes."""
    await peer.wait_closed()


def busy_sync(peer: tether.sync.Peer) -> None:
    """Busy in its own code, never reading: only a signal or a kill ends it."""
    while True:
        time.sleep(0.01)


def flood(peer: tether.sync.Peer, lines: int) -> None:
    """Print many lines and exit: main must keep reading, and keep only the last ones."""
    for i in range(lines):
        print(f"line {i:06d} " + "x" * 50)
