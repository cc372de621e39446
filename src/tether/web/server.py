"""``Main.listen("ws://host:port", static=DIR)``: pages, tether.js and their WebSocket, one port.

One ``websockets`` server answers three things:

* ``GET /tether`` with a WebSocket upgrade: a page's connection, which becomes
  a :class:`~tether.Peer` of role ``web`` (docs/protocol.md, section 1.1);
* ``GET /tether.js`` and ``GET /tether.d.ts``: the client library shipped in
  this package;
* ``GET /t/<secret>/...``: a file under ``static`` (``index.html`` for a
  folder); ``server.url`` is ``/t/<secret>/``.

The listener's secret, made fresh at each start (docs/security.md, "Web
pages"), gates the pages and the socket. It lives in the URL *path*, never
in a cookie: a cookie is sent by any page of the same *site*, and every
port of 127.0.0.1 is one site, so another local server would receive it and
pages on other ports could load the app's files with it. In the path, a
page's relative links carry it and nothing else does. The socket takes it
as ``?token=<secret>`` (tether.js reads it from the page's path). Static
requests a browser marks ``Sec-Fetch-Site: same-site`` or ``cross-site``
are refused too, except top-level navigations (a link to the app clicked
on another page). The library is not secret: it is public at the root. The
WebSocket upgrade must also come from the served origin (``Origin``), to a
host name this server answers to (``Host``): a page of another site cannot
drive the app even if it learnt the port. HTTP and WebSocket framing are
websockets'; nothing here parses either.
"""

from __future__ import annotations

import asyncio
import hmac
import http
import ipaddress
import logging
import mimetypes
import os
import secrets
import socket
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from importlib import resources
from typing import TYPE_CHECKING, Any, Final
from urllib.parse import parse_qs, unquote

from websockets.asyncio.server import ServerConnection, serve
from websockets.datastructures import Headers, MultipleValuesError
from websockets.frames import CloseCode
from websockets.http11 import Request, Response
from websockets.typing import Subprotocol

from ..address import Address
from ..aio.main import Server
from ..aio.peer import Peer
from ..identity import NO_CREDENTIALS
from .stream import WebSocketStream

if TYPE_CHECKING:
    from ..aio.main import Main

__all__ = [
    "MAX_STATIC_FILE_SIZE",
    "PAGE_PREFIX",
    "SUBPROTOCOLS",
    "WS_PATH",
    "WebServer",
    "listen_web",
]

#: the path of the WebSocket endpoint
WS_PATH: Final = "/tether"
#: pages are served under ``PAGE_PREFIX + secret + "/"``
PAGE_PREFIX: Final = "/t/"
#: WebSocket subprotocol -> body encoding of the connection (docs/protocol.md, 1.1)
SUBPROTOCOLS: Final = {"tether.json": "json", "tether.msgpack": "msgpack"}
#: the client library, served from this package at these paths
LIBRARY: Final = {
    "/tether.js": ("tether.js", "text/javascript; charset=utf-8"),
    "/tether.d.ts": ("tether.d.ts", "text/plain; charset=utf-8"),
}
_TYPES: Final = {
    ".html": "text/html; charset=utf-8",
    ".htm": "text/html; charset=utf-8",
    ".js": "text/javascript; charset=utf-8",
    ".mjs": "text/javascript; charset=utf-8",
    ".css": "text/css; charset=utf-8",
    ".json": "application/json",
    ".svg": "image/svg+xml",
    ".txt": "text/plain; charset=utf-8",
    ".ts": "text/plain; charset=utf-8",
    ".wasm": "application/wasm",
}
#: the largest static file served (bytes); larger ones are answered 413. A
#: response is held whole in memory until it is written: pages, not downloads.
MAX_STATIC_FILE_SIZE: Final = 16 * 1024 * 1024
#: static files read at once (each in a thread, off the event loop)
MAX_STATIC_READS: Final = 4
#: bytes of static responses held at once, until their connections end; past it 503
MAX_STATIC_BYTES: Final = 4 * MAX_STATIC_FILE_SIZE
#: headers on every response: the URL (with its token) never leaves as a
#: Referer, nothing is sniffed or cached, no other site frames the page
_SAFE_HEADERS: Final = (
    ("Referrer-Policy", "no-referrer"),
    ("X-Content-Type-Options", "nosniff"),
    ("Cache-Control", "no-store"),
    ("Content-Security-Policy", "frame-ancestors 'self'"),
)


