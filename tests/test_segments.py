"""Lent segments (leases) and moved Buffers: reuse only what the receiver released.

A child trusts its main, so main lends it pooled segments (one copy into
pages already faulted in) and hands Buffers over in O(1). A main trusts no
child: what a child lends it is copied out on arrival (tests/test_copyout.py),
and a lease offered to a side that neither borrows nor copies is a protocol
error.
"""

from __future__ import annotations

import asyncio
import fcntl
import gc
import os
from typing import Any

import numpy as np
import pytest

import tether
from tether import codec
from tether.attachments import MAX_LEASES, MemfdStore
from tether.errors import ProtocolError
from tether.protocol import Connection
from tether.segments import Borrowed, SegmentPool, _size_class
from tether.wire import Kind

pytestmark = pytest.mark.timeout(60)

KIB = 1024


# -- the pool itself ---------------------------------------------------------


def test_size_classes_are_powers_of_two_from_64_kib() -> None:
    assert _size_class(1) == 64 * KIB
    assert _size_class(64 * KIB) == 64 * KIB
    assert _size_class(64 * KIB + 1) == 128 * KIB
    assert _size_class(3 * 1024 * KIB) == 4 * 1024 * KIB


def test_pool_reuses_put_segments_and_respects_its_caps() -> None:
    pool = SegmentPool(max_idle=256 * KIB, max_segments=2)
    a = pool.get(100 * KIB)
    assert a.size == 128 * KIB
    pool.put(a)
    assert pool.idle_segments == 1 and pool.idle_bytes == 128 * KIB
    assert pool.get(70 * KIB) is a  # same class: reused
    b, c, d = pool.get(64 * KIB), pool.get(64 * KIB), pool.get(64 * KIB)
    for seg in (a, b, c, d):
        pool.put(seg)
    assert pool.idle_segments == 2  # the cap closed the rest
    assert pool.idle_bytes <= 256 * KIB
    pool.clear()
    assert pool.idle_segments == 0 and pool.idle_bytes == 0


# -- the protocol, sans I/O ------------------------------------------------------


def pair(lend: bool = True, borrow: bool = True) -> tuple[Connection, Connection]:
    """A main (lending when ``lend``) and a child (borrowing when ``borrow``), each with a store."""
    a = Connection("main", store=MemfdStore(lend=lend))
    b = Connection("child", store=MemfdStore(borrow=borrow))
    b.receive_data(a.data_to_send()[0])
    a.receive_data(b.data_to_send()[0])
    return a, b


def store(c: Connection) -> MemfdStore:
    st = c.store
    assert isinstance(st, MemfdStore)
    return st


def deliver(src: Connection, dst: Connection) -> list[Any]:
    data, fds = src.data_to_send()
    if fds:
        # what the I/O layer does: the receiver gets duplicates, the sender closes its own
        dst.receive_fds([os.dup(fd) for fd in fds])
        for fd in fds:
            os.close(fd)
    return dst.receive_data(data)


def test_main_lends_a_segment_and_takes_it_back_on_release() -> None:
    a, b = pair()
    arr = np.arange(64 * KIB, dtype=np.uint32)
    a.send_event(b"take", (arr,))
    assert store(a).leases_out == 1
    (frame,) = deliver(a, b)
    (got,) = codec.decode_with(codec.any_decoder, frame.body, frame.attachments)
    assert np.array_equal(got, arr) and not got.flags.writeable
    assert store(a).idle_segments == 0
    del got, frame
    gc.collect()
    # the receiver's last view is gone: it answers with RELEASE
    assert b.poll_releases()
    out = b.data_to_send()[0]
    assert out[4] == Kind.RELEASE
    a.receive_data(out)
    assert not store(a).leases_out and store(a).idle_segments == 1
    # the next transfer reuses those pages
    seg = store(a)._pool._free[_size_class(arr.nbytes)][0]
    a.send_event(b"take", (arr + 1,))
    assert store(a)._leases[max(store(a)._leases)] is seg
    (frame,) = deliver(a, b)
    (got,) = codec.decode_with(codec.any_decoder, frame.body, frame.attachments)
    assert np.array_equal(got, arr + 1)


def test_a_leased_segment_is_never_rewritten_while_the_receiver_holds_it() -> None:
    a, b = pair()
    first = np.full(32 * KIB, 1, dtype=np.uint16)
    a.send_event(b"take", (first,))
    (f1,) = deliver(a, b)
    (held,) = codec.decode_with(codec.any_decoder, f1.body, f1.attachments)
    for i in range(2, 6):
        a.send_event(b"take", (np.full(32 * KIB, i, dtype=np.uint16),))
        (f,) = deliver(a, b)
        (x,) = codec.decode_with(codec.any_decoder, f.body, f.attachments)
        assert int(x[0]) == i
        del x, f
        gc.collect()
        assert b.poll_releases()
        a.receive_data(b.data_to_send()[0])  # releases of the others come back
        assert (held == 1).all()  # still the first payload


