"""Child -> main transfers: the child lends reused segments, main copies each out at once.

Main never reads memory a child can change after sending: it copies a lent
segment into its own memory as the frame is parsed, releases it in the same
read, and everything after reads only the copy (docs/protocol.md 3.5,
"Copied out"). The child's segments and main's destinations are reused, so a
steady stream of transfers faults in no fresh pages.
"""

from __future__ import annotations

import asyncio
import fcntl
import gc
import os
from typing import Any

import msgspec
import numpy as np
import pytest

import _copyout_targets
import tether
from tether import codec, copyout
from tether.attachments import MemfdStore, store_for
from tether.protocol import Connection
from tether.segments import _size_class
from tether.wire import ATT, FLAG_LEASE, HEADER, WHERE_FD, Kind

pytestmark = pytest.mark.timeout(60)

KIB = 1024
MIB = 1 << 20


# -- sans I/O: a child and a main, each with the store its role gets -----------------------


def family(**child_store: Any) -> tuple[Connection, Connection]:
    """(child, main) with their HELLOs exchanged: the child lends, main copies."""
    cstore = MemfdStore(lend=True, borrow=True, **child_store) if child_store else None
    child = Connection("child", store=cstore or store_for(True, "main", "child"))
    main = Connection("main", store=store_for(True, "child", "main"))
    main.receive_data(child.data_to_send()[0])
    child.receive_data(main.data_to_send()[0])
    return child, main


def store(c: Connection) -> MemfdStore:
    st = c.store
    assert isinstance(st, MemfdStore)
    return st


def deliver(src: Connection, dst: Connection) -> list[Any]:
    data, fds = src.data_to_send()
    if fds:  # what the I/O layer does: the receiver gets duplicates, the sender closes its own
        dst.receive_fds([os.dup(fd) for fd in fds])
        for fd in fds:
            os.close(fd)
    return dst.receive_data(data)


def decode(frame: Any) -> Any:
    return codec.decode_with(codec.any_decoder, frame.body, frame.attachments)


def warm(child: Connection, main: Connection, nbytes: int) -> None:
    """Send one attachment of ``nbytes``: the first of its size class goes sealed."""
    child.send_event(b"warm", (np.zeros(nbytes, np.uint8),))
    assert store(child).leases_out == 0
    (frame,) = deliver(child, main)
    assert len(decode(frame)[0]) == nbytes
    assert store(main).copied.mapped == 0  # mapped in place: nothing to copy out


def holder_map(x: Any) -> Any:
    """The mmap that finally owns ``x``'s memory."""
    o = x
    for _ in range(64):
        if isinstance(o, np.ndarray) and o.base is not None:
            o = o.base
        elif isinstance(o, memoryview):
            o = o.obj
        else:
            break
    return o


def test_main_announces_copy_and_the_child_lends_to_it() -> None:
    child, main = family()
    assert "copy" in store(main).features and "lease" not in store(main).features
    assert child.peer_hello is not None and "copy" in child.peer_hello.features
    arr = np.arange(64 * KIB, dtype=np.uint32)
    warm(child, main, arr.nbytes)
    child.send_event(b"take", (arr,))
    assert store(child).leases_out == 1  # lent, not sealed
    (frame,) = deliver(child, main)
    # the RELEASE is queued in the same read, before anything decoded the frame
    out = bytes(main.data_to_send()[0])
    assert out[4] == Kind.RELEASE
    (got,) = decode(frame)
    assert np.array_equal(got, arr) and not got.flags.writeable
    assert isinstance(holder_map(got), type(copyout._fresh(1, 0)))  # main's own mapping
    child.receive_data(out)
    assert store(child).leases_out == 0 and store(child).idle_segments == 1


def test_the_childs_segment_and_mains_mapping_of_it_are_reused() -> None:
    child, main = family()
    warm(child, main, 100 * KIB)
    for i in range(5):
        child.send_event(b"take", (np.full(100 * KIB, i, np.uint8),))
        seg = next(iter(store(child)._leases.values()))
        if i == 0:
            first = seg
        assert seg is first  # refilled, not a fresh memfd
        (frame,) = deliver(child, main)
        (got,) = decode(frame)
        assert int(got.min()) == i == int(got.max())
        deliver(main, child)  # the RELEASE
    assert store(main).copied.mapped == 1  # mapped once, kept
    assert store(child).idle_segments == 1


