"""The ``tether`` command: ``demo``, ``call``, ``bench`` dispatch, ``--version``."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import textwrap
import types
from collections.abc import Iterator

import pytest

from tether import __version__, cli

PARENT_LINE = "Parent process message: Psst .. hello from parent process!"
CHILD_LINE = "Child received message: Psst .. hello from parent process!"
ELECTRON_LINE = "Received: Hola, mundo!"

# A main listening on the unix socket given as argv[1]; prints "ready" once it accepts.
SERVER = textwrap.dedent(
    """
    import asyncio, sys
    import tether
    from tether.aio.loop import run

    async def serve(address: str) -> None:
        async with tether.Main() as hub:
            def echo(call: tether.Call, *args: object) -> list[object]:
                return list(args)
            def add(call: tether.Call, a: int, b: int) -> int:
                return a + b
            def fail(call: tether.Call) -> None:
                raise ValueError("boom")
            async def slow(call: tether.Call) -> None:
                await asyncio.sleep(60)
            def raw(call: tether.Call) -> object:
                return {"bytes": b"\\x00\\x01", "none": None, "float": 1.5}
            for name, fn in [("echo", echo), ("add", add), ("fail", fail), ("slow", slow),
                             ("raw", raw)]:
                hub.handle(name, fn)
            await hub.listen(address)
            print("ready", flush=True)
            await asyncio.sleep(120)

    run(serve(sys.argv[1]))
    """
)


def tether_cmd(*args: str, timeout: float = 60.0) -> subprocess.CompletedProcess[str]:
    """Run ``python -m tether ARGS`` and capture its output."""
    return subprocess.run(
        [sys.executable, "-m", "tether", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


@pytest.fixture(scope="module")
def address() -> Iterator[str]:
    """The unix address of a main running in a subprocess for the whole module."""
    folder = tempfile.mkdtemp(prefix="tether-cli-", dir="/tmp")
    addr = f"unix://{folder}/main.sock"
    proc = subprocess.Popen(
        [sys.executable, "-c", SERVER, addr],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None
        # readline blocks; the alarm bounds it in case the server never gets ready.
        old = signal.signal(signal.SIGALRM, lambda *_: pytest.fail("server did not start"))
        signal.alarm(30)
        try:
            line = proc.stdout.readline()
        finally:
            signal.alarm(0)
            signal.signal(signal.SIGALRM, old)
        assert line.strip() == "ready", proc.stderr.read() if proc.stderr else line
        yield addr
    finally:
        proc.kill()
        proc.wait(10)
        shutil.rmtree(folder, ignore_errors=True)


# -- demo -------------------------------------------------------------------------


@pytest.mark.timeout(120)
def test_demo_prints_the_seed_scenarios_in_order() -> None:
    result = tether_cmd("demo", timeout=100)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    for expected in (PARENT_LINE, CHILD_LINE, ELECTRON_LINE):
        assert lines.count(expected) == 1, result.stdout  # present, and not printed twice
    assert lines.index(PARENT_LINE) < lines.index(CHILD_LINE) < lines.index(ELECTRON_LINE)
    assert "Main invoked child's compute(21): 42" in lines


def test_version() -> None:
    result = tether_cmd("--version")
    assert result.returncode == 0
    assert result.stdout.strip() == f"tether {__version__}"


def test_no_command_is_a_usage_error() -> None:
    result = tether_cmd()
    assert result.returncode == 2
    assert "demo" in result.stderr and "call" in result.stderr


# -- call -------------------------------------------------------------------------


def test_parse_arg_json_or_plain_string() -> None:
    assert cli.parse_arg("1") == 1
    assert cli.parse_arg('"1"') == "1"
    assert cli.parse_arg('{"a": [1, null]}') == {"a": [1, None]}
    assert cli.parse_arg("true") is True
    assert cli.parse_arg("hello world") == "hello world"
    assert cli.parse_arg("{not json") == "{not json"


def test_call_prints_json_result(address: str) -> None:
    result = tether_cmd("call", address, "add", "2", "40")
    assert result.returncode == 0, result.stderr
    assert result.stdout == "42\n"
    assert result.stderr == ""


def test_call_args_are_json_with_string_fallback(address: str) -> None:
    result = tether_cmd(
        "call", address, "echo", "1", '"two"', "three", '{"x": [1.5, null]}', "--", "-7"
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == '[1,"two","three",{"x":[1.5,null]},-7]'


def test_call_result_types_become_json(address: str) -> None:
    result = tether_cmd("call", address, "raw")
    assert result.returncode == 0, result.stderr
    # msgspec renders bytes as base64 in JSON.
    assert result.stdout.strip() == '{"bytes":"AAE=","none":null,"float":1.5}'


def test_call_unknown_channel_is_no_handler(address: str) -> None:
    result = tether_cmd("call", address, "no-such-channel")
    assert result.returncode == 1
    assert result.stdout == ""
    assert result.stderr.startswith("error: NoHandler: ")
    assert "no-such-channel" in result.stderr


def test_call_bad_argument_is_bad_request(address: str) -> None:
    result = tether_cmd("call", address, "add", "1", "two")
    assert result.returncode == 1
    assert result.stderr.startswith("error: BadRequest: ")


def test_call_handler_error_is_remote_error(address: str) -> None:
    result = tether_cmd("call", address, "fail")
    assert result.returncode == 1
    assert result.stderr.startswith("error: RemoteError: ValueError: boom")


def test_call_timeout_option(address: str) -> None:
    result = tether_cmd("call", "--timeout", "0.3", address, "slow")
    assert result.returncode == 1
    assert result.stderr.startswith("error: InvokeTimeout: ")


def test_call_nothing_listening_is_peer_gone() -> None:
    folder = tempfile.mkdtemp(prefix="tether-cli-", dir="/tmp")
    try:
        result = tether_cmd("call", f"unix://{folder}/nobody.sock", "add", "1", "2")
    finally:
        os.rmdir(folder)
    assert result.returncode == 1
    assert result.stdout == ""
    assert result.stderr.startswith("error: ConnectError: cannot connect to unix:")  # a PeerGone


def test_call_malformed_address_is_usage_error() -> None:
    result = tether_cmd("call", "http://example.invalid/", "add")
    assert result.returncode == 2
    assert result.stderr.startswith("error: ")


def test_call_missing_channel_is_usage_error() -> None:
    result = tether_cmd("call", "unix:///tmp/x.sock")
    assert result.returncode == 2
    assert "CHANNEL" in result.stderr


# -- bench dispatch ----------------------------------------------------------------


def test_bench_is_dispatched_lazily_with_its_arguments(monkeypatch: pytest.MonkeyPatch) -> None:
    seen: list[list[str]] = []

    def fake_main(argv: list[str]) -> int:
        seen.append(argv)
        return 7

    fake = types.ModuleType("tether.bench")
    fake.main = fake_main  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "tether.bench", fake)
    assert cli.main(["bench", "--quick", "-n", "3"]) == 7
    assert seen == [["--quick", "-n", "3"]]


def test_bench_missing_package_says_so(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setitem(sys.modules, "tether.bench", None)  # import now fails
    monkeypatch.setitem(sys.modules, "tether.bench.__main__", None)
    assert cli.main(["bench"]) == 1
    assert "tether bench is not available" in capsys.readouterr().err
