"""File descriptors as values (tether.Handle) and direct channels between children.

A pipe, a socket and an open file cross in both directions (argument and
result), over a child's socketpair and a unix listener, with the asyncio and
the blocking API; a Handle is refused over TCP; no descriptor leaks after
10,000 transfers, after validation refuses one, or after the receiver is
killed mid-transfer. ``Main.connect`` gives two children a direct channel
that main relays nothing of; a dead sibling is ``PeerGone`` there only.
"""

from __future__ import annotations

import asyncio
import gc
import os
import socket
import tempfile
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest

import _handle_targets
import tether
from tether import codec, wire
from tether.protocol import Connection

pytestmark = pytest.mark.timeout(120)


def fd_count() -> int:
    return len(os.listdir("/proc/self/fd"))


async def settle(expected: int, timeout: float = 10.0) -> int:
    """This process's descriptor count once it is back to ``expected`` (or the deadline)."""
    deadline = time.monotonic() + timeout
    n = fd_count()
    while n > expected and time.monotonic() < deadline:
        gc.collect()
        await asyncio.sleep(0.02)
        n = fd_count()
    return n


def closed(fd: int) -> bool:
    try:
        os.fstat(fd)
    except OSError:
        return True
    return False


@pytest.fixture
async def main() -> AsyncIterator[tether.Main]:
    async with tether.Main(timeout=30.0) as m:
        yield m


def install(m: tether.Main, seen: list[Any]) -> None:
    @m.handle("read_pipe")
    def read_pipe(call: tether.Call, h: tether.Handle) -> bytes:
        with h.open("rb") as f:
            return f.read()

    @m.handle("file_back")
    def file_back(call: tether.Call, text: str) -> tether.Handle:
        with tempfile.TemporaryFile("w+") as f:
            f.write(text)
            f.flush()
            return tether.Handle.from_file(f)

    @m.handle("ignore")
    def ignore(call: tether.Call, h: tether.Handle) -> None:
        pass  # never claimed: closed when the call's Handle is collected

    @m.handle("keep")
    def keep(call: tether.Call, h: tether.Handle) -> None:
        seen.append(h.detach())

    @m.handle("number")
    def number(call: tether.Call, x: int) -> int:
        return x


# -- the Handle object ------------------------------------------------------------


def test_handle_owns_its_descriptor() -> None:
    r, w = os.pipe()
    h = tether.Handle(w)
    assert h.fileno() == w and not h.consumed
    del h
    gc.collect()
    assert closed(w)  # dropped while owning it: closed, never leaked
    with tether.Handle(r) as h2:
        assert repr(h2) == f"<tether.Handle fd={r}>"
    assert closed(r) and h2.consumed
    with pytest.raises(tether.ConsumedError):
        h2.detach()
    with pytest.raises(TypeError):
        tether.Handle("3")  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        tether.Handle(-1)
    with pytest.raises(OSError):
        tether.Handle(r)  # closed above: refused now, not at the send


def test_from_file_and_socket_duplicate() -> None:
    a, b = socket.socketpair()
    with a, b:
        h = tether.Handle.from_socket(a)
        assert h.fileno() != a.fileno()
        s = h.socket()
        s.sendall(b"x")
        s.close()
        assert b.recv(1) == b"x"
        a.sendall(b"y")  # the original stays open and usable
        assert b.recv(1) == b"y"


# -- both directions, asyncio ---------------------------------------------------------