def test_a_child_rewriting_its_segment_after_sending_changes_nothing_main_sees() -> None:
    child, main = family()
    arr = np.full(128 * KIB, 7, np.uint8)
    warm(child, main, arr.nbytes)
    child.send_event(b"take", (arr,))
    seg = next(iter(store(child)._leases.values()))
    (frame,) = deliver(child, main)
    seg.map[: seg.size] = b"\xff" * seg.size  # hostile: writes after sending, before main decodes
    (got,) = decode(frame)
    assert int(got.min()) == 7 == int(got.max())
    # ...and after main released it, the child refills it for the next send: still unchanged
    deliver(main, child)
    child.send_event(b"take", (np.full(128 * KIB, 9, np.uint8),))
    assert next(iter(store(child)._leases.values())) is seg
    (frame2,) = deliver(child, main)
    seg.map[: seg.size] = b"\x00" * seg.size
    (got2,) = decode(frame2)
    assert int(got.min()) == 7 == int(got.max())
    assert int(got2.min()) == 9 == int(got2.max())


def _lent_event(length: int, lease: int = 1) -> bytes:
    """An EVENT whose one argument is a LEASE descriptor (``lease``) of ``length`` bytes."""
    body = codec.encoder.encode([msgspec.msgpack.Ext(codec.EXT_BYTES, bytes(4))])
    table = ATT.pack(WHERE_FD, FLAG_LEASE, 0, lease, length)
    size = HEADER.size - 4 + 1 + len(table) + len(body)
    return HEADER.pack(size, Kind.EVENT, 0, 1, 0, 0, 1, 0) + b"e" + table + body


def _closed(fd: int) -> bool:
    try:
        os.fstat(fd)
    except OSError:
        return True
    return False


@pytest.mark.parametrize(
    ("make", "match"),
    [
        # without F_SEAL_SHRINK the child could cut it under main's copy (SIGBUS in main)
        (lambda: _memfd(64 * KIB, fcntl.F_SEAL_GROW), "not sealed against shrinking"),
        (lambda: _memfd(32 * KIB, fcntl.F_SEAL_SHRINK), "lent segment of"),  # smaller
        (lambda: _memfd(1 << 30, fcntl.F_SEAL_SHRINK), "lent segment of"),  # past its class
        (lambda: os.pipe()[0], "not a sealable memfd"),
    ],
)
def test_main_refuses_a_lent_segment_it_cannot_copy_safely(make: Any, match: str) -> None:
    _, main = family()
    fd = make()
    main.receive_fds([fd])
    with pytest.raises(tether.ProtocolError, match=match):
        main.receive_data(_lent_event(64 * KIB))
    assert _closed(fd)
    assert store(main).closed


def test_lease_id_0_is_a_protocol_error() -> None:
    _, main = family()
    fd = _memfd(64 * KIB, fcntl.F_SEAL_SHRINK)
    main.receive_fds([fd])
    with pytest.raises(tether.ProtocolError, match="lease id 0"):
        main.receive_data(_lent_event(64 * KIB, lease=0))
    assert _closed(fd)


def test_a_lent_segment_that_grew_is_mapped_afresh() -> None:
    # Sealed only against shrinking, a lender may grow its segment between two
    # leases: main's cached mapping of the smaller one must not cut the data short.
    _, main = family()
    fd = _memfd(64 * KIB, fcntl.F_SEAL_SHRINK)
    os.pwrite(fd, b"a" * (64 * KIB), 0)
    main.receive_fds([os.dup(fd)])
    (frame,) = main.receive_data(_lent_event(64 * KIB, lease=1))
    assert bytes(decode(frame)[0]) == b"a" * (64 * KIB)
    os.ftruncate(fd, 4 * MIB)
    os.pwrite(fd, b"b" * (4 * MIB), 0)
    main.receive_fds([os.dup(fd)])
    (frame,) = main.receive_data(_lent_event(4 * MIB, lease=2))
    got = decode(frame)[0]
    assert len(got) == 4 * MIB and bytes(got) == b"b" * (4 * MIB)
    assert store(main).copied.mapped == 1 and store(main).copied.mapped_bytes == 4 * MIB
    assert main.data_to_send()[0]  # both RELEASEs
    os.close(fd)


