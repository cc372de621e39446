"""Handlers for day one (issue 8): threads, cancellation, progress, bytes by hint, early errors.

Over a real unix socket (shared memory for large buffers) and TCP (inline),
with the asyncio client and the blocking one.
"""

from __future__ import annotations

import asyncio
import math
import socket
import threading
import time
from collections.abc import AsyncIterator
from typing import Any

import msgspec
import pytest

import tether
import tether.sync
from tether import threads
from tether.registry import RESERVED_CHANNELS

pytestmark = pytest.mark.timeout(60)

BIG = 1 << 20  # above the attachment threshold: crosses beside the body (memfd on unix)
SMALL = 100


class Packet(msgspec.Struct):
    data: bytes
    n: int


class Spinner:
    """A CPU-bound handler's state: it spins until released, cancelled, or 20 s pass."""

    def __init__(self) -> None:
        self.started = threading.Event()
        self.release = threading.Event()
        self.stopped = threading.Event()
        self.saw_cancel = False
        self.thread = ""

    def spin(self, call: tether.Call) -> int:
        self.thread = threading.current_thread().name
        self.started.set()
        n = 0
        end = time.monotonic() + 20.0
        try:
            while not self.release.is_set() and time.monotonic() < end:
                if call.cancelled:
                    self.saw_cancel = True
                    return -1
                n += 1  # pure Python work: holds the GIL between checks
            return n
        finally:
            self.stopped.set()


async def wait_event(ev: threading.Event, timeout: float = 10.0) -> bool:
    return await asyncio.to_thread(ev.wait, timeout)


@pytest.fixture(params=["unix", "tcp"])
async def served(
    request: pytest.FixtureRequest, sock_path: str
) -> AsyncIterator[tuple[tether.Main, str, Spinner]]:
    main = tether.Main(timeout=10.0)
    spinner = Spinner()
    roles = None if request.param == "unix" else "client"
    main.handle("spin", spinner.spin, thread=True, roles=roles)

    @main.handle("ping", roles=roles)
    def ping(call: tether.Call) -> str:
        return "pong"

    @main.handle("work", thread=True, roles=roles)
    def work(call: tether.Call, steps: int) -> str:
        for i in range(steps):
            call.send("progress", i, threading.current_thread().name)
        return "done"

    @main.handle("size", roles=roles)
    def size(call: tether.Call, data: bytes) -> list[Any]:
        return [type(data).__name__, len(data)]

    @main.handle("view", roles=roles)
    def view(call: tether.Call, data: memoryview) -> list[Any]:
        return [type(data).__name__, data.nbytes, data.readonly]

    @main.handle("packet", roles=roles)
    def packet(call: tether.Call, p: Packet, parts: list[bytes], maybe: bytes | None) -> Packet:
        assert type(p.data) is bytes and all(type(x) is bytes for x in parts)
        assert maybe is None or type(maybe) is bytes
        return Packet(p.data + b"!", p.n + len(parts))

    @main.handle("blob", roles=roles)
    def blob(call: tether.Call, n: int) -> bytes:
        return bytes(n)

    async with main:
        url = f"unix://{sock_path}" if request.param == "unix" else "tcp://127.0.0.1:0"
        server = await main.listen(url)
        yield main, str(server.address), spinner


# -- thread=True -------------------------------------------------------------------


async def test_a_cpu_bound_thread_handler_does_not_stall_another_peers_invokes(
    served: tuple[tether.Main, str, Spinner],
) -> None:
    _, address, spinner = served
    async with tether.connect(address) as a, tether.connect(address) as b:
        job = asyncio.ensure_future(a.invoke("spin", timeout=30.0))
        assert await wait_event(spinner.started)
        assert spinner.thread.startswith("tether-handler")  # not the loop's thread
        for _ in range(20):  # answered while the spinner holds a worker thread
            assert await b.invoke("ping", timeout=10.0) == "pong"
        assert not job.done()
        spinner.release.set()
        assert await asyncio.wait_for(job, 10.0) > 0


