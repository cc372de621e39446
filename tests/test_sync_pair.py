"""Two blocking peers over a socketpair, each driven by plain threads.

No event loop anywhere: what is tested is the blocking layer alone — both
sides writing at once (D12), inbound flow control (D4), one answer per invoke
whatever the handler does, and the errors callers see at the edges.
"""

from __future__ import annotations

import array
import os
import socket
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest

import tether
import tether.sync
from tether.protocol import Connection
from tether.sync.peer import HIGH_JOBS
from tether.wire import K_ERROR, K_RESULT

pytestmark = pytest.mark.timeout(60)

MIB = 1024 * 1024


def pair(
    family: int = socket.AF_UNIX, timeout: float = 20.0, **kw: Any
) -> tuple[tether.sync.Peer, tether.sync.Peer]:
    if family == socket.AF_UNIX:
        a, b = socket.socketpair()
    else:
        with socket.create_server(("127.0.0.1", 0)) as srv:
            a = socket.create_connection(srv.getsockname())
            b, _ = srv.accept()
    return (
        tether.sync.Peer(a, role="client", name="a", timeout=timeout, **kw),
        tether.sync.Peer(b, role="client", name="b", timeout=timeout, **kw),
    )


@pytest.fixture
def peers() -> Iterator[tuple[tether.sync.Peer, tether.sync.Peer]]:
    a, b = pair()
    try:
        yield a, b
    finally:
        a.close()
        b.close()


def run_threads(*fns: Callable[[], Any], timeout: float = 40.0) -> list[Any]:
    """Start every ``fn`` at once; return results (or the exception each raised)."""
    results: list[Any] = [None] * len(fns)
    start = threading.Barrier(len(fns))

    def runner(i: int, fn: Callable[[], Any]) -> None:
        start.wait(10)
        try:
            results[i] = fn()
        except BaseException as exc:
            results[i] = exc

    threads = [threading.Thread(target=runner, args=(i, fn)) for i, fn in enumerate(fns)]
    for th in threads:
        th.start()
    for th in threads:
        th.join(timeout)
    assert not any(th.is_alive() for th in threads), "a thread is stuck"
    return results


def wait_until(pred: Callable[[], bool], timeout: float = 10.0) -> None:
    end = time.monotonic() + timeout
    while not pred():
        assert time.monotonic() < end, "condition not reached in time"
        time.sleep(0.01)


# -- D12: both sides writing at once ------------------------------------------------------


@pytest.mark.parametrize("family", [socket.AF_UNIX, socket.AF_INET])
def test_two_peers_sending_big_events_to_each_other_at_once(family: int) -> None:
    """20 x 2 MiB events each way at once: all arrive (main's code: both PeerGone, 0 delivered)."""
    a, b = pair(family, timeout=10.0)
    got: dict[str, list[int]] = {"a": [], "b": []}
    payload = "x" * (2 * MIB)  # a str travels inline, never through shared memory
    try:
        for name, p in (("a", a), ("b", b)):

            def note(call: tether.sync.Call, i: int, s: str, name: str = name) -> None:
                assert len(s) == len(payload)
                got[name].append(i)

            p.on("big", note)

        def flood(p: tether.sync.Peer) -> int:
            for i in range(20):
                p.send("big", i, payload)
            return 20

        ra, rb = run_threads(lambda: flood(a), lambda: flood(b))
        assert (ra, rb) == (20, 20), (ra, rb)
        wait_until(lambda: len(got["a"]) == 20 and len(got["b"]) == 20, 20.0)
        assert got["a"] == list(range(20)) and got["b"] == list(range(20))
    finally:
        a.close()
        b.close()


def test_big_invokes_both_ways_from_many_threads(peers: tuple[Any, Any]) -> None:
    """Callers and the handlers' answers all write big frames at once; nobody stalls."""
    a, b = peers
    for p in (a, b):
        p.handle("echo", lambda call, s: s)
    payload = "y" * MIB

    def calls(p: tether.sync.Peer, t: int) -> int:
        for i in range(6):
            assert p.invoke("echo", f"{t}:{i}:{payload}") == f"{t}:{i}:{payload}"
        return t

    results = run_threads(*(lambda p=p, t=t: calls(p, t) for p in (a, b) for t in range(3)))
    assert results == [0, 1, 2, 0, 1, 2]


