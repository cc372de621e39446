"""Ratios, targets, the printed table, the JSON file and the PNG chart."""

from __future__ import annotations

import dataclasses
import json
import os
import platform
import sys
from importlib import metadata
from typing import Any

from .runner import MetricStats, Row
from .scenarios import TARGETS

__all__ = ["compare", "machine", "machine_line", "plot", "rt_axis", "table", "to_json"]

PEERS = ("mp_pipe", "zmq", "grpc", "shm_reuse", "memcpy", "ppe", "loky", "nats")
PEER_TITLES = {
    "mp_pipe": "vs mp.Pipe",
    "zmq": "vs pyzmq",
    "grpc": "vs gRPC",
    "shm_reuse": "vs shm reuse",
    "memcpy": "vs memcpy",
    "ppe": "vs PPE",
    "loky": "vs loky",
    "nats": "vs nats-py",
}


# -- ratios and targets ------------------------------------------------------------


def _same_case(row: Row, other: Row) -> bool:
    """Same group, and for transfers the same size and direction (memcpy has none)."""
    if other.run.scenario.group != row.run.scenario.group:
        return False
    if row.run.scenario.group != "big":
        return other.run.variant == row.run.variant
    mine, theirs = row.run.params, other.run.params
    if mine.get("size") != theirs.get("size"):
        return False
    return "direction" not in theirs or theirs["direction"] == mine.get("direction")


def _baseline(rows: list[Row], row: Row, peer: str, m: MetricStats) -> MetricStats | None:
    """The peer's metric to compare ``m`` with: same name, else the first of the same unit."""
    if (peer == "nats") != ("nats" in row.run.scenario.name):
        return None  # over NATS, only like for like (and nats-py only with NATS rows)
    for other in rows:
        if other.run.scenario.peer == peer and other.status == "ok" and _same_case(row, other):
            same_unit = [b for b in other.metrics if b.unit == m.unit]
            named = [b for b in same_unit if b.metric == m.metric]
            if row.run.scenario.group == "pool":
                # Only like for like: after a kill, the peers settle by failing every job.
                return named[0] if named and not m.metric.startswith("kill") else None
            if named or same_unit:
                return (named or same_unit)[0]
    return None


def compare(rows: list[Row]) -> None:
    """Fill in each tether metric's ratios against the peers, and its targets."""
    for row in rows:
        if not row.run.scenario.tether or row.status != "ok":
            continue
        for m in row.metrics:
            for peer in PEERS:
                base = _baseline(rows, row, peer, m)
                if base is not None and base.median > 0:
                    m.ratios[peer] = m.median / base.median
            for t in TARGETS:
                if not t.applies(row.run, m.metric):
                    continue
                value = m.median if t.peer is None else m.ratios.get(t.peer)
                m.targets.append(
                    {
                        "target": t.text(),
                        "value": value,
                        "pass": None if value is None else t.met(value),
                    }
                )


# -- the machine ---------------------------------------------------------------


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _version(dist: str) -> str:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return "not installed"


def _loop() -> str:
    if os.environ.get("TETHER_LOOP", "") == "asyncio":
        return "asyncio (TETHER_LOOP=asyncio)"
    v = _version("uvloop")
    return "asyncio" if v == "not installed" else f"uvloop {v}"


def machine() -> dict[str, Any]:
    """Where the numbers were measured."""
    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:
        usable = os.cpu_count() or 0
    return {
        "platform": platform.platform(),
        "cpu": _cpu_model(),
        "cores": os.cpu_count(),
        "usable_cores": usable,
        "python": f"{platform.python_implementation()} {platform.python_version()}",
        "loop": _loop(),
        "versions": {d: _version(d) for d in ("tether-ipc", "msgspec", "pyzmq", "numpy")},
    }


def machine_line(m: dict[str, Any]) -> str:
    v = m["versions"]
    return (
        f"machine: {m['platform']} | CPU: {m['cpu']} | {m['cores']} cores "
        f"({m['usable_cores']} usable) | Python {m['python']} | loop: {m['loop']} | "
        f"msgspec {v['msgspec']}, pyzmq {v['pyzmq']}, numpy {v['numpy']}"
    )


# -- the table -------------------------------------------------------------------


