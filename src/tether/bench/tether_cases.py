"""tether's own cases: round trips, events, invokes in flight, SIGKILL -> PeerGone.

Each case runs its measuring side on :func:`tether.aio.loop.run` (uvloop when
installed) except the blocking client, which uses :func:`tether.sync.connect`.
Peers are either a child started with :meth:`tether.Main.spawn`, or a server
process running a :class:`tether.Main` that listens on a unix socket.
"""

from __future__ import annotations

import asyncio
import os
import signal
import time
from collections.abc import Coroutine
from typing import Any, TypeVar

import tether

from ..aio.loop import run
from .baselines import ev_budget, inflight_budget, rt_budget
from .common import (
    PAYLOAD,
    CpuMeter,
    Params,
    Result,
    ServerProcess,
    batch_rate,
    child_init,
    latency,
    rate,
    rate_loop_async,
    scratch_dir,
    time_loop,
    time_loop_async,
    unavailable,
)

__all__ = [
    "WAIT",
    "bounded",
    "ev_tether",
    "inflight_tether",
    "kill_to_peergone",
    "loop_name",
    "rt_tether_async",
    "rt_tether_main_child",
    "rt_tether_spin",
    "rt_tether_sync",
    "rt_tether_sync_nospin",
    "stream_tether",
    "rt_tether_traced",
]

WAIT = 30.0  # bound on every wait outside the hot loops, in seconds
T = TypeVar("T")


def loop_name() -> str:
    """Which event loop runs the current coroutine (``uvloop`` or ``asyncio``)."""
    return type(asyncio.get_running_loop()).__module__.split(".")[0]


def bounded(coro: Coroutine[Any, Any, T], params: Params) -> T:
    """Run ``coro`` on tether's loop, cancelled (so its cleanup runs) before the case's alarm.

    The ``SIGALRM`` that bounds a case cannot be relied on inside an event
    loop (it may fire in a callback, whose error the loop only logs).
    """
    limit = max(1.0, float(params.get("timeout", 120.0)) - 1.0)
    return run(asyncio.wait_for(coro, limit))


# -- children and servers (module-level: they are started with ``spawn``) ------------


def _echo(call: tether.Call, d: Any) -> Any:
    return d


async def _echo_child(peer: tether.Peer) -> None:
    peer.handle("echo", _echo)
    await peer.wait_closed()


async def _serve(path: str, ready: Any) -> None:
    main = tether.Main()
    main.handle("echo", _echo)
    async with main:
        await main.listen(f"unix://{path}")
        ready.set()
        await asyncio.get_running_loop().create_future()  # until the parent ends us


def _server_process(path: str, ready: Any, parent_pid: int) -> None:
    child_init(parent_pid)
    run(_serve(path, ready))


class _Server(ServerProcess):
    """A process running a :class:`tether.Main` that answers ``echo`` on a unix socket."""

    def __init__(self, tmp: str) -> None:
        self.path = f"{tmp}/main.sock"
        self.address = f"unix://{self.path}"
        super().__init__(_server_process, self.path, what="tether server", timeout=WAIT)


# -- small round trip ------------------------------------------------------------


def rt_tether_async(params: Params) -> Result:
    """An asyncio client invokes ``echo`` on a main process over a unix socket."""

    async def measure(server: _Server) -> tuple[list[int], dict[str, float], str]:
        async with tether.connect(server.address, timeout=WAIT) as peer:
            assert await peer.invoke("echo", PAYLOAD) == PAYLOAD
            meter = CpuMeter(server.proc.pid)
            samples = await time_loop_async(
                lambda: peer.invoke("echo", PAYLOAD), **rt_budget(params), meter=meter
            )
            return samples, meter.stop(len(samples)), loop_name()

    with scratch_dir() as tmp, _Server(tmp) as server:
        samples, cpu, loop = bounded(measure(server), params)
    return {"metrics": [latency("round trip", samples, cpu=cpu)], "info": {"loop": loop}}


def rt_tether_traced(params: Params) -> Result:
    """``rt_tether_async`` with tracing on in the client: what recording every frame costs.

    Each frame becomes a record and each invoke a span kept for a timeline file
    (the file itself is not written: that happens once, at exit). Compare with
    ``rt_tether_async``, the same round trip with tracing off.
    """
    from .. import tracing

    with scratch_dir() as tmp:
        rec = tracing.Recorder(f"{tmp}/trace.json")
        tracing.hook = rec
        try:
            result = rt_tether_async(params)
        finally:
            tracing.hook = None
    result["info"]["events"] = len(rec.events)
    return result


