"""tether.js under Node: its unit tests (``node --test tests/js/``), and a live page.

Skipped when ``node`` is not on the path. The live test runs tether.js with
Node's WebSocket (built in from Node 22; ``--experimental-websocket`` on
Node 20) against a real ``ws://`` listener: the protocol's second
implementation talking to the first, without a browser.
"""

from __future__ import annotations

import asyncio
import json
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest

import tether

JS = Path(__file__).parent / "js"
NODE = shutil.which("node")
pytestmark = pytest.mark.skipif(NODE is None, reason="node is not on the path")


def test_node_unit_tests() -> None:
    assert NODE is not None
    run = subprocess.run(
        [NODE, "--test", *sorted(str(p) for p in JS.glob("*.test.mjs"))],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-2000:]
    assert "# fail 0" in run.stdout


def _node_websocket_flags() -> list[str]:
    """The flags that give this Node a global WebSocket (none from Node 22 on)."""
    assert NODE is not None
    for flags in ([], ["--experimental-websocket"]):
        probe = subprocess.run(
            [NODE, *flags, "-e", "process.exit(typeof WebSocket === 'function' ? 0 : 1)"],
            capture_output=True,
            timeout=30,
        )
        if probe.returncode == 0:
            return flags
    pytest.skip("this node has no WebSocket")


async def test_tether_js_talks_to_a_live_main() -> None:
    flags = _node_websocket_flags()
    ran: list[str] = []
    async with tether.Main() as main:

        @main.handle("message-from-renderer", roles={"web"})
        def reply(call: tether.Call, message: str) -> str:
            return f"Received: {message}"

        @main.handle("local-only")
        def local_only(call: tether.Call) -> None:
            ran.append("local-only")

        @main.handle("boom", roles="web")
        def boom(call: tether.Call) -> None:
            raise ValueError("bad")

        @main.handle("slow", roles="web")
        async def slow(call: tether.Call) -> None:
            try:
                await asyncio.sleep(30)
            except asyncio.CancelledError:
                ran.append("slow cancelled")
                raise

        @main.handle("ask", roles="web")
        async def ask(call: tether.Call) -> Any:
            await call.peer.send("theme", "dark")
            return await call.peer.invoke("page.title", timeout=5)

        @main.on("log", roles="web")
        def log(call: tether.Call, line: str) -> None:
            ran.append(line)

        server = await main.listen("ws://127.0.0.1:0")
        assert NODE is not None
        proc = await asyncio.create_subprocess_exec(
            NODE,
            *flags,
            str(JS / "live_page.mjs"),
            server.origin.replace("http://", "ws://") + "/tether",  # type: ignore[attr-defined]
            server.token,  # type: ignore[attr-defined]
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        out, err = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode == 0, err.decode()[-2000:]
    steps = {}
    for line in out.decode().splitlines():
        item = json.loads(line)
        steps[item["step"]] = item["value"]
    assert steps["invoke"] == "Received: Hola, mundo!"
    assert steps["local-only"]["name"] == "Forbidden"
    assert steps["boom"] == {
        "name": "RemoteError",
        "message": "ValueError: bad",
        "remoteType": "ValueError",
    }
    assert steps["message-from-renderer"]["name"] == "BadRequest"
    assert steps["message-from-renderer"]["path"] == "message"
    assert steps["nope"]["name"] == "NoHandler"
    assert steps["timeout"]["name"] == "InvokeTimeout"
    assert steps["ask"] == "node page"
    assert steps["rtt"] == "number"
    assert steps["closed"] == "ConnectionClosed"
    assert "local-only" not in ran
    assert "theme is dark" in ran
    assert "slow cancelled" in ran
