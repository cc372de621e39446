"""What :class:`~tether.Main` does for a whole program: serve until stopped,
broadcast to every peer, and report children that exit.

Kept apart from ``main.py`` (which owns connections and listeners); the
methods of :class:`~tether.Main` of the same names call these.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import signal
import threading
from collections.abc import Callable, Collection, Iterable
from typing import TYPE_CHECKING, Any, TypeVar

from ..errors import ConnectionClosed, PeerGone, ProtocolError
from ..handles import Handle
from ..introspect import install as install_introspection
from ..registry import checked_channel, checked_roles
from ..shm import Buffer

if TYPE_CHECKING:
    from .child import Child
    from .main import Main
    from .peer import Peer

__all__ = [
    "ChildExitCallback",
    "OnExit",
    "Signals",
    "broadcast",
    "child_exited",
    "install_introspection",
    "serve_forever",
]

log = logging.getLogger("tether")

#: ``fn(child, exitcode)``, a plain function or a coroutine function
ChildExitCallback = Callable[["Child", int], Any]

#: a callback as :meth:`~tether.Main.on_child_exit` takes and returns it (decorator use)
OnExit = TypeVar("OnExit", bound=ChildExitCallback)
#: the signals :meth:`~tether.Main.serve_forever` waits for
Signals = Iterable[int]

#: errors that concern one peer (it is gone, or was dropped): broadcast goes on
_PEER_ERRORS = (PeerGone, ConnectionClosed, ProtocolError)


async def serve_forever(main: Main, signals: Iterable[int]) -> int | None:
    """Wait for one of ``signals`` (or ``main.close()``), then close ``main``.

    Returns the signal number received, or ``None`` when main was closed by
    other means. The process's previous handlers for ``signals`` are restored
    before it returns.
    """
    if threading.current_thread() is not threading.main_thread():
        raise RuntimeError("serve_forever() catches signals: run it in the main thread")
    loop = asyncio.get_running_loop()
    stop: asyncio.Future[int | None] = loop.create_future()
    main._stopping.add(stop)
    sigs = [signal.Signals(s) for s in signals]
    previous = {s: signal.getsignal(s) for s in sigs}

    def caught(sig: signal.Signals) -> None:
        if not stop.done():
            stop.set_result(int(sig))

    try:
        for s in sigs:
            loop.add_signal_handler(s, caught, s)
        got = await stop
    finally:
        main._stopping.discard(stop)
        for s in sigs:
            loop.remove_signal_handler(s)
            prev = previous[s]
            if prev is not None:  # None: a handler not set from Python; leave the default
                signal.signal(s, prev)
    if got is not None:
        log.info("%s: got %s, closing", main.name, signal.Signals(got).name)
    await main.close()
    return got


def _reaches(peer: Peer, roles: frozenset[str] | None) -> bool:
    return (
        not peer.closed
        and peer.remote_hello is not None  # still in its handshake: not yet a peer
        and (roles is None or peer.role in roles)
        # a NATS listener's client: reached through the listener's fanout (below)
        and not getattr(peer._stream, "fanout", False)
    )


async def broadcast(
    main: Main, channel: str, args: tuple[Any, ...], role: Collection[str] | str | None
) -> int:
    """Send the event to every peer of ``main`` that ``role`` selects; how many it reached."""
    checked_channel(channel)
    roles = checked_roles(role)
    for a in args:
        if isinstance(a, Buffer):
            raise TypeError(
                "a tether.Buffer is moved by a send, so it cannot go to several peers: "
                "broadcast its bytes or an ndarray instead"
            )
        if isinstance(a, Handle):
            a.close()  # refused like a failed send: moved all the same
            raise TypeError(
                "a tether.Handle is moved by a send, so it cannot go to several peers: "
                "send each one its own (Handle.from_file or from_socket duplicate)"
            )
    peers: list[Any] = [p for p in list(main.peers) if _reaches(p, roles)]
    # NATS listeners send one message every client of the namespace gets (tether.nats):
    # one per namespace (two listeners on one would deliver it twice), counted as 1
    fans = {
        s.url: s
        for s in main.servers
        if getattr(s, "fanout", None) is not None and (roles is None or s.role in roles)
    }
    peers += fans.values()
    if not peers:
        return 0
    results = await asyncio.gather(
        *(
            p.fanout(channel, args) if hasattr(p, "fanout") else p.send(channel, *args)
            for p in peers
        ),
        return_exceptions=True,
    )
    reached = 0
    first: BaseException | None = None
    for peer, res in zip(peers, results, strict=True):
        if isinstance(res, int):
            reached += res
        elif res is None:
            reached += 1
        elif isinstance(res, _PEER_ERRORS):
            log.debug("broadcast %r: %r not reached: %s", channel, peer, res)
        elif first is None:
            first = res
    if first is not None:  # about the message itself (it does not encode, is too large)
        raise first
    return reached


def child_exited(main: Main, child: Child) -> None:
    """Run every ``on_child_exit`` callback for ``child`` (async ones as tasks)."""
    code = child.exitcode
    if code is None:  # (the exit future is only set with a code)
        return
    for fn in list(main._exit_callbacks):
        try:
            out = fn(child, code)
        except Exception:
            log.exception("on_child_exit callback %r failed for %r", fn, child)
            continue
        if inspect.isawaitable(out):
            task = asyncio.ensure_future(out)
            main._exit_tasks.add(task)
            task.add_done_callback(_finished(main, fn, child))


def _finished(main: Main, fn: object, child: Child) -> Callable[[asyncio.Future[Any]], None]:
    def done(task: asyncio.Future[Any]) -> None:
        main._exit_tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error(
                "on_child_exit callback %r failed for %r", fn, child, exc_info=task.exception()
            )

    return done