async def test_a_cancelled_invoke_sets_call_cancelled_and_the_loop_stops(
    served: tuple[tether.Main, str, Spinner],
) -> None:
    _, address, spinner = served
    async with tether.connect(address) as peer:
        task = asyncio.ensure_future(peer.invoke("spin", timeout=30.0))
        assert await wait_event(spinner.started)
        task.cancel()  # sends CANCEL
        with pytest.raises(asyncio.CancelledError):
            await task
        assert await wait_event(spinner.stopped)
        assert spinner.saw_cancel
        assert await peer.invoke("ping") == "pong"  # the connection goes on


async def test_the_callers_timeout_reaches_the_thread_as_call_cancelled(
    served: tuple[tether.Main, str, Spinner],
) -> None:
    _, address, spinner = served
    async with tether.connect(address) as peer:
        with pytest.raises(tether.InvokeTimeout):
            await peer.invoke("spin", timeout=0.5)
        assert await wait_event(spinner.stopped)
        assert spinner.saw_cancel


async def test_a_lost_connection_reaches_the_thread_as_call_cancelled(
    served: tuple[tether.Main, str, Spinner],
) -> None:
    _, address, spinner = served
    peer = await tether.connect(address)
    job = asyncio.ensure_future(peer.invoke("spin", timeout=30.0))
    assert await wait_event(spinner.started)
    await peer.close()
    with pytest.raises(tether.ConnectionClosed):
        await job
    assert await wait_event(spinner.stopped)
    assert spinner.saw_cancel


async def test_progress_from_a_thread_arrives_before_the_result_in_order(
    served: tuple[tether.Main, str, Spinner],
) -> None:
    _, address, _ = served
    async with tether.connect(address) as peer:
        seen: list[int] = []
        names: set[str] = set()

        @peer.on("progress")
        def progress(call: tether.Call, i: int, name: str) -> None:
            seen.append(i)
            names.add(name)

        assert await peer.invoke("work", 50) == "done"
        assert seen == list(range(50))  # every event, in order, before the result
        assert all(n.startswith("tether-handler") for n in names)


async def test_call_send_on_the_loop_thread_says_what_to_do_instead() -> None:
    errors: list[str] = []

    def on_loop(call: tether.Call) -> None:
        try:
            call.send("progress", 1)
        except RuntimeError as exc:
            errors.append(str(exc))

    s1, s2 = socket.socketpair()
    left = tether.Peer(s1, role="main", local_role="child")
    right = tether.Peer(s2, role="child", local_role="main")
    right.handle("x", on_loop)
    left.start()
    right.start()
    try:
        await left.invoke("x", timeout=10.0)
    finally:
        await left.close()
        await right.close()
    assert errors and "await call.peer.send" in errors[0]


async def test_an_async_handler_sees_call_cancelled_when_its_caller_cancels(
    served: tuple[tether.Main, str, Spinner],
) -> None:
    main, address, _ = served
    seen: asyncio.Queue[bool] = asyncio.Queue()
    started = asyncio.Event()

    async def waits(call: tether.Call) -> None:
        started.set()
        try:
            await asyncio.sleep(30)
        except asyncio.CancelledError:
            seen.put_nowait(call.cancelled)
            raise

    main.handle("waits", waits, roles="client")
    async with tether.connect(address) as peer:
        with pytest.raises(tether.InvokeTimeout):
            await peer.invoke("waits", timeout=0.3)
        assert await asyncio.wait_for(seen.get(), 10.0) is True


def test_thread_true_on_an_async_handler_is_a_type_error() -> None:
    main = tether.Main()

    async def job(call: tether.Call) -> None: ...

    with pytest.raises(TypeError, match=r"job\(\) is async: thread=True is for plain"):
        main.handle("job", job, thread=True)
    assert "job" not in main.registry.invokes


def test_the_pool_is_bounded() -> None:
    assert 1 <= threads.MAX_THREADS <= 32
    fut = threads.submit(threading.current_thread)
    assert fut.result(10.0).name.startswith("tether-handler")


