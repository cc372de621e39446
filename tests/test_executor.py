"""The worker pool: ``tether.Pool`` and ``tether.sync.Pool`` (src/tether/executor.py).

Workers are tether children running module-level jobs from ``tests/_pool_jobs.py``.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import datetime
import functools
import itertools
import os
import signal
import subprocess
import sys
import textwrap
import time
import types
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import _pool_jobs as jobs
import tether
import tether.executor
from tether.executor import job_target

pytestmark = pytest.mark.timeout(120)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # a zombie is dead too
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


async def _until(cond: Any, timeout: float = 60.0) -> None:
    """Wait (bounded) until ``cond()`` is true."""
    loop = asyncio.get_running_loop()
    end = loop.time() + timeout
    while not cond():
        assert loop.time() < end, "condition not met in time"
        await asyncio.sleep(0.02)


# -- what can be sent -------------------------------------------------------------


def test_refuses_functions_a_worker_cannot_import() -> None:
    def nested(x: int) -> int:
        return x

    for fn, words in [
        (lambda x: x, "<lambda>"),
        (nested, "<locals>"),
        (functools.partial(jobs.add, 1), "no module-level name"),
        (jobs.Tools().method, "does not name it"),
        (42, "not int"),
    ]:
        with pytest.raises(TypeError, match=words):
            job_target(fn)
    assert job_target(jobs.square) == ("tether.pool.job", "_pool_jobs", "square")
    assert job_target(jobs.Tools.triple)[1:] == ("_pool_jobs", "Tools.triple")
    assert job_target(jobs.async_nap)[0] == "tether.pool.async-job"


def test_refuses_main_functions_of_an_interactive_session(monkeypatch: pytest.MonkeyPatch) -> None:
    repl = types.ModuleType("__main__")  # no __file__, no __spec__: python -c, the REPL

    def typed_in(x: int) -> int:
        return x

    typed_in.__module__ = "__main__"
    typed_in.__qualname__ = "typed_in"
    repl.typed_in = typed_in  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "__main__", repl)
    with pytest.raises(ValueError, match=r"interactive session.*put it in a module"):
        job_target(typed_in, "spawn")
    repl.__file__ = "<stdin>"  # python - < script.py
    with pytest.raises(ValueError, match=r"interactive session"):
        job_target(typed_in, "forkserver")
    assert job_target(typed_in, "fork")[1:] == ("__main__", "typed_in")
    with pytest.raises(ValueError):  # (not cached by the fork pool's check)
        job_target(typed_in, "spawn")


def test_constructor_checks_its_arguments() -> None:
    with pytest.raises(ValueError, match="workers must be at least 1"):
        tether.Pool(0)
    with pytest.raises(TypeError, match="workers must be an int"):
        tether.Pool("2")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="retries"):
        tether.Pool(1, retries=-1)
    with pytest.raises(ValueError, match="timeout must be > 0"):
        tether.Pool(1, timeout=0)
    with pytest.raises(TypeError, match="timeout must be a number"):
        tether.Pool(1, timeout="5")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="start_method"):
        tether.Pool(1, start_method="thread")
    with pytest.raises(ValueError, match="workers must be at least 1"):
        tether.sync.Pool(0)


def test_a_function_of_the_main_script_runs_in_a_spawned_worker(
    tmp_path: Path, child_env: dict[str, str]
) -> None:
    # spawn runs the script again in the worker (as __mp_main__), so its functions import.
    script = tmp_path / "app.py"
    script.write_text(
        textwrap.dedent(
            """
            import asyncio, tether

            def cube(x: int) -> int:
                return x ** 3

            async def main() -> None:
                async with tether.Pool(workers=1) as pool:
                    print(await pool.submit(cube, 3), [r async for r in pool.map(cube, [1, 2])])

            if __name__ == "__main__":
                asyncio.run(main())
            """
        )
    )
    out = subprocess.run(
        [sys.executable, str(script)], env=child_env, capture_output=True, text=True, timeout=90
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "27 [1, 8]"


# -- the asyncio pool -------------------------------------------------------------------


async def test_submit_and_map_in_input_order() -> None:
    async with tether.Pool(workers=2) as pool:
        assert await pool.submit(jobs.add, 2, 3) == 5
        assert await pool.submit(jobs.Tools.triple, 3) == 9
        assert [r async for r in pool.map(jobs.square, range(20))] == [x * x for x in range(20)]
        # later inputs that finish first still come out in input order
        naps = [0.3, 0.0, 0.1, 0.0]
        got = [r async for r in pool.map(jobs.nap, naps, range(4))]
        assert got == [0, 1, 2, 3]
        results = await asyncio.gather(*(pool.submit(jobs.square, x) for x in range(10)))
        assert results == [x * x for x in range(10)]
        assert len(pool.pids) == 2 and os.getpid() not in pool.pids


async def test_map_bounds_work_in_flight(tmp_path: Path) -> None:
    log = str(tmp_path / "log")
    pulled = 0

    def numbers() -> Iterator[int]:  # lazily read: counts what the pool took
        nonlocal pulled
        for i in range(30):
            pulled += 1
            yield i

    out = []
    ahead = 0
    async with tether.Pool(workers=2) as pool:
        async for r in pool.map(
            jobs.logged, itertools.repeat(log), numbers(), itertools.repeat(0.02)
        ):
            out.append(r)
            ahead = max(ahead, pulled - len(out))
    assert out == list(range(30))
    assert 1 <= ahead <= 2 * 2  # never more than workers * 2 read ahead of the consumer
    running = peak = 0
    for line in Path(log).read_text().split():
        running += 1 if line == "s" else -1
        peak = max(peak, running)
    assert peak == 2  # jobs started but unfinished: one per worker, never more


async def test_a_job_that_raises_is_a_remote_error() -> None:
    async with tether.Pool(workers=1) as pool:
        with pytest.raises(tether.RemoteError) as info:
            await pool.submit(jobs.fail, "boom")
        assert info.value.type_name == "ValueError"
        assert "boom" in str(info.value)
        assert "def fail" in info.value.remote_traceback or "fail" in info.value.remote_traceback
        assert await pool.submit(jobs.square, 4) == 16  # the worker is still serving
        with pytest.raises(tether.RemoteError, match="returned an awaitable: declare it async def"):
            await pool.submit(jobs.returns_coroutine)
        assert await pool.submit(jobs.async_square, 5) == 25
        with pytest.raises(tether.RemoteError, match="ValueError"):
            async for _ in pool.map(jobs.fail, ["a", "b"]):
                pass


async def test_a_job_raising_system_exit_fails_only_itself() -> None:
    # sys.exit() or KeyboardInterrupt in a job is that job's error; the worker
    # lives on, so the next (innocent) job sent to it succeeds, every time.
    async with tether.Pool(workers=2) as pool:
        workers = set(pool.pids)
        for i in range(12):
            with pytest.raises(tether.RemoteError) as info:
                await pool.submit(jobs.exits, 3)
            assert info.value.type_name == "SystemExit"
            assert info.value.remote_message == "3"
            assert "sys.exit(code)" in info.value.remote_traceback
            assert await pool.submit(jobs.square, i) == i * i
            with pytest.raises(tether.RemoteError, match="KeyboardInterrupt: pressed"):
                await pool.submit(jobs.interrupted)
            with pytest.raises(tether.RemoteError, match="SystemExit: 4"):
                await pool.submit(jobs.async_exits, 4)
            assert await pool.submit(jobs.square, i) == i * i
        assert set(pool.pids) == workers  # no worker died


async def test_a_killed_worker_fails_only_its_job_and_is_replaced() -> None:
    async with tether.Pool(workers=2) as pool:
        before = set(pool.pids)
        with pytest.raises(tether.PeerGone, match="SIGKILL") as info:
            await pool.submit(jobs.die)
        assert info.value.exitcode == -signal.SIGKILL
        assert "_pool_jobs.die()" in str(info.value)
        assert await pool.submit(jobs.square, 5) == 25
        await _until(lambda: len(pool.pids) == 2)  # replaced at once, not at the next job
        assert set(pool.pids) != before
        with pytest.raises(tether.PeerGone, match="SIGTERM"):
            await pool.submit(jobs.die, signal.SIGTERM)


async def test_a_worker_killed_while_idle_is_replaced_at_once() -> None:
    async with tether.Pool(workers=1) as pool:
        (victim,) = pool.pids
        os.kill(victim, signal.SIGKILL)
        await _until(lambda: len(pool.pids) == 1 and victim not in pool.pids)
        assert await pool.submit(jobs.pid) == pool.pids[0]  # no job paid for it


async def test_workers_that_keep_dying_are_replaced_ever_more_slowly(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(tether.executor, "worker", jobs.short_lived_worker)
    pool = tether.Pool(workers=1, start_method="fork")  # (fast: without back-off, dozens)
    spawned = 0
    real_spawn = pool._main.spawn

    async def counting_spawn(*args: Any, **kw: Any) -> Any:
        nonlocal spawned
        spawned += 1
        return await real_spawn(*args, **kw)

    monkeypatch.setattr(pool._main, "spawn", counting_spawn)
    async with pool:
        await asyncio.sleep(3.0)
    # back-off 0, 0.05, 0.1, 0.2, 0.4, 0.8, 1.6 s (+ start-up): a handful, not dozens
    assert 3 <= spawned <= 10


def _kill_starting_children(
    pool: tether.Pool, kills: int, monkeypatch: pytest.MonkeyPatch
) -> list[int]:
    """Make the next ``kills`` worker starts fail for real: SIGKILL each process as it starts."""
    psutil = pytest.importorskip("psutil")
    me = psutil.Process()
    real_spawn = pool._main.spawn
    killed: list[int] = []

    async def killing_spawn(*args: Any, **kw: Any) -> Any:
        if len(killed) >= kills:
            return await real_spawn(*args, **kw)
        before = {p.pid for p in me.children()}
        starting = asyncio.ensure_future(real_spawn(*args, **kw))
        for _ in range(3000):  # (bounded: 30 s)
            new = [p.pid for p in me.children() if p.pid not in before and p.pid not in killed]
            if new or starting.done():
                break
            await asyncio.sleep(0.01)
        if new:  # (one: two slots may be starting one each)
            killed.append(new[0])
            os.kill(new[0], signal.SIGKILL)
        return await starting

    monkeypatch.setattr(pool._main, "spawn", killing_spawn)
    return killed


@pytest.mark.parametrize("workers", [1, 2])
async def test_a_worker_killed_while_starting_is_started_again(
    workers: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Kill the worker, then its replacements while they start: the pool keeps
    # trying (with back-off) and later jobs succeed; none fails for it.
    async with tether.Pool(workers=workers) as pool:
        killed = _kill_starting_children(pool, 3, monkeypatch)
        first = pool.pids
        for pid in first:
            os.kill(pid, signal.SIGKILL)
        await _until(lambda: not set(pool.pids) & set(first))  # (a job sent first would fail)
        waiting = [pool.submit(jobs.square, i) for i in range(4)]
        assert await asyncio.wait_for(asyncio.gather(*waiting), 60) == [0, 1, 4, 9]
        assert len(killed) >= 3
        await _until(lambda: len(pool.pids) == workers)
        assert not set(pool.pids) & set(first)
        assert [await pool.submit(jobs.square, 5) for _ in range(3)] == [25] * 3


async def test_a_pool_whose_workers_never_start_gives_up(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(tether.Pool, "start_attempts", 3)
    async with tether.Pool(workers=2) as pool:
        killed = _kill_starting_children(pool, 1000, monkeypatch)
        first = pool.pids
        for pid in first:
            os.kill(pid, signal.SIGKILL)
        await _until(lambda: not set(pool.pids) & set(first))
        waiting = pool.submit(jobs.square, 3)
        with pytest.raises(tether.PeerGone, match="the pool cannot start workers"):
            await asyncio.wait_for(waiting, 60)  # bounded: not left waiting forever
        assert len(killed) >= 3
        with pytest.raises(tether.PeerGone, match="the pool cannot start workers"):
            await pool.submit(jobs.square, 3)


async def test_kill_9_during_a_map_of_many_jobs_loses_no_job() -> None:
    async with tether.Pool(workers=2) as pool:
        futures = [pool.submit(jobs.nap, 0.01, i) for i in range(200)]
        while sum(f.done() for f in futures) < 20:
            await asyncio.sleep(0.01)
        victim = pool.pids[0]
        os.kill(victim, signal.SIGKILL)
        done, _ = await asyncio.wait(futures, timeout=90)
        assert len(done) == 200  # every job returned or raised
        lost = [f.exception() for f in futures if f.exception() is not None]
        assert all(isinstance(e, tether.PeerGone) and "SIGKILL" in str(e) for e in lost), lost
        assert len(lost) <= 1  # only the job the victim was running (if it was running one)
        assert sorted(f.result() for f in futures if f.exception() is None) == sorted(
            i for i, f in enumerate(futures) if f.exception() is None
        )
        assert victim not in pool.pids
        assert [r async for r in pool.map(jobs.square, range(5))] == [0, 1, 4, 9, 16]
        await _until(lambda: len(pool.pids) == 2)


async def test_retries_1_runs_a_job_again_once_when_its_worker_dies(tmp_path: Path) -> None:
    marker = str(tmp_path / "tries")
    async with tether.Pool(workers=1, retries=1) as pool:
        assert await pool.submit(jobs.die_once, marker) == "second try"
        first, second = Path(marker).read_text().split()
        assert first != second  # on a fresh worker
        with pytest.raises(tether.PeerGone, match="SIGKILL"):
            await pool.submit(jobs.die)  # dies twice: no third run
        with pytest.raises(tether.RemoteError):
            await pool.submit(jobs.fail, "x")  # an error is never retried
    async with tether.Pool(workers=1) as pool:  # retries=0: the first death fails it
        with pytest.raises(tether.PeerGone):
            await pool.submit(jobs.die_once, str(tmp_path / "other"))


async def test_timeout_cancels_an_async_job_and_keeps_its_worker(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(tether.Pool, "cancel_grace", 5.0)
    async with tether.Pool(workers=1, timeout=0.3) as pool:
        (pid,) = pool.pids
        with pytest.raises(tether.InvokeTimeout):
            await pool.submit(jobs.async_nap, 30)
        assert await pool.submit(jobs.pid) == pid  # the cancel reached it: same worker
        assert await pool.submit(jobs.nap, 0.01, "quick", timeout=None) == "quick"
        # the timeout counts while the job runs, not while it waits for a worker
        first = pool.submit(jobs.nap, 0.6, "first", timeout=None)
        assert await pool.submit(jobs.square, 3) == 9  # waited ~0.6 s, ran at once
        assert first.result() == "first"


async def test_timeout_of_a_plain_function_kills_and_replaces_its_worker(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(tether.Pool, "cancel_grace", 0.3)
    async with tether.Pool(workers=1) as pool:
        (pid,) = pool.pids
        with pytest.raises(
            tether.InvokeTimeout, match=r"_pool_jobs.nap\(\) did not finish within 0.3 s"
        ):
            await pool.submit(jobs.nap, 30, timeout=0.3)
        new = await pool.submit(jobs.pid)  # queued behind it: runs on a fresh worker
        assert new != pid and not _alive(pid)
        # a plain function that finishes within the grace keeps its worker
        with pytest.raises(tether.InvokeTimeout):
            await pool.submit(jobs.nap, 0.4, timeout=0.2)
        assert await pool.submit(jobs.pid) == new


async def test_cancelling_a_job_future_cancels_the_job() -> None:
    async with tether.Pool(workers=1) as pool:
        (pid,) = pool.pids
        fut = pool.submit(jobs.async_nap, 30)
        queued = pool.submit(jobs.square, 3)
        await asyncio.sleep(0.3)
        fut.cancel()
        assert await asyncio.wait_for(queued, 15) == 9  # not after the 30 s nap
        assert pool.pids == [pid]


async def test_close_waits_for_submitted_jobs_and_refuses_new_ones() -> None:
    pool = tether.Pool(workers=2)
    futures = [pool.submit(jobs.nap, 0.1, i) for i in range(6)]  # starts the pool
    await pool.start()
    pids = pool.pids
    await pool.close()
    assert [f.result() for f in futures] == list(range(6))
    assert pool.closed and pool.pids == []
    assert not any(_alive(p) for p in pids)
    with pytest.raises(tether.ConnectionClosed, match="closed"):
        pool.submit(jobs.square, 1)
    with pytest.raises(tether.ConnectionClosed):
        pool.map(jobs.square, [1])
    await pool.close()  # twice is fine


async def test_terminate_kills_workers_and_fails_unfinished_jobs() -> None:
    async with tether.Pool(workers=2) as pool:
        pids = pool.pids
        futures = [pool.submit(jobs.nap, 30, i) for i in range(5)]
        await asyncio.sleep(0.3)
        await pool.terminate()
    for f in futures:
        with pytest.raises(tether.ConnectionClosed, match="terminated"):
            f.result()
    assert not any(_alive(p) for p in pids)
    with pytest.raises(tether.ConnectionClosed):
        pool.submit(jobs.square, 1)


async def test_an_exception_in_the_with_block_terminates() -> None:
    with pytest.raises(KeyError):
        async with tether.Pool(workers=1) as pool:
            fut = pool.submit(jobs.nap, 30)
            raise KeyError("leaving")
    with pytest.raises(tether.ConnectionClosed, match="terminated"):
        fut.result()


async def test_arrays_travel_through_shared_memory_both_ways() -> None:
    a = np.arange(1 << 20, dtype=np.float32)  # 4 MiB
    async with tether.Pool(workers=1) as pool:
        doubled, kind, writeable = await pool.submit(jobs.double, a)
    assert kind == "ndarray" and not writeable  # the worker maps main's pages read-only
    assert isinstance(doubled, np.ndarray) and np.array_equal(doubled, a * 2)
    assert not doubled.flags.writeable  # a sealed memfd from the worker, not a socket copy


async def test_a_buffer_is_moved_to_the_worker() -> None:
    buf = tether.Buffer(1 << 20)
    buf.view()[:] = b"\x01" * (1 << 20)
    async with tether.Pool(workers=1) as pool:
        first = pool.submit(jobs.nap, 0.3)
        job = pool.submit(jobs.checksum, buf)  # queued behind it: given away already
        with pytest.raises(tether.ConsumedError):
            buf.view()
        total, kind = await job
        await first
    assert total == 1 << 20 and kind in ("memoryview", "ndarray")
    with tether.sync.Pool(workers=1) as spool:
        buf = tether.Buffer(4096)
        buf.view()[:] = b"\x02" * 4096
        fut = spool.submit(jobs.checksum, buf)
        assert buf.consumed
        assert fut.result(timeout=30)[0] == 2 * 4096


# -- types: the job's own hints decide, as for a handler ------------------------------

KINDS_ARGS = ({1, 2}, (1, 2), jobs.Point(1, 2), datetime.date(2026, 1, 1), b"z" * 100_000)


async def test_arguments_arrive_as_the_job_hints_say() -> None:
    async with tether.Pool(workers=1) as pool:
        assert await pool.submit(jobs.kinds, *KINDS_ARGS) == "set tuple Point date bytes"
        assert await pool.submit(jobs.async_kinds, *KINDS_ARGS[:4]) == "set tuple Point date"
        small = await pool.submit(jobs.kinds, *KINDS_ARGS[:4], b"z" * 10)
        assert small == "set tuple Point date bytes"


async def test_results_arrive_as_the_return_hint_says() -> None:
    async with tether.Pool(workers=1) as pool:
        assert await pool.submit(jobs.point, 1, 2) == jobs.Point(1, 2)
        for n in (10, 100_000):  # inline and through shared memory alike
            got = await pool.submit(jobs.blob, n)
            assert type(got) is bytes and got == b"z" * n
        assert await pool.submit(jobs.digits, 3) == {0, 1, 2}
        assert [r async for r in pool.map(jobs.pair, [1, 3], [2, 3])] == [{1, 2}, {3}]
        # a result that does not match its own hint is refused, naming the hint
        with pytest.raises(tether.BadRequest, match="result does not match int"):
            await pool.submit(jobs.liar)


async def test_result_type_overrides_the_return_hint() -> None:
    async with tether.Pool(workers=1) as pool:
        assert await pool.submit(jobs.echo, [1, 2]) == [1, 2]  # -> Any: as decoded
        got = await pool.submit(jobs.echo, [1, 2], result_type=tuple[int, int])
        assert got == (1, 2) and type(got) is tuple
        view = await pool.submit(jobs.blob, 100_000, result_type=memoryview)
        assert type(view) is memoryview and bytes(view) == b"z" * 100_000
        assert await pool.submit(jobs.point, 1, 2, result_type=Any) == {"x": 1, "y": 2}
        out = [r async for r in pool.map(jobs.echo, [[1], [2]], result_type=set[int])]
        assert out == [{1}, {2}]
        with pytest.raises(
            tether.BadRequest, match=r"result\[0\] does not match set\[str\]: expected str, got int"
        ):
            await pool.submit(jobs.echo, [1], result_type=set[str])
        with pytest.raises(TypeError, match="result_type"):
            pool.submit(jobs.echo, 1, result_type=42)
        with pytest.raises(TypeError, match="result_type"):
            pool.map(jobs.echo, [1], result_type=42)


async def test_a_wrong_argument_is_a_bad_request_naming_it() -> None:
    async with tether.Pool(workers=1) as pool:
        with pytest.raises(
            tether.BadRequest, match=r"^add\(\) argument 'b': expected int, got str$"
        ):
            await pool.submit(jobs.add, 1, "x")
        # Arguments that do not fit the signature are refused at submit, as spawn does.
        with pytest.raises(
            TypeError, match=r"^_pool_jobs\.add\(\): missing a required argument: 'b'"
        ):
            pool.submit(jobs.add, 1)
        with pytest.raises(TypeError, match=r"_pool_jobs\.square\(\): too many positional"):
            pool.submit(jobs.square, 1, 2)
        with pytest.raises(TypeError, match=r"_pool_jobs\.add\(\): missing"):
            async for _ in pool.map(jobs.add, [1, 2]):
                pass
        with pytest.raises(
            tether.BadRequest, match=r"async_kinds\(\) argument 'p.y': expected int, got str"
        ):
            await pool.submit(jobs.async_kinds, {1}, (1, 2), {"x": 1, "y": "2"}, "2026-01-01")
        with pytest.raises(
            tether.BadRequest, match=r"kinds\(\) argument 'b': expected bytes, got str"
        ):
            await pool.submit(jobs.kinds, *KINDS_ARGS[:4], "not bytes")
        assert await pool.submit(jobs.add, 1, 2) == 3  # the worker goes on


def test_the_worker_reads_a_job_body_as_msgpack_would() -> None:
    from tether.codec import encoder
    from tether.executor import _Jobs

    decoder = _Jobs()
    long_name = "a_job_whose_name_is_longer_than_thirty_one_characters"  # str8, not fixstr
    for body, fn, args in [
        (("_pool_jobs", "add", 1, 2), jobs.add, (1, 2)),
        (("_pool_jobs", long_name, 5), getattr(jobs, long_name), (5,)),
        (("builtins", "max", *range(20)), max, tuple(range(20))),  # 16+ items: a longer header
        (("builtins", "max", *range(70_000)), max, tuple(range(70_000))),
    ]:
        data = encoder.encode(body)
        for raw in (data, memoryview(bytearray(data))):  # (frames hand bodies over as views)
            got_fn, got_args = decoder.decode(raw)
            assert got_fn is fn and tuple(got_args) == args
    for bad in [b"", b"\x01", b"\x91\xa1x", b"\x92\xa5ab", b"\x92\xa1\xff\xa1x", b"\x92\x01\xa1x"]:
        with pytest.raises(tether.BadRequest, match="malformed job"):
            decoder.decode(bad)


async def test_a_function_its_worker_cannot_import_is_a_remote_error(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    ghost = types.ModuleType("_pool_ghost")  # in main's sys.modules only

    def vanish(x: int) -> int:
        return x

    vanish.__module__, vanish.__qualname__ = "_pool_ghost", "vanish"
    ghost.vanish = vanish  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "_pool_ghost", ghost)
    async with tether.Pool(workers=1) as pool:
        with pytest.raises(tether.RemoteError, match=r"ModuleNotFoundError.*_pool_ghost"):
            await pool.submit(vanish, 1)
        assert await pool.submit(jobs.add, 1, 2) == 3


def test_sync_pool_types_follow_the_hints() -> None:
    with tether.sync.Pool(workers=1) as pool:
        assert pool.submit(jobs.kinds, *KINDS_ARGS).result(30) == "set tuple Point date bytes"
        assert pool.submit(jobs.point, 1, 2).result(30) == jobs.Point(1, 2)
        assert type(pool.submit(jobs.blob, 100_000).result(30)) is bytes
        assert pool.submit(jobs.digits, 2).result(30) == {0, 1}
        assert pool.submit(jobs.echo, [1], result_type=tuple[int]).result(30) == (1,)
        assert list(pool.map(jobs.echo, [[1]], result_type=set[int])) == [{1}]
        with pytest.raises(tether.BadRequest, match=r"add\(\) argument 'b': expected int, got str"):
            pool.submit(jobs.add, 1, "x").result(30)
        with pytest.raises(TypeError, match="result_type"):
            pool.submit(jobs.echo, 1, result_type=42)


# -- the blocking pool ---------------------------------------------------------------


def test_sync_pool_submit_map_errors_close() -> None:
    with tether.sync.Pool(workers=2) as pool:
        fut = pool.submit(jobs.add, 1, 2)
        assert isinstance(fut, concurrent.futures.Future) and fut.result(timeout=30) == 3
        assert list(pool.map(jobs.square, range(20))) == [x * x for x in range(20)]
        assert list(pool.map(jobs.nap, [0.3, 0.0, 0.1], "abc")) == ["a", "b", "c"]
        with pytest.raises(tether.RemoteError, match="ValueError"):
            pool.submit(jobs.fail, "no").result(timeout=30)
        with pytest.raises(TypeError, match="<lambda>"):
            pool.submit(lambda: 1)
        with pytest.raises(TypeError, match=r"_pool_jobs\.add\(\): missing a required argument"):
            pool.submit(jobs.add, 1)
        a = np.ones(1 << 20, dtype=np.float32)
        doubled, kind, _ = pool.submit(jobs.double, a).result(timeout=30)
        assert kind == "ndarray" and np.array_equal(doubled, a * 2)
        slow = [pool.submit(jobs.nap, 0.1, i) for i in range(4)]
    assert [f.result(timeout=0) for f in slow] == list(range(4))  # close waited for them
    with pytest.raises(tether.ConnectionClosed):
        pool.submit(jobs.square, 1)
    pool.close()


def test_sync_pool_survives_a_killed_worker(tmp_path: Path) -> None:
    with tether.sync.Pool(workers=2) as pool:
        futures = [pool.submit(jobs.nap, 0.01, i) for i in range(100)]
        concurrent.futures.wait(futures[:10], timeout=60)
        victim = pool.pids[0]
        os.kill(victim, signal.SIGKILL)
        done, _ = concurrent.futures.wait(futures, timeout=90)
        assert len(done) == 100
        lost = [f.exception() for f in futures if f.exception() is not None]
        assert len(lost) <= 1 and all(isinstance(e, tether.PeerGone) for e in lost)
        with pytest.raises(tether.PeerGone, match="SIGKILL"):
            pool.submit(jobs.die).result(timeout=60)
        assert pool.submit(jobs.square, 7).result(timeout=60) == 49
        end = time.monotonic() + 60
        while len(pool.pids) != 2:  # the dead ones are replaced
            assert time.monotonic() < end
            time.sleep(0.02)
        assert victim not in pool.pids
    with tether.sync.Pool(workers=1, retries=1) as pool:
        assert pool.submit(jobs.die_once, str(tmp_path / "m")).result(timeout=60) == "second try"


def test_sync_pool_timeout_and_terminate(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(tether.Pool, "cancel_grace", 0.3)
    pool = tether.sync.Pool(workers=1, timeout=0.3)
    with pytest.raises(tether.InvokeTimeout):
        pool.submit(jobs.nap, 30).result(timeout=30)
    assert pool.submit(jobs.square, 2, timeout=10).result(timeout=30) == 4
    running = pool.submit(jobs.async_nap, 30, timeout=None)
    queued = pool.submit(jobs.square, 3)
    time.sleep(0.3)
    assert running.cancel()  # reaches the job in its worker: the next one runs at once
    assert queued.result(timeout=15) == 9
    pids = pool.pids
    futures = [pool.submit(jobs.nap, 30, timeout=None) for _ in range(3)]
    pool.terminate()
    for f in futures:
        with pytest.raises(tether.ConnectionClosed, match="terminated"):
            f.result(timeout=0)
    assert not any(_alive(p) for p in pids)
    pool.terminate()  # twice is fine
    assert pool.pids == [] and pool.closed


_UNCLOSED = """
import os, signal, sys, time
import tether.sync
import _pool_jobs as jobs