def test_a_main_that_does_not_copy_refuses_a_lent_segment() -> None:
    # A child (sender) that pretends main accepts leases (this main's store neither
    # borrows nor copies: it announced "fd" only).
    child = Connection("child", store=MemfdStore(lend=True, borrow=True))
    main = Connection("main", store=MemfdStore())
    main.receive_data(child.data_to_send()[0])
    child.receive_data(main.data_to_send()[0])
    child._send_leases = True  # a hostile child ignores main's features
    child.send_event(b"take", (np.zeros(64 * KIB, np.uint8),))
    with pytest.raises(ProtocolError, match="does not trust"):
        deliver(child, main)
    main.abort()
    child.abort()


def test_without_lease_feature_segments_are_sealed() -> None:
    a, b = pair(borrow=False)
    a.send_event(b"take", (np.zeros(64 * KIB, np.uint8),))
    assert not store(a).leases_out
    (frame,) = deliver(a, b)
    (got,) = codec.decode_with(codec.any_decoder, frame.body, frame.attachments)
    assert got.nbytes == 64 * KIB


def test_a_dead_connection_discards_its_leases() -> None:
    a, b = pair()
    a.send_event(b"take", (np.zeros(64 * KIB, np.uint8),))
    deliver(a, b)
    assert store(a).leases_out == 1
    a.fail_all()
    assert not store(a).leases_out and store(a).idle_segments == 0  # not reused: never released


# -- end to end ------------------------------------------------------------------


async def hold_child(peer: tether.Peer) -> None:
    held: list[Any] = []

    @peer.handle("hold")
    def hold(call: tether.Call, arr: Any) -> int:
        held.append(arr)
        return int(arr[0])

    @peer.handle("check")
    def check(call: tether.Call) -> list[int]:
        return [int(a[0]) for a in held] + [int(a[-1]) for a in held]

    @peer.handle("drop")
    def drop(call: tether.Call) -> None:
        held.clear()
        gc.collect()

    @peer.handle("nbytes")
    def nbytes(call: tether.Call, buf: Any) -> int:
        return int(memoryview(buf).nbytes)

    @peer.handle("polling")
    def polling(call: tether.Call) -> bool:
        return call.peer._lease_timer is not None  # type: ignore[attr-defined]

    @peer.handle("give")
    def give(call: tether.Call, n: int) -> Any:
        return np.full(n, 7, np.uint8)

    await peer.wait_closed()


async def test_main_to_child_arrays_are_lent_and_come_back() -> None:
    async with tether.Main() as main:
        child = await main.spawn(hold_child)
        for i in range(8):
            assert await child.invoke("hold", np.full(100 * KIB, i, np.uint8)) == i
        # eight live leases: nothing was reused under the child
        assert await child.invoke("check") == list(range(8)) * 2
        assert store(child._conn).idle_segments == 0
        await child.invoke("drop")
        for _ in range(100):  # releases travel back asynchronously
            if store(child._conn).idle_segments == 8:
                break
            await asyncio.sleep(0.01)
        assert store(child._conn).idle_segments == 8
        # a child's arrays reach main sealed the first time, then in the child's
        # lent segment, copied out at once
        for _ in range(2):
            got = await child.invoke("give", 200 * KIB)
            assert got.nbytes == 200 * KIB and (got == 7).all()
        assert store(child._conn).copied.mapped == 1


async def test_buffer_moves_to_a_trusting_child_in_constant_time() -> None:
    async with tether.Main() as main:
        child = await main.spawn(hold_child)
        buf = tether.Buffer(64 << 20)
        buf.array()[:] = 3
        assert await child.invoke("nbytes", buf) == 64 << 20
        with pytest.raises(tether.ConsumedError):
            buf.view()
        # with a live view the handoff is refused and the buffer consumed
        held = tether.Buffer(1 << 20)
        view = held.array()
        with pytest.raises(tether.BufferInUse):
            await child.invoke("nbytes", held)
        assert held.consumed
        assert int(view[0]) == 0  # the producer's own pages, still readable


def test_a_borrower_cannot_shrink_or_write_a_lent_segment() -> None:
    import mmap as _mmap

    pool = SegmentPool()
    seg = pool.get(64 * KIB)
    borrowed = os.dup(seg.fd)  # what the borrower receives
    try:
        with pytest.raises(PermissionError):
            os.ftruncate(borrowed, 0)
        with pytest.raises(PermissionError):
            os.pwrite(borrowed, b"x", 0)
        with pytest.raises(PermissionError):
            _mmap.mmap(borrowed, 64 * KIB, _mmap.MAP_SHARED, _mmap.PROT_READ | _mmap.PROT_WRITE)
        seg.fill(memoryview(b"still writable by the lender"))
        assert os.pread(borrowed, 5, 0) == b"still"
    finally:
        os.close(borrowed)
        pool.put(seg)
        pool.clear()


