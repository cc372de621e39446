"""Tests for ``tether bench``: a real quick run end to end, and the reporting logic."""

from __future__ import annotations

import json
import math
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tether.bench import main
from tether.bench.common import percentile
from tether.bench.report import compare, fmt_value, plot, table, to_json
from tether.bench.runner import MetricStats, Row, run_once
from tether.bench.scenarios import SCENARIOS, Run, plan, select

SUBSET = ["rt_mp_pipe", "rt_tether_sync", "ev_tether", "kill_to_peergone"]


@pytest.mark.timeout(200)
def test_quick_run_prints_table_and_writes_json_and_png(tmp_path: Path) -> None:
    out_json = tmp_path / "bench.json"
    out_png = tmp_path / "bench.png"
    cmd = [
        sys.executable,
        "-m",
        "tether.bench",
        "--quick",
        "--json",
        str(out_json),
        "--plot",
        str(out_png),
        "--only",
        ",".join(SUBSET),
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = proc.stdout.splitlines()
    for name in SUBSET:
        assert any(ln.startswith(name) for ln in lines), f"{name} missing from:\n{proc.stdout}"
    assert "machine:" in proc.stdout and "Python" in proc.stdout
    assert not any(s in proc.stdout for s in ("rt_zmq", "big_", "inflight_"))

    data = json.loads(out_json.read_text())
    assert data["settings"]["quick"] is True
    assert data["machine"]["cores"] >= 1
    results = {r["scenario"]: r for r in data["results"]}
    assert sorted(results) == sorted(SUBSET)
    for name, r in results.items():
        assert r["status"] == "ok", (name, r["reason"])
        for m in r["metrics"]:
            assert isinstance(m["median"], float) and m["median"] > 0, (name, m)
            assert m["n"] > 0
            if m["better"] == "lower":
                assert m["p99"] >= m["median"]

    # The ratio printed for tether is tether's median over the peer's, from this run.
    pipe = results["rt_mp_pipe"]["metrics"][0]["median"]
    sync = results["rt_tether_sync"]["metrics"][0]
    assert math.isclose(sync["ratios"]["mp_pipe"], sync["median"] / pipe)
    assert "zmq" not in sync["ratios"]  # pyzmq did not run: no ratio invented
    kill = results["kill_to_peergone"]["metrics"][0]
    assert kill["unit"] == "ms" and kill["targets"][0]["target"] == "<10"
    assert kill["targets"][0]["pass"] == (kill["median"] < 10)

    assert out_png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_unknown_scenario_is_a_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["--only", "rt_nope"])
    assert exc.value.code == 2
    assert "rt_nope" in capsys.readouterr().err


def test_select_accepts_globs_and_keeps_table_order() -> None:
    names = [s.name for s in select("rt_tether_*,rt_mp_pipe")]
    assert names == [
        "rt_mp_pipe",
        "rt_tether_async",
        "rt_tether_sync",
        "rt_tether_main_child",
        "rt_tether_spin",
    ]
    assert len(select(None)) == len(SCENARIOS)


def test_plan_runs_big_cases_per_size() -> None:
    big = [SCENARIOS["big_memcpy"]]
    assert [r.label for r in plan(big, quick=True)] == ["big_memcpy 64MiB"]
    full = plan(big, quick=False)
    assert [r.params["size"] for r in full] == [64 << 20, 256 << 20]
    assert all("cpus" not in r.params for r in full)
    pinned = plan([SCENARIOS["rt_mp_pipe"], *big], quick=True, cpus=[0])
    assert [r.params["cpus"] for r in pinned] == [[0], [0]]


def test_cpus_outside_the_affinity_mask_is_a_usage_error(
    capsys: pytest.CaptureFixture[str],
) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["--only", "rt_mp_pipe", "--cpus", "4096"])
    assert exc.value.code == 2
    assert "usable CPUs" in capsys.readouterr().err


