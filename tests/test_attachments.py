"""Out-of-band attachments end to end: arrays, large bytes and ``tether.Buffer``.

Between processes on one host (a spawned child, a unix-socket client) large
payloads must cross through sealed shared memory and arrive read-only; over
TCP they arrive inline. Either way they arrive equal.
Every sent :class:`tether.Buffer` is consumed, whether the send worked or not,
and nothing leaks: not after 10,000 transfers, not after a SIGKILL mid-transfer,
not for a frame nobody handles.

Where an attachment came from is read off the received object itself: the
chain of ``.base`` / ``memoryview.obj`` ends at an ``mmap`` for a shared-memory
segment and at the received ``bytes``/``bytearray`` for inline data.
"""

from __future__ import annotations

import array
import asyncio
import contextlib
import gc
import hashlib
import multiprocessing.resource_tracker
import os
import socket
import subprocess
import sys
import textwrap
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import msgspec
import numpy as np
import pytest

import tether
from tether.attachments import MemfdStore
from tether.protocol import Connection
from tether.shm import SHM_THRESHOLD

pytestmark = pytest.mark.timeout(120)

KIB = 1024
MIB = 1024 * 1024


# -- helpers, used on both sides ------------------------------------------------------


def origin(x: Any) -> str:
    """Type name of the object that finally owns ``x``'s memory (``mmap`` = shared memory)."""
    o: Any = x
    for _ in range(64):
        if isinstance(o, np.ndarray) and o.base is not None:
            o = o.base
        elif isinstance(o, memoryview):
            o = o.obj
        else:
            break
    return type(o).__name__


def digest(x: Any) -> str:
    if isinstance(x, np.ndarray):
        return hashlib.sha256(np.ascontiguousarray(x).tobytes()).hexdigest()
    return hashlib.sha256(x).hexdigest()


def describe(x: Any) -> dict[str, Any]:
    """What a receiver saw: type, dtype, shape, writability, origin and a content digest."""
    if isinstance(x, np.ndarray):
        return {
            "type": "ndarray",
            "dtype": x.dtype.str,
            "shape": list(x.shape),
            "writeable": bool(x.flags.writeable),
            "origin": origin(x),
            "sha": digest(x),
        }
    if isinstance(x, memoryview):
        return {
            "type": "memoryview",
            "nbytes": x.nbytes,
            "writeable": not x.readonly,
            "origin": origin(x),
            "sha": digest(x),
        }
    return {"type": type(x).__name__}


def describe_tree(x: Any) -> Any:
    if isinstance(x, dict):
        return {k: describe_tree(v) for k, v in x.items()}
    if isinstance(x, list):
        return [describe_tree(v) for v in x]
    if isinstance(x, (np.ndarray, memoryview)):
        return describe(x)
    return x


def gen(dtype: str, shape: list[int], seed: int) -> np.ndarray:
    """A deterministic array with distinct-ish values (no NaN, so array_equal works)."""
    size = int(np.prod(shape)) if shape else 1
    rng = np.random.default_rng(seed)
    base = rng.permutation(size) + seed
    dt = np.dtype(dtype)
    a: np.ndarray
    if dt.kind == "b":
        a = (base % 3 == 0).astype(dt)
    elif dt.kind == "c":
        a = (base + 0.5j * base).astype(dt)
    elif dt.kind in "Mm":
        a = base.astype(np.int64).astype(dt)
    else:
        a = base.astype(dt)
    return a.reshape(shape)


def open_fds() -> int:
    """Open descriptors, after a collection (leftovers of earlier tests go first)."""
    gc.collect()
    return len(os.listdir("/proc/self/fd"))


def drop_kept_mappings(peer: Any) -> None:
    """Caches, not leaks: a receiver keeps its mappings of lent segments for reuse,
    a lender its idle segments, a main its mappings of segments it copied out."""
    gc.collect()
    peer._conn.poll_releases()
    store = peer._conn.store
    store.borrowed.drop_idle()
    store.copied.clear()
    store._pool.clear()


def tether_maps() -> int:
    """Mappings of tether memfd segments in this process, after a collection."""
    gc.collect()
    with open("/proc/self/maps") as f:
        return sum("memfd:tether" in line for line in f)


def dev_shm() -> set[str]:
    """POSIX shared memory files (not semaphores: other processes' multiprocessing locks)."""
    return {n for n in os.listdir("/dev/shm") if not n.startswith("sem.")}


