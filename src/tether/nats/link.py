"""``nats://`` listeners and clients: tether's verbs carried by a NATS server, per channel.

Subjects, under the address's namespace ``NS`` (``nats://host:4222/NS``,
default ``tether``; docs/protocol.md 1.2 is the full table):

- ``NS.h.<channel>``: invokes of a channel. Each listener subscribes, in the
  queue group ``NS``, one subject per channel its main handles, so every
  invoke goes to one of the processes that handle its channel (load is
  shared per invoke) and NATS answers "no responders" at once when none does.
- ``NS.e.<channel>``: a client's events, to every listener.
- ``NS.events``: a listener's events to every client (:meth:`NatsServer.send`).
- ``NS.p.<I>.>``: client ``I``'s inbox (answers, and what a handler's
  ``call.peer`` sends it); ``NS.m.<M>.<I>``: listener ``M``'s subject for
  what client ``I`` answers it; ``NS.x``: cancels; ``NS.bye``: a client left;
  ``NS.hello``: a connecting client's check that some main listens.

The messages are tether frames, so every error type, cancel and timeout
works as on a socket. Credentials come from the address
(``nats://user:password@host``, ``nats://token@host``) or its query
(``?creds=/path/user.creds``, ``?nkey=/path/seed.nk``; these two need the
``nkeys`` package); TLS from ``ssl=``.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import os
import secrets
import ssl as _ssl
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Final
from urllib.parse import parse_qs, unquote, urlsplit

import msgspec

from ..errors import ConnectError, PayloadTooLarge, PeerGone
from ..identity import NO_CREDENTIALS
from ..wire import (
    HEADER_SIZE,
    K_CANCEL,
    K_CREDIT,
    K_ERROR,
    K_EVENT,
    K_INVOKE,
    K_ITEM,
    K_RESULT,
    K_STREAM,
    Kind,
    encode_frame,
    frame_header,
)
from .listing import answer as _answer_list
from .stream import (
    NO_RESPONDERS,
    ClientStream,
    ServerStream,
    channel_token,
    error_frame,
    flushed,
    frame_ok,
    frames_of,
    spawn,
)

if TYPE_CHECKING:
    from ..aio.main import Main
    from ..aio.peer import Peer

__all__ = ["NatsAddress", "NatsServer", "connect_nats", "listen_nats", "parse_nats_address"]

DEFAULT_NAMESPACE: Final = "tether"
#: the role of peers reached over NATS, unless ``listen(role=...)`` names another
DEFAULT_ROLE: Final = "nats"
#: seconds a closed listener waits for its peers to close before it closes its NATS link
CLOSE_WAIT: Final = 10.0
#: default :attr:`NatsServer.idle_timeout`: seconds a client with nothing in flight is kept
IDLE_TIMEOUT: Final = 300.0
#: default :attr:`NatsServer.max_clients`: clients one listener keeps a peer for at once
MAX_CLIENTS: Final = 4096
#: seconds newcomers are refused without a look after a look found every client busy
EVICT_HOLDOFF: Final = 0.1
_ID_CHARS: Final = frozenset("0123456789abcdef")
#: what a PayloadTooLarge says to do when the NATS server's max_payload is the limit
TOO_LARGE_HINT: Final = "max_payload: raise it in the NATS server's configuration"
#: what a client sends a listener on ``NS.m.<M>.<I>``
_FROM_CLIENT: Final = frozenset((K_RESULT, K_ERROR, K_CANCEL, K_CREDIT, K_ITEM))
#: what a client sends on ``NS.x`` (to whichever listener serves the request)
_UNSURE: Final = frozenset((K_CANCEL, K_CREDIT))

log = logging.getLogger("tether")
_TOKEN_CHARS: Final = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_-")


@dataclass(frozen=True)
class NatsAddress:
    """A parsed ``nats://`` address: the server, the namespace, the credentials."""

    server: str  # nats://host:port, credentials left out
    namespace: str
    options: dict[str, Any]

    def __str__(self) -> str:
        return f"{self.server}/{self.namespace}"


