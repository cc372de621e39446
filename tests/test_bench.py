"""Tests for ``tether bench``: a real quick run end to end, and the reporting logic."""

from __future__ import annotations

import json
import math
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tether.bench import main
from tether.bench.common import CpuMeter, percentile
from tether.bench.report import compare, fmt_value, plot, table, to_json
from tether.bench.runner import MIN_P99_SAMPLES, MetricStats, Row, _pool, run_once
from tether.bench.scenarios import SCENARIOS, TARGETS, Run, plan, select

SUBSET = ["rt_mp_pipe", "rt_tether_sync", "rt_tether_sync_nospin", "ev_tether", "kill_to_peergone"]


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
                assert m["max"] >= m["median"]
                # A p99 only where there are enough samples for one; else None, and "max" shown.
                assert (m["p99"] is None) == (m["n"] < MIN_P99_SAMPLES), (name, m["n"], m["p99"])
                if m["p99"] is not None:
                    assert m["median"] <= m["p99"] <= m["max"]
            if name != "kill_to_peergone":  # every round-trip and rate row has its CPU time
                assert 0 < m["cpu_pct"] < 100 * 64, (name, m)
                assert 0 < m["cpu_us_per_op"] < 1e6, (name, m)
    kill_row = results["kill_to_peergone"]["metrics"][0]
    assert kill_row["p99"] is None and kill_row["n"] < MIN_P99_SAMPLES
    assert f"max {fmt_value(kill_row['max'], 'ms')}" in proc.stdout
    header = lines[0]
    for column in ("p99 / max", "CPU", "CPU/op", "vs mp.Pipe"):
        assert column in header
    assert "vs shm reuse" not in header  # no row of this run has that ratio: no column

    # The ratio printed for tether is tether's median over the peer's, from this run.
    pipe = results["rt_mp_pipe"]["metrics"][0]["median"]
    sync = results["rt_tether_sync"]["metrics"][0]
    assert math.isclose(sync["ratios"]["mp_pipe"], sync["median"] / pipe)
    assert "zmq" not in sync["ratios"]  # pyzmq did not run: no ratio invented
    # The blocking client with and without its polling window, side by side.
    assert results["rt_tether_sync"]["info"]["spin_s"] == "adaptive"
    assert results["rt_tether_sync_nospin"]["info"]["spin_s"] == 0.0
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
        "rt_tether_sync_nospin",
        "rt_tether_main_child",
        "rt_tether_spin",
        "rt_tether_traced",
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


def test_plan_runs_transfers_both_ways() -> None:
    names = ["big_mp_pipe", "big_zmq", "big_shm", "big_shm_reuse", "big_tether_attach"]
    for name in names:
        runs = plan([SCENARIOS[name]], quick=True)
        assert [r.label for r in runs] == [f"{name} 64MiB m->c", f"{name} 64MiB c->m"]
        assert [r.params["direction"] for r in runs] == ["m2c", "c2m"]
    assert [r.label for r in plan([SCENARIOS["big_tether_buffer"]], quick=True)] == [
        "big_tether_buffer 64MiB m->c"
    ]
    assert SCENARIOS["big_shm_reuse"].peer == "shm_reuse"


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


def _row(
    name: str, median: float, unit: str, metric: str, variant: str = "", direction: str = ""
) -> Row:
    better = "lower" if unit in ("us", "ms") else "higher"
    p99 = median * 2 if better == "lower" else None
    m = MetricStats(metric, unit, better, median, p99, 10, [median])
    params: dict[str, object] = {}
    if variant:
        params["size"] = int(variant.split("MiB")[0]) << 20
    if direction:
        params["direction"] = direction
    label = f"{variant} {direction}".strip()
    return Row(Run(SCENARIOS[name], label, params), "ok", metrics=[m])


