"""``tether trace ADDRESS``: a live view of a running main, for its owner's uid only."""

from __future__ import annotations

import asyncio
import os
import pwd
import signal
import sys
import tempfile
import textwrap
from collections.abc import AsyncIterator

import pytest

import tether
from tether import tracing

pytestmark = pytest.mark.timeout(120)

_LINE_TIMEOUT = 60.0


@pytest.fixture
async def main_address() -> AsyncIterator[tuple[tether.Main, str]]:
    """A main with ``add`` and ``fail``, on a unix socket nobody may connect to as well."""
    folder = tempfile.mkdtemp(prefix="tether-trace-", dir="/tmp")
    os.chmod(folder, 0o711)  # others may enter (to reach the socket), not list or write
    address = f"unix://{folder}/main.sock"
    main = tether.Main(timeout=10.0)

    def fail(call: tether.Call) -> None:
        raise ValueError("no")

    main.handle("add", lambda call, a, b: a + b, roles=["client"])
    main.handle("fail", fail)
    async with main:
        await main.listen(address, uids=[os.getuid(), pwd.getpwnam("nobody").pw_uid])
        yield main, address
    os.rmdir(folder)


async def _line(stream: asyncio.StreamReader) -> str:
    line = await asyncio.wait_for(stream.readline(), _LINE_TIMEOUT)
    assert line, "the process ended"
    return line.decode()


async def _tether(*args: str) -> asyncio.subprocess.Process:
    return await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "tether",
        *args,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )


async def test_watcher_sees_an_invoke_made_by_another_process(
    main_address: tuple[tether.Main, str],
) -> None:
    _, address = main_address
    watcher = await _tether("trace", address, "--channel", "add", "--channel", "fail")
    try:
        assert watcher.stdout is not None
        assert (await _line(watcher.stdout)).startswith(f"attached to main pid {os.getpid()}")
        assert tracing.hook is not None  # main traces while someone watches
        caller = await _tether("call", address, "add", "2", "3")
        out, err = await asyncio.wait_for(caller.communicate(), _LINE_TIMEOUT)
        assert out.decode().strip() == "5", err
        failing = await _tether("call", address, "fail")
        await asyncio.wait_for(failing.communicate(), _LINE_TIMEOUT)
        seen: list[str] = []
        while not any(" error " in s for s in seen):
            seen.append(await _line(watcher.stdout))
        invoke = next(s for s in seen if " invoke " in s)
        assert "<- client[" in invoke and " add " in invoke
        assert f"client[{caller.pid}]" in invoke  # the other process, by its pid
        assert any(" result " in s and "handler" in s for s in seen)
        assert not any(" hello " in s or " goodbye " in s for s in seen)  # --channel filters
        watcher.send_signal(signal.SIGINT)
        rest, err = await asyncio.wait_for(watcher.communicate(), _LINE_TIMEOUT)
        assert watcher.returncode == 0, err
        table = rest.decode()
        assert "invokes per channel" in table
        row = next(line for line in table.splitlines() if " add " in line)
        assert row.split("│")[2].strip() == "1"  # count
        fail_row = next(line for line in table.splitlines() if " fail " in line)
        assert fail_row.split("│")[5].strip() == "1"  # errors
    finally:
        if watcher.returncode is None:
            watcher.kill()
            await watcher.wait()
    # the watcher left: the recorder started for it stopped
    for _ in range(100):
        if tracing.hook is None:
            break
        await asyncio.sleep(0.05)
    assert tracing.hook is None


# Runs as root, imports and connects once (the interpreter's files are closed to
# nobody), then becomes nobody and asks to attach.
AS_NOBODY = textwrap.dedent(
    """
    import os, pwd, sys
    import tether, tether.sync
    address = sys.argv[1]
    with tether.sync.connect(address, timeout=10) as peer:
        peer.invoke("tether.channels")
    nobody = pwd.getpwnam("nobody")
    os.setgroups([])
    os.setgid(nobody.pw_gid)
    os.setuid(nobody.pw_uid)
    with tether.sync.connect(address, timeout=10) as peer:
        try:
            peer.invoke("tether.trace")
        except tether.Forbidden as exc:
            print("forbidden:", exc)
        else:
            print("attached")
    """
)


async def test_a_peer_of_another_uid_cannot_attach(
    main_address: tuple[tether.Main, str],
) -> None:
    _, address = main_address
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-c",
        AS_NOBODY,
        address,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(proc.communicate(), _LINE_TIMEOUT)
    assert proc.returncode == 0, err.decode()
    assert out.decode().startswith("forbidden: tether.trace: only a local peer"), out
    assert tracing.hook is None  # nothing started for it


async def test_tcp_peer_cannot_attach() -> None:
    async with tether.Main(timeout=10.0) as main:
        server = await main.listen("tcp://127.0.0.1:0")
        async with tether.connect(str(server.address)) as peer:
            with pytest.raises(tether.Forbidden):
                await peer.invoke("tether.trace")
    assert tracing.hook is None
