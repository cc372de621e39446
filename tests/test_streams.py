"""Streams (issue 11, item 1): generator handlers, credit flow control, early exit, errors.

Each test runs a listening Main whose handlers stream, and a client that
reads; the producer's side effects (items yielded, ``finally`` run) are
recorded in the Main's process, so they are observed, not assumed.
"""

from __future__ import annotations

import asyncio
import socket
import threading
from collections.abc import AsyncIterator, Iterator
from typing import Any

import msgspec
import pytest

import _stream_targets
import tether
import tether.sync
from tether import codec
from tether.protocol import Connection
from tether.streams import DEFAULT_WINDOW, Inbound, credit_body
from tether.wire import Frame, Kind, encode_frame

pytestmark = pytest.mark.timeout(120)


class Record:
    """What the producers did: items yielded, ``finally`` blocks run (and where)."""

    def __init__(self) -> None:
        self.yielded = 0
        self.finals: list[str] = []
        self.final = asyncio.Event()
        self.started = asyncio.Event()
        self.threads: set[int] = set()

    def ended(self, name: str) -> None:
        self.finals.append(name)
        self.final.set()


def install(main: tether.Main, rec: Record) -> None:
    @main.handle("tokens", roles="client")
    async def tokens(call: tether.Call, prompt: str) -> AsyncIterator[str]:
        for word in prompt.split():
            yield word

    @main.handle("count", roles="client")
    async def count(call: tether.Call, n: int) -> AsyncIterator[int]:
        try:
            for i in range(n):
                rec.yielded += 1
                rec.started.set()
                yield i
        finally:
            rec.ended("count")

    @main.handle("count_sync", roles="client")
    def count_sync(call: tether.Call, n: int) -> Iterator[int]:
        try:
            for i in range(n):
                rec.yielded += 1
                yield i
        finally:
            rec.ended("count_sync")

    @main.handle("forever", roles="client")
    async def forever(call: tether.Call) -> AsyncIterator[int]:
        i = 0
        try:
            while True:
                rec.yielded += 1
                rec.started.set()
                yield i
                i += 1
        finally:
            rec.ended("forever")

    @main.handle("slow", roles="client")
    async def slow(call: tether.Call, first: int) -> AsyncIterator[int]:
        try:
            yield first
            rec.started.set()
            await asyncio.sleep(3600)
            yield first + 1
        finally:
            rec.ended("slow")

    @main.handle("fails", roles="client")
    async def fails(call: tether.Call, n: int) -> AsyncIterator[int]:
        for i in range(n):
            yield i
        raise ValueError("boom after items")

    @main.handle("plain", roles="client")
    async def plain(call: tether.Call, x: int) -> int:
        return x + 1

    @main.handle("threaded", roles="client", thread=True)
    def threaded(call: tether.Call, n: int) -> Iterator[int]:
        try:
            for i in range(n):
                rec.threads.add(threading.get_ident())
                yield i
        finally:
            rec.finals.append("threaded")  # on a worker thread: no asyncio.Event here

    @main.handle("blobs", roles="client")
    def blobs(call: tether.Call, n: int, size: int) -> Iterator[bytes]:
        for i in range(n):
            yield bytes([i % 256]) * size


@pytest.fixture(params=["unix", "tcp"])
async def served(
    request: pytest.FixtureRequest, sock_path: str
) -> AsyncIterator[tuple[str, Record]]:
    main = tether.Main(timeout=20.0)
    rec = Record()
    install(main, rec)
    async with main:
        url = f"unix://{sock_path}" if request.param == "unix" else "tcp://127.0.0.1:0"
        server = await main.listen(url)
        yield str(server.address), rec


async def _wait(ev: asyncio.Event, what: str = "") -> None:
    await asyncio.wait_for(ev.wait(), 20.0)


# -- items --------------------------------------------------------------------------


