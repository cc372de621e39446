"""Mistakes surface at the call, in tether's words (issue 8): arguments, connecting, timeouts."""

from __future__ import annotations

import asyncio
import contextlib
import math
import pickle
import socket
import sys
import threading
import types
from collections.abc import Iterator
from typing import Any

import pytest

import _targets
import tether
import tether.sync

pytestmark = pytest.mark.timeout(60)


# -- arguments checked at the call ----------------------------------------------

BAD_OPTIONS = [
    ({"timeout": "5"}, TypeError, "timeout"),
    ({"timeout": -1}, ValueError, "timeout"),
    ({"timeout": math.nan}, ValueError, "timeout"),
    ({"connect_timeout": 0}, ValueError, "connect_timeout"),
    ({"max_frame_size": 0}, ValueError, "max_frame_size"),
    ({"max_frame_size": -5}, ValueError, "max_frame_size"),
    ({"max_frame_size": 65536.0}, TypeError, "max_frame_size"),
    ({"max_inflight": 0}, ValueError, "max_inflight"),
    ({"spin": -0.1}, ValueError, "spin"),
]


@pytest.mark.parametrize(("kw", "error", "name"), BAD_OPTIONS)
async def test_connect_checks_its_options_before_connecting(
    kw: dict[str, Any], error: type[Exception], name: str, sock_path: str
) -> None:
    # Nothing listens at sock_path: an unchecked option would fail as ConnectError instead.
    with pytest.raises(error, match=name):
        await tether.connect(f"unix://{sock_path}", **kw)
    with pytest.raises(error, match=name):
        tether.sync.connect(f"unix://{sock_path}", **kw)


@pytest.mark.parametrize(
    ("kw", "error", "name"),
    [
        ({"timeout": "5"}, TypeError, "timeout"),
        ({"timeout": -1}, ValueError, "timeout"),
        ({"timeout": math.nan}, ValueError, "timeout"),
        ({"start_method": "thread"}, ValueError, "start_method must be one of .*spawn"),
        ({"max_frame_size": 0}, ValueError, "max_frame_size"),
        ({"max_frame_size": "big"}, TypeError, "max_frame_size"),
    ],
)
async def test_main_checks_its_options(
    kw: dict[str, Any], error: type[Exception], name: str
) -> None:
    with pytest.raises(error, match=name):
        tether.Main(**kw)


async def test_spawn_checks_target_and_arguments_in_main() -> None:
    async with tether.Main() as main:
        with pytest.raises(TypeError, match="callable target, not int"):
            await main.spawn(42)  # type: ignore[arg-type]
        with pytest.raises(TypeError, match="missing a required argument"):
            await main.spawn(_targets.invoke_main_sync, 1)  # needs (peer, a, b)
        assert not main.children
    with pytest.raises(tether.ConnectionClosed, match="closed"):
        await main.spawn(_targets.invoke_main_sync, 1, 2)
    assert not main.children


async def test_spawn_refuses_a_target_the_child_cannot_import(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    def target(peer: tether.Peer) -> None:
        pass

    # As typed at the interactive prompt: defined in a __main__ without a file.
    monkeypatch.setattr(target, "__module__", "__main__")
    monkeypatch.setattr(target, "__qualname__", "target")
    monkeypatch.setitem(sys.modules, "__main__", types.ModuleType("__main__"))
    async with tether.Main() as main:
        with pytest.raises(TypeError, match=r"child can import.*interactive session"):
            await main.spawn(target)
        assert not main.children


# -- connecting -------------------------------------------------------------------


def _closed_port() -> int:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port: int = s.getsockname()[1]
    s.close()  # nothing listens there now
    return port


async def test_a_refused_connection_is_a_connect_error_naming_the_address(sock_path: str) -> None:
    for address in (f"tcp://127.0.0.1:{_closed_port()}", f"unix://{sock_path}"):
        with pytest.raises(tether.ConnectError, match="cannot connect to") as info:
            await tether.connect(address)
        assert isinstance(info.value, tether.PeerGone)  # `except PeerGone` keeps working
        assert info.value.address == address
        assert isinstance(info.value.__cause__, OSError)
        with pytest.raises(tether.ConnectError) as sync_info:
            tether.sync.connect(address)
        assert sync_info.value.address == address
    copy = pickle.loads(pickle.dumps(info.value))
    assert type(copy) is tether.ConnectError and copy.address == info.value.address


@pytest.fixture
def http_port() -> Iterator[int]:
    """A TCP port where something that is not tether answers (an HTTP 400), once per connection."""
    listener = socket.create_server(("127.0.0.1", 0))
    listener.settimeout(30)

    def serve() -> None:
        with listener:
            while True:
                try:
                    conn, _ = listener.accept()
                except OSError:
                    return
                with conn:
                    conn.sendall(b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\n\r\n")
                    conn.settimeout(5)
                    with contextlib.suppress(OSError):
                        conn.recv(65536)

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    yield listener.getsockname()[1]
    listener.shutdown(socket.SHUT_RDWR)  # wakes the accept
    thread.join(10)


async def test_connecting_to_something_that_is_not_tether_says_so(http_port: int) -> None:
    address = f"tcp://127.0.0.1:{http_port}"
    with pytest.raises(tether.ProtocolError, match=r"not a tether peer.*HTTP/1\.1 400") as info:
        await tether.connect(address, connect_timeout=20)
    assert str(info.value).startswith("not a tether peer: it sent b'HTTP")
    with pytest.raises(tether.ProtocolError, match=r"not a tether peer.*HTTP/1\.1 400"):
        await asyncio.to_thread(tether.sync.connect, address, connect_timeout=20)


# -- timeouts ----------------------------------------------------------------------------


async def test_a_default_timeout_expiry_says_it_was_the_default() -> None:
    async with tether.Main(timeout=0.2) as main:
        child = await main.spawn(_targets.serve_basic)
        with pytest.raises(
            tether.InvokeTimeout, match=r"within 0.2 s \(the default timeout: pass timeout="
        ):
            await child.invoke("forever", "a")
        with pytest.raises(tether.InvokeTimeout) as info:
            await child.invoke("forever", "b", timeout=0.2)
        assert "default" not in str(info.value)  # an explicit timeout is not the default


async def test_a_blocking_default_timeout_expiry_says_it_was_the_default(sock_path: str) -> None:
    async with tether.Main() as main:

        @main.handle("slow")
        async def slow(call: tether.Call) -> None:
            await asyncio.sleep(10)

        server = await main.listen(f"unix://{sock_path}")

        def run() -> tuple[str, str]:
            with tether.sync.connect(str(server.address), timeout=0.2) as peer:
                with pytest.raises(tether.InvokeTimeout) as by_default:
                    peer.invoke("slow")
                with pytest.raises(tether.InvokeTimeout) as given:
                    peer.invoke("slow", timeout=0.2)
            return str(by_default.value), str(given.value)

        by_default, given = await asyncio.to_thread(run)
    assert "within 0.2 s (the default timeout: pass timeout=" in by_default
    assert "default" not in given
