"""Child targets and a main script for tests/test_hub.py (importable by every start method)."""

from __future__ import annotations

import asyncio
import os
import signal
import sys
import tempfile

import tether


async def listener(peer: tether.Peer, tag: str) -> None:
    """Record each ``news`` event, answer ``heard`` with them; live until main closes."""
    heard: list[str] = []

    @peer.on("news")
    def news(call: tether.Call, text: str) -> None:
        heard.append(f"{tag}:{text}")

    @peer.handle("heard")
    def get(call: tether.Call) -> list[str]:
        return heard

    await peer.wait_closed()


async def exit_with(peer: tether.Peer, code: int) -> None:
    """Exit with ``code`` once connected (a target failing before its first await fails spawn)."""
    await asyncio.sleep(0.2)
    sys.exit(code)


async def live_until_closed(peer: tether.Peer) -> None:
    """Run until main says goodbye (then return: exit code 0)."""
    await peer.wait_closed()


async def _serve(mode: str) -> int:
    async with tether.Main(close_timeout=10.0) as main:
        child = await main.spawn(live_until_closed)
        address = f"unix://{tempfile.mkdtemp()}/s.sock"
        await main.listen(address)
        print(f"child {child.pid}", flush=True)
        if mode == "serve":
            serving = asyncio.ensure_future(main.serve_forever())
            await asyncio.sleep(0)  # its first step installs the signal handlers
            print("ready", flush=True)
            got = await serving
            print(f"stopped by {signal.Signals(got).name if got else None}", flush=True)
            print(f"child exit {await child.wait(10.0)}", flush=True)
            print(f"socket gone {not os.path.exists(address[len('unix://') :])}", flush=True)
            return 0
        print("ready", flush=True)
        await asyncio.sleep(3600)  # mode "sleep": only Ctrl-C ends it
        return 5


def main_script(mode: str) -> None:
    """A whole main program: ``serve`` awaits serve_forever, ``sleep`` waits for Ctrl-C."""
    sys.exit(tether.run(_serve(mode)))


async def exit_before_hello(peer: tether.Peer) -> None:
    """Exit before the first await: the child never says hello (spawn fails)."""
    os._exit(4)