async def test_async_generator_streams_its_items(served: tuple[str, Record]) -> None:
    address, _ = served
    async with tether.connect(address) as peer:
        words = [w async for w in peer.stream("tokens", "a b c")]
        assert words == ["a", "b", "c"]
        # the connection is still usable: a plain invoke after a stream
        assert await peer.invoke("plain", 1) == 2


async def test_plain_generator_streams_and_runs_finally(served: tuple[str, Record]) -> None:
    address, rec = served
    async with tether.connect(address) as peer:
        assert [x async for x in peer.stream("count_sync", 5)] == [0, 1, 2, 3, 4]
    await _wait(rec.final)
    assert rec.finals == ["count_sync"]


async def test_hundred_thousand_items(served: tuple[str, Record]) -> None:
    address, rec = served
    async with tether.connect(address) as peer:
        total = 0
        n = 0
        async for x in peer.stream("count", 100_000, item_type=int, timeout=90.0):
            total += x
            n += 1
        assert n == 100_000 and total == sum(range(100_000))
    assert rec.yielded == 100_000


async def test_item_type_is_validated_on_the_reading_side(served: tuple[str, Record]) -> None:
    address, _ = served
    async with tether.connect(address) as peer:
        s = peer.stream("tokens", "a b", item_type=int)
        with pytest.raises(tether.BadRequest, match=r"^item does not match int"):
            await s.__anext__()
        # the stream is over for the reader
        with pytest.raises(StopAsyncIteration):
            await s.__anext__()


async def test_large_items_travel_as_attachments(served: tuple[str, Record]) -> None:
    address, _ = served
    async with tether.connect(address) as peer:
        sizes = [
            bytes(b)[:1] + bytes([len(b) % 251]) async for b in peer.stream("blobs", 5, 200_000)
        ]
        assert sizes == [bytes([i, 200_000 % 251]) for i in range(5)]


# -- flow control ---------------------------------------------------------------------


@pytest.mark.parametrize("window", [1, 8, DEFAULT_WINDOW])
async def test_slow_reader_bounds_what_the_producer_made(
    served: tuple[str, Record], window: int
) -> None:
    """Measured: yielded - consumed never exceeds the window while the reader sleeps."""
    address, rec = served
    async with tether.connect(address) as peer:
        consumed = 0
        worst = 0
        async with peer.stream("forever", window=window) as s:
            async for _ in s:
                consumed += 1
                # The reader dawdles: the producer had every chance to run ahead.
                await asyncio.sleep(0.2 if consumed in (1, 2 * window) else 0)
                worst = max(worst, rec.yielded - consumed)
                assert rec.yielded - consumed <= window
                if consumed == 3 * window + 2:
                    break
        assert worst == window  # it did fill the window (so the bound was tested)
        await _wait(rec.final)
        assert rec.finals == ["forever"]
        # after the CANCEL the producer made nothing more
        made = rec.yielded
        await asyncio.sleep(0.2)
        assert rec.yielded == made


async def test_stalled_reader_holds_at_most_a_window_on_either_side(
    served: tuple[str, Record],
) -> None:
    address, rec = served
    async with tether.connect(address) as peer:
        s = peer.stream("forever", window=16)
        assert await s.__anext__() == 0
        await asyncio.sleep(0.5)  # not reading
        assert rec.yielded <= 1 + 16
        assert len(s._in.items) <= 16  # what the reader buffered
        await s.aclose()
        await _wait(rec.final)


def test_inbound_accounting_refuses_items_beyond_credit() -> None:
    inb = Inbound(2)
    f = Frame(Kind.ITEM, 5)
    inb.on_item(f)
    inb.on_item(f)
    with pytest.raises(tether.ProtocolError):
        inb.on_item(f)
    inb.take()
    assert inb.regrant() == 1  # half of 2, rounded up
    inb.on_item(f)


# -- leaving early ------------------------------------------------------------------


async def test_break_stops_the_generator_and_runs_finally(served: tuple[str, Record]) -> None:
    address, rec = served
    async with tether.connect(address) as peer:
        async for x in peer.stream("forever"):
            if x == 3:
                break
        await _wait(rec.final)
        assert rec.finals == ["forever"]
        assert await peer.invoke("plain", 1) == 2


