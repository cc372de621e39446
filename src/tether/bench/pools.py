"""Worker pools side by side: tether.Pool, ProcessPoolExecutor, loky, multiprocessing.Pool.

Every pool gets 2 workers started with ``spawn`` and the same jobs, one job
per task (``chunksize=1``, the executors' default; tether does not batch):

* ``small jobs``: ``map`` of a tiny function over ints, jobs per second.
* ``4MiB array each way``: ``map`` of a function taking a 4 MiB float32
  ndarray and returning one as large (tether: shared memory; the others:
  pickle through a pipe), milliseconds per job.
* the kill: :data:`KILL_JOBS` jobs of 10 ms are submitted, and one worker is
  SIGKILLed once 20 have finished. Reported: ``kill: jobs failed`` (raised
  an error), ``kill: jobs lost`` (neither returned nor raised within
  :data:`HANG_WAIT` seconds) and ``kill: settled after`` (ms from the kill
  until every job returned or raised; absent when some never did). tether
  fails the one job the worker ran (``PeerGone``); ``ProcessPoolExecutor``
  fails every pending job (``BrokenProcessPool``), loky every pending job
  (``TerminatedWorkerError``); ``multiprocessing.Pool`` never answers the
  job the worker ran (cpython issue 96062), so a ``map`` would hang: the
  wait here is bounded.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import os
import signal
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Final

from ..aio.loop import new_loop
from .common import CpuMeter, MiB, Params, Result, latency, rate, spawn_ctx

__all__ = [
    "HANG_WAIT",
    "KILL_JOBS",
    "WORKERS",
    "pool_loky",
    "pool_mp",
    "pool_ppe",
    "pool_tether",
    "pool_tether_sync",
]

WORKERS: Final = 2
KILL_JOBS: Final = 200
#: how long the kill case waits for every job before it calls the rest lost (seconds)
HANG_WAIT: Final = 5.0
_KILL_AFTER: Final = 20  # jobs finished before the SIGKILL
_ARRAY_BYTES: Final = 4 * MiB


# -- the jobs (module level: every pool's workers import them) -------------------------


def inc(x: int) -> int:
    """The small job."""
    return x + 1


def negate(a: Any) -> Any:
    """The 4 MiB job: an array in, an array as large out."""
    import numpy as np

    return np.negative(a)


def nap(x: int) -> int:
    """The kill case's job: 10 ms of sleep."""
    time.sleep(0.01)
    return x


def _sizes(params: Params) -> tuple[int, int, int]:
    """(small jobs per sample, arrays per sample, samples)."""
    return (500, 10, 3) if params.get("quick") else (2000, 20, 5)


