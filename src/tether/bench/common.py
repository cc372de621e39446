"""What every benchmark case shares: the payload, timing loops, samples, child set-up.

A case runs in its own fresh process (see :mod:`tether.bench.case`) and
returns a :data:`Result`: a list of metrics, each with its raw samples, or
``{"unavailable": reason}``. The runner pools samples across repeats and
computes medians and percentiles.
"""

from __future__ import annotations

import contextlib
import math
import multiprocessing
import multiprocessing.context
import os
import resource
import shutil
import signal
import tempfile
import time
from collections.abc import Awaitable, Callable, Iterator
from typing import Any, Final, Self

__all__ = [
    "CpuMeter",
    "MiB",
    "PAYLOAD",
    "Metric",
    "Params",
    "Result",
    "ServerProcess",
    "batch_rate",
    "child_init",
    "join_or_kill",
    "latency",
    "percentile",
    "rate",
    "rate_loop",
    "rate_loop_async",
    "scratch_dir",
    "spawn_ctx",
    "time_loop",
    "time_loop_async",
    "unavailable",
]

Params = dict[str, Any]
Metric = dict[str, Any]
Result = dict[str, Any]

MiB: Final = 1024 * 1024
#: The small message of every round-trip and event case.
PAYLOAD: Final[dict[str, Any]] = {"op": "add", "x": 1}


def spawn_ctx() -> multiprocessing.context.SpawnContext:
    """Children start fresh (``spawn``), like tether's own default start method."""
    return multiprocessing.get_context("spawn")


def child_init(parent_pid: int) -> None:
    """First call in every baseline child: die with the parent, never linger."""
    from ..process import set_parent_death_signal

    set_parent_death_signal(parent_pid)


def join_or_kill(proc: multiprocessing.process.BaseProcess | None, timeout: float = 2.0) -> None:
    """Wait briefly for a child to exit, then SIGKILL it. Safe to call twice."""
    if proc is None or proc.pid is None:
        return
    proc.join(timeout)
    if proc.exitcode is None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(proc.pid, signal.SIGKILL)
        proc.join(2.0)


class ServerProcess:
    """A serving process started with ``spawn``, ready once it says so; a context manager.

    ``target(*args, ready, parent_pid)`` runs in the child: it calls
    :func:`child_init` with ``parent_pid``, starts serving, then sets the
    ``ready`` event. Leaving the ``with`` block (or :meth:`stop`) terminates
    the process and reaps it.

    Raises:
        TimeoutError: ``ready`` was not set within ``timeout`` seconds (the
            process is ended first); ``what`` names the server in the message.
    """

    def __init__(
        self, target: Callable[..., None], *args: Any, what: str, timeout: float = 30.0
    ) -> None:
        ctx = spawn_ctx()
        ready = ctx.Event()
        self.proc = ctx.Process(target=target, args=(*args, ready, os.getpid()), daemon=True)
        self.proc.start()
        if not ready.wait(timeout):
            self.stop()
            raise TimeoutError(f"the {what} did not start within {timeout:g} s")

    def stop(self) -> None:
        """Terminate the server (if it still runs) and reap it. Safe to call twice."""
        if self.proc.exitcode is None:
            self.proc.terminate()
        join_or_kill(self.proc)

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


@contextlib.contextmanager
def scratch_dir() -> Iterator[str]:
    """A short private directory under /tmp for unix and ipc:// socket files."""
    path = tempfile.mkdtemp(prefix="tb-", dir="/tmp")
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