async def test_exception_in_the_loop_stops_the_generator(served: tuple[str, Record]) -> None:
    address, rec = served
    async with tether.connect(address) as peer:

        async def consume() -> None:
            async for x in peer.stream("forever"):
                if x == 2:
                    raise KeyError("reader failed")

        with pytest.raises(KeyError):
            await consume()
        await _wait(rec.final)
        assert rec.finals == ["forever"]


async def test_cancelling_the_reader_stops_the_generator(served: tuple[str, Record]) -> None:
    address, rec = served
    async with tether.connect(address) as peer:
        got: list[int] = []

        async def consume() -> None:
            async for x in peer.stream("slow", 7):
                got.append(x)

        task = asyncio.create_task(consume())
        await _wait(rec.started)
        await asyncio.sleep(0.05)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        await _wait(rec.final)
        assert got == [7] and rec.finals == ["slow"]


async def test_item_timeout_stops_the_generator(served: tuple[str, Record]) -> None:
    address, rec = served
    async with tether.connect(address) as peer:
        got: list[int] = []
        with pytest.raises(tether.InvokeTimeout, match="no item within"):
            async for x in peer.stream("slow", 1, item_timeout=0.3):
                got.append(x)
        await _wait(rec.final)
        assert got == [1] and rec.finals == ["slow"]


async def test_item_timeout_defaults_to_the_peers_timeout(served: tuple[str, Record]) -> None:
    address, rec = served
    async with tether.connect(address, timeout=0.3) as peer:
        with pytest.raises(tether.InvokeTimeout, match=r"no item within 0\.3 s"):
            async for _ in peer.stream("slow", 1):
                pass
        await _wait(rec.final)


async def test_whole_stream_timeout_stops_the_generator(served: tuple[str, Record]) -> None:
    address, rec = served
    async with tether.connect(address) as peer:
        got = 0
        with pytest.raises(tether.InvokeTimeout, match="not finished within"):
            async for _ in peer.stream("forever", timeout=0.5, item_timeout=None):
                got += 1
                await asyncio.sleep(0.01)
        assert got > 0
        await _wait(rec.final)
        assert rec.finals == ["forever"]


async def test_thread_handler_generator_steps_on_a_worker_thread(
    served: tuple[str, Record],
) -> None:
    address, rec = served
    async with tether.connect(address) as peer:
        assert [x async for x in peer.stream("threaded", 5)] == [0, 1, 2, 3, 4]
        assert rec.threads and threading.get_ident() not in rec.threads
        await _until(lambda: rec.finals == ["threaded"])
        async for x in peer.stream("threaded", 10**9, window=2):
            if x == 3:
                break
        await _until(lambda: rec.finals == ["threaded", "threaded"])


# -- errors ---------------------------------------------------------------------------


async def test_exception_in_generator_after_items(served: tuple[str, Record]) -> None:
    address, _ = served
    async with tether.connect(address) as peer:
        got: list[int] = []
        with pytest.raises(tether.RemoteError, match="boom after items") as info:
            async for x in peer.stream("fails", 3):
                got.append(x)
        assert got == [0, 1, 2]
        assert info.value.type_name == "ValueError"


async def test_stream_on_a_plain_channel_is_a_stream_mismatch(served: tuple[str, Record]) -> None:
    address, _ = served
    async with tether.connect(address) as peer:
        with pytest.raises(tether.StreamMismatch, match="invoke"):
            async for _ in peer.stream("plain", 1):
                pass
        assert await peer.invoke("plain", 1) == 2


async def test_invoke_on_a_stream_channel_is_a_stream_mismatch(
    served: tuple[str, Record],
) -> None:
    address, rec = served
    async with tether.connect(address) as peer:
        with pytest.raises(tether.StreamMismatch, match="stream"):
            await peer.invoke("count", 3)
        with pytest.raises(tether.StreamMismatch):
            await peer.invoke("count_sync", 3)
        assert rec.yielded == 0  # the generator never ran


