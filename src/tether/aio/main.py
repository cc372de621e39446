"""The privileged hub: :class:`Main`, its listeners, and :func:`connect`."""

from __future__ import annotations

import asyncio
import collections
import contextlib
import errno
import ipaddress
import logging
import multiprocessing
import os
import signal
import socket
import ssl as _ssl
import time
from collections.abc import Callable, Collection, Generator, Mapping
from typing import Any

from .. import direct, trace_control, tracing
from ..address import Address, parse_address, tune
from ..capture import Output
from ..checks import check_connect_options
from ..child_errors import guard_hint, target_ref
from ..errors import (
    ConnectError,
    ConnectionClosed,
    PeerGone,
    ProtocolError,
    SandboxError,
    TetherError,
)
from ..identity import peer_address, peer_credentials
from ..polling import check_spin
from ..process import Deferred, check_spawn_options, check_target, child_entry, describe_exit
from ..protocol import check_secret
from ..registry import Handlers, Registry
from ..results import DEFAULT, DEFAULT_TIMEOUT
from ..routes import MAX_ROUTES
from ..sandbox import Sandbox, SandboxReport, read_report
from ..tls import tls_connect, tls_refusal
from ..wire import DEFAULT_MAX_FRAME_SIZE, MIN_MAX_FRAME_SIZE
from . import hub
from .child import Child
from .peer import DRAIN_TIMEOUT, MAX_INFLIGHT, MAX_QUEUED, Peer
from .stream import tls_handshake

__all__ = ["Main", "Server", "connect"]

log = logging.getLogger("tether")

# accept() errors about one connection only (it hung up, or a firewall refused
# it); any other error (EMFILE, ENFILE, ENOBUFS, ENOMEM...) makes the server back off.
_ONE_CONNECTION = frozenset({errno.ECONNABORTED, errno.EPROTO, errno.EPERM})
_TRACEBACKS = ("children", "all", "none")
#: default ``listen(max_connections=)``: peers one listener holds at once
MAX_CONNECTIONS = 4096
#: default ``listen(max_handshaking=)``: of those, peers that have not said HELLO yet
MAX_HANDSHAKING = 256


