"""Event loop choice: uvloop when it is installed, asyncio's own otherwise."""

from __future__ import annotations

import asyncio
import os
from collections.abc import Coroutine
from typing import Any, TypeVar

__all__ = ["new_loop", "run"]

T = TypeVar("T")


def run(main: Coroutine[Any, Any, T]) -> T:
    """Run ``main`` to completion on uvloop if available (``TETHER_LOOP=asyncio`` opts out)."""
    if os.environ.get("TETHER_LOOP", "") != "asyncio":
        try:
            import uvloop
        except ImportError:
            pass
        else:
            return uvloop.run(main)  # type: ignore[no-any-return,unused-ignore]
    return asyncio.run(main)


def new_loop() -> asyncio.AbstractEventLoop:
    """A new event loop, of the kind :func:`run` would use (for a loop run in a thread)."""
    if os.environ.get("TETHER_LOOP", "") != "asyncio":
        try:
            import uvloop
        except ImportError:
            pass
        else:
            return uvloop.new_event_loop()  # type: ignore[no-any-return,unused-ignore]
    return asyncio.new_event_loop()
