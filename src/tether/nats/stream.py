"""The two ends of tether over NATS: streams that route each frame to its own subject.

A :class:`~tether.Peer` writes frames to one byte stream; over NATS the
frames of one peer go to several subjects (docs/protocol.md 1.2). Each
stream here reads the header of every frame it is given (kind, request id,
channel: :func:`tether.wire.frame_header`) and picks the subject and reply
subject for it; consecutive frames for one destination travel as one NATS
message of at most ``max_payload`` bytes (events by the thousand, in few
messages). Incoming messages are checked frame by frame before the peer
sees them, so what a stranger publishes costs a count, not the connection.

No HELLO crosses NATS: both ends use a fixed profile (MessagePack and
streams; no descriptors, leases, pickle or trace context; the largest frame
is the server's ``max_payload``), so each stream feeds its own peer a HELLO
in that profile and drops the one its peer writes.

- :class:`ClientStream`: the client's one peer for a namespace, whose other
  side is "main" (every listener at once).
- :class:`ServerStream`: a listener's peer for one client.
"""

from __future__ import annotations

import array
import asyncio
import base64
import collections
import contextlib
import hashlib
import logging
import re
import secrets
from collections.abc import Callable
from typing import Any, Final

from .. import codec
from ..aio.stream import DrainWaiters
from ..errors import PayloadTooLarge, TetherError
from ..wire import (
    ATT,
    ATT_SIZE,
    HEADER,
    HEADER_SIZE,
    K_CANCEL,
    K_CREDIT,
    K_ERROR,
    K_EVENT,
    K_GOODBYE,
    K_INVOKE,
    K_ITEM,
    K_RESULT,
    K_STREAM,
    WHERE_INLINE,
    Kind,
    encode_frame,
    frame_header,
    set_request_id,
)

__all__ = [
    "ClientStream",
    "NatsStream",
    "ServerStream",
    "channel_token",
    "error_frame",
    "frame_ok",
    "frames_of",
    "spawn",
]

log = logging.getLogger("tether")

_tasks: set[asyncio.Task[Any]] = set()
_K_ROUTE_OPEN: Final = int(Kind.ROUTE_OPEN)
#: what a listener's peer sends a client on ``NS.p.<I>.f``
_TO_CLIENT: Final = frozenset((K_EVENT, K_INVOKE, K_CANCEL, K_STREAM, K_CREDIT))
_PLAIN: Final = re.compile(r"[A-Za-z0-9_-]+(?:\.[A-Za-z0-9_-]+)*")
_TOKENS: Final = 1024  # channel -> subject token cache entries (then it starts over)
#: longest subject token a channel maps to as itself (or its base32); longer ones are hashed
MAX_TOKEN: Final = 128
_token_cache: dict[bytes, str] = {}
_U32: Final = 0xFFFFFFFF
_KINDS: Final = frozenset(int(k) for k in Kind)
#: bytes of messages a peer may leave unread (it paused: its handlers hold too
#: much); past it, more are refused (NATS cannot be asked to wait, as a socket is)
INBOX_LIMIT: Final = 4 * 1024 * 1024
#: the NATS status header of a "no responders" answer
NO_RESPONDERS: Final = "503"


def spawn(coro: Any) -> None:
    """Run ``coro`` in the background, held until it ends."""
    task = asyncio.get_running_loop().create_task(coro)
    _tasks.add(task)
    task.add_done_callback(_tasks.discard)


async def flushed(nc: Any, timeout: float = 10.0) -> None:
    """Return once the NATS server has processed every command sent so far.

    nats-py's ``flush()`` writes its PING straight to the socket, ahead of the
    commands still queued for its flusher task (SUB, UNSUB, PUB), so the PONG
    can come back before they reach the server: a subscription "flushed" that
    way may not be there yet. The queue goes out first here.
    """
    push = getattr(nc, "_flush_pending", None)
    if push is not None:
        await asyncio.wait_for(push(force_flush=True), timeout)
    await nc.flush(timeout)


