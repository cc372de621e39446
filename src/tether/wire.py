"""Frame layout: bytes in, frames out. No I/O here.

Every frame is a fixed 20-byte little-endian header followed by a variable
part (see ``docs/protocol.md`` for the normative description)::

    offset size field
    0      4    size        bytes that follow this field (16 + everything after the header)
    4      1    kind        Kind
    5      1    flags       reserved, 0
    6      2    chan_len    length of the UTF-8 channel name
    8      4    request_id  correlates invoke/result/error/cancel; ping/pong nonce
    12     4    route_id    0 = the peer itself; other values address routes
    16     2    n_att       number of attachment descriptors
    18     2    reserved    0
    20          channel     chan_len bytes, UTF-8
                att table   n_att descriptors of 16 bytes: u8 where, u8 flags,
                            u16 reserved, u32 aux, u64 length
                body        MessagePack, up to the inline attachment data
                att data    the bytes of every inline attachment, in table order

The size field is checked against the limit before any buffer for the frame
is allocated, so a hostile length header costs nothing.
"""

from __future__ import annotations

import enum
import struct
from collections.abc import Callable, Sequence
from typing import Any, Final

import msgspec

from .errors import PayloadTooLarge, ProtocolError

__all__ = [
    "DEFAULT_MAX_FRAME_SIZE",
    "FLAG_LEASE",
    "FLAG_MOVED",
    "FLAG_HANDLE",
    "MIN_MAX_FRAME_SIZE",
    "WHERE_FD",
    "WHERE_INLINE",
    "HEADER",
    "Frame",
    "FrameParser",
    "Kind",
    "encode_frame",
    "frame_header",
    "set_request_id",
]

DEFAULT_MAX_FRAME_SIZE: Final = 64 * 1024 * 1024
HEADER: Final = struct.Struct("<IBBHIIHH")
HEADER_SIZE: Final = HEADER.size  # 20
_REST: Final = struct.Struct("<BBHIIHH")  # the header after the size field
ATT: Final = struct.Struct("<BBHIQ")
ATT_SIZE: Final = ATT.size  # 16
#: most descriptor (kind-1) attachments one frame may carry; more is a protocol error
MAX_FRAME_FDS: Final = 16
#: smallest ``max_frame_size`` a side may announce or use; every HELLO fits in it
MIN_MAX_FRAME_SIZE: Final = 4096
#: large ``bytes``-like values at least this big travel as attachments, not in the body
SHM_THRESHOLD: Final = 64 * 1024
# An attachment descriptor's ``where`` field: where its bytes are.
WHERE_INLINE: Final = 0  # bytes follow the body in this frame
WHERE_FD: Final = 1  # a file descriptor passed beside the frame, claimed in arrival order
# Its ``flags`` field (bits; only meaningful with WHERE_FD).
FLAG_LEASE: Final = 1  # a lent, reusable segment (aux = lease id)
FLAG_MOVED: Final = 2  # a moved Buffer, sealed against future writes only
FLAG_HANDLE: Final = 4  # a descriptor passed as a value (a tether.Handle), never mapped; length 0
_MAX_U32: Final = 0xFFFFFFFF


class Kind(enum.IntEnum):
    """Frame kinds. Values are part of the wire format and never change."""

    HELLO = 1
    INVOKE = 2
    RESULT = 3
    ERROR = 4
    EVENT = 5
    CANCEL = 6
    ROUTE_OPEN = 7
    ROUTE_CLOSE = 8
    PING = 9
    PONG = 10
    GOODBYE = 11
    RELEASE = 12
    AUTH = 13
    STREAM = 14
    ITEM = 15
    CREDIT = 16


# Plain ints for the hot paths (comparing with IntEnum members costs ~10x more).
K_HELLO: Final = 1
K_INVOKE: Final = 2
K_RESULT: Final = 3
K_ERROR: Final = 4
K_EVENT: Final = 5
K_CANCEL: Final = 6
K_GOODBYE: Final = 11
K_AUTH: Final = 13
K_STREAM: Final = 14  # the stream kinds are the highest: ``kind >= K_STREAM`` picks them
K_ITEM: Final = 15
K_CREDIT: Final = 16