async def test_unknown_channel_and_bad_arguments(served: tuple[str, Record]) -> None:
    address, _ = served
    async with tether.connect(address) as peer:
        with pytest.raises(tether.NoHandler):
            await peer.stream("nope").__anext__()
        with pytest.raises(tether.BadRequest):
            await peer.stream("count", "x").__anext__()


async def test_connection_lost_mid_stream(sock_path: str) -> None:
    """The reader sees PeerGone; the producer's generator is closed (its finally runs)."""
    rec = Record()
    main = tether.Main(timeout=20.0)
    install(main, rec)
    async with main:
        server = await main.listen(f"unix://{sock_path}")
        peer = await tether.connect(str(server.address))
        # the producer side of the connection: Main's peer
        got: list[int] = []
        with pytest.raises(tether.PeerGone):
            async for x in peer.stream("forever", window=4):
                got.append(x)
                if len(got) == 2:
                    (mpeer,) = main.peers
                    mpeer.abort(tether.PeerGone("dropped by the test"))
        assert got[:2] == [0, 1]
        await _wait(rec.final)
        assert rec.finals == ["forever"]
        await peer.close()


# -- the wire ---------------------------------------------------------------------------


def _open_pair() -> tuple[Connection, Connection]:
    a, b = Connection("client"), Connection("main")
    b.receive_data(bytes(a.data_to_send()[0]))
    a.receive_data(bytes(b.data_to_send()[0]))
    return a, b


def test_stream_feature_is_negotiated() -> None:
    a, b = _open_pair()
    assert a.streams and b.streams
    assert a.peer_hello is not None and "stream" in a.peer_hello.features


def test_json_connections_announce_no_streams() -> None:
    """A page's connection (JSON bodies, tether.js) gets no streams: main does not offer them."""
    page_side = Connection("main", encoding="json")
    hello = bytes(page_side.data_to_send()[0])
    assert b"stream" not in hello and b"json" in hello


def test_stream_frames_from_a_peer_without_the_feature_are_refused() -> None:
    a = Connection("client")
    hello = codec.encoder.encode(codec.Hello(protocol="tether", version=1, role="main"))
    data = bytearray()
    encode_frame(data, Kind.HELLO, 0, 0, b"", hello)
    a.receive_data(bytes(data))
    assert not a.streams
    with pytest.raises(tether.StreamMismatch):
        a.send_stream(b"tokens", ("x",), object(), 4)
    credit = bytearray()
    encode_frame(credit, Kind.CREDIT, 1, 0, b"", credit_body(3))
    with pytest.raises(tether.ProtocolError, match="stream"):
        a.receive_data(bytes(credit))


def test_stream_frames_cross_the_core() -> None:
    a, b = _open_pair()
    waiter = object()
    rid = a.send_stream(b"tokens", ("a b",), waiter, 8)
    frames = b.receive_data(bytes(a.data_to_send()[0]))
    assert [(f.kind, f.request_id, f.channel) for f in frames] == [
        (Kind.STREAM, rid, "tokens"),
        (Kind.CREDIT, rid, ""),
    ]
    assert msgspec.msgpack.decode(frames[1].body) == 8
    b.send_item(rid, "a")
    b.answer(rid, None)
    frames = a.receive_data(bytes(b.data_to_send()[0]))
    assert [(f.kind, f.request_id) for f in frames] == [(Kind.ITEM, rid), (Kind.RESULT, rid)]
    assert a.take_pending(rid) is waiter


def test_stream_with_request_id_zero_is_refused() -> None:
    _, b = _open_pair()
    bad = bytearray()
    encode_frame(bad, Kind.STREAM, 0, 0, b"x", msgspec.msgpack.encode([]))
    with pytest.raises(tether.ProtocolError):
        b.receive_data(bytes(bad))


