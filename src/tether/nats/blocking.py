"""``tether.sync.connect("nats://...")``: a blocking peer over NATS.

The NATS client is asyncio only, so the connection lives on an event loop
in a thread of its own; each blocking call hands its work to that loop and
waits (bounded by the call's timeout) for the answer.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import threading
from collections.abc import Callable
from typing import Any, TypeVar

from ..aio.loop import new_loop
from ..aio.peer import Peer as AsyncPeer
from ..errors import InvokeTimeout, PeerGone
from ..results import DEFAULT
from .link import connect_nats

__all__ = ["NatsPeer", "connect_blocking"]

F = TypeVar("F", bound=Callable[..., Any])
_SLACK = 5.0  # seconds past a call's own timeout before the waiting thread gives up


class NatsPeer:
    """A blocking peer whose connection runs over NATS (on a loop thread of its own).

    ``invoke``, ``send``, ``handle``, ``on`` and ``close`` work as on
    :class:`tether.sync.Peer`; handlers run on the connection's loop thread.
    """

    def __init__(self, loop: asyncio.AbstractEventLoop, thread: threading.Thread, peer: AsyncPeer):
        self._loop = loop
        self._thread = thread
        self._peer = peer
        #: the connection's asyncio peer (runs on the loop thread)
        self.aio = peer

    def _run(self, coro: Any, bound: float | None) -> Any:
        fut = asyncio.run_coroutine_threadsafe(coro, self._loop)
        try:
            return fut.result(None if bound is None else bound + _SLACK)
        except concurrent.futures.TimeoutError:
            fut.cancel()
            raise InvokeTimeout(f"{self!r}: no answer within {bound} s") from None

    def invoke(
        self, channel: str, *args: Any, timeout: float | None = DEFAULT, result_type: Any = Any
    ) -> Any:
        """Call ``channel`` on main and return its result (see :meth:`tether.Peer.invoke`)."""
        bound = self._peer.timeout if timeout is DEFAULT else timeout
        coro = self._peer.invoke(channel, *args, timeout=timeout, result_type=result_type)
        return self._run(coro, bound if isinstance(bound, (int, float)) else None)

    def send(self, channel: str, *args: Any) -> None:
        """Send an event to main."""
        self._run(self._peer.send(channel, *args), self._peer.timeout)

    def handle(self, channel: str, fn: F | None = None, **kw: Any) -> Any:
        """Register a handler main can invoke (as :meth:`tether.Peer.handle`)."""
        return self._peer.handle(channel, fn, **kw) if fn else self._peer.handle(channel, **kw)

    def on(self, channel: str, fn: F | None = None, **kw: Any) -> Any:
        """Register an event listener (as :meth:`tether.Peer.on`)."""
        return self._peer.on(channel, fn, **kw) if fn else self._peer.on(channel, **kw)

    @property
    def closed(self) -> bool:
        return self._peer.closed

    def close(self) -> None:
        """Say goodbye, close the NATS connection and stop the loop thread."""
        if self._thread.is_alive():
            with contextlib.suppress(PeerGone, InvokeTimeout, RuntimeError):
                self._run(self._peer.close(), 5.0)
            finished = getattr(self._peer._stream, "finished", None)
            if finished is not None:  # the goodbye published and the NATS link closed
                with contextlib.suppress(Exception):
                    self._run(asyncio.wait_for(asyncio.shield(finished), 5.0), 5.0)
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(10)

    def __enter__(self) -> NatsPeer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<sync {self._peer!r}>"


def connect_blocking(address: str, kw: dict[str, Any]) -> NatsPeer:
    """Connect on a new loop thread; raise what :func:`~tether.nats.link.connect_nats` raises."""
    loop = new_loop()  # uvloop's where installed, as for tether.run
    thread = threading.Thread(target=loop.run_forever, name="tether-nats", daemon=True)
    thread.start()
    fut = asyncio.run_coroutine_threadsafe(connect_nats(address, kw), loop)
    try:
        peer = fut.result(kw["connect_timeout"] * 2 + _SLACK)
    except BaseException:
        fut.cancel()
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)
        raise
    return NatsPeer(loop, thread, peer)
