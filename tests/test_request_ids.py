"""A request id reused while its request is still served is a protocol error (protocol.md 9.1).

A peer that sent ``STREAM(id=6)`` (or INVOKE) twice used to make this side
forget the first handler: it was never cancelled and outlived the
connection. Now the peer is dropped and every handler of it ends.
"""

from __future__ import annotations

import asyncio
import socket
from collections.abc import AsyncIterator
from typing import Any

import msgspec
import pytest

import tether
from tether.protocol import Connection
from tether.streams import credit_body
from tether.wire import Kind, encode_frame

SEQUENCES = {
    "invoke": [Kind.INVOKE] * 3,
    "stream": [Kind.STREAM] * 3,
    "invoke-then-stream": [Kind.INVOKE, Kind.STREAM],
    "stream-then-invoke": [Kind.STREAM, Kind.INVOKE],
}


async def _until(cond: Any, timeout: float = 20.0) -> None:
    end = asyncio.get_running_loop().time() + timeout
    while not cond():
        assert asyncio.get_running_loop().time() < end, "timed out waiting"
        await asyncio.sleep(0.01)


def _frames(kinds: list[Kind], rid: int = 6) -> bytes:
    data = bytearray()
    for k in kinds:
        if k == Kind.STREAM:
            encode_frame(data, k, rid, 0, b"never", msgspec.msgpack.encode([]))
            encode_frame(data, Kind.CREDIT, rid, 0, b"", credit_body(1))
        else:
            encode_frame(data, k, rid, 0, b"sleepy", msgspec.msgpack.encode([]))
    return bytes(data)


def _hello() -> bytes:
    return bytes(Connection("main").data_to_send()[0])


@pytest.mark.parametrize("name", list(SEQUENCES))
async def test_reused_id_drops_the_asyncio_peer_and_ends_its_handlers(name: str) -> None:
    state = {"started": 0, "ended": 0}
    baseline = len(asyncio.all_tasks())
    a, b = socket.socketpair()
    peer = tether.Peer(a, role="main", local_role="child", timeout=10.0)

    @peer.handle("sleepy")
    async def sleepy(call: tether.Call) -> int:
        state["started"] += 1
        try:
            await asyncio.sleep(3600)
            return 1
        finally:
            state["ended"] += 1

    @peer.handle("never")
    async def never(call: tether.Call) -> AsyncIterator[int]:
        state["started"] += 1
        try:
            await asyncio.sleep(3600)
            yield 1
        finally:
            state["ended"] += 1

    peer.start()
    try:
        first, *rest = SEQUENCES[name]
        b.sendall(_hello() + _frames([first]))
        await _until(lambda: state["started"] == 1)  # the first request is running
        b.sendall(_frames(rest))
        await _until(lambda: peer.closed)
        with pytest.raises(tether.ProtocolError, match="reused"):
            await peer.invoke("x")
        await _until(lambda: state["ended"] == 1)
        await _until(lambda: len(asyncio.all_tasks()) <= baseline)
        assert state["started"] == 1  # the second request never ran
    finally:
        b.close()
        await peer.close()


async def test_an_id_answered_may_be_used_again() -> None:
    """Reuse after the answer is what every caller does on wrap-around: not an error."""
    a, b = socket.socketpair()
    peer = tether.Peer(a, role="main", local_role="child", timeout=10.0)

    @peer.handle("inc")
    async def inc(call: tether.Call, x: int) -> int:
        return x + 1

    peer.start()
    raw = Connection("main")
    try:
        b.setblocking(False)
        loop = asyncio.get_running_loop()
        await loop.sock_sendall(b, bytes(raw.data_to_send()[0]))
        got: list[Any] = []
        for x in range(3):
            data = bytearray()
            encode_frame(data, Kind.INVOKE, 6, 0, b"inc", msgspec.msgpack.encode([x]))
            await loop.sock_sendall(b, bytes(data))
            while not any(f.kind == Kind.RESULT for f in got):
                got = raw.receive_data(await loop.sock_recv(b, 65536))
            assert [msgspec.msgpack.decode(f.body) for f in got if f.kind == Kind.RESULT] == [x + 1]
            got = []
        assert not peer.closed
    finally:
        b.close()
        await peer.close()