def channel_token(channel: bytes) -> str:
    """The subject token(s) of a channel (UTF-8): itself when it is dot-separated
    tokens of letters, digits, ``_`` and ``-``, else ``~`` and the lowercase
    unpadded base32 of its bytes (no wildcard or space ever reaches a subject).

    A token longer than :data:`MAX_TOKEN` characters is ``~~`` and the base32
    of the first 20 bytes of the channel's SHA-256 instead (34 characters), so
    a long channel (up to 65535 bytes) never overflows the NATS server's
    control line; the frame still carries the whole channel name.
    """
    tok = _token_cache.get(channel)
    if tok is None:
        text = channel.decode("utf-8", "replace")
        if _PLAIN.fullmatch(text) and text.encode() == channel:
            tok = text
        else:
            tok = "~" + base64.b32encode(channel).decode().rstrip("=").lower()
        if len(tok) > MAX_TOKEN:
            digest = hashlib.sha256(channel).digest()[:20]
            tok = "~~" + base64.b32encode(digest).decode().lower()
        if len(_token_cache) >= _TOKENS:
            _token_cache.clear()
        _token_cache[bytes(channel)] = tok
    return tok


def hello_frame(role: str, name: str, max_frame_size: int) -> bytes:
    """The HELLO a stream feeds its own peer: the fixed NATS profile (streams only)."""
    out = bytearray()
    body = codec.encoder.encode(
        codec.Hello(
            protocol=codec.PROTOCOL_NAME,
            version=codec.PROTOCOL_VERSION,
            role=role,
            name=name,
            max_frame_size=max_frame_size,
            features=["stream"],
        )
    )
    encode_frame(out, Kind.HELLO, 0, 0, b"", body)
    return bytes(out)


def error_frame(rid: int, code: str, message: str) -> bytes:
    """An ERROR frame answering request ``rid``, as the other side would have sent it."""
    out = bytearray()
    body = codec.encoder.encode(codec.ErrorInfo(code, message))
    encode_frame(out, Kind.ERROR, rid, 0, b"", body)
    return bytes(out)


def frames_of(
    data: bytes | bytearray, limit: int = 0
) -> list[tuple[int, int, int, int, int]] | None:
    """``(start, end, kind, request id, channel length)`` of each frame of a message.

    ``None`` when the message is not whole, well-formed frames (a stranger's
    garbage): every check the peer's parser makes that would end the peer
    is made here first (:func:`frame_ok`), so such a message is dropped and
    counted instead. ``limit``: the largest frame size field taken (0: any).
    """
    out = []
    pos, n = 0, len(data)
    while pos < n:
        if n - pos < HEADER_SIZE:
            return None
        end, kind, rid, chan_len = frame_header(data, pos)
        if end > n or not frame_ok(data, pos, end, kind, chan_len, limit):
            return None
        out.append((pos, end, kind, rid, chan_len))
        pos = end
    return out or None


def frame_ok(
    data: bytes | bytearray, pos: int, end: int, kind: int, chan_len: int, limit: int
) -> bool:
    """Whether the frame at ``data[pos:end]`` passes the parser (docs/protocol.md 3):
    a known kind, a channel of valid UTF-8 inside it, inline attachments only,
    the table and their bytes inside it, and its size field at most ``limit`` (if not 0)."""
    if end - pos < HEADER_SIZE + chan_len or kind not in _KINDS:
        return False
    if limit and end - pos - 4 > limit:
        return False
    if chan_len:
        try:
            data[pos + HEADER_SIZE : pos + HEADER_SIZE + chan_len].decode()
        except UnicodeDecodeError:
            return False
    n_att = HEADER.unpack_from(data, pos)[6]
    if n_att:
        table = pos + HEADER_SIZE + chan_len
        inline = table + ATT_SIZE * n_att
        if inline > end:
            return False
        for i in range(n_att):
            where, _, _, _, length = ATT.unpack_from(data, table + i * ATT_SIZE)
            inline += length
            if where != WHERE_INLINE or inline > end:
                return False
    return True


def _ignore(*args: object) -> None:
    """Stands in for the peer's callbacks once the stream is closed."""


# A message being built, or waiting to be published: subject, reply subject, payload.
_Message = tuple[str, str, bytes]


