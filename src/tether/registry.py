"""Handler tables: which function answers which channel, for which roles.

Shared by the asyncio and blocking layers. A :class:`Main` has one registry
for all its peers; a peer made by ``connect`` or ``spawn`` has its own.
"""

from __future__ import annotations

import inspect
import logging
import threading
import time
from collections.abc import Callable, Collection, Iterable
from typing import Any, ClassVar, TypeVar, overload

from .codec import ArgsSpec, ErrorInfo, type_hints
from .errors import BadRequest
from .wire import Frame

__all__ = [
    "RESERVED_CHANNELS",
    "Call",
    "Handler",
    "Handlers",
    "Registry",
    "checked_channel",
    "checked_roles",
]

log = logging.getLogger("tether")

F = TypeVar("F", bound=Callable[..., Any])

#: channels tether answers itself (``tether.channels``: see :mod:`tether.introspect`);
#: ``handle``/``on``/``remove_handler`` refuse them
RESERVED_CHANNELS = frozenset({"tether.channels", "tether.connect", "tether.trace"})


def _not_reserved(channel: str) -> str:
    if channel in RESERVED_CHANNELS:
        raise ValueError(f"channel {channel!r} is reserved by tether (docs/protocol.md)")
    return channel


class Call:
    """What a handler learns about the call it is answering.

    Attributes:
        peer: the peer that invoked or sent (a :class:`tether.Peer`, or a
            :class:`tether.sync.Peer` in blocking code); invoke it back, or keep it.
        channel: the channel name.
        request_id: the invoke's request id (0 for events).
        route_id: the route addressed (0 = the peer itself).

    A handler registered with ``thread=True`` runs on a worker thread (see
    :mod:`tether.threads`): it polls :attr:`cancelled` to stop when its caller
    gives up, and reports progress with :meth:`send`, whose events reach the
    caller before the result, in order.
    """

    __slots__ = ("_cancel", "_task", "channel", "peer", "request_id", "route_id")

    def __init__(self, peer: Any, channel: str, request_id: int, route_id: int) -> None:
        self.peer = peer
        self.channel = channel
        self.request_id = request_id
        self.route_id = route_id
        self._cancel: threading.Event | None = None
        self._task: Any = None  # the asyncio task serving this invoke, if any

    @property
    def cancelled(self) -> bool:
        """Whether the caller gave up on this invoke; safe to read from any thread.

        Set when the caller sends CANCEL (it cancelled the call, or its
        timeout expired) and when the connection is lost. A long loop in a
        ``thread=True`` handler checks it and returns early (the answer is
        dropped anyway). An ``async`` handler is also cancelled at its next
        ``await``; a plain handler on the event loop never sees it set, since
        nothing is read while it runs. Events (``on``) are never cancelled.
        """
        ev = self._cancel
        return ev is not None and ev.is_set()

    def send(self, channel: str, *args: Any) -> None:
        """Send an event to the caller from a handler running on a thread; blocks until queued.

        For ``thread=True`` handlers (and handlers of a blocking
        :class:`tether.sync.Peer`): the event is queued before this returns,
        so events sent this way reach the caller before the handler's result,
        in the order sent. It waits, as :meth:`tether.Peer.send` does, while
        the caller does not read (bounded by the peer's ``max_queued`` and
        ``drain_timeout``: past them the peer is dropped and this raises
        :class:`~tether.PeerGone`). On the event loop's own thread it raises
        ``RuntimeError``: there, ``await call.peer.send(...)``.
        """
        self.peer.send_threadsafe(channel, *args)

    def _arm_cancel(self) -> None:
        """Make the flag before another thread reads it (threaded handlers)."""
        if self._cancel is None:
            self._cancel = threading.Event()

    def _set_cancelled(self) -> None:
        self._arm_cancel()
        assert self._cancel is not None
        self._cancel.set()

    def _abandon(self) -> None:
        """The caller gave up, or the connection ended: set the flag, cancel the task."""
        self._set_cancelled()
        if self._task is not None:
            self._task.cancel()

    def __repr__(self) -> str:
        return f"<Call {self.channel!r} #{self.request_id} from {self.peer!r}>"