def test_an_empty_or_short_lease_is_a_protocol_error() -> None:
    from tether.segments import Borrowed

    borrowed = Borrowed()
    for nbytes in (0, 64 * KIB + 1):
        fd = os.memfd_create("t")
        os.ftruncate(fd, 64 * KIB)
        with pytest.raises(ProtocolError):
            borrowed.map_lease(fd, nbytes, 1)
        with pytest.raises(OSError):
            os.fstat(fd)  # closed all the same


def test_a_peer_that_hoards_lent_arrays_gets_sealed_ones_past_the_cap() -> None:
    a, b = pair()
    held = []
    for _ in range(MAX_LEASES + 5):
        a.send_event(b"take", (np.zeros(64 * KIB, np.uint8),))
        (f,) = deliver(a, b)
        held.append(codec.decode_with(codec.any_decoder, f.body, f.attachments)[0])
    assert store(a).leases_out == MAX_LEASES  # the rest went sealed: main holds nothing for them
    del held, f
    gc.collect()
    assert b.poll_releases()
    a.receive_data(b.data_to_send()[0])
    assert not store(a).leases_out
    a.abort()
    b.abort()


def test_the_receiver_keeps_one_mapping_per_segment_and_releases_by_views() -> None:
    a, b = pair()
    seen = []
    for i in range(4):
        a.send_event(b"take", (np.full(64 * KIB, i, np.uint8),))
        (f,) = deliver(a, b)
        (x,) = codec.decode_with(codec.any_decoder, f.body, f.attachments)
        view = x[10:20]  # a derived view keeps the lease out
        del x, f
        assert not b.poll_releases()
        assert int(view[0]) == i
        seen.append(id(memoryview(view).obj))
        del view
        assert b.poll_releases()
        a.receive_data(b.data_to_send()[0])
    # the same segment came back each time, and the receiver mapped it once
    assert store(a).idle_segments == 1
    assert len(store(b).borrowed._maps) == 1
    a.abort()
    b.abort()


def test_a_dropped_lease_is_reported_without_polling() -> None:
    """D17: the store calls back when the last view of a lease goes; no timer needed."""
    a, b = pair()
    calls: list[int] = []
    store(b).on_release = lambda: calls.append(1)
    assert store(b).notifies
    a.send_event(b"take", (np.full(64 * KIB, 3, np.uint8),))
    (frame,) = deliver(a, b)
    (got,) = codec.decode_with(codec.any_decoder, frame.body, frame.attachments)
    view = got[5:9]
    del got, frame
    assert calls == [] and store(b).outstanding == 1
    del view  # the last view: reported at once, no collection, no poll
    assert calls == [1]
    assert b.poll_releases()
    a.receive_data(b.data_to_send()[0])
    assert not store(a).leases_out
    a.abort()
    b.abort()


async def test_a_child_holding_a_lease_runs_no_poll_timer() -> None:
    async with tether.Main() as main:
        child = await main.spawn(hold_child)
        assert await child.invoke("hold", np.full(100 * KIB, 1, np.uint8)) == 1
        assert await child.invoke("polling") is False
        assert store(child._conn).leases_out == 1
        await child.invoke("drop")
        for _ in range(200):  # the release comes back without a poll
            if not store(child._conn).leases_out:
                break
            await asyncio.sleep(0.01)
        assert not store(child._conn).leases_out


def test_no_release_follows_our_goodbye() -> None:
    """8.4/8.5: GOODBYE is the last frame; a lease dropped after it is not released."""
    a, b = pair()
    a.send_event(b"take", (np.full(64 * KIB, 1, np.uint8),))
    (frame,) = deliver(a, b)
    (got,) = codec.decode_with(codec.any_decoder, frame.body, frame.attachments)
    b.send_goodbye("bye")
    del got, frame
    b.poll_releases()
    data, _ = b.data_to_send()
    assert [data[4]] == [Kind.GOODBYE] and len(data) == int.from_bytes(data[:4], "little") + 4
    a.abort()
    b.abort()


def test_a_segment_dropped_without_close_closes_its_descriptor() -> None:
    seg = SegmentPool().get(64 * KIB)
    fd = seg.fd
    del seg
    gc.collect()
    with pytest.raises(OSError):
        os.fstat(fd)


def test_a_borrowed_segment_that_grew_is_mapped_afresh() -> None:
    fd = os.memfd_create("grown", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
    os.ftruncate(fd, 64 << 10)
    fcntl.fcntl(fd, fcntl.F_ADD_SEALS, fcntl.F_SEAL_SHRINK)
    borrowed = Borrowed()
    view = borrowed.map_lease(os.dup(fd), 64 << 10, 1)
    assert len(view) == 64 << 10
    del view
    gc.collect()
    assert borrowed.released() == [1]
    os.ftruncate(fd, 4 << 20)
    os.pwrite(fd, b"b" * (4 << 20), 0)
    view = borrowed.map_lease(os.dup(fd), 4 << 20, 2)
    assert len(view) == 4 << 20 and bytes(view) == b"b" * (4 << 20)
    del view
    borrowed.clear()
    os.close(fd)