def test_a_writer_without_handlers_reads_while_it_waits() -> None:
    """Neither side has handlers and no thread waits for an answer: the writers read."""
    a, b = pair(timeout=10.0)
    payload = "z" * (4 * MIB)
    try:
        results = run_threads(
            lambda: [a.send("nobody", payload) for _ in range(5)],
            lambda: [b.send("nobody", payload) for _ in range(5)],
        )
        assert results == [[None] * 5, [None] * 5], results
    finally:
        a.close()
        b.close()


# -- D4: inbound flow control -------------------------------------------------------------


def test_flood_is_bounded_by_the_job_queue() -> None:
    """A peer flooding pipelined invokes and events while the handler is stuck is pushed back.

    The worker's queue never holds more than HIGH_JOBS jobs, the flooder's
    write stalls (the kernel buffer fills), and once the handler moves again
    every invoke is answered and every event delivered, in order.
    """
    sa, sb = socket.socketpair()
    gate = threading.Event()
    seen: list[int] = []
    peer = tether.sync.Peer(sb, role="client", name="b", timeout=30.0)

    @peer.handle("work")
    def work(call: tether.sync.Call, i: int, pad: bytes) -> int:
        gate.wait(30)
        return i

    @peer.on("note")
    def note(call: tether.sync.Call, i: int, pad: bytes) -> None:
        seen.append(i)

    n = 3000
    flooder = Connection("main")
    pad = b"p" * 1000
    for i in range(n):
        flooder.send_invoke(b"work", (i, pad), i)
        flooder.send_event(b"note", (i, pad))
    wire = bytes(flooder.data_to_send()[0])
    sent = threading.Event()
    answers: list[int] = []

    def write() -> None:
        sa.sendall(wire)
        sent.set()

    def read() -> None:
        while len(answers) < n:
            data = sa.recv(1 << 20)
            if not data:
                return
            for f in flooder.receive_data(data):
                assert f.kind in (K_RESULT, K_ERROR)
                if f.kind == K_RESULT:
                    answers.append(f.request_id)

    writer = threading.Thread(target=write, daemon=True)
    reader = threading.Thread(target=read, daemon=True)
    try:
        writer.start()
        reader.start()
        time.sleep(1.0)
        # The handler is stuck on the first invoke: the peer stopped reading.
        assert not sent.is_set(), "the whole flood was read while nothing was handled"
        assert 0 < peer.max_queued <= HIGH_JOBS
        gate.set()
        writer.join(30)
        reader.join(30)
        assert sent.is_set() and sorted(answers) == list(range(1, n + 1))
        wait_until(lambda: len(seen) == n, 20.0)
        assert seen == list(range(n))
        assert peer.max_queued <= HIGH_JOBS
    finally:
        gate.set()
        peer.close()
        sa.close()


def test_a_handler_that_invokes_back_is_answered_while_the_queue_is_full() -> None:
    """The worker waits on its own invoke: the reader must keep reading for that answer."""
    a, b = pair(timeout=20.0)
    try:
        a.handle("add", lambda call, x, y: x + y)

        @b.handle("relay")
        def relay(call: tether.sync.Call, i: int) -> int:
            return int(call.peer.invoke("add", i, 1, timeout=20.0))

        out = run_threads(
            *(lambda t=t: [a.invoke("relay", t * 100 + i) for i in range(50)] for t in range(4))
        )
        assert out == [[t * 100 + i + 1 for i in range(50)] for t in range(4)]
    finally:
        a.close()
        b.close()


# -- one answer per invoke -----------------------------------------------------------------


class BadStr(Exception):
    def __str__(self) -> str:
        raise RuntimeError("no description")


def _deep() -> list[Any]:
    x: list[Any] = []
    for _ in range(100_000):
        x = [x]
    return x


