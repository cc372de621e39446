"""Flow control with Handles: a slow receiver pauses a well-behaved sender, never drops it.

Reading stops once :data:`tether.handles.HANDLES_HIGH` received Handles are
alive and untaken, far below the hostile-peer cap (:data:`MAX_LIVE_HANDLES`);
a sender's queued descriptors count toward its backpressure, so ``send``
waits for a peer that does not read instead of pinning descriptors.
"""

from __future__ import annotations

import asyncio
import collections
import os
import time

import pytest

import tether

pytestmark = pytest.mark.timeout(120)

N = 1500  # more than MAX_LIVE_HANDLES


async def flood_events(peer: tether.Peer) -> None:
    @peer.handle("flood")
    async def flood(call: tether.Call, n: int) -> str:
        r, w = os.pipe()
        os.close(r)
        for _ in range(n):
            await peer.send("slow", tether.Handle(os.dup(w)))
        os.close(w)
        return "sent all"

    await peer.wait_closed()


async def flood_invokes(peer: tether.Peer) -> None:
    @peer.handle("flood")
    async def flood(call: tether.Call, n: int) -> dict[str, int]:
        r, w = os.pipe()
        os.close(r)
        res = await asyncio.gather(
            *[peer.invoke("slow", tether.Handle(os.dup(w))) for _ in range(n)],
            return_exceptions=True,
        )
        os.close(w)
        return dict(collections.Counter(type(x).__name__ for x in res))

    await peer.wait_closed()


async def test_handles_to_a_slow_listener_pause_the_sender() -> None:
    async with tether.Main(timeout=60.0) as hub:
        got = 0

        @hub.on("slow")
        async def slow(call: tether.Call, h: tether.Handle) -> None:
            nonlocal got
            await asyncio.sleep(0.05)
            got += 1

        c = await hub.spawn(flood_events)
        assert await c.invoke("flood", N) == "sent all"
        deadline = time.monotonic() + 30
        while got < N and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        assert got == N
        assert c.exitcode is None


async def test_handles_to_a_slow_handler_pause_the_sender() -> None:
    async with tether.Main(timeout=60.0) as hub:

        @hub.handle("slow")
        async def slow(call: tether.Call, h: tether.Handle) -> None:
            await asyncio.sleep(0.05)

        c = await hub.spawn(flood_invokes)
        assert await c.invoke("flood", N) == {"NoneType": N}
        assert c.exitcode is None


def fd_count() -> int:
    return len(os.listdir("/proc/self/fd"))


async def stalled_reader(peer: tether.Peer) -> None:
    got = 0

    @peer.handle("block")
    def block(call: tether.Call, h: tether.Handle) -> None:
        with h.open("rb") as f:
            f.read(1)  # the loop stops here until main writes: nothing is read meanwhile

    @peer.on("h")
    def h(call: tether.Call, h: tether.Handle) -> None:
        nonlocal got
        got += 1

    @peer.handle("got")
    def count(call: tether.Call) -> int:
        return got

    await peer.wait_closed()


async def test_queued_handles_make_send_wait_for_a_peer_that_does_not_read() -> None:
    async with tether.Main(timeout=60.0) as hub:
        c = await hub.spawn(stalled_reader)
        r, w = os.pipe()
        blocked = asyncio.create_task(c.invoke("block", tether.Handle(r)))
        a, b = os.pipe()
        base = fd_count()

        async def flood() -> None:
            for _ in range(3000):
                await c.send("h", tether.Handle(os.dup(a)))

        sender = asyncio.create_task(flood())
        peak = 0
        deadline = time.monotonic() + 3
        while time.monotonic() < deadline and not sender.done():
            peak = max(peak, fd_count() - base)
            await asyncio.sleep(0.01)
        assert not sender.done()  # send waits: the peer reads nothing
        assert peak < 600  # descriptors queued here are bounded (not one per send)
        os.write(w, b"x")
        await asyncio.wait_for(sender, 60)
        await blocked
        assert await c.invoke("got") == 3000
        for fd in (w, a, b):
            os.close(fd)


def waiting_blocking_child(peer: tether.sync.Peer) -> None:
    n = 0

    @peer.on("h")
    def h(call: tether.sync.Call, h: tether.Handle) -> None:
        nonlocal n
        n += 1

    @peer.handle("ask")
    def ask(call: tether.sync.Call) -> str:
        try:
            return str(peer.invoke("later", timeout=3.0))
        except tether.InvokeTimeout:
            return "timeout"

    @peer.handle("n")
    def count(call: tether.sync.Call) -> int:
        return n

    peer.wait_closed()


