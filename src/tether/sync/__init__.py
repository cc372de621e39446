"""Blocking API for scripts that don't use asyncio: ``tether.sync.connect``."""

from __future__ import annotations

from ..address import Address, parse_address
from ..errors import PeerGone
from ..results import DEFAULT_TIMEOUT
from ..wire import DEFAULT_MAX_FRAME_SIZE
from .peer import SPIN_SECONDS, Call, Peer

__all__ = ["Call", "Peer", "connect"]


def connect(
    address: str | Address,
    *,
    timeout: float | None = DEFAULT_TIMEOUT,
    connect_timeout: float = 10.0,
    max_frame_size: int = DEFAULT_MAX_FRAME_SIZE,
    spin: float = SPIN_SECONDS,
) -> Peer:
    """Connect to a listening main and return a blocking :class:`Peer`.

    Use it as a context manager, or call ``close()`` when done.

    Raises:
        PeerGone: nothing listens at ``address``.
    """
    addr = parse_address(address)
    try:
        sock = addr.connect(connect_timeout)
    except OSError as exc:
        raise PeerGone(f"cannot connect to {addr}: {exc}") from exc
    return Peer(sock, timeout=timeout, max_frame_size=max_frame_size, name=str(addr), spin=spin)
