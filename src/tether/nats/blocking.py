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
from collections.abc import Iterator
from typing import Any

from .. import codec
from ..aio.loop import new_loop
from ..aio.peer import Peer as AsyncPeer
from ..errors import InvokeTimeout, PeerGone
from ..registry import Handlers
from ..results import DEFAULT, timeout_message
from ..streams import DEFAULT_WINDOW
from . import listing
from .link import connect_nats

__all__ = ["NatsPeer", "NatsStreamIter", "connect_blocking", "list_channels"]

_SLACK = 5.0  # seconds past a call's own timeout before the waiting thread gives up


def _shared(name: str, doc: str, settable: bool = False) -> Any:
    """A property that reads (and sets) the asyncio peer's attribute ``name``."""

    def get(self: NatsPeer) -> Any:
        return getattr(self._peer, name)

    def put(self: NatsPeer, value: Any) -> None:
        setattr(self._peer, name, value)

    return property(get, put if settable else None, doc=doc)


class NatsPeer(Handlers):
    """A blocking peer whose connection runs over NATS (on a loop thread of its own).

    The API of :class:`tether.sync.Peer` where it means something over NATS:
    ``invoke``, ``stream``, ``send`` (and ``send_threadsafe``), ``handle``,
    ``on``, ``remove_handler``, ``open`` (fails at once with
    :class:`~tether.RouteClosed`: routes do not cross NATS), ``wait_hello``,
    ``wait_closed``, ``close``, and the attributes ``role``, ``name``,
    ``address``, ``local``, ``remote_hello``, ``timeout``, ``spin``, ...
    Handlers run on the connection's loop thread. Not here:
    ``on_connect`` (direct channels need descriptors, which never cross
    NATS) and ``max_queued`` (the blocking peer's worker queue; this one
    has none).
    """

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        thread: threading.Thread,
        peer: AsyncPeer,
        spin: float | None = None,
    ):
        self._loop = loop
        self._thread = thread
        self._peer = peer
        #: the connection's asyncio peer (runs on the loop thread)
        self.aio = peer
        #: handlers of this side: the asyncio peer's registry
        self.registry = peer.registry
        #: as given to ``connect``; no effect: the NATS client reads on its loop thread
        self.spin = spin

    role = _shared("role", "The other side's role (``main``: every listener of the namespace).")
    name = _shared("name", "The address connected to, as given.")
    address = _shared("address", "The other end: ``nats://host:port/namespace``.")
    local = _shared("local", "Whether handlers without ``roles=`` answer main (they do).", True)
    timeout = _shared("timeout", "Default seconds an invoke waits (``None``: forever).", True)
    tracebacks = _shared("tracebacks", "Send a handler's traceback with its ERROR.", True)
    max_inflight = _shared("max_inflight", "Main's invokes this side runs at once.", True)
    max_routes = _shared("max_routes", "Routes hosted at once (none cross NATS).")
    origin = _shared("origin", "A web page's origin; ``None`` here.")
    pid = _shared("pid", "The other process's pid: ``None`` over NATS.")
    uid = _shared("uid", "The other process's uid: ``None`` over NATS.")
    gid = _shared("gid", "The other process's gid: ``None`` over NATS.")

    @property
    def remote_hello(self) -> codec.Hello | None:
        """The other side's HELLO: over NATS the fixed profile's (docs/protocol.md 1.2)."""
        return self._peer.remote_hello

    def _run(self, coro: Any, bound: float | None, channel: str | None = None) -> Any:
        """Run ``coro`` on the loop; wait its bound plus a margin (past it the loop is stuck)."""
        fut = asyncio.run_coroutine_threadsafe(coro, self._loop)
        done, _ = concurrent.futures.wait([fut], None if bound is None else bound + _SLACK)
        if not done:
            fut.cancel()
            what = f"no answer within {bound} s"
            if channel is not None and bound is not None:
                what = timeout_message(channel, bound, False)
            raise InvokeTimeout(f"{self!r}: {what}")
        return fut.result()  # (its own errors, InvokeTimeout naming the channel among them)

    def invoke(
        self, channel: str, *args: Any, timeout: float | None = DEFAULT, result_type: Any = Any
    ) -> Any:
        """Call ``channel`` on main and return its result (see :meth:`tether.Peer.invoke`)."""
        bound = self._peer.timeout if timeout is DEFAULT else timeout
        coro = self._peer.invoke(channel, *args, timeout=timeout, result_type=result_type)
        return self._run(coro, bound if isinstance(bound, (int, float)) else None, channel)

    def stream(
        self,
        channel: str,
        *args: Any,
        item_type: Any = Any,
        window: int = DEFAULT_WINDOW,
        item_timeout: float | None = DEFAULT,
        timeout: float | None = None,
    ) -> NatsStreamIter:
        """Iterate what a stream handler on main yields (as :meth:`tether.sync.Peer.stream`).

        ``for x in peer.stream("tokens", "a b c"): ...``; closing the iterator
        early (``close()``, ``with``, or dropping it) stops the producer.
        """
        bound = self._peer.timeout if item_timeout is DEFAULT else item_timeout

        async def make() -> Any:  # made on the loop thread, like everything of the peer
            return self._peer.stream(
                channel,
                *args,
                item_type=item_type,
                window=window,
                item_timeout=item_timeout,
                timeout=timeout,
            )

        return NatsStreamIter(self, self._run(make(), 5.0), channel, bound, timeout)

    def open(self, kind: str, *args: Any, timeout: float | None = DEFAULT) -> Any:
        """Routes do not cross NATS: raises :class:`~tether.RouteClosed` at once, as
        :meth:`tether.Peer.open` does over NATS."""
        bound = self._peer.timeout if timeout is DEFAULT else timeout
        return self._run(self._peer.open(kind, *args, timeout=timeout), bound)

    def send(self, channel: str, *args: Any) -> None:
        """Send an event to main (every listener of the namespace)."""
        self._run(self._peer.send(channel, *args), self._peer.timeout)

    def send_threadsafe(self, channel: str, *args: Any) -> None:
        """:meth:`send`: every blocking call is thread-safe."""
        self.send(channel, *args)

    def wait_hello(self, timeout: float | None) -> None:
        """Return once main's HELLO is in (over NATS: it is at connect, the fixed profile)."""
        self._run(self._peer.wait_hello(timeout), timeout)

    def wait_closed(self, timeout: float | None = None) -> None:
        """Serve handlers until the connection closes (or ``timeout`` passes).

        Raises:
            TimeoutError: still open after ``timeout``.
        """
        if not self._thread.is_alive():
            return
        fut = asyncio.run_coroutine_threadsafe(self._peer.wait_closed(), self._loop)
        done, _ = concurrent.futures.wait([fut], timeout)
        if not done:
            fut.cancel()
            raise TimeoutError("connection still open")

    @property
    def closed(self) -> bool:
        return self._peer.closed

    def close(self, reason: str = "closed") -> None:
        """Say goodbye, close the NATS connection and stop the loop thread."""
        if self._thread.is_alive():
            with contextlib.suppress(PeerGone, InvokeTimeout, RuntimeError):
                self._run(self._peer.close(reason), 5.0)
            stream = getattr(self._peer, "_stream", None)
            finished = getattr(stream, "finished", None)
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


