"""``tether trace``: merge trace files, or watch a running main's frames live.

``tether trace merge OUT FILE...`` joins Chrome trace-event files (one per
process, see :mod:`tether.tracing`) into one timeline.

``tether trace ADDRESS`` attaches to the main listening at ``ADDRESS`` (a
``unix://`` address of the same user: main answers the control channel only
there, see :mod:`tether.trace_control`) and prints every frame main sends and
receives, filtered by ``--channel``, ``--peer`` and ``--kind``, until Ctrl-C
or ``--duration``; then a table of invokes per channel (count, p50 and p99
latency, errors).
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from collections.abc import Sequence
from typing import Any

from . import tracing

__all__ = ["Summary", "main"]

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2


class Summary:
    """Invokes per channel: count, latencies and errors, from trace records."""

    def __init__(self) -> None:
        self.latencies: dict[str, list[float]] = {}
        self.errors: dict[str, int] = {}

    def add(self, rec: dict[str, Any]) -> None:
        """Count a record if it completes an invoke (it has ``latency_us``)."""
        lat = rec.get("latency_us")
        if lat is None:
            return
        chan = str(rec.get("channel", ""))
        self.latencies.setdefault(chan, []).append(float(lat))
        if rec.get("error"):
            self.errors[chan] = self.errors.get(chan, 0) + 1

    def rows(self) -> list[tuple[str, int, float, float, int]]:
        """``(channel, count, p50 ms, p99 ms, errors)`` per channel, by channel name."""
        out = []
        for chan in sorted(self.latencies):
            lats = sorted(self.latencies[chan])
            out.append(
                (
                    chan,
                    len(lats),
                    _pct(lats, 0.50) / 1000.0,
                    _pct(lats, 0.99) / 1000.0,
                    self.errors.get(chan, 0),
                )
            )
        return out


def _pct(values: list[float], q: float) -> float:
    return values[min(len(values) - 1, int(q * len(values)))]


def _build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="tether trace",
        description=(
            "tether trace ADDRESS: print a running main's frames live, then a summary of "
            "invokes per channel (Ctrl-C to stop). tether trace merge OUT FILE...: join "
            "trace files (Chrome trace-event JSON, one per process) into OUT."
        ),
    )
    parser.add_argument("address", metavar="ADDRESS", help="unix:///path of a listening main")
    parser.add_argument("--channel", action="append", help="only this channel (repeatable)")
    parser.add_argument("--peer", action="append", help="only peers whose identity contains this")
    parser.add_argument(
        "--kind", action="append", help="only this frame kind: invoke, result, error, event..."
    )
    parser.add_argument(
        "--duration", type=float, metavar="SECONDS", help="stop after SECONDS (default: Ctrl-C)"
    )
    parser.add_argument(
        "--timeout", type=float, default=10.0, metavar="SECONDS", help="to connect (default: 10)"
    )
    return parser


def _merge(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="tether trace merge", description="Join trace files into one timeline."
    )
    parser.add_argument("out", metavar="OUT", help="the merged file to write")
    parser.add_argument("files", metavar="FILE", nargs="+", help="trace files to join")
    ns = parser.parse_args(argv)
    try:
        n = tracing.merge(ns.files, ns.out)
    except (OSError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_FAILED
    print(f"{n} events from {len(ns.files)} files written to {ns.out}")
    return EXIT_OK


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``tether trace``; returns the exit code."""
    args = list(sys.argv[1:] if argv is None else argv)
    if args[:1] == ["merge"]:
        return _merge(args[1:])
    ns = _build_parser().parse_args(args)
    from .trace_control import watch

    try:
        return asyncio.run(watch(ns))
    except KeyboardInterrupt:
        return EXIT_OK