async def test_pipe_socket_file_to_child_and_back(main: tether.Main) -> None:
    child = await main.spawn(_handle_targets.handle_child)
    # a pipe: the child writes into the end main sends
    r, w = os.pipe()
    h = tether.Handle(w)
    await child.invoke("write_pipe", h, b"through the pipe")
    assert closed(w)  # main's copy went with the message
    with pytest.raises(tether.ConsumedError):
        h.fileno()
    assert os.read(r, 100) == b"through the pipe"
    os.close(r)
    # a socket: the child answers on the end main sends
    a, b = socket.socketpair()
    with a:
        a.setblocking(False)
        a.sendall(b"hello")  # waits in the socket until the child reads it
        await child.invoke("socket_echo", tether.Handle.from_socket(b))
        b.close()
        loop = asyncio.get_running_loop()
        assert await asyncio.wait_for(loop.sock_recv(a, 100), 30) == b"HELLO"
    # an open file: the child reads it through its own descriptor
    with tempfile.TemporaryFile("w+") as f:
        f.write("file contents")
        f.flush()
        assert await child.invoke("read_file", tether.Handle.from_file(f)) == "file contents"
    # child -> main, as a result: a pipe whose read end the child returns
    back = await child.invoke("pipe_back", b"from the child")
    assert isinstance(back, tether.Handle)
    with back.open("rb") as rf:
        assert rf.read() == b"from the child"
    with (await child.invoke("socket_back", b"a socket from the child")).socket() as s:
        s.settimeout(30)
        assert s.recv(100) == b"a socket from the child"
    with (await child.invoke("file_back", "a file from the child")).open("r") as f:
        f.seek(0)
        assert f.read() == "a file from the child"
    typed = await child.invoke("pipe_back", b"typed", result_type=tether.Handle)
    assert os.read(typed.fileno(), 10) == b"typed"
    typed.close()


async def test_both_directions_over_a_unix_listener(main: tether.Main, sock_path: str) -> None:
    install(main, [])
    await main.listen(f"unix://{sock_path}")
    async with tether.connect(f"unix://{sock_path}") as peer:
        r, w = os.pipe()
        os.write(w, b"client to main")
        os.close(w)
        assert await peer.invoke("read_pipe", tether.Handle(r)) == b"client to main"
        assert closed(r)
        h = await peer.invoke("file_back", "main to client")
        with h.open("r") as f:
            f.seek(0)
            assert f.read() == "main to client"


async def test_blocking_peer_sends_and_receives_handles(main: tether.Main, sock_path: str) -> None:
    install(main, [])
    await main.listen(f"unix://{sock_path}")

    def blocking() -> tuple[bytes, str, bool]:
        with tether.sync.connect(f"unix://{sock_path}") as peer:
            r, w = os.pipe()
            os.write(w, b"sync")
            os.close(w)
            h = tether.Handle(r)
            got = peer.invoke("read_pipe", h)
            back = peer.invoke("file_back", "to sync")
            with back.open("r") as f:
                f.seek(0)
                text = f.read()
            return got, text, h.consumed and closed(r)

    assert await asyncio.to_thread(blocking) == (b"sync", "to sync", True)


async def test_a_handle_is_refused_over_tcp(main: tether.Main) -> None:
    install(main, [])

    @main.handle("tcp_read", roles="client")
    def tcp_read(call: tether.Call, h: tether.Handle) -> None:
        raise AssertionError("never reached")

    server = await main.listen("tcp://127.0.0.1:0")
    async with tether.connect(str(server.address)) as peer:
        r, w = os.pipe()
        os.close(r)
        h = tether.Handle(w)
        with pytest.raises(tether.HandleRefused, match="'fd'"):
            await peer.invoke("tcp_read", h)
        assert h.consumed and closed(w)  # moved even though the send failed
        with pytest.raises(tether.ConsumedError):
            await peer.invoke("tcp_read", h)
        r2, w2 = os.pipe()
        os.close(r2)
        with pytest.raises(tether.HandleRefused):
            await peer.send("tcp_read", [tether.Handle(w2)])  # nested in a list too
        assert closed(w2)
        with pytest.raises(tether.Forbidden):  # the connection is fine: still answers
            await peer.invoke("number", 5)


def test_core_refuses_without_fd_and_encodes_ext_handle() -> None:
    a, b = Connection("client"), Connection("main")
    b.receive_data(a.data_to_send()[0])
    a.receive_data(b.data_to_send()[0])
    r, w = os.pipe()
    os.close(r)
    with pytest.raises(tether.HandleRefused):
        a.send_invoke(b"x", (tether.Handle(w),), None)
    assert closed(w) and a.buffered_out == 0


