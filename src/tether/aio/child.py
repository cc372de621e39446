"""A spawned child process, as main sees it: a :class:`Peer` with a pid.

How main learns that a child ended, without ever blocking its loop:

* The exit is *watched* through a pidfd (Linux 5.3+), which becomes readable
  when the process ends and which the child cannot close or fake. Where there
  is no pidfd, multiprocessing's sentinel is watched instead; a child may close
  its end of that pipe early (fd-hygienic sandboxes do), so a wake-up that
  finds the process still running turns into polling with back-off.
* Every check is non-blocking (``waitpid(WNOHANG)`` through
  :attr:`multiprocessing.Process.exitcode`), and one method,
  :meth:`Child._exit_seen`, records the exit: it stores the code, releases the
  watch, resolves every :meth:`Child.wait` and ends the connection.
* When the connection ends first (EOF or the child's GOODBYE), the child is
  closed at once (:attr:`closed`, and calls raise :class:`PeerGone`), while
  main waits a short grace for the exit so pending calls learn how it ended.
"""

from __future__ import annotations

import asyncio
import contextlib
import multiprocessing.process
import os
import signal
import socket
from collections.abc import Callable, Coroutine
from typing import Any, Final, NoReturn, TypeVar, overload

from ..capture import Output
from ..child_errors import read_report
from ..errors import PeerGone, RemoteError, TetherError
from ..process import FINISHED, describe_exit
from ..results import DEFAULT
from ..sandbox import SandboxReport
from ..shm import consume_all
from .peer import Peer

__all__ = ["Child"]

_peer_invoke = Peer.invoke
_peer_send = Peer.send

# After the exit is seen, how long to let the socket deliver what the child wrote.
_EXIT_GRACE: Final = 0.05
# After the connection drops (EOF), how long to wait for the exit status (the
# exit ends the wait at once: a killed child's error names its signal even when
# a loaded machine reaps it a little after its socket closed).
_EOF_GRACE: Final = 0.5
# After a GOODBYE the child is on its way out; its exit usually follows within
# this bound, so errors can say how it ended.
_GOODBYE_GRACE: Final = 1.0
# Polling back-off when the exit cannot be watched (no pidfd, sentinel closed early).
_POLL_FIRST: Final = 0.001
_POLL_MAX: Final = 0.1


T = TypeVar("T")