class NatsStreamIter(Iterator[Any]):
    """The items of a stream handler on main, as a blocking iterator (:meth:`NatsPeer.stream`).

    Wraps the asyncio peer's :class:`tether.aio.streaming.Stream`: each
    ``next()`` waits for one item on the loop thread; :meth:`close` (also
    ``with``) stops the producer. Errors as :class:`tether.sync.streaming.Stream`.
    """

    def __init__(
        self,
        owner: NatsPeer,
        it: Any,
        channel: str,
        item_timeout: float | None,
        timeout: float | None,
    ) -> None:
        self._owner = owner
        self._it = it
        self._channel = channel
        # the aio stream's own timeouts fire first; this bound is for a stuck loop
        bounds = [t for t in (item_timeout, timeout) if isinstance(t, (int, float))]
        self._bound = min(bounds) if bounds else None
        self._over = False

    def __iter__(self) -> NatsStreamIter:
        return self

    def __next__(self) -> Any:
        if self._over:
            raise StopIteration
        try:
            return self._owner._run(self._it.__anext__(), self._bound, self._channel)
        except StopAsyncIteration:
            self._over = True
            raise StopIteration from None
        except BaseException:
            self._over = True
            raise

    def close(self) -> None:
        """Stop the producer (CANCEL) if the stream is not over; idempotent."""
        self._over = True
        if self._owner._thread.is_alive():
            with contextlib.suppress(PeerGone, InvokeTimeout, RuntimeError):
                self._owner._run(self._it.aclose(), 5.0)

    def __enter__(self) -> NatsStreamIter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<sync NATS stream {self._channel!r} of {self._owner!r}>"


def connect_blocking(address: str, kw: dict[str, Any]) -> NatsPeer:
    """Connect on a new loop thread; raise what :func:`~tether.nats.link.connect_nats` raises."""
    kw = dict(kw)
    spin = kw.pop("spin", None)
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
    return NatsPeer(loop, thread, peer, spin)


def list_channels(peer: NatsPeer, timeout: float | None = 10.0) -> list[dict[str, Any]]:
    """Blocking :func:`tether.nats.listing.list_channels`: every listener's channels, once each."""
    result: list[dict[str, Any]] = peer._run(listing.list_channels(peer.aio, timeout), timeout)
    return result