class NatsStream:
    """A :class:`~tether.aio.stream.Stream` whose frames travel as NATS messages.

    Frames in come through :meth:`feed` (whole frames, checked by the
    owner); frames out are routed by :meth:`_route` (subclasses).

    Args:
        nc: a connected ``nats.aio.client.Client``.
        max_payload: the server's ``max_payload``; no message is larger.
        hello: the HELLO frame fed to the peer first.
    """

    unix = False

    def __init__(self, nc: Any, max_payload: int, hello: bytes) -> None:
        self._nc = nc
        self._max = max_payload
        self._loop = asyncio.get_running_loop()
        self._on_readable: Callable[[], None] = _ignore
        self._on_error: Callable[[OSError], None] = _ignore
        self._inbox: collections.deque[bytes] = collections.deque([hello])
        self._waiting = 0  # bytes fed and not read yet
        self._eof = False
        self._reading = False
        self._outbox: collections.deque[_Message] = collections.deque()
        self._wake = asyncio.Event()
        #: bytes accepted by :meth:`write` and not yet handed to the NATS client
        self.buffered = 0
        #: messages the NATS client refused to publish (dropped)
        self.unsent = 0
        self._drain_waiters = DrainWaiters(self._loop)
        self.closed_with: TetherError | None = None
        self._writer = self._loop.create_task(self._write_messages())
        self._subject = ""
        self._reply = ""
        self._size = 0

    def attach(self, on_readable: Callable[[], None], on_error: Callable[[OSError], None]) -> None:
        self._on_readable = on_readable
        self._on_error = on_error

    def fileno(self) -> int:
        return -1

    def start(self) -> None:
        if self.closed_with is None:
            self._reading = True
            if self._inbox or self._eof:
                self._loop.call_soon(self._readable)

    def stop_reading(self) -> None:
        self._reading = False

    def _readable(self) -> None:
        if self._reading and self.closed_with is None:
            self._on_readable()

    def feed(self, data: bytes | bytearray) -> None:
        """Whole frames for the peer (empty: the end of the stream)."""
        if self.closed_with is not None or self._eof:
            return
        if data:
            self._inbox.append(bytes(data))
            self._waiting += len(data)
        else:
            self._eof = True
        self._readable()

    def offer(self, data: bytes | bytearray) -> bool:
        """Whole frames from NATS for the peer; False (not taken) when the peer
        left :data:`INBOX_LIMIT` bytes unread (one message is always taken)."""
        if self._waiting and self._waiting + len(data) > INBOX_LIMIT:
            return False
        self.feed(data)
        return True

    def recv(self, on_fds: Callable[[array.array[int]], None]) -> bytes | None:
        inbox = self._inbox
        if inbox:
            data = inbox.popleft() if len(inbox) == 1 else b"".join(inbox)
            inbox.clear()
            self._waiting = 0
            if self._eof:
                self._loop.call_soon(self._readable)
            return data
        return b"" if self._eof else None

    # -- writing: route each frame, group frames for one destination ---------

    def _route(
        self, buf: bytearray, pos: int, kind: int, rid: int, chan_len: int
    ) -> tuple[str, str, bool] | None:
        """Subject, reply subject and "alone" (a message of its own) for a frame; None: dropped."""
        raise NotImplementedError

    def write(self, data: bytearray, fds: list[int] | None = None) -> bool:
        """Route the frames of ``data`` to their subjects (queued; published by a task).

        Raises:
            PayloadTooLarge: descriptors were passed (they never cross NATS).
        """
        if fds:
            raise PayloadTooLarge("file descriptors and Handles cannot cross NATS")
        if self.closed_with is not None:
            return False
        pos, n = 0, len(data)
        view = memoryview(data)
        chunks: list[memoryview] = []  # of the message being made: runs of frames
        run = 0  # where the frames taken since the last chunk start
        self._size = 0  # bytes of the message being made (to self._subject, self._reply)
        while pos < n:
            end, kind, rid, chan_len = frame_header(data, pos)
            dest = self._route(data, pos, kind, rid, chan_len)
            if dest is None:  # dropped: the run stops before it
                if pos > run:
                    chunks.append(view[run:pos])
                run = end
            else:
                subject, reply, alone = dest
                if self._size and (
                    subject != self._subject
                    or reply != self._reply
                    or self._size + end - pos > self._max
                ):
                    if pos > run:
                        chunks.append(view[run:pos])
                    self._queue(chunks)
                    chunks, run = [], pos
                self._subject, self._reply = subject, reply
                self._size += end - pos
                if alone:
                    chunks.append(view[run:end])
                    self._queue(chunks)
                    chunks, run = [], end
            pos = end
        if self._size:
            if n > run:
                chunks.append(view[run:n])
            self._queue(chunks)
        self._wake.set()
        return False

    def _queue(self, chunks: list[memoryview]) -> None:
        payload = bytes(chunks[0]) if len(chunks) == 1 else b"".join(chunks)
        self._size = 0
        self._outbox.append((self._subject, self._reply, payload))
        self.buffered += len(payload)

    async def _write_messages(self) -> None:
        outbox, nc = self._outbox, self._nc
        while True:
            await self._wake.wait()
            self._wake.clear()
            while outbox:
                subject, reply, payload = outbox.popleft()
                try:
                    await nc.publish(subject, payload, reply=reply)
                except Exception as exc:
                    if nc.is_closed:  # closed for good
                        self._on_error(ConnectionResetError(f"NATS: {exc}"))
                        return
                    self.unsent += 1  # e.g. its buffer is full while it reconnects
                    log.debug("NATS: a message to %s was not sent: %r", subject, exc)
                self.buffered -= len(payload)
                self._drain_waiters.wake(self.buffered)

    async def drain(self, low: int) -> None:
        await self._drain_waiters.wait(low, lambda: self.buffered, lambda: self.closed_with is None)

    def close(self, exc: TetherError) -> None:
        """Stop now; what was queued (a GOODBYE, say) is still published."""
        if self.closed_with is not None:
            return
        self.closed_with = exc
        self._on_readable = self._on_error = _ignore
        self._reading = False
        self._writer.cancel()
        queued, self._outbox = list(self._outbox), collections.deque()
        self.buffered = 0
        self._drain_waiters.fail(exc)
        spawn(self._finish(queued))

    async def _finish(self, queued: list[_Message]) -> None:
        nc = self._nc
        with contextlib.suppress(Exception):
            for subject, reply, payload in queued:
                if not nc.is_closed:
                    await nc.publish(subject, payload, reply=reply)
        await self._closed()

    async def _closed(self) -> None:
        """After :meth:`close` sent what was queued."""