def test_compare_fills_ratios_and_targets() -> None:
    rows = [
        _row("rt_mp_pipe", 40.0, "us", "round trip"),
        _row("rt_zmq", 100.0, "us", "round trip"),
        _row("rt_tether_async", 30.0, "us", "round trip"),
        _row("ev_mp_pipe", 100e3, "/s", "events"),
        _row("ev_zmq", 700e3, "/s", "events"),
        _row("ev_tether", 400e3, "/s", "events"),
        _row("big_mp_pipe", 0.5, "GB/s", "transfer", "256MiB", "m2c"),
        _row("big_memcpy", 20.0, "GB/s", "transfer", "64MiB"),
        _row("big_memcpy", 10.0, "GB/s", "transfer", "256MiB"),
        _row("big_tether_attach", 7.0, "GB/s", "transfer", "256MiB", "m2c"),
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
    assert re.search(r"big_tether_buffer 256MiB +unavailable  no Buffer", text)
    assert "  max " not in text and "p99 80 us" in text  # every latency row here has a p99
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


def test_compare_matches_size_direction_and_metric() -> None:
    rows = [
        _row("big_shm_reuse", 8.0, "GB/s", "transfer", "64MiB", "m2c"),
        _row("big_shm_reuse", 4.0, "GB/s", "transfer", "64MiB", "c2m"),
        _row("big_shm_reuse", 16.0, "GB/s", "transfer", "256MiB", "c2m"),
        _row("big_memcpy", 10.0, "GB/s", "transfer", "64MiB"),
        _row("big_tether_attach", 2.0, "GB/s", "transfer", "64MiB", "c2m"),
        _row("big_tether_attach", 6.0, "GB/s", "transfer", "64MiB", "m2c"),
    ]
    cold_peer = rows[1].metrics
    cold_peer.append(MetricStats("cold transfer", "GB/s", "higher", 0.5, None, 1, [0.5]))
    rows[4].metrics.append(MetricStats("cold transfer", "GB/s", "higher", 0.25, None, 1, [0.25]))
    compare(rows)
    c2m, c2m_cold = rows[4].metrics
    assert c2m.ratios == {"shm_reuse": 0.5, "memcpy": 0.2}  # same size and direction only
    # each direction has its own targets: main copies out what a child lends
    assert [(t["target"], t["pass"]) for t in c2m.targets] == [(">=0.3x memcpy", False)]
    m2c = rows[5].metrics[0]
    assert [t["target"] for t in m2c.targets] == [">=0.6x memcpy", ">=8x pipe"]
    assert c2m_cold.ratios["shm_reuse"] == 0.5  # cold against cold, not against warm
    assert rows[5].metrics[0].ratios == {"shm_reuse": 0.75, "memcpy": 0.6}
    assert "vs shm reuse" in table(rows)


def test_pool_labels_few_samples_max_and_sums_cpu() -> None:
    few = {"metric": "handoff", "unit": "ms", "better": "lower", "samples": [1.0, 2.0, 9.0]}
    many = {
        "metric": "rt",
        "unit": "us",
        "better": "lower",
        "samples": [float(i) for i in range(1, 201)],
    }
    cpu1 = {"cpu_s": 0.5, "wall_s": 1.0, "ops": 1000}
    cpu2 = {"cpu_s": 1.5, "wall_s": 1.0, "ops": 1000}
    ev = [
        {"metric": "events", "unit": "/s", "better": "higher", "samples": [1.0], "cpu": cpu1},
        {"metric": "events", "unit": "/s", "better": "higher", "samples": [3.0], "cpu": cpu2},
    ]
    (f,) = _pool([{"metrics": [few]}])
    assert f.p99 is None and f.max == 9.0 and f.tail() == ("max", 9.0)
    (m,) = _pool([{"metrics": [many]}])
    assert m.p99 == 198.0 and m.max == 200.0 and m.tail() == ("p99", 198.0)
    (e,) = _pool([{"metrics": [ev[0]]}, {"metrics": [ev[1]]}])  # two repeats
    assert e.tail() is None
    assert e.cpu_pct == pytest.approx(100.0)  # 2 CPU s over 2 wall s
    assert e.cpu_us_per_op == pytest.approx(1000.0)  # 2 CPU s over 2000 events
    rows = [Row(Run(SCENARIOS["big_tether_buffer"], "64MiB m->c"), "ok", metrics=[f, e])]
    text = table(rows)
    assert "max 9 ms" in text and "100%" in text and "1 ms" in text


def test_cpu_meter_counts_a_peer_process() -> None:
    busy = subprocess.Popen(
        [sys.executable, "-c", "import time\nt = time.time() + 3\nwhile time.time() < t: pass"]
    )
    try:
        meter = CpuMeter(busy.pid)
        time.sleep(0.3)  # let it start
        meter.start()
        time.sleep(1.0)
        cpu = meter.stop(ops=10)
    finally:
        busy.kill()
        busy.wait(5)
    assert cpu["ops"] == 10 and 0.9 <= cpu["wall_s"] < 5
    # This process slept; the CPU time is the busy peer's (a loaded machine gives it less).
    assert 0.05 <= cpu["cpu_s"] <= 1.5, cpu


TINY = 1 << 20
NEW_TRANSFERS = [
    ("big_shm_reuse", "m2c"),
    ("big_shm_reuse", "c2m"),
    ("big_shm", "c2m"),
    ("big_mp_pipe", "c2m"),
    ("big_zmq", "c2m"),
    ("big_tether_attach", "c2m"),
    ("big_tether_attach", "m2c"),
    ("big_memcpy", ""),
]


@pytest.mark.timeout(60)
@pytest.mark.parametrize(("name", "direction"), NEW_TRANSFERS)
def test_transfer_cases_report_cold_warm_and_cpu(name: str, direction: str) -> None:
    params: dict[str, object] = {"quick": True, "size": TINY}
    if direction:
        params["direction"] = direction
    result = run_once(Run(SCENARIOS[name], "1MiB", params), timeout=45.0)
    assert "error" not in result and "unavailable" not in result, result
    metrics = {m["metric"]: m for m in result["metrics"]}
    assert set(metrics) == {"transfer", "cold transfer"}
    warm, cold = metrics["transfer"], metrics["cold transfer"]
    assert len(cold["samples"]) == 1 and 0 < cold["samples"][0] < 1000  # GB/s
    assert warm["samples"] and all(0 < s < 1000 for s in warm["samples"])
    cpu = warm["cpu"]
    assert cpu["ops"] == len(warm["samples"])
    assert 0 < cpu["wall_s"] < 30 and 0 <= cpu["cpu_s"] < 60
    assert "cpu" not in cold


@pytest.mark.timeout(90)
@pytest.mark.parametrize("name", ["stream_tether", "stream_zmq"])
def test_stream_cases_report_items_per_second(name: str) -> None:
    """Issue 11: stream items/s, tether's ``async for`` beside pyzmq PUSH/PULL."""
    result = run_once(Run(SCENARIOS[name], "", {"quick": True}), timeout=75.0)
    assert "error" not in result and "unavailable" not in result, result
    (m,) = result["metrics"]
    assert m["metric"] == "items" and m["unit"] == "/s"
    assert m["samples"] and all(s > 0 for s in m["samples"])
    assert m["cpu"]["ops"] > 0


def test_stream_rows_are_compared_with_zmq() -> None:
    rows = [_row("stream_zmq", 500e3, "/s", "items"), _row("stream_tether", 100e3, "/s", "items")]
    compare(rows)
    assert rows[1].metrics[0].ratios == {"zmq": pytest.approx(0.2)}
    assert rows[0].metrics[0].ratios == {}
    assert "0.20x" in table(rows)


@pytest.mark.timeout(300)
def test_pool_scenarios_side_by_side_and_what_a_killed_worker_does(tmp_path: Path) -> None:
    """tether.Pool beside ProcessPoolExecutor, loky and multiprocessing.Pool, in one quick run."""
    out_json = tmp_path / "pools.json"
    cmd = [sys.executable, "-m", "tether.bench", "--quick", "--json", str(out_json)]
    proc = subprocess.run([*cmd, "--only", "pool_*"], capture_output=True, text=True, timeout=280)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = {r["scenario"]: r for r in json.loads(out_json.read_text())["results"]}
    assert sorted(results) == [
        "pool_loky",
        "pool_mp",
        "pool_ppe",
        "pool_tether",
        "pool_tether_sync",
    ]
    got: dict[str, dict[str, float]] = {}
    for name, r in results.items():
        assert r["status"] == "ok", (name, r["reason"])
        got[name] = {m["metric"]: m["median"] for m in r["metrics"]}
        assert got[name]["small jobs"] > 0 and got[name]["4MiB array each way"] > 0
    # tether: the job the killed worker ran fails (none, if it was between jobs), every
    # other one returns, nothing hangs.
    for name in ("pool_tether", "pool_tether_sync"):
        failed = got[name]["kill: jobs failed"]
        assert failed <= 1 and got[name]["kill: jobs lost"] == 0
        assert results[name]["info"]["kill_returned"] == 200 - failed
    # ProcessPoolExecutor and loky fail every job still pending; multiprocessing.Pool
    # never answers the one the worker ran (a map over it would hang).
    for peer in ("pool_ppe", "pool_loky"):
        assert got[peer]["kill: jobs failed"] > 1 and got[peer]["kill: jobs lost"] == 0
    assert got["pool_mp"]["kill: jobs lost"] >= 1 and "kill: settled after" not in got["pool_mp"]
    assert results["pool_mp"]["info"]["kill_hung"] is True
    # ratios against the executors, like for like only (no ratio for the kill metrics)
    tether_row = {m["metric"]: m for m in results["pool_tether"]["metrics"]}
    small = tether_row["small jobs"]
    ppe_small = got["pool_ppe"]["small jobs"]
    assert math.isclose(small["ratios"]["ppe"], small["median"] / ppe_small)
    assert set(tether_row["4MiB array each way"]["ratios"]) == {"ppe", "loky"}
    assert tether_row["kill: jobs failed"]["ratios"] == {}
    header = proc.stdout.splitlines()[0]
    assert "vs PPE" in header and "vs loky" in header


@pytest.mark.timeout(90)
def test_cpu_rows_show_what_polling_costs_when_it_does_not_pay() -> None:
    """Issue 14: a caller of a 10 ms handler polls only now and then (adaptive polling backs
    off), and idle connections never poll; each row reports CPU % samples with a target."""
    for name in ("cpu_slow_handler", "cpu_slow_handler_sync"):
        slow = run_once(Run(SCENARIOS[name], "", {"quick": True}), timeout=75.0)
        assert "error" not in slow and "unavailable" not in slow, slow
        (m,) = slow["metrics"]
        assert (m["metric"], m["unit"], m["better"]) == ("caller CPU", "%", "lower")
        assert len(m["samples"]) == 10 and all(s >= 0 for s in m["samples"])
        assert slow["info"]["calls"] == 100
        # 3 echoes, then probes 1, 2, 4, ... 64 chances apart: at most 9 polls in 103 calls
        assert slow["info"]["polls"] <= 9, (name, slow["info"])
    idle = run_once(Run(SCENARIOS["cpu_idle"], "", {"quick": True}), timeout=75.0)
    assert "error" not in idle and "unavailable" not in idle, idle
    names = [(m["metric"], m["unit"]) for m in idle["metrics"]]
    assert names == [("idle CPU", "%"), ("no connection", "%"), ("idle CPU over floor", "%")]
    assert all(len(m["samples"]) == 4 for m in idle["metrics"])
    assert idle["info"]["connections"] == 10
    targets = {(t.scenario, t.metric): t.text() for t in TARGETS}
    assert targets[("cpu_slow_handler", "caller CPU")] == "<5"
    assert targets[("cpu_slow_handler_sync", "caller CPU")] == "<5"
    assert targets[("cpu_idle", "idle CPU over floor")] == "<1"