def _memfd(size: int, seals: int) -> int:
    fd = os.memfd_create("tether-lease", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
    os.ftruncate(fd, size)
    fcntl.fcntl(fd, fcntl.F_ADD_SEALS, seals)
    return fd


def test_a_child_lending_a_new_segment_each_time_leaves_main_a_bounded_cache() -> None:
    child, main = family()
    warm(child, main, 64 * KIB)
    cache = store(main).copied
    for i in range(3 * cache.max_maps):
        child.send_event(b"take", (np.full(64 * KIB, i, np.uint8),))
        (frame,) = deliver(child, main)
        assert int(decode(frame)[0][0]) == i
        deliver(main, child)
        store(child)._pool.clear()  # never reuses: the next send is a fresh segment
    assert cache.mapped == cache.max_maps
    assert cache.mapped_bytes <= cache.max_bytes
    main.abort()
    assert cache.mapped == 0 and cache.mapped_bytes == 0


def test_the_first_attachment_of_a_size_goes_sealed_the_next_are_lent() -> None:
    child, main = family()
    warm(child, main, 100 * KIB)  # a one-off costs what it did: no segment kept anywhere
    assert store(child).idle_segments == 0
    warm(child, main, 1 * MIB)  # another size class: sealed again
    child.send_event(b"e", (np.zeros(90 * KIB, np.uint8),))  # the first class again
    assert store(child).leases_out == 1
    deliver(child, main)
    assert store(main).copied.mapped == 1


def test_past_the_childs_pool_attachments_go_sealed() -> None:
    child, main = family(max_idle=256 * KIB, max_segments=2)
    warm(child, main, 128 * KIB)
    # too large for the pool at all: sealed one-offs, nothing lent, even the second time
    for i in range(2):
        child.send_event(b"big", (np.full(300 * KIB, i, np.uint8),))
        assert store(child).leases_out == 0
        (frame,) = deliver(child, main)
        assert int(decode(frame)[0][-1]) == i
    assert store(main).copied.mapped == 0  # mapped in place (sealed), not copied
    # the segments lent out at once stay within the pool: the third goes sealed
    for i in range(3):
        child.send_event(b"e", (np.full(128 * KIB, i, np.uint8),))
    assert store(child).leases_out == 2 and store(child)._lent_bytes == 256 * KIB
    frames = deliver(child, main)
    assert [int(decode(f)[0][0]) for f in frames] == [0, 1, 2]
    deliver(main, child)
    assert store(child).leases_out == 0 and store(child).idle_segments == 2


def test_main_refuses_leases_when_it_does_not_copy() -> None:
    child = Connection("child", store=store_for(True, "main", "child"))
    strict = Connection("main", store=MemfdStore(lend=True))  # "fd" only
    strict.receive_data(child.data_to_send()[0])
    child.receive_data(strict.data_to_send()[0])
    assert not child._send_leases  # nothing lent to a main that doesn't copy
    child._send_leases = True  # a child ignoring main's features
    child.send_event(b"take", (np.zeros(64 * KIB, np.uint8),))
    with pytest.raises(tether.ProtocolError, match="does not trust"):
        deliver(child, strict)


def test_no_release_after_mains_goodbye() -> None:
    child, main = family()
    warm(child, main, 64 * KIB)
    child.send_event(b"take", (np.zeros(64 * KIB, np.uint8),))
    assert store(child).leases_out == 1
    data, fds = child.data_to_send()
    main.send_goodbye("closing")
    main.data_to_send()
    main.receive_fds(fds)
    main.receive_data(data)
    assert bytes(main.data_to_send()[0]) == b""  # GOODBYE was the last frame


# -- main's destinations ------------------------------------------------------------------


def test_a_destination_is_reused_once_the_last_view_is_gone() -> None:
    pool = copyout.Destinations()
    src = memoryview(np.full(200 * KIB, 3, np.uint8))
    a = pool.copy(src)
    assert pool.live == 1 and a.readonly and bytes(a[:2]) == b"\x03\x03"
    m = holder_map(a)
    arr = np.frombuffer(a, np.uint8)  # a derived view keeps it out
    del a
    gc.collect()
    assert pool.live == 1
    del arr
    gc.collect()
    assert pool.live == 0 and pool.idle_bytes == _size_class(200 * KIB)
    b = pool.copy(memoryview(np.full(150 * KIB, 4, np.uint8)))  # same size class
    assert holder_map(b) is m and int(np.frombuffer(b, np.uint8).max()) == 4
    assert len(b) == 150 * KIB
    del b
    pool.clear()
    assert pool.idle_bytes == 0


def test_idle_destinations_are_bounded() -> None:
    pool = copyout.Destinations(max_idle=256 * KIB, max_count=2)
    views = [pool.copy(memoryview(bytes(64 * KIB))) for _ in range(5)]
    assert pool.live == 5
    del views
    gc.collect()
    assert pool.live == 0
    assert pool.idle_bytes == 2 * 64 * KIB  # the rest were unmapped
    pool.clear()


def test_without_numpy_each_copy_gets_fresh_pages(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(copyout, "_numpy", lambda: None)
    pool = copyout.Destinations()
    src = memoryview(bytes(range(256)) * 512)
    a = pool.copy(src)
    assert a.readonly and bytes(a) == bytes(src)
    assert pool.live == 0 and pool.idle_bytes == 0  # nothing to hand back: no finalizer


# -- end to end ---------------------------------------------------------------------------


async def test_a_childs_arrays_reach_main_through_one_reused_segment() -> None:
    async with tether.Main(timeout=30.0) as main:
        child = await main.spawn(_copyout_targets.lender)
        for i in range(20):
            got = await child.invoke("give", MIB, i)
            assert got.nbytes == MIB and int(got.min()) == i == int(got.max())
            assert not got.flags.writeable
            del got
        mine = store(child._conn)
        assert mine.copied.mapped == 1  # the same child segment every time
        pool = await child.invoke("pool")
        assert pool == {"idle": 1, "out": 0, "lent_bytes": 0}


async def test_a_scribbling_child_cannot_change_what_mains_handler_holds() -> None:
    async with tether.Main(timeout=30.0) as main:
        child = await main.spawn(_copyout_targets.scribbler)
        held = []
        for i in range(10):
            got = await child.invoke("give", 256 * KIB, i)
            held.append((got, got.copy()))
        await asyncio.sleep(0.2)  # the child keeps writing into every segment it lent
        for got, snapshot in held:
            assert np.array_equal(got, snapshot)
        assert store(child._conn).copied.mapped >= 1  # they were lent, not sealed


async def test_a_child_flooding_large_events_leaves_main_bounded() -> None:
    before = copyout.DESTINATIONS.live
    seen: list[int] = []
    async with tether.Main(timeout=30.0) as main:

        @main.on("blob")
        def blob(call: tether.Call, a: Any) -> None:
            seen.append(int(a[0]))  # keeps nothing

        child = await main.spawn(_copyout_targets.lender)
        assert await child.invoke("flood", 200, 2 * MIB) == 200
        for _ in range(500):
            if len(seen) == 200:
                break
            await asyncio.sleep(0.01)
        assert seen == [i % 251 for i in range(200)]
        mine = store(child._conn)
        assert mine.copied.mapped <= mine.copied.max_maps
        assert mine.copied.mapped_bytes <= mine.copied.max_bytes
        gc.collect()
        assert copyout.DESTINATIONS.live == before  # every copy handed back
        assert copyout.DESTINATIONS.idle_bytes <= copyout.DESTINATIONS.max_idle
        pool = await child.invoke("pool")
        assert pool["out"] == 0 and pool["idle"] <= 8


async def test_a_blocking_child_lends_to_main_too() -> None:
    got: list[Any] = []
    async with tether.Main(timeout=30.0) as main:
        main.on("blob", lambda call, a: got.append(a))
        child = await main.spawn(_copyout_targets.blocking_lender, 512 * KIB, 5)
        for _ in range(500):
            if len(got) == 5:
                break
            await asyncio.sleep(0.01)
        assert [int(a[0]) for a in got] == list(range(5))
        assert store(child._conn).copied.mapped >= 1
