"""The blocking API (tether.sync) against an asyncio Main, from plain threads."""

from __future__ import annotations

import asyncio
import socket
import threading
import time
from collections.abc import AsyncIterator, Callable
from typing import Any, TypeVar

import numpy as np
import pytest

import _targets
import tether
import tether.sync
from _targets import Recorder, install_main_handlers
from test_attachments import origin

pytestmark = pytest.mark.timeout(60)

T = TypeVar("T")


async def in_thread(fn: Callable[..., T], *args: Any, timeout: float = 30.0) -> T:
    """Run blocking ``fn`` on its own thread while the loop (and Main) keep running."""
    loop = asyncio.get_running_loop()
    fut: asyncio.Future[T] = loop.create_future()

    def settle(value: Any, exc: BaseException | None) -> None:
        if fut.done():
            return
        if exc is not None:
            fut.set_exception(exc)
        else:
            fut.set_result(value)

    def runner() -> None:
        try:
            value = fn(*args)
        except BaseException as exc:
            loop.call_soon_threadsafe(settle, None, exc)
        else:
            loop.call_soon_threadsafe(settle, value, None)

    threading.Thread(target=runner, daemon=True).start()
    return await asyncio.wait_for(fut, timeout)


class Hub:
    def __init__(self, main: tether.Main, address: str, rec: Recorder) -> None:
        self.main = main
        self.address = address
        self.rec = rec


@pytest.fixture(params=["unix", "tcp"])
async def hub(request: pytest.FixtureRequest, sock_path: str) -> AsyncIterator[Hub]:
    main = tether.Main(timeout=10.0, tracebacks="all")  # test_blocking_errors reads one
    # TCP peers reach only handlers that name their role ("client")
    rec = install_main_handlers(main, None if request.param == "unix" else "client")
    async with main:
        url = f"unix://{sock_path}" if request.param == "unix" else "tcp://127.0.0.1:0"
        server = await main.listen(url)
        yield Hub(main, str(server.address), rec)


async def test_eight_threads_share_one_blocking_peer(hub: Hub) -> None:
    def work(peer: tether.sync.Peer, t: int) -> list[Any]:
        return [peer.invoke("echo" if i % 2 else "aecho", [t, i]) for i in range(200)]

    def run() -> list[list[Any]]:
        with tether.sync.connect(hub.address) as peer:
            results: dict[int, list[Any]] = {}
            errors: list[BaseException] = []

            def thread(t: int) -> None:
                try:
                    results[t] = work(peer, t)
                except BaseException as exc:
                    errors.append(exc)

            threads = [threading.Thread(target=thread, args=(t,)) for t in range(8)]
            for th in threads:
                th.start()
            for th in threads:
                th.join(25)
            assert not any(th.is_alive() for th in threads)
            assert not errors, errors
            return [results[t] for t in range(8)]

    got = await in_thread(run, timeout=40.0)
    assert got == [[[t, i] for i in range(200)] for t in range(8)]


async def test_blocking_errors(hub: Hub) -> None:
    def run() -> None:
        with tether.sync.connect(hub.address) as peer:
            assert peer.invoke("add", 2, 3) == 5
            with pytest.raises(tether.RemoteError) as ei:
                peer.invoke("boom", 9)
            assert ei.value.remote_message == "bad value 9"
            assert "boom_handler" in ei.value.remote_traceback
            with pytest.raises(tether.NoHandler):
                peer.invoke("missing")
            with pytest.raises(tether.BadRequest) as bi:
                peer.invoke("typed", "str")
            assert bi.value.path == "x"
            with pytest.raises(tether.Forbidden):
                peer.invoke("child_only")
            assert peer.invoke("echo", "fine") == "fine"

    await in_thread(run)


