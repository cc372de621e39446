"""The attachment store: every descriptor and mapping one connection holds.

The protocol core (:mod:`tether.protocol`) holds no descriptors, mappings or
process-wide state. Whatever touches the OS for out-of-band attachments lives
here, in one :class:`MemfdStore` per connection, created by the I/O layer and
handed to :class:`~tether.protocol.Connection`:

* descriptors received beside the bytes, until a frame claims them;
* sealed segments made for outgoing attachments;
* segments *lent* to the peer (leases) and this connection's own pool of idle
  ones, so a segment lent to one peer is never refilled for another;
* read-only mappings of segments the peer lent to this side, or, on a main,
  of segments a peer lent it to copy out (:mod:`tether.copyout`).

:meth:`MemfdStore.close` releases all of it. In a forked child every store
inherited from the parent is closed (its memfds and mappings), never written.
"""

from __future__ import annotations

import collections
import mmap
import os
import weakref
from collections.abc import Callable, Iterable
from typing import Any, Final

from . import shm
from .copyout import CopiedLeases
from .errors import ProtocolError
from .handles import MAX_LIVE_HANDLES, Handle, received
from .segments import Borrowed, Segment, SegmentPool, _size_class
from .wire import FLAG_HANDLE, FLAG_LEASE, FLAG_MOVED

__all__ = ["MAX_LEASES", "MemfdStore"]

_U32: Final = 0xFFFFFFFF
#: leases one connection may have out at once; past it, segments are sealed one-offs
MAX_LEASES: Final = 64

_STORES: weakref.WeakSet[MemfdStore] = weakref.WeakSet()


def store_for(unix: bool, peer_role: str, local_role: str) -> MemfdStore | None:
    """The attachment store of a new connection, or ``None`` where descriptors can't pass.

    The one place the lending rule lives, for both I/O layers: on unix sockets
    descriptors pass; a main lends its pooled segments only to the children it
    spawned (``peer_role == "child"``), and every side but a main accepts
    segments lent by the other side (it trusts the privileged side's pages).
    A main trusts no peer's pages but takes their lent segments to copy out
    at once (``copy``), so children and clients lend to it. Two children on a
    direct channel (``sibling``) trust neither: sealed only.
    """
    if not unix:
        return None
    main = local_role == "main"
    return MemfdStore(
        lend=peer_role in ("child", "main"),
        borrow=not main and local_role != "sibling",
        copy=main,
    )


