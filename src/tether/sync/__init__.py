"""Blocking API for code without asyncio: ``tether.sync.connect``, ``tether.sync.Pool``."""

from __future__ import annotations

import contextlib
import ssl as _ssl
from typing import Any, cast

from ..address import Address, parse_address
from ..checks import check_connect_options
from ..errors import ConnectError
from ..identity import peer_address
from ..protocol import check_secret
from ..results import DEFAULT_TIMEOUT
from ..tls import tls_connect, tls_refusal
from ..wire import DEFAULT_MAX_FRAME_SIZE
from .executor import Pool
from .peer import MAX_INFLIGHT, Call, Peer, loop_serves
from .route import Route

__all__ = ["Call", "Peer", "Pool", "Route", "connect"]


def connect(
    address: str | Address,
    *,
    timeout: float | None = DEFAULT_TIMEOUT,
    connect_timeout: float = 10.0,
    max_frame_size: int = DEFAULT_MAX_FRAME_SIZE,
    spin: float | None = None,
    max_inflight: int = MAX_INFLIGHT,
    secret: bytes | None = None,
    ssl: _ssl.SSLContext | None = None,
) -> Peer:
    """Connect to a listening main and return a blocking :class:`Peer`.

    Returns once the main's HELLO arrived (within ``connect_timeout``), like
    the asyncio :func:`tether.connect`. Use it as a context manager, or call
    ``close()`` when done. ``secret``: the shared secret of a listener started
    with ``secret=`` (proven both ways in the handshake, never sent). ``ssl``:
    a client ``ssl.SSLContext`` for a listener started with ``ssl=``.
    ``max_inflight``: how many of main's invokes may wait for this side's
    handlers at once (more are answered ``busy``). ``spin``: how a waiting
    thread polls the socket before it sleeps (``None``: adaptive; 0: never;
    seconds: a fixed window), as for :class:`Peer`.

    Raises:
        ConnectError: nothing listens at ``address`` (a :class:`PeerGone`).
        PeerGone: it sent no HELLO in time.
        ProtocolError: what answers is not a tether peer.
        TypeError, ValueError: an option has the wrong type or an impossible value.
        AuthenticationError: the secrets differ, or only one side has one; or
            the TLS handshake failed.
        RuntimeError: called from the thread running the event loop that
            serves ``address``: that loop cannot answer while this call blocks
            (use ``await tether.connect(...)`` there, or call this from another
            thread).
    """
    check_connect_options(
        timeout=timeout,
        connect_timeout=connect_timeout,
        max_frame_size=max_frame_size,
        spin=spin,
        max_inflight=max_inflight,
    )
    if isinstance(address, str) and address.startswith("nats://"):
        from ..nats.blocking import connect_blocking  # nats-py is imported only for NATS

        kw: dict[str, Any] = {"timeout": timeout, "connect_timeout": connect_timeout}
        kw["secret"] = secret
        kw.update(max_frame_size=max_frame_size, ssl=ssl, max_inflight=max_inflight)
        kw["spin"] = spin  # kept on the peer; the NATS client reads on its own loop thread
        return cast(Peer, connect_blocking(address, kw))  # the same verbs, on a loop thread
    addr = parse_address(address)
    if secret is not None:
        check_secret(secret)
    try:
        sock = addr.connect(connect_timeout)
    except OSError as exc:  # (TimeoutError too)
        why = exc.strerror or str(exc) or f"no answer within connect_timeout={connect_timeout} s"
        raise ConnectError(f"cannot connect to {addr}: {why}", address=str(addr)) from exc
    try:
        same_loop = loop_serves(sock)
    except OSError:
        same_loop = False
    if same_loop:
        sock.close()
        raise RuntimeError(
            f"tether.sync.connect({str(addr)!r}) called from the thread whose event loop "
            "serves that address: it would wait for a HELLO that loop cannot send while "
            "this call blocks; use 'await tether.connect(...)' here, or call it from "
            "another thread (asyncio.to_thread)"
        )
    address = peer_address(sock, str(addr))
    if ssl is not None:
        sock = tls_connect(sock, ssl, addr, connect_timeout)
    peer: Peer | None = None
    try:
        peer = Peer(
            sock,
            timeout=timeout,
            max_frame_size=max_frame_size,
            name=str(addr),
            spin=spin,
            secret=secret,
            address=address,
            max_inflight=max_inflight,
        )
        peer.wait_hello(connect_timeout)
    except BaseException as exc:
        if peer is not None:
            with contextlib.suppress(Exception):
                peer.close()
        refused = tls_refusal(exc, addr) if ssl is not None else None
        if refused is not None:
            raise refused from exc
        raise
    return peer
