"""Sealed shared-memory segments and the zero-copy :class:`Buffer`.

A large attachment crosses a unix socket as a memfd passed with
``SCM_RIGHTS``. The sender fills the segment, unmaps it and seals it against
writing, growing and shrinking, so the receiver can map it read-only and trust
what it reads without copying it first (Chromium warns that its own shared
buffers need that copy). The receiver checks the seals before mapping; a
segment that is not sealed is a protocol error.

Memory is freed by the kernel once both sides are done: the sender closes its
descriptor after the send, the receiver closes its descriptor as soon as it
has mapped it, and the mapping goes away when the last view of it is dropped.
"""

from __future__ import annotations

import contextlib
import fcntl
import mmap
import os
import queue
import sys
import threading
from typing import Any, Final

from .errors import BufferInUse, ConsumedError, ProtocolError
from .wire import SHM_THRESHOLD

__all__ = ["Buffer", "BufferInUse", "SHM_THRESHOLD", "close_fds", "map_sealed", "segment_from"]

# (SHM_THRESHOLD: attachments at least this large go through shared memory, as
# Chromium's BigBuffer; defined in wire so the core needs no import of this module.)
_SEALS: Final = fcntl.F_SEAL_WRITE | fcntl.F_SEAL_GROW | fcntl.F_SEAL_SHRINK
_SEAL_ALL: Final = _SEALS | fcntl.F_SEAL_SEAL
_F_SEAL_FUTURE_WRITE: Final = getattr(fcntl, "F_SEAL_FUTURE_WRITE", 0x0010)
#: seals of a Buffer moved to a trusting peer (the sender's mapping is going away)
MOVE_SEALS: Final = _F_SEAL_FUTURE_WRITE | fcntl.F_SEAL_GROW | fcntl.F_SEAL_SHRINK
_MOVE_SEALS: Final = MOVE_SEALS


_unmapper: queue.SimpleQueue[mmap.mmap] | None = None


def _unmap_later(m: mmap.mmap) -> None:
    """Unmap on a background thread: munmap is O(size) and releases the GIL."""
    global _unmapper
    if _unmapper is None:
        _unmapper = queue.SimpleQueue()
        threading.Thread(
            target=_unmap_loop, args=(_unmapper,), name="tether-unmap", daemon=True
        ).start()
    _unmapper.put(m)


def _unmap_loop(q: queue.SimpleQueue[mmap.mmap]) -> None:
    while True:
        q.get().close()


def _forget_unmapper() -> None:
    global _unmapper
    _unmapper = None  # the thread did not survive the fork


os.register_at_fork(after_in_child=_forget_unmapper)


def close_fds(fds: Any) -> None:
    """Close descriptors, ignoring those already closed."""
    for fd in fds:
        with contextlib.suppress(OSError):
            os.close(fd)