if __name__ == "__main__":
    pool = tether.sync.Pool(workers=2)
    print(*pool.pids, flush=True)
    if sys.argv[1] == "sigint":  # Ctrl-C while a job runs
        pool.submit(jobs.nap, 60)
        time.sleep(0.3)
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(30)
    print(pool.submit(jobs.square, 7).result(timeout=30), flush=True)
"""


@pytest.mark.parametrize("how", ["exit", "sigint"])
def test_a_sync_pool_left_open_at_exit_ends_quietly(
    how: str, tmp_path: Path, child_env: dict[str, str]
) -> None:
    # Never closed (or interrupted mid-job): terminated at exit, with nothing on
    # stderr but the script's own KeyboardInterrupt, and no worker left behind.
    script = tmp_path / "unclosed.py"
    script.write_text(_UNCLOSED)
    for _ in range(3):  # (the noise came from a race: 0 to 3 tracebacks a run)
        out = subprocess.run(
            [sys.executable, str(script), how],
            env=child_env,
            capture_output=True,
            text=True,
            timeout=90,
        )
        pids = [int(p) for p in out.stdout.split()[:2]]
        if how == "exit":
            assert out.returncode == 0 and out.stdout.split()[2:] == ["49"], out.stderr
            assert out.stderr == ""
        else:
            assert out.returncode != 0
            assert out.stderr.count("Traceback") == 1, out.stderr
            assert out.stderr.rstrip().endswith("KeyboardInterrupt"), out.stderr
        assert "Exception ignored" not in out.stderr and "EOFError" not in out.stderr
        for pid in pids:
            for _ in range(500):  # (bounded: 10 s)
                if not _alive(pid):
                    break
                time.sleep(0.02)
            assert not _alive(pid)