def parse_nats_address(address: str) -> NatsAddress:
    """Split ``nats://[user:password@|token@]host:port[/namespace][?creds=...|?nkey=...]``.

    Raises:
        ValueError: no port, a namespace that is not dot-separated tokens of
            letters, digits, ``_`` and ``-``, or an unknown query key.
    """
    parts = urlsplit(address)
    if parts.scheme != "nats":
        raise ValueError(f"not a nats:// address: {address!r}")
    try:
        port = parts.port
    except ValueError as exc:
        raise ValueError(f"bad port in {address!r}") from exc
    host = parts.hostname or "127.0.0.1"
    shown = f"[{host}]" if ":" in host else host
    ns = parts.path.strip("/") or DEFAULT_NAMESPACE
    if not all(tok and set(tok) <= _TOKEN_CHARS for tok in ns.split(".")):
        raise ValueError(f"bad NATS namespace {ns!r}: dot-separated letters, digits, _ and -")
    options: dict[str, Any] = {}
    if parts.username is not None and parts.password is not None:
        options["user"] = unquote(parts.username)
        options["password"] = unquote(parts.password)
    elif parts.username is not None:
        options["token"] = unquote(parts.username)
    for key, values in parse_qs(parts.query, strict_parsing=False).items():
        if key == "creds":
            options["user_credentials"] = values[-1]
        elif key == "nkey":
            options["nkeys_seed"] = values[-1]
        else:
            raise ValueError(f"unknown option {key!r} in {address!r} (creds=, nkey=)")
    return NatsAddress(f"nats://{shown}:{port or 4222}", ns, options)


def _need_nats(addr: NatsAddress | None = None) -> None:
    """Raise ImportError naming what to install when nats-py (or nkeys, for
    ``?creds=``/``?nkey=``) is missing, rather than a bare ModuleNotFoundError."""
    for module, why in (
        ("nats", "nats:// needs the nats-py package: pip install 'tether-ipc[nats]'"),
        (
            "nkeys",
            "nats:// ?creds= and ?nkey= need the nkeys package: pip install 'nats-py[nkeys]'",
        ),
    ):
        if module == "nkeys" and not (
            addr and ("user_credentials" in addr.options or "nkeys_seed" in addr.options)
        ):
            continue
        try:
            __import__(module)
        except ModuleNotFoundError as exc:
            if (exc.name or "").partition(".")[0] != module:
                raise
            raise ImportError(why) from exc


async def _nats_connect(
    addr: NatsAddress,
    ssl: _ssl.SSLContext | None,
    timeout: float,
    name: str,
    on_disconnect: Callable[[], None],
    on_closed: Callable[[], None],
) -> Any:
    """A NATS client connection that reconnects for ever (a failed first connect raises).

    Raises:
        ConnectError: the first attempt failed (its cause named: refused,
            credentials, TLS), or no answer within ``timeout`` (at least 1 s).
        ImportError: nats-py, or nkeys for ``?creds=``/``?nkey=``, is missing.
    """
    _need_nats(addr)
    import nats

    loop = asyncio.get_running_loop()
    failed: asyncio.Future[BaseException] = loop.create_future()

    async def disconnected() -> None:
        on_disconnect()

    async def closed() -> None:
        on_closed()

    async def first_error(exc: Exception) -> None:
        # The first connect's failure ends it at once (nats-py would retry);
        # once in, reconnect attempts fail while the server is away: expected.
        if not failed.done():
            failed.set_result(exc)

    seconds = max(1, int(timeout + 0.999))
    task = loop.create_task(
        nats.connect(
            servers=[addr.server],
            name=name,
            connect_timeout=seconds,
            allow_reconnect=False,
            max_reconnect_attempts=-1,
            reconnect_time_wait=0.5,
            tls=ssl,
            tls_hostname=None,
            disconnected_cb=disconnected,
            closed_cb=closed,
            error_cb=first_error,
            **addr.options,
        )
    )
    try:
        either: list[asyncio.Future[Any]] = [task, failed]
        await asyncio.wait(either, timeout=seconds + 1, return_when=asyncio.FIRST_COMPLETED)
    finally:
        if not task.done():
            task.cancel()
        await asyncio.wait([task])  # (it ends at its next await once cancelled)
    if task.cancelled() or task.exception() is not None:
        cause = failed.result() if failed.done() else None
        if cause is None and not task.cancelled():
            cause = task.exception()
        if isinstance(cause, OSError) and cause.errno:  # "Connection refused", not the call
            why = os.strerror(cause.errno)
        elif cause is not None:
            why = str(cause) or type(cause).__name__
        else:
            why = f"no answer within {seconds + 1} s"
        raise ConnectError(f"cannot connect to {addr}: {why}", address=str(addr)) from cause
    failed.cancel()  # (first_error is quiet from now on)
    nc = task.result()
    nc.options["allow_reconnect"] = True
    return nc


