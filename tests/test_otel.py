"""OpenTelemetry (issue 13): one trace spans main and its child, context in the INVOKE."""

from __future__ import annotations

import importlib.metadata
import json
import subprocess
import sys
from pathlib import Path

import pytest

from tether.protocol import Connection

try:  # not imported here: a loaded OpenTelemetry makes every peer of this process announce it
    importlib.metadata.version("opentelemetry-sdk")
    HAVE_SDK = True
except importlib.metadata.PackageNotFoundError:
    HAVE_SDK = False

pytestmark = [
    pytest.mark.timeout(120),
    pytest.mark.skipif(not HAVE_SDK, reason="needs opentelemetry-sdk"),
]

SCRIPT = Path(__file__).with_name("_otel_targets.py")


def test_one_trace_spans_main_and_child() -> None:
    result = subprocess.run(
        [sys.executable, str(SCRIPT)],
        capture_output=True,
        text=True,
        timeout=100,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    spans = json.loads(result.stdout)
    main = {s["name"]: s for s in spans["main"]}
    child = {s["name"]: s for s in spans["child"]}
    request, invoke = main["request"], main["invoke work"]
    handle, inner = child["handle work"], child["inner work"]
    # one trace: request -> invoke (main) -> handle -> inner work (child)
    assert len({request["trace_id"], invoke["trace_id"], handle["trace_id"]}) == 1
    assert inner["trace_id"] == request["trace_id"]
    assert invoke["parent"] == request["span_id"] and invoke["kind"] == "CLIENT"
    assert handle["parent"] == invoke["span_id"] and handle["kind"] == "SERVER"
    assert inner["parent"] == handle["span_id"]


NO_TRACER = """
import asyncio, socket, sys
import tether

async def amain():
    a, b = socket.socketpair()
    serving = tether.Peer(a, role="client", local_role="main")
    calling = tether.Peer(b, role="main", local_role="client")
    serving.handle("add", lambda call, x, y: x + y)
    serving.start()
    calling.start()
    assert await calling.invoke("add", 1, 2, timeout=10) == 3
    assert "trace" not in calling.remote_hello.features  # not loaded: not announced
    print(sorted(m for m in sys.modules if m.startswith("opentelemetry")))
    await calling.close()
    await serving.close()

asyncio.run(amain())
"""


def test_no_tracer_configured_no_import() -> None:
    result = subprocess.run(
        [sys.executable, "-c", NO_TRACER], capture_output=True, text=True, timeout=60, check=False
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"


def _pair(a_ctx: bool, b_ctx: bool) -> tuple[Connection, Connection]:
    a = Connection("client", trace_context=a_ctx)
    b = Connection("main", trace_context=b_ctx)
    b.receive_data(a.data_to_send()[0])
    a.receive_data(b.data_to_send()[0])
    return a, b


def test_context_only_between_peers_that_both_announce_it() -> None:
    for a_ctx, b_ctx in ((True, False), (False, True), (False, False)):
        a, b = _pair(a_ctx, b_ctx)
        assert not a.trace_context and not b.trace_context
    plain_a, _ = _pair(False, False)
    announced_a, _ = _pair(True, False)
    assert announced_a.peer_hello == plain_a.peer_hello  # the other side's HELLO: unchanged
    a, b = _pair(True, True)
    assert a.trace_context and b.trace_context
    parent = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
    rid = a.send_invoke(b"add\0" + parent.encode() + b"\0k=v", (1, 2), None)
    [frame] = b.receive_data(a.data_to_send()[0])
    assert frame.channel == "add"
    assert b.contexts == {rid: parent}
