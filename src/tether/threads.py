"""Handlers registered with ``thread=True``: the worker threads they run on.

A sync handler normally runs on the event loop (asyncio) or on a blocking
peer's one in-order worker thread: quick, but a CPU-bound handler stalls every
other call. ``handle(ch, fn, thread=True)`` runs ``fn`` on this module's
thread pool instead, one pool per process, at most :data:`MAX_THREADS`
threads. Invokes past that wait in the pool's queue; how many may wait is
bounded per connection by the peer's ``max_inflight`` (one more is answered
``Busy``), so the queue never grows without limit.

A running thread cannot be interrupted: a threaded handler learns that its
caller gave up (CANCEL, the caller's timeout, the connection lost) from
:attr:`tether.Call.cancelled` and stops cooperatively. One that never looks
runs to its end, holding a pool thread; its answer is then dropped.
"""

from __future__ import annotations

import asyncio
import os
import threading
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, Final

__all__ = ["MAX_THREADS", "run_in_thread", "submit"]

#: the most threads running ``thread=True`` handlers at once, per process
MAX_THREADS: Final = min(32, (os.cpu_count() or 1) + 4)

_lock = threading.Lock()
_pool: ThreadPoolExecutor | None = None
_pid = 0


def _executor() -> ThreadPoolExecutor:
    """The process's pool, made at first use (and again in a forked child)."""
    global _pool, _pid
    pool = _pool
    if pool is not None and _pid == os.getpid():
        return pool
    with _lock:
        if _pool is None or _pid != os.getpid():
            _pool = ThreadPoolExecutor(MAX_THREADS, thread_name_prefix="tether-handler")
            _pid = os.getpid()
        return _pool


def submit(fn: Callable[..., Any], *args: Any) -> Future[Any]:
    """Run ``fn(*args)`` on the pool (the blocking peer's threaded handlers)."""
    return _executor().submit(fn, *args)


async def run_in_thread(fn: Callable[..., Any], call: Any, args: tuple[Any, ...]) -> Any:
    """Await ``fn(call, *args)`` run on the pool (the asyncio peer's threaded handlers).

    Cancelled (the caller's CANCEL or timeout, the connection lost): sets
    ``call.cancelled`` for the thread to see, and a call still queued never
    runs.
    """
    call._arm_cancel()
    fut = _executor().submit(fn, call, *args)
    try:
        return await asyncio.wrap_future(fut)
    except asyncio.CancelledError:
        call._set_cancelled()
        fut.cancel()
        raise
