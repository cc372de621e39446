"""How main watches its children end, and what a forked child leaves behind.

A child must never freeze main's loop (no blocking ``waitpid``), ``wait()``
always returns once the child exited, a forked child keeps none of main's
sockets, and a closed main gives back every descriptor it used.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import os
import signal
import socket
import stat
import time
from typing import Any

import pytest

import _targets
import tether
from _targets import install_main_handlers

pytestmark = pytest.mark.timeout(60)


# -- child targets (run in forked children) ------------------------------------------


def close_pipes_then_sleep(peer: tether.sync.Peer, seconds: float) -> None:
    """An fd-hygienic child: closes every inherited pipe (multiprocessing's sentinel too)."""
    for name in os.listdir("/proc/self/fd"):
        fd = int(name)
        if fd <= 2:
            continue
        try:
            if stat.S_ISFIFO(os.fstat(fd).st_mode):
                os.close(fd)
        except OSError:
            pass
    time.sleep(seconds)


def goodbye_then_linger(peer: tether.sync.Peer, seconds: float) -> None:
    """Says goodbye, then takes its time to exit."""
    peer.close("leaving")
    time.sleep(seconds)


async def fails_at_start(peer: tether.Peer) -> None:
    raise ValueError("no config file at /etc/demo.toml")


def fails_at_start_sync(peer: tether.sync.Peer) -> None:
    raise ValueError("no config file at /etc/demo.toml")


async def silent_at_start(peer: tether.Peer) -> None:
    time.sleep(10)  # blocks before its first await: no HELLO goes out


# -- helpers -------------------------------------------------------------------------


async def _max_loop_lag(duration: float, tick: float = 0.01) -> float:
    """Run a ticking timer for ``duration`` s; return the longest delay past a tick."""
    loop = asyncio.get_running_loop()
    worst = 0.0
    end = loop.time() + duration
    while loop.time() < end:
        t0 = loop.time()
        await asyncio.sleep(tick)
        worst = max(worst, loop.time() - t0 - tick)
    return worst


def _fds() -> dict[int, str]:
    out = {}
    for name in os.listdir("/proc/self/fd"):
        with contextlib.suppress(OSError):  # the directory listing's own descriptor
            out[int(name)] = os.readlink(f"/proc/self/fd/{name}")
    return out


def _memfd_maps() -> list[str]:
    with open("/proc/self/maps") as f:
        return [line.strip() for line in f if "memfd:" in line]


# -- D5: no blocking wait in main's loop ---------------------------------------------


@pytest.mark.parametrize("watch", ["pidfd", "sentinel"])
async def test_child_closing_its_sentinel_does_not_stall_main(
    watch: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    if watch == "sentinel":  # as on a system without pidfds: the sentinel is watched
        monkeypatch.delattr(os, "pidfd_open")
    async with tether.Main(timeout=10.0) as main:
        t0 = time.monotonic()
        lag = asyncio.ensure_future(_max_loop_lag(1.5))
        child = await main.spawn(close_pipes_then_sleep, 2.0, start_method="fork")
        other = await main.spawn(_targets.serve_basic, start_method="fork")
        # Another child is answered promptly all along.
        slowest = 0.0
        while not lag.done():
            t1 = time.monotonic()
            assert await other.invoke("double", 2) == 4
            slowest = max(slowest, time.monotonic() - t1)
            await asyncio.sleep(0.02)
        worst = await lag
        # A blocking waitpid stalled the loop until the child exited (seconds);
        # a loaded machine stays well under this bound.
        assert worst < 0.25, f"main's loop stalled {worst * 1000:.0f} ms"
        assert slowest < 0.25, f"an invoke took {slowest * 1000:.0f} ms"
        assert time.monotonic() - t0 < 1.9
        assert child.exitcode is None  # still asleep: nothing waited for it
        assert await child.wait(5.0) == 0  # its exit is still seen, without the sentinel


# -- D9: wait() returns however the exit was seen ------------------------------------


@pytest.mark.parametrize("seen_by", ["exitcode", "kill"])
async def test_wait_returns_when_exit_is_seen_by_a_poll(seen_by: str) -> None:
    async with tether.Main(timeout=10.0) as main:
        child = await main.spawn(_targets.serve_basic, start_method="fork")
        waiting = asyncio.ensure_future(child.wait(3.0))
        await asyncio.sleep(0.05)  # wait() is now parked on the exit
        os.kill(child.pid, signal.SIGKILL)
        # Without letting the loop run, poll until the exit is seen.
        deadline = time.monotonic() + 5.0
        while time.monotonic() < deadline:
            if seen_by == "exitcode":
                if child.exitcode is not None:
                    break
            else:
                child.kill()  # polls first: a no-op once the exit is seen
                if child.exitcode is not None:
                    break
            time.sleep(0.001)
        assert child.exitcode == -9
        assert await asyncio.wait_for(waiting, 2.0) == -9
        with pytest.raises(tether.PeerGone, match="SIGKILL"):
            await child.invoke("double", 1)


# -- D10: a forked child keeps none of main's sockets --------------------------------


async def test_closed_listener_refuses_while_a_forked_child_lives() -> None:
    async with tether.Main(timeout=10.0) as main:
        server = await main.listen("tcp://127.0.0.1:0")
        port = server.address.port
        child = await main.spawn(_targets.serve_basic, start_method="fork")
        server.close()
        s = socket.socket()
        s.settimeout(2.0)
        try:
            with pytest.raises(ConnectionRefusedError):
                s.connect(("127.0.0.1", port))
        finally:
            s.close()
        assert await child.invoke("double", 3) == 6


async def test_dropped_client_gets_peer_gone_while_a_forked_child_lives(sock_path: str) -> None:
    async with tether.Main(timeout=10.0) as main:
        install_main_handlers(main)
        server = await main.listen(f"unix://{sock_path}")
        async with tether.connect(str(server.address)) as client:
            (accepted,) = main.peers
            child = await main.spawn(_targets.serve_basic, start_method="fork")
            pending = asyncio.ensure_future(client.invoke("sleepy", "dropped", 30.0, timeout=3.0))
            await asyncio.sleep(0.1)
            accepted.abort(tether.ProtocolError("dropped by the test"))
            t0 = time.monotonic()
            with pytest.raises(tether.PeerGone):
                await pending
            assert time.monotonic() - t0 < 1.0
        assert await child.invoke("double", 4) == 8


async def test_forked_child_sees_main_drop_its_connection() -> None:
    async with tether.Main(timeout=10.0) as main:
        child = await main.spawn(_targets.serve_basic, start_method="fork")
        child.abort(tether.PeerGone("dropped by the test"))
        # The child's end reaches EOF (it holds no copy of main's end) and it exits.
        assert await child.wait(3.0) == 0


async def test_forked_child_does_not_inherit_main_loop_signal_handlers() -> None:
    loop = asyncio.get_running_loop()
    hits: list[int] = []
    loop.add_signal_handler(signal.SIGTERM, hits.append, 1)
    try:
        async with tether.Main(timeout=10.0) as main:
            child = await main.spawn(_targets.serve_basic, start_method="fork")
            child.terminate()
            assert await child.wait(3.0) == -signal.SIGTERM
            await asyncio.sleep(0.05)
            assert hits == []  # the child's signal was not delivered to main's loop
    finally:
        loop.remove_signal_handler(signal.SIGTERM)


# -- D15: after a child's GOODBYE ---------------------------------------------------


async def test_child_that_said_goodbye_is_closed_and_calls_raise_peer_gone() -> None:
    async with tether.Main(timeout=10.0) as main:
        child = await main.spawn(goodbye_then_linger, 2.0, start_method="fork")
        deadline = time.monotonic() + 0.8
        while not child.closed and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        assert child.closed, "the child's GOODBYE did not close it"
        assert child.exitcode is None  # still lingering
        with pytest.raises(tether.PeerGone, match="goodbye"):
            await child.invoke("double", 1)
        with pytest.raises(tether.PeerGone):
            await child.send("num", 1)
        assert await child.wait(5.0) == 0
        assert child.closed
        with pytest.raises(tether.PeerGone) as ei:
            await child.invoke("double", 1)
        assert ei.value.exitcode in (0, None)


# -- spawn after close -------------------------------------------------------------


async def test_spawn_after_close_raises_instead_of_starting_an_orphan() -> None:
    import multiprocessing

    main = tether.Main()
    await main.close()
    before = {p.pid for p in multiprocessing.active_children()}
    with pytest.raises(tether.ConnectionClosed):
        await main.spawn(_targets.serve_basic, start_method="fork")
    assert {p.pid for p in multiprocessing.active_children()} == before
    assert not main.children


# -- a child that cannot start -------------------------------------------------------


async def test_spawn_checks_target_and_arguments_in_main() -> None:
    async with tether.Main() as main:
        with pytest.raises(TypeError, match="callable"):
            await main.spawn(42)  # type: ignore[arg-type]
        with pytest.raises(TypeError, match="missing"):
            await main.spawn(_targets.exit_on_event, "os._exit")  # needs ``code`` too
        with pytest.raises(TypeError, match="too many"):
            await main.spawn(_targets.serve_basic, 1)
        assert not main.children


async def test_silent_child_is_killed_and_spawn_says_why() -> None:
    async with tether.Main(spawn_timeout=0.3) as main:
        t0 = time.monotonic()
        with pytest.raises(tether.PeerGone, match=r"no HELLO within 0\.3 s") as ei:
            await main.spawn(silent_at_start, start_method="fork")
        assert time.monotonic() - t0 < 3.0
        assert ei.value.exitcode == -signal.SIGKILL
        assert not main.children and not main.peers


async def test_child_whose_async_target_raises_before_its_first_await_fails_spawn() -> None:
    async with tether.Main(timeout=10.0) as main:
        # No HELLO went out: spawn() raises, with the child's error (issue 8).
        with pytest.raises(tether.PeerGone, match=r"code 1.*ValueError: no config file") as ei:
            await main.spawn(fails_at_start, start_method="fork")
        assert ei.value.exitcode == 1


@pytest.mark.parametrize("target", [fails_at_start_sync])
async def test_child_whose_target_raises_reports_its_error(target: Any) -> None:
    async with tether.Main(timeout=10.0) as main:
        child = await main.spawn(target, start_method="fork")
        await asyncio.wait_for(child.wait_closed(), 5.0)
        assert child.closed
        with pytest.raises(tether.PeerGone, match="ValueError: no config file"):
            await child.invoke("double", 1)
        assert await child.wait(5.0) == 1
        with pytest.raises(tether.PeerGone, match=r"code 1.*ValueError: no config file") as ei:
            await child.invoke("double", 1)
        assert ei.value.exitcode == 1


# -- item 5 of the issue: nothing outlives a closed main -------------------------------


@pytest.mark.parametrize("payload", [1024, 1 << 20], ids=["inline", "shared-memory"])
async def test_closed_main_gives_back_every_descriptor(payload: int) -> None:
    gc.collect()
    fds_before = _fds()
    maps_before = _memfd_maps()
    loop = asyncio.get_running_loop()
    main = tether.Main(timeout=10.0, close_timeout=3.0)
    rec = install_main_handlers(main)
    data = os.urandom(payload)
    children = [await main.spawn(_targets.serve_basic, start_method="fork") for _ in range(6)]
    for c in children:
        assert await c.invoke("echo", data) == data
    # SIGKILL two children with calls pending on each: all answered with PeerGone, quickly.
    doomed = children[:2]
    pending: list[asyncio.Future[Any]] = []
    for i, c in enumerate(doomed):
        pending += [
            asyncio.ensure_future(c.invoke("forever", f"k{i}-{j}", timeout=None)) for j in range(5)
        ]
    await rec.wait_until(lambda: len(rec.remote_started) == 10, timeout=10.0)
    for c in doomed:
        os.kill(c.pid, signal.SIGKILL)
    t0 = loop.time()
    await asyncio.wait(pending, timeout=5.0)
    assert loop.time() - t0 < 1.0
    errors = [f.exception() for f in pending]
    assert all(isinstance(e, tether.PeerGone) and e.exitcode == -9 for e in errors), errors
    for c in children[2:]:
        assert await c.invoke("echo", data) == data
    await main.close()
    assert all(c.exitcode is not None for c in children)
    del children, doomed, pending, errors, c, data
    gc.collect()
    fds_after = _fds()
    extra = {fd: path for fd, path in fds_after.items() if fds_before.get(fd) != path}
    missing = {fd: path for fd, path in fds_before.items() if fds_after.get(fd) != path}
    assert len(fds_after) == len(fds_before), f"extra: {extra}; missing: {missing}"
    assert _memfd_maps() == maps_before


async def test_a_child_that_closes_at_once_still_started() -> None:
    # Its HELLO goes out with its GOODBYE: spawn returns, the child exits 0.
    async with tether.Main(timeout=10.0) as main:
        child = await main.spawn(_targets.close_first)
        assert await child.wait(10.0) == 0


async def test_wait_timeout_says_what_is_still_running() -> None:
    async with tether.Main(timeout=10.0) as main:
        child = await main.spawn(_targets.serve_basic)
        with pytest.raises(TimeoutError, match=r"still running after 0\.05 s"):
            await child.wait(0.05)


async def test_spawn_refuses_a_target_the_child_cannot_import() -> None:
    async def nested(peer: tether.Peer) -> None: ...

    async with tether.Main(timeout=10.0) as main:
        for target in (nested, lambda peer: None):
            with pytest.raises(TypeError, match="module-level function"):
                await main.spawn(target)
        assert not main.children


async def test_children_lists_only_the_running_ones() -> None:
    async with tether.Main(timeout=10.0) as main:
        kids = [await main.spawn(_targets.close_first) for _ in range(3)]
        exited: list[int] = []
        kids[0].on_exit(lambda c: exited.append(c.pid))
        for k in kids:
            await k.wait(10.0)
        await asyncio.sleep(0)  # exit callbacks run at the next turn
        assert main.children == set()
        assert exited == [kids[0].pid]
        late: list[int] = []
        kids[1].on_exit(lambda c: late.append(c.pid))  # already exited: called soon
        await asyncio.sleep(0)
        assert late == [kids[1].pid]
