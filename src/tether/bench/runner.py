"""Run every scenario in fresh processes and pool the samples.

Each run is ``python -m tether.bench.case NAME --params JSON`` in a new
session (its own process group), so a case that hangs past its timeout is
killed together with every child it started. Samples from ``--repeat``
processes are pooled before the median and p99 are taken.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from typing import Any, TextIO

from .common import percentile
from .scenarios import Run

__all__ = ["MIN_P99_SAMPLES", "MetricStats", "Row", "run_all", "run_once"]


#: Fewer samples than this have no p99 of their own: the nearest-rank p99 would be the maximum.
MIN_P99_SAMPLES = 100


@dataclass
class MetricStats:
    """One metric of one run, pooled over its repeats.

    ``p99`` is given for latencies with at least :data:`MIN_P99_SAMPLES`
    samples; ``max`` for every latency, so a table shows the maximum, labelled
    as such, where a p99 would only be the maximum renamed. ``cpu_pct`` (user+sys
    of every process of the case, as % of one core over the timed span) and
    ``cpu_us_per_op`` come from the case's :class:`~tether.bench.common.CpuMeter`.
    """

    metric: str
    unit: str
    better: str  # "lower" or "higher"
    median: float
    p99: float | None  # for latencies with enough samples only
    n: int
    per_repeat: list[float]  # the median of each repeat
    ratios: dict[str, float] = field(default_factory=dict)  # peer -> tether/peer
    targets: list[dict[str, Any]] = field(default_factory=list)
    max: float | None = None  # for latencies
    cpu_pct: float | None = None
    cpu_us_per_op: float | None = None

    def tail(self) -> tuple[str, float] | None:
        """("p99", value) when there are enough samples, else ("max", value); None for rates."""
        if self.p99 is not None:
            return "p99", self.p99
        if self.max is not None:
            return "max", self.max
        return None


@dataclass
class Row:
    """The outcome of one run: metrics, or why there are none."""

    run: Run
    status: str  # ok, unavailable, error
    reason: str = ""
    metrics: list[MetricStats] = field(default_factory=list)
    info: dict[str, Any] = field(default_factory=dict)
    elapsed_s: float = 0.0


def run_once(run: Run, timeout: float) -> dict[str, Any]:
    """Run ``run`` once in a new process; return the case's result dict."""
    fd, out_path = tempfile.mkstemp(prefix="tether-bench-", suffix=".json")
    os.close(fd)
    cmd = [
        sys.executable,
        "-m",
        "tether.bench.case",
        run.scenario.name,
        "--params",
        json.dumps(run.params),
        "--timeout",
        str(max(5.0, timeout - 5.0)),
        "--out",
        out_path,
    ]
    proc = subprocess.Popen(
        cmd,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        stdin=subprocess.DEVNULL,
        text=True,
        start_new_session=True,
    )
    try:
        _, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)  # the case and every child it started
        proc.communicate()
        with contextlib.suppress(OSError):
            os.unlink(out_path)
        return {"error": f"timed out after {timeout:.0f} s"}
    try:
        with open(out_path) as f:
            result: dict[str, Any] = json.load(f)
        return result
    except (OSError, ValueError):
        pass
    finally:
        with contextlib.suppress(OSError):
            os.unlink(out_path)
    tail = err.strip().splitlines()[-1:] or [f"exit code {proc.returncode}"]
    return {"error": f"no result: {tail[0]}"[:300]}


def _pool(results: list[dict[str, Any]]) -> list[MetricStats]:
    by_name: dict[str, list[dict[str, Any]]] = {}
    for r in results:
        for m in r["metrics"]:
            by_name.setdefault(m["metric"], []).append(m)
    stats = []
    for name, parts in by_name.items():
        pooled = sorted(s for p in parts for s in p["samples"])
        first = parts[0]
        latency = first["better"] == "lower"
        cpu = [p["cpu"] for p in parts if p.get("cpu")]
        cpu_s = sum(c["cpu_s"] for c in cpu)
        wall_s = sum(c["wall_s"] for c in cpu)
        ops = sum(c["ops"] for c in cpu)
        stats.append(
            MetricStats(
                metric=name,
                unit=first["unit"],
                better=first["better"],
                median=percentile(pooled, 50),
                p99=percentile(pooled, 99) if latency and len(pooled) >= MIN_P99_SAMPLES else None,
                n=len(pooled),
                per_repeat=[percentile(sorted(p["samples"]), 50) for p in parts],
                max=pooled[-1] if latency and pooled else None,
                cpu_pct=100.0 * cpu_s / wall_s if cpu and wall_s > 0 else None,
                cpu_us_per_op=1e6 * cpu_s / ops if cpu and ops > 0 else None,
            )
        )
    return stats


def run_all(runs: list[Run], *, repeat: int, timeout: float, log: TextIO) -> list[Row]:
    """Run each of ``runs`` ``repeat`` times, printing progress to ``log``."""
    rows = []
    total = len(runs) * repeat
    done = 0
    for run in runs:
        results = []
        row = Row(run, "ok")
        t0 = time.perf_counter()
        for _ in range(repeat):
            done += 1
            log.write(f"[{done}/{total}] {run.label} ... ")
            log.flush()
            t1 = time.perf_counter()
            r = run_once(run, timeout)
            log.write(f"{_summary(r)} ({time.perf_counter() - t1:.1f} s)\n")
            log.flush()
            if "error" in r:
                row.status, row.reason = "error", r["error"]
                break
            if "unavailable" in r:
                row.status, row.reason = "unavailable", r["unavailable"]
                break
            if not r.get("metrics") or not all(m["samples"] for m in r["metrics"]):
                row.status, row.reason = "error", "the case returned no samples"
                break
            results.append(r)
            row.info.update(r.get("info", {}))
        row.elapsed_s = time.perf_counter() - t0
        if row.status == "ok":
            row.metrics = _pool(results)
        rows.append(row)
    return rows


def _summary(r: dict[str, Any]) -> str:
    if "error" in r:
        return f"error: {r['error']}"
    if "unavailable" in r:
        return f"unavailable: {r['unavailable']}"
    parts = []
    for m in r.get("metrics", []):
        s = sorted(m["samples"])
        parts.append(f"{m['metric']} {percentile(s, 50):.4g} {m['unit']}")
    return ", ".join(parts) or "no metrics"
