"""TLS for TCP connections: the client's handshake, shared by the asyncio and blocking layers.

The server side runs its handshake on the event loop
(:func:`tether.aio.stream.tls_handshake`); a client runs it blocking, before
its peer owns the socket. Either way tether's own protocol then runs inside
TLS unchanged: the peers read and write the ``ssl.SSLSocket`` like a plain one.
"""

from __future__ import annotations

import socket
import ssl

from .address import Address
from .errors import AuthenticationError, PeerGone

__all__ = ["tls_connect", "tls_refusal"]


def tls_connect(
    sock: socket.socket, ctx: ssl.SSLContext, addr: Address, timeout: float
) -> ssl.SSLSocket:
    """Run the client side of the TLS handshake on a connected socket (blocking, bounded).

    The socket is closed if it fails.

    Raises:
        AuthenticationError: the handshake failed or timed out (the message says why).
    """
    try:
        sock.settimeout(timeout)
        return ctx.wrap_socket(sock, server_hostname=addr.host)
    except (OSError, ValueError) as exc:
        sock.close()
        raise AuthenticationError(f"TLS handshake with {addr} failed: {exc}") from exc


def tls_refusal(exc: BaseException, addr: Address) -> AuthenticationError | None:
    """An :class:`AuthenticationError` if ``exc`` is the server refusing us in TLS, else ``None``.

    With TLS 1.3 the client's handshake completes before the server checks the
    client's certificate; a refusal then arrives as a TLS alert on the first
    read, which the peer reports as :class:`PeerGone` caused by ``ssl.SSLError``.
    """
    if not isinstance(exc, PeerGone):
        return None
    cause = exc.__cause__
    if isinstance(cause, ssl.SSLError):
        return AuthenticationError(f"{addr} refused this client in TLS: {cause}")
    if isinstance(cause, ConnectionError):  # the alert lost to a reset
        return AuthenticationError(
            f"{addr} dropped this client after TLS, before its HELLO "
            f"(client certificate refused?): {cause}"
        )
    return None