RAISERS: dict[str, Callable[[], Any]] = {
    "overflow": lambda: 2**70,
    "recursion": _deep,
    "unencodable": lambda: object(),
    "badstr": lambda: (_ for _ in ()).throw(BadStr()),
    "generatorexit": lambda: (_ for _ in ()).throw(GeneratorExit()),
    "cancelled": lambda: (_ for _ in ()).throw(__import__("asyncio").CancelledError()),
    "huge": lambda: (_ for _ in ()).throw(ValueError("v" * 200_000)),
}


@pytest.mark.parametrize("case", sorted(RAISERS))
def test_every_invoke_gets_one_answer(case: str) -> None:
    a, b = pair(timeout=5.0, max_frame_size=64 * 1024)
    try:
        b.handle(case, lambda call: RAISERS[case]())
        b.handle("echo", lambda call, x: x)
        with pytest.raises(tether.RemoteError) as ei:
            a.invoke(case)
        assert (
            ei.value.type_name
            in {
                "overflow": ("OverflowError",),
                "recursion": ("RecursionError",),
                "unencodable": ("TypeError",),
                "badstr": ("tests.test_sync_pair.BadStr", "test_sync_pair.BadStr"),
                "generatorexit": ("GeneratorExit",),
                "cancelled": ("asyncio.exceptions.CancelledError",),
                "huge": ("ValueError", "PayloadTooLarge", "tether.errors.PayloadTooLarge"),
            }[case]
        ), ei.value.type_name
        assert a.invoke("echo", 7) == 7  # the connection is still fine
    finally:
        a.close()
        b.close()


def test_system_exit_in_a_handler_is_answered_then_stops_the_serving_thread() -> None:
    a, b = pair(timeout=5.0)
    try:

        @b.handle("quit")
        def quit_(call: tether.sync.Call) -> None:
            raise SystemExit(3)

        with pytest.raises(tether.RemoteError) as ei:
            a.invoke("quit")
        assert ei.value.type_name == "SystemExit"
        with pytest.raises(SystemExit) as si:
            b.wait_closed(10.0)
        assert si.value.code == 3
        with pytest.raises(tether.PeerGone):
            a.invoke("quit")
    finally:
        a.close()
        b.close()


def test_tracebacks_can_be_left_out() -> None:
    a, b = pair(tracebacks=False)
    try:
        b.handle("boom", lambda call: 1 / 0)
        with pytest.raises(tether.RemoteError) as ei:
            a.invoke("boom")
        assert ei.value.type_name == "ZeroDivisionError"
        assert ei.value.remote_message == "division by zero"
        assert not ei.value.remote_traceback
    finally:
        a.close()
        b.close()


def test_a_cancelled_invoke_still_queued_is_not_run(peers: tuple[Any, Any]) -> None:
    a, b = peers
    gate = threading.Event()
    ran: list[int] = []

    @b.handle("slow")
    def slow(call: tether.sync.Call, i: int) -> int:
        ran.append(i)
        gate.wait(10)
        return i

    t = threading.Thread(target=lambda: a.invoke("slow", 0, timeout=10.0))
    t.start()
    wait_until(lambda: ran == [0])
    with pytest.raises(tether.InvokeTimeout):
        a.invoke("slow", 1, timeout=1.0)  # queued behind 0, then cancelled
    wait_until(lambda: not b._jobs)  # b's reader took the CANCEL: 1 left the queue
    gate.set()
    t.join(10)
    assert a.invoke("slow", 2) == 2
    assert ran == [0, 2]


# -- edges ---------------------------------------------------------------------------------


def test_handler_can_send_from_the_worker_thread(peers: tuple[Any, Any]) -> None:
    a, b = peers
    progress: list[int] = []
    a.on("progress", lambda call, i: progress.append(i))

    @b.handle("job")
    def job(call: tether.sync.Call, n: int) -> int:
        for i in range(n):
            call.peer.send("progress", i)
        return n

    assert a.invoke("job", 20) == 20
    wait_until(lambda: len(progress) == 20)
    assert progress == list(range(20))


def test_calls_after_the_peer_said_goodbye_raise_peer_gone(peers: tuple[Any, Any]) -> None:
    a, b = peers
    a.on("x", lambda call: None)  # a reader thread sees the GOODBYE
    b.close("done")
    wait_until(lambda: a.closed)
    with pytest.raises(tether.PeerGone):
        a.invoke("x")
    with pytest.raises(tether.PeerGone):
        a.send("x")


