"""Fuzz live listeners: a real main on a unix socket, in its own process, under hostile sessions.

Two servers are attacked the same way: an asyncio :class:`tether.Main` from
``listen()`` (mode ``aio``), and a plain accept loop handing each connection to
a blocking :class:`tether.sync.Peer` that serves handlers (mode ``sync``). A
*session* is one short connection that sends garbage, mutated or truncated
frames, unclaimed descriptors or floods, then hangs up; several run at once,
while one well-behaved client keeps invoking. The server must survive, answer
the good client between every two batches of sessions, log only the documented
warnings, and keep its descriptors, threads and RSS bounded during the run and
back at their start afterwards.

Used by ``tests/test_fuzz_live.py`` (a few hundred to a few thousand sessions)
and by ``make fuzz`` (100,000 per server)::

    python fuzz/live.py --mode aio --sessions 100000 --max-seconds 900

Exit status 0 if every check held, 1 otherwise (each failed check on stderr).
The run stops at ``--sessions`` or at ``--max-seconds``, whichever comes
first; stopping on time is reported but is not a failure. The server half runs
as ``python fuzz/live.py serve {aio,sync} PATH`` and reports through a
``stats`` channel.
"""

from __future__ import annotations

import argparse
import array
import concurrent.futures
import contextlib
import gc
import logging
import os
import random
import re
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
PARALLEL = 6  # sessions at once
BATCH = 30  # sessions between two checks that the good client is answered
CHECK_EVERY = 2000  # sessions between two resource checks during a run
# The only warnings a server may log for what the fuzzer sends (docs/protocol.md 8.1, 10.1).
DOCUMENTED = re.compile(
    r"broke the protocol|dropped event|> refused |were not logged|in the handshake: dropped"
)
# Bounds during the run, above the start: what PARALLEL sessions in flight (and the
# connections the server has not yet noticed are gone) may hold, and a generous RSS margin.
MAX_EXTRA_FDS = 256
MAX_EXTRA_THREADS = 64
MAX_RUN_RSS_MIB = 256
MAX_END_RSS_MIB = 64  # growth still there once every session is released
ATTACKS = (
    *("garbage", "mutated", "truncated", "flood", "events", "oversize", "fds"),
    *("hello_only", "mutated_hello", "nothing", "after_goodbye"),
)


# --- the server process ------------------------------------------------------------------


def serve(mode: str, path: str, lifetime: float = 7200.0) -> None:
    """Serve ``echo``/``size``/``anything``/``stats`` (and two events) on ``path``.

    Prints ``ready`` once listening; runs until killed (or ``lifetime`` seconds).
    """
    import tether
    import tether.sync

    keeper = LogKeeper()
    records = keeper.records
    logging.getLogger().addHandler(keeper)
    logging.getLogger().setLevel(logging.INFO)

    def on_thread_error(args: threading.ExceptHookArgs) -> None:
        msg = f"uncaught in thread {args.thread.name if args.thread else '?'}"
        records.append(
            {"logger": "threading", "level": 50, "msg": msg, "exc": repr(args.exc_value)}
        )

    threading.excepthook = on_thread_error
    live: list[Any] = []

    def stats(call: Any, collect: bool = True) -> dict[str, Any]:
        live[:] = [p for p in live if not p.closed]  # what the accept loop would drop next
        if collect:
            gc.collect()
        with open("/proc/self/statm") as f:
            rss_pages = int(f.read().split()[1])
        return {
            "fds": len(os.listdir("/proc/self/fd")),
            "threads": threading.active_count(),
            "thread_names": sorted(t.name for t in threading.enumerate()),
            "peers": len(main.peers) if mode == "aio" else sum(not p.closed for p in live),
            "rss_kib": rss_pages * os.sysconf("SC_PAGE_SIZE") // 1024,
            "records": records[:50],
            "n_records": keeper.counted,
        }

    def echo(call: Any, x: int) -> int:
        return x

    def size(call: Any, data: bytes, *, pad: int = 0) -> int:
        return len(data)

    def anything(call: Any, *args: Any) -> int:
        return len(args)

    def note(call: Any, x: int, label: str = "") -> None:
        pass

    def raw(call: Any, data: Any) -> None:
        pass

    class Room:
        """A route host: the route's own ``echo`` and ``note``."""

        def __init__(self, route: Any) -> None:
            route.handle("echo", echo)
            route.on("note", note)

        def close(self) -> None:
            pass

    def register(h: Any) -> None:
        h.host("room", Room)
        h.handle("echo", echo)
        h.handle("size", size)
        h.handle("anything", anything)
        h.handle("stats", stats)
        h.handle("admin", echo, roles={"admin"})
        h.on("note", note)
        h.on("raw", raw)

    if mode == "aio":
        import asyncio

        main = tether.Main(hello_timeout=3.0)
        register(main)

        async def amain() -> None:
            async with main:
                await main.listen(f"unix://{path}")
                print("ready", flush=True)
                await asyncio.sleep(lifetime)  # the client kills us long before

        asyncio.run(amain())
        return

    srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    srv.bind(path)
    srv.listen(128)
    srv.settimeout(0.5)
    print("ready", flush=True)
    end = time.monotonic() + lifetime
    while time.monotonic() < end:
        try:
            conn, _ = srv.accept()
        except TimeoutError:
            continue
        live[:] = [p for p in live if not p.closed]
        try:
            peer = tether.sync.Peer(conn, role="client", local_role="main", name="fuzzed")
        except tether.PeerGone:
            continue  # hung up before our HELLO went out
        live.append(peer)
        register(peer)
        del peer, conn  # only `live` holds peers, and it drops the closed ones


