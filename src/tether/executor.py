"""The worker pool: :class:`Pool`, an executor whose workers are tether children.

What ``concurrent.futures.ProcessPoolExecutor`` and ``multiprocessing.Pool``
give, without pickle and without hanging on a dead worker:

* A job names its function by module and qualified name; the worker imports
  it. Arguments and results travel as for :meth:`tether.Peer.invoke`
  (MessagePack; NumPy arrays and :class:`tether.Buffer` through shared
  memory), so nothing is unpickled on either side. The function's own type
  hints decide what arrives, as a handler's do: the worker decodes and
  checks the arguments by its parameters' hints (a wrong one is a
  :class:`~tether.BadRequest` naming it, before the job runs), and main
  decodes the result by its return hint (or ``result_type=``), so a ``set``,
  ``tuple``, dataclass or ``bytes`` arrives as one, at every size.
* Each worker is a child started by :meth:`tether.Main.spawn` and runs one job
  at a time. A worker that dies fails the job it was running with
  :class:`~tether.PeerGone` (saying the exit code or signal), or runs it once
  more on another worker with ``retries=1``; it is replaced, and the other
  jobs go on. A job is never silently lost: every submitted job returns or
  raises.
* A job that times out (or whose future is cancelled) gets a CANCEL: an
  ``async def`` job is cancelled in the worker. A plain function cannot be
  interrupted; its worker is given :attr:`Pool.cancel_grace` seconds to finish
  it, then killed and replaced, so a runaway job never holds a worker.

Which functions work: a function defined at the top level of a module (or a
static method of a module-level class), found again by
``getattr(import_module(fn.__module__), ...)``. Functions of the script being
run (``__main__``) work too under the ``spawn`` and ``forkserver`` start
methods, which run the script again in the worker as multiprocessing does
(hence the ``if __name__ == "__main__":`` guard); not from an interactive
session or ``python -c``, which has no file for the worker to run. Lambdas,
nested functions, bound methods and ``functools.partial`` are refused at
:meth:`Pool.submit` with a :class:`TypeError`.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import importlib
import inspect
import logging
import multiprocessing
import os
import sys
import weakref
from collections.abc import AsyncIterator, Callable, Iterable
from typing import Any, ClassVar, Final

import msgspec

from .aio.child import Child
from .aio.main import Main
from .aio.peer import Peer
from .codec import ArgsSpec, any_decoder, buffer_target, decode_with, type_hints
from .errors import BadRequest, ConnectionClosed, InvokeTimeout, PeerGone, TetherError
from .registry import Call
from .results import DEFAULT, _typed_decoder
from .shm import Buffer
from .wire import DEFAULT_MAX_FRAME_SIZE

__all__ = ["Pool", "job_target"]

log = logging.getLogger("tether")

#: the worker's channels (a worker is a tether child; these are its handlers):
#: plain functions (run inline, on the worker's main thread), ``async def``
#: functions (a task, which a CANCEL cancels), and "are you idle?"
JOB: Final = "tether.pool.job"
ASYNC_JOB: Final = "tether.pool.async-job"
IDLE: Final = "tether.pool.idle"

_Target = tuple[str, str, str]  # (channel, module, qualname)
_targets: weakref.WeakKeyDictionary[Any, _Target] = weakref.WeakKeyDictionary()
_returns: weakref.WeakKeyDictionary[Any, Any] = weakref.WeakKeyDictionary()
_checked: set[Any] = {Any}  # result types found decodable


def job_target(fn: object, start_method: str = "spawn") -> _Target:
    """``(channel, module, qualname)``: how a worker runs ``fn``; refuse what it cannot import.

    Raises:
        TypeError: ``fn`` is not callable, or not importable by name (a
            lambda, a nested function, a bound method, a ``functools.partial``,
            a callable object, or a name that no longer refers to ``fn``).
        ValueError: ``fn`` was defined in ``__main__`` of an interactive
            session or ``python -c`` (no file the worker could run), under the
            ``spawn`` or ``forkserver`` start method.
    """
    try:
        target = _targets.get(fn)
    except TypeError:  # not weak-referenceable: check it every time
        target = None
    if target is not None:
        return target
    if not callable(fn):
        raise TypeError(f"Pool needs a function to run, not {type(fn).__name__}")
    module = getattr(fn, "__module__", None)
    qualname = getattr(fn, "__qualname__", None)
    what = getattr(fn, "__qualname__", None) or repr(fn)
    hint = (
        "define it with def at the top level of a module (the worker imports it by "
        "module and name, nothing is pickled)"
    )
    if not isinstance(module, str) or not isinstance(qualname, str):
        raise TypeError(f"Pool cannot send {what}: it has no module-level name; {hint}")
    if "<lambda>" in qualname or "<locals>" in qualname:
        raise TypeError(f"Pool cannot send {module}.{qualname}: a worker cannot import it; {hint}")
    found: Any = sys.modules.get(module)
    for part in qualname.split("."):
        found = getattr(found, part, None)
    if found is not fn:
        raise TypeError(
            f"Pool cannot send {what}: {module}.{qualname} does not name it "
            f"(a bound method, or a function rebound or decorated without functools.wraps?); {hint}"
        )
    if module == "__main__" and start_method != "fork":
        main = sys.modules["__main__"]
        path = getattr(main, "__file__", None)  # (what multiprocessing runs again in the worker)
        if getattr(main, "__spec__", None) is None and not (path and os.path.isfile(path)):
            raise ValueError(
                f"Pool cannot send __main__.{qualname}: it was defined in an interactive "
                f"session (or python -c), which a {start_method!r} worker cannot import; put it "
                "in a module and import it, or use Pool(start_method='fork')"
            )
    channel = ASYNC_JOB if inspect.iscoroutinefunction(fn) else JOB
    target = (channel, module, qualname)
    if module != "__main__":  # (whose check depends on the start method)
        with contextlib.suppress(TypeError):  # (not weak-referenceable: not cached)
            _targets[fn] = target
    return target


def _decodable(tp: Any) -> bool:
    """Whether a result can be decoded as ``tp`` (a buffer type, or what msgspec decodes)."""
    if tp is Any or buffer_target(tp) is not None:
        return True
    try:
        hash(tp)
        _typed_decoder(tp)
    except TypeError:
        return False
    return True


def job_result_type(fn: Any, result_type: Any = DEFAULT) -> Any:
    """The type ``fn``'s results are decoded as: ``result_type``, else its return hint.

    A return hint a result cannot be decoded as (an ndarray, a class msgspec
    does not know) is ``Any``: the result arrives as sent (arrays as arrays).
    Looked up once per function.

    Raises:
        TypeError: ``result_type`` is given and is not a type a result can be decoded as.
    """
    if result_type is not DEFAULT:
        try:
            if result_type in _checked:
                return result_type
        except TypeError:  # unhashable: not decodable either
            pass
        if not _decodable(result_type):
            raise TypeError(
                f"result_type {result_type!r} is not a type a result can be decoded as "
                "(what msgspec decodes, bytes, memoryview, or Any)"
            )
        _checked.add(result_type)
        return result_type
    try:
        return _returns[fn]
    except (KeyError, TypeError):  # (TypeError: not weak-referenceable)
        pass
    hint = type_hints(fn).get("return", Any)
    tp = hint if _decodable(hint) else Any
    with contextlib.suppress(TypeError):
        _returns[fn] = tp
    return tp


# -- the worker (runs in the child) -------------------------------------------


def _resolve(module: str, qualname: str) -> Callable[..., Any]:
    found: Any = importlib.import_module(module)
    for part in qualname.split("."):
        found = getattr(found, part)
    if not callable(found):
        raise TypeError(f"{module}.{qualname} is not callable")
    return found  # type: ignore[no-any-return]


_NAMES: Final = msgspec.msgpack.Decoder(tuple[str, str])


def _array_header(n: int) -> bytes:
    """The MessagePack header of an array of ``n`` items."""
    if n < 16:
        return bytes((0x90 | n,))
    if n < 1 << 16:
        return b"\xdc" + n.to_bytes(2, "big")
    return b"\xdd" + n.to_bytes(4, "big")


def _split(body: bytes | memoryview) -> tuple[bytes, int, int]:
    """A job body ``[module, qualname, *args]`` as ``(names, n, start)``.

    ``names``: the two names as raw MessagePack (what jobs are cached by);
    ``n``: how many arguments follow; ``start``: where they begin. Read by
    hand, being only two headers: a full decode would cost each small job more.

    Raises:
        ValueError, IndexError: the body is not an array starting with two strings.
    """
    b = body[0]
    if b & 0xF0 == 0x90:
        n, pos = b & 0x0F, 1
    elif b == 0xDC:
        n, pos = int.from_bytes(body[1:3], "big"), 3
    elif b == 0xDD:
        n, pos = int.from_bytes(body[1:5], "big"), 5
    else:
        raise ValueError("a job is an array")
    if n < 2:
        raise ValueError("a job starts with its function's module and name")
    first = pos
    for _ in range(2):
        b = body[pos]
        if b & 0xE0 == 0xA0:
            pos += 1 + (b & 0x1F)
        elif b == 0xD9:
            pos += 2 + body[pos + 1]
        elif b == 0xDA:
            pos += 3 + int.from_bytes(body[pos + 1 : pos + 3], "big")
        elif b == 0xDB:
            pos += 5 + int.from_bytes(body[pos + 1 : pos + 5], "big")
        else:
            raise ValueError("a job's module and name are strings")
    if pos > len(body):
        raise ValueError("truncated")
    return bytes(body[first:pos]), n - 2, pos


def _raiser(exc: Exception) -> Callable[..., Any]:
    def unresolved(*args: Any) -> Any:
        raise exc

    return unresolved


class _Jobs:
    """The worker's argument decoder for jobs: ``[module, qualname, *args]``.

    It stands in for the job channels' own :class:`~tether.codec.ArgsSpec`:
    it finds the function (imported once), then decodes ``args`` by the
    function's type hints exactly as a handler's arguments are (an ArgsSpec
    built with ``call=False``, once per function), so ``set[int]`` gets a set,
    a dataclass hint the dataclass, ``bytes`` bytes at every size, and a wrong
    argument is a :class:`~tether.BadRequest` naming it before the job runs.
    Decoded, a job is ``(fn, args)``.
    """

    __slots__ = ("cache",)

    def __init__(self) -> None:
        #: the two names, as raw MessagePack -> the function and its decoder
        self.cache: dict[bytes, tuple[Callable[..., Any], ArgsSpec | None]] = {}

    def decode(
        self, body: bytes | memoryview, attachments: Any = (), pickled: bool = False
    ) -> tuple[Any, ...]:
        """``(fn, args)``; raises :class:`~tether.BadRequest` naming a bad argument."""
        try:
            names, n, start = _split(body)
        except (ValueError, IndexError) as exc:
            raise BadRequest(f"malformed job: {exc}") from None
        found = self.cache.get(names)
        if found is None:
            try:
                module, qualname = _NAMES.decode(b"\x92" + names)
            except msgspec.MsgspecError as exc:
                raise BadRequest(f"malformed job: {exc}") from None
            try:
                fn = _resolve(module, qualname)
            except Exception as exc:  # (not importable: the job raises it, as a RemoteError)
                return _raiser(exc), ()
            try:
                spec: ArgsSpec | None = ArgsSpec(fn, call=False)
            except (TypeError, ValueError):  # no signature (some builtins): arguments as sent
                spec = None
            found = self.cache[names] = (fn, spec)
        fn, spec = found
        # The arguments, re-framed as an array of their own.
        args = _array_header(n) + body[start:]
        if spec is None:
            return fn, tuple(decode_with(any_decoder, args, attachments, pickled))
        return fn, spec.decode(args, attachments, pickled)


async def worker(peer: Peer) -> None:
    """A pool worker's target: run jobs until main closes the connection."""
    running: set[asyncio.Task[Any]] = set()

    @peer.handle(JOB)
    def job(call: Call, fn: Callable[..., Any], args: tuple[Any, ...]) -> Any:
        # Answered inline: the worker reads nothing else (a CANCEL included) until it returns.
        result = fn(*args)
        if inspect.isawaitable(result):
            close = getattr(result, "close", None)
            if close is not None:
                close()  # (no "never awaited" warning)
            raise TypeError(
                f"{fn.__module__}.{fn.__qualname__}() returned an awaitable: declare it async def"
            )
        return result

    @peer.handle(ASYNC_JOB)
    async def async_job(call: Call, fn: Callable[..., Any], args: tuple[Any, ...]) -> Any:
        task = asyncio.current_task()
        assert task is not None
        running.add(task)
        try:
            return await fn(*args)  # cancelled by a CANCEL (timeout, or the future cancelled)
        finally:
            running.discard(task)

    jobs = _Jobs()
    for channel in (JOB, ASYNC_JOB):  # their arguments are decoded by each job's own hints
        handler: Any = peer.registry.invokes[channel]
        handler.spec = jobs

    @peer.handle(IDLE)
    async def idle(call: Call) -> bool:
        # Answered once no job is left running: a plain one has returned (this
        # runs after it), a cancelled async one has finished cleaning up.
        while running:
            await asyncio.wait(set(running))
        return True

    await peer.wait_closed()


