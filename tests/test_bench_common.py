"""The helpers the bench's cases share: a server process, and the rate loop."""

from __future__ import annotations

import asyncio
import multiprocessing
import signal
import time
from typing import Any

import pytest

from tether.bench.common import CpuMeter, ServerProcess, batch_rate, rate_loop, rate_loop_async

pytestmark = pytest.mark.timeout(60)


def _never_ready(ready: Any, parent_pid: int) -> None:
    time.sleep(30)


def _ready(ready: Any, parent_pid: int) -> None:
    ready.set()
    time.sleep(30)


def test_a_server_that_never_gets_ready_is_ended_and_named() -> None:
    with pytest.raises(TimeoutError, match="the test server did not start within 1 s"):
        ServerProcess(_never_ready, what="test server", timeout=1.0)
    assert not [p for p in multiprocessing.active_children() if p.is_alive()]


def test_a_server_runs_for_the_with_block_and_is_terminated_after() -> None:
    with ServerProcess(_ready, what="test server", timeout=30.0) as server:
        assert server.proc.is_alive()
    assert server.proc.exitcode == -signal.SIGTERM
    server.stop()  # a second stop is harmless


def test_rate_loop_warms_up_then_times_batches_within_its_time_cap() -> None:
    calls: list[int] = []

    def batch(count: int) -> float:
        calls.append(count)
        return float(count)

    rates, cpu = rate_loop(batch, 100, 3, 60.0, CpuMeter())
    assert calls == [10, 100, 100, 100]  # one warm-up batch of n // 10, not timed
    assert rates == [100.0, 100.0, 100.0] and cpu["ops"] == 300
    calls.clear()
    rates, cpu = rate_loop(batch, 100, 5, 0.0, CpuMeter())  # the cap has passed after one
    assert calls == [10, 100] and rates == [100.0] and cpu["ops"] == 100


def test_rate_loop_async_does_the_same_for_a_coroutine() -> None:
    calls: list[int] = []

    async def batch(count: int) -> float:
        calls.append(count)
        return 2.0 * count

    rates, cpu = asyncio.run(rate_loop_async(batch, 50, 2, 60.0, CpuMeter()))
    assert calls == [5, 50, 50] and rates == [100.0, 100.0] and cpu["ops"] == 100


def test_batch_rate_is_count_per_second_and_checks_the_count() -> None:
    t0 = time.perf_counter() - 0.5
    assert 0 < batch_rate(100, 100, t0, "items") <= 200.0  # at least half a second ago
    with pytest.raises(RuntimeError, match="got 99 events, expected 100"):
        batch_rate(100, 99, t0, "events")