class LogKeeper(logging.Handler):
    """Keeps the first 1,000 log records the docs do not promise; only counts the others.

    100,000 sessions log tens of thousands of documented warnings ("broke the
    protocol"): keeping those would crowd out a later undocumented one.
    """

    def __init__(self) -> None:
        super().__init__()
        self.records: list[dict[str, Any]] = []
        self.counted = 0

    def emit(self, record: logging.LogRecord) -> None:
        self.counted += 1
        kept = {
            "logger": record.name,
            "level": record.levelno,
            "msg": record.getMessage()[:400],
            "exc": repr(record.exc_info[1])[:400] if record.exc_info else "",
        }
        if record.levelno >= logging.WARNING and not _documented(kept) and len(self.records) < 1000:
            self.records.append(kept)


def _documented(record: dict[str, Any]) -> bool:
    """A warning the docs promise for hostile input (no traceback attached)."""
    return (
        record["logger"] == "tether"
        and record["level"] == logging.WARNING
        and bool(DOCUMENTED.search(record["msg"]))
        and not record["exc"]
    )


def undocumented(records: list[dict[str, Any]]) -> list[tuple[str, str, str]]:
    """The log records at WARNING or above that the docs do not promise, deduplicated."""
    return sorted(
        {
            (r["logger"], r["msg"][:120], r["exc"][:160])
            for r in records
            if r["level"] >= logging.WARNING and not _documented(r)
        }
    )


# --- the fuzzing client --------------------------------------------------------------------


def hello(features: list[str] | None = None) -> bytes:
    """A client's HELLO frame announcing ``features``."""
    from tether.codec import Hello, encoder
    from tether.wire import Kind

    msg = Hello(protocol="tether", version=1, role="client", name="fuzz", features=features or [])
    return frame(Kind.HELLO, 0, b"", encoder.encode(msg))


def frame(
    kind: int,
    rid: int,
    channel: bytes,
    body: bytes,
    atts: list[bytes] | None = None,
    route: int = 0,
) -> bytes:
    """One encoded frame (inline attachments)."""
    from tether.wire import encode_frame

    out = bytearray()
    encode_frame(out, kind, rid, route, channel, body, atts or [])
    return bytes(out)


def valid_frames(rng: random.Random) -> list[bytes]:
    """A handful of well-formed frames of every kind a client may send."""
    from tether.codec import encoder
    from tether.wire import Kind

    rid = rng.randrange(1, 1 << 32)
    deep = b"\x91" * rng.choice([10, 1500, 5000]) + b"\x00"
    return [
        frame(Kind.INVOKE, rid, b"echo", encoder.encode([rng.randrange(-(2**63), 2**63)])),
        frame(Kind.INVOKE, rid + 1, b"echo", encoder.encode(["not an int"])),
        frame(Kind.INVOKE, rid + 2, b"size", b"\x91\xd6\x01\x00\x00\x00\x00", [b"x" * 100]),
        frame(Kind.INVOKE, rid + 3, b"anything", b"\x91" + deep),
        frame(Kind.INVOKE, rid + 4, b"admin", encoder.encode([1])),
        frame(Kind.INVOKE, rid + 5, b"nobody", encoder.encode([])),
        frame(Kind.EVENT, 0, b"note", encoder.encode([1, "x"])),
        frame(Kind.EVENT, 0, b"note", encoder.encode(["bad"])),
        frame(Kind.EVENT, 0, b"raw", b"\x91" + deep),
        frame(Kind.CANCEL, rid, b"", b""),
        frame(Kind.PING, rid, b"", b""),
        frame(Kind.RESULT, rid + 9, b"", encoder.encode(1)),
        frame(Kind.ROUTE_OPEN, rid + 10, b"room", b"\x90", route=1),
        frame(Kind.INVOKE, rid + 11, b"echo", encoder.encode([7]), route=1),
        frame(Kind.EVENT, 0, b"note", encoder.encode([1]), route=1),
        frame(Kind.ROUTE_OPEN, rid + 12, b"nowhere", b"\x90", route=2),
        frame(Kind.ROUTE_CLOSE, 0, b"", b"", route=1),
        frame(Kind.INVOKE, rid + 13, b"echo", encoder.encode([7]), route=1),
        frame(Kind.GOODBYE, 0, b"", encoder.encode({"reason": "fuzz"})),
    ]


