"""Tracing: every frame a process sends and receives, as a timeline or a live feed.

Off by default. The protocol core (:class:`tether.protocol.Connection`) looks
at :data:`hook` once per batch of frames, in its two I/O points
(``receive_data`` and ``data_to_send``): while it is ``None`` nothing else
runs, so tracing off costs one module-attribute check per read and per write.

A :class:`Recorder` installed as the hook turns frames into records (a
monotonic timestamp, pid and thread, the peer's identity, channel, kind,
request id, routing id, size and attachment bytes) and pairs each INVOKE with
its answer on the same connection: the caller's span (invoke latency, from
the INVOKE sent to the answer received) and the handler's span (run time, from
the INVOKE received to the answer sent). Records go to the listeners of
:meth:`Recorder.listen` (``tether trace ADDRESS``) and, with a path, into a
Chrome trace-event file (Perfetto, ``chrome://tracing``) written when tracing
stops or the process exits.

``TETHER_TRACE=out.json`` in the environment starts tracing at import; it is
inherited by spawned children, and every process writes its own file: the
first (the root) ``out.json``, each other one ``out.<pid>.json``. The root
merges the files of the children it talked to when it stops; ``tether trace
merge`` joins any set of files.

Spans of one invoke are linked across processes by a flow id both sides
compute alike, from the caller's pid, the callee's pid, the routing id and
the request id.
"""

from __future__ import annotations

import atexit
import contextlib
import hashlib
import json
import logging
import os
import signal
import threading
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from .wire import ATT, ATT_SIZE, HEADER, HEADER_SIZE, Kind

__all__ = [
    "ENV",
    "Recorder",
    "child_exited",
    "flow_id",
    "hook",
    "load",
    "merge",
    "start",
    "stop",
    "unwritable",
    "write_on_sigterm",
]

log = logging.getLogger("tether.trace")

#: the environment variable naming the trace file (inherited by children)
ENV = "TETHER_TRACE"
_ROOT_ENV = "TETHER_TRACE_ROOT"  # the pid of the process that writes the plain path

#: the active recorder, or None (tracing off): checked by the core once per batch
hook: Recorder | None = None

#: events a recorder keeps for its file at most (then it counts what it drops)
MAX_EVENTS = 1_000_000
#: invokes awaiting their answer a recorder tracks at most, per direction
MAX_OPEN = 100_000

_K_INVOKE = int(Kind.INVOKE)
_K_RESULT = int(Kind.RESULT)
_K_ERROR = int(Kind.ERROR)
_K_EVENT = int(Kind.EVENT)
_K_CANCEL = int(Kind.CANCEL)
_KIND_NAMES = {int(k): k.name.lower() for k in Kind}


def kind_name(kind: int) -> str:
    """The lower-case name of a frame kind (``kind-N`` for one this version does not know)."""
    return _KIND_NAMES.get(kind) or f"kind-{kind}"


def flow_id(caller_pid: int, callee_pid: int, route_id: int, request_id: int) -> int:
    """The id linking one invoke's caller and handler spans (the same in both processes)."""
    digest = hashlib.blake2b(
        f"{caller_pid}:{callee_pid}:{route_id}:{request_id}".encode(), digest_size=6
    ).digest()
    return int.from_bytes(digest, "big")


def peer_label(conn: Any) -> tuple[str, int]:
    """``(identity, pid)`` of the other end of ``conn`` from its HELLO (``?`` before it)."""
    hello = conn.peer_hello
    if hello is None:
        return "?", 0
    return f"{hello.role or 'peer'}[{hello.pid}]", hello.pid


def _now_us() -> float:
    return time.monotonic_ns() / 1000.0