@pytest.mark.timeout(60)
@pytest.mark.parametrize("second", [Kind.STREAM, Kind.INVOKE])
def test_reused_stream_id_drops_the_blocking_peer_and_ends_its_generator(second: Kind) -> None:
    """The blocking peer: a STREAM or INVOKE naming a stream it still serves."""
    import time
    from collections.abc import Iterator

    import tether.sync

    state = {"started": 0, "ended": 0}
    a, b = socket.socketpair()
    peer = tether.sync.Peer(a, role="main", local_role="child", timeout=10.0)

    def counting(call: tether.Call) -> Iterator[int]:
        state["started"] += 1
        try:
            n = 0
            while True:
                yield n
                n += 1
        finally:
            state["ended"] += 1

    peer.handle("never", counting)
    peer.handle("sleepy", lambda call: 1)

    def until(cond: Any) -> None:
        deadline = time.monotonic() + 20.0
        while not cond():
            assert time.monotonic() < deadline, "timed out waiting"
            time.sleep(0.01)

    try:
        b.sendall(_hello() + _frames([Kind.STREAM]))
        until(lambda: state["started"] == 1)  # one item sent; it waits for credit
        b.sendall(_frames([second]))
        until(lambda: peer.closed)
        until(lambda: state["ended"] == 1)
    finally:
        b.close()
        peer.close()


async def test_a_paused_peer_that_hangs_up_is_released() -> None:
    """Reading paused (tasks past MAX_TASKS) must still notice the peer is gone."""
    state = {"started": 0, "ended": 0}
    baseline = len(asyncio.all_tasks())
    a, b = socket.socketpair()
    peer = tether.Peer(a, role="main", local_role="child", timeout=10.0)

    @peer.on("ev")
    async def ev(call: tether.Call) -> None:
        state["started"] += 1
        try:
            await asyncio.sleep(3600)
        finally:
            state["ended"] += 1

    peer.start()
    data = bytearray()
    for _ in range(1100):
        encode_frame(data, Kind.EVENT, 0, 0, b"ev", msgspec.msgpack.encode([]))
    try:
        b.sendall(_hello() + bytes(data))
        await _until(lambda: peer._paused and state["started"] > 1024)
        b.close()
        await _until(lambda: peer.closed)  # without the hangup check: paused for ever
        await peer.close()  # listeners that outlive a dropped peer are reaped here
        await _until(lambda: state["ended"] == state["started"])
        await _until(lambda: len(asyncio.all_tasks()) <= baseline)
    finally:
        b.close()
        await peer.close()


def _open_pair() -> tuple[Connection, Connection]:
    a, b = Connection("main"), Connection("child", initiator=False)
    b.receive_data(bytes(a.data_to_send()[0]))
    a.receive_data(bytes(b.data_to_send()[0]))
    a.data_to_send()
    b.data_to_send()
    return a, b


def _one(kind: Kind, rid: int, channel: bytes = b"x") -> bytes:
    data = bytearray()
    encode_frame(data, kind, rid, 0, channel, msgspec.msgpack.encode([]))
    return bytes(data)


@pytest.mark.parametrize("first", [Kind.INVOKE, Kind.STREAM])
@pytest.mark.parametrize("second", [Kind.INVOKE, Kind.STREAM, Kind.ROUTE_OPEN])
def test_the_core_refuses_an_id_still_served_for_every_layer(first: Kind, second: Kind) -> None:
    """Connection itself keeps the ids it serves (9.1): one read or two, any I/O layer."""
    _, b = _open_pair()
    assert [f.request_id for f in b.receive_data(_one(first, 6))] == [6]
    assert 6 in b.served
    with pytest.raises(tether.ProtocolError, match="request id 6 reused"):
        b.receive_data(_one(second, 6))
    assert b.state.name == "CLOSED"
    # In the same read as the first, too.
    _, c = _open_pair()
    with pytest.raises(tether.ProtocolError, match="reused"):
        c.receive_data(_one(first, 6) + _one(second, 6))


@pytest.mark.parametrize("how", ["result", "error", "cancel"])
def test_the_core_frees_an_id_once_answered_or_cancelled(how: str) -> None:
    _, b = _open_pair()
    b.receive_data(_one(Kind.INVOKE, 6))
    if how == "result":
        b.answer(6, 1)
    elif how == "error":
        b.send_error(6, tether.codec.ErrorInfo("remote", "no"))
    else:
        data = bytearray()
        encode_frame(data, Kind.CANCEL, 6, 0, b"", b"")
        assert [f.kind for f in b.receive_data(bytes(data))] == [Kind.CANCEL]
    assert 6 not in b.served
    assert [f.request_id for f in b.receive_data(_one(Kind.INVOKE, 6))] == [6]
    # Events and answers name no request this side serves: never counted.
    b.receive_data(_one(Kind.EVENT, 0) + _one(Kind.RESULT, 9))
    assert b.served == {6}
