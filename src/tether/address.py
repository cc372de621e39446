"""Addresses (``unix:///path``, ``tcp://host:port``) and the sockets behind them.

Transports only move bytes. Unix sockets are plain ``AF_UNIX`` stream sockets,
so file descriptors can ride along with ``SCM_RIGHTS``.
"""

from __future__ import annotations

import contextlib
import os
import socket
import stat
from dataclasses import dataclass
from urllib.parse import urlsplit

__all__ = ["Address", "parse_address"]


@dataclass(frozen=True)
class Address:
    """A parsed address. ``scheme`` is ``unix`` or ``tcp``."""

    scheme: str
    path: str = ""
    host: str = ""
    port: int = 0

    def __str__(self) -> str:
        if self.scheme == "unix":
            return f"unix://{self.path}"
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"tcp://{host}:{self.port}"

    def listen(self, backlog: int = 128) -> socket.socket:
        """Bind and listen. Unix socket files are created with mode 0600."""
        if self.scheme == "unix":
            with contextlib.suppress(FileNotFoundError):
                if stat.S_ISSOCK(os.stat(self.path).st_mode):
                    os.unlink(self.path)
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            old = os.umask(0o177)
            try:
                sock.bind(self.path)
            except BaseException:
                sock.close()
                raise
            finally:
                os.umask(old)
            os.chmod(self.path, 0o600)
        else:
            family = socket.AF_INET6 if ":" in self.host else socket.AF_INET
            sock = socket.socket(family, socket.SOCK_STREAM)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                sock.bind((self.host, self.port))
            except BaseException:
                sock.close()
                raise
        sock.listen(backlog)
        sock.setblocking(False)
        return sock

    def bound(self, sock: socket.socket) -> Address:
        """The address actually bound (a tcp port of 0 becomes the real one)."""
        if self.scheme == "unix":
            return self
        host, port = sock.getsockname()[:2]
        return Address("tcp", host=host, port=port)

    def connect(self, timeout: float | None = 10.0) -> socket.socket:
        """Open a blocking, connected socket."""
        if self.scheme == "unix":
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            sock.settimeout(timeout)
            try:
                sock.connect(self.path)
            except BaseException:
                sock.close()
                raise
        else:
            sock = socket.create_connection((self.host, self.port), timeout=timeout)
        tune(sock)
        return sock


def tune(sock: socket.socket) -> None:
    """Set per-socket options for low latency (TCP_NODELAY on TCP)."""
    if sock.family in (socket.AF_INET, socket.AF_INET6):
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


def parse_address(address: str | Address) -> Address:
    """Parse ``unix:///path`` or ``tcp://host:port`` (host defaults to 127.0.0.1).

    Raises:
        ValueError: the address is malformed or its scheme is unsupported.
    """
    if isinstance(address, Address):
        return address
    parts = urlsplit(address)
    if parts.scheme == "unix":
        path = parts.netloc + parts.path
        if not path:
            raise ValueError(f"unix address needs a path: {address!r}")
        return Address("unix", path=path)
    if parts.scheme == "tcp":
        try:
            port = parts.port
        except ValueError as exc:
            raise ValueError(f"bad port in {address!r}") from exc
        if port is None:
            raise ValueError(f"tcp address needs a port: {address!r}")
        return Address("tcp", host=parts.hostname or "127.0.0.1", port=port)
    raise ValueError(f"unsupported address {address!r}: use unix:///path or tcp://host:port")
