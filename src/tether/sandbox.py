"""Sandboxed children: no network, resource limits, no privileges to gain.

``Main.spawn(target, sandbox=True)`` (or ``sandbox=Sandbox(...)``) has the
child apply a :class:`Sandbox` to itself first thing, before the target is
imported or run (:func:`tether.process.child_entry`). In order:

1. ``network=False``: ``unshare(CLONE_NEWNET)``, a new network namespace
   whose only interface, loopback, is down: no socket reaches any network,
   the host's loopback included. Needs ``CAP_SYS_ADMIN``; without it the child
   tries a new user namespace too (``CLONE_NEWUSER``, its uid and gid mapped
   to themselves), which unprivileged users may create where the kernel
   allows it (``user.max_user_namespaces`` > 0).
2. ``drop_capabilities``: empty bounding, ambient, effective, permitted and
   inheritable capability sets, so a root child cannot bring the namespace's
   interfaces up or ``setns`` back into main's network.
3. ``no_new_privs``: ``PR_SET_NO_NEW_PRIVS``; no ``execve`` gains privileges
   (setuid binaries, file capabilities) from here on.
4. ``address_space``, ``open_files``, ``cpu_seconds``: ``RLIMIT_AS``,
   ``RLIMIT_NOFILE``, ``RLIMIT_CPU`` (never above the current hard limit).

The child still reaches main over the socketpair it inherited. It reports
what it applied in a short preamble on that socketpair, before tether's
handshake (:func:`write_report` / :func:`read_report`): where the OS refused a
part, ``spawn`` raises :class:`~tether.SandboxError`, unless
``best_effort=True`` (then :attr:`Child.sandbox` lists what was skipped and why).

This is not seccomp: the filesystem (and unix sockets bound in it) stays
visible, system calls are not filtered. docs/security.md says what it does
and does not stop.
"""

from __future__ import annotations

import asyncio
import ctypes
import dataclasses
import errno
import json
import os
import resource
import socket
import struct
import sys
from typing import Any, Final

from .errors import SandboxError

__all__ = ["Sandbox", "SandboxReport", "apply", "read_report", "write_report"]

CLONE_NEWUSER: Final = 0x10000000
CLONE_NEWNET: Final = 0x40000000
_PR_CAPBSET_DROP: Final = 24
_PR_SET_NO_NEW_PRIVS: Final = 38
_PR_CAP_AMBIENT: Final = 47
_PR_CAP_AMBIENT_CLEAR_ALL: Final = 4
_CAP_VERSION_3: Final = 0x20080522
_REPORT_MAX: Final = 64 * 1024  # bytes of a child's sandbox report main accepts


@dataclasses.dataclass(frozen=True)
class Sandbox:
    """What a sandboxed child gives up; ``sandbox=True`` means ``Sandbox()``.

    Attributes:
        network: ``False`` (default): a new network namespace with nothing up.
            ``True`` keeps main's network.
        address_space: ``RLIMIT_AS`` in bytes (default 4 GiB); ``None``: unchanged.
        open_files: ``RLIMIT_NOFILE`` (default 256); ``None``: unchanged.
        cpu_seconds: ``RLIMIT_CPU`` (default 3,600 s of CPU time, not wall
            time): past it the child gets ``SIGXCPU``, a second later
            ``SIGKILL``; ``None``: unchanged.
        no_new_privs: set ``PR_SET_NO_NEW_PRIVS`` (default ``True``).
        drop_capabilities: drop every capability (default ``True``).
        best_effort: start the child even where the OS refuses a part
            (:attr:`Child.sandbox` says which); by default ``spawn`` raises
            :class:`~tether.SandboxError` instead.
    """

    network: bool = False
    address_space: int | None = 4 << 30
    open_files: int | None = 256
    cpu_seconds: int | None = 3600
    no_new_privs: bool = True
    drop_capabilities: bool = True
    best_effort: bool = False

    def __post_init__(self) -> None:
        for name in ("network", "no_new_privs", "drop_capabilities", "best_effort"):
            if not isinstance(getattr(self, name), bool):
                raise TypeError(f"Sandbox.{name} must be a bool")
        for name in ("address_space", "open_files", "cpu_seconds"):
            value = getattr(self, name)
            if value is None:
                continue
            if not isinstance(value, int) or isinstance(value, bool):
                raise TypeError(f"Sandbox.{name} must be an int or None")
            if value < 1:
                raise ValueError(f"Sandbox.{name} must be at least 1, not {value}")

    @classmethod
    def coerce(cls, value: bool | Sandbox | None) -> Sandbox | None:
        """``spawn``'s ``sandbox=`` argument as a :class:`Sandbox` (``None``: none)."""
        if value is None or value is False:
            return None
        if value is True:
            return cls()
        if isinstance(value, Sandbox):
            return value
        raise TypeError(f"sandbox must be a bool or a tether.Sandbox, not {type(value).__name__}")


