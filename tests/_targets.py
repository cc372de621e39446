"""Module-level code the behaviour tests run in other processes, and main-side helpers.

Child targets live here (not in the test modules) so every start method can
import them by name: ``spawn`` and ``forkserver`` re-import this module in the
child. ``main_script`` is what the subprocess tests run as a whole "main"
program (``python -c 'import _targets; _targets.main_script(...)'``).
"""

from __future__ import annotations

import asyncio
import os
import sys
import threading
import time
from collections.abc import Callable
from typing import Any

import msgspec

import tether

# -- main side ------------------------------------------------------------------


class Point(msgspec.Struct):
    x: int
    y: int


class CustomError(Exception):
    """Raised by a handler, to check that the qualified type name crosses."""


class Recorder:
    """What main's handlers saw, for the tests to assert on."""

    def __init__(self) -> None:
        self.started: list[str] = []
        self.cancelled: list[str] = []
        self.finished: list[str] = []
        self.remote_started: list[str] = []
        self.remote_cancelled: list[str] = []
        self.numbers: list[int] = []
        self.results: list[Any] = []
        self.peers: list[Any] = []

    async def wait_until(self, predicate: Callable[[], bool], timeout: float = 10.0) -> None:
        """Poll ``predicate`` until it holds; ``TimeoutError`` after ``timeout`` s."""
        deadline = time.monotonic() + timeout
        while not predicate():
            if time.monotonic() > deadline:
                raise TimeoutError(f"condition not met within {timeout} s")
            await asyncio.sleep(0.005)


def install_main_handlers(main: tether.Main, roles: Any = None) -> Recorder:
    """Register the handlers every behaviour test uses on ``main``.

    ``roles``: the roles of those that name none (``None``: local peers only;
    a hub that TCP clients call names their role).
    """
    rec = Recorder()

    @main.handle("echo", roles=roles)
    def echo(call: tether.Call, x: Any) -> Any:
        return x

    @main.handle("aecho", roles=roles)
    async def aecho(call: tether.Call, x: Any) -> Any:
        await asyncio.sleep(0)
        return x

    @main.handle("add", roles=roles)
    def add(call: tether.Call, a: int, b: int) -> int:
        return a + b

    @main.handle("boom", roles=roles)
    def boom_handler(call: tether.Call, x: int) -> int:
        raise ValueError(f"bad value {x}")

    @main.handle("aboom", roles=roles)
    async def aboom_handler(call: tether.Call, x: int) -> int:
        await asyncio.sleep(0)
        raise CustomError(f"async bad value {x}")

    @main.handle("typed", roles=roles)
    def typed(call: tether.Call, x: int) -> int:
        return x + 1

    @main.handle("point", roles=roles)
    def point(call: tether.Call, label: str, p: Point) -> str:
        return f"{label}:{p.x + p.y}"

    @main.handle("items", roles=roles)
    def items(call: tether.Call, items: list[int]) -> int:
        return sum(items)

    @main.handle("child_only", roles={"child"})
    def child_only(call: tether.Call) -> str:
        return f"secret for {call.peer.role}"

    @main.handle("sleepy", roles=roles)
    async def sleepy(call: tether.Call, tag: str, seconds: float = 5.0) -> str:
        rec.started.append(tag)
        try:
            await asyncio.sleep(seconds)
        except asyncio.CancelledError:
            rec.cancelled.append(tag)
            raise
        rec.finished.append(tag)
        return f"slept {tag}"

    @main.handle("register", roles=roles)
    async def register(call: tether.Call, x: int) -> int:
        rec.peers.append(call.peer)
        # Call the registering peer back while its own invoke is still pending.
        return int(await call.peer.invoke("triple", x, timeout=10.0)) + 1

    @main.on("num", roles=roles)
    def on_num(call: tether.Call, i: int) -> None:
        rec.numbers.append(i)

    @main.on("started", roles=roles)
    def on_started(call: tether.Call, tag: str) -> None:
        rec.remote_started.append(tag)

    @main.on("cancelled", roles=roles)
    def on_cancelled(call: tether.Call, tag: str) -> None:
        rec.remote_cancelled.append(tag)

    @main.on("result", roles=roles)
    def on_result(call: tether.Call, value: Any) -> None:
        rec.results.append(value)

    return rec