async def test_threaded_invokes_waiting_for_a_thread_count_against_max_inflight(
    sock_path: str,
) -> None:
    spinner = Spinner()
    main = tether.Main(timeout=10.0, max_inflight=2)
    main.handle("spin", spinner.spin, thread=True)
    async with main:
        server = await main.listen(f"unix://{sock_path}")
        async with tether.connect(str(server.address)) as peer:
            jobs = [asyncio.ensure_future(peer.invoke("spin")) for _ in range(2)]
            assert await wait_event(spinner.started)
            with pytest.raises(tether.Busy):
                await peer.invoke("spin")
            spinner.release.set()
            assert all(r >= 0 for r in await asyncio.gather(*jobs))


# -- the blocking peer ---------------------------------------------------------------


async def test_blocking_peer_thread_handlers_run_beside_each_other_and_see_cancel(
    sock_path: str,
) -> None:
    """A sync Peer's thread=True handler leaves its in-order worker free; CANCEL sets the flag."""
    main = tether.Main(timeout=10.0)
    reached: asyncio.Queue[tether.sync.Peer] = asyncio.Queue()

    @main.handle("hello")
    def hello(call: tether.Call) -> None:
        reached.put_nowait(call.peer)

    spinner = Spinner()
    async with main:
        server = await main.listen(f"unix://{sock_path}")
        client = await asyncio.to_thread(tether.sync.connect, str(server.address))
        try:
            client.handle("spin", spinner.spin, thread=True)

            @client.handle("ping")
            def ping(call: tether.Call) -> str:
                return "pong"

            await asyncio.to_thread(client.invoke, "hello")
            peer = await asyncio.wait_for(reached.get(), 10.0)
            job = asyncio.ensure_future(peer.invoke("spin", timeout=30.0))
            assert await wait_event(spinner.started)
            assert spinner.thread.startswith("tether-handler")
            assert await peer.invoke("ping", timeout=10.0) == "pong"  # the worker is free
            job.cancel()
            assert await wait_event(spinner.stopped)
            assert spinner.saw_cancel
        finally:
            await asyncio.to_thread(client.close)


async def test_blocking_peer_plain_handlers_see_call_cancelled_too(sock_path: str) -> None:
    main = tether.Main(timeout=10.0)
    reached: asyncio.Queue[tether.sync.Peer] = asyncio.Queue()

    @main.handle("hello")
    def hello(call: tether.Call) -> None:
        reached.put_nowait(call.peer)

    spinner = Spinner()
    async with main:
        server = await main.listen(f"unix://{sock_path}")
        client = await asyncio.to_thread(tether.sync.connect, str(server.address))
        try:
            client.handle("spin", spinner.spin)  # on the peer's worker thread
            await asyncio.to_thread(client.invoke, "hello")
            peer = await asyncio.wait_for(reached.get(), 10.0)
            with pytest.raises(tether.InvokeTimeout):
                await peer.invoke("spin", timeout=0.5)
            assert await wait_event(spinner.stopped)
            assert spinner.saw_cancel
        finally:
            await asyncio.to_thread(client.close)


# -- bytes by type hint -----------------------------------------------------------------


@pytest.mark.parametrize("n", [SMALL, BIG])
async def test_a_bytes_parameter_gets_bytes_at_every_size(
    served: tuple[tether.Main, str, Spinner], n: int
) -> None:
    _, address, _ = served
    async with tether.connect(address) as peer:
        assert await peer.invoke("size", bytes(n)) == ["bytes", n]
        assert await peer.invoke("view", bytes(n)) == ["memoryview", n, True]