_KINDS: Final = frozenset(int(k) for k in Kind)
_CHANNEL_CACHE: Final = 256  # a hostile peer can't grow it past this
_COPY_BELOW: Final = 512  # bodies up to this size (whole frames, no attachments) are bytes


class Frame(msgspec.Struct, gc=False):
    """One decoded frame. ``body`` and attachments are views of what was read
    (a body of at most 512 bytes may be a copy, as ``bytes``).

    A Struct, not a plain class: the parser makes one per frame, and a
    Struct is built in C (about 2.5x faster than a ``__slots__`` class with
    an ``__init__``). Its fields are set freely, as attributes. ``gc=False``:
    frames are not tracked by the garbage collector (a read of thousands of
    frames otherwise triggers collections that cost a third of the parsing);
    nothing a frame holds refers back to it, so it is in no reference cycle.
    """

    kind: int
    request_id: int = 0
    route_id: int = 0
    channel: str = ""
    body: bytes | memoryview = b""
    attachments: Sequence[memoryview | bytes] = ()
    fds: Sequence[int] = ()
    #: set by a Connection whose two ends opted in to pickle (see codec.EXT_PICKLE)
    pickle: bool = False

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Frame):
            return NotImplemented
        return (
            self.kind == other.kind
            and self.request_id == other.request_id
            and self.route_id == other.route_id
            and self.channel == other.channel
            and bytes(self.body) == bytes(other.body)
            and [bytes(a) for a in self.attachments] == [bytes(a) for a in other.attachments]
        )

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        name = Kind(self.kind).name if self.kind in _KINDS else str(self.kind)
        return (
            f"Frame({name}, rid={self.request_id}, route={self.route_id}, "
            f"channel={self.channel!r}, body={len(self.body)}B, att={len(self.attachments)})"
        )


def encode_frame(
    out: bytearray,
    kind: int,
    request_id: int,
    route_id: int,
    channel: bytes,
    body: bytes | bytearray | memoryview,
    attachments: Sequence[bytes | bytearray | memoryview] = (),
    max_frame_size: int = DEFAULT_MAX_FRAME_SIZE,
) -> None:
    """Append one frame with inline attachments to ``out``.

    Raises:
        PayloadTooLarge: the frame would exceed ``max_frame_size``; ``out`` is
            left unchanged.
    """
    n_att = len(attachments)
    size = HEADER_SIZE - 4 + len(channel) + len(body)
    if n_att:
        size += ATT_SIZE * n_att + sum(memoryview(a).nbytes for a in attachments)
    if size > max_frame_size or size > _MAX_U32:
        raise PayloadTooLarge(f"frame of {size} bytes exceeds the limit of {max_frame_size}")
    out += HEADER.pack(size, kind, 0, len(channel), request_id, route_id, n_att, 0)
    out += channel
    for a in attachments:
        out += ATT.pack(WHERE_INLINE, 0, 0, 0, memoryview(a).nbytes)
    out += body
    for a in attachments:
        out += a


_RID: Final = struct.Struct("<I")


def frame_header(buf: bytes | bytearray | memoryview, pos: int) -> tuple[int, int, int, int]:
    """The frame starting at ``pos``: its end offset, kind, request id and channel length.

    For transports that route frames without parsing them whole (NATS). Only
    the header is read; ``ValueError`` (struct.error) if fewer than 20 bytes remain.
    """
    size, kind, _, chan_len, rid, _, _, _ = HEADER.unpack_from(buf, pos)
    return pos + 4 + size, kind, rid, chan_len


def set_request_id(buf: bytearray | memoryview, pos: int, rid: int) -> None:
    """Rewrite the request id of the frame starting at ``pos`` (a NATS peer maps ids)."""
    _RID.pack_into(buf, pos + 8, rid)