async def test_blocking_peer_serves_invokes_from_main(hub: Hub) -> None:
    """Main calls a blocking peer back, even while that peer waits on its own invoke."""
    serving = threading.Event()
    release = threading.Event()
    answers: list[Any] = []

    def run() -> None:
        with tether.sync.connect(hub.address) as peer:

            @peer.handle("triple")
            def triple(call: tether.sync.Call, x: int) -> int:
                return 3 * x

            @peer.on("note")
            def note(call: tether.sync.Call, text: str) -> None:
                answers.append(text)

            # main's "register" handler invokes "triple" on us before answering.
            answers.append(peer.invoke("register", 5))
            serving.set()
            assert release.wait(10)

    worker = asyncio.ensure_future(in_thread(run))
    await asyncio.wait_for(asyncio.get_running_loop().run_in_executor(None, serving.wait, 10), 15)
    (remote,) = hub.rec.peers
    # The blocking peer's own thread is parked; its handlers still answer main.
    assert await remote.invoke("triple", 7) == 21
    await remote.send("note", "hi")
    await hub.rec.wait_until(lambda: "hi" in answers, timeout=5.0)
    with pytest.raises(tether.NoHandler):
        await remote.invoke("not-registered")
    release.set()
    await worker
    assert answers[0] == 16


@pytest.mark.parametrize("form", ["decorator", "call"])
async def test_blocking_peer_serves_without_making_calls(hub: Hub, form: str) -> None:
    """Registering a handler is enough: the peer answers main with no blocking call of its own."""
    peer = await in_thread(tether.sync.connect, hub.address)
    try:

        def quadruple(call: tether.sync.Call, x: int) -> int:
            return 4 * x

        if form == "decorator":
            peer.handle("quadruple")(quadruple)
        else:
            peer.handle("quadruple", quadruple)
        await hub.rec.wait_until(lambda: len(hub.main.peers) == 1, timeout=5.0)
        (remote,) = hub.main.peers
        assert await remote.invoke("quadruple", 5, timeout=5.0) == 20
    finally:
        peer.close()


async def test_blocking_invoke_timeout(hub: Hub) -> None:
    def run() -> float:
        with tether.sync.connect(hub.address) as peer:
            t0 = time.monotonic()
            with pytest.raises(tether.InvokeTimeout) as ei:
                peer.invoke("sleepy", "sync-t", 5.0, timeout=0.2)
            assert isinstance(ei.value, TimeoutError)
            elapsed = time.monotonic() - t0
            assert peer.invoke("echo", 1) == 1  # still usable
            return elapsed

    elapsed = await in_thread(run)
    assert 0.19 <= elapsed < 1.0
    # The cancel frame reached main and cancelled its handler.
    await hub.rec.wait_until(lambda: "sync-t" in hub.rec.cancelled, timeout=2.0)


async def test_blocking_default_timeout(hub: Hub) -> None:
    def run() -> None:
        with tether.sync.connect(hub.address, timeout=0.3) as peer:
            t0 = time.monotonic()
            with pytest.raises(tether.InvokeTimeout):
                peer.invoke("sleepy", "sync-d", 5.0)
            assert 0.29 <= time.monotonic() - t0 < 1.5
            assert peer.invoke("sleepy", "sync-n", 0.5, timeout=None) == "slept sync-n"

    await in_thread(run)


async def test_blocking_peer_gone_when_server_closes(sock_path: str) -> None:
    main = tether.Main()
    rec = install_main_handlers(main)
    server = await main.listen(f"unix://{sock_path}")
    address = str(server.address)
    results: list[Any] = []
    peer = await in_thread(tether.sync.connect, address)
    try:

        def call() -> None:
            try:
                results.append(peer.invoke("sleepy", "gone", 30.0, timeout=20.0))
            except BaseException as exc:
                results.append(exc)

        th = threading.Thread(target=call)
        th.start()
        await rec.wait_until(lambda: "gone" in rec.started, timeout=5.0)
        t0 = time.monotonic()
        await asyncio.wait_for(main.close(), 10.0)
        await in_thread(th.join, 5.0)
        assert not th.is_alive()
        assert time.monotonic() - t0 < 3.0
        assert len(results) == 1 and isinstance(results[0], tether.PeerGone), results
        with pytest.raises(tether.PeerGone):
            peer.invoke("echo", 1)
        with pytest.raises(tether.PeerGone):
            await in_thread(tether.sync.connect, address)
    finally:
        peer.close()