class Handler:
    """One registered function with its prebuilt argument decoder.

    ``run`` is what the asyncio layer awaits for an ``async`` or threaded
    handler (``is_async``); ``thread``: registered with ``thread=True``.
    """

    __slots__ = ("fn", "is_async", "roles", "run", "spec", "thread")

    def __init__(
        self,
        fn: Callable[..., Any],
        roles: Collection[str] | str | None,
        thread: bool = False,
        first: type | None = None,
    ) -> None:
        self.fn = fn
        coro = inspect.iscoroutinefunction(fn)
        if thread and (coro or inspect.isasyncgenfunction(fn)):
            raise TypeError(
                f"handler {_name(fn)}() is async: thread=True is for plain functions "
                "(an async handler already leaves the event loop free while it awaits)"
            )
        self.thread = bool(thread)
        self.is_async = coro or self.thread
        self.run: Callable[..., Any] = fn
        if self.thread:
            from .threads import run_in_thread

            self.run = lambda call, *args: run_in_thread(fn, call, args)
        _check_call_param(fn, first or Call)
        self.spec = ArgsSpec(fn)
        self.roles = checked_roles(roles)

    def allows(self, role: str, local: bool = True) -> bool:
        """Whether a peer with ``role`` may reach this handler.

        A handler registered without ``roles=`` is for local peers only
        (spawned children, same-user unix peers); a stranger (TCP, web)
        reaches only handlers that name its role.
        """
        return local if self.roles is None else role in self.roles


def _name(fn: Any) -> str:
    return str(getattr(fn, "__qualname__", None) or getattr(fn, "__name__", None) or repr(fn))


def _check_call_param(fn: Callable[..., Any], first_type: type = Call) -> None:
    """Refuse, at registration, a handler that cannot take the :class:`Call` first.

    (A host factory takes its route first: ``first_type`` is then the
    routes' base, :class:`Handlers`.)

    Handlers take ``call`` first, then the arguments. What an invoke will
    send cannot be known here, so the check is on that rule: ``fn`` needs a
    positional first parameter (or ``*args``), and if that parameter is
    annotated, with a type the Call can be.

    Raises:
        TypeError: naming the function, saying its first parameter receives the Call.
    """
    receives = "tether.Route" if first_type is not Call else "tether.Call"
    arg = "route" if first_type is not Call else "call"
    try:
        params = list(inspect.signature(fn).parameters.values())
    except (TypeError, ValueError):
        return  # no signature to check (some builtins): calls will tell
    first = params[0] if params else None
    positional = (first.POSITIONAL_ONLY, first.POSITIONAL_OR_KEYWORD) if first else ()
    if first is None or first.kind not in (*positional, first.VAR_POSITIONAL):
        raise TypeError(
            f"handler {_name(fn)}() takes no positional parameter for the call: its first "
            f"parameter receives the {receives}, then come the arguments "
            f"(def {getattr(fn, '__name__', 'handler')}({arg}, ...))"
        )
    if first.kind is first.VAR_POSITIONAL:
        return
    hint = type_hints(fn).get(first.name)
    if (
        isinstance(hint, type)
        and hint is not Any
        and not (issubclass(hint, first_type) or issubclass(first_type, hint))
    ):
        raise TypeError(
            f"handler {_name(fn)}(): its first parameter {first.name!r} is annotated "
            f"{hint.__name__}, but the first parameter receives the {receives} "
            f"(def {getattr(fn, '__name__', 'handler')}({arg}: {receives}, {first.name}: "
            f"{hint.__name__}, ...))"
        )