def mutate(rng: random.Random, data: bytes) -> bytes:
    """``data`` with 1-5 bytes flipped, set to edge values, deleted or inserted."""
    buf = bytearray(data)
    for _ in range(rng.randrange(1, 6)):
        if not buf:
            break
        i = rng.randrange(len(buf))
        op = rng.randrange(4)
        if op == 0:
            buf[i] ^= rng.randrange(1, 256)
        elif op == 1:
            buf[i] = rng.choice([0, 0xFF, 0x7F, 0x80])
        elif op == 2:
            del buf[i : i + rng.randrange(1, 8)]
        else:
            buf[i:i] = rng.randbytes(rng.randrange(1, 8))
    return bytes(buf)


def _send_fds(sock: socket.socket, data: bytes, n: int) -> None:
    fds = [os.open("/dev/null", os.O_RDONLY) for _ in range(n)]
    try:
        sock.sendmsg([data], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))])
    finally:
        for fd in fds:
            os.close(fd)


def attack(path: str, seed: int, only: str | None = None) -> str:
    """One hostile session (connection); returns the name of what it did (``only``: force that)."""
    from tether.wire import HEADER, Kind

    rng = random.Random(seed)
    how = only or rng.choice(ATTACKS)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(2.0)
    try:
        sock.connect(path)
        hi = hello(rng.choice([[], ["fd"], ["fd", "lease"]]))
        frames = [f for f in valid_frames(rng) if f]
        if how == "garbage":
            sock.sendall(rng.randbytes(rng.randrange(1, 3000)))
        elif how == "mutated":
            body = b"".join(rng.sample(frames, rng.randrange(1, len(frames))))
            sock.sendall(hi + mutate(rng, body))
        elif how == "truncated":
            stream = hi + b"".join(rng.sample(frames, 3))
            sock.sendall(stream[: rng.randrange(1, len(stream))])
        elif how == "flood":
            sock.sendall(hi + frames[0] * rng.randrange(200, 2000))
        elif how == "events":
            sock.sendall(hi + b"".join(rng.choice(frames[6:9]) for _ in range(500)))
        elif how == "oversize":
            size = rng.choice([0xFFFFFFFF, 1 << 30, 60 << 20, 3])
            head = HEADER.pack(size, Kind.INVOKE, 0, 4, 1, 0, 0, 0)
            sock.sendall(hi + head + b"echo" + rng.randbytes(rng.randrange(0, 1 << 16)))
        elif how == "fds":
            # Descriptors nobody claims, beside a HELLO and beside frames that claim some.
            _send_fds(sock, hi, rng.randrange(1, 4))
            att = b"\x01\x00\x00\x00" + b"\x00" * 4 + (100).to_bytes(8, "little")
            claim = HEADER.pack(16 + 4 + 16 + 1, Kind.INVOKE, 0, 4, 7, 0, 1, 0) + b"size"
            _send_fds(sock, claim + att + b"\x90", rng.randrange(0, 3))
            for _ in range(rng.randrange(1, 5)):
                _send_fds(sock, frames[6], 2)
        elif how == "hello_only":
            sock.sendall(hi)
            if rng.random() < 0.5:
                sock.recv(4096)  # main's HELLO
        elif how == "mutated_hello":
            sock.sendall(mutate(rng, hi) + frames[0])
        elif how == "after_goodbye":
            sock.sendall(hi + frames[-1] + b"".join(frames[:9]))
        # "nothing": connect and hang up at once
        if rng.random() < 0.3:  # read what came back, if anything, before hanging up
            sock.settimeout(0.1)
            with contextlib.suppress(OSError):
                sock.recv(65536)
    except OSError:
        pass  # the server may drop us at any point: that is its right
    finally:
        sock.close()
    return how