def _memfd(nbytes: int, name: str = "tether") -> int:
    fd = os.memfd_create(name, os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
    try:
        os.ftruncate(fd, nbytes)
    except BaseException:
        os.close(fd)
        raise
    return fd


def _seal(fd: int) -> None:
    fcntl.fcntl(fd, fcntl.F_ADD_SEALS, _SEAL_ALL)


def segment_from(data: Any) -> tuple[int, int]:
    """Copy a buffer into a new sealed memfd; return ``(fd, nbytes)``.

    The caller owns the descriptor and must close it after sending it.
    """
    src = memoryview(data).cast("B")
    n = src.nbytes
    fd = _memfd(max(n, 1))
    try:
        if n:
            m = mmap.mmap(fd, n, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
            try:
                m[:] = src
            finally:
                m.close()
        _seal(fd)
    except BaseException:
        os.close(fd)
        raise
    return fd, n


#: whether a read-only mapping of a received segment costs no descriptor of its own:
#: before Python 3.13, ``mmap.mmap`` keeps a duplicate of the descriptor while it lives
MAPS_WITHOUT_FD: Final = sys.version_info >= (3, 13)


def map_readonly(fd: int, length: int) -> mmap.mmap:
    """A shared read-only mapping of ``length`` bytes of ``fd`` (which stays the caller's).

    From Python 3.13 on the mapping keeps no duplicate of ``fd`` (``trackfd=False``):
    a received segment the application holds costs no descriptor, only the mapping.
    """
    if sys.version_info >= (3, 13):
        return mmap.mmap(fd, length, mmap.MAP_SHARED, mmap.PROT_READ, trackfd=False)
    return mmap.mmap(fd, length, mmap.MAP_SHARED, mmap.PROT_READ)


def map_moved(fd: int, nbytes: int) -> memoryview:
    """Map a Buffer moved by a trusted sender (sealed against future writes)."""
    return map_sealed(fd, nbytes, MOVE_SEALS)


def map_sealed(fd: int, nbytes: int, required: int = _SEALS) -> memoryview:
    """Map a received segment read-only and close ``fd``; the view owns the mapping.

    Raises:
        ProtocolError: the segment is not sealed against writing, or is
            smaller than announced.
    """
    try:
        seals = fcntl.fcntl(fd, fcntl.F_GET_SEALS)
        if seals & required != required:
            raise ProtocolError("shared-memory attachment is not sealed against writing")
        size = os.fstat(fd).st_size
        if size < nbytes:
            raise ProtocolError(f"shared-memory attachment has {size} bytes, {nbytes} announced")
        if nbytes == 0:
            return memoryview(b"")
        m = map_readonly(fd, nbytes)
    except OSError as exc:
        raise ProtocolError(f"cannot map shared-memory attachment: {exc}") from exc
    finally:
        os.close(fd)
    return memoryview(m)


def consume_all(obj: Any, _depth: int = 0) -> None:
    """Consume every :class:`Buffer` in ``obj`` (also inside lists, tuples, sets, dicts).

    A send that fails before or while encoding moves its Buffers all the same.
    """
    if isinstance(obj, Buffer) or getattr(obj, "__tether_handle__", False):
        obj.close()
    elif _depth < 64 and isinstance(obj, (list, tuple, set, frozenset, dict)):
        for x in obj.values() if isinstance(obj, dict) else obj:
            consume_all(x, _depth + 1)


class Buffer:
    """Shared memory a producer fills in place, then hands over without a copy.

        Sending a Buffer (as an argument of ``invoke``/``send`` or a result) *moves*
        it: the pages go to the receiver in O(1) and this object raises
        :class:`ConsumedError` on every later use, whether the send succeeded or
        not: the lesson of Chromium's use-after-free bugs (a message read after it
    was given away), enforced.

        Example::

            buf = tether.Buffer(64 << 20)
            buf.array("float32")[:] = 1.0     # write in place
            await child.invoke("process", buf)
    """

    __slots__ = ("__weakref__", "_fd", "_map", "_nbytes")

    #: how the protocol core recognizes a Buffer without importing this module
    __tether_buffer__: Final = True

    def __init__(self, nbytes: int) -> None:
        if nbytes < 0:
            raise ValueError("nbytes must be >= 0")
        self._nbytes = nbytes
        self._fd: int | None = _memfd(max(nbytes, 1), "tether-buffer")
        self._map: mmap.mmap | None = (
            mmap.mmap(self._fd, nbytes, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
            if nbytes
            else None
        )

    @property
    def nbytes(self) -> int:
        return self._nbytes

    def __len__(self) -> int:
        return self._nbytes

    @property
    def consumed(self) -> bool:
        """True once the buffer was sent (or closed)."""
        return self._fd is None

    def _check(self) -> None:
        if self._fd is None:
            raise ConsumedError("this Buffer was moved into a message and can no longer be used")

    def view(self) -> memoryview:
        """A writable view of the whole buffer. Drop it before sending."""
        self._check()
        return memoryview(self._map) if self._map is not None else memoryview(bytearray())

    def array(self, dtype: Any = "uint8", shape: Any = None) -> Any:
        """A writable NumPy array over the buffer. Drop it before sending."""
        import numpy as np

        self._check()
        arr = np.frombuffer(self.view(), dtype=dtype)
        return arr.reshape(shape) if shape is not None else arr

    def __getitem__(self, index: Any) -> Any:
        self._check()
        return self.view()[index]

    def __setitem__(self, index: Any, value: Any) -> None:
        self._check()
        self.view()[index] = value

    def take(self, trusted: bool = False) -> tuple[int, int]:
        """Consume the buffer: seal it and return ``(fd, nbytes)``.

        The caller owns the returned descriptor. Called by the send path.

        Args:
            trusted: the receiver trusts this side (it accepts lent segments).
                Then the handoff is O(1): the segment is sealed against future
                writes and this side's mapping is torn down in the background,
                instead of unmapping first (O(size)) to seal it against all writes.

        Raises:
            ConsumedError: it was already taken.
            BufferInUse: views are still alive; the buffer is consumed anyway.
        """
        self._check()
        fd, m = self._fd, self._map
        self._fd = self._map = None
        assert fd is not None
        if trusted:
            # References to m are the local and getrefcount's argument, plus one
            # per live view: any view means the pages could still be written.
            if m is not None and sys.getrefcount(m) > 2:
                with contextlib.suppress(BufferError):
                    m.close()
                os.close(fd)
                raise BufferInUse(
                    "Buffer sent while views of it are alive; drop them before sending"
                )
            try:
                fcntl.fcntl(fd, fcntl.F_ADD_SEALS, _MOVE_SEALS)
            except BaseException:
                os.close(fd)
                raise
            if m is not None:
                _unmap_later(m)
            return fd, self._nbytes
        try:
            if m is not None:
                try:
                    m.close()
                except BufferError as exc:
                    raise BufferInUse(
                        "Buffer sent while views of it are alive; drop them before sending"
                    ) from exc
            _seal(fd)
        except BaseException:
            os.close(fd)
            raise
        return fd, self._nbytes

    def _move(self) -> Buffer:
        """A new Buffer holding these pages; this one is consumed (for a send queued for later)."""
        self._check()
        new = Buffer.__new__(Buffer)
        new._fd, new._map, new._nbytes = self._fd, self._map, self._nbytes
        self._fd = self._map = None
        return new

    def take_bytes(self) -> memoryview:
        """Consume the buffer and return its contents, read-only (for a peer without ``fd``).

        Raises:
            ConsumedError: it was already taken.
            BufferInUse: views are still alive; the buffer is consumed anyway.
        """
        fd, n = self.take()
        return map_sealed(fd, n)

    def close(self) -> None:
        """Release the buffer without sending it."""
        if self._fd is None:
            return
        fd, m = self._fd, self._map
        self._fd = self._map = None
        if m is not None:
            with contextlib.suppress(BufferError):  # live views keep the mapping until dropped
                m.close()
        os.close(fd)

    def __del__(self) -> None:
        if getattr(self, "_fd", None) is not None:
            self.close()

    def __repr__(self) -> str:
        state = "consumed" if self._fd is None else "open"
        return f"<tether.Buffer {self._nbytes} bytes {state}>"
