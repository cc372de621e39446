"""Sealed shared-memory segments and the zero-copy :class:`tether.Buffer`, in one process.

What crosses processes is in ``test_attachments.py``; here: the producer's
side of a Buffer (write, take, seal, consume), the checks a receiver makes
before it maps a segment (``map_sealed``), and that nothing leaks.
"""

from __future__ import annotations

import errno
import fcntl
import gc
import mmap
import os
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest

import tether
from tether import shm

F_SEAL_WRITE: int = fcntl.F_SEAL_WRITE
F_SEAL_GROW: int = fcntl.F_SEAL_GROW
F_SEAL_SHRINK: int = fcntl.F_SEAL_SHRINK
F_SEAL_SEAL: int = fcntl.F_SEAL_SEAL
F_GET_SEALS: int = fcntl.F_GET_SEALS


def open_fds() -> int:
    """Open descriptors, after a collection (leftovers of earlier tests go first)."""
    gc.collect()
    return len(os.listdir("/proc/self/fd"))


def tether_maps() -> int:
    """Mappings of tether memfd segments in this process."""
    gc.collect()
    with open("/proc/self/maps") as f:
        return sum("memfd:tether" in line for line in f)


def fd_is_open(fd: int) -> bool:
    try:
        os.fstat(fd)
    except OSError as exc:
        assert exc.errno == errno.EBADF
        return False
    return True


def read_fd(fd: int, n: int) -> bytes:
    """The first ``n`` bytes of a memfd, read through a fresh read-only mapping."""
    if n == 0:
        return b""
    m = mmap.mmap(fd, n, mmap.MAP_SHARED, mmap.PROT_READ)
    try:
        return bytes(m)
    finally:
        m.close()