class Registry:
    """Channel name -> :class:`Handler`, for invokes and for events."""

    __slots__ = (
        "_unlogged",
        "_warn_at",
        "_warned",
        "events",
        "hosts",
        "invokes",
        "version",
        "watchers",
    )

    #: dropped-event warnings logged per second at most (a flood of bad events
    #: must not become a flood of log lines); the rest are counted
    WARNINGS_PER_SECOND: ClassVar[int] = 10

    def __init__(self) -> None:
        self.invokes: dict[str, Handler] = {}
        self.events: dict[str, list[Handler]] = {}
        #: route kind -> host factory (see :meth:`Handlers.host` and :mod:`tether.routes`)
        self.hosts: dict[str, Handler] = {}
        #: bumped whenever the event listeners change (peers cache what they resolved)
        self.version = 0
        #: called with the channel after an invoke handler is added or removed
        #: (a NATS listener follows its subjects); rarely more than one
        self.watchers: list[Callable[[str], None]] = []
        self._warn_at = 0.0
        self._warned = 0
        self._unlogged = 0

    def _dropped(self, channel: str, role: str, why: str) -> None:
        now = time.monotonic()
        if now - self._warn_at >= 1.0:
            if self._unlogged:
                log.warning("%d more dropped events were not logged", self._unlogged)
            self._warn_at, self._warned, self._unlogged = now, 0, 0
        if self._warned >= self.WARNINGS_PER_SECOND:
            self._unlogged += 1
            return
        self._warned += 1
        log.warning("dropped event on %r from role %r: %s", channel, role, why)

    def handle(
        self,
        channel: str,
        fn: Callable[..., Any],
        *,
        roles: Collection[str] | str | None = None,
        thread: bool = False,
    ) -> None:
        """Register ``fn`` to answer invokes on ``channel`` (``thread``: on a worker thread).

        One handler per channel, as in Electron: remove the first with
        :meth:`remove_handler` before registering another. ``roles`` limits
        which peers may call it (a str is one role); ``None``, the default,
        means local peers only (spawned children, same-user unix peers).

        Raises:
            ValueError: ``channel`` already has a handler, or is not a valid name.
            TypeError: ``channel`` is not a str, or ``roles`` is not a role or
                a collection of roles.
        """
        channel = _not_reserved(checked_channel(channel))
        if channel in self.invokes:
            raise ValueError(
                f"attempted to register a second handler for {channel!r} "
                f"(remove_handler({channel!r}) removes the first)"
            )
        self.invokes[channel] = Handler(fn, roles, thread)
        for watch in self.watchers:
            watch(channel)

    def on(
        self, channel: str, fn: Callable[..., Any], *, roles: Collection[str] | str | None = None
    ) -> None:
        """Register ``fn`` as a listener for events on ``channel``.

        Several listeners may share a channel; they run in registration order.

        Raises:
            ValueError: ``channel`` is not a valid name.
            TypeError: ``channel`` is not a str, or ``roles`` is not a role or
                a collection of roles.
        """
        channel = checked_channel(channel)
        h = Handler(fn, roles)  # before the table: a refused listener leaves no trace
        self.events.setdefault(channel, []).append(h)
        self.version += 1

    def remove_handler(self, channel: str) -> None:
        """Drop the invoke handler of ``channel``, if any (its event listeners stay).

        Invokes that arrive afterwards get :class:`~tether.NoHandler`; calls
        already running finish.
        """
        if self.invokes.pop(_not_reserved(channel), None) is not None:
            for watch in self.watchers:
                watch(channel)

    def resolve(
        self, f: Frame, role: str, local: bool = True
    ) -> tuple[Handler, tuple[Any, ...]] | ErrorInfo:
        """The handler of an INVOKE and its validated arguments, or the ERROR to answer.

        Both I/O layers dispatch through this, so a caller gets the same
        NoHandler / Forbidden / BadRequest whatever kind of peer it called.
        ``local`` is the peer's :attr:`~tether.Peer.local`: a handler without
        ``roles=`` answers a peer that is not local ``Forbidden``.
        """
        h = self.invokes.get(f.channel)
        if h is None:
            return ErrorInfo("no_handler", f"no handler for channel {f.channel!r}")
        if h.roles is None:
            if not local:
                return ErrorInfo(
                    "forbidden",
                    f"channel {f.channel!r} is exposed to local peers only "
                    f"(it names no roles; role {role!r} is not local)",
                )
        elif role not in h.roles:
            return ErrorInfo("forbidden", f"channel {f.channel!r} is not exposed to role {role!r}")
        try:
            return h, h.spec.decode(f.body, f.attachments, f.pickle)
        except BadRequest as exc:
            return ErrorInfo("bad_request", str(exc), path=exc.path)
        except Exception as exc:  # e.g. an ndarray reference where numpy is missing
            return ErrorInfo("bad_request", f"cannot decode arguments: {_describe(exc)}")

    def listeners(
        self, f: Frame, role: str, local: bool = True
    ) -> list[tuple[Handler, tuple[Any, ...]]]:
        """The listeners of an EVENT that ``role`` may reach, each with its decoded arguments.

        Listeners without ``roles=`` are skipped for a peer that is not
        ``local`` (its event is dropped for them, as for a wrong role).

        A listener whose arguments fail to decode is skipped with one warning
        (an event has no answer to carry the error), and so is an event that no
        listener is exposed to (a page's ``send`` to a channel without
        ``roles={"web"}``): both rate-limited, as :meth:`_dropped` says. Both I/O layers dispatch
        events through this, so they treat bad events alike.
        """
        handlers = self.events.get(f.channel)
        if not handlers:
            log.debug("no listener for event %r", f.channel)
            return []
        if len(handlers) == 1:  # the common case, kept short: it runs for every event
            h = handlers[0]
            roles = h.roles
            if (role not in roles) if roles is not None else not local:
                self._dropped(f.channel, role, _not_exposed(role, local, handlers))
                return []
            try:
                return [(h, h.spec.decode(f.body, f.attachments, f.pickle))]
            except Exception as exc:
                self._dropped(f.channel, role, _describe(exc))
                return []
        out: list[tuple[Handler, tuple[Any, ...]]] = []
        allowed = False
        for h in handlers:
            if not h.allows(role, local):
                continue
            allowed = True
            try:
                out.append((h, h.spec.decode(f.body, f.attachments, f.pickle)))
            except Exception as exc:
                self._dropped(f.channel, role, _describe(exc))
        if not allowed:
            self._dropped(f.channel, role, _not_exposed(role, local, handlers))
        return out

    def host(
        self, kind: str, factory: Callable[..., Any], *, roles: Collection[str] | str | None = None
    ) -> None:
        """Register ``factory`` to make the host object of each route of ``kind`` opened here.

        Raises:
            ValueError: ``kind`` already has a factory, or is not a valid name.
            TypeError: ``factory`` is a coroutine function (it must run inline,
                in order with the frames), or ``roles`` is malformed.
        """
        from .routes import host_spec_target

        kind = checked_channel(kind)
        if kind in self.hosts:
            raise ValueError(f"attempted to register a second host for route kind {kind!r}")
        if inspect.iscoroutinefunction(factory):
            raise TypeError(
                f"host factory for {kind!r} must be a class or a plain function, not async "
                "(its close() may be async)"
            )
        h = Handler(host_spec_target(factory), roles, first=Handlers)
        h.fn = factory
        self.hosts[kind] = h

    def resolve_host(
        self, f: Frame, role: str, local: bool = True
    ) -> tuple[Handler, tuple[Any, ...]] | ErrorInfo:
        """The host factory of a ROUTE_OPEN and its validated arguments, or the ERROR to answer.

        Same checks, in the same order and with the same roles rule, as :meth:`resolve`.
        """
        h = self.hosts.get(f.channel)
        if h is None:
            return ErrorInfo("no_handler", f"no host for route kind {f.channel!r}")
        if not h.allows(role, local):
            return ErrorInfo(
                "forbidden", f"route kind {f.channel!r} may not be opened by role {role!r}"
            )
        try:
            return h, h.spec.decode(f.body, f.attachments, f.pickle)
        except BadRequest as exc:
            return ErrorInfo("bad_request", str(exc), path=exc.path)
        except Exception as exc:
            return ErrorInfo("bad_request", f"cannot decode arguments: {_describe(exc)}")

    def remove(self, channel: str) -> None:
        """Drop the invoke handler and every event listener of ``channel``."""
        if self.invokes.pop(_not_reserved(channel), None) is not None:
            for watch in self.watchers:
                watch(channel)
        self.events.pop(channel, None)
        self.version += 1

    def plain_listener(
        self, channel: str, role: str, local: bool = True
    ) -> tuple[Callable[..., Any], Callable[[Any], tuple[Any, ...]]] | None:
        """The lone plain listener of ``channel`` and its decoder, if that is all an event needs.

        For the I/O layer's per-event fast path: exactly one listener, which
        ``role`` may reach, a plain (not ``async``) function whose arguments
        decode in one step. ``None``: use :meth:`listeners` (several, async,
        refused, none, or buffer and ``*args`` hints). Valid until
        :attr:`version` changes.
        """
        handlers = self.events.get(channel)
        if not handlers or len(handlers) != 1:
            return None
        h = handlers[0]
        if h.is_async or h.spec.slow or not h.allows(role, local):
            return None
        return h.fn, h.spec.decoder.decode


