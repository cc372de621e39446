"""How a child tells main why it failed: a small, bounded side channel.

A child that fails before it is connected (its target's module does not
import, its async target raises before its first ``await``) or whose target
raises later has more to say than an exit code: the exception's type,
message and traceback. It writes them, once, as one JSON object of at most
:data:`REPORT_MAX` bytes, to its end of a socketpair main handed it at spawn
(apart from the tether connection, so a report never looks like a frame).
Main reads it without blocking when the child ends and raises
:class:`~tether.PeerGone` with a :class:`~tether.RemoteError` as its
``__cause__`` holding them, as ``BrokenProcessPool`` carries its cause.

Main decodes JSON only (strings, never objects): a report cannot run code
in main, and a report larger than the cap is cut, not read whole.

A child that dies while Python is still starting it (importing the main
module, unpickling the arguments) never reaches tether's code; its traceback
is on its stderr, and main's error says so, with a hint when the main module
has no ``if __name__ == "__main__":`` guard (spawn and forkserver import it
again in every child).
"""

from __future__ import annotations

import ast
import contextlib
import importlib
import socket
import sys
import traceback
import types
from typing import Any, Final

import msgspec

from .errors import RemoteError

__all__ = [
    "REPORT_MAX",
    "TargetRef",
    "guard_hint",
    "read_report",
    "target_ref",
    "write_report",
]

#: the most bytes of a child's failure report main reads
REPORT_MAX: Final = 64 * 1024
_MESSAGE_MAX: Final = 4096


class _Report(msgspec.Struct):
    type: str
    message: str
    traceback: str


_encode = msgspec.json.Encoder().encode
_decode = msgspec.json.Decoder(_Report).decode


class TargetRef(msgspec.Struct, frozen=True):
    """A module-level function named, not pickled: the child imports it itself.

    So a target whose module fails to import in the child fails inside
    tether's code, which can report it, and after ``env=``/``cwd=`` apply.
    """

    module: str
    qualname: str

    def resolve(self) -> Any:
        """Import the module and look the function up by its qualified name."""
        obj: Any = importlib.import_module(self.module)
        for part in self.qualname.split("."):
            obj = getattr(obj, part)
        return obj


def target_ref(target: object) -> TargetRef | None:
    """A reference to ``target`` when it is a plain module-level function, else None."""
    if not isinstance(target, types.FunctionType):
        return None
    module, qualname = target.__module__, target.__qualname__
    if not module or "<" in qualname:
        return None
    return TargetRef(module, qualname)


def _type_name(exc: BaseException) -> str:
    cls = type(exc)
    return (
        cls.__qualname__ if cls.__module__ == "builtins" else f"{cls.__module__}.{cls.__qualname__}"
    )


def write_report(sock: socket.socket | None, exc: BaseException) -> None:
    """Send main the type, message and traceback of ``exc`` (bounded; errors ignored)."""
    if sock is None:
        return
    try:
        message = str(exc)
    except Exception:  # a __str__ that raises still names the type
        message = ""
    tb = "".join(traceback.format_exception(exc))
    report = _Report(_type_name(exc)[:_MESSAGE_MAX], message[:_MESSAGE_MAX], tb)
    data = _encode(report)
    while len(data) > REPORT_MAX and report.traceback:
        # keep the tail of a long traceback: the frame that raised is at its end
        report.traceback = report.traceback[len(report.traceback) // 2 :]
        data = _encode(report)
    if len(data) > REPORT_MAX:  # (a message of 4096 characters always fits)
        return
    with contextlib.suppress(OSError):
        sock.settimeout(1.0)
        sock.sendall(data)
    with contextlib.suppress(OSError):
        sock.close()


def read_report(sock: socket.socket | None) -> RemoteError | None:
    """The child's report, if any, as a RemoteError; never blocks, reads at most REPORT_MAX."""
    if sock is None or sock.fileno() < 0:
        return None
    chunks: list[bytes] = []
    size = 0
    try:
        sock.setblocking(False)
        while size < REPORT_MAX:
            data = sock.recv(REPORT_MAX - size)
            if not data:
                break
            chunks.append(data)
            size += len(data)
    except OSError:  # (BlockingIOError: nothing, or no more, written)
        pass
    if not chunks:
        return None
    try:
        report = _decode(b"".join(chunks))
    except msgspec.MsgspecError:
        return None  # cut or garbled: no cause rather than a wrong one
    return RemoteError(report.type, report.message, report.traceback)


def guard_hint() -> str:
    """A hint when the main module starts work at import time without a ``__main__`` guard.

    Read from the main module's source (a script run with ``python file.py``):
    empty when there is no file, or when it tests ``__name__ == "__main__"``.
    """
    main = sys.modules.get("__main__")
    path = getattr(main, "__file__", None)
    if not path or not str(path).endswith(".py"):
        return ""
    try:
        with open(path, encoding="utf-8") as f:
            tree = ast.parse(f.read())
    except (OSError, SyntaxError, ValueError, UnicodeDecodeError):
        return ""
    for node in ast.walk(tree):
        left = node.left if isinstance(node, ast.Compare) else None
        if isinstance(left, ast.Name) and left.id == "__name__":
            return ""
    return (
        f"; the main module {path} has no 'if __name__ == \"__main__\":' guard: with the "
        "spawn and forkserver start methods every child imports it again, and runs what it "
        "runs at import time (starting tether, spawning), which fails while the child starts. "
        "Put that code under the guard"
    )