# -- validation and leaks ---------------------------------------------------------------


async def test_validation_failure_closes_the_received_descriptor(
    main: tether.Main, sock_path: str
) -> None:
    install(main, [])
    await main.listen(f"unix://{sock_path}")
    async with tether.connect(f"unix://{sock_path}") as peer:
        await peer.invoke("number", 1)
        base = fd_count()
        for _ in range(50):
            r, w = os.pipe()
            os.close(w)
            with pytest.raises(tether.BadRequest, match="expected int, got Handle"):
                await peer.invoke("number", tether.Handle(r))
        assert await settle(base) <= base


async def test_no_leak_after_ten_thousand_transfers(main: tether.Main, sock_path: str) -> None:
    kept: list[int] = []
    install(main, kept)
    await main.listen(f"unix://{sock_path}")
    r, w = os.pipe()
    async with tether.connect(f"unix://{sock_path}") as peer:
        await peer.invoke("number", 1)
        base = fd_count()
        for i in range(10_000):
            await peer.invoke("keep" if i % 2 else "ignore", tether.Handle(os.dup(w)))
            if kept:
                os.close(kept.pop())
        assert await settle(base) <= base
    os.close(r)
    os.close(w)


async def test_no_leak_when_the_receiver_is_killed_mid_transfer(main: tether.Main) -> None:
    probe = await main.spawn(_handle_targets.handle_child)  # the first spawn opens what it keeps
    await probe.close()
    base = fd_count()
    child = await main.spawn(_handle_targets.handle_child)
    r, w = os.pipe()
    handles = [tether.Handle(os.dup(w)) for _ in range(300)]
    calls = [asyncio.ensure_future(child.invoke("slow", h)) for h in handles]
    await asyncio.sleep(0.2)
    child.kill()
    outcomes = await asyncio.gather(*calls, return_exceptions=True)
    assert all(isinstance(o, tether.PeerGone) for o in outcomes)
    await child.wait(30)
    late = tether.Handle(os.dup(w))
    with pytest.raises(tether.PeerGone):
        await child.invoke("slow", late)  # a send that fails moves the Handle too
    assert all(h.consumed for h in [*handles, late])
    del handles, late
    os.close(r)
    os.close(w)
    assert await settle(base) <= base


async def test_a_peer_killed_while_sending_handles_leaks_nothing_here(main: tether.Main) -> None:
    probe = await main.spawn(_handle_targets.handle_child)
    await probe.close()
    base = fd_count()
    child = await main.spawn(_handle_targets.handle_child)
    calls = [asyncio.ensure_future(child.invoke("pipe_back", b"x" * 10)) for _ in range(300)]
    await asyncio.sleep(0.05)
    child.kill()
    outcomes = await asyncio.gather(*calls, return_exceptions=True)
    got = [o for o in outcomes if isinstance(o, tether.Handle)]
    assert all(isinstance(o, (tether.Handle, tether.PeerGone)) for o in outcomes)
    del got, outcomes, calls  # the futures hold the Handles too
    await child.wait(30)
    assert await settle(base) <= base


# -- the wire ---------------------------------------------------------------------------


def test_ext_handle_must_name_a_descriptor_attachment() -> None:
    body = codec.encoder.encode([codec.msgspec.msgpack.Ext(codec.EXT_HANDLE, bytes(4))])
    with pytest.raises(codec.msgspec.ValidationError, match="not a descriptor"):
        codec.decode_with(codec.any_decoder, body, [memoryview(b"abc")])
    r, w = os.pipe()
    os.close(w)
    h = tether.Handle(r)
    with pytest.raises(codec.msgspec.ValidationError, match="is a descriptor"):
        codec.decode_with(
            codec.any_decoder,
            codec.encoder.encode([codec.msgspec.msgpack.Ext(codec.EXT_BYTES, bytes(4))]),
            [h],
        )
    assert codec.decode_with(codec.any_decoder, body, [h]) == [h]
    h.close()
    assert wire.FLAG_HANDLE == 4 and codec.EXT_HANDLE == 4


# -- direct channels between children ----------------------------------------------------