async def test_blocking_close_then_invoke(hub: Hub) -> None:
    def run() -> None:
        peer = tether.sync.connect(hub.address)
        assert peer.invoke("echo", 1) == 1
        peer.close()
        assert peer.closed
        with pytest.raises(tether.ConnectionClosed):
            peer.invoke("echo", 2)
        with pytest.raises(tether.ConnectionClosed):
            peer.send("num", 2)

    await in_thread(run)
    await hub.rec.wait_until(lambda: not hub.main.peers, timeout=2.0)


async def test_blocking_events_arrive_in_order(hub: Hub) -> None:
    def run() -> None:
        with tether.sync.connect(hub.address) as peer:
            for i in range(1000):
                peer.send("num", i)
            assert peer.invoke("echo", "flush") == "flush"

    await in_thread(run)
    assert hub.rec.numbers == list(range(1000))


def test_connect_to_nothing_fails_fast(sock_path: str) -> None:
    t0 = time.monotonic()
    with pytest.raises(tether.PeerGone):
        tether.sync.connect(f"unix://{sock_path}")
    assert time.monotonic() - t0 < 1.0


# -- blocking child targets --------------------------------------------------------------


@pytest.mark.parametrize("method", ["spawn", "fork"])
async def test_sync_child_invokes_main(method: str) -> None:
    async with tether.Main(timeout=20.0) as main:
        rec = install_main_handlers(main)
        child = await main.spawn(_targets.invoke_main_sync, 20, 22, start_method=method)
        assert await child.wait(20.0) == 0
        assert rec.results == [["sum", 42]]


async def test_sync_child_serves_main() -> None:
    async with tether.Main(timeout=20.0) as main:
        install_main_handlers(main)
        child = await main.spawn(_targets.serve_sync, start_method="fork")
        assert await child.invoke("double", 21) == 42
        # A blocking handler may invoke main while main waits on it.
        assert await child.invoke("relay", 3, 4) == 70
        results = await asyncio.gather(*(child.invoke("double", i) for i in range(500)))
        assert results == [2 * i for i in range(500)]
    assert child.exitcode == 0


# -- shared memory for blocking peers (D18) ----------------------------------------------


_origin = origin  # the test_attachments helper


BIG_FRAMES = 256 * 1024 * 1024  # descriptors count against max_frame_size (64 MiB by default)


@pytest.fixture
async def unix_hub(sock_path: str) -> AsyncIterator[Hub]:
    main = tether.Main(timeout=20.0, max_frame_size=BIG_FRAMES)
    rec = install_main_handlers(main)

    @main.handle("big")
    def big(call: tether.Call, n: int) -> bytes:
        return b"\x07" * n

    @main.handle("array_back")
    def array_back(call: tether.Call, a: Any) -> Any:
        assert _origin(a) == "mmap", _origin(a)
        return a * 2

    async with main:
        server = await main.listen(f"unix://{sock_path}")
        yield Hub(main, str(server.address), rec)


async def test_blocking_client_receives_more_than_64_mib_through_shared_memory(
    unix_hub: Hub,
) -> None:
    n = 80 * 1024 * 1024

    def run() -> tuple[int, str, int]:
        with tether.sync.connect(unix_hub.address, max_frame_size=BIG_FRAMES) as peer:
            got = peer.invoke("big", n)
            return len(got), _origin(got), got[n - 1]

    assert await in_thread(run) == (n, "mmap", 7)