def _credits(frames: list[tuple[int, int, int, int, int]], rid: int, kind: int) -> bool:
    """Whether the frames after a STREAM are CREDITs for it (all a client puts there)."""
    return kind == K_STREAM and all(f[2] == K_CREDIT and f[3] == rid for f in frames[1:])


def _is_id(text: str) -> bool:
    """A client or listener id: 16 lowercase hex digits (what tether makes)."""
    return len(text) == 16 and set(text) <= _ID_CHARS


class NatsServer:
    """A ``nats://`` listener of a :class:`~tether.Main` (what :meth:`Main.listen` returns).

    It keeps one :class:`~tether.Peer` per client ``I`` it has heard from
    (made at its first message, with this listener's role, never local), so
    a handler's ``call.peer`` reaches the caller. A peer is dropped when its
    client says goodbye, when a message to it finds no responders (the
    client is gone), or after :attr:`idle_timeout` seconds with nothing in
    flight; at most :attr:`max_clients` are kept (past it, the longest idle
    is dropped, or the newcomer refused with ``Busy``).

    Attributes:
        url: the address listened on (``nats://host:port/namespace``).
        role: the role of every client that reaches it.
        idle_timeout: seconds a client with nothing in flight is kept.
        max_clients: clients kept at once.
        refused: messages of clients refused (``max_clients`` reached, or closing).
        dropped: messages that were not well-formed tether messages (counted,
            logged at most ten times a second): a stranger's garbage.
        too_large: invokes larger than main's ``max_frame_size`` (answered ``too_large``).
    """

    def __init__(self, main: Main, addr: NatsAddress, role: str, nc: Any) -> None:
        self.main = main
        self.address = addr
        self.url = str(addr)
        self.role = role
        self.refused = 0
        self.dropped = 0
        self.too_large = 0
        self._idle_timeout = IDLE_TIMEOUT
        self.max_clients = MAX_CLIENTS
        self.nc = nc
        self._id = secrets.token_hex(8)
        ns = addr.namespace
        self._h = f"{ns}.h."
        self._e = f"{ns}.e."
        self._p = f"{ns}.p."
        # least recently heard from first (each message moves its client last)
        self._clients: collections.OrderedDict[str, tuple[ServerStream, Peer]] = (
            collections.OrderedDict()
        )
        self._all_busy_at = -EVICT_HOLDOFF  # loop time of the last look that found none idle
        self._heads: dict[str, str] = {}  # "NS.p.<I>.r" -> I, for clients kept
        self._channels: dict[str, Any] = {}  # channel -> its NS.h subscription
        self._subs: list[Any] = []
        self._closed = False
        self._name = f"{role}@{addr}"
        self._loop = asyncio.get_running_loop()
        self._resync: asyncio.Task[None] | None = None
        self._sync_lock = asyncio.Lock()
        self._sweeper: asyncio.TimerHandle | None = None
        self._warned_at = 0.0
        self._warned = 0

    @property
    def idle_timeout(self) -> float:
        """Seconds a client with nothing in flight is kept (then its peer is dropped)."""
        return self._idle_timeout

    @idle_timeout.setter
    def idle_timeout(self, seconds: float) -> None:
        if not seconds > 0:
            raise ValueError(f"idle_timeout must be a positive number of seconds, not {seconds!r}")
        self._idle_timeout = float(seconds)
        if self._sweeper is not None:  # the next sweep comes on the new period
            self._sweeper.cancel()
            self._arm_sweep()

    @property
    def peers(self) -> list[Peer]:
        """The peers of the clients this listener keeps."""
        return [p for _, p in self._clients.values() if not p.closed]

    def fileno(self) -> int:
        return -1

    async def _start(self) -> None:
        ns, nc = self.address.namespace, self.nc
        for channel in list(self.main.registry.invokes):
            await self._subscribe(channel)
        self.main.registry.watchers.append(self._watch)

        def cb(fn: Callable[[Any], None]) -> Callable[[Any], Any]:
            async def run(msg: Any) -> None:
                fn(msg)

            return run

        async def listing(msg: Any) -> None:  # every listener answers (tether.nats.listing)
            await _answer_list(self, msg)

        self._subs = [
            await nc.subscribe(f"{ns}.e.>", cb=cb(self._on_event)),
            await nc.subscribe(f"{ns}.m.{self._id}.*", cb=cb(self._on_direct)),
            await nc.subscribe(f"{ns}.x", cb=cb(self._on_cancel)),
            await nc.subscribe(f"{ns}.bye", cb=cb(self._on_bye)),
            await nc.subscribe(f"{ns}.list", cb=listing),
            # last: a client that got an answer here finds every channel subscribed
            await nc.subscribe(f"{ns}.hello", queue=ns, cb=self._on_hello),
        ]
        await flushed(nc)
        self._arm_sweep()

    # -- following the main's handlers ---------------------------------------

    async def _subscribe(self, channel: str) -> None:
        ns = self.address.namespace
        chan = channel.encode()
        subject = self._h + channel_token(chan)

        async def invoke(msg: Any) -> None:
            await self._on_invoke(msg, subject, chan)

        self._channels[channel] = await self.nc.subscribe(subject, queue=ns, cb=invoke)

    def _watch(self, channel: str) -> None:
        """A handler was added or removed (registry watcher): follow it soon."""
        if self._resync is None and not self._closed:
            with contextlib.suppress(RuntimeError):  # the loop is gone: nothing to follow
                self._loop.call_soon_threadsafe(self._start_sync)

    def _start_sync(self) -> None:
        if self._resync is None and not self._closed:
            self._resync = self._loop.create_task(self.sync())

    async def sync(self) -> None:
        """Subscribe the channels handled since, drop those removed; return once the
        NATS server has it (handlers added after ``listen`` are followed by
        themselves; await this to know they are reachable)."""
        try:
            async with self._sync_lock:  # one at a time: a second saw a half-done first
                await self._sync()
        finally:
            if self._resync is asyncio.current_task():
                self._resync = None

    async def _sync(self) -> None:
        while not self._closed:
            want = set(self.main.registry.invokes)
            have = set(self._channels)
            if want == have:
                break
            for channel in want - have:
                await self._subscribe(channel)
            for channel in have - want:
                with contextlib.suppress(Exception):
                    await self._channels.pop(channel).unsubscribe()
        if not self.nc.is_closed:
            await flushed(self.nc)

    # -- messages in -----------------------------------------------------------

    def _bad(self, what: str, subject: str) -> None:
        self.dropped += 1
        now = self._loop.time()
        if now - self._warned_at >= 1.0:
            self._warned_at, self._warned = now, 0
        self._warned += 1
        if self._warned <= 10:
            log.warning("%r: dropped a malformed %s on %s", self, what, subject)

    def _caller(self, reply: str | None, kind: str) -> tuple[str, int] | None:
        """Client id (and request id, for ``r``) of a reply subject
        ``NS.p.<I>.<kind>`` or ``NS.p.<I>.r.<rid>.<token>`` (the token is the client's
        to check; here it is 16 hex digits)."""
        if not reply:
            return None
        if kind == "r":  # the common case: one client's prefix seen before
            head, _, token = reply.rpartition(".")
            head, _, rid = head.rpartition(".")
            cid = self._heads.get(head)
            if cid is not None and rid.isdigit() and len(rid) <= 10 and _is_id(token):
                return cid, int(rid)
        if not reply.startswith(self._p):
            return None
        parts = reply[len(self._p) :].split(".")
        if not _is_id(parts[0]) or len(parts) < 2 or parts[1] != kind:
            return None
        if kind != "r":
            return (parts[0], 0) if len(parts) == 2 else None
        if len(parts) != 4 or not parts[2].isdigit() or len(parts[2]) > 10 or not _is_id(parts[3]):
            return None
        if parts[0] in self._clients:  # (so the cache holds no more than the clients)
            if len(self._heads) >= self.max_clients:
                self._heads.clear()
            self._heads[f"{self._p}{parts[0]}.r"] = parts[0]
        return parts[0], int(parts[2])

    async def _on_hello(self, msg: Any) -> None:
        if not self._closed and msg.reply:
            with contextlib.suppress(Exception):
                await msg.respond(b"")

    async def _on_invoke(self, msg: Any, subject: str, channel: bytes) -> None:
        data = msg.data
        caller = self._caller(msg.reply, "r")
        frames = frames_of(data)
        if caller is None or frames is None:
            self._bad("invoke", subject)
            return
        cid, rid = caller
        _, _, kind, frame_rid, chan_len = frames[0]
        if (
            (kind != K_INVOKE and kind != K_STREAM)
            or not rid
            or frame_rid != rid
            or chan_len != len(channel)  # the channel of the subject it came on
            or not data.startswith(channel, 20)
            # a STREAM's first CREDIT may follow it
            or (len(frames) > 1 and not _credits(frames, rid, kind))
        ):
            self._bad("invoke", subject)
            return
        if frames[0][1] - 4 > self._max():  # under max_payload, over main's max_frame_size
            self.too_large += 1
            what = channel.decode("utf-8", "replace")
            why = (
                f"{self!r}: a frame of {frames[0][1] - 4} bytes on {what!r} exceeds this "
                f"main's max_frame_size of {self._max()} bytes"
            )
            with contextlib.suppress(Exception):
                await self.nc.publish(msg.reply, error_frame(rid, "too_large", why))
            return
        stream = self._client(cid)
        if stream is None:
            with contextlib.suppress(Exception):
                await self.nc.publish(
                    msg.reply, error_frame(rid, "busy", f"{self!r} takes no more clients")
                )
            return
        if rid in stream.replies:  # the id of a call still served: not that client's
            self._bad("invoke (request id in use)", subject)
            return
        stream.replies[rid] = msg.reply
        stream.last = self._loop.time()
        if not stream.offer(data):  # its peer left too much unread: refused
            del stream.replies[rid]
            self.refused += 1
            why = f"{self!r}: too much from this client waits unread"
            with contextlib.suppress(Exception):
                await self.nc.publish(msg.reply, error_frame(rid, "busy", why))

    def _on_event(self, msg: Any) -> None:
        data, subject = msg.data, msg.subject
        caller = self._caller(msg.reply, "e")
        pos, n = 0, len(data)
        chan = b"\0"
        limit = self._max()
        while pos < n:  # whole EVENT frames, all of the channel of the subject
            if n - pos < HEADER_SIZE:
                break
            end, kind, _, chan_len = frame_header(data, pos)
            if kind != K_EVENT or end > n or end - pos < HEADER_SIZE + chan_len:
                break
            if chan_len != len(chan) or not data.startswith(chan, pos + HEADER_SIZE):
                if not frame_ok(data, pos, end, kind, chan_len, limit):
                    break
                chan = bytes(data[pos + HEADER_SIZE : pos + HEADER_SIZE + chan_len])
                if self._e + channel_token(chan) != subject:
                    break
            elif (end - pos - 4 > limit or data[pos + 16] or data[pos + 17]) and not frame_ok(
                data, pos, end, kind, chan_len, limit
            ):
                break  # (a channel seen in this message is valid UTF-8: the rest is checked)
            pos = end
        if caller is None or pos != n or not n:
            self._bad("event", subject)
            return
        stream = self._client(caller[0])
        if stream is not None:
            stream.last = self._loop.time()
            if not stream.offer(data):  # its peer left too much unread: dropped
                self.refused += 1

    def _on_direct(self, msg: Any) -> None:
        cid = msg.subject.rpartition(".")[2]
        entry = self._clients.get(cid)
        data = msg.data
        if not data:
            headers = msg.headers
            if entry is not None and headers and headers.get("Status") == NO_RESPONDERS:
                entry[1].abort(PeerGone(f"{entry[1]!r}: the client is gone (NATS: no responders)"))
            return
        frames = frames_of(data, self._max())
        if frames is None or any(f[2] not in _FROM_CLIENT for f in frames):
            self._bad("answer", msg.subject)
            return
        if entry is None:
            return  # dropped meanwhile: nobody waits for it
        stream = entry[0]
        for f in frames:
            if f[2] == K_CANCEL:
                stream.replies.pop(f[3], None)  # no answer is owed any more
        stream.last = self._loop.time()
        if not stream.offer(data):
            self.refused += 1

    def _on_cancel(self, msg: Any) -> None:
        caller = self._caller(msg.reply, "x")
        frames = frames_of(msg.data, self._max())
        if caller is None or frames is None or any(f[2] not in _UNSURE for f in frames):
            self._bad("cancel", msg.subject)
            return
        entry = self._clients.get(caller[0])
        if entry is None:
            return
        replies = entry[0].replies
        mine = [
            f
            for f in frames
            if (replies.pop(f[3], None) if f[2] == K_CANCEL else replies.get(f[3])) is not None
        ]
        if mine and not entry[0].offer(b"".join(msg.data[f[0] : f[1]] for f in mine)):
            self.refused += 1  # (mine: the calls this listener serves; all hear every cancel)

    def _on_bye(self, msg: Any) -> None:
        caller = self._caller(msg.reply, "b")
        if caller is None:
            self._bad("goodbye", msg.subject)
            return
        entry = self._clients.get(caller[0])
        if entry is not None:
            entry[1].abort(PeerGone(f"{entry[1]!r} said goodbye"))

    # -- the clients' peers ----------------------------------------------------

    def _client(self, cid: str) -> ServerStream | None:
        """The stream of client ``cid``, made (with its peer) at its first message."""
        entry = self._clients.get(cid)
        if entry is not None:
            self._clients.move_to_end(cid)
            return entry[0]
        main = self.main
        if self._closed or main._closing:
            self.refused += 1
            return None
        if len(self._clients) >= self.max_clients and not self._evict():
            self.refused += 1
            if (
                self.refused & (self.refused - 1) == 0
            ):  # 1, 2, 4, 8...: a flood is not a flood of lines
                log.warning(
                    "%r: %d clients kept already; refused %d", self, self.max_clients, self.refused
                )
            return None
        from ..aio.peer import Peer

        ns = self.address.namespace
        stream = ServerStream(self.nc, ns, self._id, cid, int(self.nc.max_payload))
        kw = main._peer_kw(self.role, f"{self._name}#{cid}", child=False)
        kw["max_frame_size"] = self._max()
        forget = kw["on_close"]

        def closed(peer: Peer) -> None:
            if self._clients.get(cid, (None, None))[1] is peer:
                del self._clients[cid]
            forget(peer)

        kw["on_close"] = closed
        peer = Peer(
            stream,
            **kw,
            credentials=NO_CREDENTIALS,
            address=f"{self.address}#{cid}",
            local=False,
            initiator=False,
        )
        if kw["max_frame_size"] == int(self.nc.max_payload) - 4:
            peer._conn.too_large_hint = TOO_LARGE_HINT
        self._clients[cid] = (stream, peer)
        main.peers.add(peer)
        peer.start()
        return stream

    @staticmethod
    def _idle(stream: ServerStream, peer: Peer) -> bool:
        """Nothing in flight: no invoke served, none of main's calls to it, no listener running."""
        return not stream.busy and not peer._conn.pending and not peer._tasks

    def _evict(self) -> bool:
        """Drop the idle client least recently heard from; False if none is idle.

        Busy clients met on the way go last, so a flood of newcomers costs
        little each while some client is idle; after a look found none, the
        next is :data:`EVICT_HOLDOFF` seconds away.
        """
        now = self._loop.time()
        if now - self._all_busy_at < EVICT_HOLDOFF:
            return False
        clients = self._clients
        for _ in range(len(clients)):
            cid = next(iter(clients))
            stream, peer = clients[cid]
            if self._idle(stream, peer):
                peer.abort(PeerGone(f"{peer!r} dropped: {self.max_clients} clients kept"))
                clients.pop(cid, None)  # (its on_close did already)
                return True
            clients.move_to_end(cid)
        self._all_busy_at = now
        return False

    def _arm_sweep(self) -> None:
        if not self._closed:
            period = max(0.05, min(self.idle_timeout / 2, 30.0))
            self._sweeper = self._loop.call_later(period, self._sweep)

    def _sweep(self) -> None:
        """Drop the clients idle for ``idle_timeout`` (one that vanished says no goodbye)."""
        now = self._loop.time()
        for stream, peer in list(self._clients.values()):
            if now - stream.last > self.idle_timeout and self._idle(stream, peer):
                peer.abort(PeerGone(f"{peer!r} idle for {self.idle_timeout} s; dropped"))
        self._arm_sweep()

    # -- main's own messages ---------------------------------------------------

    async def send(self, channel: str, *args: Any) -> None:
        """One event to every client of the namespace, as one NATS message (``NS.events``).

        Every client gets it, whichever listeners it has reached; the server
        copies it to each, so the cost does not grow with the clients.

        Raises:
            PayloadTooLarge: the event is larger than the server's ``max_payload``.
            TypeError: ``channel`` is not a str, or an argument cannot be encoded.
        """
        if type(channel) is not str:
            raise TypeError(f"channel must be a str, not {type(channel).__name__}")
        out = bytearray()
        body = msgspec.msgpack.encode(args)
        limit = self._max()
        try:
            encode_frame(out, Kind.EVENT, 0, 0, channel.encode(), body, max_frame_size=limit)
        except PayloadTooLarge as exc:
            if limit != int(self.nc.max_payload) - 4:
                raise
            raise PayloadTooLarge(f"{exc} ({TOO_LARGE_HINT})") from None
        await self.nc.publish(f"{self.address.namespace}.events", bytes(out))

    async def fanout(self, channel: str, args: tuple[Any, ...]) -> int:
        """``Main.broadcast``'s part for this namespace: :meth:`send`; returns 1.

        One message reaches every client of the namespace, and NATS does not
        say how many there are (nor does this listener know: it keeps only
        the clients it heard from), so the namespace counts as one.

        Raises:
            PeerGone: the NATS connection is closed (nothing was sent).
        """
        if self.nc.is_closed:
            raise PeerGone(f"{self!r}: the NATS connection closed")
        await self.send(channel, *args)
        return 1

    def _max(self) -> int:
        return min(self.main.max_frame_size, int(self.nc.max_payload) - 4)

    def _server_closed(self) -> None:
        for _, peer in list(self._clients.values()):
            peer.abort(PeerGone(f"{self!r}: the NATS connection closed"))

    def close(self) -> None:
        """Leave the queue groups at once (invokes go to the other listeners); the
        clients' peers stay until they close (``Main.close`` closes them)."""
        if self._closed:
            return
        self._closed = True
        if self._sweeper is not None:
            self._sweeper.cancel()
        with contextlib.suppress(ValueError):
            self.main.registry.watchers.remove(self._watch)
        spawn(self._shutdown())

    async def _shutdown(self) -> None:
        subs = [*self._channels.values(), self._subs[-1]] if self._subs else []
        self._channels.clear()
        for sub in subs:
            with contextlib.suppress(Exception):
                await sub.unsubscribe()
        with contextlib.suppress(Exception):
            await self.nc.flush(2)
        held = [peer.wait_closed() for _, peer in self._clients.values()]
        if held:
            await asyncio.wait([asyncio.ensure_future(w) for w in held], timeout=CLOSE_WAIT)
        self._server_closed()
        await self.nc.close()

    async def wait_closed(self) -> None:
        """Wait until the NATS link is closed (after :meth:`close`; within ``CLOSE_WAIT`` s)."""
        deadline = self._loop.time() + CLOSE_WAIT + 5
        while not self.nc.is_closed and self._loop.time() < deadline:
            await asyncio.sleep(0.01)

    def __repr__(self) -> str:
        return f"<NatsServer {self.url} role={self.role!r}>"