@dataclasses.dataclass(frozen=True)
class SandboxReport:
    """What a sandboxed child applied to itself (:attr:`Child.sandbox`).

    Attributes:
        applied: the parts in force: ``"network"``, ``"capabilities"``,
            ``"no_new_privs"``, ``"address_space"``, ``"open_files"``, ``"cpu_seconds"``.
        skipped: the parts the OS refused, each with the reason
            (only with ``best_effort=True``; otherwise ``spawn`` raised).
    """

    applied: tuple[str, ...] = ()
    skipped: dict[str, str] = dataclasses.field(default_factory=dict)


def _libc() -> Any:
    return ctypes.CDLL(None, use_errno=True)


def unshare(flags: int) -> None:
    """``unshare(2)`` through libc (Python 3.11 has no ``os.unshare``); ``OSError`` on refusal."""
    if not sys.platform.startswith("linux"):
        raise OSError(errno.ENOSYS, "namespaces need Linux")
    if _libc().unshare(ctypes.c_int(flags)) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


def _prctl(option: int, arg: int = 0) -> None:
    if not sys.platform.startswith("linux"):
        raise OSError(errno.ENOSYS, "prctl needs Linux")
    zero = ctypes.c_ulong(0)
    if _libc().prctl(option, ctypes.c_ulong(arg), zero, zero, zero) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


def _write(path: str, text: str) -> None:
    with open(path, "w", encoding="ascii") as f:
        f.write(text)


def _new_network() -> None:
    """A new network namespace; through a new user namespace when not privileged."""
    try:
        unshare(CLONE_NEWNET)
        return
    except OSError as exc:
        if exc.errno != errno.EPERM:
            raise
        first = exc
    uid, gid = os.getuid(), os.getgid()
    try:
        unshare(CLONE_NEWUSER | CLONE_NEWNET)
    except OSError as exc:
        raise OSError(
            exc.errno,
            f"CLONE_NEWNET: {first.strerror}; with a new user namespace: {exc.strerror}",
        ) from None
    _write("/proc/self/setgroups", "deny")  # required before an unprivileged gid_map
    _write("/proc/self/uid_map", f"{uid} {uid} 1")
    _write("/proc/self/gid_map", f"{gid} {gid} 1")


def _status_mask(field: str) -> int:
    with open("/proc/self/status", encoding="ascii") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1], 16)
    raise OSError(errno.ENOENT, f"no {field} in /proc/self/status")


def _drop_capabilities() -> None:
    """Empty every capability set of this process (bounding set first: it needs CAP_SETPCAP)."""
    if not sys.platform.startswith("linux"):
        raise OSError(errno.ENOSYS, "capabilities need Linux")
    bounding = _status_mask("CapBnd")
    if bounding:
        try:
            for cap in range(bounding.bit_length()):
                if bounding >> cap & 1:
                    _prctl(_PR_CAPBSET_DROP, cap)
        except OSError as exc:
            # Without CAP_SETPCAP the bounding set stays; harmless only if
            # nothing is permitted and no_new_privs stops execve gaining any.
            if exc.errno != errno.EPERM or _status_mask("CapPrm"):
                raise
    try:
        _prctl(_PR_CAP_AMBIENT, _PR_CAP_AMBIENT_CLEAR_ALL)
    except OSError as exc:
        if exc.errno != errno.EINVAL:  # kernels before 4.3 have no ambient set
            raise
    header = struct.pack("=Ii", _CAP_VERSION_3, 0)
    data = ctypes.create_string_buffer(24)  # two {effective, permitted, inheritable}: all zero
    if _libc().capset(ctypes.c_char_p(header), data) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


