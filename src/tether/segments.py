"""Reusable shared-memory segments, lent to peers that trust this side.

(Not the worker pool: that is :class:`tether.Pool`, in :mod:`tether.executor`.)

A sealed segment can never be written again, so every sealed transfer pays
for fresh pages: on a VM that is about 1 GB/s, far below a memory copy. When
the receiver trusts the sender (a child trusts its main, a client the main it
connected to), the sender may instead *lend* a segment from this pool: it
copies into pages that are already mapped and faulted in, passes the
descriptor with the LEASE flag, and takes the segment back when the receiver
sends RELEASE (its last view of the data was dropped). A main never reads a
lease in place: it copies what a child lends it out at once and releases it
(:mod:`tether.copyout`), or takes sealed segments.

Safety rules: a segment is written only while no lease on it is out; a lease
whose connection ends without a RELEASE is discarded, never reused; and pools
are per connection (:class:`tether.attachments.MemfdStore`), so a segment lent
to one peer is only ever refilled for that same peer.
"""

from __future__ import annotations

import collections
import contextlib
import fcntl
import mmap
import os
import sys
import weakref
from collections.abc import Callable
from typing import Any, Final

from .errors import ProtocolError
from .shm import map_readonly

__all__ = ["Borrowed", "Segment", "SegmentPool"]

_np: Any = False  # numpy, imported at the first lease (None: not installed)


def _numpy() -> Any:
    global _np
    if _np is False:
        try:
            import numpy
        except ImportError:  # pragma: no cover - numpy is optional
            _np = None
        else:
            _np = numpy
    return _np


_MIN_CLASS: Final = 64 * 1024
_MADV_POPULATE_WRITE: Final = getattr(mmap, "MADV_POPULATE_WRITE", 23)  # Linux 5.14
_LENDER_SEALS: Final = (
    getattr(fcntl, "F_SEAL_FUTURE_WRITE", 0x0010)
    | fcntl.F_SEAL_GROW
    | fcntl.F_SEAL_SHRINK
    | fcntl.F_SEAL_SEAL
)


def _size_class(n: int) -> int:
    """Round up to a power of two, so segments fit a range of sizes."""
    return max(_MIN_CLASS, 1 << (n - 1).bit_length())