async def test_hostile_producer_beyond_credit_is_dropped(sock_path: str) -> None:
    """Items past the credit granted break the protocol: the reader drops the peer."""
    listener = socket.socket(socket.AF_UNIX)
    listener.bind(sock_path)
    listener.listen(1)
    listener.setblocking(False)
    loop = asyncio.get_running_loop()
    done = threading.Event()

    async def serve() -> None:
        conn, _ = await loop.sock_accept(listener)
        me = Connection("main")
        parser_in = await loop.sock_recv(conn, 65536)
        frames = me.receive_data(parser_in)
        await loop.sock_sendall(conn, bytes(me.data_to_send()[0]))
        while not any(f.kind == Kind.STREAM for f in frames):
            frames = me.receive_data(await loop.sock_recv(conn, 65536))
        rid = next(f.request_id for f in frames if f.kind == Kind.STREAM)
        for i in range(3):  # credit was 2
            me.send_item(rid, i)
        await loop.sock_sendall(conn, bytes(me.data_to_send()[0]))
        await asyncio.to_thread(done.wait, 10.0)
        conn.close()

    server = asyncio.create_task(serve())
    try:
        peer = await tether.connect(f"unix://{sock_path}")
        with pytest.raises((tether.ProtocolError, tether.PeerGone)):
            async for _ in peer.stream("x", window=2):
                await asyncio.sleep(0.1)  # let every item arrive before taking more
        assert peer.closed
    finally:
        done.set()
        await server
        listener.close()


# -- Main's children ------------------------------------------------------------------


async def test_main_streams_from_a_spawned_child() -> None:
    async with tether.Main(timeout=20.0) as main:
        child = await main.spawn(_stream_targets.serve_counts, start_method="fork")
        try:
            assert [x async for x in child.stream("count", 5)] == [0, 1, 2, 3, 4]
            words: list[Any] = []
            async for w in child.stream("words", "x y"):
                words.append(w)
            assert words == ["x", "y"]
        finally:
            await child.close()


# -- the blocking API -------------------------------------------------------------------


async def in_thread(fn: Any, *args: Any) -> Any:
    return await asyncio.wait_for(asyncio.to_thread(fn, *args), 60.0)


async def test_blocking_reader(served: tuple[str, Record]) -> None:
    address, _ = served

    def run() -> tuple[list[str], int, int]:
        with tether.sync.connect(address) as peer:
            words = list(peer.stream("tokens", "a b c"))
            total = sum(peer.stream("count_sync", 10_000, item_type=int, window=64))
            n = 0
            for _ in peer.stream("count", 100_000):
                n += 1
            return words, total, n

    words, total, n = await in_thread(run)
    assert words == ["a", "b", "c"]
    assert total == sum(range(10_000)) and n == 100_000


async def test_blocking_reader_break_stops_the_generator(served: tuple[str, Record]) -> None:
    address, rec = served

    def run() -> list[int]:
        with tether.sync.connect(address) as peer:
            got = []
            for x in peer.stream("forever", window=4):
                got.append(x)
                if x == 5:
                    break
            assert peer.invoke("plain", 1) == 2
            import time

            end = time.monotonic() + 20.0  # the generator ends while the connection is open
            while "forever" not in rec.finals:
                assert time.monotonic() < end, "the producer's finally did not run"
                time.sleep(0.01)
            return got

    assert await in_thread(run) == [0, 1, 2, 3, 4, 5]
    await _wait(rec.final)
    assert rec.finals == ["forever"]


async def test_blocking_reader_dropped_while_its_peer_is_locked(
    served: tuple[str, Record],
) -> None:
    """A stream dropped inside tether (a GC with the peer's lock held) still gets its CANCEL."""
    address, rec = served

    def run() -> None:
        import time

        with tether.sync.connect(address) as peer:
            s = peer.stream("forever", window=4)
            assert next(s) == 0
            time.sleep(0.2)  # the rest of the window has arrived: no ITEM will come
            with peer._lock:
                s.close(_blocking=False)  # what __del__ does
            end = time.monotonic() + 20.0
            while "forever" not in rec.finals:
                assert time.monotonic() < end, "no CANCEL reached the producer"
                time.sleep(0.01)

    await in_thread(run)