def unsealed_memfd(data: bytes) -> int:
    fd = os.memfd_create("test-unsealed", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
    os.write(fd, data)
    return fd


# -- Buffer: the producer's side ----------------------------------------------------


def test_buffer_written_through_array_and_view_is_what_take_hands_over() -> None:
    buf = tether.Buffer(4096)
    assert buf.nbytes == len(buf) == 4096
    assert not buf.consumed
    arr = buf.array("float32", (32, 32))
    assert arr.shape == (32, 32) and arr.dtype == np.float32 and arr.flags.writeable
    arr[:] = np.arange(1024, dtype=np.float32).reshape(32, 32)
    v = buf.view()
    assert not v.readonly and v.nbytes == 4096
    v[0:4] = b"\x01\x02\x03\x04"  # overwrite the first float's bytes
    buf[4] = 0xAB
    assert buf[4] == 0xAB
    assert bytes(buf[0:4]) == b"\x01\x02\x03\x04"
    expected = bytes(v)
    del arr, v
    fd, n = buf.take()
    try:
        assert n == 4096
        assert buf.consumed
        seals = fcntl.fcntl(fd, F_GET_SEALS)
        assert seals & F_SEAL_WRITE
        assert seals & F_SEAL_GROW and seals & F_SEAL_SHRINK and seals & F_SEAL_SEAL
        assert os.fstat(fd).st_size >= n
        assert read_fd(fd, n) == expected
        # Sealed: nobody, the producer included, can change or resize it any more.
        with pytest.raises(PermissionError):
            os.pwrite(fd, b"x", 0)
        with pytest.raises(PermissionError):
            mmap.mmap(fd, n, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        with pytest.raises(PermissionError):
            os.ftruncate(fd, 2 * n)
        with pytest.raises(PermissionError):
            fcntl.fcntl(fd, fcntl.F_ADD_SEALS, 0)
        # And what the receiver maps is the producer's data.
        assert bytes(shm.map_sealed(os.dup(fd), n)) == expected
    finally:
        os.close(fd)


def test_buffer_array_default_is_flat_uint8() -> None:
    buf = tether.Buffer(10)
    a = buf.array()
    assert a.dtype == np.uint8 and a.shape == (10,)
    a[:] = 7
    assert bytes(buf.view()) == b"\x07" * 10
    del a
    buf.close()


def _accessors(buf: tether.Buffer) -> dict[str, Callable[[], Any]]:
    def setitem() -> None:
        buf[0] = 1

    def setslice() -> None:
        buf[0:2] = b"ab"

    return {
        "view": buf.view,
        "array": buf.array,
        "array(float64, shape)": lambda: buf.array("float64", (2, 4)),
        "getitem": lambda: buf[0],
        "getslice": lambda: buf[0:8],
        "setitem": setitem,
        "setslice": setslice,
        "take": buf.take,
        "bytes": lambda: bytes(buf),  # type: ignore[call-overload]
        "list": lambda: list(buf),  # type: ignore[call-overload]
        "np.asarray": lambda: np.asarray(buf),
    }


@pytest.mark.parametrize("how", ["take", "close"])
def test_every_access_after_take_or_close_raises_consumed(how: str) -> None:
    buf = tether.Buffer(64)
    buf.array()[:] = 5
    if how == "take":
        fd, _ = buf.take()
        os.close(fd)
    else:
        buf.close()
    assert buf.consumed
    assert "consumed" in repr(buf)
    for name, access in _accessors(buf).items():
        with pytest.raises(tether.ConsumedError):
            access()
            pytest.fail(f"{name} returned after the buffer was consumed")
    # Not a buffer any more: no path hands out its old pages.
    with pytest.raises(TypeError):
        memoryview(buf)  # type: ignore[arg-type]
    assert issubclass(tether.ConsumedError, tether.TetherError)
    buf.close()  # closing again is harmless


def test_take_with_a_live_view_raises_buffer_in_use_and_consumes() -> None:
    before = open_fds()
    buf = tether.Buffer(1 << 16)
    arr = buf.array("uint32")
    arr[:] = np.arange(arr.size, dtype=np.uint32)
    with pytest.raises(tether.BufferInUse) as ei:
        buf.take()
    assert isinstance(ei.value, tether.TetherError)
    assert isinstance(ei.value, BufferError)
    del ei  # its traceback holds take()'s frame, and with it the mapping
    assert buf.consumed
    with pytest.raises(tether.ConsumedError):
        buf.view()
    with pytest.raises(tether.ConsumedError):
        buf.take()
    # The buffer's own descriptor is gone (the live mapping may pin at most one, as
    # CPython's mmap keeps a dup of the descriptor it maps), and the live view
    # still reads the producer's own data.
    assert open_fds() <= before + 1
    assert np.array_equal(arr, np.arange(arr.size, dtype=np.uint32))
    arr[0] = 99  # still the producer's private mapping: no crash
    assert arr[0] == 99
    # A new buffer that reuses the descriptor number shares nothing with the old view.
    other = tether.Buffer(1 << 16)
    other.array()[:] = 0xEE
    assert np.array_equal(arr[1:], np.arange(1, arr.size, dtype=np.uint32))
    other.close()
    maps_with_view = tether_maps()
    del arr
    assert tether_maps() == maps_with_view - 1  # the mapping went with the last view
    assert open_fds() == before


def test_close_releases_descriptor_and_mapping() -> None:
    fds0, maps0 = open_fds(), tether_maps()
    bufs = [tether.Buffer(1 << 20) for _ in range(8)]
    assert open_fds() >= fds0 + 8
    assert tether_maps() == maps0 + 8
    for b in bufs:
        b.close()
    assert open_fds() == fds0
    assert tether_maps() == maps0
    # Dropping an unsent buffer releases it too.
    b = tether.Buffer(1 << 20)
    assert open_fds() > fds0
    del b
    gc.collect()
    assert open_fds() == fds0
    assert tether_maps() == maps0


def test_close_with_a_live_view_keeps_the_view_valid() -> None:
    fds0 = open_fds()
    buf = tether.Buffer(4096)
    arr = buf.array()
    arr[:] = 42
    buf.close()
    assert buf.consumed
    assert open_fds() <= fds0 + 1  # at most the live mapping's own descriptor
    assert int(arr.sum()) == 42 * 4096
    maps = tether_maps()
    del arr
    assert tether_maps() == maps - 1
    assert open_fds() == fds0


def test_take_does_not_leak_descriptors_or_mappings() -> None:
    fds0, maps0 = open_fds(), tether_maps()
    for i in range(200):
        buf = tether.Buffer(1 << 16)
        buf.array()[:] = i % 256
        fd, _n = buf.take()
        assert read_fd(fd, 1) == bytes([i % 256])
        os.close(fd)
    assert open_fds() == fds0
    assert tether_maps() == maps0


def test_zero_length_buffer() -> None:
    buf = tether.Buffer(0)
    assert buf.nbytes == len(buf) == 0
    assert buf.view().nbytes == 0
    assert buf.array().size == 0
    assert buf.array("float64", (0, 3)).shape == (0, 3)
    fd, n = buf.take()
    try:
        assert n == 0
        assert fcntl.fcntl(fd, F_GET_SEALS) & F_SEAL_WRITE
        mv = shm.map_sealed(os.dup(fd), 0)
        assert mv.nbytes == 0
    finally:
        os.close(fd)
    with pytest.raises(tether.ConsumedError):
        buf.view()


def test_negative_size_is_refused() -> None:
    with pytest.raises(ValueError):
        tether.Buffer(-1)


# -- segment_from: a copy into a new sealed segment -----------------------------------


@pytest.mark.parametrize("n", [0, 1, 4095, 4096, shm.SHM_THRESHOLD, 3 * shm.SHM_THRESHOLD + 7])
def test_segment_from_copies_into_a_sealed_segment(n: int) -> None:
    src = bytearray(os.urandom(n))
    expected = bytes(src)
    fd, size = shm.segment_from(src)
    try:
        assert size == n
        assert fcntl.fcntl(fd, F_GET_SEALS) & F_SEAL_WRITE
        if n:
            src[0] ^= 0xFF  # the producer's later writes don't reach the segment
        assert read_fd(fd, n) == expected
    finally:
        os.close(fd)


def test_segment_from_takes_any_buffer_shape() -> None:
    arr = np.arange(30_000, dtype=np.float64).reshape(100, 300)
    fd, n = shm.segment_from(arr)
    try:
        assert n == arr.nbytes
        assert read_fd(fd, n) == arr.tobytes()
    finally:
        os.close(fd)


# -- map_sealed: what a receiver accepts ----------------------------------------------


def test_map_sealed_maps_read_only_and_closes_the_descriptor() -> None:
    data = os.urandom(100_000)
    fd, n = shm.segment_from(data)
    mv = shm.map_sealed(fd, n)
    assert not fd_is_open(fd)  # the view owns the mapping, not the descriptor
    assert mv.readonly
    assert bytes(mv) == data
    with pytest.raises(TypeError):
        mv[0] = 1
    arr = np.frombuffer(mv, np.uint8)
    assert not arr.flags.writeable
    with pytest.raises(ValueError):
        arr[0] = 1


def test_map_sealed_may_map_a_prefix() -> None:
    fd, _n = shm.segment_from(b"abcdefgh")
    assert bytes(shm.map_sealed(fd, 3)) == b"abc"


def test_map_sealed_rejects_an_unsealed_memfd() -> None:
    fd = unsealed_memfd(b"x" * 8192)
    with pytest.raises(tether.ProtocolError, match="not sealed"):
        shm.map_sealed(fd, 8192)
    assert not fd_is_open(fd)


@pytest.mark.parametrize(
    "seals", [F_SEAL_GROW | F_SEAL_SHRINK, F_SEAL_WRITE, F_SEAL_WRITE | F_SEAL_GROW]
)
def test_map_sealed_rejects_a_partially_sealed_memfd(seals: int) -> None:
    fd = unsealed_memfd(b"x" * 8192)
    fcntl.fcntl(fd, fcntl.F_ADD_SEALS, seals)
    with pytest.raises(tether.ProtocolError):
        shm.map_sealed(fd, 8192)
    assert not fd_is_open(fd)


def test_map_sealed_rejects_a_segment_smaller_than_announced() -> None:
    fd, _n = shm.segment_from(b"y" * 1000)
    with pytest.raises(tether.ProtocolError, match="1000 bytes"):
        shm.map_sealed(fd, 1001)
    assert not fd_is_open(fd)


def test_map_sealed_rejects_descriptors_that_are_not_memfds() -> None:
    r, w = os.pipe()
    os.close(w)
    with pytest.raises(tether.ProtocolError):
        shm.map_sealed(r, 10)
    assert not fd_is_open(r)


def test_map_sealed_does_not_leak_on_success_or_failure() -> None:
    fds0, maps0 = open_fds(), tether_maps()
    views = []
    for i in range(100):
        fd, n = shm.segment_from(bytes([i]) * 70_000)
        views.append(shm.map_sealed(fd, n))
        with pytest.raises(tether.ProtocolError):
            shm.map_sealed(unsealed_memfd(b"z" * 10), 10)
    assert tether_maps() == maps0 + 100
    assert all(v[69_999] == i for i, v in enumerate(views))
    del views
    assert tether_maps() == maps0
    assert open_fds() == fds0