async def test_arrays_to_and_from_a_blocking_client_use_fd_attachments(unix_hub: Hub) -> None:
    a = np.arange(256 * 1024, dtype=np.float64)  # 2 MiB
    seen: list[str] = []
    ready = threading.Event()
    done = threading.Event()

    def run() -> tuple[str, bool]:
        with tether.sync.connect(unix_hub.address) as peer:

            @peer.handle("take")
            def take(call: tether.sync.Call, x: Any) -> float:
                seen.append(_origin(x))
                return float(x.sum())

            back = peer.invoke("array_back", a)
            origin, equal = _origin(back), bool((back == a * 2).all())
            ready.set()
            done.wait(20)
            return origin, equal

    worker = asyncio.ensure_future(in_thread(run))
    await asyncio.get_running_loop().run_in_executor(None, ready.wait, 20)
    (remote,) = unix_hub.main.peers
    assert await remote.invoke("take", a) == float(a.sum())
    done.set()
    assert await worker == ("mmap", True)
    assert seen == ["mmap"]


def _array_child(peer: tether.sync.Peer) -> None:
    @peer.handle("origin")
    def origin(call: tether.sync.Call, x: Any) -> list[Any]:
        return [_origin(x), float(x.sum()), np.ones(300_000)]

    @peer.handle("lease_cycle")
    def lease_cycle(call: tether.sync.Call) -> list[Any]:
        got = call.peer.invoke("make_array", 300_000)  # main lends its children segments
        where, held = _origin(got), call.peer._conn.leases_held
        del got
        call.peer.invoke("add", 1, 2)  # dropped: released by the next call, no timer
        return [where, held, call.peer._conn.leases_held]

    peer.wait_closed()


async def test_blocking_child_gets_arrays_through_shared_memory() -> None:
    a = np.arange(300_000, dtype=np.int64)
    async with tether.Main(timeout=20.0) as main:
        main.handle("make_array", lambda call, n: np.ones(n))
        main.handle("add", lambda call, a, b: a + b)
        child = await main.spawn(_array_child, start_method="fork")
        where, total, ones = await child.invoke("origin", a)
        assert (where, total) == ("mmap", float(a.sum()))
        assert _origin(ones) == "mmap" and ones.shape == (300_000,)
        assert await child.invoke("lease_cycle") == ["mmap", 1, 0]


# -- connect ----------------------------------------------------------------------------


def test_connect_waits_for_the_hello(sock_path: str) -> None:
    """A listener that accepts but never says HELLO: PeerGone after connect_timeout."""
    srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    srv.bind(sock_path)
    srv.listen(4)
    try:
        t0 = time.monotonic()
        with pytest.raises(tether.PeerGone, match="HELLO"):
            tether.sync.connect(f"unix://{sock_path}", connect_timeout=0.5)
        assert 0.45 <= time.monotonic() - t0 < 5.0
    finally:
        srv.close()


async def test_connect_from_the_loop_that_serves_the_address_raises(hub: Hub) -> None:
    t0 = time.monotonic()
    with pytest.raises(RuntimeError, match="event loop"):
        tether.sync.connect(hub.address, connect_timeout=20.0)  # on the loop thread: refused
    assert time.monotonic() - t0 < 2.0
    peer = await in_thread(tether.sync.connect, hub.address)  # from another thread: fine
    try:
        assert await in_thread(peer.invoke, "echo", 5) == 5
    finally:
        peer.close()


# -- handlers that stop the process ----------------------------------------------------------


def _stopping_child(peer: tether.sync.Peer, how: str) -> None:
    @peer.handle("stop")
    def stop(call: tether.sync.Call) -> None:
        if how == "exit":
            raise SystemExit(3)
        raise KeyboardInterrupt

    peer.wait_closed()


@pytest.mark.parametrize("how", ["exit", "interrupt"])
async def test_system_exit_and_keyboard_interrupt_are_answered_then_stop_a_blocking_child(
    how: str,
) -> None:
    async with tether.Main(timeout=20.0) as main:
        # spawn: a child forked from inside asyncio.run() inherits asyncio's SIGINT
        # handler, which would swallow the KeyboardInterrupt.
        child = await main.spawn(_stopping_child, how, start_method="spawn")
        with pytest.raises(tether.RemoteError) as ei:
            await child.invoke("stop")
        assert ei.value.type_name == ("SystemExit" if how == "exit" else "KeyboardInterrupt")
        code = await child.wait(20.0)
        assert code == 3 if how == "exit" else code != 0