class Recorder:
    """Turns frames into trace records; see the module docstring.

    Args:
        path: the Chrome trace-event file to write at :meth:`close` (``None``:
            records only go to listeners).
        name: this process's name on its timeline track.
    """

    def __init__(self, path: str | Path | None = None, name: str = "") -> None:
        self.path = Path(path) if path is not None else None
        self.pid = os.getpid()
        root = os.environ.get(_ROOT_ENV)
        #: this process's track label: ``main`` unless it is a child of the tracing root
        self.name = name or (f"child {self.pid}" if root and root != str(self.pid) else "main")
        self.events: list[dict[str, Any]] = []
        self.dropped = 0
        self._lock = threading.RLock()  # re-entrant: a SIGTERM handler may write the file
        # (id(conn), rid) -> (start µs, channel, route, peer pid, tid) of open invokes (an
        # answer names no route: the request id alone pairs it, per connection and direction)
        self._calls: dict[tuple[int, int], tuple[float, str, int, int, int]] = {}
        self._served: dict[tuple[int, int], tuple[float, str, int, int, int]] = {}
        self._listeners: list[Callable[[dict[str, Any]], None]] = []
        self._threads: dict[int, str] = {}
        #: pids of the peers this process talked to (their files are merged into ours)
        self.peer_pids: set[int] = set()

    # -- listeners ----------------------------------------------------------

    def listen(self, fn: Callable[[dict[str, Any]], None]) -> Callable[[], None]:
        """Call ``fn(record)`` for every record from now on; returns the function that stops it."""
        self._listeners.append(fn)

        def remove() -> None:
            with contextlib.suppress(ValueError):
                self._listeners.remove(fn)

        return remove

    @property
    def listened(self) -> bool:
        """Whether anyone listens to the records."""
        return bool(self._listeners)

    def _publish(self, rec: dict[str, Any]) -> None:
        for fn in list(self._listeners):
            try:
                fn(rec)
            except Exception:
                log.exception("trace listener %r failed; removed", fn)
                with contextlib.suppress(ValueError):
                    self._listeners.remove(fn)

    # -- the hook (called by Connection) ---------------------------------------

    def sent(self, conn: Any, data: bytes | bytearray) -> None:
        """Frames ``conn`` is about to write (whole frames, back to back)."""
        if conn.trace_off:
            return
        ts = _now_us()
        view = memoryview(data)
        pos, end = 0, len(view)
        while pos + HEADER_SIZE <= end:
            size, kind, _flags, chan_len, rid, route, n_att, _ = HEADER.unpack_from(view, pos)
            start = pos + HEADER_SIZE
            channel = bytes(view[start : start + chan_len]).decode("utf-8", "replace")
            att = 0
            table = start + chan_len
            for i in range(n_att):
                att += ATT.unpack_from(view, table + i * ATT_SIZE)[4]
            self._frame(conn, ts, "send", kind, channel, rid, route, size + 4, att)
            pos += size + 4

    def received(self, conn: Any, frames: Iterable[Any]) -> None:
        """Frames ``conn`` just parsed and hands to the application."""
        if conn.trace_off:
            return
        ts = _now_us()
        for f in frames:
            channel = f.channel
            if "\0" in channel:  # a trace context after the name (docs/protocol.md 7.7)
                channel = channel.split("\0", 1)[0]
            att = sum(memoryview(a).nbytes for a in f.attachments)
            size = HEADER_SIZE + len(channel) + len(f.body) + att
            self._frame(conn, ts, "recv", f.kind, channel, f.request_id, f.route_id, size, att)

    def _frame(
        self,
        conn: Any,
        ts: float,
        direction: str,
        kind: int,
        channel: str,
        rid: int,
        route: int,
        size: int,
        att: int,
    ) -> None:
        peer, peer_pid = peer_label(conn)
        if peer_pid:
            self.peer_pids.add(peer_pid)
        tid = threading.get_ident()
        rec: dict[str, Any] = {
            "ts": ts,
            "pid": self.pid,
            "tid": tid,
            "dir": direction,
            "peer": peer,
            "channel": channel,
            "kind": kind_name(kind),
            "request_id": rid,
            "route_id": route,
            "size": size,
            "attachment_bytes": att,
        }
        key = (id(conn), rid)
        if kind == _K_CANCEL and direction == "recv" and key in self._served:
            self._unanswered(conn, False, rid, self._served.pop(key), "cancelled")
        if kind == _K_INVOKE:
            table = self._calls if direction == "send" else self._served
            if len(table) >= MAX_OPEN:  # invokes of connections that died unanswered
                table.clear()
            table[key] = (ts, channel, route, peer_pid, tid)
        elif kind in (_K_RESULT, _K_ERROR):
            mine = direction == "recv"  # an answer to our call, or our answer
            opened = (self._calls if mine else self._served).pop(key, None)
            if opened is not None:
                self._close(rec, opened, peer, mine, ts, kind == _K_ERROR)
        elif self.path is not None:
            self._keep(
                {
                    "name": f"{kind_name(kind)} {channel}".rstrip(),
                    "cat": kind_name(kind),
                    "ph": "i",
                    "s": "t",
                    "ts": ts,
                    "pid": self.pid,
                    "tid": tid,
                    "args": {
                        "dir": direction,
                        "peer": peer,
                        "request_id": rid,
                        "route_id": route,
                        "size": size,
                        "attachment_bytes": att,
                    },
                }
            )
        if self._listeners:
            self._publish(rec)

    def _close(
        self,
        rec: dict[str, Any],
        opened: tuple[float, str, int, int, int],
        peer: str,
        mine: bool,
        ts: float,
        error: bool | str,
    ) -> None:
        """Complete ``rec`` as the end of an invoke; keep its span and flow event."""
        start, chan, route, peer_pid, start_tid = opened
        rid = rec["request_id"]
        rec["channel"] = chan
        rec["route_id"] = route
        rec["latency_us"] = ts - start
        rec["error"] = error
        caller, callee = (self.pid, peer_pid) if mine else (peer_pid, self.pid)
        span = {
            "name": chan,
            "cat": "invoke" if mine else "handler",
            "ph": "X",
            "ts": start,
            "dur": max(ts - start, 0.001),
            "pid": self.pid,
            "tid": start_tid,
            "args": {
                "peer": peer,
                "request_id": rid,
                "route_id": route,
                "error": error,
                "side": "caller" if mine else "handler",
            },
        }
        flow = {
            "name": chan,
            "cat": "invoke",
            "ph": "s" if mine else "f",
            "id": flow_id(caller, callee, route, rid),
            "ts": start,
            "pid": self.pid,
            "tid": start_tid,
        }
        if not mine:
            flow["bp"] = "e"
        self._keep(span, flow)

    def _unanswered(
        self, conn: Any, mine: bool, rid: int, opened: tuple[float, str, int, int, int], why: str
    ) -> None:
        ts = _now_us()
        peer, _ = peer_label(conn)
        rec: dict[str, Any] = {
            "ts": ts,
            "pid": self.pid,
            "tid": threading.get_ident(),
            "dir": "recv" if mine else "send",  # the side the answer would have crossed
            "peer": peer,
            "channel": opened[1],
            "kind": "unanswered",
            "request_id": rid,
            "route_id": opened[2],
            "size": 0,
            "attachment_bytes": 0,
        }
        self._close(rec, opened, peer, mine, ts, why)
        if self._listeners:
            self._publish(rec)

    def call_ended(self, conn: Any, rid: int, why: str) -> None:
        """Our invoke ``rid`` on ``conn`` ended unanswered (``why``: timeout, cancelled).

        Its caller span ends now, as an error; the answer, if it still comes, is not paired.
        """
        if conn.trace_off:
            return
        opened = self._calls.pop((id(conn), rid), None)
        if opened is not None:
            self._unanswered(conn, True, rid, opened, why)

    def conn_ended(self, conn: Any) -> None:
        """``conn`` is gone: end its open spans (our calls, and the calls we were serving)."""
        if conn.trace_off:
            return
        cid = id(conn)
        for table, mine in ((self._calls, True), (self._served, False)):
            for key in [k for k in table if k[0] == cid]:
                opened = table.pop(key, None)
                if opened is not None:
                    self._unanswered(conn, mine, key[1], opened, "peer gone")

    def _keep(self, *events: dict[str, Any]) -> None:
        if self.path is None:
            return
        with self._lock:
            tid = events[0]["tid"]
            if tid not in self._threads:
                self._threads[tid] = threading.current_thread().name
            if len(self.events) + len(events) > MAX_EVENTS:
                self.dropped += len(events)
                return
            self.events.extend(events)

    def instant(self, name: str, args: dict[str, Any], scope: str = "p") -> None:
        """Mark a moment on this process's track (``scope`` ``"p"``) or thread's (``"t"``)."""
        ts = _now_us()
        self._keep(
            {
                "name": name,
                "cat": "tether",
                "ph": "i",
                "s": scope,
                "ts": ts,
                "pid": self.pid,
                "tid": threading.get_ident(),
                "args": args,
            }
        )
        if self._listeners:
            self._publish({"ts": ts, "pid": self.pid, "kind": "mark", "name": name, **args})

    # -- the file -----------------------------------------------------------

    def trace_events(self) -> list[dict[str, Any]]:
        """This process's events with the metadata naming its process and threads."""
        with self._lock:
            events = list(self.events)
            threads = dict(self._threads)
        meta: list[dict[str, Any]] = [
            {
                "name": "process_name",
                "ph": "M",
                "pid": self.pid,
                "tid": 0,
                "args": {"name": self.name},
            },
        ]
        for tid, tname in threads.items():
            meta.append(
                {
                    "name": "thread_name",
                    "ph": "M",
                    "pid": self.pid,
                    "tid": tid,
                    "args": {"name": tname},
                }
            )
        return meta + events

    def write(self) -> Path | None:
        """Write the file (nothing when this process recorded nothing); return its path."""
        if self.path is None or not self.events:
            return None
        _dump(self.path, self.trace_events(), {"dropped_events": self.dropped})
        return self.path


