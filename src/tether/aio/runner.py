"""``tether.run``: run an async main on the best loop, and end quietly on Ctrl-C."""

from __future__ import annotations

import asyncio
import contextlib
import signal
from collections.abc import Coroutine
from typing import Any, TypeVar

from .loop import loop_factory

__all__ = ["EXIT_INTERRUPTED", "EXIT_TERMINATED", "run"]

T = TypeVar("T")

#: the exit status :func:`run` ends with on Ctrl-C (128 + SIGINT, as a shell reports it)
EXIT_INTERRUPTED = 128 + signal.SIGINT
#: the exit status :func:`run` ends with on SIGTERM (128 + SIGTERM)
EXIT_TERMINATED = 128 + signal.SIGTERM


def run(main: Coroutine[Any, Any, T], *, debug: bool | None = None) -> T:
    """Run the coroutine ``main`` to completion and return its result.

    The loop is uvloop's when uvloop imports (it is a dependency of tether on
    CPython outside Windows), asyncio's own otherwise or with
    ``TETHER_LOOP=asyncio``. Call it once, from the main thread, as
    ``tether.run(amain())``: it does what ``asyncio.run`` does, and on Ctrl-C
    (SIGINT) it cancels ``main``, so its ``async with tether.Main()`` blocks
    close (children are ended, listeners removed), then exits the process with
    status 130 (:data:`EXIT_INTERRUPTED`) by raising ``SystemExit``: no
    traceback. A second Ctrl-C during that clean-up stops it at once (same
    exit). SIGTERM (what systemd and docker send) does the same clean-up and
    exits with status 143 (:data:`EXIT_TERMINATED`), unless something else
    handles SIGTERM (:meth:`tether.Main.serve_forever` does, and returns).

    Raises:
        TypeError: ``main`` is not a coroutine (``tether.run(amain)`` instead
            of ``tether.run(amain())``).
        RuntimeError: called from a running event loop.
        SystemExit: (status 130) on Ctrl-C, (status 143) on SIGTERM.
    """
    if not asyncio.iscoroutine(main):
        hint = " (call it: tether.run(amain()), not tether.run(amain))" if callable(main) else ""
        raise TypeError(f"tether.run() needs a coroutine, not {type(main).__name__}{hint}")
    try:
        with asyncio.Runner(loop_factory=loop_factory(), debug=debug) as runner:
            return runner.run(_ending_on_sigterm(main))
    except KeyboardInterrupt:
        raise SystemExit(EXIT_INTERRUPTED) from None


async def _ending_on_sigterm(main: Coroutine[Any, Any, T]) -> T:
    """Await ``main``; SIGTERM cancels it (its ``async with`` blocks clean up), then exit 143."""
    loop = asyncio.get_running_loop()
    task = asyncio.current_task()
    termed = False

    def on_term() -> None:
        nonlocal termed
        termed = True
        if task is not None:
            task.cancel()

    installed = False
    if signal.getsignal(signal.SIGTERM) is signal.SIG_DFL:
        with contextlib.suppress(NotImplementedError, RuntimeError, ValueError):
            loop.add_signal_handler(signal.SIGTERM, on_term)
            installed = True
    try:
        return await main
    except asyncio.CancelledError:
        if termed:
            raise SystemExit(EXIT_TERMINATED) from None
        raise
    finally:
        if installed:
            with contextlib.suppress(Exception):
                loop.remove_signal_handler(signal.SIGTERM)
