"""Main as a listening server: memory per connection and under floods, accept back-off,
listening addresses, roles, handler replacement and traceback policy.

The memory tests run a real listening Main in a fresh process on a unix socket
(:mod:`tether.bench.connmem`, the bench's own code) and read its RSS from /proc.
"""

from __future__ import annotations

import asyncio
import errno
import gc
import logging
import os
import socket
import subprocess
import sys
import time
import tracemalloc
import weakref
from collections.abc import AsyncIterator, Iterator

import msgspec
import pytest

import _targets
import tether
from tether.bench import connmem
from tether.wire import Kind, encode_frame

pytestmark = pytest.mark.timeout(60)

KiB = 1024


def _hello_bytes() -> bytes:
    from tether import codec

    out = bytearray()
    hello = codec.Hello(protocol=codec.PROTOCOL_NAME, version=codec.PROTOCOL_VERSION, role="x")
    encode_frame(out, Kind.HELLO, 0, 0, b"", codec.encoder.encode(hello))
    return bytes(out)


async def _until(cond: object, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():  # type: ignore[operator]
        if time.monotonic() > deadline:
            raise TimeoutError("condition not reached")
        await asyncio.sleep(0.005)


# -- a closed connection is released at once ----------------------------------------------


@pytest.fixture
def no_gc() -> Iterator[None]:
    """Cyclic GC off: what is freed here is freed by reference counting, at once.

    Logging is off too: pytest keeps every log record, and with it the peer
    a warning names.
    """
    gc.collect()
    gc.disable()
    logging.disable(logging.CRITICAL)
    try:
        yield
    finally:
        logging.disable(logging.NOTSET)
        gc.enable()


async def _raw(path: str) -> socket.socket:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.setblocking(False)
    await asyncio.get_running_loop().sock_connect(s, path)
    return s


@pytest.mark.parametrize("how", ["reset", "garbage", "claimed_big_frame", "hello_then_eof"])
async def test_closed_connection_is_released_at_once(no_gc: None, sock_path: str, how: str) -> None:
    """No timer, cycle or traceback keeps a closed peer: it is gone without the cyclic GC."""
    loop = asyncio.get_running_loop()
    async with tether.Main(hello_timeout=30.0) as main:
        await main.listen(f"unix://{sock_path}")
        s = await _raw(sock_path)
        await _until(lambda: main.peers)
        ref = weakref.ref(next(iter(main.peers)))
        assert await loop.sock_recv(s, 4096)  # main's HELLO
        if how == "garbage":
            await loop.sock_sendall(s, b"\xff" * 300)
        elif how == "claimed_big_frame":  # a 60 MiB frame announced, 300 bytes sent
            await loop.sock_sendall(s, (60 << 20).to_bytes(4, "little") + b"\0" * 296)
        elif how == "hello_then_eof":
            await loop.sock_sendall(s, _hello_bytes())
            await _until(lambda: ref() is not None and ref().remote_hello is not None)  # type: ignore[union-attr]
        s.close()
        await _until(lambda: not main.peers)
        await asyncio.sleep(0.01)
        assert ref() is None, gc.get_referrers(ref())


async def test_silent_connection_is_released_when_its_deadline_drops_it(
    no_gc: None, sock_path: str
) -> None:
    async with tether.Main(hello_timeout=0.1) as main:
        await main.listen(f"unix://{sock_path}")
        s = await _raw(sock_path)
        try:
            await _until(lambda: main.peers)
            ref = weakref.ref(next(iter(main.peers)))
            await _until(lambda: not main.peers, timeout=5.0)
            await asyncio.sleep(0.01)
            assert ref() is None
        finally:
            s.close()


# -- memory: idle connections and floods, against a real Main in its own process ------------


def _need(n: int) -> None:
    why = connmem.nofile_shortfall(n)
    if why is not None:
        pytest.skip(why)


def test_idle_connection_costs_main_at_most_16_kib(sock_path: str) -> None:
    _need(2000)
    stats = connmem.idle("tether", 2000, sock_path)
    assert stats["kib_per_connection"] <= 16, stats


def test_main_holds_ten_thousand_idle_connections(sock_path: str) -> None:
    _need(10000)
    stats = connmem.idle("tether", 10000, sock_path)  # waits until main holds all of them
    assert stats["kib_per_connection"] <= 16, stats
    print(f"10,000 idle connections: {stats}")


def test_garbage_flood_leaves_main_rss_and_peak_within_100_mib(sock_path: str) -> None:
    """20,000 connections of 300 bytes each: random, random after main's HELLO, or a
    HELLO and a frame header claiming 60 MiB (see :func:`tether.bench.connmem.flood`)."""
    limit = 100 * KiB  # KiB
    stats = connmem.flood(20000, sock_path, stop_above_kib=limit)
    assert not stats["stopped"], f"RSS grew past 100 MiB after {stats['n']} connections: {stats}"
    assert stats["end_kib"] - stats["start_kib"] < limit, stats
    assert stats["peak_kib"] - stats["start_kib"] < limit, stats
    print(f"20,000 garbage connections: {stats}")


def test_a_first_frame_claiming_more_than_a_hello_is_refused_before_allocation() -> None:
    """A stranger's length field is not allocated: main refuses it, whatever arrives next."""
    from tether.protocol import Connection

    conn = Connection("main")
    with pytest.raises(tether.ProtocolError, match="exceeds"):
        conn.receive_data((60 << 20).to_bytes(4, "little") + bytes(296))
    # After a HELLO, a large frame may follow at once (pipelined) and span reads.
    conn = Connection("main")
    big = bytearray()
    encode_frame(big, Kind.EVENT, 0, 0, b"ev", msgspec.msgpack.encode([bytes(200_000)]))
    data = _hello_bytes() + bytes(big)
    assert conn.receive_data(data[:1000]) == []
    (frame,) = conn.receive_data(data[1000:])
    assert frame.channel == "ev" and conn.peer_hello is not None


def test_a_claimed_frame_length_costs_only_the_bytes_that_arrived() -> None:
    """After the HELLO too: 60 MiB announced and 296 bytes sent is 296 bytes buffered."""
    from tether.protocol import Connection

    conn = Connection("main")
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        conn.receive_data(_hello_bytes() + (60 << 20).to_bytes(4, "little") + bytes(296))
        for _ in range(3):
            conn.receive_data(bytes(1000))
        grown = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    assert grown < 256 * KiB, f"{grown} bytes held for 3,296 bytes received"


# -- accept backs off when out of descriptors ---------------------------------------------------

_EMFILE_SERVER = r"""
import asyncio, os, resource, socket, sys
import tether

accepts = 0
_accept = socket.socket.accept

def counting_accept(self):
    global accepts
    accepts += 1
    return _accept(self)

socket.socket.accept = counting_accept
hogged = []

def hog(call):
    try:
        while True:
            hogged.append(os.open("/dev/null", os.O_RDONLY))
    except OSError:
        return len(hogged)

def free(call):
    while hogged:
        os.close(hogged.pop())

async def amain():
    resource.setrlimit(resource.RLIMIT_NOFILE, (64, resource.getrlimit(resource.RLIMIT_NOFILE)[1]))
    async with tether.Main() as main:
        main.handle("hog", hog)
        main.handle("free", free)
        main.handle("accepts", lambda call: accepts)
        main.handle("ping", lambda call: "pong")
        await main.listen("unix://" + sys.argv[1])
        print("ready", flush=True)
        await asyncio.get_running_loop().run_in_executor(None, sys.stdin.read)

if sys.argv[2] == "uvloop":
    import uvloop
    uvloop.run(amain())
else:
    asyncio.run(amain())
"""


def _loops() -> list[str]:
    try:
        import uvloop  # noqa: F401
    except ImportError:
        return ["asyncio"]
    return ["asyncio", "uvloop"]


@pytest.mark.parametrize("loop_name", _loops())
async def test_accept_out_of_descriptors_backs_off(
    sock_path: str, child_env: dict[str, str], loop_name: str
) -> None:
    """EMFILE in accept: main stops watching the listener for a while instead of spinning."""
    proc = subprocess.Popen(
        [sys.executable, "-c", _EMFILE_SERVER, sock_path, loop_name],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=child_env,
    )
    err = b""
    try:
        assert proc.stdout is not None
        line = await asyncio.wait_for(asyncio.to_thread(proc.stdout.readline), 20.0)
        assert line.strip() == b"ready"
        async with tether.connect(f"unix://{sock_path}", timeout=10.0) as peer:
            assert await peer.invoke("hog") > 0  # main's descriptor table is now full
            waiting = await _raw(sock_path)  # sits in the backlog: accept fails with EMFILE
            try:
                await asyncio.sleep(0.2)
                before = await peer.invoke("accepts")
                t0 = time.monotonic()
                await asyncio.sleep(1.0)
                assert await peer.invoke("ping", timeout=2.0) == "pong"  # still responsive
                calls = await peer.invoke("accepts") - before
                elapsed = time.monotonic() - t0
                # Backing off retries about 10 times a second; spinning, thousands of times.
                assert calls <= 40 * elapsed, f"{calls} accept calls in {elapsed:.2f} s"
                await peer.invoke("free")
                # Descriptors are back: the waiting connection is accepted and greeted.
                hello = await asyncio.wait_for(
                    asyncio.get_running_loop().sock_recv(waiting, 4096), 5.0
                )
                assert hello
            finally:
                waiting.close()
    finally:
        try:
            _, err = proc.communicate(timeout=10)  # closes stdin: the server ends
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.communicate(timeout=5)
    # One warning when accepting stopped and one when it resumed, not one per retry.
    log = err.decode()
    assert log.count("accept failed") == 1, log
    assert log.count("accepting again") == 1, log


# -- listen ----------------------------------------------------------------------------------------


@pytest.fixture
async def main() -> AsyncIterator[tether.Main]:
    async with tether.Main(timeout=10.0) as m:
        _targets.install_main_handlers(m)
        yield m


async def test_listen_on_a_live_servers_path_raises_and_keeps_it(
    main: tether.Main, sock_path: str
) -> None:
    await main.listen(f"unix://{sock_path}")
    async with tether.Main() as other:
        with pytest.raises(OSError) as ei:
            await other.listen(f"unix://{sock_path}")
        assert ei.value.errno == errno.EADDRINUSE
        assert sock_path in str(ei.value)
    async with tether.connect(f"unix://{sock_path}") as peer:  # the first is still reachable
        assert await peer.invoke("echo", 1) == 1


async def test_close_removes_only_its_own_socket_file(main: tether.Main, sock_path: str) -> None:
    first = await main.listen(f"unix://{sock_path}")
    os.unlink(sock_path)  # someone removed it; a second server takes the path
    second = await main.listen(f"unix://{sock_path}")
    first.close()
    assert os.path.exists(sock_path)
    async with tether.connect(str(second.address)) as peer:
        assert await peer.invoke("echo", 2) == 2


async def test_listen_role_must_be_one_str(main: tether.Main, sock_path: str) -> None:
    with pytest.raises(TypeError, match="role must be a str"):
        await main.listen(f"unix://{sock_path}", role=["admin"])  # type: ignore[arg-type]
    assert not os.path.exists(sock_path)


# -- roles, handlers ------------------------------------------------------------------------------


async def test_roles_str_is_one_role_over_a_connection(main: tether.Main, sock_path: str) -> None:
    main.handle("admin_only", lambda call: "secret", roles="admin")
    a = await main.listen(f"unix://{sock_path}", role="a")
    admin = await main.listen("tcp://127.0.0.1:0", role="admin")
    async with tether.connect(str(a.address)) as peer:
        with pytest.raises(tether.Forbidden):
            await peer.invoke("admin_only")
    async with tether.connect(str(admin.address)) as peer:
        assert await peer.invoke("admin_only") == "secret"


async def test_remove_handler_on_main_and_on_a_peer(main: tether.Main, sock_path: str) -> None:
    server = await main.listen(f"unix://{sock_path}")
    with pytest.raises(ValueError, match="'echo'"):
        main.handle("echo", lambda call, x: x)
    async with tether.connect(str(server.address)) as peer:
        main.remove_handler("echo")
        with pytest.raises(tether.NoHandler):
            await peer.invoke("echo", 1)
        main.handle("echo", lambda call, x: [x])
        assert await peer.invoke("echo", 1) == [1]
        # A peer's own handlers: main invokes the client.
        peer.handle("ask", lambda call: "yes")
        with pytest.raises(ValueError, match="'ask'"):
            peer.handle("ask", lambda call: "no")
        theirs = next(iter(main.peers))
        assert await theirs.invoke("ask") == "yes"
        peer.remove_handler("ask")
        with pytest.raises(tether.NoHandler):
            await theirs.invoke("ask")


# -- arguments are checked at construction ------------------------------------------------------


@pytest.mark.parametrize(
    ("kw", "error"),
    [
        ({"timeout": "5"}, TypeError),
        ({"timeout": -1}, ValueError),
        ({"timeout": 0}, ValueError),
        ({"hello_timeout": 0}, ValueError),
        ({"spawn_timeout": None}, TypeError),
        ({"close_timeout": float("nan")}, ValueError),
        ({"spin": -0.1}, ValueError),
        ({"max_frame_size": 0}, ValueError),
        ({"max_frame_size": 1.5}, TypeError),
        ({"start_method": "thread"}, ValueError),
    ],
)
def test_main_refuses_impossible_arguments_at_once(kw: dict[str, object], error: type) -> None:
    name = next(iter(kw))
    with pytest.raises(error, match=name):
        tether.Main(**kw)  # type: ignore[arg-type]


def test_main_accepts_its_documented_arguments() -> None:
    main = tether.Main(timeout=None, spin=0.0, hello_timeout=1, start_method="fork")
    assert main.timeout is None and main.hello_timeout == 1 and main.start_method == "fork"


# -- which peers get tracebacks -----------------------------------------------------------------


def test_main_tracebacks_must_be_one_of_three() -> None:
    for ok in ("children", "all", "none"):
        assert tether.Main(tracebacks=ok).tracebacks == ok
    with pytest.raises(ValueError, match="tracebacks"):
        tether.Main(tracebacks="some")


@pytest.mark.parametrize(
    ("mode", "listened", "child"),
    [("children", False, True), ("all", True, True), ("none", False, False)],
)
async def test_tracebacks_policy_reaches_accepted_peers_and_children(
    sock_path: str, mode: str, listened: bool, child: bool
) -> None:
    async with tether.Main(tracebacks=mode, timeout=20.0) as main:
        await main.listen(f"unix://{sock_path}")
        async with tether.connect(f"unix://{sock_path}") as client:
            await _until(lambda: main.peers)
            (accepted,) = main.peers
            assert accepted.tracebacks is listened
            assert client.tracebacks is True  # a client trusts main by default
        async with tether.connect(f"unix://{sock_path}", tracebacks=False) as client:
            assert client.tracebacks is False
        kid = await main.spawn(_targets.serve_basic, start_method="fork")
        assert kid.tracebacks is child


def test_bench_measures_websockets_idle_connections_the_same_way() -> None:
    """The bench's websockets row: a real server, the same client and the same RSS reading."""
    from tether.bench.runner import run_once
    from tether.bench.scenarios import SCENARIOS, Run

    _need(2000)
    result = run_once(Run(SCENARIOS["mem_websockets_idle"], "", {"quick": True}), timeout=50.0)
    if "unavailable" in result:
        pytest.skip(result["unavailable"])
    assert "error" not in result, result
    (metric,) = result["metrics"]
    assert metric["metric"] == "idle connection" and metric["unit"] == "KiB"
    assert 1.0 < metric["samples"][0] < 1000.0, result
    assert result["info"]["websockets_idle"]["n"] == 2000


def test_main_refuses_a_frame_limit_below_the_protocol_floor() -> None:
    with pytest.raises(ValueError, match="at least 4096"):
        tether.Main(max_frame_size=10)
    tether.Main(max_frame_size=4096)


async def test_refusals_are_counted_but_logged_a_few_times_a_second(
    sock_path: str, caplog: pytest.LogCaptureFixture
) -> None:
    async with tether.Main(timeout=10.0) as main:
        server = await main.listen(f"unix://{sock_path}")

        def hang_ups() -> None:
            for _ in range(200):  # connect, then leave before saying HELLO
                s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                s.connect(sock_path)
                s.close()

        with caplog.at_level(logging.WARNING, logger="tether"):
            await asyncio.to_thread(hang_ups)
            deadline = time.monotonic() + 10.0
            while server.refused < 200 and time.monotonic() < deadline:
                await asyncio.sleep(0.01)
        assert server.refused == 200
        lines = [r for r in caplog.records if "refused" in r.getMessage()]
        assert 1 <= len(lines) <= 3 * tether.Server.REFUSALS_LOGGED
