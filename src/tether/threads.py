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
import queue
import threading
from collections.abc import Callable
from concurrent.futures import Future
from typing import Any, Final

__all__ = ["MAX_THREADS", "HandlerPool", "run_in_thread", "submit"]

#: the most threads running ``thread=True`` handlers at once, per process
MAX_THREADS: Final = min(32, (os.cpu_count() or 1) + 4)


class HandlerPool:
    """At most ``max_threads`` daemon threads running submitted calls; the rest wait in order.

    Not :class:`concurrent.futures.ThreadPoolExecutor`: its threads are
    joined at interpreter exit, so one handler that never checks
    ``call.cancelled`` would keep a finished process from exiting. These are
    daemon threads, started on demand and kept idle for reuse.
    """

    def __init__(self, max_threads: int) -> None:
        self.max_threads = max_threads
        self._q: queue.SimpleQueue[tuple[Future[Any], Callable[..., Any], tuple[Any, ...]]] = (
            queue.SimpleQueue()
        )
        self._lock = threading.Lock()
        self._threads = 0
        self._idle = 0  # threads waiting for work, not yet promised a call

    def submit(self, fn: Callable[..., Any], *args: Any) -> Future[Any]:
        """Run ``fn(*args)`` on a pool thread; cancelling the future before it starts skips it."""
        fut: Future[Any] = Future()
        self._q.put((fut, fn, args))
        with self._lock:
            if self._idle:
                self._idle -= 1  # that thread takes it
                return fut
            if self._threads >= self.max_threads:
                return fut  # waits for a thread to come free
            self._threads += 1
        threading.Thread(target=self._work, name="tether-handler", daemon=True).start()
        return fut

    def _work(self) -> None:
        q = self._q
        while True:
            fut, fn, args = q.get()
            result: Any = None
            if fut.set_running_or_notify_cancel():
                try:
                    result = fn(*args)
                except BaseException as exc:  # the caller's side decides what propagates
                    fut.set_exception(exc)
                else:
                    fut.set_result(result)
            del fut, fn, args, result  # hold nothing while idle
            with self._lock:
                self._idle += 1


_lock = threading.Lock()
_pool: HandlerPool | None = None
_pid = 0


def _executor() -> HandlerPool:
    """The process's pool, made at first use (and again in a forked child)."""
    global _pool, _pid
    pool = _pool
    if pool is not None and _pid == os.getpid():
        return pool
    with _lock:
        if _pool is None or _pid != os.getpid():
            _pool = HandlerPool(MAX_THREADS)
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
