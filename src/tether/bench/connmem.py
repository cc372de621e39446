"""Connection memory: what idle connections and a flood of bad ones cost a server.

Each server runs alone in a fresh process on a unix socket: a tether
:class:`~tether.Main`, or a websockets asyncio server without compression
(websockets' own figure for an idle connection is given without it). Both run
on the same event loop (uvloop when installed). This process is the client.

* ``idle``: open ``n`` connections that complete their handshake (tether: a
  HELLO each way; websockets: the HTTP upgrade) and then stay idle; read the
  server's ``VmRSS`` from ``/proc`` before and after. KiB per idle connection
  is the growth over ``n``. A few connections are opened first, so one-off
  allocations (the shared read buffer, lazily imported code) are not counted.
* ``flood``: ``n`` connections that each send 300 bytes and hang up, in
  turn: random bytes at once; random bytes after reading main's HELLO (so they
  reach the frame parser rather than a socket main already found closed); a
  valid HELLO, then a frame header claiming 60 MiB and a few bytes of it.
  Reported: the growth of ``VmRSS`` and of peak RSS (``VmHWM``) once main
  has dropped them all.

Both need many descriptors: the soft ``RLIMIT_NOFILE`` is raised to the hard
limit here and in the servers; a hard limit too low for ``n`` makes the case
unavailable, with the reason.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import os
import random
import resource
import socket
import sys
import time
from collections.abc import Iterator
from typing import Any, Final

from .common import Params, Result, child_init, join_or_kill, scratch_dir, spawn_ctx, unavailable

__all__ = [
    "FloodStats",
    "IdleStats",
    "ServerProcess",
    "flood",
    "idle",
    "mem_tether_flood",
    "mem_tether_idle",
    "mem_websockets_idle",
    "raised_nofile",
]

#: bound on every wait here (start-up, handshakes, the server catching up)
WAIT: Final = 30.0
#: descriptors needed besides the connections (the interpreter, the loop, a margin)
SPARE_FDS: Final = 64
GARBAGE: Final = 300
#: connections opened before the baseline is read
WARMUP: Final = 50


# -- descriptors ---------------------------------------------------------------------


@contextlib.contextmanager
def raised_nofile(n: int) -> Iterator[None]:
    """Raise this process's soft ``RLIMIT_NOFILE`` to the hard limit for the block.

    Raises:
        OSError: the hard limit is below ``n`` (the message says both).
    """
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and hard < n:
        raise OSError(f"needs {n} descriptors; RLIMIT_NOFILE hard limit is {hard}")
    if soft != resource.RLIM_INFINITY and soft < n:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def nofile_shortfall(n: int) -> str | None:
    """Why ``n`` connections cannot be held here, or ``None`` if they can."""
    need = n + WARMUP + SPARE_FDS
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    if hard != resource.RLIM_INFINITY and hard < need:
        return f"{n} connections need {need} descriptors; the RLIMIT_NOFILE hard limit is {hard}"
    return None


# -- the servers (module level: started with ``spawn``) ------------------------------


def _raise_own_nofile() -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


async def _tether_server(path: str, lifetime: float) -> None:
    import tether

    main = tether.Main(hello_timeout=lifetime)
    main.handle("peers", lambda call: len(main.peers))
    async with main:
        # No connection limits: the bench measures what many connections cost.
        await main.listen(f"unix://{path}", max_connections=None, max_handshaking=None)
        await asyncio.sleep(lifetime)


async def _websockets_server(path: str, lifetime: float) -> None:
    from websockets.asyncio.server import ServerConnection, unix_serve

    async def hold(ws: ServerConnection) -> None:
        await ws.wait_closed()

    async with unix_serve(hold, path, compression=None):
        await asyncio.sleep(lifetime)


def serve(kind: str, path: str, lifetime: float, parent_pid: int) -> None:
    """A server process: ``kind`` is ``tether`` or ``websockets``; ends after ``lifetime`` s."""
    child_init(parent_pid)
    _raise_own_nofile()
    import logging

    logging.disable(logging.WARNING)  # a flood would log one line per connection
    from ..aio.loop import run

    server = _tether_server if kind == "tether" else _websockets_server
    run(server(path, lifetime))


class ServerProcess:
    """One server in a fresh process; ``with`` it to start and stop it.

    For tether, a control connection (a blocking client) is opened first and
    kept, so its descriptor stays low (the blocking client waits with
    ``select``); :meth:`held` asks main through it how many peers it holds.
    """

    def __init__(self, kind: str, path: str, lifetime: float = 300.0) -> None:
        self.kind = kind
        self.path = path
        self.address = f"unix://{path}"
        self._proc = spawn_ctx().Process(
            target=serve, args=(kind, path, lifetime, os.getpid()), daemon=True
        )
        self._control: Any = None

    def __enter__(self) -> ServerProcess:
        self._proc.start()
        deadline = time.monotonic() + WAIT
        while True:
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
                if probe.connect_ex(self.path) == 0:
                    break
            if not self._proc.is_alive() or time.monotonic() > deadline:
                raise RuntimeError(f"the {self.kind} server did not start listening")
            time.sleep(0.02)
        if self.kind == "tether":
            from .. import sync

            try:
                self._control = sync.connect(self.address, timeout=WAIT)
            except BaseException:
                self.__exit__()
                raise
        return self

    def __exit__(self, *exc: object) -> None:
        if self._control is not None:
            self._control.close()
            self._control = None
        self._proc.terminate()
        join_or_kill(self._proc)

    def held(self) -> int:
        """How many connections a tether main holds, besides the control one."""
        n: int = self._control.invoke("peers")
        return n - 1

    @property
    def pid(self) -> int:
        assert self._proc.pid is not None
        return self._proc.pid

    def status(self) -> dict[str, int]:
        """The server's ``VmRSS`` and ``VmHWM`` (peak RSS), in KiB."""
        out = {}
        with open(f"/proc/{self.pid}/status") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key in ("VmRSS", "VmHWM"):
                    out[key] = int(value.split()[0])
        return out


