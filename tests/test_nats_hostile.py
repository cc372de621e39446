"""tether over NATS against a hostile publisher (a real nats-server, per module).

Each test is one finding of an outside review (docs/security.md, "Over
NATS"): what a stranger who may publish on the namespace can and cannot do
to a listener and to other clients.
"""

from __future__ import annotations

import asyncio
import struct
import time
from collections.abc import Iterator
from typing import Any

import pytest

import tether
from _nats_server import NatsServer, running
from tether import Main
from tether.wire import Kind, encode_frame

pytestmark = pytest.mark.timeout(180)


@pytest.fixture(scope="module")
def nats() -> Iterator[NatsServer]:
    with running() as server:
        yield server


async def until(cond: object, seconds: float = 20.0) -> None:
    deadline = time.monotonic() + seconds
    while not cond() and time.monotonic() < deadline:  # type: ignore[operator]
        await asyncio.sleep(0.01)


async def _raw(url: str) -> Any:
    import nats as nats_py

    return await nats_py.connect(url)


def _frame(kind: int, rid: int, channel: bytes, body: bytes, n_att: int = 0) -> bytes:
    out = bytearray()
    encode_frame(out, kind, rid, 0, channel, body)
    if n_att:  # an attachment table that runs past the end of the frame
        struct.pack_into("<H", out, 16, n_att)
    return bytes(out)


def _cid(peer: tether.Peer) -> str:
    return str(peer._stream.cid)  # type: ignore[attr-defined]


def _rid(peer: tether.Peer) -> int:
    """The request id of the one invoke ``peer`` has in flight."""
    (rid,) = peer._conn.pending  # type: ignore[attr-defined]
    return int(rid)


async def test_malformed_frames_to_a_client_are_dropped(nats: NatsServer) -> None:
    url, ns = f"{nats.url}/bad", "bad"
    async with Main() as main:
        main.handle("square", lambda call, x: x * x, roles="nats")
        main.on("log", lambda call, text: None, roles="nats")
        await main.listen(url)
        nc = await _raw(nats.url)
        try:
            async with tether.connect(url) as peer, tether.connect(url) as other:
                assert await peer.invoke("square", 2) == 4
                cid = _cid(peer)
                bad_event = _frame(Kind.EVENT, 0, b"log", b"\x91\xa1x", n_att=1)
                # to every client, and anywhere in one client's inbox
                for subject in ("events", "f", "r.1", "x", "zz"):
                    to = f"{ns}.{subject}" if subject == "events" else f"{ns}.p.{cid}.{subject}"
                    await nc.publish(to, bad_event, reply=f"{ns}.m.{'0' * 16}.{cid}")
                await nc.flush()
                dropped = peer._stream  # type: ignore[attr-defined]
                await until(lambda: dropped.dropped >= 5)
                assert dropped.dropped == 5
                assert await peer.invoke("square", 3) == 9
                assert await other.invoke("square", 4) == 16
                # posing as a listener: an INVOKE, then another with the id it still serves
                gate, calls = asyncio.Event(), []

                @peer.handle("wait")
                async def wait(call: tether.Call) -> str:
                    calls.append(1)
                    await gate.wait()
                    return "ok"

                invoke = _frame(Kind.INVOKE, 5, b"wait", b"\x90")
                m = f"{ns}.m.{'0' * 16}.{cid}"
                await nc.publish(f"{ns}.p.{cid}.f", invoke, reply=m)
                await nc.flush()
                await until(lambda: calls)
                await nc.publish(f"{ns}.p.{cid}.f", invoke, reply=m)
                await nc.flush()
                await until(lambda: dropped.dropped >= 6)
                assert dropped.dropped == 6 and calls == [1]
                gate.set()
                assert await peer.invoke("square", 6) == 36
        finally:
            await nc.close()