def test_percentile_is_nearest_rank() -> None:
    s = [float(x) for x in range(1, 101)]
    assert percentile(s, 50) == 50.0
    assert percentile(s, 99) == 99.0
    assert percentile(s, 100) == 100.0
    assert percentile([7.0], 99) == 7.0
    assert math.isnan(percentile([], 50))


def _row(name: str, median: float, unit: str, metric: str, variant: str = "") -> Row:
    better = "lower" if unit in ("us", "ms") else "higher"
    p99 = median * 2 if better == "lower" else None
    m = MetricStats(metric, unit, better, median, p99, 10, [median])
    return Row(Run(SCENARIOS[name], variant), "ok", metrics=[m])


def test_compare_fills_ratios_and_targets() -> None:
    rows = [
        _row("rt_mp_pipe", 40.0, "us", "round trip"),
        _row("rt_zmq", 100.0, "us", "round trip"),
        _row("rt_tether_async", 30.0, "us", "round trip"),
        _row("ev_mp_pipe", 100e3, "/s", "events"),
        _row("ev_zmq", 700e3, "/s", "events"),
        _row("ev_tether", 400e3, "/s", "events"),
        _row("big_mp_pipe", 0.5, "GB/s", "transfer", "256MiB"),
        _row("big_memcpy", 10.0, "GB/s", "transfer", "256MiB"),
        _row("big_memcpy", 20.0, "GB/s", "transfer", "64MiB"),
        _row("big_tether_attach", 7.0, "GB/s", "transfer", "256MiB"),
        Row(Run(SCENARIOS["big_tether_buffer"], "256MiB"), "unavailable", "no Buffer"),
    ]
    compare(rows)
    rt = rows[2].metrics[0]
    assert rt.ratios == {"mp_pipe": 0.75, "zmq": 0.3}
    assert [t["pass"] for t in rt.targets] == [True, True]
    ev = rows[5].metrics[0]
    assert ev.ratios["mp_pipe"] == pytest.approx(4.0)
    assert {t["target"]: t["pass"] for t in ev.targets} == {">=1x zmq": False, ">=3x pipe": True}
    big = rows[9].metrics[0]
    # Compared with the memcpy of the same size only.
    assert big.ratios == {"mp_pipe": 14.0, "memcpy": 0.7}
    assert all(t["pass"] for t in big.targets)
    assert rows[0].metrics[0].ratios == {}  # peers get no ratios

    text = table(rows)
    assert "0.75x" in text and "0.30x" in text
    assert "MISS" in text and "PASS" in text
    assert "big_tether_buffer 256MiB  unavailable  no Buffer" in text
    data = to_json(rows, {"quick": False}, {"cpu": "x"})
    assert data["results"][10]["status"] == "unavailable"
    assert data["results"][2]["metrics"][0]["ratios"]["zmq"] == 0.3


def test_fmt_value_units() -> None:
    assert fmt_value(23.21, "us") == "23.2 us"
    assert fmt_value(712_345.0, "/s") == "712k/s"
    assert fmt_value(1_234_567.0, "/s") == "1.23M/s"
    assert fmt_value(1.334, "GB/s") == "1.33 GB/s"
    assert fmt_value(None, "us") == "-"


def test_plot_writes_png(tmp_path: Path) -> None:
    rows = [
        _row("rt_mp_pipe", 40.0, "us", "round trip"),
        _row("rt_tether_sync", 30.0, "us", "round trip"),
        _row("ev_tether", 400e3, "/s", "events"),
        _row("big_memcpy", 10.0, "GB/s", "transfer", "64MiB"),
        _row("kill_to_peergone", 2.0, "ms", "SIGKILL->PeerGone"),
    ]
    path = tmp_path / "chart.png"
    plot(rows, str(path), {"cpu": "test", "cores": 2, "python": "3", "loop": "uvloop"})
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.timeout(30)
def test_a_hung_case_is_killed_at_its_timeout() -> None:
    t0 = time.monotonic()
    result = run_once(Run(SCENARIOS["kill_to_peergone"], "", {"quick": False}), timeout=1.0)
    assert time.monotonic() - t0 < 10
    assert result == {"error": "timed out after 1 s"}