def rt_tether_sync(params: Params, spin: float | None = None) -> Result:
    """A blocking client (:func:`tether.sync.connect`) invokes ``echo`` on a main process.

    ``spin``: the client's polling (default: the library's, adaptive: :mod:`tether.polling`).
    """
    kw: dict[str, Any] = {} if spin is None else {"spin": spin}
    with (
        scratch_dir() as tmp,
        _Server(tmp) as server,
        tether.sync.connect(server.address, timeout=WAIT, **kw) as peer,
    ):
        assert peer.invoke("echo", PAYLOAD) == PAYLOAD
        meter = CpuMeter(server.proc.pid)
        samples = time_loop(lambda: peer.invoke("echo", PAYLOAD), **rt_budget(params), meter=meter)
        cpu = meter.stop(len(samples))
    mode = "adaptive" if peer.spin is None else peer.spin
    return {"metrics": [latency("round trip", samples, cpu=cpu)], "info": {"spin_s": mode}}


def rt_tether_sync_nospin(params: Params) -> Result:
    """:func:`rt_tether_sync` with ``spin=0``: the client sleeps in ``select`` at once.

    Beside the default row, it shows what the default (adaptive) polling buys and costs
    (CPU column).
    """
    return rt_tether_sync(params, spin=0.0)


async def _rt_main_child(
    main: tether.Main, params: Params
) -> tuple[list[int], dict[str, float], str]:
    """``main`` spawns an echo child and times invokes of it: samples, CPU, loop name."""
    async with main:
        child = await main.spawn(_echo_child)
        assert await child.invoke("echo", PAYLOAD) == PAYLOAD
        meter = CpuMeter(child.pid)
        samples = await time_loop_async(
            lambda: child.invoke("echo", PAYLOAD), **rt_budget(params), meter=meter
        )
        return samples, meter.stop(len(samples)), loop_name()


def rt_tether_main_child(params: Params) -> Result:
    """Main invokes ``echo`` on a child it spawned (main -> child)."""
    samples, cpu, loop = bounded(_rt_main_child(tether.Main(timeout=WAIT), params), params)
    return {"metrics": [latency("round trip", samples, cpu=cpu)], "info": {"loop": loop}}


SPIN = 0.0002  # seconds: the opt-in low-latency mode's polling window


def rt_tether_spin(params: Params) -> Result:
    """Main -> child invoke in the opt-in low-latency mode (``Main(spin=200 us)``).

    Both sides poll their socket briefly instead of sleeping; this burns CPU
    to save the wake-ups, so it is measured apart from the default.
    """
    try:
        main = tether.Main(timeout=WAIT, spin=SPIN)
    except TypeError as exc:
        return unavailable(f"tether.Main has no low-latency mode: {exc}")
    samples, cpu, loop = bounded(_rt_main_child(main, params), params)
    return {
        "metrics": [latency("round trip", samples, cpu=cpu)],
        "info": {"loop": loop, "spin_s": SPIN},
    }


# -- one-way events --------------------------------------------------------------


async def _count_child(peer: tether.Peer) -> None:
    n = 0

    def on_ev(call: tether.Call, d: Any) -> None:
        nonlocal n
        n += 1

    def count(call: tether.Call) -> int:
        nonlocal n
        got, n = n, 0
        return got

    peer.on("ev", on_ev)
    peer.handle("count", count)
    await peer.wait_closed()


def ev_tether(params: Params) -> Result:
    """Main ``send``s N events to a child whose ``on`` handler counts them.

    Each batch ends with an invoke of ``count``, answered (FIFO) only after
    the handler ran for every event, so the rate includes handling.
    """
    n, batches, max_s = ev_budget(params)

    async def measure() -> tuple[list[float], dict[str, float], str]:
        async with tether.Main(timeout=WAIT) as main:
            child = await main.spawn(_count_child)

            async def batch(count: int) -> float:
                t0 = time.perf_counter()
                for _ in range(count):
                    await child.send("ev", PAYLOAD)
                got = await child.invoke("count")
                return batch_rate(count, got, t0, "events")

            rates, cpu = await rate_loop_async(batch, n, batches, max_s, CpuMeter(child.pid))
            return rates, cpu, loop_name()

    rates, cpu, loop = bounded(measure(), params)
    return {"metrics": [rate("events", rates, "/s", cpu=cpu)], "info": {"loop": loop}}


# -- streams --------------------------------------------------------------------


async def _stream_child(peer: tether.Peer) -> None:
    async def items(call: tether.Call, n: int) -> Any:
        for _ in range(n):
            yield PAYLOAD

    peer.handle("items", items)
    await peer.wait_closed()


