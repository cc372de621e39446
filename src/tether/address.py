"""Addresses (``unix:///path``, ``tcp://host:port``) and the sockets behind them.

Transports only move bytes. Unix sockets are plain ``AF_UNIX`` stream sockets,
so file descriptors can ride along with ``SCM_RIGHTS``.
"""

from __future__ import annotations

import contextlib
import errno
import os
import socket
import stat
from dataclasses import dataclass
from urllib.parse import urlsplit

__all__ = ["Address", "parse_address"]


@dataclass(frozen=True)
class Address:
    """A parsed address. ``scheme`` is ``unix`` or ``tcp`` (``ws`` for a page listener)."""

    scheme: str
    path: str = ""
    host: str = ""
    port: int = 0

    def __str__(self) -> str:
        if self.scheme == "unix":
            return f"unix://{self.path}"
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{self.scheme}://{host}:{self.port}"

    def listen(self, backlog: int = 128, *, others: bool = False) -> socket.socket:
        """Bind and listen. Unix socket files are created with mode 0600.

        A unix socket's directory must belong to this process's user and be
        private: no access at all for group and others (mode ``0700``), so no
        one else can even reach the socket, nor replace it. With ``others``
        (other uids are allowed to connect) they may enter the directory but
        still not write it (e.g. ``0711``/``0755``). A shared directory such as
        ``/tmp`` itself is refused: make a private one (``tempfile.mkdtemp()``,
        ``$XDG_RUNTIME_DIR``) and listen inside it. The check is made on the
        directory as found; its ancestors are the owner's business.

        A unix path is only ever replaced when it is a stale socket file (no
        server accepts on it any more): a live one is tried with a connect
        first and left alone. Between that check and the bind another process
        could take the path; the bind then fails with ``EADDRINUSE``.

        Raises:
            PermissionError: the directory belongs to another user, or is
                open to others (see above); the message names it.
            OSError: ``EADDRINUSE`` when a server already listens there;
                ``EEXIST`` when the path is not a socket (a file is never
                removed); ``ENOENT`` when the directory is missing. Each
                message names the address.
        """
        if self.scheme == "unix":
            self._check_folder(others)
            sock = self._bind_unix(others)
        else:
            family = socket.AF_INET6 if ":" in self.host else socket.AF_INET
            sock = socket.socket(family, socket.SOCK_STREAM)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                sock.bind((self.host, self.port))
            except OSError as exc:
                sock.close()
                raise OSError(exc.errno, f"cannot listen on {self}: {exc.strerror}") from exc
            except BaseException:
                sock.close()
                raise
        sock.listen(backlog)
        sock.setblocking(False)
        return sock

    def _check_folder(self, others: bool) -> None:
        folder = os.path.dirname(self.path) or "."
        try:
            st = os.stat(folder)
        except FileNotFoundError as exc:
            raise FileNotFoundError(
                errno.ENOENT, f"cannot listen on {self}: directory {folder!r} does not exist"
            ) from exc
        me = os.geteuid()
        mode = stat.S_IMODE(st.st_mode)
        closed = 0o022 if others else 0o077
        if st.st_uid != me or mode & closed:
            want = "not writable by group or others" if others else "mode 0700"
            raise PermissionError(
                errno.EACCES,
                f"cannot listen on {self}: directory {folder!r} (owner uid {st.st_uid}, mode "
                f"{mode:04o}) must belong to uid {me} and be {want}, so that no other user "
                "can reach or replace the socket; listen in a private directory "
                "(tempfile.mkdtemp(), $XDG_RUNTIME_DIR)",
            )

    def _bind_unix(self, others: bool = False) -> socket.socket:
        path = self.path
        try:
            st = os.stat(path)
        except FileNotFoundError:
            pass
        else:
            if not stat.S_ISSOCK(st.st_mode):
                raise FileExistsError(
                    errno.EEXIST, f"cannot listen on {self}: the path exists and is not a socket"
                )
            if _answers(path):
                raise OSError(
                    errno.EADDRINUSE, f"cannot listen on {self}: address in use (a server answers)"
                )
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)  # stale: its server is gone
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        old = os.umask(0o177)
        try:
            sock.bind(path)
        except OSError as exc:
            sock.close()
            if exc.errno == errno.ENOENT:
                folder = os.path.dirname(path) or "."
                raise FileNotFoundError(
                    errno.ENOENT, f"cannot listen on {self}: directory {folder!r} does not exist"
                ) from exc
            raise OSError(exc.errno, f"cannot listen on {self}: {exc.strerror}") from exc
        except BaseException:
            sock.close()
            raise
        finally:
            os.umask(old)
        # 0600; with other allowed uids 0666: the directory (which they may
        # enter, not write) and the uid check when accepting are the gates.
        os.chmod(path, 0o666 if others else 0o600)
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


def _answers(path: str) -> bool:
    """Whether something accepts connections on the unix socket at ``path``.

    A non-blocking connect settles at once on a unix socket: it succeeds (or
    finds the backlog full) while a server listens, and is refused once the
    socket file is all that is left.
    """
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.setblocking(False)
        err = probe.connect_ex(path)
    finally:
        probe.close()
    if err in (errno.ECONNREFUSED, errno.ENOENT):
        return False
    if err in (0, errno.EAGAIN, errno.EINPROGRESS):
        return True
    raise OSError(err, f"cannot listen on unix://{path}: {os.strerror(err)}")


def tune(sock: socket.socket) -> None:
    """Set per-socket options for low latency (TCP_NODELAY on TCP)."""
    if sock.family in (socket.AF_INET, socket.AF_INET6):
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


def parse_address(address: str | Address) -> Address:
    """Parse ``unix:///path`` or ``tcp://host:port`` (host defaults to 127.0.0.1).

    Raises:
        TypeError: ``address`` is neither a str nor an :class:`Address`.
        ValueError: the address is malformed or its scheme is unsupported.
    """
    if isinstance(address, Address):
        return address
    if not isinstance(address, str):
        raise TypeError(
            f"address must be a str such as 'unix:///path' or 'tcp://host:port', "
            f"not {type(address).__name__}"
        )
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