def _dump(path: Path, events: list[dict[str, Any]], other: dict[str, Any]) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump({"traceEvents": events, "displayTimeUnit": "ms", "otherData": other}, f)
    os.replace(tmp, path)


def load(path: str | Path) -> list[dict[str, Any]]:
    """The events of a trace file (the object form, or a bare array).

    Raises:
        ValueError: the file is not a trace-event JSON file.
        OSError: it cannot be read.
    """
    with open(path, encoding="utf-8") as f:
        try:
            data = json.load(f)
        except ValueError as exc:  # JSONDecodeError, or text that is not UTF-8
            raise ValueError(f"{os.fspath(path)}: not a JSON trace file: {exc}") from None
    if isinstance(data, dict):
        data = data.get("traceEvents")
    if not isinstance(data, list):
        raise ValueError(f"{path}: not a trace-event file (no traceEvents array)")
    return data


def merge(paths: Iterable[str | Path], out: str | Path) -> int:
    """Join trace files into one timeline at ``out``; return the number of events.

    Events identical in two files (a file merged before, its process and
    thread names) are kept once.

    Raises:
        ValueError: a file is given twice, or is not a trace-event file (named).
        OSError: a file cannot be read, or ``out`` written.
    """
    paths = list(paths)
    seen_paths: set[str] = set()
    for p in paths:
        real = os.path.realpath(p)
        if real in seen_paths:
            raise ValueError(f"{os.fspath(p)} is given twice: its events would be doubled")
        seen_paths.add(real)
    events: list[dict[str, Any]] = []
    seen: set[str] = set()
    for p in paths:
        for e in load(p):
            key = json.dumps(e, sort_keys=True, default=str)
            if key not in seen:
                seen.add(key)
                events.append(e)
    events.sort(key=lambda e: (e.get("ph") != "M", e.get("ts", 0)))
    _dump(Path(out), events, {"merged_from": [str(p) for p in paths]})
    return len(events)