async def test_blocking_reader_connection_lost_mid_stream(sock_path: str) -> None:
    rec = Record()
    main = tether.Main(timeout=20.0)
    install(main, rec)
    async with main:
        server = await main.listen(f"unix://{sock_path}")
        loop = asyncio.get_running_loop()

        def drop() -> None:
            (mpeer,) = main.peers
            mpeer.abort(tether.PeerGone("dropped by the test"))

        def run() -> list[int]:
            got: list[int] = []
            with tether.sync.connect(str(server.address)) as peer, pytest.raises(tether.PeerGone):
                for x in peer.stream("forever", window=4):
                    got.append(x)
                    if x == 2:
                        loop.call_soon_threadsafe(drop)
            return got

        got = await in_thread(run)
        assert got[:3] == [0, 1, 2]
        await _wait(rec.final)
        assert rec.finals == ["forever"]


async def test_blocking_reader_close_and_with(served: tuple[str, Record]) -> None:
    address, rec = served

    def run() -> None:
        with tether.sync.connect(address) as peer:
            with peer.stream("slow", 3) as s:
                assert next(s) == 3
            assert list(s) == []  # closed: nothing more

    await in_thread(run)
    await _wait(rec.final)
    assert rec.finals == ["slow"]


async def test_blocking_reader_slow_reading_is_bounded(served: tuple[str, Record]) -> None:
    address, rec = served

    def run() -> int:
        import time

        with tether.sync.connect(address) as peer:
            worst = 0
            s = peer.stream("forever", window=8)
            for i, _ in enumerate(s, 1):
                if i in (1, 16):
                    time.sleep(0.3)
                worst = max(worst, rec.yielded - i)
                if i == 30:
                    break
            s.close()
            return worst

    worst = await in_thread(run)
    assert worst == 8  # filled the window, never more
    await _wait(rec.final)


async def test_blocking_reader_errors_and_timeouts(served: tuple[str, Record]) -> None:
    address, rec = served

    def run() -> list[int]:
        with tether.sync.connect(address) as peer:
            got = []
            with pytest.raises(tether.RemoteError, match="boom after items"):
                for x in peer.stream("fails", 2):
                    got.append(x)
            with pytest.raises(tether.StreamMismatch):
                list(peer.stream("plain", 1))
            with pytest.raises(tether.StreamMismatch):
                peer.invoke("count", 2)
            with pytest.raises(tether.InvokeTimeout, match="no item within"):
                list(peer.stream("slow", 1, item_timeout=0.3))
            with pytest.raises(tether.InvokeTimeout, match="not finished within"):
                for _ in peer.stream("forever", timeout=0.3, item_timeout=None):
                    pass
            return got

    assert await in_thread(run) == [0, 1]
    await _wait(rec.final)
    for _ in range(100):
        if len(rec.finals) == 2:
            break
        await asyncio.sleep(0.05)
    assert sorted(rec.finals) == ["forever", "slow"]


async def test_blocking_producer_in_a_child() -> None:
    """A blocking child's plain generators stream to main; early exit closes them."""
    async with tether.Main(timeout=20.0) as main:
        finals: asyncio.Queue[str] = asyncio.Queue()

        @main.on("finally")
        def on_finally(call: tether.Call, name: str) -> None:
            finals.put_nowait(name)

        child = await main.spawn(_stream_targets.serve_counts_sync, start_method="fork")
        try:
            assert [x async for x in child.stream("count", 5)] == [0, 1, 2, 3, 4]
            assert await asyncio.wait_for(finals.get(), 20.0) == "count"
            n = 0
            async for _ in child.stream("count", 20_000, item_type=int):
                n += 1
            assert n == 20_000
            assert await asyncio.wait_for(finals.get(), 20.0) == "count"
            async for x in child.stream("forever", window=4):
                if x == 10:
                    break
            assert await asyncio.wait_for(finals.get(), 20.0) == "forever"
            got: list[int] = []
            with pytest.raises(tether.RemoteError, match="sync boom"):
                async for x in child.stream("fails", 3):
                    got.append(x)
            assert got == [0, 1, 2]
            with pytest.raises(tether.StreamMismatch):
                await child.stream("plain", 1).__anext__()
            with pytest.raises(tether.StreamMismatch):
                await child.invoke("count", 1)
            assert await child.invoke("plain", 1) == 2
        finally:
            await child.close()