def _limit(which: int, value: int, spare: int = 0) -> None:
    """Lower ``which`` to ``value`` (hard: ``value + spare``), never above the hard limit."""
    _, hard = resource.getrlimit(which)
    top = value + spare if hard == resource.RLIM_INFINITY else min(value + spare, hard)
    resource.setrlimit(which, (min(value, top), top))


def apply(box: Sandbox) -> SandboxReport:
    """Apply ``box`` to this process; meant for a freshly started child.

    Raises:
        SandboxError: the OS refused a part and ``box.best_effort`` is false.
    """
    applied: list[str] = []
    skipped: dict[str, str] = {}

    def part(name: str, fn: Any, *args: Any) -> None:
        try:
            fn(*args)
        except (OSError, ValueError) as exc:
            reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
            if not box.best_effort:
                raise SandboxError(f"sandbox refused ({name}): {reason}", part=name) from exc
            skipped[name] = reason
        else:
            applied.append(name)

    if not box.network:
        part("network", _new_network)
    if box.drop_capabilities:
        part("capabilities", _drop_capabilities)
    if box.no_new_privs:
        part("no_new_privs", _prctl, _PR_SET_NO_NEW_PRIVS, 1)
    if box.address_space is not None:
        part("address_space", _limit, resource.RLIMIT_AS, box.address_space)
    if box.open_files is not None:
        part("open_files", _limit, resource.RLIMIT_NOFILE, box.open_files)
    if box.cpu_seconds is not None:
        part("cpu_seconds", _limit, resource.RLIMIT_CPU, box.cpu_seconds, 1)
    return SandboxReport(tuple(applied), skipped)


# -- the report preamble: 4-byte big-endian length, then JSON ----------------------


def write_report(
    sock: socket.socket, report: SandboxReport | None, error: SandboxError | None = None
) -> None:
    """Child side: tell main what was applied, or why not, before tether's handshake."""
    doc = {
        "applied": list(report.applied) if report else [],
        "skipped": report.skipped if report else {},
        "error": str(error) if error else "",
        "part": error.part if error else "",
    }
    body = json.dumps(doc).encode()
    sock.sendall(struct.pack(">I", len(body)) + body)


async def read_report(sock: socket.socket, timeout: float) -> SandboxReport:
    """Main side: read a child's preamble, bounded by ``timeout``.

    Leaves ``sock`` non-blocking, positioned at the child's first tether frame.

    Raises:
        SandboxError: the child could not apply its sandbox.
        ConnectionError: the child closed the socket before reporting, or
            sent a malformed report.
        TimeoutError: nothing within ``timeout`` seconds.
    """
    sock.setblocking(False)
    try:
        async with asyncio.timeout(timeout):
            (size,) = struct.unpack(">I", await _recv_exact(sock, 4))
            if size > _REPORT_MAX:
                raise ConnectionError(f"sandbox report of {size} bytes (at most {_REPORT_MAX})")
            body = await _recv_exact(sock, size)
    except TimeoutError:
        raise TimeoutError(f"no sandbox report from the child within {timeout} s") from None
    try:
        doc = json.loads(body)
        applied = tuple(str(x) for x in doc["applied"])
        skipped = {str(k): str(v) for k, v in doc["skipped"].items()}
        error, name = str(doc["error"]), str(doc["part"])
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        raise ConnectionError(f"malformed sandbox report: {exc}") from None
    if error:
        raise SandboxError(error, part=name)
    return SandboxReport(applied, skipped)


async def _recv_exact(sock: socket.socket, n: int) -> bytes:
    loop = asyncio.get_running_loop()
    chunks: list[bytes] = []
    while n:
        chunk = await loop.sock_recv(sock, n)
        if not chunk:
            raise ConnectionError("the child closed its connection before reporting its sandbox")
        chunks.append(chunk)
        n -= len(chunk)
    return b"".join(chunks)
