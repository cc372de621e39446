"""Event loop choice: uvloop when it is installed, asyncio's own otherwise.

uvloop is one of tether's dependencies where it ships wheels (CPython, not
Windows: an environment marker in ``pyproject.toml``), so the default loop is
the fast one; without it (another interpreter, or an install that left it
out) every entry point falls back to asyncio's loop. ``TETHER_LOOP=asyncio``
picks asyncio's loop even when uvloop is there.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

__all__ = ["loop_factory", "new_loop", "run"]

T = TypeVar("T")


def loop_factory() -> Callable[[], asyncio.AbstractEventLoop]:
    """What makes tether's loops: ``uvloop.new_event_loop`` if uvloop imports, else asyncio's.

    Decided on each call (not at import), so ``TETHER_LOOP`` set later still counts.
    """
    if os.environ.get("TETHER_LOOP", "") != "asyncio":
        try:
            import uvloop
        except ImportError:
            pass
        else:
            factory: Callable[[], asyncio.AbstractEventLoop] = uvloop.new_event_loop
            return factory
    return asyncio.new_event_loop


def run(main: Coroutine[Any, Any, T]) -> T:
    """Run ``main`` to completion on the loop :func:`loop_factory` picks (``asyncio.run`` else).

    :func:`tether.run` is the entry point for a program's own main (it also
    ends quietly on Ctrl-C and SIGTERM); this one runs tether's own coroutines:
    an async child's target, the demo, the bench.
    """
    with asyncio.Runner(loop_factory=loop_factory()) as runner:
        return runner.run(main)


def new_loop() -> asyncio.AbstractEventLoop:
    """A new event loop, of the kind :func:`run` would use (for a loop run in a thread)."""
    return loop_factory()()