async def wait_for(predicate: Callable[[], bool], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError(f"condition not met within {timeout} s")
        await asyncio.sleep(0.01)


def install_handlers(reg: Any, roles: Any = None) -> None:
    """Handlers both main and the child answer (``reg`` is a Main or a Peer).

    ``roles``: as for ``handle`` (a hub that TCP clients call names their role).
    """

    @reg.handle("describe", roles=roles)
    def _describe(call: Any, x: Any) -> dict[str, Any]:
        return describe(x)

    @reg.handle("describe_many", roles=roles)
    def _describe_many(call: Any, *xs: Any) -> list[dict[str, Any]]:
        return [describe(x) for x in xs]

    @reg.handle("describe_tree", roles=roles)
    def _describe_tree(call: Any, x: Any) -> Any:
        return describe_tree(x)

    @reg.handle("echo", roles=roles)
    def _echo(call: Any, x: Any) -> Any:
        return x

    @reg.handle("make", roles=roles)
    def _make(call: Any, dtype: str, shape: list[int], seed: int) -> np.ndarray:
        return gen(dtype, shape, seed)

    @reg.handle("make_bytes", roles=roles)
    def _make_bytes(call: Any, n: int, seed: int) -> bytes:
        return bytes((seed + i) % 251 for i in range(256)) * (n // 256)

    @reg.handle("make_buffer", roles=roles)
    def _make_buffer(call: Any, n: int, fill: int) -> tether.Buffer:
        buf = tether.Buffer(n)
        buf.array()[:] = fill
        return buf

    @reg.handle("fds", roles=roles)
    def _fds(call: Any) -> int:
        drop_kept_mappings(call.peer)
        return open_fds()

    @reg.handle("maps", roles=roles)
    def _maps(call: Any) -> int:
        drop_kept_mappings(call.peer)
        return tether_maps()

    @reg.handle("int_only", roles=roles)
    def _int_only(call: Any, x: int) -> int:
        return x


# -- the spawned child ------------------------------------------------------------------


async def serve(peer: tether.Peer) -> None:
    """The child: answers ``install_handlers`` and pushes arrays and Buffers to main."""
    install_handlers(peer)
    received: list[Any] = []

    @peer.handle("push")
    async def push(call: tether.Call, dtype: str, shape: list[int], seed: int) -> Any:
        return await call.peer.invoke("describe", gen(dtype, shape, seed))

    @peer.handle("push_bytes")
    async def push_bytes(call: tether.Call, n: int) -> Any:
        data = os.urandom(n)
        seen = await call.peer.invoke("describe", data)
        return [digest(data), seen]

    @peer.handle("push_buffer")
    async def push_buffer(call: tether.Call, n: int) -> list[Any]:
        buf = tether.Buffer(n)
        a = buf.array("uint32")
        a[:] = np.arange(a.size, dtype=np.uint32) * 7
        want = digest(buf.view())
        del a
        seen = await call.peer.invoke("describe", buf)
        try:
            buf.view()
        except tether.ConsumedError:
            consumed = True
        else:
            consumed = False
        return [want, seen, consumed]

    @peer.handle("slow")
    async def slow(call: tether.Call, x: Any) -> int:
        await call.peer.send("got", 1)
        await asyncio.sleep(30)
        return 0

    @peer.on("keep")
    def keep(call: tether.Call, x: Any) -> None:
        received.append(x)

    @peer.handle("kept")
    def kept(call: tether.Call) -> list[Any]:
        return [describe(x) for x in received]

    @peer.handle("drop_kept")
    def drop_kept(call: tether.Call) -> int:
        n = len(received)
        received.clear()
        return n

    await peer.wait_closed()


@pytest.fixture
async def family() -> AsyncIterator[tuple[tether.Main, tether.Child]]:
    main = tether.Main(timeout=30.0)
    install_handlers(main)
    async with main:
        child = await main.spawn(serve, start_method="spawn")
        yield main, child


# -- the arrays that cross --------------------------------------------------------------

#: (dtype, shape, how it is sliced): "c" C order, "f" Fortran order, "s" a strided slice
CASES: list[tuple[str, list[int], str]] = [
    ("<f8", [256, 256], "c"),  # 512 KiB
    ("<i4", [100_000], "c"),
    ("|u1", [SHM_THRESHOLD], "c"),  # exactly the threshold: shared memory
    ("|u1", [SHM_THRESHOLD - 1], "c"),  # one byte below: inline
    ("<i2", [3, 4], "c"),
    ("<f4", [400, 1000], "s"),  # [::2, ::3] of it: 200 x 334
    ("<f8", [300, 200], "f"),
    ("<u2", [40, 50, 30], "c"),
    ("|b1", [300_000], "c"),
    ("<c16", [128, 64], "c"),
    (">i4", [50_000], "c"),  # big-endian
    ("<M8[ns]", [20_000], "c"),
    ("<i8", [7], "s"),
    ("<f8", [0, 5], "c"),  # empty
    ("<f8", [], "c"),  # 0-d
]


def build(dtype: str, shape: list[int], layout: str, seed: int) -> np.ndarray:
    a = gen(dtype, shape, seed)
    if layout == "f":
        a = np.asfortranarray(a)
        assert not a.flags.c_contiguous
    elif layout == "s":
        a = a[::2, ::3] if a.ndim == 2 else a[::2]
        assert not a.flags.c_contiguous
    return a


def expect_local(a: np.ndarray) -> dict[str, Any]:
    """What a receiver must report for ``a``, except ``origin``."""
    return {
        "type": "ndarray",
        "dtype": a.dtype.str,
        "shape": list(a.shape),
        "writeable": False,
        "sha": digest(a),
    }


def shared(nbytes: int) -> bool:
    return nbytes >= SHM_THRESHOLD


def check_seen(seen: dict[str, Any], a: np.ndarray, via_fd: bool) -> None:
    origin_seen = seen.pop("origin")
    assert seen == expect_local(a)
    if via_fd and shared(a.nbytes):
        assert origin_seen == "mmap", f"{a.dtype} {a.shape} did not cross via shared memory"
    else:
        assert origin_seen in ("bytes", "bytearray"), f"{a.dtype} {a.shape}: {origin_seen}"


def check_received(got: Any, a: np.ndarray, via_fd: bool) -> None:
    assert isinstance(got, np.ndarray)
    assert got.dtype == a.dtype and got.shape == a.shape, (got.dtype, got.shape, a.dtype, a.shape)
    assert np.array_equal(got, a)
    assert not got.flags.writeable
    with pytest.raises(ValueError):
        got[...] = 0
    if via_fd and shared(a.nbytes):
        assert origin(got) == "mmap"
    else:
        assert origin(got) in ("bytes", "bytearray")


# -- main <-> spawned child -------------------------------------------------------------


async def test_arrays_main_to_child_and_back(family: tuple[tether.Main, tether.Child]) -> None:
    _, child = family
    for seed, (dtype, shape, layout) in enumerate(CASES):
        a = build(dtype, shape, layout, seed)
        before = a.copy()
        check_seen(await child.invoke("describe", a), a, via_fd=True)
        # The result path: the child sends back what it received (a mapped, read-only view).
        check_received(await child.invoke("echo", a), a, via_fd=True)
        assert np.array_equal(a, before) and a.flags.writeable  # the sender's array is untouched


async def test_arrays_made_by_the_child_are_results(
    family: tuple[tether.Main, tether.Child],
) -> None:
    _, child = family
    for seed, (dtype, shape, _) in enumerate(CASES):
        got = await child.invoke("make", dtype, shape, seed)
        check_received(got, gen(dtype, shape, seed), via_fd=True)


async def test_arrays_child_to_main(family: tuple[tether.Main, tether.Child]) -> None:
    _, child = family
    for seed, (dtype, shape, _) in enumerate(CASES):
        seen = await child.invoke("push", dtype, shape, seed)
        check_seen(seen, gen(dtype, shape, seed), via_fd=True)


async def test_many_arrays_in_one_call(family: tuple[tether.Main, tether.Child]) -> None:
    _, child = family
    arrays = [build(d, s, lay, i) for i, (d, s, lay) in enumerate(CASES)]
    seen = await child.invoke("describe_many", *arrays)
    assert len(seen) == len(arrays)
    for s, a in zip(seen, arrays, strict=True):
        check_seen(s, a, via_fd=True)


async def test_nested_arrays_in_dicts_and_lists(family: tuple[tether.Main, tether.Child]) -> None:
    _, child = family
    big = gen("<f8", [100, 100], 1)
    small = gen("<i4", [10], 2)
    deep = gen("|u1", [200_000], 3)
    payload = {"big": big, "meta": {"name": "x", "parts": [small, 5, {"deep": deep}]}, "n": 1}
    seen = await child.invoke("describe_tree", payload)
    assert seen["n"] == 1 and seen["meta"]["name"] == "x" and seen["meta"]["parts"][1] == 5
    check_seen(seen["big"], big, via_fd=True)
    check_seen(seen["meta"]["parts"][0], small, via_fd=True)
    check_seen(seen["meta"]["parts"][2]["deep"], deep, via_fd=True)
    back = await child.invoke("echo", payload)
    check_received(back["big"], big, via_fd=True)
    check_received(back["meta"]["parts"][0], small, via_fd=True)
    check_received(back["meta"]["parts"][2]["deep"], deep, via_fd=True)


async def test_arrays_that_cannot_cross_faithfully_are_refused(
    family: tuple[tether.Main, tether.Child],
) -> None:
    _, child = family
    structured = np.zeros(3, dtype=[("a", "<i4"), ("b", "<f8")])
    with pytest.raises(TypeError):
        await child.invoke("describe", structured)  # its dtype string would lose the fields
    with pytest.raises(TypeError):
        await child.invoke("describe", np.array([object(), 1], dtype=object))
    plain = np.arange(5)
    check_seen(await child.invoke("describe", plain), plain, via_fd=True)


@pytest.mark.parametrize("kind", [bytes, bytearray, memoryview])
async def test_large_bytes_arguments_cross_as_read_only_shared_memory(
    family: tuple[tether.Main, tether.Child], kind: type
) -> None:
    _, child = family
    raw = os.urandom(300 * KIB)
    data = kind(raw) if kind is not memoryview else memoryview(bytearray(raw))
    seen = await child.invoke("describe", data)
    assert seen == {
        "type": "memoryview",
        "nbytes": len(raw),
        "writeable": False,
        "origin": "mmap",
        "sha": digest(raw),
    }
    back = await child.invoke("echo", data)
    assert isinstance(back, memoryview) and back.readonly
    assert bytes(back) == raw
    assert origin(back) == "mmap"
    with pytest.raises(TypeError):
        back[0] = 1


async def test_small_bytes_stay_in_the_body(family: tuple[tether.Main, tether.Child]) -> None:
    _, child = family
    data = b"q" * (SHM_THRESHOLD - 1)
    seen = await child.invoke("describe", data)
    # Below the threshold bytes are an ordinary msgpack bin: the handler gets bytes.
    assert seen == {"type": "bytes"}
    assert await child.invoke("echo", data) == data


async def test_large_bytes_results_and_child_to_main(
    family: tuple[tether.Main, tether.Child],
) -> None:
    _, child = family
    got = await child.invoke("make_bytes", 256 * KIB, 9)
    assert isinstance(got, memoryview) and got.readonly and origin(got) == "mmap"
    assert bytes(got) == bytes((9 + i) % 251 for i in range(256)) * 1024
    want, seen = await child.invoke("push_bytes", 200 * KIB)
    assert seen == {
        "type": "memoryview",
        "nbytes": 200 * KIB,
        "writeable": False,
        "origin": "mmap",
        "sha": want,
    }


async def test_events_carry_attachments(family: tuple[tether.Main, tether.Child]) -> None:
    _, child = family
    big, small = gen("<f4", [500, 100], 4), gen("<i8", [3], 5)
    await child.send("keep", big)
    await child.send("keep", small)
    seen = await child.invoke("kept")
    check_seen(seen[0], big, via_fd=True)
    check_seen(seen[1], small, via_fd=True)
    assert await child.invoke("drop_kept") == 2


# -- tether.Buffer over a child ---------------------------------------------------------


@pytest.mark.timeout(120)
async def test_buffer_of_64_mib_arrives_intact_and_is_consumed(
    family: tuple[tether.Main, tether.Child],
) -> None:
    _, child = family
    buf = tether.Buffer(64 * MIB)
    a = buf.array("uint32")
    a[:] = np.arange(a.size, dtype=np.uint32) * 2654435761  # wraps: every word distinct-ish
    want = hashlib.sha256(buf.view()).hexdigest()
    del a
    seen = await child.invoke("describe", buf, timeout=60.0)
    assert seen == {
        "type": "memoryview",
        "nbytes": 64 * MIB,
        "writeable": False,
        "origin": "mmap",
        "sha": want,
    }
    assert buf.consumed
    for access in (buf.view, buf.array, lambda: buf[0], buf.take):
        with pytest.raises(tether.ConsumedError):
            access()


async def test_buffer_as_array_nested_event_and_result(
    family: tuple[tether.Main, tether.Child],
) -> None:
    _, child = family
    # Nested inside a payload.
    buf = tether.Buffer(1 * MIB)
    buf.array()[:] = 0x5A
    seen = await child.invoke("describe_tree", {"frame": buf, "i": 3})
    assert seen["i"] == 3
    assert seen["frame"]["origin"] == "mmap"
    assert seen["frame"]["sha"] == digest(b"\x5a" * MIB)
    assert buf.consumed
    # Small buffers go through shared memory too: the pages are already there.
    small = tether.Buffer(100)
    small[0:3] = b"abc"
    seen = await child.invoke("describe", small)
    assert seen["origin"] == "mmap" and seen["nbytes"] == 100
    assert seen["sha"] == digest(b"abc" + bytes(97))
    assert small.consumed
    # An empty one.
    empty = tether.Buffer(0)
    seen = await child.invoke("describe", empty)
    assert seen["nbytes"] == 0 and seen["sha"] == digest(b"")
    assert empty.consumed
    # As an event.
    ev = tether.Buffer(200 * KIB)
    ev.array()[:] = 1
    await child.send("keep", ev)
    assert ev.consumed
    kept = await child.invoke("kept")
    assert kept[-1]["nbytes"] == 200 * KIB and kept[-1]["sha"] == digest(b"\x01" * 200 * KIB)
    await child.invoke("drop_kept")
    # As a result the child hands back.
    got = await child.invoke("make_buffer", 3 * MIB, 7)
    assert isinstance(got, memoryview) and got.readonly and origin(got) == "mmap"
    assert got.nbytes == 3 * MIB and bytes(got) == b"\x07" * 3 * MIB


async def test_buffer_child_to_main(family: tuple[tether.Main, tether.Child]) -> None:
    _, child = family
    want, seen, consumed = await child.invoke("push_buffer", 8 * MIB)
    assert consumed is True
    assert seen == {
        "type": "memoryview",
        "nbytes": 8 * MIB,
        "writeable": False,
        "origin": "mmap",
        "sha": want,
    }


async def test_buffer_sent_with_a_live_view(family: tuple[tether.Main, tether.Child]) -> None:
    _, child = family
    buf = tether.Buffer(256 * KIB)
    arr = buf.array("uint16")
    arr[:] = np.arange(arr.size, dtype=np.uint16)
    with pytest.raises(tether.BufferInUse):
        await child.invoke("describe", buf)
    assert buf.consumed
    with pytest.raises(tether.ConsumedError):
        buf.array()
    # Nothing was sent, the connection is fine, and the producer's view still
    # reads the producer's own data, even after other segments came and went.
    for i in range(5):
        other = gen("<u2", [128 * KIB], 100 + i)
        check_received(await child.invoke("echo", other), other, via_fd=True)
    assert np.array_equal(arr, np.arange(arr.size, dtype=np.uint16))
    arr[0] = 1234
    assert arr[0] == 1234
    del arr
    # A fresh buffer sent properly afterwards still works.
    ok = tether.Buffer(128 * KIB)
    ok.array()[:] = 3
    assert (await child.invoke("describe", ok))["sha"] == digest(b"\x03" * 128 * KIB)


async def test_buffer_is_consumed_when_the_send_fails_to_encode(
    family: tuple[tether.Main, tether.Child],
) -> None:
    _, child = family
    # The unsendable argument comes first, the Buffer after it.
    buf = tether.Buffer(128 * KIB)
    with pytest.raises(TypeError):
        await child.invoke("describe_many", object(), buf)
    assert buf.consumed
    with pytest.raises(tether.ConsumedError):
        buf.view()
    buf2 = tether.Buffer(128 * KIB)
    with pytest.raises(TypeError):
        await child.send("keep", [buf2, object()])
    assert buf2.consumed
    # The connection is unaffected.
    assert (await child.invoke("describe", b"x"))["type"] == "bytes"


async def test_buffer_is_consumed_when_the_peer_is_closed(
    family: tuple[tether.Main, tether.Child],
) -> None:
    _, child = family
    await child.close()
    buf = tether.Buffer(1 * MIB)
    with pytest.raises(tether.TetherError):
        await child.invoke("describe", buf)
    assert buf.consumed
    with pytest.raises(tether.ConsumedError):
        buf.view()
    nested = tether.Buffer(1 * MIB)
    with pytest.raises(tether.TetherError):
        await child.send("keep", {"b": [nested]})
    assert nested.consumed


async def test_buffer_is_consumed_when_the_peer_died() -> None:
    async with tether.Main(timeout=10.0) as main:
        child = await main.spawn(serve, start_method="fork")
        child.kill()
        await child.wait(10.0)
        await wait_for(lambda: child.closed)
        buf = tether.Buffer(1 * MIB)
        with pytest.raises(tether.PeerGone):
            await child.invoke("describe", buf)
        assert buf.consumed


# -- a unix-socket client, TCP, and the blocking client ---------------------------------


@pytest.fixture
async def hub(sock_path: str) -> AsyncIterator[tuple[tether.Main, str, str]]:
    """A listening Main; yields ``(main, unix address, tcp address)``."""
    main = tether.Main(timeout=30.0)
    install_handlers(main, roles="client")  # TCP peers reach only what names their role
    async with main:
        unix = await main.listen(f"unix://{sock_path}")
        tcp = await main.listen("tcp://127.0.0.1:0")
        yield main, str(unix.address), str(tcp.address)


@pytest.mark.parametrize("transport", ["unix", "tcp"])
async def test_arrays_over_an_async_client(
    hub: tuple[tether.Main, str, str], transport: str
) -> None:
    _, unix, tcp = hub
    via_fd = transport == "unix"
    async with tether.connect(unix if via_fd else tcp, timeout=30.0) as peer:
        for seed, (dtype, shape, layout) in enumerate(CASES):
            a = build(dtype, shape, layout, seed)
            check_seen(await peer.invoke("describe", a), a, via_fd=via_fd)  # client -> main
            check_received(await peer.invoke("echo", a), a, via_fd=via_fd)  # main -> client
            check_received(
                await peer.invoke("make", dtype, shape, seed), gen(dtype, shape, seed), via_fd
            )
        data = os.urandom(100 * KIB)
        seen = await peer.invoke("describe", data)
        assert seen["type"] == "memoryview" and seen["sha"] == digest(data)
        assert seen["origin"] in (("mmap",) if via_fd else ("bytes", "bytearray"))
        assert not seen["writeable"]
        nested = {"a": [gen("<f8", [64, 64], 1)], "b": gen("<i2", [5], 2)}
        tree = await peer.invoke("describe_tree", nested)
        check_seen(tree["a"][0], nested["a"][0], via_fd=via_fd)  # type: ignore[index]
        check_seen(tree["b"], nested["b"], via_fd=via_fd)  # type: ignore[arg-type]
        buf = tether.Buffer(5 * MIB)
        buf.array()[:] = 0xC3
        seen = await peer.invoke("describe", buf)
        assert buf.consumed
        assert seen["nbytes"] == 5 * MIB and seen["sha"] == digest(b"\xc3" * 5 * MIB)
        assert seen["origin"] in (("mmap",) if via_fd else ("bytes", "bytearray"))


async def test_buffer_too_large_for_a_frame_is_consumed(hub: tuple[tether.Main, str, str]) -> None:
    _, _, tcp = hub
    async with tether.connect(tcp, timeout=10.0, max_frame_size=1 * MIB) as peer:
        buf = tether.Buffer(2 * MIB)
        buf.array()[:] = 1
        with pytest.raises(tether.PayloadTooLarge):
            await peer.invoke("describe", buf)
        assert buf.consumed
        with pytest.raises(tether.ConsumedError):
            buf.view()
        with pytest.raises(tether.PayloadTooLarge):
            await peer.invoke("describe", np.zeros(2 * MIB, np.uint8))
        small = tether.Buffer(100 * KIB)
        assert (await peer.invoke("describe", small))["nbytes"] == 100 * KIB


def _sync_client_session(address: str, via_fd: bool) -> list[str]:
    """Runs in a thread: the blocking client sends and receives arrays (fds on unix)."""
    problems: list[str] = []
    with tether.sync.connect(address, timeout=30.0) as peer:
        for seed, (dtype, shape, layout) in enumerate(CASES):
            a = build(dtype, shape, layout, seed)
            seen = peer.invoke("describe", a)
            try:
                check_seen(seen, a, via_fd=via_fd)
                check_received(peer.invoke("echo", a), a, via_fd=via_fd)
            except AssertionError as exc:
                problems.append(f"{dtype} {shape} {layout}: {exc}")
        buf = tether.Buffer(3 * MIB)
        buf.array()[:] = 9
        seen = peer.invoke("describe", buf)
        if not buf.consumed:
            problems.append("a Buffer sent by the blocking client was not consumed")
        expected = ("mmap",) if via_fd else ("bytes", "bytearray")
        if seen["sha"] != digest(b"\x09" * 3 * MIB) or seen["origin"] not in expected:
            problems.append(f"Buffer arrived wrong: {seen}")
        got = peer.invoke("make_bytes", 128 * KIB, 1)
        if bytes(got) != bytes((1 + i) % 251 for i in range(256)) * 512:
            problems.append("large bytes result differs")
    return problems


@pytest.mark.parametrize("transport", ["unix", "tcp"])
async def test_arrays_over_the_blocking_client(
    hub: tuple[tether.Main, str, str], transport: str
) -> None:
    _, unix, tcp = hub
    problems = await asyncio.wait_for(
        asyncio.to_thread(
            _sync_client_session, unix if transport == "unix" else tcp, transport == "unix"
        ),
        60.0,
    )
    assert problems == []


# -- the use-after-free lesson, in a process of its own ---------------------------------

USE_AFTER_FREE = textwrap.dedent(
    """
    import asyncio, hashlib, sys
    import numpy as np
    import tether

    async def child(peer):
        @peer.handle("digest")
        def digest(call, data):
            return hashlib.sha256(data).hexdigest()
        await peer.wait_closed()

    def reads(buf):
        def setitem():
            buf[0] = 1
        return {
            "view": buf.view, "array": buf.array,
            "array2d": lambda: buf.array("float64", (16, -1)),
            "getitem": lambda: buf[0], "last": lambda: buf[len(buf) - 1],
            "slice": lambda: buf[0:64], "setitem": setitem, "take": buf.take,
            "bytes": lambda: bytes(buf), "list": lambda: list(buf),
            "asarray": lambda: np.asarray(buf), "memoryview": lambda: memoryview(buf),
            "frombuffer": lambda: np.frombuffer(buf, np.uint8),
        }

    def probe(buf, tag):
        n = 0
        for name, read in reads(buf).items():
            try:
                got = read()
            except tether.ConsumedError:
                n += 1
                continue
            except TypeError:
                # no buffer protocol at all: nothing to read, nothing returned
                if name in ("memoryview", "frombuffer"):
                    continue
                raise
            print(f"FAIL {tag}: {name} returned {got!r:.60}", flush=True)
            sys.exit(3)
        return n

    async def main():
        consumed = 0
        async with tether.Main(timeout=30) as main:
            c = await main.spawn(child, start_method="fork")
            for i in range(60):
                buf = tether.Buffer(1 << 20)
                a = buf.array()
                a[:] = i
                del a
                want = hashlib.sha256(bytes([i]) * (1 << 20)).hexdigest()
                assert await c.invoke("digest", buf) == want
                # A fresh buffer now likely reuses the sent one's descriptor and address.
                fresh = tether.Buffer(1 << 20)
                fresh.array()[:] = 255 - i
                consumed += probe(buf, f"sent {i}")
                fresh.close()
                consumed += probe(fresh, f"closed {i}")
            # A send that failed: a live view.
            buf = tether.Buffer(1 << 20)
            v = buf.array()
            v[:] = 77
            try:
                await c.invoke("digest", buf)
            except tether.BufferInUse:
                pass
            consumed += probe(buf, "in use")
            assert int(v.min()) == 77 == int(v.max())  # the producer's own pages
            del v
            # A send that failed: the peer is gone.
            await c.close()
            buf = tether.Buffer(1 << 20)
            try:
                await c.invoke("digest", buf)
            except tether.TetherError:
                pass
            consumed += probe(buf, "closed peer")
        print("OK", consumed, flush=True)

    asyncio.run(main())
    """
)


@pytest.mark.timeout(120)
def test_reading_a_sent_buffer_never_returns_data_nor_crashes(child_env: dict[str, str]) -> None:
    proc = subprocess.run(
        [sys.executable, "-c", USE_AFTER_FREE],
        env=child_env,
        capture_output=True,
        text=True,
        timeout=100,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    # 11 reads that raise ConsumedError per probe; 60 x 2 + 2 probes.
    assert proc.stdout.strip().splitlines()[-1] == f"OK {11 * (60 * 2 + 2)}"


# -- no leaks -------------------------------------------------------------------------


@pytest.mark.timeout(180)
async def test_ten_thousand_transfers_leak_nothing() -> None:
    multiprocessing.resource_tracker.ensure_running()  # its descriptor is not ours to count
    fds0, maps0, shm0 = open_fds(), tether_maps(), dev_shm()
    arrays = [np.full(16 * KIB, i, dtype=np.float64) for i in range(200)]  # 128 KiB each
    assert all(a.nbytes == 128 * KIB for a in arrays)
    async with tether.Main(timeout=60.0) as main:
        child = await main.spawn(serve, start_method="spawn")
        assert (await child.invoke("describe", arrays[1]))["origin"] == "mmap"
        child_fds0 = await child.invoke("fds")
        child_maps0 = await child.invoke("maps")
        store = child._conn.store
        assert isinstance(store, MemfdStore)
        await settle(child)
        fds_running = open_fds()
        t0 = time.monotonic()
        for _ in range(50):
            firsts = await asyncio.gather(*(child.invoke("echo", a) for a in arrays))
            assert [int(r[0]) for r in firsts] == list(range(200))
            assert all(origin(r) == "mmap" for r in firsts)
            del firsts
        elapsed = time.monotonic() - t0
        assert elapsed < 90, f"10,000 transfers took {elapsed:.1f} s"
        # The loop's handle that resumed this task still holds the last results
        # until the loop turns once.
        await asyncio.sleep(0)
        gc.collect()
        # main -> child arrays went through lent segments: this connection's
        # pool keeps a bounded number of them mapped for reuse (two descriptors each).
        for _ in range(500):  # RELEASEs travel back as the child drops its views
            if not store.leases_out:
                break
            await asyncio.sleep(0.01)
        assert not store.leases_out
        idle = store.idle_segments
        assert 0 < idle <= store._pool.max_segments
        # child -> main arrays came in the child's lent segments, copied out at once:
        # main keeps a bounded number of mappings of them (one descriptor each).
        copied = store.copied.mapped
        assert 0 < copied <= store.copied.max_maps
        assert open_fds() == fds_running + 2 * idle + copied, sorted(
            os.readlink(f"/proc/self/fd/{x}")
            for x in os.listdir("/proc/self/fd")
            if os.path.exists(f"/proc/self/fd/{x}")
        )
        store._pool.clear()
        store.copied.clear()
        assert open_fds() == fds_running
        assert tether_maps() == maps0
        assert await child.invoke("fds") == child_fds0
        assert await child.invoke("maps") == child_maps0
    gc.collect()
    # Closing the connection closed its store: segments lent, idle or in flight.
    assert store.closed and store.idle_segments == 0 and not store.leases_out
    assert open_fds() == fds0, "; ".join(
        [
            os.readlink(f"/proc/self/fd/{x}")
            for x in os.listdir("/proc/self/fd")
            if os.path.exists(f"/proc/self/fd/{x}")
        ]
    )
    assert tether_maps() == maps0
    assert dev_shm() == shm0


@pytest.mark.timeout(120)
async def test_sigkill_mid_transfer_leaks_nothing() -> None:
    multiprocessing.resource_tracker.ensure_running()  # its descriptor is not ours to count
    fds0, maps0, shm0 = open_fds(), tether_maps(), dev_shm()
    async with tether.Main(timeout=30.0) as main:
        got = asyncio.Event()
        main.on("got", lambda call, n: got.set())
        child = await main.spawn(serve, start_method="fork")
        big = np.ones(1 * MIB, np.uint8)
        calls = [asyncio.ensure_future(child.invoke("slow", big)) for _ in range(300)]
        calls += [asyncio.ensure_future(child.invoke("echo", big)) for _ in range(100)]
        await asyncio.wait_for(got.wait(), 20.0)
        child.kill()
        results = await asyncio.wait_for(asyncio.gather(*calls, return_exceptions=True), 20.0)
        errors = [r for r in results if isinstance(r, BaseException)]
        assert len(errors) >= 300  # every slow call at least
        assert all(isinstance(e, tether.PeerGone) for e in errors), {type(e) for e in errors}
        del results, calls
        await child.wait(10.0)
    gc.collect()
    assert open_fds() == fds0
    assert tether_maps() == maps0
    assert dev_shm() == shm0


async def test_unhandled_frames_with_descriptors_leak_nothing(
    family: tuple[tether.Main, tether.Child],
) -> None:
    _, child = family
    big = np.arange(128 * KIB // 8, dtype=np.int64)
    await child.invoke("describe", big)  # warm up
    child_fds0, child_maps0 = await child.invoke("fds"), await child.invoke("maps")
    await settle(child)
    fds0 = open_fds()
    for _ in range(5):
        errs = await asyncio.gather(
            *(child.invoke("no-such-channel", big, big) for _ in range(100)),
            return_exceptions=True,
        )
        assert all(isinstance(e, tether.NoHandler) for e in errs)
        errs = await asyncio.gather(
            *(child.invoke("int_only", big) for _ in range(100)), return_exceptions=True
        )
        assert all(isinstance(e, tether.BadRequest) for e in errs)
        for _ in range(100):
            await child.send("no-listener", big)
        b = tether.Buffer(256 * KIB)
        with pytest.raises(tether.NoHandler):
            await child.invoke("no-such-channel", b)
        assert b.consumed
    assert await child.invoke("fds") == child_fds0
    assert await child.invoke("maps") == child_maps0
    await settle(child)
    assert open_fds() == fds0


async def settle(child: tether.Child) -> None:
    """Wait for every lease main lent the child to come back, then empty the pool.

    The pool keeps released segments mapped for reuse (bounded): a cache, not a
    leak, so descriptor counts are compared without it.
    """
    store = child._conn.store
    assert isinstance(store, MemfdStore)
    for _ in range(500):
        gc.collect()
        if not store.leases_out:
            break
        await asyncio.sleep(0.01)
    assert not store.leases_out
    store._pool.clear()
    gc.collect()


async def test_descriptors_no_frame_claims_are_closed_at_teardown(sock_path: str) -> None:
    """A raw client passes descriptors that no frame refers to, then hangs up."""
    async with tether.Main(timeout=10.0) as main:
        server = await main.listen(f"unix://{sock_path}")
        fds0 = open_fds()
        raw = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        raw.settimeout(5.0)
        raw.connect(str(server.address.path))
        hello = bytes(Connection("client", store=MemfdStore()).data_to_send()[0])
        passed = [os.memfd_create(f"stray{i}") for i in range(6)]
        raw.sendmsg([hello], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", passed))])
        for fd in passed:
            os.close(fd)
        # Main holds them (and the accepted socket) while the connection is open...
        await wait_for(lambda: open_fds() >= fds0 + 7, 5.0)
        assert len(main.peers) == 1
        raw.close()
        # ...and closes every one when it ends.
        await wait_for(lambda: not main.peers, 5.0)
        await wait_for(lambda: open_fds() <= fds0, 5.0)
        assert open_fds() == fds0


# -- issue 6: descriptors bounded (D6, D7), leases per connection (D3), fork (D11) -------

from tether import codec as _codec  # noqa: E402
from tether.wire import ATT, HEADER, WHERE_FD, Kind  # noqa: E402


def _stored_pair(
    lend: bool = False, borrow: bool = False, **kw: Any
) -> tuple[Connection, Connection]:
    """A sender and a receiver, both with descriptor support, handshake done."""
    a = Connection("main", store=MemfdStore(lend=lend), **kw)
    b = Connection("child", store=MemfdStore(borrow=borrow), **kw)
    b.receive_data(a.data_to_send()[0])
    a.receive_data(b.data_to_send()[0])
    return a, b


def _is_closed(fd: int) -> bool:
    try:
        os.fstat(fd)
    except OSError:
        return True
    return False


def _memfds(n: int, size: int = 4096) -> list[int]:
    fds = []
    for _ in range(n):
        fd = os.memfd_create("tether-test", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
        os.ftruncate(fd, size)
        fds.append(fd)
    return fds


def test_unclaimed_descriptors_past_the_cap_are_a_protocol_error_and_closed() -> None:
    from tether.protocol import MAX_UNCLAIMED_FDS

    a, b = _stored_pair()
    fds0 = open_fds()
    ok = _memfds(MAX_UNCLAIMED_FDS)
    b.receive_fds(ok)
    a.send_event(b"e", (1,))
    assert len(b.receive_data(a.data_to_send()[0])) == 1  # up to the cap: held
    more = _memfds(1)
    b.receive_fds(more)
    a.send_event(b"e", (2,))
    with pytest.raises(tether.ProtocolError, match="no frame claims"):
        b.receive_data(a.data_to_send()[0])
    assert all(_is_closed(fd) for fd in ok + more)
    assert open_fds() == fds0
    a.abort()


def test_descriptors_from_a_peer_that_did_not_announce_fd_are_refused() -> None:
    a = Connection("main")  # no store: announces no "fd"
    b = Connection("child", store=MemfdStore())
    b.receive_data(a.data_to_send()[0])
    fds = _memfds(1)
    with pytest.raises(tether.ProtocolError, match="did not announce fd"):
        b.receive_fds(fds)
    assert _is_closed(fds[0])


def _fd_event(length: int) -> bytes:
    """An EVENT whose one argument is a descriptor attachment of ``length`` bytes."""
    body = _codec.encoder.encode([msgspec.msgpack.Ext(_codec.EXT_BYTES, bytes(4))])
    table = ATT.pack(WHERE_FD, 0, 0, 0, length)
    size = HEADER.size - 4 + 1 + len(table) + len(body)
    return HEADER.pack(size, Kind.EVENT, 0, 1, 0, 0, 1, 0) + b"e" + table + body


def test_a_hello_before_an_fd_frame_without_fd_is_refused_in_one_read() -> None:
    import fcntl

    a = Connection("main")  # announces no "fd", yet passes a descriptor
    b = Connection("child", store=MemfdStore())
    fds = _memfds(1)
    fcntl.fcntl(
        fds[0], fcntl.F_ADD_SEALS, fcntl.F_SEAL_WRITE | fcntl.F_SEAL_GROW | fcntl.F_SEAL_SHRINK
    )
    b.receive_fds(fds)  # arrives before its HELLO is read: held
    with pytest.raises(tether.ProtocolError, match="did not announce fd"):
        b.receive_data(bytes(a.data_to_send()[0]) + _fd_event(4096))
    assert _is_closed(fds[0])


def test_a_sparse_gigabyte_memfd_never_reaches_a_peer_limited_to_one_mib() -> None:
    import fcntl

    a, b = _stored_pair(max_frame_size=1 * MIB)
    maps0 = tether_maps()
    fd = os.memfd_create("tether-evil", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
    os.ftruncate(fd, 1 << 30)  # sparse: costs nothing until read
    fcntl.fcntl(fd, fcntl.F_ADD_SEALS, fcntl.F_SEAL_WRITE | fcntl.F_SEAL_GROW | fcntl.F_SEAL_SHRINK)
    b.receive_fds([fd])
    with pytest.raises(tether.ProtocolError, match="exceeds"):
        b.receive_data(_fd_event(1 << 30))
    assert _is_closed(fd)
    assert tether_maps() == maps0
    a.abort()


def test_a_lent_segment_larger_than_announced_is_refused() -> None:
    a, b = _stored_pair(borrow=True)
    fd = os.memfd_create("tether-lease", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
    os.ftruncate(fd, 1 << 30)
    b.receive_fds([fd])
    msg = bytearray(_fd_event(64 * KIB))
    ATT.pack_into(msg, HEADER.size + 1, WHERE_FD, 1, 0, 1, 64 * KIB)  # FLAG_LEASE, lease 1
    with pytest.raises(tether.ProtocolError, match="lent segment"):
        b.receive_data(bytes(msg))
    assert _is_closed(fd)
    a.abort()


def test_more_descriptors_than_one_chunk_carries_are_split_into_chunks() -> None:
    from tether.protocol import MAX_UNCLAIMED_FDS

    a, b = _stored_pair()
    n = 2 * MAX_UNCLAIMED_FDS + 3
    for i in range(n):
        a.send_event(b"take", (np.full(SHM_THRESHOLD, i % 256, np.uint8),))
    got = []
    while True:
        data, fds = a.data_to_send()
        if not data:
            break
        assert 0 < len(fds) <= MAX_UNCLAIMED_FDS
        b.receive_fds(fds)  # (the I/O layer passes them; here they are simply moved)
        got += b.receive_data(data)
    assert len(got) == n
    values = [int(_codec.decode_with(_codec.any_decoder, f.body, f.attachments)[0][0]) for f in got]
    assert values == [i % 256 for i in range(n)]
    a.abort()
    b.abort()


def test_one_frame_never_carries_more_descriptors_than_the_cap() -> None:
    from tether.protocol import MAX_UNCLAIMED_FDS

    a, b = _stored_pair()
    arrays = [np.full(SHM_THRESHOLD, i, np.uint8) for i in range(MAX_UNCLAIMED_FDS + 4)]
    a.send_event(b"many", tuple(arrays))
    data, fds = a.data_to_send()
    assert len(fds) == MAX_UNCLAIMED_FDS  # the rest went inline
    b.receive_fds(fds)
    (f,) = b.receive_data(data)
    got = _codec.decode_with(_codec.any_decoder, f.body, f.attachments)
    assert [int(x[0]) for x in got] == list(range(MAX_UNCLAIMED_FDS + 4))
    a.abort()
    b.abort()


def _lend_and_release(main: Connection, child: Connection, value: int) -> int:
    """Lend one array from main to child, release it; return the segment's inode."""
    main.send_event(b"take", (np.full(SHM_THRESHOLD, value, np.uint8),))
    data, fds = main.data_to_send()
    (fd,) = fds
    ino = os.fstat(fd).st_ino
    child.receive_fds([os.dup(fd)])
    os.close(fd)
    (f,) = child.receive_data(data)
    (arr,) = _codec.decode_with(_codec.any_decoder, f.body, f.attachments)
    assert int(arr[0]) == value
    del arr, f
    gc.collect()
    assert child.poll_releases()
    main.receive_data(child.data_to_send()[0])
    return ino


def test_a_segment_lent_to_one_peer_is_never_refilled_for_another() -> None:
    """D3: the pool is per connection, so child 2 never maps what child 1 was lent."""
    main1, child1 = _stored_pair(lend=True, borrow=True)
    main2, child2 = _stored_pair(lend=True, borrow=True)
    first = _lend_and_release(main1, child1, 1)
    assert _lend_and_release(main1, child1, 2) == first  # reused, for the same peer
    assert _lend_and_release(main2, child2, 3) != first  # never handed to another peer
    for c in (main1, child1, main2, child2):
        c.abort()


def test_closing_a_store_releases_every_descriptor_and_mapping() -> None:
    fds0, maps0 = open_fds(), tether_maps()
    main, child = _stored_pair(lend=True, borrow=True)
    _lend_and_release(main, child, 1)  # one idle segment in main's pool
    main.send_event(b"take", (np.full(SHM_THRESHOLD, 2, np.uint8),))  # one lease out...
    data, fds = main.data_to_send()
    child.receive_fds(fds)
    (f,) = child.receive_data(data)  # ...mapped by the child
    del f
    assert open_fds() > fds0 and tether_maps() > maps0
    main.abort()
    child.abort()
    assert open_fds() == fds0
    assert tether_maps() == maps0


def test_a_forked_child_closes_inherited_segments() -> None:
    """D11: segments of the parent's connections are closed in a forked child, never written."""
    main, child = _stored_pair(lend=True, borrow=True)
    _lend_and_release(main, child, 1)  # main's store keeps an idle segment mapped
    store = main.store
    assert isinstance(store, MemfdStore) and store.idle_segments == 1
    gc.collect()  # views earlier tests dropped keep no lent mapping alive
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child reports through the pipe
        try:
            with open("/proc/self/maps") as f:
                maps = sum("memfd:tether-lease" in line for line in f)
            memfds = 0  # pool segments (a live tether.Buffer is the application's)
            for x in os.listdir("/proc/self/fd"):
                with contextlib.suppress(OSError):
                    memfds += "memfd:tether-lease" in os.readlink(f"/proc/self/fd/{x}")
            os.write(w, f"{maps} {memfds} {store.idle_segments}".encode())
        finally:
            os._exit(0)
    os.close(w)
    with os.fdopen(r) as f:
        report = f.read()
    os.waitpid(pid, 0)
    assert report == "0 0 0"
    assert store.idle_segments == 1  # the parent's are untouched
    main.abort()
    child.abort()


async def test_a_main_lends_to_its_children_only(sock_path: str) -> None:
    """A client from ``listen()`` gets sealed segments; a spawned child gets leases."""
    async with tether.Main(timeout=10.0) as main:

        @main.handle("big")
        def big(call: tether.Call) -> Any:
            return np.full(SHM_THRESHOLD, 5, np.uint8)

        server = await main.listen(f"unix://{sock_path}")
        async with tether.connect(f"unix://{server.address.path}", timeout=10.0) as client:
            arr = await client.invoke("big")
            assert origin(arr) == "mmap" and int(arr[0]) == 5
            assert client._conn.leases_held == 0  # sealed: nothing lent to a stranger
            (peer,) = main.peers
            assert peer._conn.store.leases_out == 0


async def test_a_listening_main_limited_to_1_mib_drops_a_sparse_gigabyte_memfd(
    sock_path: str,
) -> None:
    """D7 end to end: the descriptor is closed unmapped and the client dropped."""
    import fcntl

    async with tether.Main(timeout=10.0, max_frame_size=1 * MIB) as main:
        server = await main.listen(f"unix://{sock_path}")
        maps0 = tether_maps()
        raw = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        raw.settimeout(5.0)
        raw.connect(str(server.address.path))
        fd = os.memfd_create("tether-evil", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
        os.ftruncate(fd, 1 << 30)
        seals = fcntl.F_SEAL_WRITE | fcntl.F_SEAL_GROW | fcntl.F_SEAL_SHRINK
        fcntl.fcntl(fd, fcntl.F_ADD_SEALS, seals)
        hello_conn = Connection("client", store=MemfdStore())
        msg = bytes(hello_conn.data_to_send()[0]) + _fd_event(1 << 30)
        fds0 = open_fds()
        raw.sendmsg([msg], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", [fd]))])
        os.close(fd)
        # main may have written its own HELLO before it read ours: read to EOF
        while await asyncio.to_thread(raw.recv, 65536):
            pass
        await wait_for(lambda: not main.peers, 5.0)
        assert tether_maps() == maps0
        assert open_fds() == fds0 - 1  # our own copy closed; main kept nothing
        raw.close()
        hello_conn.abort()


def test_a_sender_refuses_descriptor_attachments_past_the_peers_limit() -> None:
    a, b = _stored_pair(max_frame_size=1 * MIB)
    fds0 = open_fds()
    with pytest.raises(tether.PayloadTooLarge, match="in descriptors"):
        a.send_event(b"e", (np.zeros(2 * MIB, np.uint8),))
    assert a.data_to_send() == (b"", [])
    assert open_fds() == fds0  # the sealed segment made for it was closed
    a.send_event(b"e", (np.zeros(1 * MIB, np.uint8),))  # exactly the limit: fine
    data, fds = a.data_to_send()
    assert len(fds) == 1
    b.receive_fds(fds)
    assert len(b.receive_data(data)) == 1
    a.abort()
    b.abort()


@pytest.mark.parametrize("layer", ["aio", "sync"])
async def test_a_closed_client_gives_back_every_descriptor_and_mapping(
    sock_path: str, layer: str
) -> None:
    # Main and client share this process: after the client closes and main drops
    # its side, both sides' descriptors and memfd mappings are back at the start.
    async with tether.Main(timeout=30.0) as main:

        @main.handle("echo")
        def echo(call: tether.Call, a: Any) -> Any:
            return np.array(a)  # a fresh array, sent back as a sealed segment

        await main.listen(f"unix://{sock_path}")
        gc.collect()
        fds0, maps0 = open_fds(), tether_maps()
        arrays = [np.full(64 * KIB, i, dtype=np.uint8) for i in range(4)]
        if layer == "aio":
            async with tether.connect(f"unix://{sock_path}") as peer:
                got = [await peer.invoke("echo", a) for a in arrays]
                assert [origin(g) for g in got] == ["mmap"] * 4
                del got
        else:

            def run() -> None:
                with tether.sync.connect(f"unix://{sock_path}") as peer:
                    got = [peer.invoke("echo", a) for a in arrays]
                    assert [origin(g) for g in got] == ["mmap"] * 4

            await asyncio.to_thread(run)
        for _ in range(200):
            if not main.peers:
                break
            await asyncio.sleep(0.01)
        assert not main.peers
        gc.collect()
        assert (open_fds(), tether_maps()) == (fds0, maps0)