def fmt_value(value: float | None, unit: str) -> str:
    """A figure with its unit: ``23.2 us``, ``712k/s``, ``1.33 GB/s``."""
    if value is None:
        return "-"
    if unit == "/s":
        if value >= 1e6:
            return f"{value / 1e6:.2f}M/s"
        return f"{value / 1e3:.0f}k/s"
    if unit == "GB/s":
        return f"{value:.3g} GB/s"
    return f"{value:.3g} {unit}" if value < 1000 else f"{value:.0f} {unit}"


def _ratio(m: MetricStats, peer: str) -> str:
    r = m.ratios.get(peer)
    return "" if r is None else f"{r:.2f}x"


def fmt_tail(m: MetricStats) -> str:
    """``p99 41.2 us`` with enough samples, else ``max 9.1 ms``; empty for rates."""
    tail = m.tail()
    if tail is None or m.n == 1:  # (one sample: the median says it all)
        return ""
    return f"{tail[0]} {fmt_value(tail[1], m.unit)}"


def fmt_cpu(m: MetricStats) -> tuple[str, str]:
    """(CPU as % of one core, CPU per operation): user+sys of every process of the case."""
    if m.cpu_pct is None or m.cpu_us_per_op is None:
        return "", ""
    per_op = m.cpu_us_per_op
    op = f"{per_op:.3g} us" if per_op < 1000 else f"{per_op / 1000:.3g} ms"
    return f"{m.cpu_pct:.0f}%", op


def table(rows: list[Row]) -> str:
    """The printed table: one line per metric, ratios and targets for tether's rows.

    A ratio column appears only when some row has a ratio in it, so a run of a
    few scenarios (``--only``) stays narrow.
    """
    peers = [p for p in PEERS if any(p in m.ratios for row in rows for m in row.metrics)]
    head = [
        "scenario",
        "metric",
        "median",
        "p99 / max",
        "CPU",
        "CPU/op",
        *(PEER_TITLES[p] for p in peers),
        "target",
        "",
    ]
    lines: list[list[str]] = []
    for row in rows:
        if row.status != "ok":
            lines.append([row.run.label, row.status, row.reason] + [""] * (len(head) - 3))
            continue
        for m in row.metrics:
            targets = " ".join(t["target"] for t in m.targets)
            verdicts = [t["pass"] for t in m.targets]
            ok = ""
            if verdicts:
                ok = "n/a" if None in verdicts else ("PASS" if all(verdicts) else "MISS")
            lines.append(
                [
                    row.run.label,
                    m.metric,
                    fmt_value(m.median, m.unit),
                    fmt_tail(m),
                    *fmt_cpu(m),
                    *(_ratio(m, p) for p in peers),
                    targets,
                    ok,
                ]
            )
    widths = [len(h) for h in head]
    for ln in lines:
        for i, cell in enumerate(ln):
            if ln[1] in ("error", "unavailable") and i == 2:
                continue  # the reason may overflow its column
            widths[i] = max(widths[i], len(cell))
    right = set(range(2, 6 + len(peers)))

    def render(cells: list[str]) -> str:
        if cells[1] in ("error", "unavailable"):
            return "  ".join([cells[0].ljust(widths[0]), cells[1].ljust(widths[1]), cells[2]])
        out = [
            c.rjust(widths[i]) if i in right else c.ljust(widths[i]) for i, c in enumerate(cells)
        ]
        return "  ".join(out).rstrip()

    rule = "-" * (sum(widths) + 2 * (len(widths) - 1))
    text = [render(head), rule]
    group = None
    for row_cells, group_of in zip(lines, _groups(rows), strict=True):
        if group is not None and group_of != group:
            text.append("")
        group = group_of
        text.append(render(row_cells))
    return "\n".join(text)


def _groups(rows: list[Row]) -> list[str]:
    out = []
    for row in rows:
        n = len(row.metrics) if row.status == "ok" else 1
        out.extend([row.run.scenario.group] * n)
    return out