def _library(name: str) -> bytes:
    return resources.files("tether.web").joinpath("static").joinpath(name).read_bytes()


class WebServer(Server):
    """A ``ws://`` listener: serves pages and their WebSocket (module docstring).

    Attributes:
        url: the page to open, secret included (``http://127.0.0.1:PORT/t/SECRET/``).
        origin: the origin pages are served from (``http://127.0.0.1:PORT``).
        static: the folder whose files are served (``None``: only tether.js).
        token: this start's secret (also in :attr:`url`).
    """

    def __init__(
        self,
        main: Main,
        sock: socket.socket,
        address: Address,
        static: str | None,
        *,
        public: bool,
        max_connections: int | None,
        max_handshaking: int | None,
    ) -> None:
        # The base class's bookkeeping (limits, refusals) without its accept
        # loop: websockets accepts on this socket.
        super().__init__(
            main,
            sock,
            address,
            "web",
            max_connections=max_connections,
            max_handshaking=max_handshaking,
        )
        self._loop.remove_reader(self._fd)
        self.static = static
        self.token = secrets.token_urlsafe(32)
        host = f"[{address.host}]" if ":" in address.host else address.host
        self.origin = f"http://{host}:{address.port}"
        self.url = f"{self.origin}{PAGE_PREFIX}{self.token}/"
        self._public = public
        port = address.port
        # Host names this server answers to: a page at another name that
        # resolves here (DNS rebinding) is refused, token or not.
        self._hosts = {f"{host}:{port}", f"localhost:{port}", f"127.0.0.1:{port}", f"[::1]:{port}"}
        self._library = {path: (_library(name), ctype) for path, (name, ctype) in LIBRARY.items()}
        # Connections still sending their request or upgrading (not those
        # being answered), oldest first; past max_handshaking the oldest is
        # dropped (_http_room).
        self._http: dict[_Connection, None] = {}
        self._reads = asyncio.Semaphore(MAX_STATIC_READS)
        # Its own threads: file reads neither wait for nor hold up the app's
        # default executor (asyncio.to_thread).
        self._readers = ThreadPoolExecutor(MAX_STATIC_READS, thread_name_prefix="tether-static")
        self._static_bytes = 0  # of responses held until their connections end
        self.http_dropped = 0
        # websockets makes each connection of this class: it counts itself here
        connection: type[_Connection] = type("_Connection", (_Connection,), {"web": self})
        self._ws_server = serve(
            self._handler,
            sock=sock,
            process_request=self._process_request,
            select_subprotocol=_select,
            compression=None,
            open_timeout=main.hello_timeout,
            max_size=main.max_frame_size + 4,
            max_queue=4,
            close_timeout=2.0,
            server_header=None,
            create_connection=connection,
            logger=_Redacting(logging.getLogger("websockets.server"), self._redact),
        )

    async def _start(self) -> None:
        await self._ws_server.__aenter__()

    def fileno(self) -> int:
        return self._sock.fileno()

    def close(self) -> None:
        """Stop accepting; connected pages stay until their peers close (``Main.close``)."""
        if self._closed:
            return
        self._closed = True
        self._ws_server.server.close()  # the listening socket closes now, not at the next turn
        self._ws_server.close(close_connections=False)
        self._readers.shutdown(wait=False)

    async def wait_closed(self) -> None:
        """Wait until every page's connection has ended (after :meth:`close`)."""
        await self._ws_server.wait_closed()

    def __repr__(self) -> str:
        return f"<WebServer {self.origin} static={self.static!r}>"

    # -- HTTP -------------------------------------------------------------

    def _token_ok(self, query: str) -> bool:
        """Whether the socket's URL carries the secret (``?token=``)."""
        want = self.token.encode()
        return any(
            hmac.compare_digest(value.encode(), want) for value in parse_qs(query).get("token", ())
        )

    def _page_path(self, path: str) -> str | None:
        """The part of ``path`` after ``/t/<secret>`` (``""`` or ``/...``), or ``None``."""
        if not path.startswith(PAGE_PREFIX):
            return None
        secret, slash, rest = path[len(PAGE_PREFIX) :].partition("/")
        if not hmac.compare_digest(secret.encode(), self.token.encode()):
            return None
        return slash + rest

    def _redact(self, text: str) -> str:
        """``text`` with this start's secret replaced by ``…``: logs never hold it."""
        return text.replace(self.token, "…")

    def _respond(
        self, status: int, body: bytes, ctype: str, extra: tuple[tuple[str, str], ...] = ()
    ) -> Response:
        headers = Headers(
            [
                ("Content-Type", ctype),
                ("Content-Length", str(len(body))),
                ("Connection", "close"),
                *_SAFE_HEADERS,
                *extra,
            ]
        )
        return Response(status, http.HTTPStatus(status).phrase, headers, body)

    def _refuse_http(self, request: Request, status: int, why: str) -> Response:
        """A refusal (400, 403): counted in :attr:`refused`, logged at most 10 a second."""
        self.refused += 1
        if self._may_log_refusal():
            log_refusal(self, request, why)
        return self._respond(status, f"{status} {why}\n".encode(), "text/plain; charset=utf-8")

    async def _process_request(self, conn: ServerConnection, request: Request) -> Response | None:
        """Answer one HTTP request; ``None`` lets websockets complete an upgrade."""
        # Its request is in: no longer one _http_room may drop, so a flood of
        # half-sent requests cannot cut a response (held bytes are bounded by
        # MAX_STATIC_BYTES). An upgrade goes back in until _handler takes it.
        http_ = self._http
        counted = False
        if isinstance(conn, _Connection) and conn in http_:
            del http_[conn]
            counted = True
        try:
            response = await self._answer(conn, request)
        except MultipleValuesError as exc:  # two Host or Origin headers: which one counts?
            return self._refuse_http(request, 400, f"more than one {exc} header")
        if response is None and isinstance(conn, _Connection) and counted:
            http_[conn] = None
            self._http_room()
        if request.method == "HEAD" and response is not None:
            response.body = b""  # the headers (Content-Length included) of a GET, no body
        return response

    def _too_large(self, request: Request) -> Response:
        if self._may_log_refusal():
            log_refusal(self, request, f"a file larger than {MAX_STATIC_FILE_SIZE} bytes")
        return self._respond(
            413,
            f"413 tether serves files up to {MAX_STATIC_FILE_SIZE} bytes\n".encode(),
            "text/plain; charset=utf-8",
        )

    def _make_handshake_room(self, limit: int) -> None:
        """As any listener's; a page dropped here is told why: 1013, Try Again Later."""
        waiting = [p for p in self._handshaking if p.remote_hello is None]
        super()._make_handshake_room(limit)
        for p in waiting:
            stream = p._stream
            if p not in self._handshaking and isinstance(stream, WebSocketStream):
                stream.close_as = (
                    CloseCode.TRY_AGAIN_LATER,
                    f"{limit} pages still connecting: try again later",
                )

    def _http_room(self) -> None:
        """Past ``max_handshaking`` connections sending a request or upgrading, drop the oldest."""
        limit = self.max_handshaking
        http_ = self._http
        while limit is not None and len(http_) > limit:
            oldest = next(iter(http_))
            del http_[oldest]
            self.http_dropped += 1
            if self._may_log_refusal():
                import logging

                logging.getLogger("tether").warning(
                    "%r: %d connections in the HTTP stage: dropped the oldest", self, limit
                )
            oldest.transport.abort()

    async def _answer(self, conn: ServerConnection, request: Request) -> Response | None:
        if request.method not in ("GET", "HEAD"):
            return self._respond(
                405,
                f"405 {request.method} is not served here\n".encode(),
                "text/plain; charset=utf-8",
                (("Allow", "GET, HEAD"),),
            )
        path, _, query = request.path.partition("?")
        host = request.headers.get("Host", "")
        if not self._public and self._host(host) not in self._hosts:
            return self._refuse_http(request, 403, f"unknown host {host!r}")
        if path == WS_PATH:
            if request.method != "GET":
                return self._respond(
                    405, b"405 a WebSocket opens with GET\n", "text/plain", (("Allow", "GET"),)
                )
            if not self._token_ok(query):
                return self._refuse_http(request, 403, "the WebSocket needs the secret (?token=)")
            origin = request.headers.get("Origin")
            if origin is not None and not self._same_origin(origin, host):
                return self._refuse_http(request, 403, f"origin {origin!r} is not this server's")
            offered = ",".join(request.headers.get_all("Sec-WebSocket-Protocol"))
            if not any(p.strip() in SUBPROTOCOLS for p in offered.split(",")):
                return self._respond(
                    400,
                    f"400 offer a subprotocol: {', '.join(SUBPROTOCOLS)}\n".encode(),
                    "text/plain; charset=utf-8",
                )
            if self.max_connections is not None and len(self._held) >= self.max_connections:
                return self._respond(503, b"503 too many connections\n", "text/plain")
            if self.main._closing:
                return self._respond(503, b"503 closing\n", "text/plain")
            return None  # websockets completes the upgrade
        lib = self._library.get(path)
        if lib is not None:  # the library is public: nothing secret in it
            return self._respond(200, lib[0], lib[1])
        if path == "/favicon.ico":  # browsers ask on every page: no icon, not a refusal
            return self._respond(204, b"", "text/plain")
        rest = self._page_path(path)
        if rest is None:
            return self._refuse_http(
                request, 403, "open the address tether printed: it carries the secret"
            )
        # Defence in depth: a browser names where a request comes from; only
        # the app's own pages (same-origin) or the user (none) load its files.
        # A top-level navigation (a link to the printed address, clicked on
        # another page) is let in: the linking page cannot read the document
        # and frame-ancestors keeps it out of frames.
        fetch_site = request.headers.get("Sec-Fetch-Site", "none")
        navigation = (
            request.headers.get("Sec-Fetch-Mode") == "navigate"
            and request.headers.get("Sec-Fetch-Dest") == "document"
        )
        if fetch_site in ("same-site", "cross-site") and not navigation:
            return self._refuse_http(request, 403, f"a {fetch_site} request for a page's file")
        if rest == "":  # /t/<secret>: relative links need the slash
            return self._respond(
                308,
                b"308 see /\n",
                "text/plain; charset=utf-8",
                (("Location", f"{PAGE_PREFIX}{self.token}/"),),
            )
        file = self._file(rest)
        if file is None:
            return self._respond(404, b"404 not found\n", "text/plain; charset=utf-8")
        try:
            size = os.stat(file).st_size
            if size > MAX_STATIC_FILE_SIZE:
                return self._too_large(request)
            if self._static_bytes + size > MAX_STATIC_BYTES:
                return self._respond(
                    503, b"503 busy serving files: retry\n", "text/plain", (("Retry-After", "1"),)
                )
            self._static_bytes += size  # held from now: a read in progress counts
            assert isinstance(conn, _Connection)
            conn.held_bytes += size
            async with self._reads:  # bounded wait: websockets' open_timeout
                body = await self._loop.run_in_executor(
                    self._readers, _read, file, MAX_STATIC_FILE_SIZE
                )
        except OSError:
            return self._respond(404, b"404 not found\n", "text/plain; charset=utf-8")
        if body is None:  # it grew past the limit since stat()
            return self._too_large(request)
        ctype = _TYPES.get(os.path.splitext(file)[1].lower())
        if ctype is None:
            ctype = mimetypes.guess_type(file)[0] or "application/octet-stream"
        return self._respond(200, body, ctype)

    def _same_origin(self, origin: str, host: str) -> bool:
        """Whether ``Origin`` names the host the request came to (``Host``), over http.

        Both as the browser wrote them, so a default port is left out of
        both or of neither. A ``public`` listener also takes ``https``: its
        pages may come through a TLS proxy that keeps the ``Host``.
        """
        scheme, sep, netloc = origin.partition("://")
        if not sep or not host or netloc != host:
            return False
        return scheme == "http" or (self._public and scheme == "https")

    @staticmethod
    def _host(host: str) -> str:
        """``Host`` with its port (a browser leaves out ``:80``)."""
        if host.endswith("]") or ":" not in host:
            return f"{host}:80"
        return host

    def _file(self, path: str) -> str | None:
        """The file under ``static`` that ``path`` names, or ``None``.

        Refused: no static folder; a path that is not UTF-8 or holds a NUL;
        any ``..`` or hidden (``.name``) segment, after percent-decoding; and
        any file whose real path (symlinks resolved) is outside the folder.
        """
        root = self.static
        if root is None:
            return None
        try:
            rel = unquote(path, errors="strict")
        except UnicodeDecodeError:
            return None
        if "\0" in rel or "\\" in rel:
            return None
        trailing_slash = rel.endswith("/")
        parts = [p for p in rel.split("/") if p]
        if any(p.startswith(".") for p in parts):
            return None  # .., hidden files (.git, .env)
        real = os.path.realpath(os.path.join(root, *parts))
        if os.path.isdir(real):
            real = os.path.realpath(os.path.join(real, "index.html"))
        elif trailing_slash:
            return None  # a file is not a folder: /a.txt/ names nothing
        if real != root and not real.startswith(root + os.sep):
            return None
        return real if os.path.isfile(real) else None

    # -- WebSocket --------------------------------------------------------

    async def _handler(self, ws: ServerConnection) -> None:
        """One page's connection: a :class:`~tether.Peer` of role ``web`` until it closes."""
        main = self.main
        if isinstance(ws, _Connection):
            self._http.pop(ws, None)  # upgraded: counted with the peers now
        encoding = SUBPROTOCOLS.get(ws.subprotocol or "")
        if encoding is None or main._closing or self._closed:
            await ws.close(1008, "no tether subprotocol" if encoding is None else "closing")
            return
        if self.max_handshaking is not None and len(self._handshaking) >= self.max_handshaking:
            self._make_handshake_room(self.max_handshaking)
        stream = WebSocketStream(ws, main.max_frame_size)
        remote = ws.remote_address
        where = f"{remote[0]}:{remote[1]}" if remote else "?"
        if remote and ":" in str(remote[0]):
            where = f"[{remote[0]}]:{remote[1]}"
        peer = Peer(
            stream,
            **main._peer_kw("web", self._name, child=False),
            credentials=NO_CREDENTIALS,
            address=f"tcp://{where}",
            local=False,
            initiator=False,
            encoding=encoding,
        )
        assert ws.request is not None
        peer.origin = ws.request.headers.get("Origin")
        main._accepted[peer] = (self, where)
        main.peers.add(peer)
        self._track(peer)
        peer.start()
        if not peer.closed:
            main._hello_timers[peer] = self._loop.call_later(
                main.hello_timeout, self._check_hello, peer, stream
            )
        await stream.finish()

    def _check_hello(self, peer: Peer, stream: WebSocketStream) -> None:
        """Main's hello timeout, with its own close: 1008, "no HELLO within N s"."""
        if peer.remote_hello is None and not peer.closed:
            timeout = self.main.hello_timeout
            stream.close_as = (CloseCode.POLICY_VIOLATION, f"no HELLO within {timeout:g} s")
        self.main._check_hello(peer)


