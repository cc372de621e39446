"""Child targets and main scripts for tests/test_sandbox.py (importable by every start method).

``IMPORTED_IN`` records the network namespace this module was imported in:
a sandboxed ``spawn``/``forkserver`` child must import it inside its sandbox.
"""

from __future__ import annotations

import asyncio
import ctypes
import errno
import fcntl
import os
import resource
import socket
import struct
import sys
from typing import Any

import tether

IMPORTED_IN = os.readlink("/proc/self/ns/net")


def _status(field: str) -> str:
    with open("/proc/self/status", encoding="ascii") as f:
        for line in f:
            if line.startswith(field + ":"):
                return line.split()[1]
    return ""


def _escape_attempts() -> dict[str, str]:
    """Try what dropped capabilities must stop: rejoin main's network, bring loopback up."""
    out: dict[str, str] = {}
    libc = ctypes.CDLL(None, use_errno=True)
    try:
        fd = os.open(f"/proc/{os.getppid()}/ns/net", os.O_RDONLY)
    except OSError as exc:
        out["setns"] = errno.errorcode.get(exc.errno or 0, str(exc))
    else:
        rc = libc.setns(fd, 0x40000000)  # CLONE_NEWNET
        out["setns"] = "joined" if rc == 0 else errno.errorcode[ctypes.get_errno()]
        os.close(fd)
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        try:
            fcntl.ioctl(s, 0x8914, struct.pack("16sh", b"lo", 1))  # SIOCSIFFLAGS, IFF_UP
            out["lo_up"] = "up"
        except OSError as exc:
            out["lo_up"] = errno.errorcode.get(exc.errno or 0, str(exc))
    return out


def probe(port: int) -> dict[str, Any]:
    """What a child can see of its sandbox: network, limits, privileges."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=5.0):
            reached = "connected"
    except OSError as exc:
        reached = errno.errorcode.get(exc.errno or 0, str(exc))
    return {
        "connect": reached,
        "netns": os.readlink("/proc/self/ns/net"),
        "imported_in": IMPORTED_IN,
        "nofile": list(resource.getrlimit(resource.RLIMIT_NOFILE)),
        "as": list(resource.getrlimit(resource.RLIMIT_AS)),
        "cpu": list(resource.getrlimit(resource.RLIMIT_CPU)),
        "no_new_privs": _status("NoNewPrivs"),
        "cap_eff": _status("CapEff"),
        "cap_bnd": _status("CapBnd"),
        "uid": os.getuid(),
        **_escape_attempts(),
    }


async def sandbox_probe(peer: tether.Peer, port: int) -> None:
    """Probe, invoke main's ``add``, then hand main the findings."""
    found = probe(port)
    found["sum"] = await peer.invoke("add", 2, 3, timeout=10.0)
    await peer.invoke("report", found, timeout=10.0)


def sandbox_probe_sync(peer: tether.sync.Peer, port: int) -> None:
    """The blocking twin of :func:`sandbox_probe`."""
    found = probe(port)
    found["sum"] = peer.invoke("add", 2, 3, timeout=10.0)
    peer.invoke("report", found, timeout=10.0)


async def run_main(port: int, box: tether.Sandbox, method: str) -> dict[str, Any]:
    """Spawn one sandboxed :func:`sandbox_probe` child; return its report and ``Child.sandbox``."""
    got: dict[str, Any] = {}
    async with tether.Main(start_method=method) as main:

        @main.handle("add")
        def add(call: tether.Call, a: int, b: int) -> int:
            return a + b

        @main.handle("report")
        def report(call: tether.Call, found: dict[str, Any]) -> None:
            got.update(found)

        child = await main.spawn(sandbox_probe, port, sandbox=box)
        await child.wait(30.0)
        assert child.sandbox is not None
        got["applied"] = list(child.sandbox.applied)
        got["skipped"] = child.sandbox.skipped
    return got


def main_script(best_effort: str, method: str) -> None:
    """A whole main program: print what a sandboxed spawn gave (for subprocess tests)."""

    async def run() -> None:
        server = await asyncio.start_server(lambda r, w: w.close(), "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        try:
            got = await run_main(port, tether.Sandbox(best_effort=best_effort == "1"), method)
        except tether.SandboxError as exc:
            print(f"SandboxError part={exc.part}: {exc}", flush=True)
            return
        finally:
            server.close()
        print(f"main netns {os.readlink('/proc/self/ns/net')} uid {os.getuid()}")
        for key in sorted(got):
            print(f"{key} {got[key]}")
        sys.stdout.flush()

    asyncio.run(run())
