"""Child processes: how a spawned child starts, and how its end is described.

``Main.spawn`` (in :mod:`tether.aio.main`) starts :func:`child_entry` in a new
process through :mod:`multiprocessing` (start methods ``spawn``, ``forkserver``
and ``fork``), handing it one end of a ``socketpair``. The child runs the
user's target with a connected peer: an asyncio :class:`~tether.Peer` for an
``async def`` target, a blocking :class:`tether.sync.Peer` for a plain one.

A sandboxed child (``spawn(..., sandbox=...)``) applies its
:class:`~tether.Sandbox` before anything else runs in it, reports the result
to main (:mod:`tether.sandbox`), and only then unpickles the target and its
arguments (:class:`Deferred`): the target's module is imported inside the
sandbox.

No orphans: the child asks the kernel to kill it when its parent dies
(``PR_SET_PDEATHSIG``) and also exits as soon as its connection to main ends.

A failing child tells main why (:mod:`tether.child_errors`): a spawned child
imports its target by name (after ``env=``/``cwd=`` apply), so an import error
is reported like a target's exception. Ctrl-C in a terminal sends SIGINT to
every process of the group: a child then leaves quietly, ending by SIGINT
(main's errors say "killed by SIGINT"), so that only main reports it; a
``KeyboardInterrupt`` raised by code is a failure like any other.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import errno
import inspect
import multiprocessing
import os
import pickle
import signal
import socket
import sys
import time
import traceback
from collections.abc import Callable, Iterable, Mapping
from multiprocessing.reduction import ForkingPickler
from typing import Any

from . import tracing
from .capture import redirect
from .child_errors import TargetRef, write_report

__all__ = [
    "FINISHED",
    "Deferred",
    "check_spawn_options",
    "check_target",
    "child_entry",
    "describe_exit",
    "failure_reason",
    "set_parent_death_signal",
]


_REASON_MAX = 1000  # characters of a failed target's error sent to main
#: The GOODBYE reason of a child whose target returned.
FINISHED = "child finished"


def check_target(target: Callable[..., Any], args: tuple[Any, ...], method: str = "spawn") -> None:
    """Refuse, in main, a target the child could not even call with ``(peer, *args)``.

    Raises:
        TypeError: not callable, not importable by the child (a lambda or a
            nested function, unless the child is forked), or the arguments do
            not fit its signature.
    """
    if not callable(target):
        raise TypeError(f"spawn() needs a callable target, not {type(target).__name__}")
    qualname = getattr(target, "__qualname__", "")
    if method != "fork" and ("<lambda>" in qualname or "<locals>" in qualname):
        raise TypeError(
            f"spawn() needs a module-level function (the child imports it by name), "
            f"not {qualname}; or use start_method='fork'"
        )
    main_file = getattr(sys.modules.get("__main__"), "__file__", None)
    if method != "fork" and getattr(target, "__module__", None) == "__main__" and not main_file:
        raise TypeError(
            f"spawn() needs a target the child can import: {qualname or target!r} is defined in "
            "an interactive session or 'python -c' (no main file to import again); put it in a "
            "module, or use start_method='fork'"
        )
    try:
        sig = inspect.signature(target)
    except (TypeError, ValueError):  # no signature to check (some builtins)
        return
    try:
        sig.bind(None, *args)
    except TypeError as exc:
        name = getattr(target, "__qualname__", repr(target))
        raise TypeError(
            f"spawn({name}, ...) with {len(args)} argument(s) after the peer: {exc}"
        ) from None


def check_spawn_options(
    env: object, cwd: object
) -> tuple[dict[str, str | None] | None, str | None]:
    """Check ``spawn(env=, cwd=)`` in main; return them as the child applies them.

    Raises:
        TypeError: ``env`` is not a mapping of str to str (or None), ``cwd`` not a path.
        FileNotFoundError, NotADirectoryError: ``cwd`` is not a directory.
    """
    checked_env: dict[str, str | None] | None = None
    if env is not None:
        if not isinstance(env, Mapping):
            raise TypeError(f"env must be a mapping of str to str, not {type(env).__name__}")
        checked_env = {}
        for key, value in env.items():
            if not isinstance(key, str) or not (value is None or isinstance(value, str)):
                raise TypeError(
                    f"env must map str to str (or None to remove a variable), not "
                    f"{type(key).__name__} to {type(value).__name__}: {key!r}"
                )
            if not key or "=" in key or "\0" in key or (value is not None and "\0" in value):
                raise ValueError(f"env has a name or value the OS cannot hold: {key!r}")
            checked_env[key] = value
    checked_cwd: str | None = None
    if cwd is not None:
        if not isinstance(cwd, str | os.PathLike):
            raise TypeError(f"cwd must be a path (str or os.PathLike), not {type(cwd).__name__}")
        checked_cwd = os.path.abspath(os.fspath(cwd))
        if not os.path.exists(checked_cwd):
            raise FileNotFoundError(errno.ENOENT, "cwd does not exist", checked_cwd)
        if not os.path.isdir(checked_cwd):
            raise NotADirectoryError(errno.ENOTDIR, "cwd is not a directory", checked_cwd)
    return checked_env, checked_cwd


def apply_env_cwd(options: dict[str, Any]) -> None:
    """In the child, before its target is imported: the environment and directory main asked for."""
    env: dict[str, str | None] | None = options.get("env")
    if env:
        for key, value in env.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
    cwd: str | None = options.get("cwd")
    if cwd is not None:
        # '' on sys.path meant the directory the child started in: keep meaning it
        here = os.getcwd()
        sys.path[:] = [here if p == "" else p for p in sys.path]
        os.chdir(cwd)


def describe_exit(pid: int, exitcode: int | None) -> str:
    """Say how a process ended, in words: exit code or signal name."""
    if exitcode is None:
        return f"child pid {pid} closed its connection (still running)"
    if exitcode < 0:
        try:
            name = signal.Signals(-exitcode).name
        except ValueError:
            name = f"signal {-exitcode}"
        return f"child pid {pid} was killed by {name}"
    return f"child pid {pid} exited with code {exitcode}"


def set_parent_death_signal(parent_pid: int) -> None:
    """Have the kernel SIGKILL this process when its parent dies (Linux)."""
    if sys.platform.startswith("linux"):
        try:
            libc = ctypes.CDLL(None, use_errno=True)
            libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
        except (OSError, AttributeError):
            pass
    if os.getppid() != parent_pid:  # parent already gone before prctl
        os._exit(1)


def close_inherited(fds: Iterable[int]) -> None:
    """Close descriptors a forked child inherited from main (already closed ones are skipped)."""
    for fd in fds:
        with contextlib.suppress(OSError):
            os.close(fd)


def reset_signals() -> None:
    """Give a forked child the signal handling a spawned one starts with.

    Handlers main installed belong to main: asyncio's ``add_signal_handler``
    leaves a no-op Python handler (a forked child would then ignore
    :meth:`Child.terminate`) and a wake-up descriptor that is main's loop.
    """
    signal.set_wakeup_fd(-1)
    for sig in signal.valid_signals():
        try:
            handler = signal.getsignal(sig)
        except (OSError, ValueError):
            continue
        if callable(handler) and handler is not signal.default_int_handler:
            default = signal.default_int_handler if sig == signal.SIGINT else signal.SIG_DFL
            with contextlib.suppress(OSError, ValueError):
                signal.signal(sig, default)


def allow_children() -> None:
    """Let this child start children of its own.

    Main starts children as daemons (multiprocessing then ends them if main
    exits without closing them), and multiprocessing refuses to let a daemon
    start processes. Inside the child its own process object has not been
    started from here, so the public ``daemon`` setter may clear the flag.
    """
    multiprocessing.current_process().daemon = False


class Deferred:
    """A target and its arguments, pickled inside the child's start-up data but unpickled on demand.

    ``spawn`` and ``forkserver`` children unpickle their process object
    before :func:`child_entry` runs, and that imports the target's module. A
    sandboxed child gets this instead: the bytes are made while main pickles
    the process object (so descriptors in the arguments still travel), and
    :meth:`load` unpickles them after the sandbox is in force.
    """

    def __init__(self, target: Any, args: tuple[Any, ...]) -> None:
        # target: a callable, or a TargetRef the child imports itself
        self._call: tuple[Any, tuple[Any, ...]] | None = (target, args)
        self._data = b""

    def __reduce__(self) -> tuple[object, ...]:
        return (_deferred, (bytes(ForkingPickler.dumps(self._call)),))

    def load(self) -> tuple[Any, tuple[Any, ...]]:
        """The target and its arguments (imports the target's module the first time)."""
        if self._call is None:
            self._call = pickle.loads(self._data)
        return self._call


def _deferred(data: bytes) -> Deferred:
    """Unpickle a :class:`Deferred` without unpickling what it holds."""
    obj = Deferred.__new__(Deferred)
    obj._call, obj._data = None, data
    return obj


def _enter_sandbox(sock: socket.socket, box: Any) -> Any:
    """Apply ``box`` and report to main; exit at once when the OS refused it."""
    from .errors import SandboxError
    from .sandbox import apply, write_report

    try:
        report = apply(box)
    except SandboxError as exc:
        with contextlib.suppress(OSError):
            write_report(sock, None, exc)
        os._exit(1)
    write_report(sock, report)
    return report


def child_entry(
    sock: socket.socket,
    target: Callable[..., Any],
    args: tuple[Any, ...],
    options: dict[str, Any],
) -> None:
    """Run ``target(peer, *args)`` in this (new) process; exit when it returns.

    Exit code 0 when the target returned, 1 when it raised (the traceback goes
    to stderr), and 0 when main closed the connection first.
    """
    # Forked: drop main's listeners and connections first, so that a closed
    # listener refuses connections and a dropped peer sees EOF at once.
    if options.get("start_method") == "fork":
        close_inherited(options.get("close_fds", ()))
        reset_signals()
    if options.get("sandbox") is not None:  # first: before the target's module is imported
        _enter_sandbox(sock, options["sandbox"])
    if isinstance(target, Deferred):
        target, args = target.load()
    parent_pid = options.get("parent_pid", os.getppid())
    if options.get("start_method") != "forkserver":
        set_parent_death_signal(parent_pid)
    allow_children()
    # No running-loop marker to reset in a forked child: Python 3.11 ignores a
    # marker set in another pid, and 3.12+ clears it at fork.
    code = 0
    report = options.get("report")
    watch_sigint()
    try:
        apply_env_cwd(options)
        if options.get("capture"):
            redirect(*options["capture"])
        if isinstance(target, TargetRef):  # imported here: an import error is reported
            target = target.resolve()
        if tracing.hook is not None:  # the track label: which child this is
            what = options.get("name") or getattr(target, "__qualname__", "")
            tracing.hook.name = f"child {what} {os.getpid()}".replace("  ", " ")
            tracing.write_on_sigterm()
        if inspect.iscoroutinefunction(target):
            from .aio.loop import run

            code = run(_run_async(sock, target, args, options))
        else:
            code = _run_sync(sock, target, args, options)
    except SystemExit as exc:  # sys.exit(n) in the target exits with n, as multiprocessing does
        if exc.code is None or isinstance(exc.code, int):
            code = exc.code or 0
        else:
            print(exc.code, file=sys.stderr)
            code = 1
    except KeyboardInterrupt as exc:
        if _sigint_seen:
            # Ctrl-C in a terminal reaches every process of its group: main reports
            # it once; the child leaves quietly, as killed by SIGINT (main says so).
            code = -signal.SIGINT
        else:  # raised by code, not by the signal: a failure like any other
            traceback.print_exc()
            write_report(report, exc)
            code = 1
    except BaseException as exc:  # report, then exit non-zero
        traceback.print_exc()
        write_report(report, exc)
        code = 1
    finally:
        with contextlib.suppress(Exception):
            sys.stdout.flush()
            sys.stderr.flush()
    if tracing.hook is not None:  # os._exit skips atexit: write this child's trace file now
        with contextlib.suppress(Exception):
            tracing.stop()
    if code == -signal.SIGINT:
        quiet_sigint_exit()
    os._exit(code)


_sigint_seen = False


def _on_sigint(signum: int, frame: object) -> None:
    global _sigint_seen
    _sigint_seen = True
    raise KeyboardInterrupt


def watch_sigint() -> None:
    """Tell a KeyboardInterrupt from SIGINT (Ctrl-C: leave quietly) from one raised by code.

    Only where SIGINT has Python's default handler: an ignored SIGINT stays ignored.
    """
    with contextlib.suppress(ValueError, OSError):
        if signal.getsignal(signal.SIGINT) is signal.default_int_handler:
            signal.signal(signal.SIGINT, _on_sigint)


def quiet_sigint_exit() -> None:
    """End this process by SIGINT's default action: no traceback, and its parent sees SIGINT."""
    with contextlib.suppress(OSError, ValueError):
        signal.signal(signal.SIGINT, signal.SIG_DFL)
        signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(1.0)  # bounded: the signal ends us well before this
    os._exit(128 + signal.SIGINT)


def _peer_options(options: dict[str, Any]) -> dict[str, Any]:
    """The child's side of the connection, for either kind of peer."""
    return {
        "role": "main",
        "local_role": "child",
        "timeout": options.get("timeout", 30.0),
        "max_frame_size": options["max_frame_size"],
        "name": options.get("name", ""),
        "address": f"main:{options.get('parent_pid', os.getppid())}",
        "pickle": bool(options.get("pickle", False)),
    }


async def _run_async(
    sock: socket.socket, target: Callable[..., Any], args: tuple[Any, ...], options: dict[str, Any]
) -> int:
    from .aio.peer import Peer
    from .errors import PeerGone

    peer = Peer(sock, **_peer_options(options), spin=options.get("spin"))
    if "max_routes" in options:  # main's cap: the child opens (and hosts) as many
        peer.max_routes = options["max_routes"]
    task = asyncio.ensure_future(target(peer, *args))
    await asyncio.sleep(0)  # the target runs to its first await: handlers are in place
    if task.done() and not task.cancelled() and task.exception() is not None:
        # Failed before the channel is up: no HELLO, so main's spawn() raises with the cause.
        peer.abort(PeerGone("the target failed before the connection started"))
        task.result()  # raises: child_entry prints and reports it
    peer.start()
    closed = asyncio.ensure_future(peer.wait_closed())
    await asyncio.wait({task, closed}, return_when=asyncio.FIRST_COMPLETED)
    if not task.done():  # main went away first
        task.cancel()
        await asyncio.wait({task}, timeout=1.0)
        return 0
    closed.cancel()
    exc = None if task.cancelled() else task.exception()
    await peer.close(FINISHED if exc is None else failure_reason(exc))
    if task.cancelled():
        task.result()  # the target raised CancelledError itself: reported as a failure
    if exc is not None:
        traceback.print_exception(exc)
        write_report(options.get("report"), exc)
        return 1
    return 0


def _run_sync(
    sock: socket.socket, target: Callable[..., Any], args: tuple[Any, ...], options: dict[str, Any]
) -> int:
    from .sync.peer import Peer

    # lazy: read nothing until the target's first blocking call, so its handlers are in place
    with Peer(sock, **_peer_options(options), lazy=True, spin=options.get("spin")) as peer:
        if "max_routes" in options:  # main's cap: the child opens (and hosts) as many
            peer.max_routes = options["max_routes"]
        try:
            target(peer, *args)
        except Exception as exc:
            peer.close(failure_reason(exc))
            raise
        peer.close(FINISHED)
    return 0


def failure_reason(exc: BaseException) -> str:
    """The GOODBYE reason of a child whose target raised: main puts it in its errors."""
    try:
        text = f"{type(exc).__name__}: {exc}"
    except Exception:  # a __str__ that raises still names the type
        text = type(exc).__name__
    return "child failed: " + text[:_REASON_MAX]