class FrameParser:
    """Incremental frame parser: feed bytes with :meth:`feed`, get whole frames.

    Frames that arrive whole are sliced out of the received chunk without
    copying (bodies of at most 512 bytes, in a ``bytes`` chunk, are copied:
    that is cheaper than a view). A frame that spans reads is assembled in one buffer allocated at
    its final size, after its length was checked.

    Any violation raises :class:`ProtocolError`; the parser is then unusable
    and the connection must be closed.

    Args:
        claim_fd: called as ``claim_fd(nbytes, flags, aux)`` for each
            descriptor attachment, in order; it takes the next descriptor that
            arrived beside the bytes and returns its mapped contents. ``None``:
            descriptor attachments are a protocol error.
        first_limit: a smaller limit for the first ``first_count`` frames only
            (a connection's HELLO, and its AUTH with a shared secret), so a
            stranger's first headers cannot make this side hold more than that
            before it has said, and proven, who it is.

    A frame that spans reads is assembled in a buffer that grows with the
    bytes that actually arrived: a header announcing a large frame costs
    nothing until its bytes come.
    """

    __slots__ = (
        "_buf",
        "_chans",
        "_first",
        "_first_left",
        "_head",
        "_need",
        "claim_fd",
        "max_frame_size",
        "parsed",
    )

    def __init__(
        self,
        max_frame_size: int = DEFAULT_MAX_FRAME_SIZE,
        claim_fd: Callable[[int, int, int], Any] | None = None,
        first_limit: int | None = None,
        first_count: int = 1,
    ) -> None:
        self.max_frame_size = max_frame_size
        self._first = first_limit
        self._first_left = first_count
        self.claim_fd = claim_fd
        #: the frames the current :meth:`feed` has completed so far (``claim_fd``
        #: may look at them: the HELLO before a frame says whether it may use
        #: fds); reset it after :meth:`feed`, or it keeps them alive
        self.parsed: list[Frame] = []
        self._head = bytearray()  # partial size field (< 4 bytes)
        self._buf: bytearray | None = None  # partial frame, as much as has arrived
        self._chans: dict[bytes, str] = {}  # channel names seen, decoded once
        self._need = 0

    @property
    def buffered(self) -> int:
        """Bytes held for an incomplete frame."""
        return len(self._head) + (4 + len(self._buf) if self._buf is not None else 0)

    def reset(self) -> None:
        """Drop any partial frame and the callback (the connection is gone)."""
        self._buf = None
        self._head = bytearray()
        self.claim_fd = None
        self.parsed = []

    def feed(self, data: bytes | bytearray | memoryview) -> list[Frame]:
        """Consume ``data`` and return every frame it completes, in order."""
        frames: list[Frame] = []
        self.parsed = frames
        mv = memoryview(data)
        n = len(mv)
        pos = 0
        if self._buf is not None:
            buf = self._buf
            take = min(self._need - len(buf), n)
            buf += mv[:take]  # grows in place (large blocks are remapped, not copied)
            pos = take
            if len(buf) < self._need:
                return frames
            self._buf = None
            frames.append(self._parse(memoryview(buf)))
        elif self._head:
            take = min(4 - len(self._head), n)
            self._head += mv[:take]
            pos = take
            if len(self._head) < 4:
                return frames
            size = int.from_bytes(self._head, "little")
            self._head.clear()
            pos = self._start(size, mv, pos, n, frames)
        if type(data) is bytes and self._first is None:
            pos = self._fast(data, mv, pos, n, frames)
        while pos < n:
            if n - pos < 4:
                self._head += mv[pos:]
                break
            size = int.from_bytes(mv[pos : pos + 4], "little")
            pos = self._start(size, mv, pos + 4, n, frames)
        return frames

    def _fast(self, data: bytes, mv: memoryview, pos: int, n: int, frames: list[Frame]) -> int:
        """Slice out whole, attachment-free frames: the common case, kept short.

        Stops at the first frame it cannot take whole and valid; the general
        path then handles (or rejects) it.
        """
        unpack = HEADER.unpack_from
        limit = self.max_frame_size
        chans = self._chans
        append = frames.append
        while n - pos >= HEADER_SIZE:
            size, kind, _, chan_len, rid, route, n_att, _ = unpack(data, pos)
            end = pos + 4 + size
            start = pos + HEADER_SIZE
            cend = start + chan_len
            if n_att or end > n or size > limit or cend > end or kind not in _KINDS:
                break
            if chan_len:
                key = data[start:cend]
                channel = chans.get(key)
                if channel is None:
                    try:
                        channel = key.decode()
                    except UnicodeDecodeError:
                        break
                    if len(chans) < _CHANNEL_CACHE:
                        chans[key] = channel
            else:
                channel = ""
            # A small body is copied: a bytes slice costs less than a view and, unlike
            # one, is not tracked by the garbage collector (reads of many frames).
            body = data[cend:end] if end - cend <= _COPY_BELOW else mv[cend:end]
            append(Frame(kind, rid, route, channel, body))
            pos = end
        return pos

    def _start(self, size: int, mv: memoryview, pos: int, n: int, frames: list[Frame]) -> int:
        """Begin a frame of ``size`` bytes whose body starts at ``mv[pos]``."""
        limit = self.max_frame_size
        first = self._first is not None
        if first:
            limit = self._first  # type: ignore[assignment]
            self._first_left -= 1
            if self._first_left <= 0:
                self._first = None
        if first and not HEADER_SIZE - 4 <= size <= limit:
            # The handshake's frames are small: anything else is another protocol.
            sample = size.to_bytes(4, "little") + bytes(mv[pos : pos + 28])
            why = (
                f"exceeds the limit of {limit} bytes for a handshake frame"
                if size > limit
                else "is shorter than a header"
            )
            raise ProtocolError(
                f"not a tether peer: it sent {sample!r}..., which is not a tether frame "
                f"(length field {size} {why})"
            )
        if size > limit:
            raise ProtocolError(f"frame length {size} exceeds the limit of {limit} bytes")
        if size < HEADER_SIZE - 4:
            raise ProtocolError(f"frame length {size} is shorter than a header")
        if n - pos >= size:
            frames.append(self._parse(mv[pos : pos + size]))
            return pos + size
        self._buf, self._need = bytearray(mv[pos:]), size
        return n

    def _parse(self, f: memoryview) -> Frame:
        """Decode one frame whose size field was already removed."""
        kind, _, chan_len, rid, route, n_att, _ = _REST.unpack_from(f)
        if kind not in _KINDS:
            raise ProtocolError(f"unknown frame kind {kind}")
        pos = HEADER_SIZE - 4
        end = len(f)
        if pos + chan_len > end:
            raise ProtocolError("channel name runs past the end of the frame")
        try:
            channel = str(f[pos : pos + chan_len], "utf-8") if chan_len else ""
        except UnicodeDecodeError as exc:
            raise ProtocolError("channel name is not valid UTF-8") from exc
        pos += chan_len
        if not n_att:
            return Frame(kind, rid, route, channel, f[pos:])
        table_end = pos + ATT_SIZE * n_att
        if table_end > end:
            raise ProtocolError("attachment table runs past the end of the frame")
        entries = []
        inline = 0
        out_of_band = 0
        n_fd = 0
        for i in range(n_att):
            where, flags, _, aux, length = ATT.unpack_from(f, pos + i * ATT_SIZE)
            if where == WHERE_INLINE:
                inline += length
            elif where != WHERE_FD or self.claim_fd is None:
                raise ProtocolError(f"attachment kind {where} is not supported here")
            else:
                out_of_band += length
                n_fd += 1
            entries.append((where, length, flags, aux))
        if n_fd > MAX_FRAME_FDS:
            raise ProtocolError(
                f"frame with {n_fd} descriptor attachments: more than {MAX_FRAME_FDS}"
            )
        if out_of_band > self.max_frame_size:
            # Descriptor attachments are bounded by the limit too (counted apart
            # from the frame's own bytes): a peer limited to small frames must
            # not be handed a gigabyte to map.
            raise ProtocolError(
                f"frame with {out_of_band} bytes of descriptor attachments exceeds "
                f"the limit of {self.max_frame_size} bytes"
            )
        body_end = end - inline
        if body_end < table_end:
            raise ProtocolError("attachments are longer than the frame")
        atts: list[memoryview | bytes] = []
        p = body_end
        for where, length, flags, aux in entries:
            if where == WHERE_INLINE:
                atts.append(f[p : p + length])
                p += length
            else:
                assert self.claim_fd is not None
                atts.append(self.claim_fd(length, flags, aux))
        return Frame(kind, rid, route, channel, f[table_end:body_end], atts)