def _describe(exc: BaseException) -> str:
    try:
        return f"{type(exc).__name__}: {exc}"
    except Exception:
        return type(exc).__name__


def checked_channel(channel: object) -> str:
    """``channel`` if it is a valid channel name.

    Raises:
        TypeError: it is not a str.
        ValueError: it is empty or longer than 65535 bytes in UTF-8.
    """
    if not isinstance(channel, str):
        raise TypeError(f"channel must be a str, not {type(channel).__name__}: {channel!r}")
    if not channel or len(channel.encode()) > 0xFFFF:
        raise ValueError(f"invalid channel name {channel!r}")
    return channel


def _not_exposed(role: str, local: bool, handlers: list[Handler]) -> str:
    """Why an event reached no listener: none of them names the peer's role."""
    unroled = not local and any(h.roles is None for h in handlers)
    return f"no listener is exposed to role {role!r}" + (
        " (a listener without roles= hears local peers only)" if unroled else ""
    )


def checked_roles(roles: object) -> frozenset[str] | None:
    """The set of roles ``roles`` names: ``None`` (every role), one role as a str, or several.

    A bare str is one role: ``roles="admin"`` is ``{"admin"}``, never the
    letters of the word.

    Raises:
        TypeError: ``roles`` is neither ``None``, a str nor an iterable of str.
    """
    if roles is None:
        return None
    if isinstance(roles, str):
        return frozenset((roles,))
    if isinstance(roles, bytes | bytearray | memoryview) or not isinstance(roles, Iterable):
        raise TypeError(
            f"roles must be a str or a collection of str, not {type(roles).__name__}: {roles!r}"
        )
    out = frozenset(roles)
    for r in out:
        if not isinstance(r, str):
            raise TypeError(f"each role must be a str, not {type(r).__name__}: {r!r}")
    return out


