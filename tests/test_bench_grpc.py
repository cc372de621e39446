"""gRPC in ``tether bench`` (issue 14): its rows run, and tether's rows get a ratio against it."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

from tether.bench.case import MARKER
from tether.bench.report import compare, plot, rt_axis, table
from tether.bench.runner import MetricStats, Row
from tether.bench.scenarios import SCENARIOS, Run, select

pytest.importorskip("grpc")

ROWS = ["rt_tether_async", "rt_grpc", "rt_grpc_aio", "stream_tether", "stream_grpc"]


@pytest.mark.timeout(200)
def test_quick_run_has_grpc_rows_with_cpu_and_ratios(tmp_path: Path) -> None:
    out_json = tmp_path / "bench.json"
    cmd = [sys.executable, "-m", "tether.bench", "--quick", "--json", str(out_json)]
    proc = subprocess.run(
        [*cmd, "--only", "rt_grpc*,stream_grpc,rt_tether_async,stream_tether"],
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = {r["scenario"]: r for r in json.loads(out_json.read_text())["results"]}
    assert sorted(results) == sorted(ROWS)
    for name, r in results.items():
        assert r["status"] == "ok", (name, r["reason"])
        (m,) = r["metrics"]
        assert m["median"] > 0 and m["n"] > 0
        assert 0 < m["cpu_pct"] < 100 * 64 and 0 < m["cpu_us_per_op"] < 1e6, (name, m)
    for name in ("rt_grpc", "rt_grpc_aio", "stream_grpc"):
        assert results[name]["info"]["grpc"], name
    assert results["stream_grpc"]["metrics"][0]["unit"] == "/s"
    # tether's ratios are against the blocking gRPC row and the gRPC stream of this run.
    rt = results["rt_tether_async"]["metrics"][0]
    grpc_rt = results["rt_grpc"]["metrics"][0]["median"]
    assert math.isclose(rt["ratios"]["grpc"], rt["median"] / grpc_rt)
    st = results["stream_tether"]["metrics"][0]
    grpc_st = results["stream_grpc"]["metrics"][0]["median"]
    assert math.isclose(st["ratios"]["grpc"], st["median"] / grpc_st)
    header = proc.stdout.splitlines()[0]
    assert "vs gRPC" in header and "vs pyzmq" not in header
    for name in ROWS:
        assert any(ln.startswith(name) for ln in proc.stdout.splitlines()), name


def test_grpc_rows_are_peers_in_table_order() -> None:
    assert [s.name for s in select("rt_grpc*,stream_grpc")] == [
        "rt_grpc",
        "rt_grpc_aio",
        "stream_grpc",
    ]
    assert not any(SCENARIOS[n].tether for n in ("rt_grpc", "rt_grpc_aio", "stream_grpc"))


def _row(name: str, median: float, unit: str = "us", metric: str = "round trip") -> Row:
    better = "lower" if unit == "us" else "higher"
    return Row(
        Run(SCENARIOS[name]), "ok", metrics=[MetricStats(metric, unit, better, median, None, 1, [])]
    )


def test_vs_grpc_is_against_the_blocking_row_and_shown_only_when_present() -> None:
    rows = [
        _row("rt_mp_pipe", 40.0),
        _row("rt_tether_async", 50.0),
        _row("rt_grpc_aio", 250.0),
        _row("rt_grpc", 500.0),
    ]
    compare(rows)
    assert rows[1].metrics[0].ratios == {"mp_pipe": 1.25, "grpc": 0.1}
    assert "vs gRPC" in table(rows) and "0.10x" in table(rows)
    without = [_row("rt_mp_pipe", 40.0), _row("rt_tether_async", 50.0)]
    compare(without)
    head = table(without).splitlines()[0]
    assert "vs mp.Pipe" in head and "vs gRPC" not in head and "vs memcpy" not in head


def test_a_case_without_grpcio_is_unavailable_not_an_error() -> None:
    code = (
        "import sys; sys.modules['grpc'] = None\n"
        "from tether.bench.case import main\n"
        "sys.exit(main(['rt_grpc', '--params', '{\"quick\": true}']))\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr[-2000:]
    line = next(ln for ln in proc.stdout.splitlines() if ln.startswith(MARKER))
    result = json.loads(line[len(MARKER) :])
    assert "grpc is not installed" in result["unavailable"]


def test_round_trip_chart_goes_log_when_grpc_dwarfs_the_pipe() -> None:
    assert rt_axis([30.0, 60.0, 90.0]) == ("linear", (0.0, 270.0))
    scale, (left, right) = rt_axis([16.0, 30.0, 60.0, 570.0])  # spin, pipe, tether, gRPC
    assert scale == "log" and left == 8.0 and right == 1710.0


def test_plot_with_grpc_rows_writes_png(tmp_path: Path) -> None:
    rows = [_row("rt_mp_pipe", 30.0), _row("rt_tether_async", 60.0), _row("rt_grpc", 400.0)]
    rows += [_row("stream_tether", 2e5, "/s", "items"), _row("stream_grpc", 2e4, "/s", "items")]
    path = tmp_path / "chart.png"
    plot(rows, str(path), {"cpu": "test", "cores": 2, "python": "3", "loop": "uvloop"})
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
