"""``tether trace``: merge trace files, or watch a running main's frames live.

``tether trace merge OUT FILE...`` joins Chrome trace-event files (one per
process, see :mod:`tether.tracing`) into one timeline.

``tether trace plot TRACE OUT.png`` draws a trace as a timeline (matplotlib).

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
from .wire import Kind

__all__ = ["Summary", "main", "plot"]

#: the kinds ``--kind`` accepts: frame kinds, ``unanswered`` (an invoke ended by a
#: timeout, a cancel or the connection's end) and ``mark`` (a child's exit...)
KINDS = sorted({tracing.kind_name(int(k)) for k in Kind} | {"unanswered", "mark"})

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
            "trace files (Chrome trace-event JSON, one per process) into OUT. tether trace plot "
            "TRACE OUT.png: draw a trace file as a timeline (matplotlib)."
        ),
    )
    parser.add_argument("address", metavar="ADDRESS", help="unix:///path of a listening main")
    parser.add_argument("--channel", action="append", help="only this channel (repeatable)")
    parser.add_argument("--peer", action="append", help="only peers whose identity contains this")
    parser.add_argument(
        "--kind",
        action="append",
        help=f"only this kind (repeatable): {', '.join(KINDS)}; the summary counts every invoke",
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
    if args[:1] == ["plot"]:
        return _plot(args[1:])
    parser = _build_parser()
    ns = parser.parse_args(args)
    bad = [k for k in ns.kind or () if k not in KINDS]
    if bad:
        parser.error(f"unknown --kind {', '.join(bad)} (valid: {', '.join(KINDS)})")
    from .trace_control import watch

    try:
        return asyncio.run(watch(ns))
    except KeyboardInterrupt:
        return EXIT_OK


def plot(events: list[dict[str, Any]], out: str, title: str = "tether trace") -> None:
    """Draw a trace as a timeline PNG: one row per process and thread, as a trace viewer does.

    Top: the whole run (spans, instants, children's deaths). Bottom: a zoom on
    the first burst of invokes, each a caller span and a handler span joined by its
    flow arrow.
    Needs matplotlib.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = {e["pid"]: e["args"]["name"] for e in events if e.get("name") == "process_name"}
    timed = [e for e in events if e.get("ph") != "M"]
    if not timed:
        raise ValueError("the trace has no timed events")
    t0 = min(e["ts"] for e in timed)
    tracks = sorted({(e["pid"], e["tid"]) for e in timed}, key=lambda k: (k[0], k[1]))
    row = {k: i for i, k in enumerate(tracks)}
    labels = [
        n if str(pid) in (n := str(names.get(pid, pid))) else f"{n} ({pid})" for pid, _ in tracks
    ]
    spans = [e for e in timed if e["ph"] == "X"]
    flows: dict[int, dict[str, dict[str, Any]]] = {}
    for e in timed:
        if e["ph"] in ("s", "f"):
            flows.setdefault(e["id"], {})[e["ph"]] = e
    colors = {"invoke": "#4878d0", "handler": "#ee854a"}
    fig, axes = plt.subplots(
        2, 1, figsize=(11, 2.2 + 1.1 * len(tracks)), dpi=110, layout="constrained"
    )
    ms = 1000.0
    lo = min((s["ts"] for s in spans), default=t0)
    # the zoom: the first burst of invokes (those starting within 5 ms of the first)
    burst = [s for s in spans if s["ts"] <= lo + 5000.0]
    hi = max((s["ts"] + s["dur"] for s in burst), default=t0 + 1)
    pad = (hi - lo) * 0.08 + 1
    for ax, zoom in zip(axes, (False, True), strict=True):
        scale = 1.0 if zoom else ms  # µs in the zoom, ms for the whole run
        origin = lo - pad if zoom else t0
        for s in spans:
            if zoom and s["ts"] > hi + pad:
                continue
            y = row[(s["pid"], s["tid"])]
            x = (s["ts"] - origin) / scale
            w = max(s["dur"] / scale, (hi - lo) / scale / 400 if zoom else 0.05)
            ax.broken_barh([(x, w)], (y - 0.3, 0.6), color=colors.get(s["cat"], "grey"))
            if zoom:
                side = s["args"].get("side", "")
                ax.text(x, y + 0.36, f"{s['name']} ({side})", fontsize=8, va="bottom", clip_on=True)
        for e in timed:
            if e["ph"] != "i":
                continue
            y = row[(e["pid"], e["tid"])]
            x = (e["ts"] - origin) / scale
            death = e["name"] == "child exited"
            if zoom and not lo - pad <= e["ts"] <= hi + pad:
                continue
            ax.plot(
                [x],
                [y],
                marker="X" if death else "|",
                color="#d62728" if death else "#555555",
                markersize=11 if death else 9,
            )
            if death and not zoom:
                ax.text(
                    x, y - 0.45, "child exited", fontsize=7, color="#d62728", va="top", ha="right"
                )
        for pair in flows.values():
            if "s" in pair and "f" in pair:
                a, b = pair["s"], pair["f"]
                if zoom and a["ts"] > hi + pad:
                    continue
                ax.annotate(
                    "",
                    xy=((b["ts"] - origin) / scale, row[(b["pid"], b["tid"])]),
                    xytext=((a["ts"] - origin) / scale, row[(a["pid"], a["tid"])]),
                    arrowprops={"arrowstyle": "->", "color": "#2ca02c", "lw": 1.2},
                )
        ax.set_yticks(range(len(tracks)), labels, fontsize=8)
        ax.set_ylim(len(tracks) - 0.4, -0.8)
        ax.grid(axis="x", alpha=0.3)
        if zoom:
            ax.set_xlim(0, (hi + pad - origin) / scale)
            ax.set_xlabel(f"µs (zoom on the invokes, from {(origin - t0) / ms:.1f} ms)")
        else:
            ax.set_xlabel("ms since the first event")
    axes[0].set_title(
        f"{title}: caller spans (blue), handler spans (orange), flows (green), "
        "frames as instants (|), children's deaths (X)",
        fontsize=9,
    )
    fig.savefig(out)
    plt.close(fig)


def _plot(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="tether trace plot", description="Draw a trace file as a timeline PNG (matplotlib)."
    )
    parser.add_argument("trace", metavar="TRACE", help="a trace file (tether trace merge's too)")
    parser.add_argument("out", metavar="OUT", help="the PNG to write")
    ns = parser.parse_args(argv)
    try:
        plot(tracing.load(ns.trace), ns.out)
    except (OSError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_FAILED
    return EXIT_OK
