"""``tether call``: --list through the reserved ``tether.channels``, bytes arguments, secrets."""

from __future__ import annotations

import asyncio
import base64
import shutil
import signal
import subprocess
import sys
import tempfile
import textwrap
from collections.abc import Iterator

import pytest

import tether
from tether import cli
from tether.introspect import CHANNELS

pytestmark = pytest.mark.timeout(120)

SECRET = b"0123456789abcdef-cli-secret"

# A main on a unix socket (argv[1]) and on TCP with a secret; prints the TCP address.
SERVER = textwrap.dedent(
    """
    import asyncio, sys
    import numpy as np
    import tether

    async def serve(address: str, secret: bytes) -> None:
        async with tether.Main() as hub:
            @hub.handle("add", roles="client")
            def add(call: tether.Call, a: int, b: int = 1) -> int:
                return a + b

            @hub.handle("admin.reset", roles="admin")
            def reset(call: tether.Call) -> None: ...

            @hub.handle("local.only")
            def local_only(call: tether.Call, names: list[str], x: float | None) -> dict[str, int]:
                return {}

            @hub.handle("size")
            def size(call: tether.Call, data: bytes) -> int:
                return len(data)

            @hub.handle("blob")
            def blob(call: tether.Call, n: int) -> bytes:
                return bytes(range(n))

            @hub.handle("mean")
            def mean(call: tether.Call, a: np.ndarray) -> float:
                return float(a.mean())

            @hub.on("log", roles="client")
            def log(call: tether.Call, line: str) -> None: ...

            await hub.listen(address)
            tcp = await hub.listen("tcp://127.0.0.1:0", secret=secret)
            print(tcp.address, flush=True)
            await asyncio.sleep(120)

    tether.run(serve(sys.argv[1], sys.argv[2].encode()))
    """
)


def tether_cmd(*args: str, stdin: bytes | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "tether", *args],
        capture_output=True,
        text=stdin is None,
        input=stdin,
        timeout=60,
        check=False,
    )