class _Redacting(logging.LoggerAdapter):  # type: ignore[type-arg]
    """websockets' logger with the secret taken out: its debug lines hold request paths."""

    def __init__(self, logger: logging.Logger, redact: Callable[[str], str]) -> None:
        super().__init__(logger, {})
        self._redact_text = redact

    def log(self, level: int, msg: object, *args: Any, **kw: Any) -> None:
        if self.isEnabledFor(level):
            text = str(msg) % args if args else str(msg)
            self.logger.log(level, "%s", self._redact_text(text), **kw)


class _Connection(ServerConnection):
    """websockets' connection, counted by its :class:`WebServer` until it is upgraded."""

    web: WebServer  # set on the subclass each WebServer makes

    def __init__(self, *args: Any, **kw: Any) -> None:
        super().__init__(*args, **kw)
        self.held_bytes = 0  # of a static response, released when the connection ends

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        self.web._http[self] = None
        self.web._http_room()

    def connection_lost(self, exc: Exception | None) -> None:
        web = self.web
        web._http.pop(self, None)
        web._static_bytes -= self.held_bytes
        self.held_bytes = 0
        super().connection_lost(exc)


def _select(conn: ServerConnection, offered: Sequence[Subprotocol]) -> Subprotocol | None:
    """``tether.json`` if the client offers it, else ``tether.msgpack``, else none."""
    for name in SUBPROTOCOLS:
        if name in offered:
            return Subprotocol(name)
    return None