class Child(Peer):
    """A child process started by :meth:`Main.spawn`, connected by a socketpair.

    When the child dies, every invoke pending on it fails at once with
    :class:`PeerGone` saying how it ended (exit code or signal).
    """

    def __init__(
        self,
        sock: socket.socket,
        process: multiprocessing.process.BaseProcess,
        *,
        report: socket.socket | None = None,
        **kw: Any,
    ) -> None:
        super().__init__(sock, **kw)
        self._process = process
        # main's end of the side channel where the child reports why it failed
        self._report = report
        self._failure: RemoteError | None = None
        #: with ``spawn(capture=True)``: what the child writes to its stdout (else None)
        self.stdout: Output | None = None
        #: with ``spawn(capture=True)``: what the child writes to its stderr (else None)
        self.stderr: Output | None = None
        pid = process.pid
        assert pid is not None
        self._pid = pid
        # A socketpair has no address, and its SO_PEERCRED names its creator
        # (main): ``pid`` is the process's own, uid/gid are those it started with.
        self.address = f"child:{pid}"
        self._code: int | None = None
        self._exited: asyncio.Future[int] = self._loop.create_future()
        self._watch_fd = -1  # pidfd or sentinel while registered with the loop
        self._pidfd = -1  # owned: closed when the exit is recorded
        self._poll_timer: asyncio.TimerHandle | None = None
        self._poll_delay = _POLL_FIRST
        # Set when the child's side of the connection ended (EOF, GOODBYE) before
        # its exit was seen: the child counts as closed from then on.
        self._ending: PeerGone | None = None
        self._drained = False  # nothing more to read from the child (EOF, GOODBYE)
        self._end_timer: asyncio.TimerHandle | None = None
        #: What a sandboxed child applied (``spawn(..., sandbox=...)``); ``None``: no sandbox.
        self.sandbox: SandboxReport | None = None

    @property
    def pid(self) -> int:
        """The child's process id."""
        return self._pid

    @property
    def exitcode(self) -> int | None:
        """Exit code; ``-N`` if killed by signal N; ``None`` while running."""
        return self._poll()

    def failure(self) -> RemoteError | None:
        """What the child's target (or its import) raised, as it reported it; None if nothing.

        Read once, without blocking, when the child has failed; the same
        error is the ``__cause__`` of the :class:`PeerGone` its calls raise.
        """
        if self._report is not None and self._code is not None:  # it has exited: all is written
            if self._code:
                self._failure = read_report(self._report)
            self._report.close()
            self._report = None
        return self._failure

    @property
    def closed(self) -> bool:
        """Whether the connection is closed: by main, or by the child (EOF or GOODBYE)."""
        return self._closed is not None or self._ending is not None

    def descriptors(self) -> list[int]:
        """Descriptors main holds for this child: what a forked sibling must close."""
        fds = [self.fileno()]
        if self._report is not None:
            fds.append(self._report.fileno())
        for out in (self.stdout, self.stderr):
            if out is not None and out._sock is not None:
                fds.append(out._sock.fileno())
        if self._pidfd >= 0:
            fds.append(self._pidfd)
        return [fd for fd in fds if fd >= 0]

    # -- watching the exit -------------------------------------------------

    def start(self) -> None:
        super().start()
        if self._code is not None or self._watch_fd >= 0 or self._poll_timer is not None:
            return
        try:
            self._pidfd = os.pidfd_open(self._pid)
        except ProcessLookupError:  # already gone (and reaped by a fork server)
            if self._poll() is None:
                self._poll_later()
            return
        except (AttributeError, OSError):  # no pidfd here: watch the sentinel
            self._watch(self._process.sentinel)
            return
        self._watch(self._pidfd)

    def _watch(self, fd: int) -> None:
        self._watch_fd = fd
        self._loop.add_reader(fd, self._on_exit_hint)

    def _unwatch(self) -> None:
        if self._watch_fd >= 0:
            self._loop.remove_reader(self._watch_fd)
            self._watch_fd = -1
        if self._pidfd >= 0:
            os.close(self._pidfd)
            self._pidfd = -1
        if self._poll_timer is not None:
            self._poll_timer.cancel()
            self._poll_timer = None

    def _on_exit_hint(self) -> None:
        """The watched descriptor is readable: the child probably exited."""
        if self._poll() is None:
            # Not yet: a sentinel the child closed early, or a fork server that
            # has not reported the status yet. Poll instead of spinning on it.
            self._unwatch()
            self._poll_later()

    def _poll_later(self) -> None:
        self._poll_timer = self._loop.call_later(self._poll_delay, self._on_poll_timer)
        self._poll_delay = min(self._poll_delay * 2, _POLL_MAX)

    def _on_poll_timer(self) -> None:
        self._poll_timer = None
        if self._poll() is None:
            self._poll_later()

    def _poll(self) -> int | None:
        """The exit code if the process has ended (never blocks); records it once."""
        if self._code is None:
            code = self._process.exitcode  # waitpid(WNOHANG), or the fork server's report
            if code is not None:
                self._exit_seen(code)
        return self._code

    def _exit_seen(self, code: int) -> None:
        """The one place an exit is recorded: every waiter and the connection learn it."""
        self._code = code
        self._unwatch()
        for out in (self.stdout, self.stderr):
            if out is not None:
                out.drain()  # everything it wrote is in: read it, end the stream
        if not code:  # nothing to report: release the side channel now
            self.failure()
        self._process.close()  # frees the sentinel pipe now, not at the next start()
        if not self._exited.done():
            self._exited.set_result(code)
        if self._closed is not None:
            return
        if self._drained:
            self._finish()
        else:
            # Let the socket deliver what the child wrote before it died (its EOF
            # normally follows at once), then end regardless.
            self._end_in(_EXIT_GRACE)

    # -- ending the connection ---------------------------------------------

    def _lost(self, exc: TetherError) -> None:
        if not isinstance(exc, PeerGone):
            self.kill()  # bad-message rule: a child that broke the protocol dies
            self._shutdown(exc)
            return
        if self._closed is not None or self._drained:
            return
        if isinstance(exc.__cause__, BrokenPipeError):
            # Only our write failed: the child closed its end, and what it wrote
            # before (a GOODBYE with its error, answers) is still to be read; EOF follows.
            self._ending = self._ending or exc
            return
        self._ending = exc  # its GOODBYE (with a reason) or EOF
        self._drained = True
        self._stream.stop_reading()
        if self._poll() is not None:  # the exit is known: end with it now
            self._finish()
            return
        # Wait (bounded) for the exit status, so the error can say how it ended.
        self._end_in(_EOF_GRACE if self._conn.goodbye_reason is None else _GOODBYE_GRACE)

    def _end_in(self, delay: float) -> None:
        if self._end_timer is not None:
            self._end_timer.cancel()
        self._end_timer = self._loop.call_later(delay, self._finish)

    def _finish(self) -> None:
        """End the connection with the best description of the child's end."""
        self._end_timer = None
        if self._closed is not None:
            return
        code = self._poll()
        if code is not None:
            how = describe_exit(self._pid, code)
            said = self._conn.goodbye_reason
            if said and said != FINISHED:  # e.g. the error its target raised
                how += f" ({said})"
            exc: TetherError = PeerGone(how, exitcode=code)
            cause = self.failure() if code else None
            if cause is not None:  # what its target raised, with the traceback
                exc.__cause__ = cause
        else:
            exc = self._ending or PeerGone(describe_exit(self._pid, None))
        self._shutdown(exc)

    @staticmethod
    async def _refuse(exc: PeerGone, args: tuple[Any, ...]) -> NoReturn:
        consume_all(args)  # a refused send moves its Buffers, as Peer's does
        raise exc

    @overload
    def invoke(
        self, channel: str, *args: Any, timeout: float | None = ..., result_type: type[T]
    ) -> Coroutine[Any, Any, T]: ...
    @overload
    def invoke(
        self, channel: str, *args: Any, timeout: float | None = ..., result_type: Any = ...
    ) -> Coroutine[Any, Any, Any]: ...
    def invoke(
        self,
        channel: str,
        *args: Any,
        timeout: float | None = DEFAULT,
        result_type: Any = Any,
    ) -> Coroutine[Any, Any, Any]:
        """As :meth:`Peer.invoke`; once the child has left, raises :class:`PeerGone`."""
        if self._ending is not None and self._closed is None:
            return self._refuse(self._ending, args)
        if timeout is DEFAULT and result_type is Any:  # the common call: no keywords to pass on
            return _peer_invoke(self, channel, *args)
        return _peer_invoke(self, channel, *args, timeout=timeout, result_type=result_type)

    def send(self, channel: str, *args: Any) -> Coroutine[Any, Any, None]:
        """As :meth:`Peer.send`; once the child has left, raises :class:`PeerGone`."""
        if self._ending is not None and self._closed is None:
            return self._refuse(self._ending, args)
        return _peer_send(self, channel, *args)

    # -- public control ----------------------------------------------------

    def on_exit(self, fn: Callable[[Child], object]) -> None:
        """Call ``fn(child)`` once the process has exited (at once if it already has)."""
        self._exited.add_done_callback(lambda _: fn(self))

    async def wait(self, timeout: float | None = None) -> int:
        """Wait for the process to exit and return its exit code.

        Raises:
            TimeoutError: still running after ``timeout`` seconds.
        """
        if self._poll() is not None:
            return self._exited.result()
        try:
            return await asyncio.wait_for(asyncio.shield(self._exited), timeout)
        except TimeoutError:
            raise TimeoutError(f"{self!r} still running after {timeout} s") from None

    def kill(self) -> None:
        """SIGKILL the child (no-op if it already exited)."""
        self._signal(signal.SIGKILL)

    def terminate(self) -> None:
        """SIGTERM the child (no-op if it already exited)."""
        self._signal(signal.SIGTERM)

    def _signal(self, sig: signal.Signals) -> None:
        if self._poll() is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            if self._pidfd >= 0:  # never a recycled pid
                signal.pidfd_send_signal(self._pidfd, sig)
            else:
                os.kill(self._pid, sig)

    def __repr__(self) -> str:
        return f"<Child pid={self._pid} exitcode={self._code}>"
