"""The blocking worker pool, ``tether.sync.Pool``: :class:`tether.Pool` for code without asyncio.

It runs a :class:`tether.Pool` on an event loop of its own, in a private
thread; :meth:`Pool.submit` returns a :class:`concurrent.futures.Future`. A
worker that dies fails (or retries) only the job it was running, exactly as
in the asyncio pool, so no future waits on a dead process.
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import contextlib
import threading
from collections.abc import Callable, Iterable, Iterator
from typing import Any

from ..aio.loop import new_loop
from ..errors import ConnectionClosed
from ..executor import Pool as AsyncPool
from ..executor import _timeout, job_result_type, job_target, moved
from ..results import DEFAULT
from ..wire import DEFAULT_MAX_FRAME_SIZE

__all__ = ["Pool"]


def _settle(done: concurrent.futures.Future[Any], result: Any, exc: BaseException | None) -> None:
    with contextlib.suppress(concurrent.futures.InvalidStateError):  # (cancelled by its owner)
        if exc is None:
            done.set_result(result)
        else:
            done.set_exception(exc)


class Pool:
    """A pool of worker processes, blocking API: ``pool.submit(fn, *args).result()``.

    ::

        with tether.sync.Pool(workers=4) as pool:
            print(pool.submit(math.factorial, 20).result())
            for r in pool.map(work, range(100)):   # in input order
                ...

    Same arguments and behaviour as :class:`tether.Pool`; the workers are
    started here (it returns once they said hello). Leaving ``with``
    normally is :meth:`close`, on an exception :meth:`terminate`.

    Raises:
        TypeError, ValueError: an argument has the wrong type or value.
        PeerGone: a worker failed to start.
    """

    def __init__(
        self,
        workers: int | None = None,
        *,
        timeout: float | None = None,
        retries: int = 0,
        start_method: str = "spawn",
        max_frame_size: int = DEFAULT_MAX_FRAME_SIZE,
    ) -> None:
        self._pool = AsyncPool(
            workers,
            timeout=timeout,
            retries=retries,
            start_method=start_method,
            max_frame_size=max_frame_size,
        )
        self.workers = self._pool.workers
        self._loop = new_loop()
        self._thread = threading.Thread(
            target=self._loop.run_forever, name="tether-pool", daemon=True
        )
        self._thread.start()
        self._lock = threading.Lock()
        self._closed = False
        self._ended = False  # the loop thread was stopped
        try:
            self._call(self._started())
        except BaseException:
            self._ended = self._closed = True
            self._end()
            raise

    async def _started(self) -> None:
        await self._pool.start()

    def _call(self, coro: Any) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result()

    def _end(self) -> None:
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10.0)
        if not self._thread.is_alive():
            self._loop.close()

    def __enter__(self) -> Pool:
        return self

    def __exit__(self, exc_type: object, *exc: object) -> None:
        if exc_type is None:
            self.close()
        else:
            self.terminate()

    @property
    def closed(self) -> bool:
        """Whether :meth:`close` or :meth:`terminate` was called."""
        return self._closed

    @property
    def pids(self) -> list[int]:
        """The process ids of the workers running now."""
        with self._lock:
            if self._ended:
                return []
            return self._call(self._pids())  # type: ignore[no-any-return]

    async def _pids(self) -> list[int]:
        return self._pool.pids

    def submit(
        self,
        fn: Callable[..., Any],
        *args: Any,
        timeout: Any = DEFAULT,
        result_type: Any = DEFAULT,
    ) -> concurrent.futures.Future[Any]:
        """Queue ``fn(*args)`` for a worker; ``.result()`` of the future is its result.

        Cancelling the future cancels the job. ``fn``'s type hints decide what
        its arguments and result arrive as; ``result_type``, timeout and errors
        as :meth:`tether.Pool.submit`.
        """
        job_target(fn, self._pool.start_method)
        rtype = job_result_type(fn, result_type)
        if timeout is not DEFAULT:
            _timeout(timeout)
        done: concurrent.futures.Future[Any] = concurrent.futures.Future()
        with self._lock:
            if self._closed:
                raise ConnectionClosed("the pool is closed: no new jobs")
            self._loop.call_soon_threadsafe(self._start_job, done, fn, moved(args), timeout, rtype)
        return done

    def _start_job(
        self,
        done: concurrent.futures.Future[Any],
        fn: Callable[..., Any],
        args: tuple[Any, ...],
        timeout: Any,
        result_type: Any,
    ) -> None:
        """In the loop's thread: submit, and tie the two futures together."""
        if done.cancelled():
            return
        try:
            job = self._pool.submit(fn, *args, timeout=timeout, result_type=result_type)
        except BaseException as exc:  # (the pool closed meanwhile)
            _settle(done, None, exc)
            return

        def finished(f: asyncio.Future[Any]) -> None:
            if f.cancelled():
                done.cancel()
            else:
                _settle(done, f.result() if f.exception() is None else None, f.exception())

        def cancelled(d: concurrent.futures.Future[Any]) -> None:
            if d.cancelled() and not self._loop.is_closed():
                self._loop.call_soon_threadsafe(job.cancel)  # the job gets a CANCEL

        job.add_done_callback(finished)
        done.add_done_callback(cancelled)

    def map(
        self,
        fn: Callable[..., Any],
        *iterables: Iterable[Any],
        timeout: Any = DEFAULT,
        result_type: Any = DEFAULT,
    ) -> Iterator[Any]:
        """``fn`` over the iterables (zipped), in input order, ``2 * workers`` jobs ahead at most.

        The first job that raises ends the iteration with its error; the jobs
        still queued are cancelled. ``timeout`` and ``result_type`` apply to
        each job, as for :meth:`submit`.
        """
        job_target(fn, self._pool.start_method)
        rtype = job_result_type(fn, result_type)
        if timeout is not DEFAULT:
            _timeout(timeout)
        if self._closed:
            raise ConnectionClosed("the pool is closed: no new jobs")
        if not iterables:
            raise TypeError("map() needs at least one iterable")
        return self._map(fn, zip(*iterables, strict=False), timeout, rtype)

    def _map(
        self,
        fn: Callable[..., Any],
        items: Iterable[tuple[Any, ...]],
        timeout: Any,
        result_type: Any,
    ) -> Iterator[Any]:
        window = 2 * self.workers
        ahead: collections.deque[concurrent.futures.Future[Any]] = collections.deque()
        try:
            for args in items:
                ahead.append(self.submit(fn, *args, timeout=timeout, result_type=result_type))
                if len(ahead) >= window:
                    yield ahead.popleft().result()
            while ahead:
                yield ahead.popleft().result()
        finally:
            for f in ahead:
                f.cancel()

    def close(self) -> None:
        """Refuse new jobs, wait for every submitted one, stop the workers (idempotent)."""
        self._shutdown(self._pool.close)

    def terminate(self) -> None:
        """Kill the workers now; unfinished jobs fail with :class:`~tether.ConnectionClosed`."""
        self._shutdown(self._pool.terminate)

    def _shutdown(self, how: Callable[[], Any]) -> None:
        with self._lock:  # (a submit racing with it then sees the pool closed)
            self._closed = True
            if self._ended:
                return
            try:
                self._call(how())
            finally:
                self._ended = True
                self._end()