class Server:
    """A listening socket whose accepted peers join a :class:`Main`.

    When the process runs out of descriptors (``EMFILE``/``ENFILE``) or
    kernel memory, ``accept`` fails while the listener stays readable; the
    server then stops watching the listener for :data:`ACCEPT_RETRY` seconds
    (logging a warning) instead of retrying at once, so a full descriptor
    table never makes the loop spin. Connections wait in the backlog meanwhile.

    A unix server checks each peer's uid (``SO_PEERCRED``) against
    :attr:`uids` as it accepts it: a peer of another user is closed at once,
    logged (address, pid, uid) at WARNING and counted in :attr:`refused`.

    Limits (set by :meth:`Main.listen`): past ``max_connections`` peers held
    at once, a new connection is closed as soon as it is accepted (logged, at
    most once a second, and counted in :attr:`refused`); past
    ``max_handshaking`` peers that have not said HELLO yet, the *oldest* of
    them is dropped to make room (counted in :attr:`handshakes_dropped`), so a
    flood of silent connections cannot crowd out the clients that finish
    their handshake. ``None`` turns a limit off.

    Attributes:
        uids: the user ids allowed to connect (unix only; ``None`` for TCP).
        secret: the shared secret accepted peers must prove (``None``: none).
        ssl: the ``ssl.SSLContext`` every connection is wrapped in (``None``: plain TCP).
        refused: connections refused: a uid not allowed or ``max_connections``
            already held (closed at once), or a handshake not completed (wrong
            or missing secret, a replayed handshake, a failed TLS handshake, a
            bad HELLO, the ``hello_timeout``); each is logged at WARNING with
            the peer's address.
        handshakes_dropped: peers dropped still in the handshake to make room.
        url: where to reach it: the address (``unix:///path``, ``tcp://host:port``);
            for ``ws://``, the page to open, its secret included.
    """

    #: seconds to stop accepting after ``accept`` ran out of descriptors or memory
    ACCEPT_RETRY: float = 0.1

    def __init__(
        self,
        main: Main,
        sock: socket.socket,
        address: Address,
        role: str,
        uids: frozenset[int] | None = None,
        secret: bytes | None = None,
        ssl: _ssl.SSLContext | None = None,
        *,
        max_connections: int | None = MAX_CONNECTIONS,
        max_handshaking: int | None = MAX_HANDSHAKING,
    ) -> None:
        self.main = main
        self.address = address
        self.url = str(address)
        self.role = role
        self.uids = uids if address.scheme == "unix" else None
        self._me = os.geteuid()
        self.max_connections = max_connections
        self.max_handshaking = max_handshaking
        self.refused = 0
        self.handshakes_dropped = 0
        self._refused_logged = 0.0  # when a refusal was last logged
        self._refusal_window = 0.0  # start of the second the count below is for
        self._refusals_logged = 0
        self._held: set[Peer] = set()  # this listener's peers still open
        # ...of which those that may still be in the handshake, oldest first
        self._handshaking: collections.OrderedDict[Peer, None] = collections.OrderedDict()
        # TLS handshakes still running for this listener, oldest first
        self._tls: collections.OrderedDict[asyncio.Task[None], None] = collections.OrderedDict()
        self.secret = secret
        self.ssl = ssl
        self._sock = sock
        self._fd = sock.fileno()
        self._name = f"{role}@{address}"
        self._loop = asyncio.get_running_loop()
        self._retry: asyncio.TimerHandle | None = None
        self._backed_off = 0  # back-offs since the last accepted connection
        self._closed = False
        self._inode = 0  # of our socket file: close() removes that one only
        if address.scheme == "unix":
            with contextlib.suppress(OSError):
                self._inode = os.stat(address.path).st_ino
        self._loop.add_reader(self._fd, self._accept)

    def fileno(self) -> int:
        """The listening socket's descriptor (-1 once closed)."""
        return self._sock.fileno()

    @property
    def peers(self) -> list[Peer]:
        """The peers this listener accepted that are connected and said HELLO.

        E.g. the pages of a ``ws://`` listener, to push to them:
        ``for page in server.peers: await page.send("theme", "dark")``.
        """
        return [p for p in self._held if p.remote_hello is not None and not p.closed]

    def _accept(self) -> None:
        for _ in range(64):
            try:
                conn, _ = self._sock.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                if exc.errno in _ONE_CONNECTION:
                    continue  # that one failed; others may be waiting
                self._back_off(exc)  # out of descriptors or memory, or worse
                return
            if self._backed_off:
                log.warning("%r: accepting again after %d retries", self, self._backed_off)
                self._backed_off = 0
            tls = self._tls
            held = len(self._held) + len(tls)
            if self.max_connections is not None and held >= self.max_connections:
                self._refuse_full(conn)
                continue
            if (
                self.max_handshaking is not None
                and len(self._handshaking) + len(tls) >= self.max_handshaking
            ):
                self._make_handshake_room(self.max_handshaking)
            tune(conn)
            if self.uids is None:  # TCP: the OS says nothing about who this is
                if self.ssl is not None:
                    self.main._tls_accept(conn, self)  # TLS handshake first, then adopted
                else:
                    self._track(self.main._adopt(conn, self.role, self._name, self, local=False))
                continue
            cred = peer_credentials(conn)
            if cred.uid not in self.uids:
                self._refuse(conn, cred.pid, cred.uid)
                continue
            self._track(
                self.main._adopt(
                    conn,
                    self.role,
                    self._name,
                    self,
                    credentials=cred,
                    address=str(self.address),
                    local=cred.uid == self._me,
                )
            )

    def _refuse(self, conn: socket.socket, pid: int | None, uid: int | None) -> None:
        """Close a peer whose uid is not allowed, before it is read or written."""
        self.refused += 1
        if not self._may_log_refusal():
            conn.close()
            return
        log.warning(
            "%r refused a connection from %s: pid %s, uid %s is not allowed (allowed: %s)",
            self,
            peer_address(conn, str(self.address)),
            pid,
            uid,
            sorted(self.uids or ()),
        )
        conn.close()

    #: refusal lines logged per second at most, per listener (the rest are counted)
    REFUSALS_LOGGED: int = 10

    def _may_log_refusal(self) -> bool:
        now = time.monotonic()
        if now - self._refusal_window >= 1.0:
            self._refusal_window, self._refusals_logged = now, 0
        self._refusals_logged += 1
        return self._refusals_logged <= self.REFUSALS_LOGGED

    def _refuse_full(self, conn: socket.socket) -> None:
        """``max_connections`` are held: close a new connection at once, count it."""
        conn.close()
        self.refused += 1
        now = time.monotonic()
        if now - self._refused_logged >= 1.0:  # a flood logs once a second, not per connection
            self._refused_logged = now
            log.warning(
                "%r: %d connections held (max_connections): refused a new one (%d refused so far)",
                self,
                len(self._held),
                self.refused,
            )

    def _track(self, peer: Peer) -> None:
        """Count ``peer`` against this listener's limits until it closes."""
        if peer.closed:
            return
        held, handshaking = self._held, self._handshaking
        held.add(peer)
        handshaking[peer] = None
        then = peer._on_close

        def closed(p: Peer) -> None:
            held.discard(p)
            handshaking.pop(p, None)
            if then is not None:
                then(p)

        peer._on_close = closed

    def _make_handshake_room(self, limit: int) -> None:
        """Forget peers that said HELLO; while ``limit`` are still in it, drop the oldest."""
        hs = self._handshaking
        for p in [p for p in hs if p.remote_hello is not None]:
            del hs[p]
        tls = self._tls
        while tls and len(hs) + len(tls) >= limit:  # TLS handshakes are the oldest
            task, _ = tls.popitem(last=False)
            self.handshakes_dropped += 1
            task.cancel()  # closes its socket
        while len(hs) >= limit:
            oldest, _ = hs.popitem(last=False)
            self.handshakes_dropped += 1
            self.main._accepted.pop(oldest, None)  # counted here, not again as refused
            if self._may_log_refusal():
                log.warning(
                    "%r: %d peers in the handshake: dropped the oldest, %r", self, limit, oldest
                )
            oldest.abort(
                PeerGone(f"{oldest!r} dropped: {limit} connections still in the handshake")
            )

    def _back_off(self, exc: OSError) -> None:
        if not self._backed_off:  # once per episode, not ten times a second
            log.warning("%r: accept failed (%s); retrying every %s s", self, exc, self.ACCEPT_RETRY)
        self._backed_off += 1
        self._loop.remove_reader(self._fd)
        self._retry = self._loop.call_later(self.ACCEPT_RETRY, self._resume)

    def _resume(self) -> None:
        self._retry = None
        if not self._closed:
            self._loop.add_reader(self._fd, self._accept)

    def close(self) -> None:
        """Stop accepting; connected peers stay. Removes its unix socket file.

        Only the file this server bound is removed: if the path now names
        another socket (someone removed ours and listened there), it stays.
        """
        if self._closed:
            return
        self._closed = True
        if self._retry is not None:
            self._retry.cancel()
            self._retry = None
        else:
            self._loop.remove_reader(self._fd)
        self._sock.close()
        if self._inode:
            with contextlib.suppress(OSError):
                if os.stat(self.address.path).st_ino == self._inode:
                    os.unlink(self.address.path)

    def __repr__(self) -> str:
        return f"<Server {self.address} role={self.role}>"


