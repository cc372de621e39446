"""tether over NATS as a new user meets it: long channels, limits, a lost or
missing server, missing packages (a real nats-server on a free loopback port)."""

from __future__ import annotations

import asyncio
import logging
import sys
import time
from collections.abc import AsyncIterator, Iterator

import pytest

import tether
from _nats_server import NatsServer, free_port, running
from tether import Main, cli

pytestmark = pytest.mark.timeout(180)

LONG = "b" * 5000  # a plain channel: its subject token would be 5000 characters
ACCENTS = "\u00e9" * 1500  # 3000 bytes of UTF-8: a base32 token of 4800 characters


@pytest.fixture(scope="module")
def nats() -> Iterator[NatsServer]:
    with running() as server:
        yield server


async def until(cond: object, seconds: float = 30.0) -> None:
    deadline = time.monotonic() + seconds
    while not cond() and time.monotonic() < deadline:  # type: ignore[operator]
        await asyncio.sleep(0.01)


def test_long_channel_tokens_are_hashed_to_a_fixed_length() -> None:
    from tether.nats.stream import MAX_TOKEN, channel_token

    for channel in (LONG, ACCENTS, "x" * (MAX_TOKEN + 1), "a." * 100 + "z"):
        token = channel_token(channel.encode())
        assert token.startswith("~~") and len(token) == 34
        assert set(token[2:]) <= set("abcdefghijklmnopqrstuvwxyz234567")
    assert channel_token(LONG.encode()) != channel_token(("c" * 5000).encode())
    assert channel_token(b"x" * MAX_TOKEN) == "x" * MAX_TOKEN  # short enough: itself


async def test_long_channels_end_to_end(nats: NatsServer) -> None:
    url = f"{nats.url}/longch"
    async with Main() as main:
        got: list[tuple[str, int]] = []

        @main.handle(ACCENTS, roles="nats")  # before listen
        def accents(call: tether.Call, x: int) -> int:
            return x + 1

        @main.on(LONG, roles="nats")
        def event(call: tether.Call, x: int) -> None:
            got.append((call.channel, x))

        server = await main.listen(url)

        @main.handle(LONG, roles="nats")  # after listen: followed
        def long(call: tether.Call, x: int) -> str:
            return call.channel[:3] + str(x)

        @main.handle(LONG + ".s", roles="nats")
        async def count(call: tether.Call, n: int) -> AsyncIterator[int]:
            for i in range(n):
                yield i

        await server.sync()  # type: ignore[attr-defined]
        async with tether.connect(url) as peer:
            assert await peer.invoke(ACCENTS, 1, timeout=30) == 2
            assert await peer.invoke(LONG, 7, timeout=30) == "bbb7"
            assert [x async for x in peer.stream(LONG + ".s", 5, timeout=30)] == list(range(5))
            await peer.send(LONG, 3)
            await until(lambda: got)
            assert got == [(LONG, 3)]
            with pytest.raises(tether.NoHandler, match="no responders"):
                await peer.invoke("c" * 5000, timeout=30)
            assert await peer.invoke(ACCENTS, 2, timeout=30) == 3  # the link is still fine
            assert not peer.closed


async def test_an_invoke_over_main_max_frame_size_is_answered_at_once(nats: NatsServer) -> None:
    url = f"{nats.url}/mfs"
    async with Main(max_frame_size=100_000) as main:

        @main.handle("echo", roles="nats")
        def echo(call: tether.Call, data: bytes) -> int:
            return len(data)

        server = await main.listen(url)
        async with tether.connect(url) as peer:
            assert await peer.invoke("echo", bytes(10), timeout=30) == 10
            kept = list(server.peers)
            assert len(kept) == 1
            with pytest.raises(tether.PayloadTooLarge, match="max_frame_size of 100000"):
                await peer.invoke("echo", bytes(500_000), timeout=60)  # not InvokeTimeout
            assert server.too_large == 1  # type: ignore[attr-defined]
            assert await peer.invoke("echo", bytes(20), timeout=30) == 20
            assert server.peers == kept


async def test_payload_too_large_names_max_payload(nats: NatsServer) -> None:
    url = f"{nats.url}/maxpay"
    async with Main() as main:

        @main.handle("size", roles="nats")
        def size(call: tether.Call, data: bytes) -> int:
            return len(data)

        server = await main.listen(url)
        async with tether.connect(url) as peer:
            with pytest.raises(tether.PayloadTooLarge, match="max_payload") as err:
                await peer.invoke("size", bytes(2 * 1024 * 1024), timeout=30)
            assert "max_frame_size" not in str(err.value)
            with pytest.raises(tether.PayloadTooLarge, match="max_payload"):
                await server.send("size", bytes(2 * 1024 * 1024))  # type: ignore[attr-defined]