def count_frames(peer: tether.Peer) -> Callable[[], int]:
    """Count the frames main reads from ``peer`` (wraps its connection's receive_data)."""
    conn = peer._conn
    seen = [0]
    receive = conn.receive_data

    def counting(data: Any) -> list[wire.Frame]:
        frames = receive(data)
        seen[0] += len(frames)
        return frames

    conn.receive_data = counting  # type: ignore[method-assign]
    return lambda: seen[0]


async def test_two_children_talk_directly(main: tether.Main) -> None:
    a = await main.spawn(_handle_targets.direct_child, name="a")
    b = await main.spawn(_handle_targets.direct_child, name="b")
    await main.connect(a, b)
    from_a, from_b = count_frames(a), count_frames(b)
    assert await a.invoke("hammer", 10_000) == sum(range(10_000)) + 10_000
    assert await b.invoke("hammer", 10_000) == sum(range(10_000)) + 10_000
    # main saw the two hammer calls' answers, none of the 20,000 invokes between them
    assert from_a() == 1 and from_b() == 1
    pid, role, seen = await a.invoke("ask")
    assert pid == b.pid == seen and role == "sibling"
    assert await a.invoke("big", 4 << 20) == 4 << 20  # shared memory on the direct channel
    b.kill()
    assert await a.invoke("sibling_gone") == "PeerGone"
    assert await a.invoke("ping") == "pong" and not a.closed  # its channel to main stays up


async def test_connect_refusals(main: tether.Main) -> None:
    a = await main.spawn(_handle_targets.direct_child)
    silent = await main.spawn(_handle_targets.no_connect_child)
    with pytest.raises(tether.NoHandler):
        await main.connect(a, silent)
    refusing = await main.spawn(_handle_targets.refusing_child)
    with pytest.raises(tether.RemoteError, match="no siblings here"):
        await main.connect(a, refusing)
    with pytest.raises(ValueError):
        await main.connect(a, a)
    other = await main.spawn(_handle_targets.direct_child, role="worker")
    with pytest.raises(tether.Forbidden, match="connect_roles"):
        await main.connect(a, other)
    main.connect_roles.add("worker")
    await main.connect(a, other)
    assert (await a.invoke("ask"))[0] == other.pid


async def test_tether_connect_is_reserved(main: tether.Main) -> None:
    with pytest.raises(ValueError, match="reserved"):
        main.handle("tether.connect", lambda call: None)


async def test_a_blocking_child_on_a_direct_channel(main: tether.Main) -> None:
    a = await main.spawn(_handle_targets.direct_child, name="async")
    b = await main.spawn(_handle_targets.direct_child_sync, name="sync")
    await main.connect(a, b)
    assert await a.invoke("hammer", 1000) == sum(range(1000)) + 1000
    assert await b.invoke("ask") == [a.pid, "sibling", a.pid]
    r, w = os.pipe()  # main -> a blocking child, as an argument
    os.write(w, b"to a blocking child")
    os.close(w)
    assert await b.invoke("read_handle", tether.Handle(r)) == b"to a blocking child"
    # a Handle from the blocking child to its sibling, on the direct channel
    assert await b.invoke("pipe_to_sibling", b"sibling pipe") == b"sibling pipe"
    b.kill()
    assert await a.invoke("sibling_gone") == "PeerGone"


def test_the_documented_handle_frame_is_what_the_code_sends() -> None:
    with open(os.path.join(os.path.dirname(__file__), "..", "docs", "protocol.md")) as f:
        doc = f.read()
    block = doc.split("```hex frame=invoke-handle\n", 1)[1].split("```", 1)[0]
    documented = bytes.fromhex(block.replace("\n", " "))
    from tether.attachments import MemfdStore

    child = Connection("child", name="renderer", pid=4242, store=MemfdStore(borrow=True))
    main = Connection("main", name="renderer", pid=4241, store=MemfdStore(lend=True))
    main.receive_data(bytes(child.data_to_send()[0]))
    child.receive_data(bytes(main.data_to_send()[0]))
    r, w = os.pipe()
    child.send_invoke(b"write_to", (tether.Handle(w),), object())
    data, fds = child.data_to_send()
    assert bytes(data) == documented and len(fds) == 1
    main.receive_fds(fds)  # the receiver takes the passed copy; the sender closes its own
    (frame,) = main.receive_data(documented)
    (h,) = codec.decode_with(codec.any_decoder, frame.body, frame.attachments)
    assert isinstance(h, tether.Handle) and wire.FLAG_HANDLE == 0x04
    with h.open("wb") as out:
        out.write(b"ok")
    assert os.read(r, 2) == b"ok"
    os.close(r)
    child.abort()
    main.abort()