# -- the pool (runs in main) ---------------------------------------------------


def moved(args: tuple[Any, ...]) -> tuple[Any, ...]:
    """``args`` with each :class:`~tether.Buffer` moved into a new one: given away at submit."""
    if not any(isinstance(a, Buffer) for a in args):
        return args
    return tuple(a._move() if isinstance(a, Buffer) else a for a in args)


def _dead(child: Child) -> bool:
    return child.closed or child.exitcode is not None


class _Job:
    __slots__ = (
        "args",
        "channel",
        "future",
        "module",
        "qualname",
        "result_type",
        "timeout",
        "tries",
    )

    def __init__(
        self,
        channel: str,
        module: str,
        qualname: str,
        args: tuple[Any, ...],
        timeout: float | None,
        future: asyncio.Future[Any],
        result_type: Any,
    ) -> None:
        self.channel = channel
        self.module = module
        self.qualname = qualname
        self.args = args
        self.timeout = timeout
        self.future = future
        self.result_type = result_type
        self.tries = 0

    def fail(self, exc: BaseException) -> None:
        if not self.future.done():
            self.future.set_exception(exc)


def _count(name: str, value: object) -> int:
    if not isinstance(value, int) or isinstance(value, bool):
        raise TypeError(f"{name} must be an int, not {type(value).__name__}")
    return value


