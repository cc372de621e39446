"""Addresses and their listening sockets: parsing, and never taking a path from a live server."""

from __future__ import annotations

import errno
import os
import socket
from typing import Any

import pytest

from tether.address import Address, parse_address


def test_parse_unix_and_tcp() -> None:
    assert parse_address("unix:///tmp/x.sock") == Address("unix", path="/tmp/x.sock")
    assert parse_address("tcp://127.0.0.1:9") == Address("tcp", host="127.0.0.1", port=9)
    assert parse_address("tcp://:9").host == "127.0.0.1"
    addr = Address("unix", path="/a")
    assert parse_address(addr) is addr


@pytest.mark.parametrize("bad", [5, None, b"unix:///tmp/x"])
def test_a_non_str_address_is_a_type_error(bad: Any) -> None:
    with pytest.raises(TypeError, match="address must be a str"):
        parse_address(bad)


@pytest.mark.parametrize("bad", ["unix://", "tcp://127.0.0.1", "tcp://h:notaport", "http://x:1"])
def test_malformed_addresses_are_value_errors(bad: str) -> None:
    with pytest.raises(ValueError):
        parse_address(bad)


def test_listen_refuses_the_path_of_a_live_server(sock_path: str) -> None:
    addr = parse_address(f"unix://{sock_path}")
    live = addr.listen()
    try:
        with pytest.raises(OSError) as ei:
            addr.listen()
        assert ei.value.errno == errno.EADDRINUSE
        assert sock_path in str(ei.value) and "address in use" in str(ei.value)
        # The live server still owns its path: a client reaches it.
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as c:
            c.connect(sock_path)
            conn, _ = live.accept()
            conn.close()
    finally:
        live.close()


def test_listen_refuses_a_live_server_with_a_full_backlog(sock_path: str) -> None:
    live = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    live.bind(sock_path)
    live.listen(0)
    waiting = []
    try:
        for _ in range(4):  # fill the backlog: a non-blocking connect now finds it full
            c = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            c.setblocking(False)
            if c.connect_ex(sock_path) != 0:
                c.close()
                break
            waiting.append(c)
        with pytest.raises(OSError) as ei:
            parse_address(f"unix://{sock_path}").listen()
        assert ei.value.errno == errno.EADDRINUSE
    finally:
        for c in waiting:
            c.close()
        live.close()


def test_listen_replaces_a_stale_socket_file(sock_path: str) -> None:
    dead = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    dead.bind(sock_path)
    dead.listen(1)
    dead.close()  # the file stays behind, nobody accepts on it
    assert os.path.exists(sock_path)
    sock = parse_address(f"unix://{sock_path}").listen()
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as c:
            c.connect(sock_path)
    finally:
        sock.close()


def test_listen_never_removes_a_regular_file(sock_path: str) -> None:
    with open(sock_path, "w") as f:
        f.write("precious")
    with pytest.raises(FileExistsError) as ei:
        parse_address(f"unix://{sock_path}").listen()
    assert sock_path in str(ei.value) and "not a socket" in str(ei.value)
    with open(sock_path) as f:
        assert f.read() == "precious"


def test_listen_in_a_missing_directory_names_it(sock_path: str) -> None:
    path = os.path.join(os.path.dirname(sock_path), "missing", "s.sock")
    with pytest.raises(FileNotFoundError) as ei:
        parse_address(f"unix://{path}").listen()
    assert os.path.dirname(path) in str(ei.value)


def test_tcp_port_in_use_names_the_address() -> None:
    first = parse_address("tcp://127.0.0.1:0").listen()
    try:
        port = first.getsockname()[1]
        with pytest.raises(OSError) as ei:
            parse_address(f"tcp://127.0.0.1:{port}").listen()
        assert ei.value.errno == errno.EADDRINUSE
        assert f"tcp://127.0.0.1:{port}" in str(ei.value)
    finally:
        first.close()


def test_unix_socket_file_mode_is_0600(sock_path: str) -> None:
    sock = parse_address(f"unix://{sock_path}").listen()
    try:
        assert os.stat(sock_path).st_mode & 0o777 == 0o600
    finally:
        sock.close()