class Main(Handlers):
    """The privileged hub (Electron's ``ipcMain``): owns handlers, children, listeners.

    Args:
        timeout: default invoke timeout for every peer, in seconds.
        max_frame_size: largest frame accepted or sent on any connection.
        start_method: default for :meth:`spawn`: ``spawn``, ``forkserver`` or ``fork``.
        spawn_timeout: how long a new child may take to say hello.
        hello_timeout: how long an accepted connection may take to complete its
            handshake: its HELLO and, with ``secret=``, its proof (and, with
            ``ssl=``, the TLS handshake before them, bounded separately by the same time).
        spin: polling instead of sleeping, for every peer and child (see
            :class:`Peer`): ``None`` (the default) adaptive, 0 off, a number of
            seconds a fixed window (low-latency mode).
        close_timeout: how long :meth:`close` lets children exit before killing them.
        tracebacks: which peers get the handler's traceback in an ERROR:
            ``"children"`` (the default: spawned children, which main trusts;
            peers accepted by :meth:`listen` get only the type and message),
            ``"all"`` or ``"none"``.
        max_inflight: per peer, the most invokes it may have running in
            ``async`` handlers at once (default 1,024); past it an invoke is
            answered at once with ERROR ``busy`` (the caller gets
            :class:`~tether.Busy`).
        max_routes: per peer, the most routes it may have open to this
            main's hosts, and this main to it (default 255, Chromium's cap per
            renderer); past it ``open`` raises :class:`~tether.Busy`. 0: none.
        max_queued: per peer, the most bytes that may wait to be written to it
            (default 64 MiB; checked once more than 4 MiB wait). A peer that
            stops reading past it is dropped: the ``send``/``invoke`` that
            found it so, and every call pending on it, raise :class:`PeerGone`.
        drain_timeout: per peer, how long a ``send``/``invoke`` waits for a
            lagging peer to read what is queued for it (default 60 s; ``None``:
            forever); then that peer is dropped the same way.
        trace: a path: write a Chrome trace-event timeline of every frame and
            invoke there (:mod:`tether.tracing`); children inherit it through
            ``TETHER_TRACE`` and write ``<stem>.<pid>.json``, merged into it by
            :meth:`close`.

    Raises:
        TypeError, ValueError: an argument has the wrong type or an impossible
            value (checked here, so a mistake fails at construction).
        OSError: ``trace`` names a file whose directory is missing or not writable.
    """

    def __init__(
        self,
        *,
        timeout: float | None = DEFAULT_TIMEOUT,
        max_frame_size: int = DEFAULT_MAX_FRAME_SIZE,
        start_method: str = "spawn",
        spawn_timeout: float = 60.0,
        hello_timeout: float = 10.0,
        spin: float | None = None,
        close_timeout: float = 5.0,
        name: str = "main",
        tracebacks: str = "children",
        max_inflight: int = MAX_INFLIGHT,
        max_routes: int = MAX_ROUTES,
        max_queued: int = MAX_QUEUED,
        drain_timeout: float | None = DRAIN_TIMEOUT,
        trace: str | os.PathLike[str] | None = None,
    ) -> None:
        if tracebacks not in _TRACEBACKS:
            raise ValueError(
                f"tracebacks must be one of {', '.join(map(repr, _TRACEBACKS))}, not {tracebacks!r}"
            )
        if timeout is not None:
            _seconds("timeout", timeout)
        for arg, value in (
            ("spawn_timeout", spawn_timeout),
            ("hello_timeout", hello_timeout),
            ("close_timeout", close_timeout),
        ):
            _seconds(arg, value)
        check_spin(spin)
        if not isinstance(max_frame_size, int) or isinstance(max_frame_size, bool):
            raise TypeError(f"max_frame_size must be an int, not {type(max_frame_size).__name__}")
        if max_frame_size < MIN_MAX_FRAME_SIZE:
            raise ValueError(
                f"max_frame_size must be at least {MIN_MAX_FRAME_SIZE} bytes, not {max_frame_size}"
            )
        _count("max_inflight", max_inflight)
        _count("max_routes", max_routes, zero=True)
        _count("max_queued", max_queued)
        if drain_timeout is not None:
            _seconds("drain_timeout", drain_timeout)
        methods = multiprocessing.get_all_start_methods()
        if start_method not in methods:
            raise ValueError(f"start_method must be one of {methods}, not {start_method!r}")
        self.registry = Registry()
        self.timeout = timeout
        self.max_frame_size = max_frame_size
        self.start_method = start_method
        self.spawn_timeout = spawn_timeout
        self.hello_timeout = hello_timeout
        self.spin = spin
        self.close_timeout = close_timeout
        self.name = name
        #: who gets handler tracebacks: ``"children"``, ``"all"`` or ``"none"``
        self.tracebacks = tracebacks
        #: per peer: invokes allowed in handler tasks at once (more: ERROR ``busy``)
        self.max_inflight = max_inflight
        #: per peer: routes it may have open to this main's hosts (more: ``Busy``)
        self.max_routes = max_routes
        #: per peer: bytes allowed to wait for it before it is dropped
        self.max_queued = max_queued
        #: per peer: seconds a sender waits for it to read (then it is dropped)
        self.drain_timeout = drain_timeout
        self.peers: set[Peer] = set()
        #: the children still running (an exited child leaves the set)
        self.children: set[Child] = set()
        self.servers: list[Server] = []
        # Hello deadlines of accepted peers, cancelled when the peer closes:
        # a pending timer would keep a closed peer (and its buffers) alive.
        self._hello_timers: dict[Peer, asyncio.TimerHandle] = {}
        # accepted peers -> (their server, their address), to count and log refusals
        self._accepted: dict[Peer, tuple[Server, str]] = {}
        self._tls_tasks: set[asyncio.Task[None]] = set()  # TLS handshakes of accepted sockets
        self._closing = False
        # trace=: this main started tracing (it stops it, merging its children's files, at close)
        self._tracing = (
            tracing.start(trace, name, strict=True)
            if trace is not None and tracing.hook is None
            else None
        )
        self._exit_callbacks: list[hub.ChildExitCallback] = []  # on_child_exit
        self._exit_tasks: set[asyncio.Future[Any]] = set()  # ...the async ones running
        self._stopping: set[asyncio.Future[int | None]] = set()  # serve_forever waiting
        hub.install_introspection(self.registry)
        trace_control.install(self.registry)
        #: roles :meth:`connect` may give a direct channel (default: spawned children)
        self.connect_roles: set[str] = set(direct.DEFAULT_ROLES)

    async def __aenter__(self) -> Main:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    def _peer_kw(self, role: str, name: str, *, child: bool = True) -> dict[str, Any]:
        trusted = self.tracebacks == "all" or (child and self.tracebacks == "children")
        return {
            "role": role,
            "local_role": "main",
            "registry": self.registry,
            "timeout": self.timeout,
            "max_frame_size": self.max_frame_size,
            "name": name,
            "on_close": self._forget,
            "spin": self.spin,
            "tracebacks": trusted,
            "max_inflight": self.max_inflight,
            "max_routes": self.max_routes,
            "max_queued": self.max_queued,
            "drain_timeout": self.drain_timeout,
        }

    def _adopt(
        self,
        sock: socket.socket,
        role: str,
        name: str,
        server: Server,
        hello_timeout: float | None = None,
        **ident: Any,
    ) -> Peer:
        """Make an accepted socket a peer; ``ident``: its credentials, address, ``local``.

        ``hello_timeout``: what is left of the handshake deadline (default: all of it).
        """
        kw = self._peer_kw(role, name, child=False)
        peer = Peer(sock, **kw, secret=server.secret, initiator=False, **ident)
        where = _peer_address(sock)
        self._accepted[peer] = (server, where)
        self.peers.add(peer)
        cred = ident.get("credentials")
        pid = getattr(cred, "pid", None)
        log.info(
            "%r: %r connected from %s (pid %s, uid %s)",
            server,
            peer,
            where,
            pid,
            getattr(cred, "uid", None),
            extra={"peer": repr(peer), "peer_pid": pid, "peer_address": where},
        )
        peer.start()
        if not peer.closed:
            # An accepted peer that never says hello is dropped (untrusted by default).
            self._hello_timers[peer] = asyncio.get_running_loop().call_later(
                self.hello_timeout if hello_timeout is None else hello_timeout,
                self._check_hello,
                peer,
            )
        return peer

    def _tls_accept(self, conn: socket.socket, server: Server) -> None:
        """Start the TLS handshake of an accepted socket; adopt it once done."""
        assert server.ssl is not None
        where = _peer_address(conn)
        try:
            conn.setblocking(False)
            tls = server.ssl.wrap_socket(conn, server_side=True, do_handshake_on_connect=False)
        except (OSError, ValueError) as exc:
            conn.close()
            self._refuse(server, where, f"TLS setup failed: {exc}")
            return
        task = asyncio.ensure_future(self._tls_then_adopt(tls, server, where))
        self._tls_tasks.add(task)
        server._tls[task] = None  # counts against the listener's limits until it is done
        task.add_done_callback(self._tls_tasks.discard)
        task.add_done_callback(lambda t: server._tls.pop(t, None))

    async def _tls_then_adopt(self, tls: _ssl.SSLSocket, server: Server, where: str) -> None:
        loop = asyncio.get_running_loop()
        started = loop.time()
        try:
            await tls_handshake(tls, loop, self.hello_timeout)
        except (OSError, TimeoutError) as exc:  # (ssl.SSLError is an OSError)
            tls.close()
            why = "timed out" if isinstance(exc, TimeoutError) else f"failed: {exc}"
            self._refuse(
                server, where, f"TLS handshake {why} (hello_timeout {self.hello_timeout} s)"
            )
            return
        except BaseException:
            tls.close()
            raise
        if self._closing or server._closed:
            tls.close()
            return
        left = max(0.0, self.hello_timeout - (loop.time() - started))  # one deadline for both
        server._track(
            self._adopt(tls, server.role, server._name, server, local=False, hello_timeout=left)
        )

    def _refuse(self, server: Server, where: str, why: object) -> None:
        """Count and log a connection dropped before its handshake completed.

        At most :attr:`Server.REFUSALS_LOGGED` lines a second per listener: a
        flood of strangers must not become a flood of log lines.
        """
        server.refused += 1
        if server._may_log_refusal():
            log.warning("%r refused %s: %s", server, where, why)

    def _check_hello(self, peer: Peer) -> None:
        self._hello_timers.pop(peer, None)
        if peer.remote_hello is None and not peer.closed:
            peer.abort(
                ProtocolError(f"handshake not completed within {self.hello_timeout} s: dropped")
            )

    def _forget(self, peer: Peer) -> None:
        self.peers.discard(peer)
        accepted = self._accepted.pop(peer, None)
        if accepted is not None and peer.remote_hello is not None:
            log.info(
                "%r (pid %s) from %s left: %s",
                peer,
                peer.remote_hello.pid,
                accepted[1],
                peer.close_reason,
                extra={"peer": repr(peer), "peer_pid": peer.remote_hello.pid},
            )
        if accepted is not None and peer.remote_hello is None and not self._closing:
            self._refuse(*accepted, peer.close_reason)
        timer = self._hello_timers.pop(peer, None)
        if timer is not None:
            timer.cancel()

    async def spawn(
        self,
        target: Callable[..., Any],
        *args: Any,
        start_method: str | None = None,
        name: str | None = None,
        role: str = "child",
        pickle: bool = False,
        env: Mapping[str, str | None] | None = None,
        cwd: str | os.PathLike[str] | None = None,
        capture: bool = False,
        sandbox: bool | Sandbox | None = None,
    ) -> Child:
        """Start ``target(peer, *args)`` in a new process and return it connected.

        Returns once the child said hello. Messages main sends after this
        reach handlers the child registered before its first ``await``.
        A ``fork`` child closes, first thing, every listener and connection
        of this main (its own socketpair end included), so none outlives
        main's use of it.

        ``pickle=True`` opts both ends of this child's connection in to
        pickle: arguments, results and events that msgspec cannot encode
        (any picklable object) travel pickled. Only for a child you trust as
        you trust your own code: unpickling runs code. Peers from
        :meth:`listen` can never use pickle.

        ``env``: variables merged into the child's environment (main's,
        inherited); a value ``None`` removes that variable. ``cwd``: the
        child's working directory. Both apply in the child before the
        target's module is imported (spawn, forkserver), so module-level
        code sees them; variables Python reads as it starts (``PYTHON*``)
        have no effect there.

        ``capture=True``: the child's stdout and stderr (descriptors 1 and
        2, so C code and subprocesses too) go to main instead of main's
        own: :attr:`Child.stdout` and :attr:`Child.stderr` keep their last
        lines (bounded; see :class:`tether.capture.Output`) and call
        ``on_line`` callbacks as lines arrive. Main reads them as they come,
        so a child never blocks on output nobody reads.

        Raises:
            TypeError: ``target`` is not callable or ``args`` do not fit it;
                ``env`` is not a mapping of str, ``cwd`` not a path.
            FileNotFoundError, NotADirectoryError: ``cwd`` is not a directory.
            ConnectionClosed: this main was closed.
            SandboxError: the OS refused part of the sandbox (and
                ``best_effort`` was not set); the child ran none of its code.
            PeerGone: the child died or stayed silent before saying hello.
                When the child reported why (its target raised before its
                first ``await``, its module failed to import there), the
                ``__cause__`` is a :class:`~tether.RemoteError` with its type,
                message and traceback. Once started, a child whose target
                raised is gone with a :class:`PeerGone` that carries the same
                (see :meth:`Child.failure`).
        """
        if self._closing:
            raise ConnectionClosed(f"{self.name} is closed: no new children")
        method = start_method or self.start_method
        check_target(target, args, method)
        child_env, child_cwd = check_spawn_options(env, cwd)
        box = Sandbox.coerce(sandbox)
        ctx = multiprocessing.get_context(method)
        parent_sock, child_sock = socket.socketpair()
        report, report_child = socket.socketpair()  # the child's failure, if it fails
        label = str(name or getattr(target, "__name__", "child"))
        options: dict[str, Any] = {
            "parent_pid": os.getpid(),
            "start_method": method,
            "max_frame_size": self.max_frame_size,
            "timeout": self.timeout,
            "name": label,
            "spin": self.spin,
            "pickle": pickle,
            "report": report_child,
            "max_routes": self.max_routes,
            "env": child_env,
            "cwd": child_cwd,
        }
        mains: list[socket.socket] = [report]  # main's ends of the side sockets
        if capture:
            out, out_child = socket.socketpair()
            err, err_child = socket.socketpair()
            options["capture"] = (out_child, err_child)
            mains += [out, err]
        if method == "fork":
            options["close_fds"] = [
                parent_sock.fileno(),
                *(s.fileno() for s in mains),
                *self._descriptors(),
            ]
        # Imported by name in a spawned child, so that an import error is reported.
        what = (method != "fork" and target_ref(target)) or target
        call: tuple[Any, tuple[Any, ...]] = (what, args)
        if box is not None:
            options["sandbox"] = box
            if method != "fork":  # arguments unpickled only once the sandbox is in force
                call = (Deferred(what, args), ())
        proc = ctx.Process(  # type: ignore[attr-defined]
            target=child_entry, args=(child_sock, *call, options), name=label, daemon=True
        )
        try:
            if method == "forkserver":  # talks to the fork server: keep the loop free
                await asyncio.get_running_loop().run_in_executor(None, proc.start)
            else:
                proc.start()
        except BaseException:
            parent_sock.close()
            for s in mains:
                s.close()
            raise
        finally:
            child_sock.close()
            report_child.close()
            for s in options.get("capture", ()):
                s.close()
        box_report = None
        if box is not None:
            try:
                box_report = await self._sandbox_report(parent_sock, proc, label)
            except BaseException:
                for s in mains:
                    s.close()
                raise
        child = Child(parent_sock, proc, **self._peer_kw(role, label), pickle=pickle, report=report)
        child.sandbox = box_report
        if capture:
            child.stdout, child.stderr = Output("stdout", mains[1]), Output("stderr", mains[2])
        self.peers.add(child)
        self.children.add(child)
        child.on_exit(self.children.discard)  # ``children`` lists the running ones
        child.start()
        try:
            await child.wait_hello(self.spawn_timeout)
        except TetherError as exc:
            silent = child.exitcode is None  # still running: it never said hello
            child.kill()
            with contextlib.suppress(TimeoutError):
                await child.wait(2.0)
            code = child.exitcode
            child.abort(exc if isinstance(exc, PeerGone) else PeerGone(str(exc)))
            self.children.discard(child)
            how = f"{exc} (killed)" if silent else describe_exit(child.pid, code)
            cause = child.failure()
            if cause is not None:  # the child's own exception: type, message, traceback
                how += f": {cause.type_name}: {cause.remote_message}"
                raise PeerGone(f"{label} failed to start: {how}", exitcode=code) from cause
            if code and method != "fork":
                how += (
                    " before tether started in it: Python failed while starting it (importing "
                    "the main module or unpickling the target or its arguments; its traceback "
                    "is on its stderr)" + guard_hint()
                )
            raise PeerGone(f"{label} failed to start: {how}", exitcode=code) from exc
        child.on_exit(self._child_exited)
        if self._closing:  # main was closed while the child started: end it too
            await child.close("main closing")
            await self._end_child(child)
            raise ConnectionClosed(f"{self.name} was closed while {label} started")
        return child

    async def _sandbox_report(self, sock: socket.socket, proc: Any, label: str) -> SandboxReport:
        """Read what a sandboxed child applied; on refusal or silence end it and raise."""
        try:
            return await read_report(sock, self.spawn_timeout)
        except BaseException as exc:
            sock.close()
            proc.kill()
            if not isinstance(exc, SandboxError | OSError):  # cancelled: nothing to wait for
                raise
            await asyncio.get_running_loop().run_in_executor(None, proc.join, 2.0)
            if isinstance(exc, SandboxError):
                raise SandboxError(f"{label}: {exc}", part=exc.part) from None
            how = describe_exit(proc.pid, proc.exitcode)
            raise PeerGone(
                f"{label} failed to start: {exc} ({how})", exitcode=proc.exitcode
            ) from exc

    def _descriptors(self) -> list[int]:
        """Every listener and connection of this main: what a forked child must close."""
        fds = [server.fileno() for server in self.servers]
        for peer in self.peers:
            fds.extend(peer.descriptors() if isinstance(peer, Child) else [peer.fileno()])
        return [fd for fd in fds if fd >= 0]

    async def listen(
        self,
        address: str | Address,
        *,
        role: str | None = None,
        uids: Collection[int] | None = None,
        secret: bytes | None = None,
        ssl: _ssl.SSLContext | None = None,
        max_connections: int | None = MAX_CONNECTIONS,
        max_handshaking: int | None = MAX_HANDSHAKING,
        static: str | os.PathLike[str] | None = None,
        public: bool = False,
    ) -> Server:
        """Accept peers on ``unix:///path`` or ``tcp://host:port`` (port 0 picks one).

        ``ws://host:port`` serves browser pages instead (:mod:`tether.web`):
        the files under ``static``, ``/tether.js``, and their WebSocket, all
        gated by a secret made at each start; open the returned server's
        ``url``, which carries it. Pages get role ``web`` and are never
        local: they reach only handlers that name ``"web"``. Loopback only,
        unless ``public=True``.

        ``nats://host:port/namespace`` serves them through a NATS server
        (:mod:`tether.nats`; needs ``nats-py``): clients connect with the same
        address; listeners on one namespace share the invokes of each channel
        they handle, one by one (a queue group per channel); clients get
        ``role`` (default ``nats``) and are never local;
        ``ssl=`` is the NATS client's TLS context. Returns a
        :class:`tether.nats.NatsServer`.

        Accepted peers get ``role`` (one role, a str); handlers limited with
        ``roles=`` check it. Handlers registered without ``roles=`` answer
        only *local* peers: unix peers of main's own uid. A TCP peer reaches
        only the handlers that name its role (``roles={"client"}``).

        Unix sockets: the socket file is created 0600, in a directory that
        must belong to main's user and be closed to everyone else (else
        :class:`PermissionError`; see :meth:`Address.listen`). Each peer's
        uid (``SO_PEERCRED``) must be in ``uids`` (default: main's own uid);
        others are closed at once, logged and counted (:attr:`Server.refused`).
        Allowing another uid lets the directory be entered (not written) by
        others, and such a peer is not local: it reaches only handlers that
        name its role. A unix path where a server still answers is refused, a
        stale socket file is replaced.

        ``max_connections`` (default 4,096) bounds the peers this listener
        holds at once: more are closed as soon as they are accepted (counted
        in :attr:`Server.refused`). ``max_handshaking`` (default 256) bounds
        those that have not said HELLO yet: one more drops the oldest of them
        (:attr:`Server.handshakes_dropped`). ``None`` turns a limit off.

        ``secret`` (bytes, at least 16): every peer must prove it knows it in
        the handshake (``tether.connect(..., secret=...)``); it never crosses
        the wire (docs/protocol.md, 6.1). ``ssl``: a server ``ssl.SSLContext``;
        every connection runs TLS (handshake bounded by ``hello_timeout``)
        before tether's own handshake. A TCP listener on an address other than
        loopback (127.0.0.0/8, ::1) requires a secret, or an ``ssl`` context
        that authenticates clients (``verify_mode`` ``CERT_REQUIRED``).

        Raises:
            TypeError: ``role`` is not a str, ``uids`` not a collection of int,
                ``secret`` not bytes, or a limit is not an int (or None).
            ValueError: the address is malformed; a limit is below 1; the secret
                is shorter than 16 bytes; a TCP address other than loopback
                without a secret or TLS client authentication; ``ssl`` on a
                unix address; for ``ws://``: a host other than loopback
                without ``public=True``, a ``role`` other than ``"web"``,
                ``uids``/``secret``/``ssl``; ``static``/``public`` elsewhere.
            FileNotFoundError: ``static`` is not a folder.
            ImportError: ``ws://`` without the ``websockets`` package.
            PermissionError: the unix socket's directory is open to others.
            OSError: the address is in use (``EADDRINUSE``), the path is not a
                socket, or its directory is missing; the message names it.
        """
        if role is not None and not isinstance(role, str):
            raise TypeError(f"role must be a str (one role), not {type(role).__name__}")
        for name, limit in (
            ("max_connections", max_connections),
            ("max_handshaking", max_handshaking),
        ):
            if limit is not None:
                _count(name, limit)
        if isinstance(address, str) and address.startswith("ws://"):
            if uids is not None or secret is not None or ssl is not None:
                raise ValueError(
                    "uids=, secret= and ssl= are not for ws:// (it has its own secret)"
                )
            try:
                from ..web.server import listen_web  # websockets is imported only for pages
            except ModuleNotFoundError as exc:
                if (exc.name or "").partition(".")[0] != "websockets":
                    raise
                raise ImportError(
                    "ws:// needs the websockets package: pip install 'tether-ipc[web]'"
                ) from exc

            return await listen_web(
                self,
                address,
                role=role,
                static=static,
                public=public,
                max_connections=max_connections,
                max_handshaking=max_handshaking,
            )
        if static is not None or public:
            raise ValueError("static= and public= are for ws:// addresses")
        if isinstance(address, str) and address.startswith("nats://"):
            if uids is not None or secret is not None:
                raise ValueError("uids= and secret= are not for nats:// (use NATS credentials)")
            from ..nats.link import listen_nats  # nats-py is imported only for NATS

            return await listen_nats(self, address, role=role, ssl=ssl)  # type: ignore[return-value]
        if role is None:
            role = "client"
        me = os.geteuid()
        allowed = frozenset((me,)) if uids is None else _checked_uids(uids)
        addr = parse_address(address)
        if secret is not None:
            check_secret(secret)
        if ssl is not None and not isinstance(ssl, _ssl.SSLContext):
            raise TypeError(f"ssl must be an ssl.SSLContext, not {type(ssl).__name__}")
        if ssl is not None and addr.scheme != "tcp":
            raise ValueError(f"ssl= is for tcp:// addresses, not {addr}")
        if ssl is not None and ssl.check_hostname:
            raise ValueError(
                "ssl= needs a server context (ssl.create_default_context("
                "ssl.Purpose.CLIENT_AUTH) or ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)): this one "
                "checks host names, as a client context does"
            )
        if uids is not None and addr.scheme != "unix":
            raise ValueError(
                f"uids= is for unix:// addresses (the OS says who connected), not {addr}"
            )
        client_auth = ssl is not None and ssl.verify_mode == _ssl.CERT_REQUIRED
        if addr.scheme == "tcp" and not _loopback(addr.host) and secret is None and not client_auth:
            raise ValueError(
                f"refusing to listen on {addr} (not loopback) without authentication: "
                "add secret=b'...' (at least 16 random bytes) so that strangers must prove "
                "they know it, or ssl=ctx with ctx.verify_mode = ssl.CERT_REQUIRED (TLS client "
                "certificates), or listen on 127.0.0.1"
            )
        sock = addr.listen(others=bool(allowed - {me}))
        server = Server(
            self,
            sock,
            addr.bound(sock),
            role,
            allowed,
            secret,
            ssl,
            max_connections=max_connections,
            max_handshaking=max_handshaking,
        )
        self.servers.append(server)
        return server

    async def close(self) -> None:
        """Stop listening, say goodbye to every peer, and end every child.

        Children get ``close_timeout`` seconds to exit after the goodbye;
        any still running are killed. Afterwards :meth:`spawn` refuses.
        """
        self._closing = True
        for stop in list(self._stopping):  # serve_forever returns
            if not stop.done():
                stop.set_result(None)
        for server in self.servers:
            server.close()
        self.servers.clear()
        for task in list(self._tls_tasks):
            task.cancel()
        peers = list(self.peers)
        await asyncio.gather(*(p.close("main closing") for p in peers), return_exceptions=True)
        await asyncio.gather(*(self._end_child(c) for c in list(self.children)))
        self.children.clear()
        if self._exit_tasks:  # async on_child_exit callbacks: bounded like the children
            _, late = await asyncio.wait(list(self._exit_tasks), timeout=self.close_timeout)
            for fut in late:
                fut.cancel()
        if self._tracing is not None and tracing.hook is self._tracing:
            tracing.stop()

    async def serve_forever(
        self, *, signals: hub.Signals = (signal.SIGINT, signal.SIGTERM)
    ) -> int | None:
        """Serve until SIGINT (Ctrl-C) or SIGTERM, then :meth:`close`; return the signal.

        While it waits, ``signals`` are caught (the process's previous handlers
        are put back before it returns), so a ``kill`` or Ctrl-C ends the
        program cleanly: listeners are removed, peers get a goodbye, children
        get ``close_timeout`` to exit and are killed after it. It also returns
        (``None``) when something else closes this main, e.g. a handler that
        calls ``await main.close()``. Run it in the main thread::

            async def amain() -> None:
                async with tether.Main() as main:
                    await main.listen(address)
                    await main.serve_forever()

            tether.run(amain())   # exits 0 on SIGTERM or Ctrl-C

        Raises:
            RuntimeError: not called from the main thread (signals are delivered there).
        """
        return await hub.serve_forever(self, signals)

    async def broadcast(
        self, channel: str, *args: Any, role: Collection[str] | str | None = None
    ) -> int:
        """Send the event ``channel`` to every connected peer and child; return how many got it.

        ``role`` (one role, or a collection) picks only the peers with that
        role (children have ``"child"`` unless spawned with another); peers
        still in their handshake are skipped. The sends run at once, so a
        slow peer does not hold up the others. A peer that is gone, or is
        dropped while this runs because it stopped reading (``max_queued``,
        ``drain_timeout``: it is closed with :class:`PeerGone`), is not
        counted and does not stop the rest. Through a NATS listener the event
        goes to every client of its namespace as one message (``NS.events``),
        once per namespace however many listeners main has there; each
        namespace counts as 1 (NATS does not say how many clients got it),
        so the count is peers and children reached plus NATS namespaces
        reached. A ``tether.Buffer`` cannot be
        broadcast (a send moves it); arrays and bytes can.

        Raises:
            TypeError: ``channel`` or ``role`` is not a str (or roles), an
                argument is a Buffer, or an argument cannot be encoded.
            PayloadTooLarge: the event exceeds ``max_frame_size``.
        """
        return await hub.broadcast(self, channel, args, role)

    async def connect(self, a: Peer, b: Peer, *, timeout: float | None = None) -> None:
        """Give two peers (children) a direct channel to each other; main relays nothing.

        A socketpair's ends go to each as a :class:`~tether.Handle`, through the
        reserved channel ``tether.connect``: each must have registered
        ``@peer.on_connect`` (its callback gets a :class:`~tether.Peer` for the
        other, role ``sibling``). Both must have a role in
        :attr:`connect_roles` (``{"child"}`` by default) and be on unix sockets.
        ``timeout``: per child, for its callback (default: the peer's timeout).
        Roles and descriptor passing are checked before either child hears of
        it; then ``a`` is asked, and only once it accepted, ``b`` (if ``b``
        refuses, the channel is shut down: ``a``'s new peer ends with
        :class:`~tether.PeerGone`).

        Raises:
            Forbidden: a peer's role is not in :attr:`connect_roles`.
            NoHandler: a child did not register ``on_connect``.
            HandleRefused: a peer is not on a unix socket (TCP, WebSocket).
            RemoteError: a child's ``on_connect`` callback raised (it refused).
        """
        await direct.join(self.connect_roles, a, b, DEFAULT if timeout is None else timeout)

    def on_child_exit(self, fn: hub.OnExit) -> hub.OnExit:
        """Call ``fn(child, exitcode)`` when a child :meth:`spawn` returned exits; a decorator too.

        ``exitcode`` is the process's exit status: 0 for a target that
        returned, ``n`` for ``sys.exit(n)``, 1 for an exception, ``-signum``
        for a child killed by a signal (as :attr:`multiprocessing.Process.exitcode`).
        ``fn`` may be a plain function or a coroutine function (run as a task;
        :meth:`close` waits ``close_timeout`` for those, then cancels them).
        It runs for children that exit while this main closes too. An
        exception in ``fn`` is logged, not raised.
        """
        if not callable(fn):
            raise TypeError(f"on_child_exit needs a callable, not {type(fn).__name__}")
        self._exit_callbacks.append(fn)
        return fn

    def _child_exited(self, child: Child) -> None:
        log.info(
            "%r: %s",
            child,
            describe_exit(child.pid, child.exitcode),
            extra={"peer": repr(child), "peer_pid": child.pid},
        )
        if tracing.hook is not None:
            tracing.child_exited(child.pid, child.exitcode, repr(child))
        hub.child_exited(self, child)

    async def _end_child(self, child: Child) -> None:
        # All children get their grace period at once, not one after another.
        try:
            await child.wait(self.close_timeout)
        except TimeoutError:
            child.kill()
            with contextlib.suppress(TimeoutError):
                await child.wait(2.0)  # SIGKILL: the exit follows at once