# -- async child targets ----------------------------------------------------------


def _install_forever(peer: tether.Peer) -> None:
    @peer.handle("forever")
    async def forever(call: tether.Call, tag: str) -> None:
        await call.peer.send("started", tag)
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            await call.peer.send("cancelled", tag)
            raise

    @peer.handle("ping")
    def ping(call: tether.Call) -> str:
        return "pong"


async def serve_basic(peer: tether.Peer) -> None:
    """A child that answers the channels the main<->child tests use, until main closes."""
    numbers: list[int] = []
    _install_forever(peer)

    @peer.handle("echo")
    def echo(call: tether.Call, x: Any) -> Any:
        return x

    @peer.handle("aecho")
    async def aecho(call: tether.Call, x: Any) -> Any:
        await asyncio.sleep(0)
        return x

    @peer.handle("double")
    def double(call: tether.Call, x: int) -> int:
        return 2 * x

    @peer.handle("pid")
    def pid(call: tether.Call) -> int:
        return os.getpid()

    @peer.handle("relay")
    async def relay(call: tether.Call, a: int, b: int) -> int:
        return 10 * int(await call.peer.invoke("add", a, b))

    @peer.handle("storm")
    async def storm(call: tether.Call, n: int) -> list[Any]:
        return await asyncio.gather(*(call.peer.invoke("echo", [i, f"c{i}"]) for i in range(n)))

    @peer.handle("send_numbers")
    async def send_numbers(call: tether.Call, n: int) -> int:
        for i in range(n):
            await call.peer.send("num", i)
        return n

    @peer.on("num")
    def on_num(call: tether.Call, i: int) -> None:
        numbers.append(i)

    @peer.handle("numbers")
    def get_numbers(call: tether.Call) -> list[int]:
        return numbers

    @peer.handle("call_main")
    async def call_main(call: tether.Call, channel: str, args: list[Any]) -> list[Any]:
        """Invoke main with the child's default timeout; report the outcome."""
        t0 = time.monotonic()
        try:
            value = await call.peer.invoke(channel, *args)
        except tether.TetherError as exc:
            return ["error", type(exc).__name__, str(exc), time.monotonic() - t0]
        return ["ok", value, "", time.monotonic() - t0]

    @peer.on("garbage")
    def garbage(call: tether.Call, data: bytes) -> None:
        peer._sock.send(data)  # bypass the protocol: main must kill us for this

    await peer.wait_closed()


async def startup_race(peer: tether.Peer) -> None:
    """Registers handlers before its first await, then is slow to get going."""
    seen: list[int] = []

    @peer.on("ev")
    def ev(call: tether.Call, i: int) -> None:
        seen.append(i)

    @peer.handle("inv")
    def inv(call: tether.Call, i: int) -> list[int]:
        return [*seen, i]

    await asyncio.sleep(0.3)  # slow start-up work after the first await
    await peer.wait_closed()


async def exit_on_event(peer: tether.Peer, how: str, code: int) -> None:
    """Serves ``forever`` until main sends ``exit``, then exits with ``code``."""
    go = asyncio.Event()
    _install_forever(peer)

    @peer.on("exit")
    def on_exit(call: tether.Call) -> None:
        go.set()

    await go.wait()
    if how == "sys.exit":
        sys.exit(code)
    os._exit(code)


async def pid_writer(peer: tether.Peer, pidfile: str) -> None:
    """Writes its pid, then sleeps without looking at the connection."""
    _write_pid(pidfile)
    await asyncio.sleep(3600)


async def print_marker(peer: tether.Peer, marker: str) -> None:
    print(marker)
    print(marker + "-stderr", file=sys.stderr)


def _write_pid(pidfile: str) -> None:
    tmp = pidfile + ".tmp"
    with open(tmp, "w") as f:
        f.write(str(os.getpid()))
    os.rename(tmp, pidfile)


# -- blocking (sync) child targets -----------------------------------------------------