async def listen_nats(
    main: Main, address: str, *, role: str | None, ssl: _ssl.SSLContext | None
) -> NatsServer:
    """Serve ``main``'s handlers on a NATS namespace (see :meth:`tether.Main.listen`)."""
    _need_nats()
    addr = parse_nats_address(address)
    holder: list[NatsServer] = []

    def closed() -> None:
        if holder:
            holder[0]._server_closed()

    nc = await _nats_connect(addr, ssl, 10.0, f"tether main {addr}", lambda: None, closed)
    server = NatsServer(main, addr, role or DEFAULT_ROLE, nc)
    holder.append(server)
    try:
        await server._start()
    except BaseException:
        server.close()
        await nc.close()
        raise
    main.servers.append(server)  # type: ignore[arg-type]
    return server


async def connect_nats(address: str, kw: dict[str, Any]) -> Peer:
    """A peer for every main listening on the address's namespace (role ``main``).

    Raises:
        ConnectError: the NATS server cannot be reached or refused us
            (credentials, TLS), or no main listens on the namespace (NATS
            answered "no responders" to ``NS.hello``: at once, not after a timeout).
    """
    _need_nats()
    from nats.errors import NoRespondersError
    from nats.errors import TimeoutError as NatsTimeout

    from .client import NatsClientPeer

    kw = dict(kw)
    connect_timeout = kw.pop("connect_timeout")
    ssl = kw.pop("ssl")
    if kw.pop("secret") is not None:
        raise ValueError("secret= is not for nats:// (use the NATS server's credentials)")
    addr = parse_nats_address(address)
    ns = addr.namespace
    holder: list[Peer] = []

    def disconnected() -> None:
        if holder:
            holder[0].fail_calls(PeerGone(f"{addr}: lost the NATS server"))

    def closed() -> None:
        if holder:
            holder[0].abort(PeerGone(f"{addr}: the NATS connection closed"))

    nc = await _nats_connect(addr, ssl, connect_timeout, "tether client", disconnected, closed)
    stream: ClientStream | None = None
    try:
        stream = ClientStream(nc, ns, secrets.token_hex(8), int(nc.max_payload))
        stream.where = str(addr)

        async def inbox(msg: Any) -> None:
            stream.on_message(msg)

        async def events(msg: Any) -> None:
            stream.on_event(msg)

        await nc.subscribe(stream.inbox, cb=inbox)
        await nc.subscribe(f"{ns}.events", cb=events)
        try:  # (the request flushes our subscriptions first: nothing sent to us is missed)
            await nc.request(f"{ns}.hello", b"", connect_timeout or 10)
        except NoRespondersError as exc:
            raise ConnectError(
                f"no main listens on {addr} (NATS: no responders)", address=str(addr)
            ) from exc
        except NatsTimeout as exc:
            raise ConnectError(f"{addr}: no answer within {connect_timeout} s") from exc
        kw["max_frame_size"] = stream.limit = min(kw["max_frame_size"], int(nc.max_payload) - 4)
        peer = NatsClientPeer(
            stream,
            role="main",
            local_role="client",
            name=str(addr),
            address=str(addr),
            initiator=True,
            **kw,
        )
        if kw["max_frame_size"] == int(nc.max_payload) - 4:
            peer._conn.too_large_hint = TOO_LARGE_HINT
        holder.append(peer)
        peer.start()
        await peer.wait_hello(connect_timeout)
    except BaseException:
        if stream is not None:  # stop its writer task (else "Task was destroyed")
            stream._writer.cancel()
        await nc.close()
        raise
    return peer
