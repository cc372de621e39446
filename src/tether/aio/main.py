"""The privileged hub: :class:`Main`, its listeners, and :func:`connect`."""

from __future__ import annotations

import asyncio
import contextlib
import multiprocessing
import os
import socket
from collections.abc import Callable, Generator
from typing import Any

from ..address import Address, parse_address, tune
from ..errors import ConnectionClosed, PeerGone, ProtocolError, TetherError
from ..process import check_target, child_entry, describe_exit
from ..registry import Handlers, Registry
from ..results import DEFAULT_TIMEOUT
from ..wire import DEFAULT_MAX_FRAME_SIZE
from .child import Child
from .peer import Peer

__all__ = ["Main", "Server", "connect"]


class Server:
    """A listening socket whose accepted peers join a :class:`Main`."""

    def __init__(self, main: Main, sock: socket.socket, address: Address, role: str) -> None:
        self.main = main
        self.address = address
        self.role = role
        self._sock = sock
        self._loop = asyncio.get_running_loop()
        self._loop.add_reader(sock.fileno(), self._accept)
        self._closed = False

    def _accept(self) -> None:
        for _ in range(64):
            try:
                conn, _ = self._sock.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                return
            tune(conn)
            self.main._adopt(conn, self.role, f"{self.role}@{self.address}")

    def close(self) -> None:
        """Stop accepting; connected peers stay. Removes a unix socket file."""
        if self._closed:
            return
        self._closed = True
        self._loop.remove_reader(self._sock.fileno())
        self._sock.close()
        if self.address.scheme == "unix":
            with contextlib.suppress(OSError):
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
        hello_timeout: how long an accepted connection may take to say hello.
        spin: low-latency mode for every peer and child (see :class:`Peer`).
        close_timeout: how long :meth:`close` lets children exit before killing them.
    """

    def __init__(
        self,
        *,
        timeout: float | None = DEFAULT_TIMEOUT,
        max_frame_size: int = DEFAULT_MAX_FRAME_SIZE,
        start_method: str = "spawn",
        spawn_timeout: float = 60.0,
        hello_timeout: float = 10.0,
        spin: float = 0.0,
        close_timeout: float = 5.0,
        name: str = "main",
    ) -> None:
        self.registry = Registry()
        self.timeout = timeout
        self.max_frame_size = max_frame_size
        self.start_method = start_method
        self.spawn_timeout = spawn_timeout
        self.hello_timeout = hello_timeout
        self.spin = spin
        self.close_timeout = close_timeout
        self.name = name
        self.peers: set[Peer] = set()
        self.children: set[Child] = set()
        self.servers: list[Server] = []
        self._closing = False

    async def __aenter__(self) -> Main:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    def _peer_kw(self, role: str, name: str) -> dict[str, Any]:
        return {
            "role": role,
            "local_role": "main",
            "registry": self.registry,
            "timeout": self.timeout,
            "max_frame_size": self.max_frame_size,
            "name": name,
            "on_close": self._forget,
            "spin": self.spin,
        }

    def _adopt(self, sock: socket.socket, role: str, name: str) -> Peer:
        peer = Peer(sock, **self._peer_kw(role, name))
        self.peers.add(peer)
        peer.start()
        # An accepted peer that never says hello is dropped (untrusted by default).
        asyncio.get_running_loop().call_later(self.hello_timeout, _check_hello, peer)
        return peer

    def _forget(self, peer: Peer) -> None:
        self.peers.discard(peer)

    async def spawn(
        self,
        target: Callable[..., Any],
        *args: Any,
        start_method: str | None = None,
        name: str | None = None,
        role: str = "child",
    ) -> Child:
        """Start ``target(peer, *args)`` in a new process and return it connected.

        Returns once the child said hello. Messages main sends after this
        reach handlers the child registered before its first ``await``.
        A ``fork`` child closes, first thing, every listener and connection
        of this main (its own socketpair end included), so none outlives
        main's use of it.

        Raises:
            TypeError: ``target`` is not callable or ``args`` do not fit it.
            ConnectionClosed: this main was closed.
            PeerGone: the child died or stayed silent before saying hello.
                Once started, a child whose target raised is gone with a
                :class:`PeerGone` that carries the error's type and message.
        """
        if self._closing:
            raise ConnectionClosed(f"{self.name} is closed: no new children")
        check_target(target, args)
        method = start_method or self.start_method
        ctx = multiprocessing.get_context(method)
        parent_sock, child_sock = socket.socketpair()
        label = str(name or getattr(target, "__name__", "child"))
        options: dict[str, Any] = {
            "parent_pid": os.getpid(),
            "start_method": method,
            "max_frame_size": self.max_frame_size,
            "timeout": self.timeout,
            "name": label,
            "spin": self.spin,
        }
        if method == "fork":
            options["close_fds"] = [parent_sock.fileno(), *self._descriptors()]
        proc = ctx.Process(  # type: ignore[attr-defined]
            target=child_entry, args=(child_sock, target, args, options), name=label, daemon=True
        )
        try:
            if method == "forkserver":  # talks to the fork server: keep the loop free
                await asyncio.get_running_loop().run_in_executor(None, proc.start)
            else:
                proc.start()
        except BaseException:
            parent_sock.close()
            raise
        finally:
            child_sock.close()
        child = Child(parent_sock, proc, **self._peer_kw(role, label))
        self.peers.add(child)
        self.children.add(child)
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
            raise PeerGone(f"{label} failed to start: {how}", exitcode=code) from exc
        if self._closing:  # main was closed while the child started: end it too
            await child.close("main closing")
            await self._end_child(child)
            raise ConnectionClosed(f"{self.name} was closed while {label} started")
        return child

    def _descriptors(self) -> list[int]:
        """Every listener and connection of this main: what a forked child must close."""
        fds = [server._sock.fileno() for server in self.servers]
        for peer in self.peers:
            fds.extend(peer.descriptors() if isinstance(peer, Child) else [peer.fileno()])
        return [fd for fd in fds if fd >= 0]

    async def listen(self, address: str | Address, *, role: str = "client") -> Server:
        """Accept peers on ``unix:///path`` or ``tcp://host:port`` (port 0 picks one).

        Accepted peers get ``role``; handlers limited with ``roles=`` check it.
        """
        addr = parse_address(address)
        sock = addr.listen()
        server = Server(self, sock, addr.bound(sock), role)
        self.servers.append(server)
        return server

    async def close(self) -> None:
        """Stop listening, say goodbye to every peer, and end every child.

        Children get ``close_timeout`` seconds to exit after the goodbye;
        any still running are killed. Afterwards :meth:`spawn` refuses.
        """
        self._closing = True
        for server in self.servers:
            server.close()
        self.servers.clear()
        peers = list(self.peers)
        await asyncio.gather(*(p.close("main closing") for p in peers), return_exceptions=True)
        await asyncio.gather(*(self._end_child(c) for c in list(self.children)))
        self.children.clear()

    async def _end_child(self, child: Child) -> None:
        # All children get their grace period at once, not one after another.
        try:
            await child.wait(self.close_timeout)
        except TimeoutError:
            child.kill()
            with contextlib.suppress(TimeoutError):
                await child.wait(2.0)  # SIGKILL: the exit follows at once


def _check_hello(peer: Peer) -> None:
    if peer.remote_hello is None and not peer.closed:
        peer._bad_message(ProtocolError("no HELLO within the handshake deadline"))


class _Connecting:
    """``await connect(...)`` or ``async with connect(...) as peer``."""

    def __init__(self, address: str | Address, kw: dict[str, Any]) -> None:
        self._address = parse_address(address)
        self._kw = kw
        self._peer: Peer | None = None

    async def _open(self) -> Peer:
        kw = dict(self._kw)
        connect_timeout = kw.pop("connect_timeout")
        loop = asyncio.get_running_loop()
        addr = self._address
        try:
            sock = await asyncio.wait_for(
                loop.run_in_executor(None, addr.connect, connect_timeout), connect_timeout
            )
        except OSError as exc:
            raise PeerGone(f"cannot connect to {addr}: {exc}") from exc
        peer = Peer(sock, role="main", local_role="client", name=str(addr), **kw)
        peer.start()
        try:
            await peer.wait_hello(connect_timeout)
        except BaseException:
            peer._shutdown(PeerGone(f"{addr} did not complete the handshake"))
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
    spin: float = 0.0,
) -> _Connecting:
    """Connect to a listening :class:`Main`; ``await`` it or use ``async with``.

    Raises:
        PeerGone: nothing listens there, or the handshake failed.
    """
    return _Connecting(
        address,
        {
            "timeout": timeout,
            "connect_timeout": connect_timeout,
            "max_frame_size": max_frame_size,
            "registry": registry,
            "spin": spin,
        },
    )