@pytest.mark.parametrize("n", [SMALL, BIG])
async def test_result_type_bytes_gives_bytes_at_every_size(
    served: tuple[tether.Main, str, Spinner], n: int
) -> None:
    _, address, _ = served
    async with tether.connect(address) as peer:
        got = await peer.invoke("blob", n, result_type=bytes)
        assert type(got) is bytes and len(got) == n
        view = await peer.invoke("blob", n, result_type=memoryview)
        assert type(view) is memoryview and view.nbytes == n
        with pytest.raises(tether.BadRequest, match="expected bytes, got str"):
            await peer.invoke("ping", result_type=bytes)


@pytest.mark.parametrize("n", [SMALL, BIG])
async def test_the_blocking_client_gets_bytes_by_type_too(
    served: tuple[tether.Main, str, Spinner], n: int
) -> None:
    _, address, _ = served

    def run() -> tuple[Any, Any, Any]:
        with tether.sync.connect(address) as peer:
            return (
                peer.invoke("size", bytes(n)),
                peer.invoke("blob", n, result_type=bytes),
                peer.invoke("blob", n, result_type=memoryview),
            )

    size, got, view = await asyncio.to_thread(run)
    assert size == ["bytes", n]
    assert type(got) is bytes and len(got) == n
    assert type(view) is memoryview and view.nbytes == n


def test_a_buffer_hint_keeps_the_view() -> None:
    from tether.codec import ArgsSpec, encoder

    def h(call: tether.Call, data: tether.Buffer, raw: bytearray) -> None: ...

    got = ArgsSpec(h).decode(encoder.encode((b"ab", b"cd")))
    assert type(got[0]) is memoryview and got[0].readonly and bytes(got[0]) == b"ab"
    assert type(got[1]) is bytearray and got[1] == bytearray(b"cd")


# -- registration-time checks ------------------------------------------------------------


def test_a_handler_without_the_call_parameter_is_refused_at_handle() -> None:
    main = tether.Main()

    def add(x: int) -> int:
        return x

    with pytest.raises(TypeError, match=r"add\(\).*first parameter 'x' is annotated int.*Call"):
        main.handle("add", add)

    def nothing() -> None: ...

    with pytest.raises(TypeError, match=r"nothing\(\) takes no positional parameter for the call"):
        main.handle("nothing", nothing)

    with pytest.raises(TypeError, match=r"first parameter receives the tether.Call"):
        main.on("ev", nothing)

    def keyword_only(*, call: tether.Call) -> None: ...

    with pytest.raises(TypeError, match="keyword_only"):
        main.handle("kw", keyword_only)
    assert set(main.registry.invokes) <= RESERVED_CHANNELS and not main.registry.events


def test_handlers_whose_first_parameter_may_be_the_call_are_accepted() -> None:
    main = tether.Main()

    def untyped(call, x):  # type: ignore[no-untyped-def]
        return x

    def anything(call: Any, x: int) -> int:
        return x

    def star(*args: Any) -> None: ...

    def base(call: object) -> None: ...

    for i, fn in enumerate((untyped, anything, star, base)):
        main.handle(f"ch{i}", fn)
    assert len(set(main.registry.invokes) - RESERVED_CHANNELS) == 4


@pytest.mark.parametrize(
    ("timeout", "error", "words"),
    [
        (math.nan, ValueError, "timeout must be >= 0"),
        (-1, ValueError, "timeout must be >= 0"),
        (-0.5, ValueError, "timeout must be >= 0"),
        ("5", TypeError, "timeout must be a number"),
        (True, TypeError, "timeout must be a number"),
    ],
)
async def test_a_bad_invoke_timeout_is_refused_naming_it(
    served: tuple[tether.Main, str, Spinner], timeout: Any, error: type[Exception], words: str
) -> None:
    _, address, _ = served
    async with tether.connect(address) as peer:
        with pytest.raises(error, match=words):
            await peer.invoke("ping", timeout=timeout)
        buf = tether.Buffer(16)
        with pytest.raises(error, match=words):
            await peer.invoke("ping", buf, timeout=timeout)
        with pytest.raises(tether.ConsumedError):
            buf.view()  # a refused call moves its Buffers, as any failed send
        assert await peer.invoke("ping", timeout=5) == "pong"  # an int is fine
        assert await peer.invoke("ping", timeout=math.inf) == "pong"  # forever

        def blocking() -> None:
            with tether.sync.connect(address) as sp, pytest.raises(error, match=words):
                sp.invoke("ping", timeout=timeout)

        await asyncio.to_thread(blocking)


