"""Main and its spawned children over their socketpairs: both directions, every start method."""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import AsyncIterator

import pytest

import _targets
import tether
from _targets import Recorder, install_main_handlers

pytestmark = pytest.mark.timeout(90)

START_METHODS = ["spawn", "forkserver", "fork"]


class Family:
    def __init__(self, main: tether.Main, child: tether.Child, rec: Recorder) -> None:
        self.main = main
        self.child = child
        self.rec = rec


@pytest.fixture
async def family() -> AsyncIterator[Family]:
    """A Main with the standard handlers and one ``serve_basic`` child (fork: quick)."""
    main = tether.Main(timeout=20.0)
    rec = install_main_handlers(main)
    async with main:
        child = await main.spawn(_targets.serve_basic, start_method="fork")
        yield Family(main, child, rec)


@pytest.mark.parametrize("method", START_METHODS)
async def test_each_start_method_runs_a_child_that_answers(method: str) -> None:
    async with tether.Main(timeout=20.0) as main:
        install_main_handlers(main)
        child = await main.spawn(_targets.serve_basic, start_method=method)
        assert child.pid != os.getpid()
        assert child.exitcode is None
        assert await child.invoke("double", 21) == 42
        assert await child.invoke("pid") == child.pid
        assert await child.invoke("relay", 2, 3) == 50  # child -> main inside main -> child
    # Main closed: the child was told goodbye and exited on its own.
    assert child.exitcode == 0


async def test_main_to_child_thousand_concurrent_invokes(family: Family) -> None:
    results = await asyncio.gather(
        *(family.child.invoke("echo" if i % 2 else "aecho", [i, f"m{i}"]) for i in range(1000))
    )
    assert results == [[i, f"m{i}"] for i in range(1000)]


async def test_child_to_main_thousand_concurrent_invokes(family: Family) -> None:
    results = await family.child.invoke("storm", 1000)
    assert results == [[i, f"c{i}"] for i in range(1000)]


async def test_child_invokes_main_and_typed_errors_cross(family: Family) -> None:
    child = family.child
    ok = await child.invoke("call_main", "add", [20, 22])
    assert ok[:2] == ["ok", 42]
    err = await child.invoke("call_main", "boom", [1])
    assert err[:2] == ["error", "RemoteError"]
    assert "bad value 1" in err[2]
    assert (await child.invoke("call_main", "typed", ["x"]))[1] == "BadRequest"
    assert (await child.invoke("call_main", "nothing-here", []))[1] == "NoHandler"
    # The role a spawned child gets opens child-only channels.
    assert (await child.invoke("call_main", "child_only", []))[:2] == ["ok", "secret for child"]


async def test_main_events_reach_child_in_order(family: Family) -> None:
    for i in range(1000):
        await family.child.send("num", i)
    # FIFO per connection: by the time this invoke is answered every event was handled.
    assert await family.child.invoke("numbers") == list(range(1000))


async def test_child_events_reach_main_in_order(family: Family) -> None:
    assert await family.child.invoke("send_numbers", 1000) == 1000
    assert family.rec.numbers == list(range(1000))


async def test_main_invoke_timeout_cancels_child_handler(family: Family) -> None:
    t0 = time.monotonic()
    with pytest.raises(tether.InvokeTimeout) as ei:
        await family.child.invoke("forever", "t-child", timeout=0.2)
    assert isinstance(ei.value, TimeoutError)
    assert 0.19 <= time.monotonic() - t0 < 1.0
    # The child's handler got CancelledError and said so.
    await family.rec.wait_until(lambda: "t-child" in family.rec.remote_cancelled, timeout=3.0)
    assert family.rec.remote_started == ["t-child"]
    assert await family.child.invoke("double", 4) == 8


async def test_cancelling_invoke_task_cancels_child_handler(family: Family) -> None:
    task = asyncio.ensure_future(family.child.invoke("forever", "c-child", timeout=None))
    await family.rec.wait_until(lambda: "c-child" in family.rec.remote_started, timeout=5.0)
    assert family.rec.remote_cancelled == []
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    await family.rec.wait_until(lambda: "c-child" in family.rec.remote_cancelled, timeout=3.0)


async def test_main_default_timeout_reaches_main_and_child() -> None:
    async with tether.Main(timeout=0.3) as main:
        rec = install_main_handlers(main)
        child = await main.spawn(_targets.serve_basic, start_method="fork")
        # main -> child with no explicit timeout: Main's default of 0.3 s.
        t0 = time.monotonic()
        with pytest.raises(tether.InvokeTimeout):
            await child.invoke("forever", "default-t")
        assert 0.29 <= time.monotonic() - t0 < 1.5
        await rec.wait_until(lambda: "default-t" in rec.remote_cancelled, timeout=3.0)
        # child -> main with no explicit timeout: the child inherited 0.3 s too.
        outcome = await child.invoke("call_main", "sleepy", ["from-child", 5.0], timeout=10.0)
        assert outcome[1] == "InvokeTimeout"
        assert 0.29 <= outcome[3] < 1.5
        await rec.wait_until(lambda: "from-child" in rec.cancelled, timeout=3.0)


@pytest.mark.parametrize("target", ["startup_race", "startup_race_sync"])
@pytest.mark.parametrize("method", ["spawn", "fork"])
async def test_messages_sent_right_after_spawn_are_not_lost(method: str, target: str) -> None:
    async with tether.Main(timeout=20.0) as main:
        child = await main.spawn(getattr(_targets, target), start_method=method)
        await child.send("ev", 1)
        await child.send("ev", 2)
        assert await child.invoke("inv", 3) == [1, 2, 3]


async def test_child_exit_removes_it_from_main(family: Family) -> None:
    child = family.child
    assert child in family.main.children and child in family.main.peers
    await child.close()
    assert await child.wait(5.0) == 0
    await family.rec.wait_until(lambda: child not in family.main.peers, timeout=2.0)
    with pytest.raises(tether.ConnectionClosed):
        await child.invoke("double", 1)


async def test_main_close_ends_children_and_fails_pending_calls() -> None:
    main = tether.Main(timeout=20.0, close_timeout=2.0)
    rec = install_main_handlers(main)
    child = await main.spawn(_targets.serve_basic, start_method="fork")
    pending = [asyncio.ensure_future(child.invoke("forever", f"f{i}")) for i in range(5)]
    await rec.wait_until(lambda: len(rec.remote_started) == 5, timeout=5.0)
    await asyncio.wait_for(main.close(), 10.0)
    results = await asyncio.wait_for(asyncio.gather(*pending, return_exceptions=True), 2.0)
    assert all(isinstance(r, tether.ConnectionClosed) for r in results), results
    assert child.exitcode == 0
    assert not main.children and not main.peers


@pytest.mark.timeout(30)
async def test_close_ends_deaf_children_together() -> None:
    main = tether.Main(close_timeout=1.0)
    async with main:
        children = [await main.spawn(_targets.deaf_sync, 60.0) for _ in range(3)]
        t0 = time.monotonic()
        await main.close()
        elapsed = time.monotonic() - t0
    assert all(c.exitcode == -9 for c in children)
    assert elapsed < 2.5, f"children were waited for one after another ({elapsed:.1f} s)"