# -- clients ---------------------------------------------------------------------------


def _tether_hello() -> bytes:
    from .. import codec
    from ..wire import Kind, encode_frame

    hello = codec.Hello(
        protocol=codec.PROTOCOL_NAME,
        version=codec.PROTOCOL_VERSION,
        role="client",
        name="connmem",
        pid=os.getpid(),
        features=["fd", "lease"],
    )
    out = bytearray()
    encode_frame(out, Kind.HELLO, 0, 0, b"", codec.encoder.encode(hello))
    return bytes(out)


def _ws_request() -> bytes:
    key = base64.b64encode(os.urandom(16)).decode()
    return (
        "GET / HTTP/1.1\r\nHost: localhost\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n"
    ).encode()


def _recv_some(sock: socket.socket, until: bytes | None = None) -> bytes:
    """Read what the server sends first (its HELLO, or the HTTP response head)."""
    data = b""
    while True:
        chunk = sock.recv(65536)
        if not chunk:
            raise ConnectionError("the server closed the connection during the handshake")
        data += chunk
        if until is None or until in data:
            return data


def _open(server: ServerProcess, hello: bytes) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.settimeout(WAIT)
        sock.connect(server.path)
        if server.kind == "tether":
            sock.sendall(hello)
            _recv_some(sock)
        else:
            sock.sendall(_ws_request())
            head = _recv_some(sock, b"\r\n\r\n")
            if not head.startswith(b"HTTP/1.1 101"):
                raise ConnectionError(f"websockets refused the upgrade: {head[:40]!r}")
    except BaseException:
        sock.close()
        raise
    return sock


def _settle(server: ServerProcess, expected: int) -> None:
    """Wait until the server holds ``expected`` peers (tether) or a moment (websockets)."""
    if server.kind != "tether":
        time.sleep(0.5)
        return
    deadline = time.monotonic() + WAIT
    while (held := server.held()) != expected:
        if time.monotonic() > deadline:
            raise RuntimeError(f"main holds {held} connections, expected {expected}")
        time.sleep(0.05)


class IdleStats(dict[str, Any]):
    """``n``, ``rss_before_kib``, ``rss_after_kib``, ``kib_per_connection``, ``seconds``."""


def idle(kind: str, n: int, path: str) -> IdleStats:
    """Hold ``n`` idle connections to a fresh ``kind`` server; measure its RSS growth.

    Raises:
        OSError: too few descriptors (see :func:`raised_nofile`).
        RuntimeError, ConnectionError: a server misbehaved.
    """
    hello = _tether_hello()
    socks: list[socket.socket] = []
    with raised_nofile(n + WARMUP + SPARE_FDS), ServerProcess(kind, path) as server:
        try:
            socks.extend(_open(server, hello) for _ in range(WARMUP))
            _settle(server, WARMUP)
            before = server.status()["VmRSS"]
            t0 = time.perf_counter()
            socks.extend(_open(server, hello) for _ in range(n))
            _settle(server, WARMUP + n)
            elapsed = time.perf_counter() - t0
            after = server.status()["VmRSS"]
        finally:
            for s in socks:
                s.close()
    return IdleStats(
        n=n,
        rss_before_kib=before,
        rss_after_kib=after,
        kib_per_connection=(after - before) / n,
        seconds=round(elapsed, 2),
    )