async def test_a_strangers_frames_in_a_clients_name_are_refused_alone(nats: NatsServer) -> None:
    url, ns = f"{nats.url}/forged", "forged"
    async with Main() as main:
        gate = asyncio.Event()

        @main.handle("slow", roles="nats")
        async def slow(call: tether.Call) -> str:
            await gate.wait()
            return "done"

        main.handle("square", lambda call, x: x * x, roles="nats")
        main.on("log", lambda call, text: None, roles="nats")
        server = await main.listen(url)
        nc = await _raw(nats.url)
        try:
            async with tether.connect(url) as peer:
                cid = _cid(peer)
                bad_event = _frame(Kind.EVENT, 0, b"log", b"\x91\xa1x", n_att=1)
                # In the client's name: a malformed INVOKE, a malformed EVENT, an
                # INVOKE with the id of its call in flight. Refused alone.
                pending = asyncio.ensure_future(peer.invoke("slow", timeout=60))
                await until(lambda: len(server.peers) == 1 and peer._conn.pending)  # type: ignore[attr-defined]
                rid = _rid(peer)
                before = server.dropped  # type: ignore[attr-defined]
                token = "0" * 16
                forged = [
                    (f"{ns}.h.square", _frame(Kind.INVOKE, 50, b"square", b"\x91\x03", 3), 50),
                    (f"{ns}.h.square", _frame(Kind.INVOKE, rid, b"square", b"\x91\x03"), rid),
                    (f"{ns}.h.square", _frame(Kind.INVOKE, 0, b"square", b"\x91\x03"), 0),
                ]
                for subject, data, r in forged:
                    await nc.publish(subject, data, reply=f"{ns}.p.{cid}.r.{r}.{token}")
                await nc.publish(f"{ns}.e.log", bad_event, reply=f"{ns}.p.{cid}.e")
                bad_chan = _frame(Kind.EVENT, 0, b"\xff", b"\x90")  # not UTF-8
                await nc.publish(f"{ns}.e.~74", bad_chan, reply=f"{ns}.p.{cid}.e")
                await nc.flush()
                await until(lambda: server.dropped >= before + 5)  # type: ignore[attr-defined]
                assert server.dropped == before + 5  # type: ignore[attr-defined]
                gate.set()
                assert await pending == "done"  # its peer on main lived on
                assert await peer.invoke("square", 5) == 25
        finally:
            gate.set()
            await nc.close()


async def test_an_ended_peer_answers_what_it_served(nats: NatsServer) -> None:
    url, ns = f"{nats.url}/ended", "ended"
    async with Main() as main:

        @main.handle("hang", roles="nats")
        async def hang(call: tether.Call) -> None:
            await asyncio.sleep(3600)

        server = await main.listen(url)
        nc = await _raw(nats.url)
        try:
            async with tether.connect(url) as peer:
                pending = asyncio.ensure_future(peer.invoke("hang", timeout=60))
                await until(lambda: server.peers and server.peers[0]._serving)  # type: ignore[attr-defined]
                # a forged goodbye in its name ends its peer on main...
                await nc.publish(f"{ns}.bye", b"", reply=f"{ns}.p.{_cid(peer)}.b")
                t0 = time.monotonic()
                with pytest.raises(tether.PeerGone, match="dropped it"):
                    await asyncio.wait_for(pending, 50)
                assert time.monotonic() - t0 < 30  # at once, not at its timeout
        finally:
            await nc.close()


async def test_a_client_that_leaves_too_much_unread_is_refused(nats: NatsServer) -> None:
    from tether.nats.stream import INBOX_LIMIT

    url, ns = f"{nats.url}/unread", "unread"
    async with Main() as main:
        gate = asyncio.Event()
        started: list[int] = []

        @main.on("slowev", roles="nats")
        async def slowev(call: tether.Call, blob: str) -> None:
            started.append(1)
            await gate.wait()

        server = await main.listen(url)
        nc = await _raw(nats.url)
        try:
            me = "9" * 16
            event = _frame(Kind.EVENT, 0, b"slowev", b"\x91\xda\x20\x00" + b"z" * 8192)
            for i in range(2500):  # 20 MB; main pauses past 1,024 handler tasks
                await nc.publish(f"{ns}.e.slowev", event, reply=f"{ns}.p.{me}.e")
                if i % 100 == 0:
                    await nc.flush()
            await nc.flush()
            await until(lambda: server.refused > 0)  # type: ignore[attr-defined]
            assert server.refused > 0  # type: ignore[attr-defined]
            (stream,) = [s for s, _ in server._clients.values()]  # type: ignore[attr-defined]
            assert stream._waiting <= INBOX_LIMIT
            assert 1000 < len(started) < 1100
            async with tether.connect(url) as peer:  # another client is served on
                main.handle("hi", lambda call: "hello", roles="nats")
                await server.sync()  # type: ignore[attr-defined]
                assert await peer.invoke("hi") == "hello"
        finally:
            gate.set()
            await nc.close()


