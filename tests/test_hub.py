"""A whole program's main: tether.run, serve_forever, broadcast, on_child_exit."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
from typing import Any

import psutil
import pytest

import _hub_targets
import tether
from tether.aio import runner

pytestmark = pytest.mark.timeout(120)


# -- tether.run -------------------------------------------------------------------


def test_run_returns_the_result_on_uvloop() -> None:
    async def amain(x: int) -> tuple[int, str]:
        return 2 * x, type(asyncio.get_running_loop()).__module__

    result, loop_module = tether.run(amain(21))
    assert result == 42
    assert loop_module.startswith("uvloop")


def test_run_on_asyncio_when_asked(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TETHER_LOOP", "asyncio")

    async def amain() -> str:
        return type(asyncio.get_running_loop()).__module__

    assert tether.run(amain()).startswith("asyncio")


def test_run_refuses_a_function_and_says_to_call_it() -> None:
    async def amain() -> None: ...

    with pytest.raises(TypeError, match=r"tether.run\(amain\(\)\)"):
        tether.run(amain)  # type: ignore[arg-type]


def _start(mode: str, env: dict[str, str]) -> tuple[subprocess.Popen[str], int]:
    proc = subprocess.Popen(
        [sys.executable, "-c", f"import _hub_targets; _hub_targets.main_script({mode!r})"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    assert proc.stdout is not None
    first = proc.stdout.readline()
    assert first.startswith("child "), first + proc.stderr.read() if proc.stderr else ""
    assert proc.stdout.readline() == "ready\n"
    return proc, int(first.split()[1])


def _gone(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def _wait_gone(pid: int, timeout: float = 10.0) -> bool:
    try:
        psutil.Process(pid).wait(timeout)
    except psutil.NoSuchProcess:
        return True
    except psutil.TimeoutExpired:
        return _gone(pid)
    return True


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_serve_forever_ends_cleanly_on_a_signal(sig: signal.Signals, child_env: Any) -> None:
    proc, child_pid = _start("serve", child_env)
    proc.send_signal(sig)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    lines = out.splitlines()
    assert f"stopped by {sig.name}" in lines
    assert "child exit 0" in lines  # it got main's goodbye and returned: not killed
    assert "socket gone True" in lines  # the listener removed its socket file
    assert "Traceback" not in err
    assert _wait_gone(child_pid)


@pytest.mark.parametrize(
    ("sig", "status"),
    [(signal.SIGINT, runner.EXIT_INTERRUPTED), (signal.SIGTERM, runner.EXIT_TERMINATED)],
)
def test_run_ends_quietly_on_ctrl_c_or_sigterm_closing_the_children(
    sig: signal.Signals, status: int, child_env: Any
) -> None:
    proc, child_pid = _start("sleep", child_env)
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == status == 128 + sig
    assert "Traceback" not in err, err
    assert _wait_gone(child_pid)


async def test_serve_forever_returns_none_when_main_is_closed() -> None:
    before = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    async with tether.Main() as main:
        serving = asyncio.ensure_future(main.serve_forever())
        await asyncio.sleep(0.05)
        assert not serving.done()
        await main.close()
        assert await asyncio.wait_for(serving, 10) is None
    # its signal handlers are gone again: the previous ones are back
    assert {s: signal.getsignal(s) for s in before} == before


async def test_serve_forever_refuses_another_thread() -> None:
    main = tether.Main()

    def other() -> None:
        asyncio.run(main.serve_forever())

    loop = asyncio.get_running_loop()
    with pytest.raises(RuntimeError, match="main thread"):
        await loop.run_in_executor(None, other)


# -- broadcast ----------------------------------------------------------------------


async def _heard(child: tether.Child) -> list[str]:
    for _ in range(100):  # events are one-way: ask until the last one arrived
        heard: list[str] = await child.invoke("heard", timeout=10.0)
        if heard and heard[-1].endswith("!"):
            return heard
        await asyncio.sleep(0.02)
    return heard


async def test_broadcast_reaches_every_child_and_peer(sock_path: str) -> None:
    async with tether.Main(timeout=20.0) as main:
        a = await main.spawn(_hub_targets.listener, "a", start_method="fork")
        b = await main.spawn(_hub_targets.listener, "b", start_method="fork", role="worker")
        await main.listen(f"unix://{sock_path}")
        got: list[str] = []
        async with tether.connect(f"unix://{sock_path}") as client:
            client.on("news", lambda call, text: got.append(text))
            assert await main.broadcast("news", "hello!") == 3
            assert await main.broadcast("news", "workers!", role="worker") == 1
            assert await main.broadcast("news", "nobody", role="nobody") == 0
            for _ in range(200):
                if len(got) == 1:
                    break
                await asyncio.sleep(0.01)
        assert got == ["hello!"]
        assert await _heard(a) == ["a:hello!"]
        assert await _heard(b) == ["b:hello!", "b:workers!"]


async def test_broadcast_goes_on_past_a_peer_that_is_gone() -> None:
    async with tether.Main(timeout=20.0) as main:
        alive = await main.spawn(_hub_targets.listener, "alive", start_method="fork")
        dying = await main.spawn(_hub_targets.listener, "dying", start_method="fork")
        # Gone under main's feet: killed, and main's socket end shut, before the
        # exit is noticed, so the send itself finds the connection broken.
        dying.kill()
        dying._sock.shutdown(2)
        n = await main.broadcast("news", "still here!")
        assert n in (1, 2)  # the dying one may have taken it into its socket buffer
        assert await _heard(alive) == ["alive:still here!"]
        await dying.wait(10.0)
        assert await main.broadcast("news", "again!") == 1  # the dead one is skipped


async def test_broadcast_drops_a_peer_over_its_limit_and_reaches_the_rest(sock_path: str) -> None:
    # A client that never reads: past max_queued it is dropped (PeerGone), the others get theirs.
    async with tether.Main(timeout=20.0, max_queued=8 << 20, drain_timeout=2.0) as main:
        alive = await main.spawn(_hub_targets.listener, "alive", start_method="fork")
        await main.listen(f"unix://{sock_path}")
        deaf = await asyncio.get_running_loop().run_in_executor(
            None, lambda: tether.sync.connect(f"unix://{sock_path}", timeout=5.0)
        )
        try:
            blob = "x" * (1 << 20)  # inline (bytes this large would go by shared memory)
            reached = []
            for _ in range(40):
                reached.append(await main.broadcast("news", "x", blob))
                if reached[-1] == 1:
                    break
            assert reached[0] == 2 and reached[-1] == 1  # the deaf one dropped, alive reached
            assert len(main.peers) == 1
            assert await main.broadcast("news", "done!") == 1
        finally:
            deaf.close()
        heard = await _heard(alive)
        assert heard[-1] == "alive:done!"


async def test_broadcast_refuses_a_buffer_and_bad_names() -> None:
    async with tether.Main() as main:
        buf = tether.Buffer(16)
        with pytest.raises(TypeError, match="Buffer"):
            await main.broadcast("news", buf)
        buf.view()  # not consumed: nothing was sent
        with pytest.raises(TypeError, match="channel"):
            await main.broadcast(5, "x")  # type: ignore[arg-type]
        with pytest.raises(TypeError, match="role"):
            await main.broadcast("news", role=5)  # type: ignore[arg-type]


# -- on_child_exit ------------------------------------------------------------------


async def test_on_child_exit_reports_an_exit_and_a_kill() -> None:
    seen: list[tuple[int, int]] = []
    seen_async: list[tuple[int, int]] = []
    async with tether.Main(timeout=20.0) as main:

        @main.on_child_exit
        def record(child: tether.Child, code: int) -> None:
            seen.append((child.pid, code))

        async def record_async(child: tether.Child, code: int) -> None:
            await asyncio.sleep(0)
            seen_async.append((child.pid, code))

        main.on_child_exit(record_async)
        quits = await main.spawn(_hub_targets.exit_with, 3, start_method="fork")
        killed = await main.spawn(_hub_targets.live_until_closed, start_method="fork")
        await quits.wait(10.0)
        killed.kill()
        await killed.wait(10.0)
        for _ in range(200):
            if len(seen_async) == 2:
                break
            await asyncio.sleep(0.01)
    expected = {(quits.pid, 3), (killed.pid, -signal.SIGKILL)}
    assert set(seen) == expected
    assert set(seen_async) == expected


async def test_on_child_exit_runs_for_children_ended_by_close_and_survives_a_failing_callback(
    caplog: pytest.LogCaptureFixture,
) -> None:
    seen: list[int] = []
    main = tether.Main(timeout=20.0)

    def broken(child: tether.Child, code: int) -> None:
        raise RuntimeError("callback bug")

    main.on_child_exit(broken)
    main.on_child_exit(lambda child, code: seen.append(code))
    async with main:
        await main.spawn(_hub_targets.live_until_closed, start_method="fork")
    assert seen == [0]
    assert "callback bug" in caplog.text
    with pytest.raises(TypeError, match="callable"):
        main.on_child_exit(42)  # type: ignore[arg-type]


async def test_on_child_exit_is_not_called_for_a_child_that_failed_to_start() -> None:
    seen: list[int] = []
    async with tether.Main(timeout=20.0) as main:
        main.on_child_exit(lambda child, code: seen.append(code))
        with pytest.raises(tether.PeerGone):
            await main.spawn(_hub_targets.exit_before_hello, start_method="fork")
        await asyncio.sleep(0.1)
    assert seen == []


def test_exit_interrupted_is_the_shell_status() -> None:
    assert runner.EXIT_INTERRUPTED == 128 + signal.SIGINT
    assert os.WEXITSTATUS(runner.EXIT_INTERRUPTED << 8) == 130