def _array() -> Any:
    import numpy as np

    return np.ones(_ARRAY_BYTES // 4, dtype=np.float32)


# -- measuring any pool through the same five operations ----------------------------------

_Handles = list[Any]


@dataclass
class _Ops:
    """What the common measurement needs of a pool."""

    map: Callable[[Callable[[Any], Any], list[Any]], list[Any]]  # in order
    submit_all: Callable[[Callable[[Any], Any], list[Any]], _Handles]
    until_done: Callable[[_Handles, int], None]  # wait (bounded) until this many ended
    wait_all: Callable[[_Handles, float], tuple[int, int, int]]  # (returned, failed, lost)
    pids: Callable[[], list[int]]  # the workers running now


def _measure(ops: _Ops, params: Params) -> Result:
    """Small jobs, 4 MiB arrays, then the kill, on one pool."""
    n_small, n_big, samples = _sizes(params)
    ops.map(inc, list(range(50)))  # warm-up: workers started, code imported
    meter = CpuMeter(*ops.pids())
    small: list[float] = []
    meter.start()
    for _ in range(samples):
        t0 = time.perf_counter()
        out = ops.map(inc, list(range(n_small)))
        small.append(n_small / (time.perf_counter() - t0))
        assert out[-1] == n_small
    cpu_small = meter.stop(n_small * samples)

    arr = _array()
    ops.map(negate, [arr] * 2)  # warm-up
    big: list[int] = []
    for _ in range(samples):
        t0 = time.perf_counter_ns()
        out = ops.map(negate, [arr] * n_big)
        big.append((time.perf_counter_ns() - t0) // n_big)
        assert float(out[-1][0]) == -1.0

    returned, failed, lost, settled = _kill(ops)
    metrics = [
        rate("small jobs", small, "/s", cpu_small),
        latency("4MiB array each way", big, unit="ms"),
        {"metric": "kill: jobs failed", "unit": "jobs", "better": "lower", "samples": [failed]},
        {"metric": "kill: jobs lost", "unit": "jobs", "better": "lower", "samples": [lost]},
    ]
    if settled is not None:
        metrics.append(latency("kill: settled after", [settled], unit="ms"))
    return {
        "metrics": metrics,
        "info": {"kill_returned": returned, "kill_hung": settled is None, "workers": WORKERS},
    }


def _kill(ops: _Ops) -> tuple[int, int, int, int | None]:
    """Submit KILL_JOBS jobs, SIGKILL one worker mid-way: (returned, failed, lost, settle ns)."""
    handles = ops.submit_all(nap, list(range(KILL_JOBS)))
    ops.until_done(handles, _KILL_AFTER)
    os.kill(ops.pids()[0], signal.SIGKILL)
    t0 = time.perf_counter_ns()
    returned, failed, lost = ops.wait_all(handles, HANG_WAIT)
    settled = time.perf_counter_ns() - t0 if lost == 0 else None
    return returned, failed, lost, settled


def _wait_futures(handles: _Handles, timeout: float) -> tuple[int, int, int]:
    done, _ = concurrent.futures.wait(handles, timeout=timeout)
    failed = sum(1 for f in done if f.exception() is not None)
    return len(done) - failed, failed, len(handles) - len(done)


def _poll_until(done: Callable[[], int], n: int) -> None:
    deadline = time.monotonic() + 30.0
    while done() < n and time.monotonic() < deadline:
        time.sleep(0.002)


def _executor_ops(ex: Any, pids: Callable[[], list[int]]) -> _Ops:
    """The operations of anything shaped like ``concurrent.futures.Executor``."""
    return _Ops(
        map=lambda fn, items: list(ex.map(fn, items)),
        submit_all=lambda fn, items: [ex.submit(fn, x) for x in items],
        until_done=lambda hs, n: _poll_until(lambda: sum(f.done() for f in hs), n),
        wait_all=_wait_futures,
        pids=pids,
    )


# -- the cases -------------------------------------------------------------------------


def pool_tether(params: Params) -> Result:
    """tether.Pool (asyncio), driven from this thread one operation at a time."""
    import tether

    from .tether_cases import loop_name

    async def collect(it: Any) -> list[Any]:
        return [r async for r in it]

    async def until_done(handles: _Handles, n: int) -> None:
        deadline = time.monotonic() + 30.0
        while sum(f.done() for f in handles) < n and time.monotonic() < deadline:
            await asyncio.sleep(0.002)

    async def wait_all(handles: _Handles, timeout: float) -> tuple[int, int, int]:
        done, _ = await asyncio.wait(handles, timeout=timeout)
        failed = sum(1 for f in done if f.exception() is not None)
        return len(done) - failed, failed, len(handles) - len(done)

    async def submit_all(fn: Callable[[Any], Any], items: list[Any]) -> _Handles:
        return [pool.submit(fn, x) for x in items]

    async def which_loop() -> str:
        return loop_name()

    async def start() -> None:
        await pool.start()

    loop = new_loop()
    pool = tether.Pool(workers=WORKERS)
    go = loop.run_until_complete
    try:
        go(start())
        ops = _Ops(
            map=lambda fn, items: go(collect(pool.map(fn, items))),
            submit_all=lambda fn, items: go(submit_all(fn, items)),
            until_done=lambda hs, n: go(until_done(hs, n)),
            wait_all=lambda hs, t: go(wait_all(hs, t)),
            pids=lambda: pool.pids,
        )
        result = _measure(ops, params)
        result["info"]["loop"] = go(which_loop())
        return result
    finally:
        go(pool.terminate())
        loop.close()


def pool_tether_sync(params: Params) -> Result:
    """tether.sync.Pool: the same pool behind a blocking API (a private loop thread)."""
    import tether

    with tether.sync.Pool(workers=WORKERS) as pool:
        return _measure(_executor_ops(pool, lambda: pool.pids), params)


def pool_ppe(params: Params) -> Result:
    """concurrent.futures.ProcessPoolExecutor.map, chunksize=1."""
    ex = concurrent.futures.ProcessPoolExecutor(WORKERS, mp_context=spawn_ctx())
    try:
        return _measure(_executor_ops(ex, lambda: sorted(ex._processes)), params)
    finally:
        ex.shutdown(wait=False, cancel_futures=True)
        for p in list((ex._processes or {}).values()):
            p.kill()


def pool_loky(params: Params) -> Result:
    """loky's get_reusable_executor().map, chunksize=1."""
    from loky import get_reusable_executor

    ex = get_reusable_executor(max_workers=WORKERS, context="loky")
    try:
        return _measure(_executor_ops(ex, lambda: sorted(ex._processes)), params)
    finally:
        ex = get_reusable_executor(max_workers=WORKERS, context="loky")  # (the broken one is gone)
        ex.shutdown(wait=False, kill_workers=True)


def pool_mp(params: Params) -> Result:
    """multiprocessing.Pool, chunksize=1 (imap for the timing, apply_async for the kill)."""
    pool = spawn_ctx().Pool(WORKERS)

    def wait_all(handles: _Handles, timeout: float) -> tuple[int, int, int]:
        end = time.monotonic() + timeout
        for h in handles:
            h.wait(max(0.0, end - time.monotonic()))
        ready = [h for h in handles if h.ready()]
        failed = sum(1 for h in ready if not h.successful())
        return len(ready) - failed, failed, len(handles) - len(ready)

    try:
        ops = _Ops(
            map=lambda fn, items: list(pool.imap(fn, items, chunksize=1)),
            submit_all=lambda fn, items: [pool.apply_async(fn, (x,)) for x in items],
            until_done=lambda hs, n: _poll_until(lambda: sum(h.ready() for h in hs), n),
            wait_all=wait_all,
            pids=lambda: [p.pid for p in pool._pool if p.exitcode is None],  # type: ignore[attr-defined]
        )
        result = _measure(ops, params)
    finally:
        hung = _bounded_terminate(pool)
    result["info"]["terminate_hung"] = hung
    return result


def _bounded_terminate(pool: Any) -> bool:
    """``pool.terminate()`` within 5 s, else SIGKILL its workers; whether it hung.

    A worker killed while it held the task queue's lock leaves that lock held
    for good, and ``terminate`` waits for it.
    """
    workers = list(pool._pool)
    t = threading.Thread(target=pool.terminate, daemon=True)
    t.start()
    t.join(5.0)
    for p in workers:
        if p.exitcode is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(p.pid, signal.SIGKILL)
    return t.is_alive()