class GoodClient(threading.Thread):
    """Invokes ``echo`` in a loop until told to stop; every answer must be right."""

    def __init__(self, path: str) -> None:
        super().__init__(daemon=True, name="good-client")
        import tether.sync

        self.peer = tether.sync.connect(f"unix://{path}", timeout=15.0, spin=0.0)
        self.stop = threading.Event()
        self.calls = 0
        self.errors: list[str] = []

    def run(self) -> None:
        try:
            while not self.stop.is_set():
                n = self.calls
                got = self.peer.invoke("echo", n)
                if got != n:
                    self.errors.append(f"echo({n}) returned {got!r}")
                self.calls += 1
                time.sleep(0.002)
        except Exception as exc:
            self.errors.append(repr(exc))

    def stats(self, collect: bool = True) -> dict[str, Any]:
        result: dict[str, Any] = self.peer.invoke("stats", collect)
        return result


@contextlib.contextmanager
def server(mode: str, directory: Path) -> Any:
    """The server process for ``mode``, listening on a socket in ``directory``."""
    path = str(directory / "fuzz.sock")
    env = {**os.environ, "PYTHONPATH": str(Path(__import__("tether").__file__).parent.parent)}
    proc = subprocess.Popen(
        [sys.executable, __file__, "serve", mode, path],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=env,
        text=True,
    )
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        assert line.strip() == "ready", (
            line,
            proc.stderr.read() if proc.stderr and proc.poll() is not None else "",
        )
        yield proc, path
    finally:
        proc.kill()
        _, err = proc.communicate(timeout=10)
        proc.stderr_text = err  # type: ignore[attr-defined]


def _settle(client: GoodClient, base: dict[str, Any], *, threads: bool) -> dict[str, Any]:
    """Stats once the server has released the fuzzers' connections (or 20 s passed)."""
    deadline = time.monotonic() + 20.0
    while True:
        now = client.stats()
        done = now["peers"] <= base["peers"] and now["fds"] <= base["fds"]
        if threads:
            done = done and now["threads"] <= base["threads"]
        if done or time.monotonic() > deadline:
            return now
        time.sleep(0.2)


class Outcome:
    """What one fuzzing run against one server saw."""

    def __init__(self, mode: str) -> None:
        self.mode = mode
        self.sessions = 0
        self.kinds: dict[str, int] = {}
        self.calls = 0
        self.errors: list[str] = []
        self.alive_after_fuzz = False
        self.alive_at_end = False
        self.base: dict[str, Any] = {}
        self.after: dict[str, Any] = {}
        self.peak: dict[str, int] = {"fds": 0, "threads": 0, "rss_kib": 0}
        self.stderr = ""
        self.seconds = 0.0
        self.fuzz_seconds = 0.0
        self.out_of_time = False

    def problems(self) -> list[str]:
        """Every check that failed, as readable lines (empty: the server held)."""
        bad: list[str] = []
        if not (self.alive_after_fuzz and self.alive_at_end):
            bad.append(f"the server died:\n{self.stderr[-3000:]}")
        bad += [f"good client: {e}" for e in self.errors]
        if self.calls < self.sessions // BATCH:
            bad.append(f"good client answered {self.calls} times for {self.sessions} sessions")
        if "Traceback" in self.stderr:
            bad.append(f"traceback on the server's stderr:\n{self.stderr[-3000:]}")
        if not self.base:
            return bad
        base = self.base
        for key, limit in (("fds", MAX_EXTRA_FDS), ("threads", MAX_EXTRA_THREADS)):
            if self.peak[key] > base[key] + limit:
                bad.append(f"{key} reached {self.peak[key]} during the run (start {base[key]})")
        if (self.peak["rss_kib"] - base["rss_kib"]) / 1024 > MAX_RUN_RSS_MIB:
            bad.append(f"RSS reached {self.peak['rss_kib']} KiB (start {base['rss_kib']})")
        if not self.after:
            bad.append("no stats after the fuzz")
            return bad
        after = self.after
        for key in ("peers", "fds", "threads"):
            if after[key] > base[key]:
                bad.append(f"{key}: {base[key]} before, {after[key]} after")
        if (after["rss_kib"] - base["rss_kib"]) / 1024 >= MAX_END_RSS_MIB:
            bad.append(f"RSS {after['rss_kib']} KiB after, {base['rss_kib']} KiB before")
        bad += [f"undocumented log record: {r}" for r in undocumented(after["records"])]
        return bad


