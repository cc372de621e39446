"""The reserved channel ``tether.trace``: a running main's frames, live, for its owner only.

A main answers an INVOKE of ``tether.trace`` (no arguments) only from a peer
on a unix-domain socket whose uid (``SO_PEERCRED``, read by the kernel when
it connected) is main's own; any other peer (TCP, a page, another user)
gets ``forbidden``. Once attached, main traces its frames (starting a
:class:`~tether.tracing.Recorder` without a file if none runs) and sends
their records to that peer as EVENTs ``tether.trace.records`` (one array of records
per turn of the loop), leaving the watcher's own connection out. When the
watcher leaves, a recorder started for it stops.

:func:`watch` is the other end: ``tether trace ADDRESS``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import signal
import time
from typing import TYPE_CHECKING, Any

from . import tracing
from .errors import Forbidden, PeerGone, TetherError
from .registry import Call, Handler, Registry

if TYPE_CHECKING:
    from .aio.peer import Peer

__all__ = ["RECORDS", "TRACE", "format_record", "install", "watch"]

log = logging.getLogger("tether.trace")

TRACE = "tether.trace"
#: the EVENTs main sends a watcher: one array of records each
RECORDS = "tether.trace.records"


class _Everyone(frozenset[str]):
    def __contains__(self, role: object) -> bool:
        return True


def install(registry: Registry) -> None:
    """Answer ``tether.trace`` in ``registry`` (checked per peer, see the module docstring)."""

    def attach(call: Call) -> dict[str, int]:
        peer = call.peer
        uid = getattr(peer, "uid", None)
        if uid is None or uid != os.getuid() or getattr(peer, "_sock", None) is None:
            log.warning("%r (uid %s) may not attach to tether.trace", peer, uid)
            raise Forbidden("tether.trace: only a local peer of the same user may attach")
        _subscribe(peer)
        log.info("%r attached to tether.trace", peer)
        return {"pid": os.getpid()}

    handler = Handler(attach, None)
    handler.roles = _Everyone()
    registry.invokes[TRACE] = handler


def _subscribe(peer: Peer) -> None:
    peer._conn.trace_off = True  # the watcher's own frames would feed themselves
    rec = tracing.hook
    started = rec is None
    if rec is None:
        rec = tracing.start(None)
    loop = asyncio.get_running_loop()
    batch: list[dict[str, Any]] = []

    def flush() -> None:
        records = batch[:]
        batch.clear()
        if records and not peer.closed:
            task = loop.create_task(peer.send(RECORDS, records))
            task.add_done_callback(_ignore)

    def on_record(record: dict[str, Any]) -> None:
        if not batch:
            loop.call_soon_threadsafe(flush)
        batch.append(record)

    remove = rec.listen(on_record)

    def left(_: object) -> None:
        remove()
        if started and tracing.hook is rec and not rec.listened:
            tracing.stop()

    loop.create_task(peer.wait_closed()).add_done_callback(left)


def _ignore(task: asyncio.Task[Any]) -> None:
    if not task.cancelled():
        task.exception()  # the watcher left meanwhile: nothing to do


def _keep(rec: dict[str, Any], ns: argparse.Namespace, *, by_kind: bool = True) -> bool:
    """Whether ``rec`` passes the filters (``by_kind=False``: all but ``--kind``).

    An answer that completes an invoke (it carries the latency) passes
    ``--kind invoke`` too: it is the end of the invoke.
    """
    if ns.channel and rec.get("channel") not in ns.channel:
        return False
    if ns.peer and not any(p in str(rec.get("peer", "")) for p in ns.peer):
        return False
    if not by_kind or not ns.kind:
        return True
    return rec.get("kind") in ns.kind or ("latency_us" in rec and "invoke" in ns.kind)


def format_record(rec: dict[str, Any]) -> str:
    """One line for a record: time, direction, peer, kind, channel, ids, sizes, latency."""
    if rec.get("kind") == "mark":
        details = " ".join(f"{k}={v}" for k, v in rec.items() if k not in ("ts", "pid", "kind"))
        return f"{rec['ts'] / 1e6:14.6f}  --   {details}"
    arrow = "->" if rec.get("dir") == "send" else "<-"
    line = (
        f"{rec['ts'] / 1e6:14.6f}  {arrow} {rec.get('peer', '?'):<16} {rec.get('kind', ''):<11} "
        f"{rec.get('channel', '') or '-':<24} rid={rec.get('request_id', 0)} "
        f"route={rec.get('route_id', 0)} {rec.get('size', 0)} B"
    )
    if rec.get("attachment_bytes"):
        line += f" +{rec['attachment_bytes']} B attached"
    if "latency_us" in rec:
        side = "handler" if rec.get("dir") == "send" else "invoke"
        line += f"  {side} {rec['latency_us'] / 1000:.3f} ms"
        if (err := rec.get("error")) is not None and err is not False:
            line += f" ERROR ({err})" if isinstance(err, str) else " ERROR"
    return line


def _refusal_hint(address: str) -> str:
    """Why a unix listener probably hung up at once: its uid check (it says nothing on the wire)."""
    if not address.startswith("unix://"):
        return ""
    try:
        owner = os.stat(address[len("unix://") :]).st_uid
    except OSError:
        return ""
    me = os.geteuid()
    if owner == me:
        return ""
    return (
        f" (refused by the listener: uid not allowed; the socket belongs to uid {owner}, "
        f"this is uid {me}: main's listen(uids=...) must allow it)"
    )


async def watch(ns: argparse.Namespace) -> int:
    """``tether trace ADDRESS``: print frames until Ctrl-C or ``--duration``, then a summary."""
    from rich.console import Console
    from rich.table import Table
    from rich.text import Text

    from .aio.main import connect
    from .trace_cli import Summary

    console = Console(highlight=False, soft_wrap=True)
    summary = Summary()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    with contextlib.suppress(NotImplementedError, RuntimeError):
        loop.add_signal_handler(signal.SIGINT, stop.set)
        loop.add_signal_handler(signal.SIGTERM, stop.set)

    def on_records(call: Call, records: list[dict[str, Any]]) -> None:
        for rec in records:
            if _keep(rec, ns, by_kind=False):  # --kind filters what is printed, not measured
                summary.add(rec)
                if _keep(rec, ns):
                    console.print(Text(format_record(rec)))

    try:
        peer = await connect(ns.address, connect_timeout=ns.timeout, timeout=ns.timeout)
    except (TetherError, OSError, ValueError) as exc:
        msg = str(exc)
        if not msg.startswith("cannot connect"):  # the error may say it already
            msg = f"cannot connect to {ns.address}: {msg}"
        if isinstance(exc, PeerGone | ConnectionError):
            msg += _refusal_hint(ns.address)
        console.print(Text(f"error: {msg}"), style="red")
        return 1
    try:
        peer.on(RECORDS, on_records)
        try:
            info = await peer.invoke(TRACE)
        except TetherError as exc:
            console.print(Text(f"error: {exc}"), style="red")
            return 1
        console.print(Text(f"attached to main pid {info['pid']} at {ns.address} (Ctrl-C to stop)"))
        started = time.monotonic()
        waits = [asyncio.ensure_future(stop.wait()), asyncio.ensure_future(peer.wait_closed())]
        try:
            await asyncio.wait(
                waits,
                timeout=ns.duration,
                return_when=asyncio.FIRST_COMPLETED,
            )
        finally:
            for w in waits:
                w.cancel()
        elapsed = time.monotonic() - started
        if peer.closed and not stop.is_set():
            console.print(
                Text(f"main pid {info['pid']} went away (connection closed)"), style="red"
            )
    finally:
        await peer.close()
    table = Table(title=f"invokes per channel ({elapsed:.1f} s)")
    for col in ("channel", "count", "p50 ms", "p99 ms", "errors"):
        table.add_column(col, justify="left" if col == "channel" else "right")
    for chan, count, p50, p99, errors in summary.rows():
        table.add_row(Text(chan), str(count), f"{p50:.3f}", f"{p99:.3f}", str(errors))
    console.print(table)
    return 0
