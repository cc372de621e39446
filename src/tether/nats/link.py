"""``nats://`` listeners and connections: tether connections carried by a NATS server.

Subjects, under the address's namespace ``NS`` (``nats://host:4222/NS``,
default ``tether``):

- ``NS.open``: a client's request to open a connection. Listeners subscribe
  in the queue group ``NS``, so each connection is taken by one of the
  processes listening on the namespace (load is shared per connection).
  The request carries the client's inbox; the reply, the listener's
  subject for this connection.
- ``NS.c.<id>``: the client's inbox (frames main sends to it).
- ``NS.m.<main>.<id>``: the listener's subject for that connection.
- ``NS.events``: events a listener sends to every client at once
  (:meth:`NatsServer.send`); each client reads them as part of its connection.

The messages are tether frames, so every verb, error type, cancel and
timeout works as on a socket. Credentials come from the address
(``nats://user:password@host``, ``nats://token@host``) or its query
(``?creds=/path/user.creds``, ``?nkey=/path/seed.nk``); TLS from ``ssl=``.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import secrets
import ssl as _ssl
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Final
from urllib.parse import parse_qs, unquote, urlsplit

import msgspec

from ..errors import ConnectError, PeerGone
from ..identity import NO_CREDENTIALS
from ..wire import Kind, encode_frame
from .stream import NatsStream, spawn

if TYPE_CHECKING:
    from ..aio.main import Main
    from ..aio.peer import Peer

__all__ = ["NatsAddress", "NatsServer", "connect_nats", "listen_nats", "parse_nats_address"]

DEFAULT_NAMESPACE: Final = "tether"
#: the role of peers reached over NATS, unless ``listen(role=...)`` names another
DEFAULT_ROLE: Final = "nats"
#: seconds a closed listener waits for its peers to close before it closes its NATS link
CLOSE_WAIT: Final = 10.0
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


async def _nats_connect(
    addr: NatsAddress,
    ssl: _ssl.SSLContext | None,
    timeout: float,
    name: str,
    on_disconnect: Callable[[], None],
    on_closed: Callable[[], None],
) -> Any:
    """A NATS client connection that reconnects for ever (a failed first connect raises)."""
    import nats
    from nats.errors import Error as NatsError

    async def disconnected() -> None:
        on_disconnect()

    async def closed() -> None:
        on_closed()

    async def quiet(exc: Exception) -> None:
        pass  # reconnect attempts fail while the server is away: expected

    seconds = max(1, int(timeout + 0.999))
    try:
        # The first connect fails at once (refused, bad credentials); once in,
        # the client reconnects for ever.
        nc = await asyncio.wait_for(
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
                error_cb=quiet,
                **addr.options,
            ),
            seconds + 1,
        )
    except (OSError, TimeoutError, NatsError) as exc:
        why = str(exc) or type(exc).__name__
        raise ConnectError(f"cannot connect to {addr}: {why}", address=str(addr)) from exc
    nc.options["allow_reconnect"] = True
    return nc


class NatsServer:
    """A ``nats://`` listener of a :class:`~tether.Main` (what :meth:`Main.listen` returns).

    Attributes:
        url: the address listened on (``nats://host:port/namespace``).
        role: the role of every peer that connects through it.
        refused: connection requests refused (malformed, or main closing).
    """

    def __init__(self, main: Main, addr: NatsAddress, role: str, nc: Any) -> None:
        self.main = main
        self.address = addr
        self.url = str(addr)
        self.role = role
        self.refused = 0
        self.nc = nc
        self._id = secrets.token_hex(8)
        self._streams: dict[str, NatsStream] = {}
        self._held: set[Peer] = set()
        self._closed = False
        self._open_sub: Any = None
        self._name = f"{role}@{addr}"

    @property
    def peers(self) -> list[Peer]:
        """The peers connected through this listener that said HELLO."""
        return [p for p in self._held if p.remote_hello is not None and not p.closed]

    def fileno(self) -> int:
        return -1

    async def _start(self) -> None:
        ns = self.address.namespace
        self._open_sub = await self.nc.subscribe(f"{ns}.open", queue=ns, cb=self._on_open)
        await self.nc.subscribe(f"{ns}.m.{self._id}.*", cb=self._on_frames)
        await self.nc.flush()

    async def _on_frames(self, msg: Any) -> None:
        stream = self._streams.get(msg.subject.rpartition(".")[2])
        if stream is not None:
            stream.feed(msg.data)

    async def _on_open(self, msg: Any) -> None:
        from ..aio.peer import Peer

        main = self.main
        try:
            inbox = json.loads(msg.data)["inbox"]
            ns = self.address.namespace
            if not (isinstance(inbox, str) and inbox.startswith(f"{ns}.c.")):
                raise ValueError(inbox)
        except (ValueError, KeyError, TypeError):
            self.refused += 1
            return
        if main._closing or self._closed:
            self.refused += 1
            return
        cid = secrets.token_hex(8)
        stream = NatsStream(self.nc, inbox, self.nc.max_payload)
        self._streams[cid] = stream
        kw = main._peer_kw(self.role, self._name, child=False)
        kw["max_frame_size"] = self._max()
        forget = kw["on_close"]

        def closed(peer: Peer) -> None:
            self._streams.pop(cid, None)
            self._held.discard(peer)
            forget(peer)

        kw["on_close"] = closed
        peer = Peer(
            stream,
            **kw,
            credentials=NO_CREDENTIALS,
            address=f"{self.address}#{inbox}",
            local=False,
            initiator=False,
        )
        main.peers.add(peer)
        self._held.add(peer)
        await msg.respond(json.dumps({"subject": f"{ns}.m.{self._id}.{cid}"}).encode())
        peer.start()
        if not peer.closed:
            main._hello_timers[peer] = asyncio.get_running_loop().call_later(
                main.hello_timeout, main._check_hello, peer
            )

    async def send(self, channel: str, *args: Any) -> None:
        """One event to every client connected on this namespace, as one NATS message.

        Every client (whichever listener it is connected to) gets it on its
        connection, as if its own main had sent it; the server copies it to
        each, so the cost does not grow with the number of clients here.

        Raises:
            PayloadTooLarge: the event is larger than the server's ``max_payload``.
            TypeError: ``channel`` is not a str, or an argument cannot be encoded.
        """
        if type(channel) is not str:
            raise TypeError(f"channel must be a str, not {type(channel).__name__}")
        out = bytearray()
        body = msgspec.msgpack.encode(args)
        encode_frame(out, Kind.EVENT, 0, 0, channel.encode(), body, max_frame_size=self._max())
        await self.nc.publish(f"{self.address.namespace}.events", bytes(out))

    def _max(self) -> int:
        return min(self.main.max_frame_size, int(self.nc.max_payload))

    def _server_closed(self) -> None:
        for peer in list(self._held):
            peer.abort(PeerGone(f"{self!r}: the NATS connection closed"))

    def close(self) -> None:
        """Stop taking connections; connected peers stay until their peers close."""
        if self._closed:
            return
        self._closed = True
        spawn(self._shutdown())

    async def _shutdown(self) -> None:
        # New connections go to the other listeners of the namespace at once;
        # those still open keep their subjects until they close (Main.close
        # closes them), within a bound.
        with contextlib.suppress(Exception):
            await self._open_sub.unsubscribe()
        held = [peer.wait_closed() for peer in self._held]
        if held:
            await asyncio.wait([asyncio.ensure_future(w) for w in held], timeout=CLOSE_WAIT)
        await self.nc.close()

    async def wait_closed(self) -> None:
        """Wait until the NATS link is closed (after :meth:`close`; within ``CLOSE_WAIT`` s)."""
        deadline = asyncio.get_running_loop().time() + CLOSE_WAIT + 5
        while not self.nc.is_closed and asyncio.get_running_loop().time() < deadline:
            await asyncio.sleep(0.01)

    def __repr__(self) -> str:
        return f"<NatsServer {self.url} role={self.role!r}>"


async def listen_nats(
    main: Main, address: str, *, role: str | None, ssl: _ssl.SSLContext | None
) -> NatsServer:
    """Serve ``main``'s handlers on a NATS namespace (see :meth:`tether.Main.listen`)."""
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
        await nc.close()
        raise
    main.servers.append(server)  # type: ignore[arg-type]
    return server


async def connect_nats(address: str, kw: dict[str, Any]) -> Peer:
    """Open a tether connection to whichever main listens on the address's namespace.

    Raises:
        ConnectError: the NATS server cannot be reached or refused us
            (credentials, TLS), or no main listens on the namespace (NATS
            answered "no responders": at once, not after a timeout).
    """
    from nats.errors import NoRespondersError
    from nats.errors import TimeoutError as NatsTimeout

    from ..aio.peer import Peer

    kw = dict(kw)
    connect_timeout = kw.pop("connect_timeout")
    ssl = kw.pop("ssl")
    if kw.pop("secret") is not None:
        raise ValueError("secret= is not for nats:// (use the NATS server's credentials)")
    addr = parse_nats_address(address)
    holder: list[Peer] = []

    def disconnected() -> None:
        if holder:
            holder[0].fail_calls(PeerGone(f"{addr}: lost the NATS server"))

    def closed() -> None:
        if holder:
            holder[0].abort(PeerGone(f"{addr}: the NATS connection closed"))

    nc = await _nats_connect(addr, ssl, connect_timeout, "tether client", disconnected, closed)
    try:
        inbox = f"{addr.namespace}.c.{secrets.token_hex(8)}"
        stream = NatsStream(nc, None, nc.max_payload)

        async def frames(msg: Any) -> None:
            stream.feed(msg.data)

        await nc.subscribe(inbox, cb=frames)
        try:
            reply = await nc.request(
                f"{addr.namespace}.open", json.dumps({"inbox": inbox}).encode(), connect_timeout
            )
        except NoRespondersError as exc:
            raise ConnectError(
                f"no main listens on {addr} (NATS: no responders)", address=str(addr)
            ) from exc
        except NatsTimeout as exc:
            raise ConnectError(f"{addr}: no answer within {connect_timeout} s") from exc
        stream.set_subject(json.loads(reply.data)["subject"])

        def peer_closed(peer: Peer) -> None:
            spawn(nc.close())

        kw["max_frame_size"] = min(kw["max_frame_size"], nc.max_payload)
        peer = Peer(
            stream,
            role="main",
            local_role="client",
            name=str(addr),
            address=str(addr),
            initiator=True,
            on_close=peer_closed,
            **kw,
        )
        holder.append(peer)
        peer.start()
        try:
            await peer.wait_hello(connect_timeout)
            # After the HELLO: the events every client gets join this connection's frames.
            await nc.subscribe(f"{addr.namespace}.events", cb=frames)
            # the server has the subscription before connect() returns: an event
            # main sends right after is not missed
            await nc.flush(timeout=connect_timeout or 10)
        except BaseException:
            peer.abort(PeerGone(f"{addr} did not complete the handshake"))
            raise
    except BaseException:
        await nc.close()
        raise
    return peer
