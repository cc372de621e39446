"""Who is on the other end of a socket: credentials and address, read once.

Both I/O layers read these at connect/accept time (one ``getsockopt`` and one
``getpeername``), so ``call.peer.uid`` costs an attribute read. The kernel
vouches for what ``SO_PEERCRED`` says (the peer cannot lie about its uid);
TCP says nothing about the process behind it, so there the ids are ``None``.
"""

from __future__ import annotations

import socket
import struct
from typing import Final, NamedTuple

__all__ = ["Credentials", "NO_CREDENTIALS", "peer_address", "peer_credentials"]


class Credentials(NamedTuple):
    """Process, user and group ids of the peer (``None`` where the OS does not say)."""

    pid: int | None
    uid: int | None
    gid: int | None


NO_CREDENTIALS: Final = Credentials(None, None, None)
_UCRED: Final = struct.Struct("3i")


def peer_credentials(sock: socket.socket) -> Credentials:
    """``SO_PEERCRED`` of a connected unix socket or socketpair; :data:`NO_CREDENTIALS` else.

    The ids are those of the process when it connected (or created the
    socketpair), as the kernel recorded them.
    """
    opt = getattr(socket, "SO_PEERCRED", None)
    if sock.family != socket.AF_UNIX or opt is None:
        return NO_CREDENTIALS
    try:
        pid, uid, gid = _UCRED.unpack(sock.getsockopt(socket.SOL_SOCKET, opt, _UCRED.size))
    except (OSError, struct.error):
        return NO_CREDENTIALS
    # Linux reports pid 0 / uid -1 when it cannot say (e.g. a peer in another pid namespace).
    return Credentials(
        pid if pid > 0 else None, uid if uid >= 0 else None, gid if gid >= 0 else None
    )


def peer_address(sock: socket.socket, fallback: str = "") -> str:
    """The remote end as a string: ``tcp://host:port``, or ``unix://<path>``.

    A unix client rarely binds a path of its own; then ``fallback`` (e.g. the
    listener's address, or ``child:<pid>`` for a socketpair) is returned.
    """
    try:
        name = sock.getpeername()
    except OSError:
        return fallback
    if sock.family in (socket.AF_INET, socket.AF_INET6):
        host, port = name[0], name[1]
        return f"tcp://[{host}]:{port}" if ":" in host else f"tcp://{host}:{port}"
    if isinstance(name, bytes):  # abstract namespace
        name = name.decode("utf-8", "replace")
    return f"unix://{name}" if name else fallback