async def test_blocking_producer_killed_mid_stream() -> None:
    async with tether.Main(timeout=20.0) as main:
        child = await main.spawn(_stream_targets.serve_counts_sync, start_method="fork")
        got = 0
        with pytest.raises(tether.PeerGone):
            async for _ in child.stream("forever", window=4):
                got += 1
                if got == 3:
                    child.kill()
        assert got >= 3


# -- routes -----------------------------------------------------------------------------


class Tokens:
    """A host object whose route streams; records what its generators did."""

    log: list[str] = []  # noqa: RUF012

    def __init__(self, route: Any, prefix: str) -> None:
        @route.handle("tokens")
        async def tokens(call: tether.Call, text: str) -> AsyncIterator[str]:
            try:
                for w in text.split():
                    yield prefix + w
            finally:
                Tokens.log.append("tokens")

        @route.handle("forever")
        def forever(call: tether.Call) -> Iterator[int]:  # a plain generator
            i = 0
            try:
                while True:
                    yield i
                    i += 1
            finally:
                Tokens.log.append("forever")

        @route.handle("plain")
        def plain(call: tether.Call) -> str:
            return prefix

    def close(self) -> None:
        Tokens.log.append("close")


async def _until(cond: Any, timeout: float = 20.0) -> None:
    end = asyncio.get_running_loop().time() + timeout
    while not cond():
        assert asyncio.get_running_loop().time() < end, "timed out waiting"
        await asyncio.sleep(0.01)


@pytest.fixture
async def route_pair() -> AsyncIterator[tuple[tether.Peer, tether.Peer]]:
    Tokens.log = []
    a, b = socket.socketpair()
    host = tether.Peer(a, role="child", local_role="main", timeout=10.0)
    opener = tether.Peer(b, role="main", local_role="child", timeout=10.0)
    host.host("tokens", Tokens, roles={"child"})
    host.start()
    opener.start()
    try:
        yield host, opener
    finally:
        await opener.close()
        await host.close()


async def test_route_streams_from_its_host(route_pair: tuple[tether.Peer, tether.Peer]) -> None:
    _, opener = route_pair
    # the peer itself has no "tokens" handler: the route's is used
    with pytest.raises(tether.NoHandler):
        await opener.stream("tokens", "a").__anext__()
    async with await opener.open("tokens", "r1:") as r1, await opener.open("tokens", "r2:") as r2:
        assert [w async for w in r1.stream("tokens", "a b", item_type=str)] == ["r1:a", "r1:b"]
        assert [w async for w in r2.stream("tokens", "c")] == ["r2:c"]
        async for n in r1.stream("forever", window=4):
            if n == 6:
                break
        await _until(lambda: "forever" in Tokens.log)
        with pytest.raises(tether.StreamMismatch):
            await r1.stream("plain").__anext__()
        assert await r1.invoke("plain") == "r1:"
    await _until(lambda: Tokens.log.count("close") == 2)


async def test_route_closed_mid_stream(route_pair: tuple[tether.Peer, tether.Peer]) -> None:
    _, opener = route_pair
    route = await opener.open("tokens", "")
    got: list[int] = []
    with pytest.raises(tether.RouteClosed):
        async for n in route.stream("forever", window=4):
            got.append(n)
            if n == 2:
                await route.close()
    assert got[:3] == [0, 1, 2]
    await _until(lambda: "forever" in Tokens.log)  # CANCEL reached the host's generator
    with pytest.raises(tether.RouteClosed):
        route.stream("forever")