class Handlers:
    """``handle``/``on``/``remove_handler`` for anything that owns a :class:`Registry`.

    Used by Main and both kinds of peer. Typed so ``@main.handle("ch")`` keeps
    the decorated function's type under ``mypy --strict``. The channel and
    ``roles`` are checked at the call, so a decorator with a bad argument
    fails where it is written.
    """

    registry: Registry
    #: a blocking peer: no event loop, so a host's close() must be plain
    _blocking: ClassVar[bool] = False

    def _registered(self) -> None:
        """Called after each registration (the blocking peer starts serving here)."""

    @overload
    def handle(
        self,
        channel: str,
        fn: None = None,
        *,
        roles: Collection[str] | str | None = None,
        thread: bool = False,
    ) -> Callable[[F], F]: ...
    @overload
    def handle(
        self,
        channel: str,
        fn: F,
        *,
        roles: Collection[str] | str | None = None,
        thread: bool = False,
    ) -> F: ...
    def handle(
        self,
        channel: str,
        fn: F | None = None,
        *,
        roles: Collection[str] | str | None = None,
        thread: bool = False,
    ) -> F | Callable[[F], F]:
        """Answer invokes of ``channel`` with ``fn(call, *args)``; a decorator too.

        ``fn`` may be sync or ``async``; it takes the :class:`Call` first, then
        the invoke's arguments, which are validated from its type hints before
        it runs. ``roles`` limits which peers may call it:
        a role (``"admin"``) or a collection of roles. ``None`` (the default)
        exposes it to *local* peers only: spawned children and unix peers of
        main's own user, whatever their role. Strangers -- TCP peers, unix
        peers of another allowed uid, and later web pages -- reach only
        handlers that name their role; others answer them ``Forbidden``.

        ``thread=True`` (plain functions only) runs ``fn`` on a worker thread
        of a process-wide pool of at most :data:`tether.threads.MAX_THREADS`
        threads, so a CPU-bound handler does not stall other calls. Invokes
        waiting for a thread count against the peer's ``max_inflight`` (past
        it: ``Busy``). It stops cooperatively on :attr:`Call.cancelled` and
        sends progress with :meth:`Call.send`.

        Raises:
            ValueError: ``channel`` already has a handler (see
                :meth:`remove_handler`), or is empty or too long.
            TypeError: ``channel`` is not a str, ``roles`` is not a str
                or a collection of str, ``fn`` takes no ``call`` parameter
                first, or ``thread=True`` with an ``async`` function.
        """
        _not_reserved(checked_channel(channel))
        checked_roles(roles)

        def register(f: F) -> F:
            self.registry.handle(channel, f, roles=roles, thread=thread)
            self._registered()
            return f

        return register(fn) if fn is not None else register

    @overload
    def on(
        self, channel: str, fn: None = None, *, roles: Collection[str] | str | None = None
    ) -> Callable[[F], F]: ...
    @overload
    def on(self, channel: str, fn: F, *, roles: Collection[str] | str | None = None) -> F: ...
    def on(
        self, channel: str, fn: F | None = None, *, roles: Collection[str] | str | None = None
    ) -> F | Callable[[F], F]:
        """Call ``fn(call, *args)`` for each event on ``channel``; a decorator too.

        ``roles`` as for :meth:`handle`; ``fn`` takes the :class:`Call` first, too.

        Raises:
            ValueError: ``channel`` is empty or too long.
            TypeError: ``channel`` is not a str, ``roles`` is not a str
                or a collection of str, or ``fn`` takes no ``call`` parameter first.
        """
        _not_reserved(checked_channel(channel))
        checked_roles(roles)

        def register(f: F) -> F:
            self.registry.on(channel, f, roles=roles)
            self._registered()
            return f

        return register(fn) if fn is not None else register

    @overload
    def host(
        self, kind: str, factory: None = None, *, roles: Collection[str] | str | None = None
    ) -> Callable[[F], F]: ...
    @overload
    def host(self, kind: str, factory: F, *, roles: Collection[str] | str | None = None) -> F: ...
    def host(
        self, kind: str, factory: F | None = None, *, roles: Collection[str] | str | None = None
    ) -> F | Callable[[F], F]:
        """Host routes of ``kind``: ``factory(route, *args)`` makes each host; a decorator too.

        The other side opens one with ``await peer.open(kind, *args)``. The
        factory (a class works) is called inline with the route and the
        arguments, validated from its type hints after the route parameter;
        it registers the route's handlers (``route.handle``/``route.on``).
        When the route ends -- either side closes it, a send on it fails,
        the connection is lost -- the object's ``close()`` (plain or
        ``async``), if it has one, runs exactly once. ``roles`` as for
        :meth:`handle` (``None``: local peers only).

        Raises:
            ValueError: ``kind`` already has a host, or is empty or too long.
            TypeError: ``kind`` is not a str, ``factory`` is async, or
                ``roles`` is not a str or a collection of str.
        """
        checked_channel(kind)
        checked_roles(roles)

        def register(f: F) -> F:
            if self._blocking and inspect.iscoroutinefunction(getattr(f, "close", None)):
                raise TypeError(
                    f"host {getattr(f, '__qualname__', f)!r} for {kind!r} has an async close(): "
                    "a blocking peer runs no event loop to await it; make close() a plain method"
                )
            self.registry.host(kind, f, roles=roles)
            self._registered()
            return f

        return register(factory) if factory is not None else register

    def remove_handler(self, channel: str) -> None:
        """Stop answering invokes of ``channel`` (a no-op if nothing handles it).

        A later :meth:`handle` may then register a new handler. Event
        listeners registered with :meth:`on` are not affected.

        Raises:
            TypeError: ``channel`` is not a str.
        """
        self.registry.remove_handler(checked_channel(channel))