def notes(rows: list[Row]) -> str:
    """How to read the ratio columns."""
    return (
        "ratios: tether / peer, same run. Latencies: below 1x is faster; "
        "rates and GB/s: above 1x is faster.\n"
        "p99 / max: the p99 with 100 samples or more, else the maximum (so labelled).\n"
        "CPU: user+sys time of both processes over the timed span, as % of one core, "
        "and per operation (round trip, event, invoke or transfer).\n"
        "big: m->c main -> child, c->m child -> main; 'cold transfer' is each process's "
        "first transfer, left out of 'transfer'.\n"
        "gRPC: grpcio over a unix socket, generic bytes handlers, msgspec bodies; 'vs gRPC' "
        "is against rt_grpc (blocking client, thread-pool server) and stream_grpc (grpc.aio).\n"
        "pool: 2 workers, chunksize 1; kill: 200 jobs of 10 ms, one worker SIGKILLed after 20; "
        "'lost' jobs neither returned nor raised within 5 s (a map over them hangs)."
    )


# -- JSON --------------------------------------------------------------------------


def to_json(rows: list[Row], settings: dict[str, Any], mach: dict[str, Any]) -> dict[str, Any]:
    """Everything the table shows, plus per-repeat medians and settings."""
    return {
        "machine": mach,
        "settings": settings,
        "results": [
            {
                "scenario": row.run.scenario.name,
                "variant": row.run.variant,
                "label": row.run.label,
                "group": row.run.scenario.group,
                "title": row.run.scenario.title,
                "tether": row.run.scenario.tether,
                "status": row.status,
                "reason": row.reason,
                "info": row.info,
                "elapsed_s": round(row.elapsed_s, 3),
                "metrics": [dataclasses.asdict(m) for m in row.metrics],
            }
            for row in rows
        ],
    }


def write_json(path: str, data: dict[str, Any]) -> None:
    with open(path, "w") as f:
        json.dump(data, f, indent=2, allow_nan=False, default=str)
        f.write("\n")


# -- the chart ----------------------------------------------------------------------


def rt_axis(medians: list[float]) -> tuple[str, tuple[float, float]]:
    """The round-trip chart's x scale and limits: ``(scale, (left, right))``.

    Linear from 0 up to 3x the largest median (a p99 tail far out would squash
    the medians); logarithmic when the medians span more than 10x (gRPC's
    beside a raw pipe's), so the short bars stay readable.
    """
    limit = 3.0 * max(medians)
    if max(medians) > 10.0 * min(medians) > 0:
        return "log", (min(medians) / 2.0, limit)
    return "linear", (0.0, limit)