class ClientStream(NatsStream):
    """The client's stream: one peer (role ``main``) for every listener of a namespace.

    Outgoing: an INVOKE to ``NS.h.<channel>`` (one message each, reply
    subject ``NS.p.<I>.r.<rid>.<token>``, the token random per request:
    answers on any other subject are dropped and counted), events to ``NS.e.<channel>``, a CANCEL to
    ``NS.x`` (every listener; the one serving the call cancels it), answers to a
    listener's invokes to ``NS.m.<M>.<I>``, the GOODBYE to ``NS.bye``.
    Incoming (:meth:`on_message`): what listeners send to ``NS.p.<I>.>``;
    their request ids are mapped to ids of this peer (two listeners may use
    the same id at once).
    """

    def __init__(self, nc: Any, namespace: str, cid: str, max_payload: int) -> None:
        super().__init__(nc, max_payload, hello_frame("main", f"nats {namespace}", max_payload - 4))
        ns = self.namespace = namespace
        self.cid = cid
        #: the subject this client reads (``NS.p.<I>.>``)
        self.inbox = f"{ns}.p.{cid}.>"
        self._r = f"{ns}.p.{cid}.r."
        self._e = f"{ns}.p.{cid}.e"
        self._x = f"{ns}.p.{cid}.x"
        self._b = f"{ns}.p.{cid}.b"
        self._main_prefix = f"{ns}.m."
        self._main_suffix = f".{cid}"
        # request id of our invoke (or stream) awaiting its answer -> its channel
        self._calls: dict[int, bytes] = {}
        # ... -> the reply subject it went with (its answers must come on it)
        self._replies: dict[int, str] = {}
        # ... -> the subject of the listener serving it, once it sent something for it
        self._mains: dict[int, str] = {}
        # id of a listener's invoke on our peer -> (its listener's subject, its own id)
        self._served: dict[int, tuple[str, int]] = {}
        self._served_ids: dict[tuple[str, int], int] = {}
        self._next = 0
        self._ev_chan = b"\0"  # (no channel is a NUL) the last event's channel...
        self._ev_dest = ("", "", False)  # ...and its destination
        #: messages or frames from NATS that were not ours to take (dropped, counted)
        self.dropped = 0
        #: the largest frame size field taken (the peer's ``max_frame_size``)
        self.limit = max_payload - 4
        self.finished: asyncio.Future[None] = self._loop.create_future()
        #: the address connected to (named when the NATS server is lost)
        self.where = ""

    def _route(
        self, buf: bytearray, pos: int, kind: int, rid: int, chan_len: int
    ) -> tuple[str, str, bool] | None:
        ns = self.namespace
        if kind == K_EVENT:
            chan = self._ev_chan  # events come in runs on one channel: no copy for those
            if chan_len != len(chan) or not buf.startswith(chan, pos + 20):
                chan = self._ev_chan = bytes(buf[pos + 20 : pos + 20 + chan_len])
                self._ev_dest = f"{ns}.e.{channel_token(chan)}", self._e, False
            return self._ev_dest
        if kind in (K_INVOKE, K_STREAM):
            if not self._nc.is_connected:  # reconnecting: fail it now, not at its timeout
                self.feed(error_frame(rid, "closed", self.lost_server()))
                return None
            chan = bytes(buf[pos + 20 : pos + 20 + chan_len])
            self._calls[rid] = chan
            # unguessable: only who reads NS.h.<channel> or our inbox can answer
            reply = self._replies[rid] = f"{self._r}{rid}.{secrets.token_hex(8)}"
            # a STREAM's first CREDIT follows it in its message (see below)
            return f"{ns}.h.{channel_token(chan)}", reply, kind == K_INVOKE
        if kind in (K_CANCEL, K_CREDIT):
            if rid not in self._calls:
                return None  # answered already
            main = self._mains.pop(rid, "") if kind == K_CANCEL else self._mains.get(rid, "")
            sent_with = self._replies.get(rid)
            if kind == K_CANCEL:
                del self._calls[rid]
                self._replies.pop(rid, None)
            if main:  # the listener serving it is known
                return main, "", False
            if self._size and self._reply == sent_with:
                return self._subject, self._reply, False  # with the STREAM it is for
            # Not known yet (it sent nothing for the call): every listener
            # hears it, the one serving (I, rid) takes it.
            return f"{ns}.x", self._x, False
        if kind in (K_RESULT, K_ERROR, K_ITEM):
            served = self._served.get(rid)
            if served is None:
                return None
            if kind != K_ITEM:
                del self._served[rid]
                del self._served_ids[served]
            set_request_id(buf, pos, served[1])
            return served[0], "", False
        if kind == K_GOODBYE:
            return f"{ns}.bye", self._b, True
        if kind == _K_ROUTE_OPEN:
            self.feed(error_frame(rid, "route_closed", "routes do not cross NATS"))
        return None  # HELLO (fixed profile), PING, ROUTE_CLOSE: not over NATS

    def lost_server(self) -> str:
        """Why a call made while the NATS link is down fails (``PeerGone``)."""
        return f"{self.where or self.namespace}: lost the NATS server; reconnecting"

    def on_message(self, msg: Any) -> None:
        """A message on ``NS.p.<I>.>``: a listener's answers, invokes, events; or a status."""
        data = msg.data
        if not data:
            headers = msg.headers
            if headers and headers.get("Status") == NO_RESPONDERS:
                self._no_responders(msg.subject)
            return
        frames = frames_of(data, self.limit)
        if frames is None:
            self.dropped += 1
            return
        subject = msg.subject
        main = msg.reply or ""
        if not (main.startswith(self._main_prefix) and main.endswith(self._main_suffix)):
            main = ""
        buf: bytearray | None = None
        keep: list[tuple[int, int]] = []
        for start, end, kind, rid, _ in frames:
            if kind == K_EVENT:
                pass
            elif kind in (K_RESULT, K_ERROR, K_ITEM) and self._replies.get(rid) != subject:
                self.dropped += 1  # not on the reply subject of that request: forged or late
                continue
            elif kind in (K_RESULT, K_ERROR):
                self._calls.pop(rid, None)
                self._mains.pop(rid, None)
                del self._replies[rid]
            elif kind == K_ITEM:
                if main and rid in self._calls:
                    self._mains[rid] = main  # where its CREDITs and CANCEL go
            elif (kind in (K_INVOKE, K_STREAM)) and main and (main, rid) not in self._served_ids:
                buf = buf if buf is not None else bytearray(data)
                set_request_id(buf, start, self._local_id(main, rid))
            elif (
                (kind in (K_CANCEL, K_CREDIT))
                and main
                and (local := self._served_ids.get((main, rid), 0))
            ):
                if kind == K_CANCEL:
                    del self._served[local]
                    del self._served_ids[(main, rid)]
                buf = buf if buf is not None else bytearray(data)
                set_request_id(buf, start, local)
            else:
                self.dropped += 1
                continue
            keep.append((start, end))
        if len(keep) == len(frames):
            ok = self.offer(data if buf is None else buf)
        elif keep:
            src = data if buf is None else buf
            ok = self.offer(b"".join(src[s:e] for s, e in keep))
        else:
            return
        if not ok:
            self.dropped += 1  # our peer left too much unread

    def on_event(self, msg: Any) -> None:
        """A message on ``NS.events``: EVENT frames for every client."""
        frames = frames_of(msg.data, self.limit)
        if frames is None or any(kind != K_EVENT for _, _, kind, _, _ in frames):
            self.dropped += 1
            return
        if not self.offer(msg.data):
            self.dropped += 1  # our peer left too much unread

    def _no_responders(self, subject: str) -> None:
        if not subject.startswith(self._r):
            return  # an event, a cancel or the goodbye nobody took: nothing waits for it
        try:
            rid = int(subject[len(self._r) :].partition(".")[0])
        except ValueError:
            return
        if self._replies.get(rid) != subject:
            self.dropped += 1  # not the reply subject of that request: forged
            return
        del self._replies[rid]
        call = self._calls.pop(rid, None)
        if call is not None and rid not in self._mains:
            channel = call.decode("utf-8", "replace")
            self.feed(
                error_frame(
                    rid,
                    "no_handler",
                    f"no main on NATS namespace {self.namespace!r} handles {channel!r} "
                    "(NATS: no responders)",
                )
            )

    def _local_id(self, main: str, rid: int) -> int:
        key = (main, rid)
        old = self._served_ids.get(key)
        if old is not None:  # the listener reused an id still served: its business
            return old
        n = self._next
        while True:
            n = (n + 1) & _U32 or 1
            if n not in self._served:
                break
        self._next = n
        self._served[n] = key
        self._served_ids[key] = n
        return n

    async def _closed(self) -> None:
        nc = self._nc
        with contextlib.suppress(Exception):
            await nc.flush(2)
        with contextlib.suppress(Exception):
            await nc.close()
        if not self.finished.done():
            self.finished.set_result(None)