def _checked_uids(uids: object) -> frozenset[int]:
    """The allow list ``listen(uids=...)`` names, checked."""
    if isinstance(uids, int | str | bytes) or not isinstance(uids, Collection):
        raise TypeError(f"uids must be a collection of int, not {type(uids).__name__}")
    out = frozenset(uids)
    for uid in out:
        if not isinstance(uid, int) or isinstance(uid, bool):
            raise TypeError(f"each uid must be an int, not {type(uid).__name__}: {uid!r}")
    return out


def _loopback(host: str) -> bool:
    """Whether ``host`` is a loopback address (127.0.0.0/8, ::1, or ``localhost``)."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False  # another host name: it may resolve to anything


def _peer_address(sock: socket.socket) -> str:
    """The remote address of an accepted socket, for logs (``host:port``, or the unix peer)."""
    try:
        name = sock.getpeername()
    except OSError:
        return "?"
    if isinstance(name, tuple):
        host = f"[{name[0]}]" if ":" in name[0] else name[0]
        return f"{host}:{name[1]}"
    return f"unix peer {name or '(unnamed)'}"


def _seconds(name: str, value: object, *, zero: bool = False) -> None:
    """Check a duration argument: a real number of seconds, positive (or zero if allowed)."""
    if not isinstance(value, int | float) or isinstance(value, bool):
        raise TypeError(f"{name} must be a number of seconds, not {type(value).__name__}")
    if not (value >= 0 if zero else value > 0):
        raise ValueError(f"{name} must be {'zero or more' if zero else 'positive'}, not {value}")


def _count(name: str, value: object, *, zero: bool = False) -> None:
    """Check a limit: an int, positive (or zero if allowed)."""
    if not isinstance(value, int) or isinstance(value, bool):
        raise TypeError(f"{name} must be an int, not {type(value).__name__}")
    if value < (0 if zero else 1):
        raise ValueError(f"{name} must be {'zero or more' if zero else 'positive'}, not {value}")


class _Connecting:
    """``await connect(...)`` or ``async with connect(...) as peer``."""

    def __init__(self, address: str | Address, kw: dict[str, Any]) -> None:
        nats = isinstance(address, str) and address.startswith("nats://")
        self._address: Address | str = address if nats else parse_address(address)
        self._kw = kw
        self._peer: Peer | None = None

    async def _open(self) -> Peer:
        if isinstance(self._address, str):
            from ..nats.link import connect_nats

            return await connect_nats(self._address, self._kw)
        kw = dict(self._kw)
        connect_timeout = kw.pop("connect_timeout")
        loop = asyncio.get_running_loop()
        addr = self._address
        try:
            sock = await asyncio.wait_for(
                loop.run_in_executor(None, addr.connect, connect_timeout), connect_timeout
            )
        except OSError as exc:  # (TimeoutError too)
            why = (
                exc.strerror or str(exc) or f"no answer within connect_timeout={connect_timeout} s"
            )
            raise ConnectError(f"cannot connect to {addr}: {why}", address=str(addr)) from exc
        ctx = kw.pop("ssl")
        address = peer_address(sock, str(addr))
        if ctx is not None:
            sock = await loop.run_in_executor(None, tls_connect, sock, ctx, addr, connect_timeout)
        peer = Peer(
            sock,
            role="main",
            local_role="client",
            name=str(addr),
            address=address,
            initiator=True,
            **kw,
        )
        peer.start()
        try:
            await peer.wait_hello(connect_timeout)
        except BaseException as exc:
            peer.abort(PeerGone(f"{addr} did not complete the handshake"))
            refused = tls_refusal(exc, addr) if ctx is not None else None
            if refused is not None:
                raise refused from exc
            raise
        return peer

    def __await__(self) -> Generator[Any, None, Peer]:
        return self._open().__await__()

    async def __aenter__(self) -> Peer:
        self._peer = await self._open()
        return self._peer

    async def __aexit__(self, *exc: object) -> None:
        if self._peer is not None:
            await self._peer.close()


def connect(
    address: str | Address,
    *,
    timeout: float | None = DEFAULT_TIMEOUT,
    connect_timeout: float = 10.0,
    max_frame_size: int = DEFAULT_MAX_FRAME_SIZE,
    registry: Registry | None = None,
    spin: float | None = None,
    tracebacks: bool = True,
    max_inflight: int = MAX_INFLIGHT,
    max_queued: int = MAX_QUEUED,
    drain_timeout: float | None = DRAIN_TIMEOUT,
    secret: bytes | None = None,
    ssl: _ssl.SSLContext | None = None,
) -> _Connecting:
    """Connect to a listening :class:`Main`; ``await`` it or use ``async with``.

    ``tracebacks``: whether errors this side's handlers raise reach main with
    their traceback (main is trusted: yes by default). ``secret``: the shared
    secret of a listener started with ``secret=`` (each side proves it to the
    other; it never crosses the wire). ``ssl``: a client ``ssl.SSLContext``
    for a listener started with ``ssl=`` (the server's certificate is checked
    against the address's host). ``max_inflight``,
    ``max_queued`` and ``drain_timeout``: this side's limits, as for :class:`Main`.
    ``spin``: polling instead of sleeping (``None``: adaptive; 0: off; seconds:
    a fixed window), as for :class:`Peer`.
    ``nats://host:port/namespace`` connects through a NATS server to every
    main listening there, as one peer: each invoke goes to one of those that
    handle its channel (:mod:`tether.nats`; ``ssl=`` is then the NATS client's).

    Raises:
        ConnectError: nothing listens there (refused, no such socket file,
            unreachable); a :class:`PeerGone`, as is a failed handshake.
        ProtocolError: what answers is not a tether peer (an HTTP server, say).
        AuthenticationError: the secrets differ, or only one side has one; or
            the TLS handshake failed (the server's certificate, or ours, refused).
        TypeError, ValueError: an option has the wrong type or an impossible value.
    """
    check_connect_options(
        timeout=timeout,
        connect_timeout=connect_timeout,
        max_frame_size=max_frame_size,
        spin=spin,
        max_inflight=max_inflight,
        max_queued=max_queued,
        drain_timeout=drain_timeout,
    )
    if secret is not None:
        check_secret(secret)
    return _Connecting(
        address,
        {
            "timeout": timeout,
            "connect_timeout": connect_timeout,
            "max_frame_size": max_frame_size,
            "registry": registry,
            "spin": spin,
            "tracebacks": tracebacks,
            "max_inflight": max_inflight,
            "max_queued": max_queued,
            "drain_timeout": drain_timeout,
            "secret": secret,
            "ssl": ssl,
        },
    )