# -- errors in tether's words --------------------------------------------------------------


async def test_argument_mismatches_read_like_python(
    served: tuple[tether.Main, str, Spinner],
) -> None:
    main, address, _ = served

    def add(call: tether.Call, a: int, b: int) -> int:
        return a + b

    main.handle("add", add, roles="client")
    async with tether.connect(address) as peer:
        with pytest.raises(tether.BadRequest) as info:
            await peer.invoke("add", 1)
        assert str(info.value) == "add() takes 2 arguments (a, b), got 1"
        with pytest.raises(tether.BadRequest) as info:
            await peer.invoke("add", 1, "two")
        assert str(info.value) == "add() argument 'b': expected int, got str"
        assert info.value.path == "b"
        with pytest.raises(tether.BadRequest) as info:
            await peer.invoke("size", 5)
        assert str(info.value) == "size() argument 'data': expected bytes, got int"
        with pytest.raises(tether.BadRequest) as info:
            await peer.invoke("ping", 5)
        assert str(info.value) == "ping() takes no arguments, got 1"


async def test_a_result_of_the_wrong_type_reads_like_python(
    served: tuple[tether.Main, str, Spinner],
) -> None:
    _, address, _ = served
    async with tether.connect(address) as peer:
        with pytest.raises(tether.BadRequest) as info:
            await peer.invoke("size", b"ab", result_type=list[int])
        assert str(info.value) == "result[0] does not match list[int]: expected int, got str"
        assert info.value.path == "result[0]"
        with pytest.raises(tether.BadRequest) as info:
            await peer.invoke("ping", result_type=int)
        assert str(info.value) == "result does not match int: expected int, got str"


async def test_call_send_to_a_caller_that_stops_reading_fails_within_drain_timeout(
    sock_path: str,
) -> None:
    """The thread's sends are bounded as any send: no queue grows for a peer that never reads."""
    from tether.protocol import Connection

    outcome: list[BaseException] = []
    done = threading.Event()
    blob = bytes(256 * 1024)

    def flood(call: tether.Call) -> None:
        try:
            for _ in range(10_000):  # 2.5 GiB if nothing pushed back
                call.send("blob", blob)
        except BaseException as exc:
            outcome.append(exc)
        finally:
            done.set()

    async with tether.Main(timeout=5.0, drain_timeout=0.5) as main:
        main.handle("flood", flood, thread=True)
        server = await main.listen(f"unix://{sock_path}")
        conn = Connection("client")
        raw = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            raw.connect(str(server.address.path))
            raw.sendall(bytes(conn.data_to_send()[0]))
            conn.send_invoke(b"flood", (), object())
            raw.sendall(bytes(conn.data_to_send()[0]))  # then never reads
            assert await wait_event(done, 20.0)
            assert len(outcome) == 1 and isinstance(outcome[0], tether.PeerGone)
            assert "stopped reading" in str(outcome[0])
        finally:
            raw.close()


def test_the_pool_runs_at_most_max_threads_at_once_and_queues_the_rest() -> None:
    pool = threads.HandlerPool(2)
    gate = threading.Event()
    running: list[str] = []
    lock = threading.Lock()

    def job(i: int) -> int:
        with lock:
            running.append(threading.current_thread().name)
        gate.wait(10.0)
        return i

    futs = [pool.submit(job, i) for i in range(5)]
    deadline = time.monotonic() + 10.0
    while len(running) < 2 and time.monotonic() < deadline:
        time.sleep(0.01)
    time.sleep(0.1)
    assert len(running) == 2  # the other three wait for a thread
    futs[4].cancel()  # still queued: never runs
    gate.set()
    assert [f.result(10.0) for f in futs[:4]] == [0, 1, 2, 3]
    assert futs[4].cancelled() and len(running) == 4
    assert all(t.daemon for t in threading.enumerate() if t.name == "tether-handler")