_TICK: Final = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def _proc_cpu_s(pid: int) -> float:
    """user+sys CPU seconds of process ``pid`` (every thread), from ``/proc``; 0 if unreadable."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
    except OSError:
        return 0.0
    fields = stat[stat.rindex(b")") + 2 :].split()  # after "pid (comm) "
    return (int(fields[11]) + int(fields[12])) / _TICK  # utime, stime


class CpuMeter:
    """CPU time (user+sys) of this process and its peer processes over a measurement.

    ``start()`` after the warm-up, ``stop(ops)`` after the timed loop; the
    result is a metric's ``cpu`` entry: CPU seconds of every process together,
    wall seconds, and how many operations they covered. Two reads per
    measurement, none per operation. A peer's figure comes from ``/proc`` in
    clock ticks (10 ms), so measurements are kept near a second or longer.
    """

    def __init__(self, *pids: int | None) -> None:
        self.pids = [p for p in pids if p]
        self._t0 = 0.0
        self._cpu0 = 0.0

    def _cpu(self) -> float:
        own = resource.getrusage(resource.RUSAGE_SELF)
        return own.ru_utime + own.ru_stime + sum(_proc_cpu_s(p) for p in self.pids)

    def start(self) -> None:
        self._t0 = time.perf_counter()
        self._cpu0 = self._cpu()

    def stop(self, ops: int) -> dict[str, float]:
        cpu = self._cpu() - self._cpu0
        wall = time.perf_counter() - self._t0
        return {"cpu_s": round(cpu, 4), "wall_s": round(wall, 4), "ops": ops}


def latency(
    name: str, samples_ns: list[int], unit: str = "us", cpu: dict[str, float] | None = None
) -> Metric:
    """A lower-is-better metric from per-operation durations in nanoseconds.

    ``cpu``: what a :class:`CpuMeter` measured over the same operations.
    """
    scale = {"us": 1e3, "ms": 1e6}[unit]
    m: Metric = {
        "metric": name,
        "unit": unit,
        "better": "lower",
        "samples": [round(s / scale, 4) for s in samples_ns],
    }
    if cpu is not None:
        m["cpu"] = cpu
    return m


def rate(name: str, samples: list[float], unit: str, cpu: dict[str, float] | None = None) -> Metric:
    """A higher-is-better metric (events/s, invokes/s, GB/s), optionally with its CPU time."""
    m: Metric = {"metric": name, "unit": unit, "better": "higher", "samples": samples}
    if cpu is not None:
        m["cpu"] = cpu
    return m


def unavailable(reason: str) -> Result:
    """The case cannot run here (a feature is missing); the table says why."""
    return {"unavailable": reason}


def percentile(sorted_samples: list[float], q: float) -> float:
    """Nearest-rank percentile ``q`` (0..100) of already sorted samples."""
    if not sorted_samples:
        return math.nan
    k = max(0, math.ceil(q / 100.0 * len(sorted_samples)) - 1)
    return sorted_samples[min(k, len(sorted_samples) - 1)]


def time_loop(
    op: Callable[[], object],
    *,
    warmup: int,
    iters: int,
    max_s: float,
    meter: CpuMeter | None = None,
) -> list[int]:
    """Run ``op`` ``warmup`` times, then time each of up to ``iters`` calls (ns).

    Stops early once ``max_s`` seconds of measuring have passed. ``meter`` is
    started after the warm-up; the caller stops it.
    """
    for _ in range(warmup):
        op()
    if meter is not None:
        meter.start()
    pc = time.perf_counter_ns
    out: list[int] = []
    append = out.append
    deadline = pc() + int(max_s * 1e9)
    for i in range(iters):
        t0 = pc()
        op()
        t1 = pc()
        append(t1 - t0)
        if not i & 127 and t1 > deadline:
            break
    return out


async def time_loop_async(
    op: Callable[[], Awaitable[object]],
    *,
    warmup: int,
    iters: int,
    max_s: float,
    meter: CpuMeter | None = None,
) -> list[int]:
    """:func:`time_loop` for a coroutine function."""
    for _ in range(warmup):
        await op()
    if meter is not None:
        meter.start()
    pc = time.perf_counter_ns
    out: list[int] = []
    append = out.append
    deadline = pc() + int(max_s * 1e9)
    for i in range(iters):
        t0 = pc()
        await op()
        t1 = pc()
        append(t1 - t0)
        if not i & 127 and t1 > deadline:
            break
    return out


def batch_rate(count: int, got: int, t0: float, what: str) -> float:
    """``count`` per second since ``t0`` (a ``perf_counter``), once the other side saw them all.

    Raises:
        RuntimeError: ``got`` (what the other side counted or sent) is not
            ``count``; ``what`` ("events", "items") names them in the message.
    """
    elapsed = time.perf_counter() - t0
    if got != count:
        raise RuntimeError(f"got {got} {what}, expected {count}")
    return count / elapsed


def rate_loop(
    batch: Callable[[int], float], n: int, batches: int, max_s: float, meter: CpuMeter
) -> tuple[list[float], dict[str, float]]:
    """A rate case's measurement: ``batch(count)`` runs ``count`` operations and returns their rate.

    One warm-up batch of ``n // 10``, then up to ``batches`` batches of ``n``,
    stopping once ``max_s`` seconds have passed. Returns each batch's rate and
    what ``meter`` measured over the timed batches.
    """
    batch(n // 10)
    rates: list[float] = []
    meter.start()
    end = time.perf_counter() + max_s
    for _ in range(batches):
        rates.append(batch(n))
        if time.perf_counter() > end:
            break
    return rates, meter.stop(n * len(rates))


async def rate_loop_async(
    batch: Callable[[int], Awaitable[float]], n: int, batches: int, max_s: float, meter: CpuMeter
) -> tuple[list[float], dict[str, float]]:
    """:func:`rate_loop` for a coroutine function."""
    await batch(n // 10)
    rates: list[float] = []
    meter.start()
    end = time.perf_counter() + max_s
    for _ in range(batches):
        rates.append(await batch(n))
        if time.perf_counter() > end:
            break
    return rates, meter.stop(n * len(rates))