def child_path(path: str | Path, pid: int) -> Path:
    """Where process ``pid`` writes when ``path`` is the root's file: ``out.<pid>.json``."""
    p = Path(path)
    return p.with_name(f"{p.stem}.{pid}{p.suffix or '.json'}")


_started_env: tuple[str | None, str | None] | None = None


def unwritable(path: str | os.PathLike[str]) -> str | None:
    """Why a trace file cannot be written at ``path``, or ``None`` when it can."""
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        return f"cannot write the trace file {os.fspath(path)!r}: no directory {folder!r}"
    if not os.access(folder, os.W_OK | os.X_OK):
        return f"cannot write the trace file {os.fspath(path)!r}: directory {folder!r} not writable"
    if os.path.isdir(path):
        return f"cannot write the trace file {os.fspath(path)!r}: it is a directory"
    return None


def start(
    path: str | os.PathLike[str] | None = None, name: str = "", *, strict: bool = False
) -> Recorder:
    """Start tracing in this process (to ``path``, and in the children it spawns).

    A ``path`` that cannot be written is logged as a warning under
    ``tether.trace`` (tracing still runs, for ``tether trace`` watchers), or
    with ``strict`` raises.

    Returns the recorder (the one already running, if any: a second start
    does not restart it).

    Raises:
        OSError: (``strict``) the file's directory is missing or not writable.
    """
    global hook, _started_env
    if hook is not None:
        return hook
    if path is not None:
        problem = unwritable(path)
        if problem is not None:
            if strict:
                raise OSError(problem)
            log.warning("%s: no trace file will be written", problem)
        path = os.path.abspath(path)
        root = os.environ.get(_ROOT_ENV)
        if root is not None and root.isdigit() and int(root) != os.getpid():
            target: Path = child_path(path, os.getpid())
        else:
            target = Path(path)
            _started_env = (os.environ.get(ENV), os.environ.get(_ROOT_ENV))
            os.environ[ENV] = str(path)
            os.environ[_ROOT_ENV] = str(os.getpid())
        hook = Recorder(target, name)
    else:
        hook = Recorder(None, name)
    return hook


