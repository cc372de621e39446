"""Lent segments from a peer this side does not trust, copied out on arrival.

A main trusts no child's pages: a child keeps a writable mapping of what it
lends and could change it at any time. Sealed one-off segments avoid that but
pay for fresh pages on every transfer (about 1 GB/s on a VM). With the
``copy`` feature a main takes the child's *reused* segments instead, and
copies each one into its own private memory the moment the frame claiming it
is parsed: everything after (decoding, the handler, the application) reads
only that copy, and the segment is released at once for the child to refill.
What a child writes into the segment after the copy, or during it, can only
change what the copy holds, never the copy afterwards.

Two things keep the copy at memory speed:

* the mapping of each lent segment is kept (one per segment, bounded) and
  reused when the same segment comes again, so its pages are not faulted in
  again;
* the private destinations come from :data:`DESTINATIONS`, a process-wide
  pool of anonymous mappings (transparent huge pages where the kernel has
  them). With NumPy, a destination goes back to the pool when the last view
  of the data is dropped, so steady traffic reuses pages already faulted in;
  idle ones are marked ``MADV_FREE`` (the kernel takes them back under memory
  pressure). Without NumPy every copy gets fresh pages.

The checks before mapping: the descriptor is a memfd sealed against
shrinking (else the child could cut it under the copy and crash main with
``SIGBUS``), at least as large as announced and no larger than its size
class.
"""

from __future__ import annotations

import collections
import contextlib
import fcntl
import mmap
import os
import threading
import weakref
from typing import Final

from .errors import ProtocolError
from .segments import _numpy, _size_class
from .shm import map_readonly

__all__ = ["DESTINATIONS", "CopiedLeases", "Destinations"]

#: the seal a segment lent to a copying receiver must carry (it can't be cut under the copy)
REQUIRED_SEALS: Final = fcntl.F_SEAL_SHRINK
_MADV_FREE: Final = getattr(mmap, "MADV_FREE", 8)
_MADV_HUGEPAGE: Final = getattr(mmap, "MADV_HUGEPAGE", 14)
_MADV_POPULATE_READ: Final = getattr(mmap, "MADV_POPULATE_READ", 22)  # Linux 5.14
_MADV_POPULATE_WRITE: Final = getattr(mmap, "MADV_POPULATE_WRITE", 23)


def populate(m: mmap.mmap, nbytes: int, advice: int = _MADV_POPULATE_WRITE) -> None:
    """Fault in the first ``nbytes`` of ``m`` in one call (a no-op where the kernel can't).

    Page by page, a copy into fresh pages takes a fault every 4 KiB, much
    slower than the kernel filling the page tables at once.
    """
    with contextlib.suppress(OSError, ValueError):
        m.madvise(advice, 0, nbytes)