async def test_a_blocking_peer_waiting_in_invoke_pauses_on_handles_too() -> None:
    async with tether.Main(timeout=60.0) as hub:

        @hub.handle("later")
        async def later(call: tether.Call) -> str:
            await asyncio.sleep(1.0)
            return "ok"

        c = await hub.spawn(waiting_blocking_child)
        asked = asyncio.create_task(c.invoke("ask"))
        await asyncio.sleep(0.3)  # (the worker waits in invoke: its queue takes every job)
        r, w = os.pipe()
        for _ in range(N):
            await c.send("h", tether.Handle(os.dup(w)))
        assert await asked in ("ok", "timeout")
        assert await c.invoke("n") == N
        assert c.exitcode is None
        os.close(r)
        os.close(w)


# -- small things -------------------------------------------------------------------


async def test_a_lost_peer_is_not_called_open(sock_path: str) -> None:
    async with tether.Main(timeout=10.0) as hub:
        await hub.listen(f"unix://{sock_path}")
        client = await tether.connect(f"unix://{sock_path}")
        assert "open" not in repr(client)
        await hub.close()
        await asyncio.wait_for(client.wait_closed(), 10)
        assert repr(client).endswith(" closed>")
        assert " open>" not in str(client.close_reason)


def test_the_same_handle_twice_in_one_call_says_so() -> None:
    from tether.attachments import MemfdStore
    from tether.protocol import Connection

    child = Connection("child", store=MemfdStore(borrow=True))
    main = Connection("main", store=MemfdStore())
    main.receive_data(bytes(child.data_to_send()[0]))
    child.receive_data(bytes(main.data_to_send()[0]))
    r, w = os.pipe()
    h, other = tether.Handle(w), tether.Handle(os.dup(r))
    with pytest.raises(tether.ConsumedError, match="passed twice in one call"):
        child.send_invoke(b"x", (other, h, h), None)
    assert h.consumed and other.consumed  # the failed send moved every Handle in it
    with pytest.raises(tether.ConsumedError, match="sent, detached or closed"):
        child.send_invoke(b"x", (h,), None)  # a later call: the usual message
    os.close(r)


@pytest.mark.parametrize("extra", ["lease", "moved"])
def test_handle_with_lease_or_moved_is_a_protocol_error(extra: str) -> None:
    from tether import wire
    from tether.attachments import MemfdStore

    store = MemfdStore(borrow=True)
    r, w = os.pipe()
    os.close(w)
    store.receive_fds([r])
    flag = wire.FLAG_LEASE if extra == "lease" else wire.FLAG_MOVED
    with pytest.raises(tether.ProtocolError, match="HANDLE together with LEASE or MOVED"):
        store.claim(0, wire.FLAG_HANDLE | flag, 1)
    with pytest.raises(OSError):
        os.fstat(r)  # closed, not leaked
    store.close()


# -- Main.connect: check first, announce to a, then to b ------------------------------


async def test_a_failed_connect_announces_nothing_to_the_first_side() -> None:
    import _handle_targets

    async with tether.Main(timeout=30.0) as hub:
        a = await hub.spawn(_handle_targets.direct_child)
        silent = await hub.spawn(_handle_targets.no_connect_child)
        refusing = await hub.spawn(_handle_targets.refusing_child)
        with pytest.raises(tether.NoHandler):
            await hub.connect(silent, a)
        with pytest.raises(tether.RemoteError, match="no siblings here"):
            await hub.connect(refusing, a)
        assert await a.invoke("siblings") == 0  # a's on_connect never ran
        hub.connect_roles.add("client")
        tcp = await hub.listen("tcp://127.0.0.1:0")
        async with tether.connect(str(tcp.address)):
            deadline = time.monotonic() + 10
            while not [p for p in hub.peers if p.role == "client"]:
                assert time.monotonic() < deadline
                await asyncio.sleep(0.01)
            (client,) = [p for p in hub.peers if p.role == "client"]
            with pytest.raises(tether.HandleRefused, match="cannot take a descriptor"):
                await hub.connect(a, client)  # checked before a hears of it
        assert await a.invoke("siblings") == 0
        # the second side refuses: the first, which accepted, sees PeerGone
        with pytest.raises(tether.RemoteError, match="no siblings here"):
            await hub.connect(a, refusing)
        assert await a.invoke("siblings") == 1
        assert await a.invoke("sibling_gone", timeout=20) == "PeerGone"  # ends by itself
        assert await a.invoke("sibling_call", timeout=20) == "PeerGone"


async def test_invokes_answered_busy_close_their_handles() -> None:
    async with tether.Main(timeout=60.0, max_inflight=4) as hub:

        @hub.handle("slow")
        async def slow(call: tether.Call, h: tether.Handle) -> None:
            await asyncio.sleep(0.2)

        c = await hub.spawn(flood_invokes)
        base = fd_count()
        got = await c.invoke("flood", 300)
        assert got.get("Busy", 0) > 0 and sum(got.values()) == 300
        deadline = time.monotonic() + 10
        while fd_count() > base and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        assert fd_count() <= base  # every refused invoke's Handle was closed here
        assert c.exitcode is None