def pid_writer_sync(peer: tether.sync.Peer, pidfile: str) -> None:
    _write_pid(pidfile)
    time.sleep(3600)


def serve_sync(peer: tether.sync.Peer) -> None:
    """A blocking child: answers ``double`` and ``relay`` until main closes."""

    @peer.handle("double")
    def double(call: tether.sync.Call, x: int) -> int:
        return 2 * x

    @peer.handle("relay")
    def relay(call: tether.sync.Call, a: int, b: int) -> int:
        return 10 * int(call.peer.invoke("add", a, b))

    peer.wait_closed()


def invoke_main_sync(peer: tether.sync.Peer, a: int, b: int) -> None:
    """A blocking child that invokes main, reports by event, and returns."""
    peer.send("result", ["sum", peer.invoke("add", a, b)])


def startup_race_sync(peer: tether.sync.Peer) -> None:
    """Registers its handlers with slow work in between, before any blocking peer call."""
    seen: list[int] = []

    @peer.handle("inv")
    def inv(call: tether.sync.Call, i: int) -> list[int]:
        return [*seen, i]

    time.sleep(0.3)  # start-up work: main's messages are already on their way

    @peer.on("ev")
    def ev(call: tether.sync.Call, i: int) -> None:
        seen.append(i)

    peer.wait_closed()


def exit_on_event_sync(peer: tether.sync.Peer, how: str, code: int) -> None:
    """Blocks its handler thread on ``hold`` invokes, then exits with ``code``."""
    go = threading.Event()

    @peer.handle("hold")
    def hold(call: tether.sync.Call) -> None:
        go.set()
        time.sleep(60)

    peer.send("started", "sync")  # the first blocking call starts serving ``hold``
    go.wait(60)
    time.sleep(0.2)  # let main queue more invokes behind the first
    if how == "sys.exit":
        sys.exit(code)
    os._exit(code)


# -- a whole main program, run as a subprocess -------------------------------------------


def main_script(mode: str, method: str, arg: str) -> None:
    """Run a main that spawns one child; used by tests that kill or watch main."""

    async def run() -> None:
        async with tether.Main() as main:
            if mode == "orphan":
                await main.spawn(pid_writer, arg, start_method=method)
                print("spawned", flush=True)
                await asyncio.sleep(120)
            elif mode == "orphan-sync":
                await main.spawn(pid_writer_sync, arg, start_method=method)
                print("spawned", flush=True)
                await asyncio.sleep(120)
            elif mode == "print":
                child = await main.spawn(print_marker, arg, start_method=method)
                code = await child.wait(30)
                print(f"child exited {code}", flush=True)
            else:
                raise ValueError(mode)

    asyncio.run(run())


def deaf_sync(peer: tether.sync.Peer, seconds: float) -> None:
    """Never reads: it cannot hear main's goodbye, so main must kill it."""
    time.sleep(seconds)


async def send_and_leave(peer: tether.Peer, n: int) -> None:
    """Send ``n`` "result" events, then return at once (the child exits)."""
    for i in range(n):
        await peer.send("result", i)


async def close_first(peer: tether.Peer) -> None:
    """Close the connection before the first await that would start it."""
    await peer.close("done before it began")


async def report_identity(peer: tether.Peer) -> None:
    """Child target: tells main who its peer says main is, and asks main who it is."""

    @peer.handle("identity")
    def identity(call: tether.Call) -> dict[str, Any]:
        return {"pid": call.peer.pid, "uid": call.peer.uid, "address": call.peer.address}

    @peer.handle("ask_who")
    async def ask_who(call: tether.Call) -> Any:
        return await call.peer.invoke("who", timeout=10.0)

    await peer.wait_closed()


async def pickle_worker(peer: tether.Peer) -> None:
    """Echo what main sends (any picklable object), and ask main for a Fraction."""
    import fractions

    @peer.handle("echo")
    def echo(call: tether.Call, x: Any) -> Any:
        return x

    @peer.handle("ask_main")
    async def ask_main(call: tether.Call) -> Any:
        return await peer.invoke("half", fractions.Fraction(3, 4))

    await peer.wait_closed()