@pytest.fixture(scope="module")
def server() -> Iterator[tuple[str, str]]:
    """(unix address, tcp address) of a main running in a subprocess."""
    folder = tempfile.mkdtemp(prefix="tether-call-", dir="/tmp")
    addr = f"unix://{folder}/main.sock"
    proc = subprocess.Popen(
        [sys.executable, "-c", SERVER, addr, SECRET.decode()],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None
        old = signal.signal(signal.SIGALRM, lambda *_: pytest.fail("server did not start"))
        signal.alarm(30)
        try:
            line = proc.stdout.readline()
        finally:
            signal.alarm(0)
            signal.signal(signal.SIGALRM, old)
        assert line.startswith("tcp://"), proc.stderr.read() if proc.stderr else line
        yield addr, line.strip()
    finally:
        proc.kill()
        proc.wait(10)
        shutil.rmtree(folder, ignore_errors=True)


def test_list_shows_every_channel_a_local_peer_may_reach_with_types(
    server: tuple[str, str],
) -> None:
    result = tether_cmd("call", "--list", server[0])
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == [
        "invoke  add(a: int, b: int = 1) -> int",
        "invoke  blob(n: int) -> bytes",
        "invoke  local.only(names: list[str], x: float | None) -> dict[str, int]",
        "invoke  mean(a: ndarray) -> float",
        "invoke  size(data: bytes) -> int",
        "event   log(line: str)",
    ]
    assert CHANNELS not in result.stdout


def test_list_shows_a_stranger_only_what_its_role_reaches(server: tuple[str, str]) -> None:
    # TCP peer (role "client", not local): no admin channel, no local-only channels.
    result = tether_cmd("call", "--list", "--secret", SECRET.decode(), server[1])
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == [
        "invoke  add(a: int, b: int = 1) -> int",
        "event   log(line: str)",
    ]


def test_secret_file_and_wrong_secret(server: tuple[str, str], tmp_path: object) -> None:
    path = f"{tempfile.mkdtemp(prefix='tether-sec-')}/key"
    with open(path, "wb") as f:
        f.write(SECRET)
    ok = tether_cmd("call", "--secret-file", path, server[1], "add", "2", "3")
    assert (ok.returncode, ok.stdout) == (0, "5\n"), ok.stderr
    b64 = "b64:" + base64.b64encode(SECRET).decode()
    assert tether_cmd("call", "--secret", b64, server[1], "add", "2").stdout == "3\n"
    wrong = tether_cmd("call", "--secret", "x" * 20, server[1], "add", "2", "3")
    assert wrong.returncode == 1
    assert wrong.stderr.startswith("error: AuthenticationError: ")
    short = tether_cmd("call", "--secret", "short", server[1], "add", "2", "3")
    assert short.returncode == 2 and "16" in short.stderr
    missing = tether_cmd("call", "--secret-file", path + ".missing", server[1], "add", "1")
    assert missing.returncode == 2 and ".missing" in missing.stderr


def test_bytes_arguments_b64_file_and_stdin(server: tuple[str, str]) -> None:
    assert tether_cmd("call", server[0], "size", "b64:AAECAw==").stdout == "4\n"
    folder = tempfile.mkdtemp(prefix="tether-arg-")
    path = f"{folder}/data.bin"
    with open(path, "wb") as f:
        f.write(bytes(300_000))  # large: crosses as an attachment
    assert tether_cmd("call", server[0], "size", f"@{path}").stdout == "300000\n"
    piped = tether_cmd("call", server[0], "size", "@-", stdin=b"hello")
    assert piped.stdout == b"5\n", piped.stderr
    bad = tether_cmd("call", server[0], "size", "b64:not base64!")
    assert bad.returncode == 2 and "base64" in bad.stderr
    nofile = tether_cmd("call", server[0], "size", f"@{folder}/nope")
    assert nofile.returncode == 2 and "nope" in nofile.stderr
    shutil.rmtree(folder)


def test_an_endless_file_argument_is_refused_past_the_frame_limit(
    server: tuple[str, str],
) -> None:
    # /dev/zero never ends: read at most one frame's worth, then say so (was: memory grew)
    endless = tether_cmd("call", server[0], "size", "@/dev/zero")
    assert endless.returncode == 2
    assert "/dev/zero" in endless.stderr and "larger than 64 MiB" in endless.stderr


def test_a_bytes_result_is_base64_and_the_caller_is_told(server: tuple[str, str]) -> None:
    result = tether_cmd("call", server[0], "blob", "3")
    assert result.returncode == 0, result.stderr
    assert base64.b64decode(result.stdout.strip().strip('"')) == b"\x00\x01\x02"
    assert "base64" in result.stderr


def test_list_takes_no_channel_and_call_needs_one(server: tuple[str, str]) -> None:
    both = tether_cmd("call", "--list", server[0], "add")
    assert both.returncode == 2 and "--list" in both.stderr
    neither = tether_cmd("call", server[0])
    assert neither.returncode == 2 and "CHANNEL" in neither.stderr


def test_parse_call_arg() -> None:
    assert cli.parse_call_arg("b64:aGk=") == b"hi"
    assert cli.parse_call_arg('"@x"') == "@x"  # a string starting with @: as JSON
    assert cli.parse_call_arg("7") == 7
    with pytest.raises(ValueError, match="base64"):
        cli.parse_call_arg("b64:???")


# -- the reserved channel itself ------------------------------------------------------


@pytest.mark.parametrize("register", ["handle", "on", "remove_handler"])
def test_the_reserved_channel_cannot_be_shadowed(register: str) -> None:
    main = tether.Main()
    with pytest.raises(ValueError, match="reserved"):
        if register == "remove_handler":
            main.remove_handler(CHANNELS)
        else:
            getattr(main, register)(CHANNELS, lambda call: None)
    with pytest.raises(ValueError, match="reserved"):
        main.registry.remove(CHANNELS)
    assert CHANNELS in main.registry.invokes


async def test_introspection_respects_roles_over_the_wire(sock_path: str) -> None:
    async with tether.Main() as main:

        @main.handle("pub", roles={"client", "web"})
        async def pub(call: tether.Call, x: int, *rest: str) -> list[str]:
            return []

        @main.handle("mine")
        def mine(call: tether.Call, y) -> None:  # type: ignore[no-untyped-def]
            return None

        await main.listen(f"unix://{sock_path}")
        tcp = await main.listen("tcp://127.0.0.1:0")
        async with tether.connect(f"unix://{sock_path}") as local:
            got = await local.invoke(CHANNELS, timeout=10.0)
        assert got == [
            {"channel": "mine", "kind": "invoke", "params": [["y", "Any"]], "result": "None"},
            {
                "channel": "pub",
                "kind": "invoke",
                "params": [["x", "int"], ["*rest", "str"]],
                "result": "list[str]",
            },
        ]
        async with tether.connect(str(tcp.address)) as stranger:
            assert [c["channel"] for c in await stranger.invoke(CHANNELS, timeout=10.0)] == ["pub"]


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "tether", *args], capture_output=True, text=True, timeout=60
    )


async def test_list_with_no_channels_and_on_a_main_without_introspection(sock_path: str) -> None:
    loop = asyncio.get_running_loop()
    address = f"unix://{sock_path}"
    async with tether.Main() as main:
        await main.listen(address)
        empty = await loop.run_in_executor(None, _cli, "call", "--list", address)
        assert (empty.returncode, empty.stdout) == (0, "(no channels this caller may reach)\n")
        del main.registry.invokes[CHANNELS]  # as a main from before tether.channels
        old = await loop.run_in_executor(None, _cli, "call", "--list", address)
    assert old.returncode == 1
    assert old.stderr.startswith("error: NoHandler: ")
    assert "does not answer tether.channels" in old.stderr