async def test_blocking_route_stream_on_an_asyncio_host(sock_path: str) -> None:
    Tokens.log = []
    async with tether.Main(timeout=20.0) as main:
        main.host("tokens", Tokens, roles="client")
        server = await main.listen(f"unix://{sock_path}")

        def run() -> tuple[list[str], list[int]]:
            with (
                tether.sync.connect(str(server.address)) as peer,
                peer.open("tokens", "s:") as route,
            ):
                words = list(route.stream("tokens", "x y"))
                got = []
                for n in route.stream("forever", window=4):
                    got.append(n)
                    if n == 3:
                        break
                return words, got

        words, got = await in_thread(run)
        assert words == ["s:x", "s:y"] and got == [0, 1, 2, 3]
        await _until(lambda: "forever" in Tokens.log and "close" in Tokens.log)


def test_blocking_host_streams_on_a_route() -> None:
    """A blocking peer hosts the route; a blocking opener reads its plain generator."""
    Tokens.log = []
    a, b = socket.socketpair()
    host = tether.sync.Peer(a, role="client", name="host", timeout=10.0)
    opener = tether.sync.Peer(b, role="client", name="opener", timeout=10.0)
    try:
        host.host("tokens", Tokens, roles={"client"})
        with opener.open("tokens", "h:") as route:
            got = []
            for n in route.stream("forever", window=4):
                got.append(n)
                if n == 5:
                    break
            assert got == list(range(6))
            with pytest.raises(tether.StreamMismatch):  # an async generator on a blocking host
                list(route.stream("tokens", "a"))
        import time

        end = time.monotonic() + 20.0
        while "forever" not in Tokens.log:
            assert time.monotonic() < end
            time.sleep(0.01)
    finally:
        opener.close()
        host.close()


# -- the core's checks ------------------------------------------------------------------


def test_credit_bodies_are_checked() -> None:
    from tether.aio.streaming import _Outbound
    from tether.streams import MAX_CREDIT, check_window, credit_of

    def credit(body: bytes) -> Frame:
        f = Frame(Kind.CREDIT, 1)
        f.body = memoryview(body)
        return f

    assert credit_of(credit(credit_body(16))) == 16
    for bad in (credit_body(0), credit_body(-1), credit_body(MAX_CREDIT + 1), b"\xa1x", b""):
        with pytest.raises(tether.ProtocolError):
            credit_of(credit(bad))
    out = _Outbound()
    out.grant(MAX_CREDIT)
    with pytest.raises(tether.ProtocolError, match="outstanding"):
        out.grant(1)
    for window in (0, -1, MAX_CREDIT + 1):
        with pytest.raises(ValueError):
            check_window(window)
    with pytest.raises(TypeError):
        check_window(1.5)


async def test_open_streams_count_against_max_inflight(sock_path: str) -> None:
    rec = Record()
    async with tether.Main(timeout=20.0, max_inflight=2) as main:
        install(main, rec)
        server = await main.listen(f"unix://{sock_path}")
        async with tether.connect(str(server.address)) as peer:
            a, b = peer.stream("forever", window=1), peer.stream("forever", window=1)
            assert (await a.__anext__(), await b.__anext__()) == (0, 0)
            with pytest.raises(tether.Busy):
                await peer.stream("forever").__anext__()
            await a.aclose()
            await _until(lambda: rec.finals == ["forever"])
            c = peer.stream("forever", window=1)
            assert await c.__anext__() == 0  # a slot is free again
            await b.aclose()
            await c.aclose()


async def test_a_refused_window_leaves_no_noise_from_del(
    served: tuple[str, Record], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A Stream whose window check raised is half built: collecting it says nothing."""
    import gc
    import sys

    address, _ = served
    seen: list[Any] = []
    monkeypatch.setattr(sys, "unraisablehook", seen.append)
    async with tether.connect(address) as peer:
        with pytest.raises(ValueError):
            async for _ in peer.stream("tokens", "a", window=0):
                pass
        gc.collect()
    assert seen == []
