"""A spawned child process, as main sees it: a :class:`Peer` with a pid."""

from __future__ import annotations

import asyncio
import contextlib
import multiprocessing.process
import os
import signal
import socket
from typing import Any

from ..errors import PeerGone, TetherError
from ..process import describe_exit
from .peer import Peer

__all__ = ["Child"]

# How long to wait, after the connection drops, for the exit status to appear.
_EXIT_GRACE = 0.05
# After a GOODBYE the child is on its way out; the exit (seen at once through the
# sentinel) usually follows within this bound, so errors can say how it ended.
_GOODBYE_GRACE = 1.0


class Child(Peer):
    """A child process started by :meth:`Main.spawn`, connected by a socketpair.

    When the child dies, every invoke pending on it fails at once with
    :class:`PeerGone` saying how it ended (exit code or signal).
    """

    def __init__(
        self, sock: socket.socket, process: multiprocessing.process.BaseProcess, **kw: Any
    ) -> None:
        super().__init__(sock, **kw)
        self._process = process
        pid = process.pid
        assert pid is not None
        self._pid = pid
        self._code: int | None = None
        self._exited: asyncio.Future[int] = self._loop.create_future()
        self._sentinel = process.sentinel

    @property
    def pid(self) -> int:
        """The child's process id."""
        return self._pid

    @property
    def exitcode(self) -> int | None:
        """Exit code; ``-N`` if killed by signal N; ``None`` while running."""
        return self._poll()

    def _poll(self, wait: float = 0.0) -> int | None:
        """The exit code once the process has ended; then release its resources."""
        if self._code is None:
            if wait:
                self._process.join(wait)
            code = self._process.exitcode
            if code is not None:
                self._code = code
                # Frees the sentinel pipe now, not at multiprocessing's next start().
                with contextlib.suppress(ValueError):
                    self._loop.remove_reader(self._sentinel)
                    self._process.close()
        return self._code

    def start(self) -> None:
        super().start()
        self._loop.add_reader(self._sentinel, self._on_exit)

    def _on_exit(self) -> None:
        code = self._poll() if self._code is not None else self._poll(0.5)
        if code is None:
            return
        if not self._exited.done():
            self._exited.set_result(code if code is not None else -1)
        if self._closed is None:
            self._shutdown(PeerGone(describe_exit(self.pid, code), exitcode=code))

    def _lost(self, exc: TetherError) -> None:
        if not isinstance(exc, PeerGone) or self._exited.done():
            if not isinstance(exc, PeerGone):
                self.kill()  # bad-message rule: a child that broke the protocol dies
            self._shutdown(exc)
            return
        # The connection dropped: wait briefly for the exit status so the error can say why.
        self._stream.stop_reading()
        grace = _EXIT_GRACE if self._conn.goodbye_reason is None else _GOODBYE_GRACE
        self._loop.call_later(grace, self._exit_grace_over, exc)

    def _exit_grace_over(self, exc: PeerGone) -> None:
        if self._closed is None:
            code = self._poll()
            if code is not None:
                exc = PeerGone(describe_exit(self.pid, code), exitcode=code)
            self._shutdown(exc)

    async def wait(self, timeout: float | None = None) -> int:
        """Wait for the process to exit and return its exit code.

        Raises:
            TimeoutError: still running after ``timeout`` seconds.
        """
        if not self._exited.done() and self._poll() is not None:
            self._on_exit()
        return await asyncio.wait_for(asyncio.shield(self._exited), timeout)

    def kill(self) -> None:
        """SIGKILL the child (no-op if it already exited)."""
        if self._poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self._pid, signal.SIGKILL)

    def terminate(self) -> None:
        """SIGTERM the child (no-op if it already exited)."""
        if self._poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self._pid, signal.SIGTERM)

    def _shutdown(self, exc: TetherError) -> None:
        super()._shutdown(exc)

    def __repr__(self) -> str:
        return f"<Child pid={self._pid} exitcode={self._code}>"