def stop() -> Path | None:
    """Stop tracing; write this process's file, merging the files of its peers (the root).

    Returns the file written, if any.
    """
    global hook, _started_env
    rec, hook = hook, None
    if rec is None:
        return None
    try:
        written = rec.write()
        if written is not None:
            log.debug("trace of pid %d written to %s", rec.pid, written)
    except OSError as exc:
        log.warning("trace file %s not written: %s", rec.path, exc)
        written = None
    if _started_env is not None:
        old_path, old_root = _started_env
        _started_env = None
        for key, value in ((ENV, old_path), (_ROOT_ENV, old_root)):
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        if rec.path is not None:
            parts = [child_path(rec.path, pid) for pid in sorted(rec.peer_pids)]
            parts = [p for p in parts if p.exists()]
            if parts:
                files = ([rec.path] if written is not None else []) + parts
                merge(files, rec.path)
                for p in parts:
                    with contextlib.suppress(OSError):
                        p.unlink()
                written = rec.path
                log.info("trace written to %s (merged %d children's files)", written, len(parts))
            elif written is not None:
                log.info("trace written to %s", written)
    return written


def child_exited(pid: int, code: int | None, name: str) -> None:
    """Mark a child's death on the timeline (called by main when it learns of it)."""
    rec = hook
    if rec is not None:
        rec.instant("child exited", {"child_pid": pid, "exit_code": code, "child": name})


def write_on_sigterm() -> None:
    """In a child: on SIGTERM write this process's file first, then die of SIGTERM as before.

    A signal sent to the whole process group (a terminal, ``timeout``, a
    service manager) reaches the children with main: without this their
    records would be lost, and main would merge nothing. Only installed
    while SIGTERM has its default action.
    """
    if signal.getsignal(signal.SIGTERM) is not signal.SIG_DFL:
        return

    def on_term(signum: int, frame: Any) -> None:
        with contextlib.suppress(Exception):
            stop()
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        os.kill(os.getpid(), signal.SIGTERM)

    with contextlib.suppress(ValueError):  # not the main thread
        signal.signal(signal.SIGTERM, on_term)


def _after_fork() -> None:
    """In a forked child: a recorder of its own (its own file), none of the parent's records."""
    global hook, _started_env
    rec = hook
    if rec is None:
        return
    _started_env = None
    path = os.environ.get(ENV)
    hook = None
    hook = Recorder(child_path(path, os.getpid()) if path else None)


def _at_exit() -> None:
    with contextlib.suppress(Exception):
        stop()


os.register_at_fork(after_in_child=_after_fork)
atexit.register(_at_exit)
if os.environ.get(ENV):
    start(os.environ[ENV])