@pytest.mark.parametrize("bad", [None, 3, b"bytes", ["x"]])
def test_a_channel_that_is_not_a_str_is_a_type_error(peers: tuple[Any, Any], bad: Any) -> None:
    a, _ = peers
    with pytest.raises(TypeError, match="channel"):
        a.invoke(bad)
    with pytest.raises(TypeError, match="channel"):
        a.send(bad)


def test_closing_under_busy_readers_raises_only_tether_errors() -> None:
    """Threads reading, selecting and writing while another closes get ConnectionClosed/PeerGone."""
    for _ in range(10):
        a, b = pair(timeout=5.0)
        b.handle("slow", lambda call: time.sleep(0.05))
        try:

            def call(a: tether.sync.Peer = a) -> None:
                for _ in range(100):
                    a.invoke("slow")

            def closer(a: tether.sync.Peer = a) -> None:
                time.sleep(0.02)
                a.close()

            results = run_threads(call, call, call, closer, timeout=20.0)
            for r in results[:3]:
                assert isinstance(r, (tether.ConnectionClosed, tether.PeerGone)), repr(r)
        finally:
            a.close()
            b.close()


def test_both_sides_flooding_invokes_past_the_queue_mark_make_progress() -> None:
    """More calls in flight each way than the job queue holds, all writing big frames.

    Readers pause, so answers must not wait behind a writer stuck on a full
    socket: the worker leaves its answer to the lock's holder and moves on.
    """
    a, b = pair(timeout=30.0)
    payload = "q" * (128 * 1024)
    try:
        for p in (a, b):
            p.handle("echo", lambda call, s: len(s))

        def calls(p: tether.sync.Peer) -> int:
            return sum(p.invoke("echo", payload) for _ in range(3))

        n = HIGH_JOBS + 16
        results = run_threads(*(lambda p=p: calls(p) for p in (a, b) for _ in range(n)), timeout=50)
        assert results == [3 * len(payload)] * (2 * n), {repr(r)[:80] for r in results}
    finally:
        a.close()
        b.close()


def test_close_while_a_writer_is_stuck_is_prompt_and_says_connection_closed() -> None:
    """The other end never reads: the stuck writer gets ConnectionClosed, close() returns soon."""
    sa, sb = socket.socketpair()
    peer = tether.sync.Peer(sa, role="client", timeout=30.0)
    out: list[BaseException] = []
    stuck = threading.Event()

    def write() -> None:
        try:
            stuck.set()
            peer.send("big", "w" * (8 * MIB))
        except BaseException as exc:
            out.append(exc)

    th = threading.Thread(target=write)
    try:
        th.start()
        stuck.wait(5)
        time.sleep(0.3)  # the writer is now waiting for room in the socket
        t0 = time.monotonic()
        peer.close()
        assert time.monotonic() - t0 < 5.0
        th.join(10)
        assert not th.is_alive()
        assert len(out) == 1 and type(out[0]) is tether.ConnectionClosed, out
    finally:
        peer.close()
        sb.close()


def _open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def test_descriptors_that_do_not_fit_are_a_protocol_error(monkeypatch: pytest.MonkeyPatch) -> None:
    """MSG_CTRUNC (more descriptors than the ancillary buffer holds): closed, ProtocolError."""
    import tether.sync.peer as sync_peer

    monkeypatch.setattr(sync_peer, "_ANC_SPACE", socket.CMSG_SPACE(4))  # room for two
    sa, sb = socket.socketpair()
    fds0 = _open_fds()
    peer = tether.sync.Peer(sb, role="client", timeout=5.0)
    peer.on("x", lambda call: None)  # starts the reader
    r1, w1 = os.pipe()
    try:
        sa.sendmsg(
            [b"\0"], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", [r1, w1, r1, w1]))]
        )
        wait_until(lambda: peer.closed)
        with pytest.raises(tether.ProtocolError):
            peer.invoke("x")
    finally:
        peer.close()
        sa.close()
        os.close(r1)
        os.close(w1)
    wait_until(lambda: _open_fds() <= fds0)