class ServerStream(NatsStream):
    """A listener's stream for one client ``I``: its peer has the listener's role.

    Outgoing: answers to the reply subject each invoke came with (recorded
    by the listener in :attr:`replies`), everything else (events, invokes
    back to the client, their cancels) to ``NS.p.<I>.f``; every message
    says ``NS.m.<M>.<I>`` as its reply subject, so the client learns where
    this listener reads.
    """

    #: ``Main.broadcast`` reaches this client through its listener's ``fanout`` (``NS.events``)
    fanout = True

    def __init__(self, nc: Any, namespace: str, mid: str, cid: str, max_payload: int) -> None:
        super().__init__(nc, max_payload, hello_frame("client", cid, max_payload - 4))
        self.cid = cid
        #: request id of an invoke being served -> the reply subject of its message
        self.replies: dict[int, str] = {}
        self._to = f"{namespace}.p.{cid}.f"
        self._me = f"{namespace}.m.{mid}.{cid}"
        #: loop time of the last message to or from this client
        self.last = self._loop.time()

    def _route(
        self, buf: bytearray, pos: int, kind: int, rid: int, chan_len: int
    ) -> tuple[str, str, bool] | None:
        if kind in (K_RESULT, K_ERROR, K_ITEM):
            reply = self.replies.pop(rid, None) if kind != K_ITEM else self.replies.get(rid)
            return None if reply is None else (reply, self._me, False)
        if kind in _TO_CLIENT:
            self.last = self._loop.time()
            return self._to, self._me, False
        if kind == K_GOODBYE and self.replies:  # closing while serving: the callers learn it
            for rid, reply in self.replies.items():
                payload = error_frame(rid, "closed", "the main serving the call closed")
                self._outbox.append((reply, self._me, payload))
                self.buffered += len(payload)
            self.replies.clear()
        if kind == _K_ROUTE_OPEN:
            self.feed(error_frame(rid, "route_closed", "routes do not cross NATS"))
        return None  # HELLO, GOODBYE (the client learns nothing from it), PING...

    def close(self, exc: TetherError) -> None:
        """Stop now; each invoke still served is answered ERROR ``closed`` (``PeerGone``
        for its caller, at once: an ended peer sends no GOODBYE, and one would
        speak for every listener)."""
        if self.closed_with is None and self.replies:
            for rid, reply in self.replies.items():
                payload = error_frame(rid, "closed", f"the main serving the call dropped it: {exc}")
                self._outbox.append((reply, self._me, payload))
            self.replies.clear()
        super().close(exc)

    @property
    def busy(self) -> bool:
        """Whether invokes of the client are being served here."""
        return bool(self.replies)
