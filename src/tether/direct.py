"""Direct channels between two children: :meth:`tether.Main.connect`.

Main makes a socketpair and hands one end to each child as a
:class:`~tether.Handle`, by invoking the reserved channel ``tether.connect``
on each with ``(handle, name, pid)``: the other child's name and process id
(the direct peer's :attr:`~tether.Peer.pid`: main's word, since the kernel's
``SO_PEERCRED`` names main, which made the pair). A child
answers it only if it registered a callback with ``@peer.on_connect``; the
callback gets an ordinary :class:`~tether.Peer` for the other child, with
its own handlers: register them in the callback before its first ``await``
(a :class:`tether.sync.Peer` in a blocking child: it serves once the
callback returned). ``Main.connect`` checks first what it can (both roles
allowed, both ends take descriptors), then announces the channel to ``a``
and, only once ``a`` accepted, to ``b``; if ``b`` refuses, main shuts the
socketpair down so ``a``'s new peer ends with :class:`~tether.PeerGone`
(its calls fail with it). It returns once both callbacks did. From then on the two talk over
their own socketpair; main relays nothing and sees nothing.

Each end grants the other the role ``sibling`` (``local``: handlers without
``roles=`` answer it), and accepts only *sealed* shared memory from it (no
lent or moved segments: neither child trusts the other's pages). When one
child dies, the other's direct peer ends with :class:`~tether.PeerGone`; its
channel to main stays up.
"""

from __future__ import annotations

import contextlib
import inspect
import socket
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Final

from .errors import Forbidden, HandleRefused, PeerGone
from .handles import Handle
from .identity import Credentials, peer_credentials
from .protocol import State
from .registry import Call, Handler, Registry

if TYPE_CHECKING:
    from .aio.peer import Peer
    from .sync.peer import Peer as SyncPeer

__all__ = ["CONNECT", "SIBLING", "join", "register"]

#: the reserved channel main invokes on each child to hand it its end
CONNECT: Final = "tether.connect"
#: the role each end of a direct channel grants the other
SIBLING: Final = "sibling"
#: roles :meth:`Main.connect` connects by default
DEFAULT_ROLES: Final = frozenset({"child"})


def register(registry: Registry, accept: Callable[[Call, Handle, str, int], Any]) -> None:
    """Answer ``tether.connect`` (from main only) with ``accept(call, handle, name, pid)``."""
    registry.invokes[CONNECT] = Handler(accept, {"main"})


def _credentials(sock: socket.socket, pid: int) -> Credentials:
    """The sibling's pid (main's word) with the uid and gid the kernel gives."""
    cred = peer_credentials(sock)
    return Credentials(pid or None, cred.uid, cred.gid)


def aio_accept(owner: Peer, fn: Callable[[Peer], Any]) -> Callable[[Call, Handle, str, int], Any]:
    """The asyncio ``tether.connect`` handler of ``owner``: a new Peer for ``fn``."""
    from .aio.peer import Peer

    held: set[Peer] = set()  # the direct peers, alive until they close

    async def accept(call: Call, handle: Handle, name: str, pid: int = 0) -> None:
        sock = handle.socket()
        direct = Peer(
            sock,
            role=SIBLING,
            local_role=SIBLING,
            name=name,
            timeout=owner.timeout,
            max_frame_size=owner._conn.max_frame_size,
            on_close=held.discard,
            spin=owner.spin,
            tracebacks=owner.tracebacks,
            address=f"sibling:{name}",
            credentials=_credentials(sock, pid),
        )
        held.add(direct)
        direct.start()
        try:
            r = fn(direct)
            if inspect.isawaitable(r):
                await r
        except BaseException:
            direct.abort(_refused(name))
            raise

    return accept


def sync_accept(
    owner: SyncPeer, fn: Callable[[SyncPeer], Any]
) -> Callable[[Call, Handle, str, int], None]:
    """The blocking ``tether.connect`` handler of ``owner``: a new sync Peer for ``fn``."""
    from .sync.peer import Peer as SyncPeer

    def accept(call: Call, handle: Handle, name: str, pid: int = 0) -> None:
        sock = handle.socket()
        direct = SyncPeer(
            sock,
            role=SIBLING,
            local_role=SIBLING,
            name=name,
            timeout=owner.timeout,
            max_frame_size=owner._conn.max_frame_size,
            lazy=True,  # serve once fn registered its handlers
            spin=owner.spin,
            tracebacks=owner.tracebacks,
            address=f"sibling:{name}",
            credentials=_credentials(sock, pid),
        )
        try:
            fn(direct)
        except BaseException:
            direct.close()
            raise
        direct._start_serving(force=True)

    return accept


def _hang_up(sock: socket.socket) -> None:
    """End a socketpair from this end so the other end reads a clean EOF at once.

    Shut down, then drop whatever the other end had sent (its HELLO): a
    socket closed with unread data resets its peer instead (ECONNRESET),
    which some event loops (uvloop) report as a poll error, never as readable.
    """
    with contextlib.suppress(OSError):
        sock.shutdown(socket.SHUT_RDWR)
        for _ in range(64):  # bounded: the peer can't write after the shutdown
            if not sock.recv(65536, socket.MSG_DONTWAIT):
                break


def _refused(name: str) -> PeerGone:
    return PeerGone(f"the direct channel to {name!r} was refused by this side's on_connect")


async def join(roles: frozenset[str] | set[str], a: Peer, b: Peer, timeout: float | None) -> None:
    """Give ``a`` and ``b`` a direct channel (see :meth:`tether.Main.connect`)."""
    if a is b:
        raise ValueError("cannot connect a peer to itself")
    for p in (a, b):
        if p.role not in roles:
            raise Forbidden(
                f"{p!r} has role {p.role!r}: main connects only {sorted(roles)} "
                "(set main.connect_roles to allow more)"
            )
    for p in (a, b):
        if p._conn.state is State.OPEN and not p._conn.passes_fds:
            raise HandleRefused(
                f"{p!r} cannot take a descriptor (not on a unix socket: TCP, WebSocket, NATS), "
                "so it cannot have a direct channel"
            )
    sa, sb = socket.socketpair()
    # Main keeps b's end until b accepted: if b refuses, shutting it down ends a's
    # channel at once (a has accepted already), whoever else still holds the socket.
    keep = sb.dup()
    try:
        ha, hb = Handle(sa.detach()), Handle(sb.detach())
        try:
            await a.invoke(CONNECT, ha, b.name, b.pid or 0, timeout=timeout)
        except BaseException:
            hb.close()  # b never hears of it
            raise
        try:
            await b.invoke(CONNECT, hb, a.name, a.pid or 0, timeout=timeout)
        except BaseException:
            _hang_up(keep)  # a sees PeerGone now
            raise
    finally:
        keep.close()