class MemfdStore:
    """Shared-memory attachments of one connection (unix sockets only).

    Args:
        lend: lend pooled segments to the peer when it announces ``lease``.
            Only for a peer this side trusts with its own pages (a main lends
            to the children it spawned): lent pages stay mapped on both sides
            and are refilled, for this same peer only, after its RELEASE.
        borrow: accept segments lent or moved by the peer (this side trusts
            the peer's pages not to change under it: a child trusts its main).
        copy: accept segments lent by a peer this side does not trust, copied
            into private memory as each frame is parsed and released at once
            (:mod:`tether.copyout`; a main). Ignored when ``borrow``.
        max_idle, max_segments: bounds of this connection's idle segments
            (and, lending to a copying peer, of the segments lent out at once).
    """

    def __init__(
        self,
        *,
        lend: bool = False,
        borrow: bool = False,
        copy: bool = False,
        max_idle: int = 256 << 20,
        max_segments: int = 8,
    ) -> None:
        self.lend = lend
        self.borrow = borrow
        #: HELLO features this store supports
        self.copy = copy and not borrow
        self.features: tuple[str, ...] = (
            ("fd", "lease") if borrow else ("fd", "copy") if self.copy else ("fd",)
        )
        self._fds_in: collections.deque[int] = collections.deque()
        self._handles: weakref.WeakSet[Handle] = weakref.WeakSet()  # received, not yet taken
        # received sealed or moved segments mapped, each keeping a descriptor (Python < 3.13)
        self._mapped: weakref.WeakSet[mmap.mmap] = weakref.WeakSet()
        self._pool = SegmentPool(max_idle, max_segments)
        self._leases: dict[int, Segment] = {}  # lent out, awaiting RELEASE
        self._next_lease = 0
        self._lent_bytes = 0  # size of the segments lent out
        self._classes: set[int] = set()  # size classes sent to a copying peer so far
        #: segments the peer lent this side
        self.borrowed = Borrowed()
        #: segments the peer lent this side to copy out (a main)
        self.copied = CopiedLeases(max_idle, max_segments)
        self.closed = False
        _STORES.add(self)

    # -- receiving --------------------------------------------------------

    def receive_fds(self, fds: Iterable[int]) -> None:
        """Queue descriptors received beside the bytes; frames claim them in order."""
        if self.closed:
            shm.close_fds(fds)
        else:
            self._fds_in.extend(fds)

    @property
    def handles_held(self) -> int:
        """Received descriptors alive here: Handles not yet taken, and mapped segments.

        Before Python 3.13 a mapping keeps a duplicate of its descriptor
        (:data:`tether.shm.MAPS_WITHOUT_FD`), so each received sealed or moved
        segment the application still holds costs one: the I/O layers stop
        reading a peer that made this side hold too many (``HANDLES_HIGH``),
        as for Handles.
        """
        return len(self._handles) + len(self._mapped)

    def holds_descriptor(self, att: Any) -> bool:
        """Whether attachment ``att`` (as claimed) counts in :attr:`handles_held`."""
        return isinstance(att, Handle) or (type(att) is memoryview and att.obj in self._mapped)

    @property
    def unclaimed(self) -> int:
        """Descriptors received that no frame has claimed yet."""
        return len(self._fds_in)

    def claim(self, nbytes: int, flags: int, aux: int) -> Any:
        """Map the next received descriptor as an attachment of ``nbytes``.

        A descriptor passed as a value (``FLAG_HANDLE``) becomes a
        :class:`tether.Handle` that owns it (closed unless the application takes it).

        Raises:
            ProtocolError: no descriptor arrived, it is not sealed, is smaller
                than announced, is lent with lease id 0, is lent/moved while
                this side neither borrows nor copies (or moved to a side that
                only copies), or is flagged HANDLE together with LEASE or MOVED.
        """
        if not self._fds_in:
            raise ProtocolError("frame refers to a file descriptor that did not arrive")
        fd = self._fds_in.popleft()
        if flags & FLAG_HANDLE:
            if flags & (FLAG_LEASE | FLAG_MOVED):
                os.close(fd)
                raise ProtocolError("a descriptor flagged HANDLE together with LEASE or MOVED")
            if len(self._handles) >= MAX_LIVE_HANDLES:
                os.close(fd)
                raise ProtocolError(
                    f"more than {MAX_LIVE_HANDLES} descriptors received as Handles "
                    "and not yet taken, closed or dropped"
                )
            return received(fd, self._handles)
        if not flags & (FLAG_LEASE | FLAG_MOVED):
            return self._count(shm.map_sealed(fd, nbytes))
        if flags & FLAG_LEASE and not aux:
            os.close(fd)
            raise ProtocolError("a lent segment with lease id 0")
        if self.copy and flags & (FLAG_LEASE | FLAG_MOVED) == FLAG_LEASE:
            return self.copied.take(fd, nbytes, aux)
        if not self.borrow:
            os.close(fd)
            raise ProtocolError("a lent or moved segment from a peer this side does not trust")
        if flags & FLAG_MOVED:
            return self._count(shm.map_moved(fd, nbytes))
        return self.borrowed.map_lease(fd, nbytes, aux)

    def _count(self, view: memoryview) -> memoryview:
        if not shm.MAPS_WITHOUT_FD and isinstance(view.obj, mmap.mmap):
            self._mapped.add(view.obj)
        return view

    def released(self) -> list[int]:
        """Leases the peer lent whose views are all gone, or copied out (send RELEASE for each)."""
        if self.copy:
            return self.copied.copied()
        return self.borrowed.released()

    @property
    def outstanding(self) -> int:
        """Leases from the peer whose views are still alive."""
        return self.borrowed.outstanding

    @property
    def notifies(self) -> bool:
        """Whether :attr:`on_release` is called when a lease's last view goes (no polling)."""
        return self.borrowed.notifies

    @property
    def on_release(self) -> Callable[[], None] | None:
        """Called, from any thread, when the last view of a lease from the peer was dropped.

        Then call :meth:`tether.protocol.Connection.poll_releases` (on the
        connection's own thread or loop) and write what it queued.
        """
        return self.borrowed.on_release

    @on_release.setter
    def on_release(self, cb: Callable[[], None] | None) -> None:
        self.borrowed.on_release = cb

    # -- sending ----------------------------------------------------------

    def seal(self, data: memoryview) -> tuple[int, int]:
        """Copy ``data`` into a new sealed segment; ``(fd, nbytes)`` to send and close."""
        return shm.segment_from(data)

    def lend_segment(self, data: memoryview, pooled: bool = False) -> tuple[int, int] | None:
        """Copy ``data`` into a pooled segment lent to the peer: ``(fd, lease id)``.

        ``None`` when this store does not lend or too many leases are out
        (then send a sealed segment). With ``pooled`` (the peer copies out
        and releases at once), also when the segment could not go back to
        the pool: its size class, added to the segments already out, would
        pass ``max_idle`` or ``max_segments``. So every segment lent to a
        copying peer is reused, and a flood of sends holds at most
        ``max_idle`` bytes of them here. And the first attachment of each
        size class goes sealed too: a one-off send costs what it did before
        (the receiver maps it in place, nobody keeps a segment, a mapping
        or a copy's pages for it); a size sent again is worth a segment.
        """
        if not self.lend or len(self._leases) >= MAX_LEASES or self.closed:
            return None
        pool = self._pool
        if pooled:
            cls = _size_class(data.nbytes)
            if cls not in self._classes:
                self._classes.add(cls)
                return None
            if self._lent_bytes + cls > pool.max_idle or len(self._leases) >= pool.max_segments:
                return None
        seg = pool.get(data.nbytes)
        try:
            seg.fill(data)
            fd = os.dup(seg.fd)
        except BaseException:
            self._pool.put(seg)
            raise
        lease = self._next_lease = (self._next_lease + 1) & _U32 or 1
        while lease in self._leases:  # wrapped onto a lease still out
            lease = self._next_lease = (lease + 1) & _U32 or 1
        self._leases[lease] = seg
        self._lent_bytes += seg.size
        return fd, lease

    def move(self, buf: Any, trusted: bool) -> tuple[int, int]:
        """Consume a :class:`~tether.Buffer`: ``(fd, nbytes)`` to send and close."""
        fd, n = buf.take(trusted=trusted)
        return int(fd), int(n)

    def returned(self, lease: int) -> None:
        """The peer sent RELEASE for ``lease``: its segment may be refilled (for this peer)."""
        seg = self._leases.pop(lease, None)
        if seg is not None:
            self._lent_bytes -= seg.size
            if self.closed:
                seg.close()
            else:
                self._pool.put(seg)

    def unsent(self, fd: int, lease: int) -> None:
        """An attachment that never reached the peer: close it, keep its segment."""
        os.close(fd)
        if lease:
            self.returned(lease)

    def close_fds(self, fds: Iterable[int]) -> None:
        """Close descriptors that will not be sent."""
        shm.close_fds(fds)

    @property
    def leases_out(self) -> int:
        """Segments lent to the peer and not yet released."""
        return len(self._leases)

    @property
    def idle_segments(self) -> int:
        """Idle segments of this connection's pool."""
        return self._pool.idle_segments

    # -- ending -----------------------------------------------------------

    def close(self) -> None:
        """Release every descriptor and mapping this store holds.

        Segments still lent out are closed, never reused: without a RELEASE
        there is no telling whether the peer still reads them. Mappings the
        application still views stay until those views are dropped.
        """
        self.closed = True
        _STORES.discard(self)
        q = self._fds_in
        while q:
            os.close(q.popleft())
        leases, self._leases, self._lent_bytes = self._leases, {}, 0
        for seg in leases.values():
            seg.close()
        self._pool.clear()
        self.borrowed.clear()
        self.copied.clear()


def _close_inherited() -> None:
    # In a forked child: the parent's connections are not ours. Close their
    # segments' descriptors and our copies of the mappings; never write them.
    for store in list(_STORES):
        store.close()


os.register_at_fork(after_in_child=_close_inherited)