async def test_an_unreachable_server_is_a_connect_error_naming_the_cause() -> None:
    url = f"nats://127.0.0.1:{free_port()}/gone"
    t0 = time.monotonic()
    with pytest.raises(tether.ConnectError, match=r"(?i)refused"):
        await tether.connect(url, connect_timeout=40)
    async with Main() as main:
        with pytest.raises(tether.ConnectError, match=r"(?i)refused"):
            await main.listen(url)
    loop = asyncio.get_running_loop()
    with pytest.raises(tether.ConnectError, match=r"(?i)refused"):
        await loop.run_in_executor(None, lambda: tether.sync.connect(url, connect_timeout=40))
    assert time.monotonic() - t0 < 40  # not one connect_timeout, let alone three


async def test_a_failed_connect_leaves_no_task_behind(nats: NatsServer) -> None:
    with pytest.raises(tether.ConnectError, match="no responders"):
        await tether.connect(f"{nats.url}/nobody.here")

    def writers() -> list[asyncio.Task[object]]:
        return [
            t
            for t in asyncio.all_tasks()
            if "_write_messages" in getattr(t.get_coro(), "__qualname__", "")
        ]

    await until(lambda: not writers(), 10)
    assert writers() == []


async def test_calls_while_reconnecting_fail_at_once_then_work() -> None:
    with running() as nats:
        url = f"{nats.url}/down"
        async with Main() as main:

            @main.handle("twice", roles="nats")
            def twice(call: tether.Call, x: int) -> int:
                return 2 * x

            await main.listen(url)
            async with tether.connect(url) as peer:
                assert await peer.invoke("twice", 1) == 2
                nc = peer._stream._nc  # type: ignore[attr-defined]
                loop = asyncio.get_running_loop()
                await loop.run_in_executor(None, nats.stop)
                await until(lambda: not nc.is_connected)
                assert not nc.is_connected
                with pytest.raises(tether.PeerGone, match=r"lost the NATS server.*reconnecting"):
                    await peer.invoke("twice", 2, timeout=60)  # at once, not InvokeTimeout
                with pytest.raises(tether.PeerGone, match="reconnecting"):
                    await peer.send("twice", 3)
                with pytest.raises(tether.PeerGone, match="reconnecting"):
                    async for _ in peer.stream("twice", 4, timeout=60):
                        pass
                assert not peer.closed
                await loop.run_in_executor(None, nats.start)
                result = None
                deadline = time.monotonic() + 60
                while result is None and time.monotonic() < deadline:
                    try:
                        result = await peer.invoke("twice", 5, timeout=5)
                    except (tether.PeerGone, tether.NoHandler):
                        await asyncio.sleep(0.2)  # not reconnected yet (client or main)
                assert result == 10


async def test_missing_packages_are_named(
    nats: NatsServer, monkeypatch: pytest.MonkeyPatch, tmp_path: object
) -> None:
    monkeypatch.setitem(sys.modules, "nkeys", None)  # as if not installed
    creds = f"{nats.url}/keys?creds=/nonexistent/user.creds"
    with pytest.raises(ImportError, match="nkeys package"):
        await tether.connect(creds)
    with pytest.raises(ImportError, match="nkeys package"):
        await tether.connect(f"{nats.url}/keys?nkey=/nonexistent/seed.nk")
    monkeypatch.setitem(sys.modules, "nats", None)
    with pytest.raises(ImportError, match=r"nats-py package: pip install 'tether-ipc\[nats\]'"):
        await tether.connect(f"{nats.url}/nopkg")
    async with Main() as main:
        with pytest.raises(ImportError, match=r"tether-ipc\[nats\]"):
            await main.listen(f"{nats.url}/nopkg")


def test_cli_errors_over_nats_are_one_line(
    nats: NatsServer, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    logger = logging.getLogger("tether")
    level = logger.level
    try:
        _cli_errors(nats, monkeypatch, capsys)
    finally:
        logger.setLevel(level)  # (the CLI quiets tether's logger; the tests after need it)


def _cli_errors(
    nats: NatsServer, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    url = f"{nats.url}/cli.errors"
    code = cli.main(["call", "--secret", "x" * 40, url, "echo", "1"])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("error: ") and "--secret is not for nats://" in err
    monkeypatch.setitem(sys.modules, "nkeys", None)
    code = cli.main(["call", f"{url}?creds=/nonexistent/user.creds", "echo", "1"])
    err = capsys.readouterr().err
    assert code == 1 and err.startswith("error: ") and "nkeys package" in err
    assert "Traceback" not in err