async def test_busy_clients_do_not_lock_out_newcomers(nats: NatsServer) -> None:
    url, ns = f"{nats.url}/evict", "evict"
    async with Main() as main:
        gate = asyncio.Event()

        @main.handle("hold", roles="nats")
        async def hold(call: tether.Call) -> None:
            await gate.wait()

        main.handle("hi", lambda call: "hello", roles="nats")
        server = await main.listen(url)
        server.max_clients = 70  # type: ignore[attr-defined]
        nc = await _raw(nats.url)
        try:
            await nc.subscribe(f"{ns}.p.>")  # reads its ids' answers: main keeps them
            token = "0" * 16
            for i in range(65):  # the oldest clients, each with a call in flight
                hold = _frame(Kind.INVOKE, 1, b"hold", b"\x90")
                await nc.publish(f"{ns}.h.hold", hold, reply=f"{ns}.p.{0xB00 + i:016x}.r.1.{token}")
            await nc.flush()
            await until(lambda: len(server.peers) == 65)  # type: ignore[attr-defined]
            assert len(server.peers) == 65  # type: ignore[attr-defined]
            for i in range(5):  # then idle ones
                hi = _frame(Kind.INVOKE, 1, b"hi", b"\x90")
                await nc.publish(f"{ns}.h.hi", hi, reply=f"{ns}.p.{0xC00 + i:016x}.r.1.{token}")
            await nc.flush()
            await until(lambda: len(server.peers) == 70)  # type: ignore[attr-defined]
            assert len(server.peers) == 70  # type: ignore[attr-defined]
            async with tether.connect(url) as peer:  # an idle one makes room
                assert await peer.invoke("hi") == "hello"
            assert server.refused == 0  # type: ignore[attr-defined]
        finally:
            gate.set()
            await nc.close()


async def test_answers_on_a_forged_reply_subject_are_dropped(nats: NatsServer) -> None:
    url, ns = f"{nats.url}/forge", "forge"
    async with Main() as main:
        gate = asyncio.Event()

        @main.handle("slow", roles="nats")
        async def slow(call: tether.Call) -> str:
            await gate.wait()
            return "done"

        await main.listen(url)
        other = Main()  # a second listener: it serves echo, main serves slow
        other.handle("echo", lambda call, x: x, roles="nats")
        await other.listen(url)
        nc = await _raw(nats.url)
        try:
            async with tether.connect(url) as peer:
                pending = asyncio.ensure_future(peer.invoke("slow", timeout=60))
                await until(lambda: peer._conn.pending)  # type: ignore[attr-defined]
                cid, rid = _cid(peer), _rid(peer)
                result = _frame(Kind.RESULT, rid, b"", b"\xa6FORGED")
                m = f"{ns}.m.{'0' * 16}.{cid}"
                # straight into its inbox, on the subject without the token or a guessed one
                await nc.publish(f"{ns}.p.{cid}.r.{rid}", result, reply=m)
                await nc.publish(f"{ns}.p.{cid}.r.{rid}.{'1' * 16}", result, reply=m)
                await nc.publish(f"{ns}.p.{cid}.f", result, reply=m)
                # or through main: an invoke in its name whose answer goes to its inbox
                echo = _frame(Kind.INVOKE, rid, b"echo", b"\x91\xa6FORGED")
                await nc.publish(f"{ns}.h.echo", echo, reply=f"{ns}.p.{cid}.r.{rid}.{'2' * 16}")
                await nc.flush()
                stream = peer._stream  # type: ignore[attr-defined]
                await until(lambda: stream.dropped >= 4)
                assert stream.dropped == 4
                gate.set()
                assert await pending == "done"
                assert await peer.invoke("echo", "real") == "real"
        finally:
            gate.set()
            await nc.close()
            await other.close()
