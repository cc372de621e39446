"""Child processes dying, misbehaving and outliving (or not) their main.

Nothing hangs: a dead child fails every pending call at once with a PeerGone
that says how it died; a child that breaks the protocol is killed; a child
whose main was killed goes away too.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import tempfile
import time
import uuid

import pytest

import _targets
import tether
from _targets import install_main_handlers

pytestmark = pytest.mark.timeout(90)


async def test_sigkilled_child_fails_all_pending_at_once(sock_path: str) -> None:
    async with tether.Main(timeout=30.0) as main:
        rec = install_main_handlers(main)
        child = await main.spawn(_targets.serve_basic, start_method="fork")
        loop = asyncio.get_running_loop()
        failed_at: list[float] = []
        pending = [
            asyncio.ensure_future(child.invoke("forever", f"k{i}", timeout=None))
            for i in range(100)
        ]
        for fut in pending:
            fut.add_done_callback(lambda _f: failed_at.append(loop.time()))
        # Every handler in the child is running (it told us), so all 100 are truly pending.
        await rec.wait_until(lambda: len(rec.remote_started) == 100, timeout=10.0)
        assert not any(f.done() for f in pending)

        t_kill = loop.time()
        os.kill(child.pid, signal.SIGKILL)
        _done, not_done = await asyncio.wait(pending, timeout=2.0)
        assert not not_done, f"{len(not_done)} invokes still pending 2 s after SIGKILL"
        # Typically a few ms (the exit is watched, not polled); the bound leaves room for a
        # loaded machine and still catches a call left to its timeout (30 s here).
        latest = max(failed_at) - t_kill
        assert latest < 1.0, f"pending invokes failed {latest * 1000:.0f} ms after the kill"

        errors = [f.exception() for f in pending]
        assert all(isinstance(e, tether.PeerGone) for e in errors), errors[:3]
        first = errors[0]
        assert isinstance(first, tether.PeerGone)
        assert "SIGKILL" in str(first)
        assert first.exitcode == -9
        assert await child.wait(2.0) == -9
        assert child.exitcode == -9
        with pytest.raises(tether.PeerGone):
            await child.invoke("double", 1)

        # Main keeps serving: a new child, and a client on a listener.
        other = await main.spawn(_targets.serve_basic, start_method="fork")
        assert await other.invoke("double", 5) == 10
        assert await other.invoke("relay", 1, 1) == 20
        server = await main.listen(f"unix://{sock_path}")
        async with tether.connect(str(server.address)) as client:
            assert await client.invoke("add", 1, 2) == 3
        assert child not in main.peers


@pytest.mark.parametrize(
    ("target", "how"),
    [
        ("exit_on_event", "sys.exit"),
        ("exit_on_event", "os._exit"),
        ("exit_on_event_sync", "os._exit"),
        ("exit_on_event_sync", "sys.exit"),
    ],
)
async def test_child_exit_code_reaches_pending_calls(target: str, how: str) -> None:
    async with tether.Main(timeout=30.0) as main:
        rec = install_main_handlers(main)
        child = await main.spawn(getattr(_targets, target), how, 3, start_method="fork")
        if target == "exit_on_event":
            pending = [
                asyncio.ensure_future(child.invoke("forever", f"e{i}", timeout=None))
                for i in range(10)
            ]
            await rec.wait_until(lambda: len(rec.remote_started) == 10, timeout=10.0)
            await child.send("exit")
        else:
            pending = [asyncio.ensure_future(child.invoke("hold", timeout=None)) for i in range(10)]
        _done, not_done = await asyncio.wait(pending, timeout=5.0)
        assert not not_done
        errors = [f.exception() for f in pending]
        assert all(isinstance(e, tether.PeerGone) for e in errors), errors[:3]
        assert "code 3" in str(errors[0])
        assert all(e.exitcode == 3 for e in errors if isinstance(e, tether.PeerGone))
        assert await child.wait(2.0) == 3


async def test_child_that_sends_garbage_is_killed() -> None:
    async with tether.Main(timeout=30.0) as main:
        rec = install_main_handlers(main)
        child = await main.spawn(_targets.serve_basic, start_method="fork")
        pending = [
            asyncio.ensure_future(child.invoke("forever", f"g{i}", timeout=None)) for i in range(5)
        ]
        await rec.wait_until(lambda: len(rec.remote_started) == 5, timeout=10.0)
        await child.send("garbage", b"\xff\xff\xff\xff" + b"\x00" * 16)
        _done, not_done = await asyncio.wait(pending, timeout=2.0)
        assert not not_done
        errors = [f.exception() for f in pending]
        assert all(isinstance(e, tether.ProtocolError) for e in errors), errors
        assert await child.wait(2.0) == -9
        assert child.exitcode == -9
        with pytest.raises(tether.ProtocolError):
            await child.invoke("double", 1)
        # Only that child was dropped.
        other = await main.spawn(_targets.serve_basic, start_method="fork")
        assert await other.invoke("double", 6) == 12


# -- whole main programs as subprocesses ------------------------------------------------


def _alive(pid: int) -> bool:
    """Whether ``pid`` runs (a zombie waiting for a reaper counts as gone)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            state = f.read().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError, IndexError):
        return False
    return state not in ("Z", "X")


def _script(mode: str, method: str, arg: str) -> list[str]:
    return [
        sys.executable,
        "-c",
        f"import _targets; _targets.main_script({mode!r}, {method!r}, {arg!r})",
    ]


@pytest.mark.parametrize(
    ("mode", "method"),
    [
        ("orphan", "spawn"),
        ("orphan", "fork"),
        ("orphan", "forkserver"),
        ("orphan-sync", "spawn"),
        ("orphan-sync", "fork"),
    ],
)
def test_child_exits_when_main_is_killed(mode: str, method: str, child_env: dict[str, str]) -> None:
    d = tempfile.mkdtemp(prefix="tt-", dir="/tmp")
    pidfile = os.path.join(d, "child.pid")
    proc = subprocess.Popen(
        _script(mode, method, pidfile),
        env=child_env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    child_pid = None
    try:
        deadline = time.monotonic() + 40
        while not os.path.exists(pidfile):
            assert proc.poll() is None, proc.communicate(timeout=5)
            assert time.monotonic() < deadline, "child never started"
            time.sleep(0.02)
        with open(pidfile) as f:
            child_pid = int(f.read())
        assert _alive(child_pid)
        time.sleep(0.2)  # let main settle into its sleep
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
        deadline = time.monotonic() + 5.0
        while _alive(child_pid) and time.monotonic() < deadline:
            time.sleep(0.02)
        assert not _alive(child_pid), f"child {child_pid} outlived its killed main"
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
        if child_pid is not None and _alive(child_pid):
            os.kill(child_pid, signal.SIGKILL)
        proc.stdout.close()  # type: ignore[union-attr]
        proc.stderr.close()  # type: ignore[union-attr]
        for name in os.listdir(d):
            os.unlink(os.path.join(d, name))
        os.rmdir(d)


@pytest.mark.parametrize("method", ["spawn", "forkserver", "fork"])
def test_child_output_reaches_main_terminal(method: str, child_env: dict[str, str]) -> None:
    marker = f"marker-{uuid.uuid4().hex}"
    out = subprocess.run(
        _script("print", method, marker),
        env=child_env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 0, out.stderr
    assert marker in out.stdout.splitlines()
    assert f"{marker}-stderr" in out.stderr.splitlines()
    assert "child exited 0" in out.stdout
