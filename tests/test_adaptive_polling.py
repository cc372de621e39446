"""Adaptive polling in the peers: on for a fast peer, off for a slow handler, an idle
connection, ``spin=0``. Counted through each peer's policies (``spins``, ``hits``), not timed.

An asyncio peer runs on the test's loop and a blocking peer serves from its own
threads, so each side really waits for the other.
"""

from __future__ import annotations

import asyncio
import socket
import time
from collections.abc import AsyncIterator
from typing import Any

import pytest

import tether
from tether import polling

pytestmark = pytest.mark.timeout(60)


@pytest.fixture
def generous(monkeypatch: pytest.MonkeyPatch) -> None:
    """Windows of 0.5 s and no bound on hit times: 'fast' then holds on a loaded machine."""
    for name in ("WINDOW_MIN", "WINDOW_MAX", "HIT_BOUND"):
        monkeypatch.setattr(polling, name, 0.5)


def _slow(call: tether.Call) -> str:
    time.sleep(0.01)  # a handler taking 10 ms per answer
    return "done"


async def _slow_async(call: tether.Call) -> str:
    await asyncio.sleep(0.01)
    return "done"


@pytest.fixture
async def pair(request: pytest.FixtureRequest) -> AsyncIterator[tuple[tether.Peer, Any, Any]]:
    """Two connections, ``spin`` from the test's param: an asyncio caller and a blocking
    peer that serves it; a blocking caller (no handlers: it reads its own answers) and an
    asyncio peer that serves it. Returns (asyncio caller, blocking server, blocking caller).
    """
    spin = getattr(request, "param", None)
    a, b = socket.socketpair()
    caller = tether.Peer(a, role="main", local_role="client", spin=spin)
    caller.start()
    served = tether.sync.Peer(b, role="client", local_role="main", spin=spin)
    served.handle("echo", lambda call, x: x)
    served.handle("slow", _slow)
    c, d = socket.socketpair()
    server = tether.Peer(c, role="client", local_role="main", spin=spin)
    server.handle("echo", lambda call, x: x)
    server.handle("slow", _slow_async)
    server.start()
    blocking = tether.sync.Peer(d, spin=spin)
    await caller.wait_hello(10.0)
    await server.wait_hello(10.0)
    await asyncio.to_thread(blocking.wait_hello, 10.0)
    blocking.server = server  # (for the tests' counts)
    try:
        yield caller, served, blocking
    finally:
        await asyncio.to_thread(served.close)
        await asyncio.to_thread(blocking.close)
        await caller.close()
        await server.close()


async def test_polling_turns_on_for_a_fast_peer(generous: None, pair: Any) -> None:
    caller, served, blocking = pair
    for i in range(50):
        assert await caller.invoke("echo", i) == i
    # The asyncio caller polled for its answers, the blocking server for the next request.
    assert caller._answer_poll.hits >= 45, caller._answer_poll
    assert served._request_poll.hits >= 40, served._request_poll
    # ... and the other way: the blocking caller, the asyncio server.
    # (in one thread: the next invoke must not wait for this loop, which the server polls on)
    assert await asyncio.to_thread(_echoes, blocking, 50) == list(range(50))
    assert blocking._answer_poll.hits >= 45, blocking._answer_poll
    assert blocking.server._request_poll.hits >= 40, blocking.server._request_poll


def _echoes(peer: Any, n: int) -> list[Any]:
    return [peer.invoke("echo", i) for i in range(n)]


async def test_polling_backs_off_for_a_slow_handler(pair: Any) -> None:
    """Answers after 10 ms never come within a window: a probe now and then, no more."""
    caller, _, blocking = pair
    for _ in range(40):
        assert await caller.invoke("slow") == "done"
    # 1 + 2 + 4 + 8 + 16 chances cover 31 calls: at most 6 polls in 40, none of them a hit.
    assert caller._answer_poll.hits == 0
    assert 1 <= caller._answer_poll.spins <= 6, caller._answer_poll
    for _ in range(40):
        assert await asyncio.to_thread(blocking.invoke, "slow") == "done"
    assert blocking._answer_poll.hits == 0
    assert 1 <= blocking._answer_poll.spins <= 6, blocking._answer_poll


@pytest.mark.parametrize("pair", [0], indirect=True)
async def test_spin_zero_never_polls(generous: None, pair: Any) -> None:
    caller, _, blocking = pair
    for i in range(30):
        assert await caller.invoke("echo", i) == i
        assert await asyncio.to_thread(blocking.invoke, "echo", i) == i
    assert [p.spins for p in _polls(pair)] == [0] * 8


async def test_an_idle_connection_never_polls(generous: None, pair: Any) -> None:
    """Connected, handshake done, handlers serving, nothing sent: no chance to poll at all."""
    caller = pair[0]
    await asyncio.sleep(0.3)
    polls = _polls(pair)
    assert [p.spins for p in polls] == [0] * 8
    # One call, then idle again: the server polls once for a next request that never comes.
    assert await caller.invoke("echo", 1) == 1
    await asyncio.sleep(0.6)
    spins = [p.spins for p in polls]
    await asyncio.sleep(0.3)
    assert [p.spins for p in polls] == spins  # nothing more while idle


def _polls(pair: Any) -> list[polling.SpinPolicy]:
    peers = [*pair, pair[2].server]
    return [p for peer in peers for p in (peer._answer_poll, peer._request_poll)]


async def test_main_and_children_poll_adaptively_by_default() -> None:
    one_cpu = polling.usable_cpus() < 2  # then polling is off whatever spin says
    async with tether.Main() as main:
        assert main.spin is None
        child = await main.spawn(_child_reporting_spin)
        assert child.spin is None and child._answer_poll.off == one_cpu
        assert await child.invoke("spin") == [None, one_cpu]
    async with tether.Main(spin=0) as main:
        child = await main.spawn(_child_reporting_spin)
        assert child._answer_poll.off
        assert await child.invoke("spin") == [0, True]


def _sync_child_reporting_spin(peer: tether.sync.Peer) -> None:
    peer.handle("spin", lambda call: [peer.spin, peer._request_poll.off])
    peer.wait_closed(30.0)


async def test_blocking_children_take_mains_spin() -> None:
    async with tether.Main(spin=0) as main:
        child = await main.spawn(_sync_child_reporting_spin)
        assert await child.invoke("spin") == [0, True]
    async with tether.Main(spin=0.0001) as main:
        child = await main.spawn(_sync_child_reporting_spin)
        assert (await child.invoke("spin"))[0] == 0.0001


async def _child_reporting_spin(peer: tether.Peer) -> None:
    peer.handle("spin", lambda call: [peer.spin, peer._request_poll.off])
    await peer.wait_closed()


def test_connect_defaults_to_adaptive_and_checks_spin() -> None:
    import inspect

    for fn in (tether.connect, tether.sync.connect, tether.Main):
        assert inspect.signature(fn).parameters["spin"].default is None, fn
    with pytest.raises(TypeError, match="spin"):
        tether.Main(spin="fast")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="spin"):
        tether.sync.connect("unix:///nonexistent/x.sock", spin=-1.0)
    with pytest.raises(ValueError, match="spin"):
        tether.connect("unix:///nonexistent/x.sock", spin=float("nan"))