def _fresh(size: int, nbytes: int) -> mmap.mmap:
    """A private anonymous mapping of ``size`` bytes (huge pages asked), ``nbytes`` faulted in."""
    m = mmap.mmap(-1, size, mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    with contextlib.suppress(OSError):  # (no THP in this kernel: 4 KiB pages then)
        m.madvise(_MADV_HUGEPAGE)
    populate(m, nbytes)
    return m


def _unmap(m: mmap.mmap) -> None:
    with contextlib.suppress(BufferError):  # a view being torn down: freed with it
        m.close()


class Destinations:
    """Private mappings the copies go into, reused once the application dropped them.

    Idle ones are kept by size class up to ``max_idle`` bytes and
    ``max_count`` mappings, marked ``MADV_FREE``. :meth:`give_back` may run
    on any thread (from a finalizer, maybe while this thread holds the lock):
    it only appends to a queue that the other methods drain.
    """

    def __init__(self, max_idle: int = 256 << 20, max_count: int = 4) -> None:
        self.max_idle = max_idle
        self.max_count = max_count
        self._lock = threading.Lock()
        self._free: dict[int, list[mmap.mmap]] = {}
        self._idle = 0
        self._count = 0
        self._back: collections.deque[mmap.mmap] = collections.deque()
        self._out = 0  # handed out with a finalizer and not yet drained back

    def copy(self, src: memoryview) -> memoryview:
        """``src`` copied into a private destination: a read-only view of the copy."""
        n = src.nbytes
        np = _numpy()
        if np is None:  # no finalizer to tell when the views are gone: fresh pages
            dst = memoryview(_fresh(n, n))[:n]
            dst[:] = src
            return dst.toreadonly()
        cls = _size_class(n)
        m: mmap.mmap | None = None
        with self._lock:
            self._drain()
            free = self._free.get(cls)
            if free:
                self._idle -= cls
                self._count -= 1
                m = free.pop()
            self._out += 1
        try:
            if m is None:
                m = _fresh(cls, n)
            holder = np.frombuffer(m, np.uint8, count=n)
            memoryview(holder)[:] = src
        except BaseException:
            if m is None:
                with self._lock:
                    self._out -= 1
            else:
                self._back.append(m)  # (counted back when drained)
            raise
        holder.flags.writeable = False
        fin = weakref.finalize(holder, self.give_back, m)
        fin.atexit = False
        return memoryview(holder)

    def give_back(self, m: mmap.mmap) -> None:
        """The last view of ``m`` is gone (any thread): queue it for reuse."""
        with contextlib.suppress(OSError, ValueError):
            m.madvise(_MADV_FREE)  # idle: the kernel may take the pages back
        self._back.append(m)

    def _drain(self) -> None:
        back = self._back
        while back:
            m = back.popleft()
            self._out -= 1
            size = len(m)
            if self._idle + size <= self.max_idle and self._count < self.max_count:
                self._free.setdefault(size, []).append(m)
                self._idle += size
                self._count += 1
            else:
                _unmap(m)

    @property
    def live(self) -> int:
        """Destinations handed out whose views are still alive (with NumPy)."""
        with self._lock:
            self._drain()
            return self._out

    @property
    def idle_bytes(self) -> int:
        """Bytes of idle destinations kept for reuse."""
        with self._lock:
            self._drain()
            return self._idle

    def clear(self) -> None:
        """Unmap every idle destination."""
        with self._lock:
            self._drain()
            free, self._free, self._idle, self._count = self._free, {}, 0, 0
        for maps in free.values():
            for m in maps:
                _unmap(m)


#: the destinations of every copying connection of this process
DESTINATIONS = Destinations()


def _forget_destinations() -> None:
    # In a forked child: start afresh (the lock may have been held at the fork).
    global DESTINATIONS
    DESTINATIONS = Destinations()


os.register_at_fork(after_in_child=_forget_destinations)


class CopiedLeases:
    """The receiving side of leases from an untrusted lender: copy out, release at once.

    One per connection (held by :class:`tether.attachments.MemfdStore`).
    Mappings of lent segments are kept by (device, inode), least recently
    used dropped first, up to ``max_bytes`` and ``max_maps``.
    """

    def __init__(self, max_bytes: int = 256 << 20, max_maps: int = 8) -> None:
        self.max_bytes = max_bytes
        self.max_maps = max_maps
        self._maps: collections.OrderedDict[tuple[int, int], mmap.mmap] = collections.OrderedDict()
        self._bytes = 0
        self._done: list[int] = []  # leases copied out, RELEASE not yet queued

    def take(self, fd: int, nbytes: int, lease: int) -> memoryview:
        """Copy ``nbytes`` of a lent segment into private memory; closes ``fd``.

        Returns a read-only view of the copy; ``lease`` is released by the
        next :meth:`copied`.

        Raises:
            ProtocolError: the segment is not a memfd sealed against
                shrinking, is smaller than announced or larger than its size
                class, or cannot be mapped.
        """
        try:
            try:
                seals = fcntl.fcntl(fd, fcntl.F_GET_SEALS)
            except OSError as exc:
                raise ProtocolError(f"lent segment is not a sealable memfd: {exc}") from exc
            if seals & REQUIRED_SEALS != REQUIRED_SEALS:
                raise ProtocolError("lent segment is not sealed against shrinking")
            st = os.fstat(fd)
            if nbytes <= 0 or st.st_size < nbytes or st.st_size > _size_class(nbytes):
                raise ProtocolError(f"lent segment of {st.st_size} bytes, {nbytes} announced")
            key = (st.st_dev, st.st_ino)
            src = self._maps.pop(key, None)
            if src is not None and len(src) != st.st_size:
                # The segment grew since it was mapped (it may, sealed only against
                # shrinking): the old mapping would cut the data short. Map it afresh.
                self._bytes -= len(src)
                _unmap(src)
                src = None
            if src is None:
                src = map_readonly(fd, st.st_size)
                self._bytes += st.st_size
                populate(src, nbytes, _MADV_POPULATE_READ)
            self._maps[key] = src  # (now the most recently used)
        except (OSError, ValueError) as exc:
            raise ProtocolError(f"cannot map lent segment: {exc}") from exc
        finally:
            os.close(fd)
        try:
            view = DESTINATIONS.copy(memoryview(src)[:nbytes])
        finally:
            self._trim()
        self._done.append(lease)
        return view

    def copied(self) -> list[int]:
        """Leases copied out since the last call (send RELEASE for each)."""
        done, self._done = self._done, []
        return done

    @property
    def mapped_bytes(self) -> int:
        """Bytes of lent segments mapped here (a cache: nothing reads them after the copy)."""
        return self._bytes

    @property
    def mapped(self) -> int:
        """Lent segments mapped here."""
        return len(self._maps)

    def _trim(self) -> None:
        maps = self._maps
        while maps and (self._bytes > self.max_bytes or len(maps) > self.max_maps):
            _, m = maps.popitem(last=False)
            self._bytes -= len(m)
            _unmap(m)

    def clear(self) -> None:
        """Unmap every kept mapping (the connection ended)."""
        maps, self._maps, self._bytes = self._maps, collections.OrderedDict(), 0
        self._done = []
        for m in maps.values():
            _unmap(m)
