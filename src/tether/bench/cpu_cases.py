"""What polling costs when it should not poll: a caller of a slow handler, idle connections.

tether polls a socket instead of sleeping while answers or requests come fast
(adaptive polling, :mod:`tether.polling`, on by default); the CPU column of
the round-trip rows shows what that costs while it pays. These rows show that
it stops when it does not, at default settings. Both run a :class:`tether.Main`
in a server process on a unix socket; this process is the asyncio client.

* ``cpu_slow_handler``: the client invokes a handler that takes 10 ms
  (``asyncio.sleep``), one call after the other. Reported: the client's own
  CPU time (``getrusage``) as % of one core, per batch of 10 calls.
  ``cpu_slow_handler_sync``: the same with the blocking client
  (:func:`tether.sync.connect`), whose polling is adaptive too.
* ``cpu_idle``: 10 connections each make 100 quick round trips (so polling was
  on), then stay idle. Reported: the CPU time of both processes (read from
  ``/proc/PID/schedstat``) as % of one core, per 0.5 s span, beside the same
  two processes before any connection (the floor), and the difference.
"""

from __future__ import annotations

import asyncio
import os
import resource
import statistics
import time
from typing import Any, Final

import tether

from ..aio.loop import run
from .common import (
    PAYLOAD,
    Metric,
    Params,
    Result,
    ServerProcess,
    child_init,
    scratch_dir,
)
from .tether_cases import WAIT, bounded, loop_name

__all__ = ["CONNECTIONS", "HANDLER_S", "cpu_idle", "cpu_slow_handler", "cpu_slow_handler_sync"]

#: how long the slow handler takes per call, in seconds
HANDLER_S: Final = 0.01
#: idle connections held by ``cpu_idle``
CONNECTIONS: Final = 10
_BATCH: Final = 10  # slow calls per sample
_SPAN: Final = 0.5  # seconds per idle sample


def _cpu_s() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


async def _slow(call: tether.Call) -> None:
    await asyncio.sleep(HANDLER_S)


async def _serve(path: str, ready: Any) -> None:
    main = tether.Main()
    main.handle("echo", lambda call, d: d)
    main.handle("slow", _slow)
    main.handle("cpu", lambda call: _cpu_s())
    async with main:
        await main.listen(f"unix://{path}")
        ready.set()
        await asyncio.get_running_loop().create_future()  # until the parent ends us


def _server_process(path: str, ready: Any, parent_pid: int) -> None:
    child_init(parent_pid)
    run(_serve(path, ready))


class _Server(ServerProcess):
    """A process running a :class:`tether.Main` with ``echo``, ``slow`` and ``cpu``."""

    def __init__(self, tmp: str) -> None:
        self.address = f"unix://{tmp}/cpu.sock"
        super().__init__(_server_process, f"{tmp}/cpu.sock", what="tether server", timeout=WAIT)


def _percent(name: str, samples: list[float]) -> Metric:
    return {"metric": name, "unit": "%", "better": "lower", "samples": samples}


def _serve_and(params: Params, measure: Any) -> Any:
    with scratch_dir() as tmp:
        server = _Server(tmp)
        try:
            return bounded(measure(server.address), params)
        finally:
            server.stop()


def cpu_slow_handler(params: Params) -> Result:
    """The client's CPU while it waits on a 10 ms handler, call after call (default settings)."""
    batches = 10 if params.get("quick") else 30

    async def measure(address: str) -> tuple[list[float], dict[str, Any]]:
        async with tether.connect(address, timeout=WAIT) as peer:
            for _ in range(3):
                assert await peer.invoke("echo", PAYLOAD) == PAYLOAD
            samples = []
            for _ in range(batches):
                t0, c0 = time.perf_counter(), _cpu_s()
                for _ in range(_BATCH):
                    await peer.invoke("slow")
                samples.append(100.0 * (_cpu_s() - c0) / (time.perf_counter() - t0))
            poll = peer._answer_poll
            info = {"loop": loop_name(), "polls": poll.spins, "calls": batches * _BATCH}
            return samples, info

    samples, info = _serve_and(params, measure)
    return {"metrics": [_percent("caller CPU", samples)], "info": info}


def cpu_slow_handler_sync(params: Params) -> Result:
    """:func:`cpu_slow_handler` with the blocking client."""
    batches = 10 if params.get("quick") else 30
    with scratch_dir() as tmp:
        server = _Server(tmp)
        try:
            with tether.sync.connect(server.address, timeout=WAIT) as peer:
                for _ in range(3):
                    assert peer.invoke("echo", PAYLOAD) == PAYLOAD
                samples = []
                for _ in range(batches):
                    t0, c0 = time.perf_counter(), _cpu_s()
                    for _ in range(_BATCH):
                        peer.invoke("slow")
                    samples.append(100.0 * (_cpu_s() - c0) / (time.perf_counter() - t0))
                polls = peer._answer_poll.spins
        finally:
            server.stop()
    info = {"polls": polls, "calls": batches * _BATCH}
    return {"metrics": [_percent("caller CPU", samples)], "info": info}


def _on_cpu_s(pid: int) -> float:
    """Seconds ``pid`` ran on a CPU (``/proc/PID/schedstat``: the scheduler's own clock).

    Read from outside, so measuring the server costs it nothing; ``getrusage``
    would need an invoke into it, whose own wake-ups are what is measured.
    """
    with open(f"/proc/{pid}/schedstat") as f:
        return int(f.read().split()[0]) / 1e9


async def _idle_spans(pids: tuple[int, int], spans: int) -> list[float]:
    """Both processes' CPU per :data:`_SPAN` of sleep, as % of one core."""
    samples = []
    for _ in range(spans):
        t0 = time.perf_counter()
        c0 = sum(_on_cpu_s(pid) for pid in pids)
        await asyncio.sleep(_SPAN)
        cpu = sum(_on_cpu_s(pid) for pid in pids) - c0
        samples.append(100.0 * cpu / (time.perf_counter() - t0))
    return samples


def cpu_idle(params: Params) -> Result:
    """Both processes' CPU while 10 connections that were just busy stay idle.

    The same two processes are first measured the same way with no
    connection at all (the floor: this VM charges a sleeping loop's timer
    wake-ups, about 1% here with uvloop), and the target is on what the idle
    connections add to it.
    """
    spans = 4 if params.get("quick") else 8

    async def measure(address: str, server_pid: int) -> tuple[list[Metric], dict[str, Any]]:
        pids = (os.getpid(), server_pid)
        floor = await _idle_spans(pids, spans)
        peers = [await tether.connect(address, timeout=WAIT) for _ in range(CONNECTIONS)]
        try:
            for p in peers:
                for _ in range(100):
                    await p.invoke("echo", PAYLOAD)
            await asyncio.sleep(0.05)  # the last polls end
            idle = await _idle_spans(pids, spans)
            polls = sum(p._answer_poll.spins + p._request_poll.spins for p in peers)
        finally:
            for p in peers:
                await p.close()
        base = statistics.median(floor)
        metrics = [
            _percent("idle CPU", idle),
            _percent("no connection", floor),
            _percent("idle CPU over floor", [max(0.0, s - base) for s in idle]),
        ]
        return metrics, {"loop": loop_name(), "connections": CONNECTIONS, "polls": polls}

    with scratch_dir() as tmp:
        server = _Server(tmp)
        pid = server.proc.pid
        assert pid is not None  # started
        try:
            metrics, info = bounded(measure(server.address, pid), params)
        finally:
            server.stop()
    return {"metrics": metrics, "info": info}
