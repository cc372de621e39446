"""Children that fail, are interrupted, or are started with options (issue 8)."""

from __future__ import annotations

import asyncio
import contextlib
import os
import select
import signal
import socket
import subprocess
import sys
import textwrap
import time

import psutil
import pytest

import _child_targets
import _fails_in_child
import tether
from tether import capture, child_errors

pytestmark = pytest.mark.timeout(90)


# -- a child that fails before its hello carries its exception ------------------------


@pytest.mark.parametrize("method", ["spawn", "forkserver", "fork"])
async def test_a_target_failing_before_the_connection_is_up_is_raised_by_spawn(method: str) -> None:
    async with tether.Main() as main:
        with pytest.raises(
            tether.PeerGone, match=r"failed to start.*ValueError: bad config"
        ) as info:
            await main.spawn(_child_targets.fails_at_once, "bad config", start_method=method)
        assert info.value.exitcode == 1
        cause = info.value.__cause__
        assert isinstance(cause, tether.RemoteError)
        assert cause.type_name == "ValueError"
        assert cause.remote_message == "bad config"
        assert "in fails_at_once" in cause.remote_traceback
        assert not main.children


async def test_an_import_error_in_the_child_is_raised_by_spawn(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Imported in main already; the child imports it again, by name, and fails.
    monkeypatch.setenv("TETHER_TEST_FAIL", "1")
    async with tether.Main() as main:
        with pytest.raises(tether.PeerGone, match="ImportError: simulated") as info:
            await main.spawn(_fails_in_child.target)
        cause = info.value.__cause__
        assert isinstance(cause, tether.RemoteError)
        assert cause.type_name == "ImportError"
        assert "_fails_in_child.py" in cause.remote_traceback


async def test_a_target_failing_later_gives_its_traceback_to_the_peer_gone() -> None:
    async with tether.Main() as main:
        child = await main.spawn(_child_targets.fails_sync, "no such key")
        assert await child.wait(30) == 1
        with pytest.raises(tether.PeerGone, match="KeyError") as info:
            await child.invoke("anything")
        cause = info.value.__cause__
        assert isinstance(cause, tether.RemoteError)
        assert cause.type_name == "KeyError" and "in fails_sync" in cause.remote_traceback
        assert child.failure() is cause


async def test_a_child_that_exits_cleanly_reports_nothing() -> None:
    async with tether.Main() as main:
        child = await main.spawn(_child_targets.idle_sync, 0.0)
        assert await child.wait(30) == 0
        assert child.failure() is None


def test_a_main_module_without_guard_gets_a_hint(
    tmp_path: os.PathLike[str], child_env: dict[str, str]
) -> None:
    script = os.path.join(tmp_path, "noguard.py")
    with open(script, "w") as f:
        f.write(
            textwrap.dedent(
                """
                import asyncio
                import tether

                async def child(peer):
                    pass

                async def main():
                    async with tether.Main() as m:
                        await m.spawn(child)

                asyncio.run(main())
                """
            )
        )
    env = dict(child_env)
    env["PYTHONPATH"] = os.pathsep.join(
        [os.path.dirname(os.path.dirname(tether.__file__)), env["PYTHONPATH"]]
    )
    out = subprocess.run(
        [sys.executable, script], env=env, capture_output=True, text=True, timeout=60, cwd=tmp_path
    )
    assert out.returncode == 1
    last = out.stderr.strip().splitlines()[-1]
    assert last.startswith("tether.errors.PeerGone: child failed to start")
    assert "has no 'if __name__ == \"__main__\":' guard" in last


# -- Ctrl-C in a terminal: quiet children, one report from main --------------------------

CTRL_C_MAIN = """
import asyncio
import contextlib
import _child_targets
import tether
from tether import capture, child_errors

async def main():
    async with tether.Main() as m:
        children = [
            await m.spawn(_child_targets.idle_async),
            await m.spawn(_child_targets.idle_sync, 120.0),
            await m.spawn(_child_targets.busy_sync),
            await m.spawn(_child_targets.idle_async, start_method="fork"),
        ]
        print("ready", *[c.pid for c in children], flush=True)
        await asyncio.sleep(120)

if __name__ == "__main__":
    asyncio.run(main())
"""


def _gone(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def test_ctrl_c_children_exit_quietly_and_main_reports_once(
    tmp_path: os.PathLike[str], child_env: dict[str, str]
) -> None:
    script = os.path.join(tmp_path, "ctrl_c_main.py")
    with open(script, "w") as f:
        f.write(CTRL_C_MAIN)
    env = dict(child_env)
    env["PYTHONPATH"] = os.pathsep.join(
        [os.path.dirname(os.path.dirname(tether.__file__)), env["PYTHONPATH"]]
    )
    # Its own session and process group, as a shell gives a foreground job.
    proc = subprocess.Popen(
        [sys.executable, script],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        assert proc.stdout is not None
        ready, _, _ = select.select([proc.stdout], [], [], 60)
        assert ready, "main did not start its children"
        line = proc.stdout.readline().split()
        assert line[0] == "ready", line
        pids = [int(p) for p in line[1:]]
        time.sleep(0.3)  # the children are in their targets
        os.killpg(proc.pid, signal.SIGINT)  # what the terminal does on Ctrl-C
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)
    deadline = time.monotonic() + 20
    while not all(_gone(p) for p in pids) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert all(_gone(p) for p in pids), "a child outlived Ctrl-C"
    lines = err.splitlines()
    assert lines.count("KeyboardInterrupt") <= 1, err  # main's one report
    assert os.path.dirname(tether.__file__) not in err, err  # no frame of tether's
    assert "PeerGone" not in err, err
    assert len(lines) < 40, err


# -- spawn options: env, cwd, capture ----------------------------------------------------


@pytest.mark.parametrize("method", ["spawn", "fork"])
async def test_spawn_env_is_merged_and_cwd_is_set(
    method: str, tmp_path: os.PathLike[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("TETHER_TEST_KEPT", "from main")
    monkeypatch.setenv("TETHER_TEST_REMOVED", "from main")
    got: asyncio.Future[tuple[str, dict[str, str | None]]] = (
        asyncio.get_running_loop().create_future()
    )
    async with tether.Main() as main:

        @main.on("env")
        def on_env(call: tether.Call, cwd: str, env: dict[str, str | None]) -> None:
            got.set_result((cwd, env))

        names = ["TETHER_TEST_KEPT", "TETHER_TEST_REMOVED", "TETHER_TEST_ADDED"]
        await main.spawn(
            _child_targets.report_env,
            names,
            env={"TETHER_TEST_ADDED": "for the child", "TETHER_TEST_REMOVED": None},
            cwd=tmp_path,
            start_method=method,
        )
        cwd, env = await asyncio.wait_for(got, 30)
    assert os.path.realpath(cwd) == os.path.realpath(tmp_path)
    assert env == {
        "TETHER_TEST_KEPT": "from main",
        "TETHER_TEST_REMOVED": None,
        "TETHER_TEST_ADDED": "for the child",
    }
    assert os.environ["TETHER_TEST_REMOVED"] == "from main"  # main's own is untouched


async def test_spawn_env_reaches_the_targets_module_at_import() -> None:
    # The module raises at import when TETHER_TEST_FAIL=1: env= applies before that import.
    async with tether.Main() as main:
        with pytest.raises(tether.PeerGone, match="ImportError"):
            await main.spawn(_fails_in_child.target, env={"TETHER_TEST_FAIL": "1"})


async def test_spawn_checks_env_and_cwd(tmp_path: os.PathLike[str]) -> None:
    async with tether.Main() as main:
        with pytest.raises(TypeError, match="env must be a mapping"):
            await main.spawn(_child_targets.idle_sync, 0.0, env=["A=1"])  # type: ignore[arg-type]
        with pytest.raises(TypeError, match="env must map str to str"):
            await main.spawn(_child_targets.idle_sync, 0.0, env={"A": 1})  # type: ignore[dict-item]
        with pytest.raises(FileNotFoundError, match="cwd"):
            await main.spawn(_child_targets.idle_sync, 0.0, cwd=os.path.join(tmp_path, "nope"))
        assert not main.children


@pytest.mark.parametrize("method", ["spawn", "fork"])
async def test_capture_gives_main_the_childs_output(method: str) -> None:
    async with tether.Main() as main:
        printed: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        main.on("printed", lambda call, n: printed.set_result(n))
        listening = asyncio.Event()  # the child prints once on_line below is in place

        @main.handle("go")
        async def go(call: tether.Call) -> None:
            await asyncio.wait_for(listening.wait(), 30)

        child = await main.spawn(_child_targets.chatter, 3, capture=True, start_method=method)
        assert child.stdout is not None and child.stderr is not None
        seen: list[str] = []
        child.stdout.on_line(seen.append)
        listening.set()
        assert await asyncio.wait_for(printed, 30) == 3
        await child.close()
        await child.wait(30)
        await child.stdout.wait_closed(10)
        assert child.stdout.lines() == ["out 0", "out 1", "out 2"]
        assert child.stderr.lines() == ["err line"]
        assert child.stdout.text == "out 0\nout 1\nout 2\n"
        assert seen[-1] == "out 2"


async def test_captured_output_nobody_reads_neither_blocks_the_child_nor_grows_without_bound() -> (
    None
):
    lines = 40_000  # about 2.4 MB of text: more than any pipe holds, more than is kept
    async with tether.Main() as main:
        child = await main.spawn(_child_targets.flood, lines, capture=True)
        assert await child.wait(60) == 0  # it was never blocked for good
        assert child.stdout is not None
        kept = child.stdout.lines()
        assert kept[-1] == f"line {lines - 1:06d} " + "x" * 50
        assert sum(len(s) + 1 for s in kept) <= capture.MAX_BYTES
        assert child.stdout.dropped == lines - len(kept) > 0


async def test_uncaptured_child_has_no_output_objects() -> None:
    async with tether.Main() as main:
        child = await main.spawn(_child_targets.idle_sync, 0.0)
        assert child.stdout is None and child.stderr is None


def test_a_failure_report_is_bounded_and_keeps_the_end_of_the_traceback() -> None:
    def deep(n: int, message: str) -> None:
        if n == 0:
            raise RuntimeError(message)
        deep(n - 1, message)

    def report_of(message: str) -> tuple[int, tether.RemoteError | None]:
        try:
            deep(900, message)  # a traceback longer than the report may be
        except RuntimeError as exc:
            error = exc
        child_end, main_end = socket.socketpair()
        with main_end:
            child_errors.write_report(child_end, error)
            size = len(main_end.recv(child_errors.REPORT_MAX * 2, socket.MSG_PEEK))
            return size, child_errors.read_report(main_end)

    size, got = report_of("the bottom")
    assert 0 < size <= child_errors.REPORT_MAX
    assert got is not None and got.type_name == "RuntimeError"
    assert got.remote_traceback.rstrip().endswith("RuntimeError: the bottom")  # the tail is kept
    # A message full of characters JSON escapes (6 bytes each) is cut, never over the cap.
    size, got = report_of("\x01" * 100_000)
    assert 0 < size <= child_errors.REPORT_MAX
    assert got is not None and got.remote_message == "\x01" * 4096


def test_a_garbled_or_oversized_report_is_no_cause() -> None:
    for data in (b"not json", b'{"type": "X"', b"[" * 100_000):
        child_end, main_end = socket.socketpair()
        with main_end, child_end:
            child_end.setblocking(False)
            with contextlib.suppress(BlockingIOError):
                child_end.send(data)
            child_end.shutdown(socket.SHUT_WR)
            assert child_errors.read_report(main_end) is None