class FloodStats(dict[str, Any]):
    """``n`` (sent), ``start_kib``, ``end_kib``, ``peak_kib``, ``seconds``, ``stopped``."""


def flood(n: int, path: str, *, stop_above_kib: int | None = None, seed: int = 6) -> FloodStats:
    """Send ``n`` garbage connections to a fresh tether Main; measure its RSS.

    ``stop_above_kib``: stop early once RSS or peak RSS grew by more than
    this (checked every 250 connections), so a regression fails fast instead
    of exhausting the machine; ``stopped`` then says after how many.
    """
    rnd = random.Random(seed)
    hello = _tether_hello()
    with raised_nofile(WARMUP + SPARE_FDS), ServerProcess("tether", path) as server:
        start = server.status()
        t0 = time.perf_counter()
        sent = 0
        stopped = False
        for i in range(n):
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
                sock.settimeout(WAIT)
                sock.connect(server.path)
                try:
                    if i % 3:
                        _recv_some(sock)  # main's HELLO: main is reading us now
                    if i % 3 == 2:  # a HELLO, then a length claimed and not sent
                        claim = hello + (60 << 20).to_bytes(4, "little")
                        sock.sendall(claim + bytes(GARBAGE - len(claim) % GARBAGE))
                    else:
                        sock.sendall(rnd.randbytes(GARBAGE))
                except OSError:
                    pass  # main may drop us first: that is its right
            sent += 1
            if stop_above_kib is not None and not sent % 250:
                now = server.status()
                if max(now["VmRSS"] - start["VmRSS"], now["VmHWM"] - start["VmRSS"]) > (
                    stop_above_kib
                ):
                    stopped = True
                    break
        if not stopped:
            _settle(server, 0)
        elapsed = time.perf_counter() - t0
        end = server.status()
    return FloodStats(
        n=sent,
        start_kib=start["VmRSS"],
        end_kib=end["VmRSS"],
        peak_kib=end["VmHWM"],
        seconds=round(elapsed, 2),
        stopped=stopped,
    )


# -- the scenarios -----------------------------------------------------------------------


def _idle_case(kind: str, params: Params) -> Result:
    n = 2000 if params.get("quick") else 10000
    why = nofile_shortfall(n)
    if why is not None:
        return unavailable(why)
    if kind == "websockets":
        try:
            import websockets  # noqa: F401
        except ModuleNotFoundError:
            return unavailable("websockets is not installed")
    with scratch_dir() as d:
        stats = idle(kind, n, os.path.join(d, "s.sock"))
    return {
        "metrics": [
            {
                "metric": "idle connection",
                "unit": "KiB",
                "better": "lower",
                "samples": [round(stats["kib_per_connection"], 2)],
            }
        ],
        "info": {f"{kind}_idle": dict(stats)},
    }


def mem_tether_idle(params: Params) -> Result:
    """KiB per idle connection held by a tether Main."""
    return _idle_case("tether", params)


def mem_websockets_idle(params: Params) -> Result:
    """KiB per idle connection held by a websockets asyncio server (no compression)."""
    return _idle_case("websockets", params)


def mem_tether_flood(params: Params) -> Result:
    """RSS growth of a tether Main after a flood of garbage connections."""
    n = 5000 if params.get("quick") else 20000
    with scratch_dir() as d:
        stats = flood(n, os.path.join(d, "s.sock"))

    def mib(kib: int) -> float:
        return round(kib / 1024, 2)

    return {
        "metrics": [
            {
                "metric": "RSS growth",
                "unit": "MiB",
                "better": "lower",
                "samples": [mib(stats["end_kib"] - stats["start_kib"])],
            },
            {
                "metric": "peak RSS growth",
                "unit": "MiB",
                "better": "lower",
                "samples": [mib(stats["peak_kib"] - stats["start_kib"])],
            },
        ],
        "info": {"tether_flood": dict(stats)},
    }


if __name__ == "__main__":  # python -m tether.bench.connmem KIND N: a quick look
    with scratch_dir() as d:
        p = os.path.join(d, "s.sock")
        kind, count = sys.argv[1], int(sys.argv[2])
        print(flood(count, p) if kind == "flood" else idle(kind, count, p))