def _timeout(value: object) -> float | None:
    if value is None:
        return None
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        raise TypeError(f"timeout must be a number of seconds or None, not {type(value).__name__}")
    if not value > 0:
        raise ValueError(f"timeout must be > 0 seconds (or None: no limit), not {value!r}")
    return float(value)


class Pool:
    """A pool of worker processes running module-level functions: ``await pool.submit(fn, *args)``.

    ::

        async with tether.Pool(workers=4) as pool:
            print(await pool.submit(math.factorial, 20))
            async for r in pool.map(work, range(100)):   # in input order
                ...

    Args:
        workers: how many worker processes (default: ``os.cpu_count()``).
        timeout: default per-job timeout in seconds (``None``, the default:
            jobs run as long as they need; a dead worker still fails its job
            at once). A job past it raises :class:`~tether.InvokeTimeout`.
        retries: how many more times a job whose worker *died* under it is
            run on a fresh worker (0 or 1 make sense: a job that kills its
            worker twice is probably the reason). Jobs that raise or time
            out are never retried.
        start_method: how workers start: ``spawn`` (default), ``forkserver``
            or ``fork`` (see :meth:`tether.Main.spawn`).
        max_frame_size: largest job or result (arrays included), as for :class:`tether.Main`.

    Leaving ``async with`` normally is :meth:`close` (wait for every job); on
    an exception it is :meth:`terminate`. The pool starts its workers on
    entering ``async with`` (or at the first :meth:`submit`).

    Raises:
        TypeError, ValueError: an argument has the wrong type or value.
    """

    #: seconds a worker whose job timed out (or was cancelled) gets to stop
    #: before it is killed and replaced (a plain function cannot be interrupted)
    cancel_grace: ClassVar[float] = 1.0

    def __init__(
        self,
        workers: int | None = None,
        *,
        timeout: float | None = None,
        retries: int = 0,
        start_method: str = "spawn",
        max_frame_size: int = DEFAULT_MAX_FRAME_SIZE,
    ) -> None:
        if workers is None:
            workers = os.cpu_count() or 1
        if _count("workers", workers) < 1:
            raise ValueError(f"workers must be at least 1, not {workers}")
        if _count("retries", retries) < 0:
            raise ValueError(f"retries must be 0 or more, not {retries}")
        methods = multiprocessing.get_all_start_methods()
        if start_method not in methods:
            raise ValueError(f"start_method must be one of {methods}, not {start_method!r}")
        self.workers = workers
        self.timeout = _timeout(timeout)
        self.retries = retries
        self.start_method = start_method
        self._main = Main(
            timeout=None, start_method=start_method, max_frame_size=max_frame_size, name="pool"
        )
        self._jobs: collections.deque[_Job] = collections.deque()  # queued, not yet sent
        self._waiters: collections.deque[asyncio.Future[None]] = collections.deque()
        self._pending: set[asyncio.Future[Any]] = set()  # every job's future not yet done
        self._drivers: set[asyncio.Task[None]] = set()
        self._starting: asyncio.Future[None] | None = None
        self._closing = False
        self._broken: BaseException | None = None  # no worker can be started
        self._spawn_failed: BaseException | None = None  # why a replacement did not start

    # -- lifetime ------------------------------------------------------------

    async def __aenter__(self) -> Pool:
        await self.start()
        return self

    async def __aexit__(self, exc_type: object, *exc: object) -> None:
        if exc_type is None:
            await self.close()
        else:
            await self.terminate()

    @property
    def closed(self) -> bool:
        """Whether :meth:`close` or :meth:`terminate` was called (submit then raises)."""
        return self._closing

    @property
    def pids(self) -> list[int]:
        """The process ids of the workers running now."""
        return sorted(c.pid for c in self._main.children)

    def start(self) -> asyncio.Future[None]:
        """Start the workers (idempotent); await it to wait until they said hello.

        Raises (when awaited):
            PeerGone: a worker failed to start.
            ConnectionClosed: the pool was closed.
        """
        if self._starting is None:
            if self._closing:
                raise ConnectionClosed("the pool is closed")
            self._starting = asyncio.ensure_future(self._start())
            # (a failed start also fails every queued job: nobody has to await it)
            self._starting.add_done_callback(lambda f: f.cancelled() or f.exception())
        return self._starting

    async def _start(self) -> None:
        results = await asyncio.gather(
            *(self._main.spawn(worker, name="pool-worker") for _ in range(self.workers)),
            return_exceptions=True,
        )
        failed = next((r for r in results if isinstance(r, BaseException)), None)
        if failed is not None:
            self._break(failed)
            await self._main.close()
            raise failed
        for child in results:
            assert isinstance(child, Child)
            child.on_exit(self._on_worker_exit)
            task = asyncio.ensure_future(self._drive(child))
            self._drivers.add(task)
            task.add_done_callback(self._driver_done)

    async def close(self) -> None:
        """Refuse new jobs, wait for every submitted one to finish, then stop the workers."""
        self._closing = True
        if self._starting is not None:
            with contextlib.suppress(BaseException):  # (a failed start failed every job)
                await self._starting
            while self._pending:
                await asyncio.wait(set(self._pending))
        await self._stop()

    async def terminate(self) -> None:
        """Kill the workers now; unfinished jobs fail with :class:`~tether.ConnectionClosed`."""
        self._closing = True
        for job in self._jobs:
            job.fail(ConnectionClosed("the pool was terminated before this job ran"))
        self._jobs.clear()
        for fut in list(self._pending):
            if not fut.done():
                fut.set_exception(
                    ConnectionClosed("the pool was terminated while this job ran (worker killed)")
                )
        for child in list(self._main.children):
            child.kill()
        if self._starting is not None and not self._starting.done():
            self._starting.cancel()
        await self._stop()

    async def _stop(self) -> None:
        for task in self._drivers:
            task.cancel()
        if self._drivers:
            await asyncio.wait(set(self._drivers))
        for w in self._waiters:
            w.cancel()
        await self._main.close()

    # -- jobs ----------------------------------------------------------------

    def submit(
        self,
        fn: Callable[..., Any],
        *args: Any,
        timeout: Any = DEFAULT,
        result_type: Any = DEFAULT,
    ) -> asyncio.Future[Any]:
        """Queue ``fn(*args)`` for a worker; await the returned future for its result.

        Arguments are positional and travel as for :meth:`tether.Peer.invoke`
        (what msgspec encodes; arrays and :class:`tether.Buffer` through shared
        memory); so does the result. ``fn``'s type hints decide what arrives,
        as a handler's do: the worker decodes and checks each argument by its
        parameter's hint (a ``set[int]`` gets a set, a dataclass the
        dataclass, ``bytes`` bytes at every size), and the result is decoded
        by the return hint. A Buffer argument is given away here: it raises
        :class:`~tether.ConsumedError` from now on.

        ``timeout``: seconds this job may run (default: the pool's), counted
        from when a worker takes it, not while it waits for one. Cancelling
        the future cancels the job (the worker gets a CANCEL).

        ``result_type``: decode the result as this type instead of ``fn``'s
        return hint (as for :meth:`tether.Peer.invoke`; ``Any``: as sent).

        Raises:
            TypeError, ValueError: ``fn`` cannot be imported by name in a
                worker (see the module's docs), or ``timeout`` or
                ``result_type`` is invalid.
            ConnectionClosed: the pool was closed or terminated.
        Raises (when awaited):
            RemoteError: ``fn`` raised (``type_name`` is the remote exception type).
            PeerGone: the worker died running it (the message says how: exit
                code or signal), or no worker could be started.
            InvokeTimeout: the job ran out of time.
            BadRequest: an argument does not match ``fn``'s hints (the message
                names it, as Python would: ``add() argument 'b': expected int,
                got str``), or the result does not match its type.
            PayloadTooLarge: the arguments or the result could not be sent.
        """
        channel, module, qualname = job_target(fn, self.start_method)
        rtype = job_result_type(fn, result_type)
        t = self.timeout if timeout is DEFAULT else _timeout(timeout)
        if self._closing:
            raise ConnectionClosed("the pool is closed: no new jobs")
        if self._starting is None:
            self.start()
        fut: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        if self._broken is not None:
            fut.set_exception(self._broken_error())
            return fut
        self._pending.add(fut)
        fut.add_done_callback(self._pending.discard)
        self._push(_Job(channel, module, qualname, moved(args), t, fut, rtype))
        return fut

    def map(
        self,
        fn: Callable[..., Any],
        *iterables: Iterable[Any],
        timeout: Any = DEFAULT,
        result_type: Any = DEFAULT,
    ) -> AsyncIterator[Any]:
        """``fn`` over the iterables (zipped, as :func:`map`), results in input order.

        At most ``2 * workers`` jobs are queued or running at once: the input
        is read as results are consumed, never all at once. The first job that
        raises ends the iteration with its error; jobs still queued are cancelled.
        ``timeout`` and ``result_type`` apply to each job, as for :meth:`submit`.

        Raises:
            TypeError, ValueError, ConnectionClosed: as :meth:`submit`, at the call.
        """
        job_target(fn, self.start_method)
        rtype = job_result_type(fn, result_type)
        if timeout is not DEFAULT:
            _timeout(timeout)
        if self._closing:
            raise ConnectionClosed("the pool is closed: no new jobs")
        if not iterables:
            raise TypeError("map() needs at least one iterable")
        return self._map(fn, zip(*iterables, strict=False), timeout, rtype)

    async def _map(
        self,
        fn: Callable[..., Any],
        items: Iterable[tuple[Any, ...]],
        timeout: Any,
        result_type: Any,
    ) -> AsyncIterator[Any]:
        window = 2 * self.workers
        ahead: collections.deque[asyncio.Future[Any]] = collections.deque()
        try:
            for args in items:
                ahead.append(self.submit(fn, *args, timeout=timeout, result_type=result_type))
                if len(ahead) >= window:
                    yield await ahead.popleft()
            while ahead:
                yield await ahead.popleft()
        finally:
            for f in ahead:
                f.cancel()

    # -- the queue -------------------------------------------------------------

    def _push(self, job: _Job, *, front: bool = False) -> None:
        if front:
            self._jobs.appendleft(job)
        else:
            self._jobs.append(job)
        while self._waiters:
            w = self._waiters.popleft()
            if not w.done():
                w.set_result(None)
                break

    async def _next(self, child: Child) -> _Job | None:
        """The next job to run; ``None`` as soon as ``child`` dies while waiting for one."""
        while True:
            while self._jobs:
                job = self._jobs.popleft()
                if not job.future.done():  # (skip jobs cancelled while queued)
                    return job
            if _dead(child):
                return None
            w = asyncio.get_running_loop().create_future()
            self._waiters.append(w)
            await w

    def _on_worker_exit(self, child: Child) -> None:
        # Wake every idle driver: the one whose worker this was replaces it now.
        waiters, self._waiters = self._waiters, collections.deque()
        for w in waiters:
            if not w.done():
                w.set_result(None)

    # -- one driver per worker slot ---------------------------------------------

    async def _drive(self, child: Child | None) -> None:
        """Feed one worker jobs, one at a time; replace it as soon as it dies.

        Workers that keep dying without finishing a job (a job that kills
        every worker, a process that kills them as they start) are replaced
        ever more slowly, up to once every 5 s, so the pool never spins.
        """
        deaths = 0  # in a row, without a job finished in between
        while True:
            if child is None or _dead(child):
                if deaths > 1:
                    await asyncio.sleep(min(0.05 * 2 ** (deaths - 2), 5.0))
                try:
                    child = await self._main.spawn(worker, name="pool-worker")
                except (TetherError, OSError) as exc:  # (ConnectionClosed: the pool is closing)
                    if not self._closing:
                        log.warning("a pool worker could not be started: %s", exc)
                    self._spawn_failed = exc
                    return
                child.on_exit(self._on_worker_exit)
            job = await self._next(child)
            if job is None:  # died (or was killed) while idle
                deaths += 1
                continue
            if _dead(child):  # died just now: the job never reached it
                self._push(job, front=True)
                deaths += 1
                continue
            if await self._run(child, job):
                deaths = 0
            else:
                child = None
                deaths += 1

    def _driver_done(self, task: asyncio.Task[None]) -> None:
        self._drivers.discard(task)
        if not self._drivers and not self._closing:
            # Every slot failed to start a worker: nothing would ever run the queue.
            self._break(self._spawn_failed or PeerGone("no pool worker is left"))

    def _break(self, exc: BaseException) -> None:
        self._broken = exc
        err = self._broken_error()
        for job in self._jobs:
            job.fail(err)
        self._jobs.clear()

    def _broken_error(self) -> PeerGone:
        err = PeerGone(f"the pool cannot start workers: {self._broken}")
        err.__cause__ = self._broken
        return err

    async def _run(self, child: Child, job: _Job) -> bool:
        """Run ``job`` on ``child``; whether the worker can take another job."""
        call = asyncio.ensure_future(
            child.invoke(
                job.channel,
                job.module,
                job.qualname,
                *job.args,
                timeout=job.timeout,
                result_type=job.result_type,
            )
        )

        def owner_cancelled(fut: asyncio.Future[Any]) -> None:
            if fut.cancelled():
                call.cancel()  # the invoke sends CANCEL

        job.future.add_done_callback(owner_cancelled)
        try:
            result = await call
        except asyncio.CancelledError:
            task = asyncio.current_task()
            if task is not None and task.cancelling():  # the pool is stopping
                call.cancel()
                raise
            return await self._settle(child)  # the job's owner cancelled it
        except InvokeTimeout as exc:
            late = InvokeTimeout(
                f"{job.module}.{job.qualname}() did not finish within {job.timeout} s "
                "(cancelled in its worker)"
            )
            late.__cause__ = exc
            job.fail(late)
            return await self._settle(child)
        except PeerGone as exc:
            if job.tries < self.retries and not job.future.done():
                job.tries += 1
                self._push(job, front=True)  # run once more, first, on a fresh worker
            else:
                gone = PeerGone(
                    f"{job.module}.{job.qualname}(): its pool worker died: {exc}",
                    exitcode=exc.exitcode,
                )
                gone.__cause__ = exc
                job.fail(gone)
            return False
        except Exception as exc:  # RemoteError, BadRequest, PayloadTooLarge...
            job.fail(exc)
            return not child.closed
        finally:
            job.future.remove_done_callback(owner_cancelled)
        if not job.future.done():
            job.future.set_result(result)
        return True

    async def _settle(self, child: Child) -> bool:
        """After a CANCEL: wait (bounded) until the worker is idle, else kill it."""
        try:
            await child.invoke(IDLE, timeout=self.cancel_grace)
            return True
        except asyncio.CancelledError:
            child.kill()
            raise
        except TetherError:
            child.kill()  # still running a plain function that ignores the cancel
            with contextlib.suppress(TimeoutError):
                await child.wait(5.0)
            return False
