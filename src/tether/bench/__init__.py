"""``tether bench``: tether and its peers side by side, measured in one run.

Every scenario runs in fresh processes (``python -m tether.bench.case``) and
measures inside; this process only collects the samples, takes medians and
p99s, and prints a table with tether's ratios against ``multiprocessing.Pipe``
and pyzmq from the same run, next to the targets of issue 3.

Usage: ``tether bench [--quick] [--json PATH] [--plot PATH] [--only NAME[,NAME]] [--repeat N]``
(also ``python -m tether.bench``).
"""

from __future__ import annotations

import argparse
import os
import sys
import time

__all__ = ["main"]


def _parser() -> argparse.ArgumentParser:
    from .scenarios import SCENARIOS

    ap = argparse.ArgumentParser(
        prog="tether bench",
        description="Measure tether against multiprocessing.Pipe, pyzmq, shared_memory "
        "and a raw socketpair, side by side in one run.",
        epilog="scenarios: " + ", ".join(SCENARIOS),
    )
    ap.add_argument("--quick", action="store_true", help="short run (under a minute); 64 MiB only")
    ap.add_argument("--json", metavar="PATH", help="write every median, p99, ratio and the machine")
    ap.add_argument("--plot", metavar="PATH", help="write a PNG chart (matplotlib)")
    ap.add_argument(
        "--only", metavar="NAME[,NAME]", help="run these scenarios only (glob patterns allowed)"
    )
    ap.add_argument(
        "--repeat",
        type=int,
        metavar="N",
        help="fresh processes per scenario, samples pooled (default: 1 with --quick, else 2)",
    )
    ap.add_argument(
        "--timeout", type=float, metavar="S", help="hard limit per case process, in seconds"
    )
    ap.add_argument(
        "--cpus",
        metavar="N[,N]",
        help="pin every case and its children to these CPUs (default: unpinned)",
    )
    return ap


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark; return 0 when every scenario ran (or is unavailable), else 1."""
    from . import report
    from .runner import run_all
    from .scenarios import plan, select

    ap = _parser()
    args = ap.parse_args(argv)
    try:
        scenarios = select(args.only)
    except ValueError as exc:
        ap.error(str(exc))
    if args.plot:
        try:
            import matplotlib  # noqa: F401
        except ModuleNotFoundError:
            ap.error("--plot needs matplotlib (pip install 'tether-ipc[bench]')")
    repeat = args.repeat if args.repeat is not None else (1 if args.quick else 2)
    if repeat < 1:
        ap.error("--repeat must be at least 1")
    timeout = args.timeout or (45.0 if args.quick else 180.0)
    cpus: list[int] = []
    if args.cpus:
        try:
            cpus = sorted({int(c) for c in args.cpus.split(",") if c.strip()})
        except ValueError:
            ap.error(f"--cpus wants CPU numbers like 0 or 0,1, not {args.cpus!r}")
        allowed = os.sched_getaffinity(0)
        if not cpus or not set(cpus) <= allowed:
            ap.error(f"--cpus {args.cpus!r}: usable CPUs here are {sorted(allowed)}")
    runs = plan(scenarios, args.quick, cpus)
    mach = report.machine()
    sys.stderr.write(
        f"tether bench: {len(runs)} runs x {repeat}{' (quick)' if args.quick else ''}\n"
    )
    t0 = time.perf_counter()
    rows = run_all(runs, repeat=repeat, timeout=timeout, log=sys.stderr)
    report.compare(rows)
    sys.stderr.write(f"done in {time.perf_counter() - t0:.1f} s\n\n")
    report.print_report(rows, mach, pinned=cpus)
    settings = {
        "quick": args.quick,
        "repeat": repeat,
        "only": args.only,
        "timeout_s": timeout,
        "cpus": cpus or None,
    }
    if args.json:
        report.write_json(args.json, report.to_json(rows, settings, mach))
    if args.plot:
        report.plot(rows, args.plot, mach)
    errors = [r for r in rows if r.status == "error"]
    for r in errors:
        sys.stderr.write(f"error in {r.run.label}: {r.reason}\n")
    return 1 if errors else 0
