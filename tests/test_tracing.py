"""Tracing (issue 13): the core's hook, the Chrome trace-event timeline, ``tether trace merge``."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

import _trace_targets
import tether
from tether import tracing

pytestmark = pytest.mark.timeout(120)

# The fields the trace-event format requires of each phase used here.
_REQUIRED = {
    "X": {"name", "ph", "ts", "dur", "pid", "tid"},
    "i": {"name", "ph", "ts", "pid", "tid", "s"},
    "s": {"name", "ph", "ts", "pid", "tid", "id"},
    "f": {"name", "ph", "ts", "pid", "tid", "id", "bp"},
    "M": {"name", "ph", "pid", "tid", "args"},
}


def check_events(events: list[dict[str, Any]]) -> None:
    """Every event has the fields its phase requires, with the right types."""
    assert events
    for e in events:
        ph = e["ph"]
        assert ph in _REQUIRED, e
        assert _REQUIRED[ph] <= e.keys(), (ph, _REQUIRED[ph] - e.keys())
        assert isinstance(e["name"], str) and isinstance(e["pid"], int)
        assert isinstance(e["tid"], int)
        if ph != "M":
            assert isinstance(e["ts"], (int, float)) and e["ts"] > 0
        if ph == "X":
            assert e["dur"] > 0
        if ph == "i":
            assert e["s"] in ("g", "p", "t")


def linked_invokes(events: list[dict[str, Any]]) -> list[tuple[dict[str, Any], dict[str, Any]]]:
    """(caller span, handler span) of each invoke, checked to be linked by one flow id."""
    spans = [e for e in events if e["ph"] == "X"]
    starts = {e["id"]: e for e in events if e["ph"] == "s"}
    ends = {e["id"]: e for e in events if e["ph"] == "f"}
    pairs = []
    for caller in (e for e in spans if e["cat"] == "invoke"):
        flow = [s for s in starts.values() if s["pid"] == caller["pid"] and s["ts"] == caller["ts"]]
        assert len(flow) == 1, caller
        end = ends[flow[0]["id"]]  # the flow arrives in the handler's process
        handler = [
            h
            for h in spans
            if h["cat"] == "handler" and h["pid"] == end["pid"] and h["ts"] == end["ts"]
        ]
        assert len(handler) == 1, (caller, end)
        assert handler[0]["name"] == caller["name"]
        assert handler[0]["pid"] != caller["pid"]
        # the handler ran inside the caller's wait (one monotonic clock for all processes)
        assert caller["ts"] <= handler[0]["ts"]
        assert handler[0]["ts"] + handler[0]["dur"] <= caller["ts"] + caller["dur"]
        pairs.append((caller, handler[0]))
    return pairs


def test_demo_trace_links_every_invoke_across_processes(tmp_path: Path) -> None:
    out = tmp_path / "out.json"
    result = subprocess.run(
        [sys.executable, "-m", "tether", "demo", "--trace", str(out)],
        capture_output=True,
        text=True,
        timeout=100,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    events = tracing.load(out)
    check_events(events)
    pairs = linked_invokes(events)
    names = sorted(c["name"] for c, _ in pairs)
    # scenario 2: the renderer invokes main, main invokes it (compute); scenario 4: the
    # renderer invokes its broker routes' hosts in main (ready, send)
    assert names == ["compute", "message-from-renderer", "ready", "send"]
    by_name = {c["name"]: (c, h) for c, h in pairs}
    caller, handler = by_name["message-from-renderer"]
    back_caller, back_handler = by_name["compute"]
    assert (caller["pid"], handler["pid"]) == (back_handler["pid"], back_caller["pid"])
    assert by_name["send"][0]["args"]["route_id"] != 0  # an invoke on a route
    # every handler span has its caller (nothing unmatched)
    assert len([e for e in events if e["ph"] == "X" and e["cat"] == "handler"]) == len(pairs)
    # processes and threads are named, children's deaths marked, events are instants
    named = {e["pid"] for e in events if e["ph"] == "M" and e["name"] == "process_name"}
    assert {e["pid"] for e in events} <= named
    deaths = [e for e in events if e["name"] == "child exited"]
    assert len(deaths) == 2  # the renderer of scenario 2, the broker's renderer
    assert {d["args"]["child_pid"] for d in deaths} < named
    assert any(e["ph"] == "i" and e["cat"] == "event" for e in events)
    # the children's own files were merged into out.json and removed
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.json"]


async def test_main_trace_writes_both_processes(tmp_path: Path) -> None:
    out = tmp_path / "t.json"
    before = os.environ.get(tracing.ENV)
    async with tether.Main(trace=out) as main:
        assert os.environ[tracing.ENV] == str(out)  # what spawned children inherit
        child = await main.spawn(_trace_targets.serve)
        assert await child.invoke("double", 21, timeout=30) == 42
        await child.send("quit")
        assert await child.wait(30) == 0
    assert tracing.hook is None
    assert os.environ.get(tracing.ENV) == before
    events = tracing.load(out)
    check_events(events)
    [(caller, handler)] = linked_invokes(events)
    assert caller["pid"] == os.getpid() and handler["pid"] == child.pid
    assert caller["name"] == handler["name"] == "double"
    assert caller["args"]["peer"] == f"child[{child.pid}]"
    assert handler["args"]["peer"] == f"main[{os.getpid()}]"


async def test_hook_not_called_when_tracing_is_off(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[str] = []

    class Hook:
        def sent(self, conn: object, data: bytes) -> None:
            calls.append("sent")

        def received(self, conn: object, frames: object) -> None:
            calls.append("received")

    a, b = socket.socketpair()
    serving = tether.Peer(a, role="client", local_role="main")
    calling = tether.Peer(b, role="main", local_role="client")
    serving.handle("add", lambda call, x, y: x + y)
    serving.start()
    calling.start()
    try:
        assert tracing.hook is None  # off by default
        for i in range(20):
            assert await calling.invoke("add", i, 1, timeout=10) == i + 1
        assert calls == []
        # the same invokes with a hook installed do reach it: the test can see a call
        monkeypatch.setattr(tracing, "hook", Hook())
        assert await calling.invoke("add", 1, 1, timeout=10) == 2
        assert "sent" in calls and "received" in calls
        monkeypatch.setattr(tracing, "hook", None)
        calls.clear()
        await calling.invoke("add", 1, 1, timeout=10)
        assert calls == []
    finally:
        await calling.close()
        await serving.close()


async def test_records_carry_the_frame_fields(monkeypatch: pytest.MonkeyPatch) -> None:
    rec = tracing.Recorder()
    seen: list[dict[str, Any]] = []
    rec.listen(seen.append)
    a, b = socket.socketpair(socket.AF_UNIX)
    serving = tether.Peer(a, role="client", local_role="main")
    calling = tether.Peer(b, role="main", local_role="client")

    def fail(call: tether.Call) -> None:
        raise ValueError("no")

    serving.handle("echo", lambda call, x: x)
    serving.handle("fail", fail)
    serving.start()
    calling.start()
    monkeypatch.setattr(tracing, "hook", rec)
    try:
        await calling.invoke("echo", b"x" * 200_000, timeout=10)
        with pytest.raises(tether.RemoteError):
            await calling.invoke("fail", timeout=10)
        await calling.send("note", 1)
    finally:
        await calling.close()
        await serving.close()
    pid = os.getpid()
    invoke = next(r for r in seen if r["kind"] == "invoke" and r["dir"] == "send")
    assert invoke["channel"] == "echo" and invoke["pid"] == pid and invoke["request_id"] == 1
    assert invoke["route_id"] == 0 and invoke["peer"] == f"main[{pid}]"
    # 200 kB travel as a shared-memory attachment on a unix socket: counted apart
    assert invoke["attachment_bytes"] == 200_000 and invoke["size"] < 1000
    received = next(r for r in seen if r["kind"] == "invoke" and r["dir"] == "recv")
    assert received["attachment_bytes"] == 200_000 and received["peer"] == f"client[{pid}]"
    answers = [r for r in seen if "latency_us" in r]
    assert [(r["channel"], r["dir"], r["error"]) for r in answers] == [
        ("echo", "send", False),  # the handler's side: its run time
        ("echo", "recv", False),  # the caller's side: its latency
        ("fail", "send", True),
        ("fail", "recv", True),
    ]
    assert all(r["latency_us"] > 0 for r in answers)
    assert any(r["kind"] == "event" and r["channel"] == "note" for r in seen)


def test_merge_cli_joins_files(tmp_path: Path) -> None:
    one = tmp_path / "a.json"
    two = tmp_path / "b.json"
    one.write_text(
        json.dumps(
            {"traceEvents": [{"name": "x", "ph": "i", "s": "p", "ts": 2, "pid": 1, "tid": 1}]}
        )
    )
    two.write_text(json.dumps([{"name": "y", "ph": "i", "s": "p", "ts": 1, "pid": 2, "tid": 2}]))
    out = tmp_path / "all.json"
    result = subprocess.run(
        [sys.executable, "-m", "tether", "trace", "merge", str(out), str(one), str(two)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert [e["name"] for e in tracing.load(out)] == ["y", "x"]  # one timeline, by time
    bad = subprocess.run(
        [sys.executable, "-m", "tether", "trace", "merge", str(out), str(tmp_path / "nope")],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert bad.returncode == 1 and "nope" in bad.stderr


def test_plot_draws_a_timeline(tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    from tether.trace_cli import plot

    events = [
        {"name": "process_name", "ph": "M", "pid": 1, "tid": 0, "args": {"name": "main"}},
        {
            "name": "add",
            "cat": "invoke",
            "ph": "X",
            "ts": 10.0,
            "dur": 50.0,
            "pid": 1,
            "tid": 1,
            "args": {"side": "caller"},
        },
        {"name": "add", "cat": "invoke", "ph": "s", "id": 7, "ts": 10.0, "pid": 1, "tid": 1},
        {
            "name": "add",
            "cat": "handler",
            "ph": "X",
            "ts": 20.0,
            "dur": 20.0,
            "pid": 2,
            "tid": 2,
            "args": {"side": "handler"},
        },
        {
            "name": "add",
            "cat": "invoke",
            "ph": "f",
            "bp": "e",
            "id": 7,
            "ts": 20.0,
            "pid": 2,
            "tid": 2,
        },
        {"name": "child exited", "ph": "i", "s": "p", "ts": 90.0, "pid": 1, "tid": 1, "args": {}},
    ]
    out = tmp_path / "t.png"
    plot(events, str(out))
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(ValueError):
        plot(events[:1], str(tmp_path / "empty.png"))


async def test_log_records_about_a_peer_name_it(caplog: pytest.LogCaptureFixture) -> None:
    a, b = socket.socketpair()
    serving = tether.Peer(a, role="client", local_role="main", name="worker-7")
    calling = tether.Peer(b, role="main", local_role="client")
    got = asyncio.Event()

    def broken(call: tether.Call) -> None:
        got.set()
        raise RuntimeError("listener bug")

    serving.on("note", broken)
    serving.handle("ping", lambda call: "pong")
    serving.start()
    calling.start()
    try:
        with caplog.at_level(logging.ERROR, logger="tether"):
            await calling.send("note")
            await asyncio.wait_for(got.wait(), 10)
            await calling.invoke("ping", timeout=10)  # the listener ran before
    finally:
        await calling.close()
        await serving.close()
    [record] = [r for r in caplog.records if "listener" in r.getMessage()]
    assert record.name.startswith("tether")
    assert "worker-7" in record.peer  # type: ignore[attr-defined]
    assert record.peer_pid == os.getpid()  # type: ignore[attr-defined]


class Counter:
    """A route host: ``add`` on the route."""

    def __init__(self, route: tether.Route, start: int) -> None:
        self.n = start
        route.handle("add", self.add)

    def add(self, call: tether.Call, k: int) -> int:
        self.n += k
        return self.n


async def test_invokes_on_a_route_are_spans_too(monkeypatch: pytest.MonkeyPatch) -> None:
    rec = tracing.Recorder()
    seen: list[dict[str, Any]] = []
    rec.listen(seen.append)
    a, b = socket.socketpair()
    host = tether.Peer(a, role="child", local_role="main")
    opener = tether.Peer(b, role="main", local_role="child")
    host.host("counter", Counter, roles={"child"})
    host.start()
    opener.start()
    monkeypatch.setattr(tracing, "hook", rec)
    try:
        route = await opener.open("counter", 5, timeout=10)
        assert await route.invoke("add", 2, timeout=10) == 7
    finally:
        await opener.close()
        await host.close()
    answers = [r for r in seen if "latency_us" in r]
    assert [(r["channel"], r["dir"]) for r in answers] == [("add", "send"), ("add", "recv")]
    assert all(r["route_id"] == route.id for r in answers)  # the INVOKE's route, not the answer's
