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
import shutil
import signal
import tempfile
import time
from collections.abc import Awaitable, Callable, Iterator
from typing import Any, Final

__all__ = [
    "MiB",
    "PAYLOAD",
    "Metric",
    "Params",
    "Result",
    "child_init",
    "join_or_kill",
    "latency",
    "percentile",
    "rate",
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


@contextlib.contextmanager
def scratch_dir() -> Iterator[str]:
    """A short private directory under /tmp for unix and ipc:// socket files."""
    path = tempfile.mkdtemp(prefix="tb-", dir="/tmp")
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def latency(name: str, samples_ns: list[int], unit: str = "us") -> Metric:
    """A lower-is-better metric from per-operation durations in nanoseconds."""
    scale = {"us": 1e3, "ms": 1e6}[unit]
    return {
        "metric": name,
        "unit": unit,
        "better": "lower",
        "samples": [round(s / scale, 4) for s in samples_ns],
    }


def rate(name: str, samples: list[float], unit: str) -> Metric:
    """A higher-is-better metric (events/s, invokes/s, GB/s)."""
    return {"metric": name, "unit": unit, "better": "higher", "samples": samples}


def unavailable(reason: str) -> Result:
    """The case cannot run here (a feature is missing); the table says why."""
    return {"unavailable": reason}


def percentile(sorted_samples: list[float], q: float) -> float:
    """Nearest-rank percentile ``q`` (0..100) of already sorted samples."""
    if not sorted_samples:
        return math.nan
    k = max(0, math.ceil(q / 100.0 * len(sorted_samples)) - 1)
    return sorted_samples[min(k, len(sorted_samples) - 1)]


def time_loop(op: Callable[[], object], *, warmup: int, iters: int, max_s: float) -> list[int]:
    """Run ``op`` ``warmup`` times, then time each of up to ``iters`` calls (ns).

    Stops early once ``max_s`` seconds of measuring have passed.
    """
    for _ in range(warmup):
        op()
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
    op: Callable[[], Awaitable[object]], *, warmup: int, iters: int, max_s: float
) -> list[int]:
    """:func:`time_loop` for a coroutine function."""
    for _ in range(warmup):
        await op()
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