def fuzz_live(
    mode: str,
    directory: Path,
    sessions: int,
    *,
    max_seconds: float = 600.0,
    parallel: int = PARALLEL,
    only: str | None = None,
    seed: int = 0,
    progress: bool = False,
) -> Outcome:
    """Run up to ``sessions`` hostile sessions (at most ``max_seconds``) against one server."""
    out = Outcome(mode)
    start = time.monotonic()
    with server(mode, directory) as (proc, path):
        client = GoodClient(path)
        try:
            out.base = client.stats()
            client.start()
            fuzz_start = time.monotonic()
            stop_at = fuzz_start + max_seconds
            next_check = CHECK_EVERY
            with concurrent.futures.ThreadPoolExecutor(parallel) as pool:
                for batch in range(0, sessions, BATCH):
                    if time.monotonic() > stop_at:
                        out.out_of_time = True
                        break
                    seeds = range(seed + batch, seed + min(batch + BATCH, sessions))
                    for how in pool.map(lambda s: attack(path, s, only), seeds):
                        out.kinds[how] = out.kinds.get(how, 0) + 1
                        out.sessions += 1
                    # The good client must get answers between every two batches.
                    seen, until = client.calls, time.monotonic() + 15.0
                    while client.calls == seen and client.is_alive() and time.monotonic() < until:
                        time.sleep(0.001)
                    if client.calls == seen:
                        client.errors.append(f"no answer to the good client after {out.sessions}")
                        break
                    if out.sessions >= next_check:
                        next_check += CHECK_EVERY
                        now = client.stats(collect=False)
                        for key in out.peak:
                            out.peak[key] = max(out.peak[key], now[key])
                        if progress:
                            rate = out.sessions / (time.monotonic() - fuzz_start)
                            print(
                                f"  {mode}: {out.sessions} sessions, {rate:.0f}/s, "
                                f"fds {now['fds']}, threads {now['threads']}, "
                                f"rss {now['rss_kib'] // 1024} MiB",
                                file=sys.stderr,
                                flush=True,
                            )
            out.fuzz_seconds = time.monotonic() - fuzz_start
            out.alive_after_fuzz = proc.poll() is None
            client.stop.set()
            client.join(20.0)
            if client.is_alive():
                client.errors.append("the good client is stuck")
            out.calls, out.errors = client.calls, client.errors
            if out.alive_after_fuzz and not client.errors:
                out.after = _settle(client, out.base, threads=mode == "sync")
                for key in out.peak:
                    out.peak[key] = max(out.peak[key], out.after[key])
        finally:
            client.stop.set()
            client.peer.close()
        out.alive_at_end = proc.poll() is None
    out.stderr = proc.stderr_text  # type: ignore[attr-defined]
    out.seconds = time.monotonic() - start
    return out


def main(argv: list[str] | None = None) -> int:
    """``python fuzz/live.py --mode aio|sync --sessions N [--max-seconds T]``; 0 if it held."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--mode", choices=["aio", "sync"], action="append")
    parser.add_argument("--sessions", type=int, default=100_000)
    parser.add_argument("--max-seconds", type=float, default=900.0)
    parser.add_argument("--parallel", type=int, default=PARALLEL)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.ERROR)
    failed = False
    for mode in args.mode or ["aio", "sync"]:
        with tempfile.TemporaryDirectory(prefix="tether-fuzz-") as tmp:
            out = fuzz_live(
                mode,
                Path(tmp),
                args.sessions,
                max_seconds=args.max_seconds,
                parallel=args.parallel,
                seed=args.seed,
                progress=True,
            )
        rate = out.sessions / out.fuzz_seconds if out.fuzz_seconds else 0.0
        print(
            f"{mode}: {out.sessions} sessions in {out.fuzz_seconds:.1f} s ({rate:.0f}/s)"
            f"{' (stopped by --max-seconds)' if out.out_of_time else ''}; "
            f"good client answered {out.calls} times; peak fds {out.peak['fds']} "
            f"(start {out.base.get('fds')}), threads {out.peak['threads']} "
            f"(start {out.base.get('threads')}), RSS {out.peak['rss_kib'] // 1024} MiB "
            f"(start {out.base.get('rss_kib', 0) // 1024}); kinds {out.kinds}",
            flush=True,
        )
        for problem in out.problems():
            failed = True
            print(f"FAIL {mode}: {problem}", file=sys.stderr, flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    if sys.argv[1:2] == ["serve"]:
        serve(sys.argv[2], sys.argv[3])
    else:
        sys.exit(main())