def test_a_handler_that_ignores_cancellation_does_not_keep_the_process_alive(
    tmp_path: Any,
) -> None:
    import subprocess
    import sys

    script = (
        "import time, tether.threads as t\n"
        "t.submit(time.sleep, 3600)\n"
        "time.sleep(0.2)\n"
        "print('exiting', flush=True)\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=30, check=False
    )
    assert result.returncode == 0 and result.stdout == "exiting\n", result.stderr


@pytest.mark.parametrize("n", [SMALL, BIG])
async def test_bytes_nested_in_a_struct_or_a_list_are_bytes_at_every_size(
    served: tuple[tether.Main, str, Spinner], n: int
) -> None:
    _, address, _ = served
    async with tether.connect(address) as peer:
        got = await peer.invoke(
            "packet", Packet(bytes(n), 1), [bytes(n), b"x"], bytes(n), result_type=Packet
        )
        assert type(got) is Packet and type(got.data) is bytes and len(got.data) == n + 1
        assert got.n == 3
        got = await peer.invoke("packet", Packet(b"", 0), [], None, result_type=Packet)
        assert got == Packet(b"!", 0)
        with pytest.raises(tether.BadRequest) as info:  # a real mismatch is still one
            await peer.invoke("packet", {"data": bytes(n), "n": "x"}, [], None)
        assert str(info.value) == "packet() argument 'p.n': expected int, got str"


async def test_blocking_peer_progress_from_a_thread_arrives_before_the_result(
    sock_path: str,
) -> None:
    main = tether.Main(timeout=10.0)
    reached: asyncio.Queue[tether.sync.Peer] = asyncio.Queue()
    seen: list[int] = []

    @main.handle("hello")
    def hello(call: tether.Call) -> None:
        reached.put_nowait(call.peer)

    @main.on("progress")
    def progress(call: tether.Call, i: int) -> None:
        seen.append(i)

    async with main:
        server = await main.listen(f"unix://{sock_path}")
        client = await asyncio.to_thread(tether.sync.connect, str(server.address))
        try:

            @client.handle("work", thread=True)
            def work(call: tether.Call, steps: int) -> str:
                for i in range(steps):
                    call.send("progress", i)
                return "done"

            await asyncio.to_thread(client.invoke, "hello")
            peer = await asyncio.wait_for(reached.get(), 10.0)
            assert await peer.invoke("work", 30) == "done"
            assert seen == list(range(30))
        finally:
            await asyncio.to_thread(client.close)


async def test_parameters_named_with_an_underscore_are_accepted_and_named_in_errors(
    sock_path: str,
) -> None:
    def scale(call: tether.Call, _factor: int, _k: int = 2) -> int:
        return _factor * _k

    async with tether.Main(timeout=10.0) as main:
        main.handle("scale", scale)
        await main.listen(f"unix://{sock_path}")
        async with tether.connect(f"unix://{sock_path}", timeout=10.0) as peer:
            assert await peer.invoke("scale", 3) == 6
            assert await peer.invoke("scale", 3, 5) == 15
            with pytest.raises(tether.BadRequest, match="scale\\(\\) argument '_factor'"):
                await peer.invoke("scale", "x")


async def test_an_unannotated_handler_without_the_call_says_who_got_the_call(
    sock_path: str,
) -> None:
    def noann(a):  # type: ignore[no-untyped-def]
        return a

    async with tether.Main(timeout=10.0) as main:
        main.handle("noann", noann)
        await main.listen(f"unix://{sock_path}")
        async with tether.connect(f"unix://{sock_path}", timeout=10.0) as peer:
            with pytest.raises(
                tether.BadRequest, match=r"its first parameter, 'a', receives the tether\.Call"
            ):
                await peer.invoke("noann", 5)