async def test_a_handle_cannot_be_broadcast(main: tether.Main) -> None:
    r, w = os.pipe()
    os.close(r)
    with pytest.raises(TypeError, match="moved by a send"):
        await main.broadcast("news", tether.Handle(w))
    assert closed(w)


def test_a_peer_cannot_park_unbounded_descriptors_here() -> None:
    from tether.attachments import MemfdStore
    from tether.handles import MAX_LIVE_HANDLES

    child = Connection("child", store=MemfdStore(borrow=True))
    main = Connection("main", store=MemfdStore())
    main.receive_data(bytes(child.data_to_send()[0]))
    child.receive_data(bytes(main.data_to_send()[0]))
    r, w = os.pipe()
    os.close(w)
    base = fd_count()

    def one() -> list[wire.Frame]:
        child.send_event(b"take", (tether.Handle(os.dup(r)),))
        data, fds = child.data_to_send()
        main.receive_fds(fds)  # (the same numbers: the sender's copies become the receiver's)
        return main.receive_data(bytes(data))

    for _ in range(100):  # dropped at once: never counted for long
        one()
    kept = [one() for _ in range(MAX_LIVE_HANDLES)]
    taken = kept.pop()[0]
    (h,) = codec.decode_with(codec.any_decoder, taken.body, taken.attachments)
    os.close(h.detach())  # taken: no longer counted
    kept.append(one())
    with pytest.raises(tether.ProtocolError, match=f"more than {MAX_LIVE_HANDLES} descriptors"):
        one()
    del kept, taken
    gc.collect()
    os.close(r)
    assert fd_count() <= base - 1  # every received one closed, the refused one too


def test_introspection_names_handle_hints() -> None:
    from tether import introspect

    names = [introspect.type_name(t) for t in (tether.Handle | None, list[tether.Handle])]
    assert names == ["Handle | None", "list[Handle]"]
    assert introspect.type_name(tether.Handle) == "Handle"


async def test_connect_clients_when_main_allows_their_role(
    main: tether.Main, sock_path: str
) -> None:
    await main.listen(f"unix://{sock_path}")
    got: list[tether.Peer] = []
    clients = []
    for tag in ("one", "two"):
        before = set(main.peers)
        c = await tether.connect(f"unix://{sock_path}")

        @c.on_connect
        def connected(sib: tether.Peer, tag: str = tag) -> None:
            got.append(sib)

            @sib.handle("tag")
            def which(call: tether.Call) -> str:
                return tag

        clients.append(c)
        deadline = time.monotonic() + 10
        while set(main.peers) == before and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        (p,) = set(main.peers) - before
        clients.append(p)
    c1, p1, c2, p2 = clients
    with pytest.raises(tether.Forbidden, match="'client'"):
        await main.connect(p1, p2)  # clients are not connected unless main says so
    main.connect_roles.add("client")
    await main.connect(p1, p2)
    assert sorted([await got[0].invoke("tag"), await got[1].invoke("tag")]) == ["one", "two"]
    await c1.close()
    await c2.close()


def test_a_held_handle_counts_as_a_page() -> None:
    from tether.handles import HELD_SIZE, held_size

    r, w = os.pipe()
    os.close(w)
    with tether.Handle(r) as h:
        assert held_size(h) == HELD_SIZE == 4096
    assert held_size(memoryview(b"abc")) == 3 and held_size(b"abcd") == 4