def log_refusal(server: WebServer, request: Request, why: str) -> None:
    """Log a refused request: its path without the query and with the secret shown as ``…``."""
    import logging

    logging.getLogger("tether").warning(
        "%r refused %s: %s", server, server._redact(request.path.partition("?")[0]), why
    )


def _read(path: str, limit: int) -> bytes | None:
    """The file's bytes, or ``None`` if it holds more than ``limit``."""
    with open(path, "rb") as f:
        data = f.read(limit + 1)
    return None if len(data) > limit else data


def _loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


async def listen_web(
    main: Main,
    address: str,
    *,
    role: str | None,
    static: str | os.PathLike[str] | None,
    public: bool,
    max_connections: int | None,
    max_handshaking: int | None,
) -> WebServer:
    """Start a ``ws://host:port`` listener for ``main`` (see :meth:`tether.Main.listen`)."""
    from urllib.parse import urlsplit

    if role not in (None, "web"):
        raise ValueError(f"a page's role is always 'web' (handlers name it), not {role!r}")
    parts = urlsplit(address)
    try:
        port = parts.port
    except ValueError as exc:
        raise ValueError(f"bad port in {address!r}") from exc
    if port is None:
        raise ValueError(f"ws address needs a port: {address!r}")
    if parts.path not in ("", "/") or parts.query:
        raise ValueError(f"a ws:// listener address is host and port only, not {address!r}")
    host = parts.hostname or "127.0.0.1"
    if not _loopback(host) and not public:
        raise ValueError(
            f"refusing to serve pages on {address} (not loopback) without public=True: the "
            "page and its secret travel in clear text; anyone on the network who sees them "
            "drives the app (put a TLS proxy in front, and pass public=True)"
        )
    root: str | None = None
    if static is not None:
        root = os.path.realpath(os.fspath(static))
        if not os.path.isdir(root):
            raise FileNotFoundError(f"static={static!r} is not a folder")
    addr = Address("ws", host=host, port=port)
    sock = addr.listen()
    bound_host, bound_port = sock.getsockname()[:2]
    server = WebServer(
        main,
        sock,
        Address("ws", host=bound_host, port=bound_port),
        root,
        public=public,
        max_connections=max_connections,
        max_handshaking=max_handshaking,
    )
    try:
        await server._start()
    except BaseException:
        sock.close()
        raise
    main.servers.append(server)
    return server