def plot(rows: list[Row], path: str, mach: dict[str, Any]) -> None:
    """A PNG with grouped bar charts: round trip, message rates, large transfers, ms."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = [r for r in rows if r.status == "ok"]
    fig, axes = plt.subplots(2, 2, figsize=(14, 9.5))
    colour = {True: "#d95f02", False: "#7570b3"}

    def pick(groups: tuple[str, ...] | None, unit: str) -> list[tuple[Row, MetricStats]]:
        out: list[tuple[Row, MetricStats]] = []
        for row in ok:
            if groups is None or row.run.scenario.group in groups:
                out.extend((row, m) for m in row.metrics if m.unit == unit)
        return out

    # Round-trip latency (median bar, p99 tick).
    ax = axes[0][0]
    rt = pick(("rt",), "us")
    if rt:
        ys = list(range(len(rt)))
        meds = [m.median for _, m in rt]
        p99s = [(m.tail() or ("", 0.0))[1] for _, m in rt]
        scale, (left, limit) = rt_axis(meds)
        ax.set_xscale(scale)
        colours = [colour[r.run.scenario.tether] for r, _ in rt]
        ax.barh(ys, [v - left for v in meds], left=left, color=colours)
        shown = [(p, y) for p, y in zip(p99s, ys, strict=True) if p <= limit]
        ax.scatter([p for p, _ in shown], [y for _, y in shown], marker="|", s=200, color="k")
        ax.set_xlim(left, limit)
        ax.set_yticks(ys, [r.run.scenario.title for r, _ in rt])
        ax.invert_yaxis()
        for y, v, (_, m) in zip(ys, meds, rt, strict=True):
            ax.text(v, y, f" {v:.1f}  ({fmt_tail(m)})", va="center", fontsize=8)
    log = " log," if rt and ax.get_xscale() == "log" else ""
    ax.set_title(f"small round trip, median (us,{log} lower is better)")
    ax.set_xlabel("microseconds (|: p99, or max with few samples, when it fits)")

    # Message rates.
    ax = axes[0][1]
    ev = pick(("ev", "stream", "inflight"), "/s")
    if ev:
        ys = list(range(len(ev)))
        vals = [m.median / 1e3 for _, m in ev]
        ax.barh(ys, vals, color=[colour[r.run.scenario.tether] for r, _ in ev])
        labels = [
            {"ev": "events: ", "stream": "stream items: "}.get(
                r.run.scenario.group, "256 in flight: "
            )
            + r.run.scenario.title
            for r, _ in ev
        ]
        ax.set_yticks(ys, labels)
        ax.invert_yaxis()
        for y, v in zip(ys, vals, strict=True):
            ax.text(v, y, f" {v:.0f}k", va="center", fontsize=8)
    ax.set_title("messages per second, median (thousands, higher is better)")
    ax.set_xlabel("thousand messages / s")

    # Large transfers, grouped by size.
    ax = axes[1][0]
    big = [(r, m) for r, m in pick(("big",), "GB/s") if m.metric != "cold transfer"]
    if big:
        variants = list(dict.fromkeys(r.run.variant for r, _ in big))
        names = list(dict.fromkeys(r.run.scenario.name for r, _ in big))
        width = 0.8 / max(1, len(variants))
        for j, var in enumerate(variants):
            xs, vals, cols = [], [], []
            for i, name in enumerate(names):
                for r, m in big:
                    if r.run.scenario.name == name and r.run.variant == var:
                        xs.append(i + (j - (len(variants) - 1) / 2) * width)
                        vals.append(m.median)
                        cols.append(colour[r.run.scenario.tether])
            alpha = max(0.25, 1.0 - 0.75 * j / max(1, len(variants) - 1))
            bars = ax.bar(xs, vals, width, color=cols, alpha=alpha, label=var)
            ax.bar_label(bars, [f"{v:.2g}" for v in vals], fontsize=7)
        titles = {
            r.run.scenario.name: r.run.scenario.title
            + ("" if m.metric == "transfer" else f"\n({m.metric})")
            for r, m in big
        }
        ax.set_xticks(range(len(names)), [titles[n] for n in names], rotation=20, ha="right")
        ax.set_yscale("log")
        ax.legend(fontsize=7, title="size, direction")
    ax.set_title("large ndarray transfers, warm (GB/s, log, higher is better)")

    # Milliseconds: SIGKILL -> PeerGone, Buffer handoff.
    ax = axes[1][1]
    ms = pick(("kill", "big"), "ms")  # (the pool rows are in the table only)
    if ms:
        ys = list(range(len(ms)))
        meds = [m.median for _, m in ms]
        ax.barh(ys, meds, color=colour[True])
        tails = [(m.tail() or ("", m.median))[1] for _, m in ms]
        ax.scatter(tails, ys, marker="|", s=200, color="k", label="p99 (max if few)")
        ax.set_yticks(ys, [f"{r.run.scenario.title} {r.run.variant}".strip() for r, _ in ms])
        ax.invert_yaxis()
        for y, v in zip(ys, meds, strict=True):
            ax.text(v, y, f" {v:.2f}", va="center", fontsize=8)
        ax.legend(fontsize=8)
    ax.axvline(1.0, ls=":", color="grey")
    ax.axvline(10.0, ls=":", color="grey")
    ax.set_title("tether: SIGKILL -> PeerGone, Buffer handoff (ms)")
    ax.set_xlabel("milliseconds (targets: handoff < 1, PeerGone < 10)")

    fig.suptitle(
        f"tether bench — {mach['cpu']}, {mach['cores']} cores, Python {mach['python']}, "
        f"{mach['loop']}   (orange: tether, purple: peers)",
        fontsize=10,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def print_report(
    rows: list[Row], mach: dict[str, Any], out: Any = None, pinned: list[int] | None = None
) -> None:
    out = out or sys.stdout
    line = machine_line(mach)
    if pinned:
        line += f" | pinned to CPU {','.join(map(str, pinned))}"
    out.write(table(rows) + "\n\n" + notes(rows) + "\n" + line + "\n")