def stream_tether(params: Params) -> Result:
    """Main reads N items per ``async for`` from a child's async generator (credit window 64)."""
    n, batches, max_s = ev_budget(params)

    async def measure() -> tuple[list[float], dict[str, float], str]:
        async with tether.Main(timeout=WAIT) as main:
            child = await main.spawn(_stream_child)

            async def batch(count: int) -> float:
                t0 = time.perf_counter()
                got = 0
                async for _ in child.stream("items", count):
                    got += 1
                return batch_rate(count, got, t0, "items")

            rates, cpu = await rate_loop_async(batch, n, batches, max_s, CpuMeter(child.pid))
            return rates, cpu, loop_name()

    rates, cpu, loop = bounded(measure(), params)
    return {"metrics": [rate("items", rates, "/s", cpu=cpu)], "info": {"loop": loop}}


# -- invokes in flight -----------------------------------------------------------


def inflight_tether(params: Params) -> Result:
    """An asyncio client keeps 256 invokes of ``echo`` in flight to a main process."""
    n, batches, window, max_s = inflight_budget(params)

    async def measure(server: _Server) -> tuple[list[float], dict[str, float], str]:
        async with tether.connect(server.address, timeout=WAIT) as peer:

            async def batch(count: int) -> float:
                left = count

                async def worker() -> None:
                    nonlocal left
                    while left > 0:
                        left -= 1
                        await peer.invoke("echo", PAYLOAD)

                t0 = time.perf_counter()
                workers = (worker() for _ in range(window))
                await asyncio.wait_for(asyncio.gather(*workers), WAIT)
                return count / (time.perf_counter() - t0)

            meter = CpuMeter(server.proc.pid)
            rates, cpu = await rate_loop_async(batch, n, batches, max_s, meter)
            return rates, cpu, loop_name()

    with scratch_dir() as tmp, _Server(tmp) as server:
        rates, cpu, loop = bounded(measure(server), params)
    return {"metrics": [rate("invokes", rates, "/s", cpu=cpu)], "info": {"loop": loop}}


# -- SIGKILL -> PeerGone ---------------------------------------------------------

PENDING = 100


async def _hang_child(peer: tether.Peer) -> None:
    arrived = 0

    async def hang(call: tether.Call) -> None:
        nonlocal arrived
        arrived += 1
        await asyncio.get_running_loop().create_future()  # forever

    def count(call: tether.Call) -> int:
        return arrived

    peer.handle("hang", hang)
    peer.handle("count", count)
    await peer.wait_closed()


async def _one_kill(child: tether.Child) -> int:
    """Start 100 invokes the child never answers, SIGKILL it, time until all failed."""
    loop = asyncio.get_running_loop()
    failed_at: list[int] = []
    calls = [asyncio.ensure_future(child.invoke("hang")) for _ in range(PENDING)]
    for c in calls:
        c.add_done_callback(lambda _: failed_at.append(time.perf_counter_ns()))
    try:
        deadline = loop.time() + WAIT
        while await child.invoke("count") < PENDING:
            if loop.time() > deadline:
                raise TimeoutError(f"the child did not receive {PENDING} invokes in {WAIT} s")
            await asyncio.sleep(0.001)
        t0 = time.perf_counter_ns()
        os.kill(child.pid, signal.SIGKILL)
        _, pending = await asyncio.wait(calls, timeout=WAIT)
        if pending:
            raise TimeoutError(f"{len(pending)} invokes still pending {WAIT} s after SIGKILL")
        wrong = [c.exception() for c in calls if not isinstance(c.exception(), tether.PeerGone)]
        if wrong:
            raise RuntimeError(f"expected PeerGone, got {wrong[0]!r}")
        return max(failed_at) - t0
    finally:
        for c in calls:
            c.cancel()
        child.kill()


def kill_to_peergone(params: Params) -> Result:
    """Time from a child's SIGKILL until 100 pending invokes on it all raised PeerGone."""
    trials = 5 if params.get("quick") else 20
    per_batch = 5

    async def measure() -> tuple[list[int], str]:
        samples: list[int] = []
        async with tether.Main(timeout=WAIT * 2) as main:
            await _one_kill(await main.spawn(_hang_child))  # warm-up, not counted
            while len(samples) < trials:
                k = min(per_batch, trials - len(samples))
                children = await asyncio.gather(*(main.spawn(_hang_child) for _ in range(k)))
                for child in children:
                    samples.append(await _one_kill(child))
        return samples, loop_name()

    samples, loop = bounded(measure(), params)
    return {"metrics": [latency("SIGKILL->PeerGone", samples, unit="ms")], "info": {"loop": loop}}