class Segment:
    """A memfd with a writable mapping kept for reuse."""

    __slots__ = ("fd", "filled", "map", "size")

    def __init__(self, size: int) -> None:
        self.fd = os.memfd_create("tether-lease", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
        try:
            os.ftruncate(self.fd, size)
            self.map = mmap.mmap(self.fd, size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
            # Only this mapping may ever write, and the size is fixed: a borrower
            # can neither tamper with the next borrower's data nor shrink the
            # segment under the lender (which would SIGBUS on its next fill).
            fcntl.fcntl(self.fd, fcntl.F_ADD_SEALS, _LENDER_SEALS)
        except BaseException:
            fd, self.fd = self.fd, -1  # (so __del__ closes nothing twice)
            if hasattr(self, "map"):
                self.map.close()
            os.close(fd)
            raise
        self.size = size
        self.filled = 0  # bytes of it written so far: pages past it are still to be faulted in

    def fill(self, data: memoryview) -> None:
        """Copy ``data`` into the start of the segment."""
        n = data.nbytes
        if n > self.filled:  # fault fresh pages in at once, not one per 4 KiB of the copy
            start = self.filled & -mmap.PAGESIZE
            with contextlib.suppress(OSError, ValueError):
                self.map.madvise(_MADV_POPULATE_WRITE, start, n - start)
            self.filled = n
        self.map[:n] = data

    def close(self) -> None:
        """Unmap and close (once); a receiver's own mapping keeps the pages alive."""
        fd, self.fd = self.fd, -1
        if fd >= 0:
            self.map.close()
            os.close(fd)

    def __del__(self) -> None:
        # A pool dropped without close() (a connection nobody aborted) must not
        # leak the descriptor: the mapping closes itself, the fd does not.
        if getattr(self, "fd", -1) >= 0:
            self.close()


class SegmentPool:
    """Idle segments by size class, up to ``max_idle`` bytes and ``max_segments`` in all.

    Each idle segment holds two descriptors (its memfd and the mapping's), so
    the count is capped as well as the bytes. One pool belongs to one
    connection, used by whoever holds that connection's lock: it has none.
    """

    def __init__(self, max_idle: int = 256 << 20, max_segments: int = 8) -> None:
        self.max_idle = max_idle
        self.max_segments = max_segments
        self._free: dict[int, list[Segment]] = {}
        self._idle = 0
        self._count = 0

    def get(self, nbytes: int) -> Segment:
        """An idle segment of at least ``nbytes``, or a new one."""
        cls = _size_class(nbytes)
        free = self._free.get(cls)
        if free:
            self._idle -= cls
            self._count -= 1
            return free.pop()
        return Segment(cls)

    def put(self, seg: Segment) -> None:
        """Take back a segment whose lease was released."""
        if self._idle + seg.size <= self.max_idle and self._count < self.max_segments:
            self._free.setdefault(seg.size, []).append(seg)
            self._idle += seg.size
            self._count += 1
            return
        seg.close()

    @property
    def idle_bytes(self) -> int:
        """Bytes held by idle segments."""
        return self._idle

    @property
    def idle_segments(self) -> int:
        """Number of idle segments (each holds two descriptors)."""
        return self._count

    def clear(self) -> None:
        """Close every idle segment."""
        free, self._free, self._idle, self._count = self._free, {}, 0, 0
        for segs in free.values():
            for seg in segs:
                seg.close()


class Borrowed:
    """The receiving side of leases: one read-only mapping kept per lent segment.

    Mapping a segment afresh for every lease costs a page fault per 4 KiB on
    first read (tens of ms for 256 MiB). Instead the mapping of each segment
    is kept and reused when the same segment is lent again. A lease is
    released when no view of its mapping is left. With NumPy installed each
    lease is handed out through its own small read-only array over the
    mapping: when the last view is dropped that array is freed and
    :attr:`on_release` is called, from whichever thread dropped it, so nobody
    needs to poll (:attr:`notifies`). Without NumPy, every view holds a
    reference to the mapping, so the mapping's reference count tells, and
    :meth:`released` must be polled.
    """

    #: references to a handed-out mapping with no view alive: the cache, the
    #: table of leases out, and getrefcount's own argument
    _IDLE_REFS: Final = 3

    def __init__(self, max_bytes: int = 512 << 20, max_maps: int = 16) -> None:
        self.max_bytes = max_bytes
        self.max_maps = max_maps
        self._maps: dict[tuple[int, int], mmap.mmap] = {}  # (dev, inode) -> mapping, LRU
        self._bytes = 0
        self._out: dict[int, mmap.mmap] = {}  # lease id -> mapping handed out
        self._dropped: collections.deque[int] = collections.deque()  # leases seen freed
        #: called (from any thread) when a lease's last view was dropped; then
        #: call :meth:`released`. Exceptions it raises are ignored.
        self.on_release: Callable[[], None] | None = None

    def map_lease(self, fd: int, nbytes: int, lease: int) -> memoryview:
        """Map (or reuse the mapping of) a lent segment; closes ``fd``."""
        try:
            st = os.fstat(fd)
            if nbytes <= 0 or st.st_size < nbytes or st.st_size > _size_class(nbytes):
                # The whole segment is mapped: it may not be larger than the
                # size class of what was announced (which the frame limit bounds).
                raise ProtocolError(f"lent segment of {st.st_size} bytes, {nbytes} announced")
            if lease in self._out:
                raise ProtocolError(f"lease {lease} is already out")
            key = (st.st_dev, st.st_ino)
            m = self._maps.pop(key, None)
            if m is not None and any(x is m for x in self._out.values()):
                raise ProtocolError("segment lent again before it was released")
            if m is not None and len(m) != st.st_size:  # it grew: map it afresh (see copyout)
                self._bytes -= len(m)
                with contextlib.suppress(BufferError):
                    m.close()
                m = None
            if m is None:
                m = map_readonly(fd, st.st_size)
                self._bytes += st.st_size
            self._maps[key] = m
        except (OSError, ValueError) as exc:
            raise ProtocolError(f"cannot map lent segment: {exc}") from exc
        finally:
            os.close(fd)
        self._out[lease] = m
        self._trim()
        np = _numpy()
        if np is None:
            return memoryview(m)[:nbytes]
        holder = np.frombuffer(m, np.uint8, count=nbytes)
        weakref.finalize(holder, self._gone, lease)
        return memoryview(holder)

    @property
    def notifies(self) -> bool:
        """Whether :attr:`on_release` is called (else :meth:`released` must be polled)."""
        return _numpy() is not None

    def _gone(self, lease: int) -> None:
        """Finalizer of a lease's holder: its last view was dropped."""
        self._dropped.append(lease)
        cb = self.on_release
        if cb is not None:
            with contextlib.suppress(Exception):
                cb()

    def released(self) -> list[int]:
        """Lease ids none of whose views is alive any more (and forget them)."""
        out = self._out
        if not out:
            return []
        if self.notifies:
            done = []
            dropped = self._dropped
            while dropped:
                lease = dropped.popleft()
                if out.pop(lease, None) is not None:
                    done.append(lease)
        else:
            # (no loop variable may hold a mapping while it is counted)
            done = [lease for lease in out if sys.getrefcount(out[lease]) <= self._IDLE_REFS]
            for lease in done:
                del out[lease]
        if done:
            self._trim()
        return done

    @property
    def outstanding(self) -> int:
        """Leases whose views are still alive."""
        return len(self._out)

    def _trim(self) -> None:
        # Drop least recently used mappings that no lease holds, down to the caps.
        maps = self._maps
        if self._bytes <= self.max_bytes and len(maps) <= self.max_maps:
            return
        busy = {id(m) for m in self._out.values()}
        for key in list(maps):
            if self._bytes <= self.max_bytes and len(maps) <= self.max_maps:
                break
            m = maps[key]
            if id(m) in busy:
                continue
            del maps[key]
            self._bytes -= len(m)
            m.close()

    def drop_idle(self) -> None:
        """Unmap every kept mapping that no lease holds (they are only a cache)."""
        limits = self.max_bytes, self.max_maps
        self.max_bytes = self.max_maps = 0
        try:
            self._trim()
        finally:
            self.max_bytes, self.max_maps = limits

    def clear(self) -> None:
        """Forget every mapping (on teardown; live views keep theirs)."""
        maps, self._maps, self._out, self._bytes = self._maps, {}, {}, 0
        self.on_release = None
        self._dropped.clear()
        for m in maps.values():
            with contextlib.suppress(BufferError):
                m.close()
