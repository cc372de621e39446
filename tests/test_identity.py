"""Trust boundaries: who the caller is (``call.peer``), what strangers may reach,
who may connect to a unix socket, and that pickle never crosses.
"""

from __future__ import annotations

import asyncio
import logging
import os
import pickle
import socket
import stat
import tempfile
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import msgspec
import pytest

import _targets
import tether
from tether import codec, wire
from tether.protocol import Connection

pytestmark = pytest.mark.timeout(60)


def _who(call: tether.Call) -> dict[str, Any]:
    p = call.peer
    return {
        "role": p.role,
        "pid": p.pid,
        "uid": p.uid,
        "gid": p.gid,
        "address": p.address,
        "origin": p.origin,
        "local": p.local,
    }


def _install(main: tether.Main) -> list[str]:
    heard: list[str] = []
    main.handle("who", _who, roles={"client", "child"})
    main.handle("open", lambda call: "local only")  # no roles=: local peers only

    @main.on("note")
    def note(call: tether.Call, text: str) -> None:  # no roles=: local peers only
        heard.append(text)

    @main.on("note", roles="client")
    def note_client(call: tether.Call, text: str) -> None:
        heard.append("client:" + text)

    @main.on("solo")  # a channel's only listener, no roles= (the short path)
    def solo(call: tether.Call, text: str) -> None:
        heard.append("solo:" + text)

    return heard


# -- call.peer --------------------------------------------------------------------


async def test_unix_peer_identity_comes_from_the_kernel(sock_path: str) -> None:
    async with tether.Main(timeout=10.0) as main:
        _install(main)
        server = await main.listen(f"unix://{sock_path}")
        async with tether.connect(str(server.address)) as peer:
            who = await peer.invoke("who")
            assert (peer.pid, peer.uid, peer.gid) == (os.getpid(), os.getuid(), os.getgid())
            assert peer.address == f"unix://{sock_path}" and peer.origin is None
    assert who == {
        "role": "client",
        "pid": os.getpid(),
        "uid": os.geteuid(),
        "gid": os.getegid(),
        "address": f"unix://{sock_path}",
        "origin": None,
        "local": True,
    }


async def test_tcp_peer_has_an_address_and_no_ids() -> None:
    async with tether.Main(timeout=10.0) as main:
        _install(main)
        server = await main.listen("tcp://127.0.0.1:0")
        async with tether.connect(str(server.address)) as peer:
            who = await peer.invoke("who")
            assert peer.address == str(server.address)
            assert (peer.pid, peer.uid, peer.gid) == (None, None, None)
            host, port = peer._sock.getsockname()[:2]
    assert who["address"] == f"tcp://{host}:{port}"
    assert (who["pid"], who["uid"], who["gid"], who["origin"]) == (None, None, None, None)
    assert who["local"] is False


async def test_blocking_peer_identity(sock_path: str) -> None:
    async with tether.Main(timeout=10.0) as main:
        _install(main)
        server = await main.listen(f"unix://{sock_path}")

        def run() -> tuple[Any, ...]:
            with tether.sync.connect(str(server.address)) as peer:
                who = peer.invoke("who")
                return who, peer.pid, peer.uid, peer.gid, peer.address, peer.origin

        who, pid, uid, gid, address, origin = await asyncio.to_thread(run)
    assert who["pid"] == os.getpid() and who["uid"] == os.geteuid() and who["local"] is True
    assert (pid, uid, gid, address, origin) == (
        os.getpid(),
        os.getuid(),
        os.getgid(),
        f"unix://{sock_path}",
        None,
    )


async def test_child_identity_both_ways() -> None:
    async with tether.Main(timeout=20.0) as main:
        _install(main)
        child = await main.spawn(_targets.report_identity)
        mine = await child.invoke("identity")  # what the child's peer says of main
        who = await child.invoke("ask_who")  # what main's call.peer says of the child
        assert (child.pid, child.uid, child.address) == (who["pid"], os.getuid(), who["address"])
        await child.close()
    assert who["pid"] != os.getpid() and who["role"] == "child" and who["local"] is True
    assert who["address"] == f"child:{who['pid']}" and who["uid"] == os.geteuid()
    # A socketpair's credentials are its creator's: main, as the child should see it.
    assert mine == {"pid": os.getpid(), "uid": os.geteuid(), "address": f"main:{os.getpid()}"}


# -- exposure by role -------------------------------------------------------------


async def test_tcp_peer_reaches_only_handlers_naming_its_role(sock_path: str) -> None:
    async with tether.Main(timeout=10.0) as main:
        heard = _install(main)
        tcp = await main.listen("tcp://127.0.0.1:0")
        unix = await main.listen(f"unix://{sock_path}")
        async with tether.connect(str(tcp.address)) as stranger:
            with pytest.raises(tether.Forbidden, match="local peers only"):
                await stranger.invoke("open")
            assert (await stranger.invoke("who"))["local"] is False  # names "client": reached
            await stranger.send("note", "from tcp")
            await stranger.send("solo", "from tcp")
            await stranger.invoke("who")  # FIFO: the events were handled before this answer
        async with tether.connect(str(unix.address)) as local:
            assert await local.invoke("open") == "local only"
            await local.send("note", "from unix")
            await local.send("solo", "from unix")
            await local.invoke("who")
    # The stranger's events skipped the listeners without roles, reached the one naming it.
    assert heard == ["client:from tcp", "from unix", "client:from unix", "solo:from unix"]


async def test_blocking_tcp_client_is_a_stranger_too() -> None:
    async with tether.Main(timeout=10.0) as main:
        _install(main)
        server = await main.listen("tcp://127.0.0.1:0")

        def run() -> None:
            with tether.sync.connect(str(server.address)) as peer:
                with pytest.raises(tether.Forbidden):
                    peer.invoke("open")
                assert peer.invoke("who")["local"] is False

        await asyncio.to_thread(run)


# -- unix sockets: private directory and uid allow list --------------------------


@pytest.fixture
def folder() -> Any:
    d = tempfile.mkdtemp(prefix="ti-", dir="/tmp")
    try:
        yield d
    finally:
        for name in os.listdir(d):
            os.unlink(os.path.join(d, name))
        os.rmdir(d)


@pytest.mark.parametrize("mode", [0o755, 0o750, 0o701, 0o1777])
async def test_listen_refuses_a_directory_others_can_enter(folder: str, mode: int) -> None:
    os.chmod(folder, mode)
    async with tether.Main() as main:
        with pytest.raises(PermissionError, match="private directory") as ei:
            await main.listen(f"unix://{folder}/s.sock")
    assert folder in str(ei.value)
    assert not os.path.exists(f"{folder}/s.sock")


async def test_listen_in_a_private_directory_makes_a_0600_socket(folder: str) -> None:
    os.chmod(folder, 0o700)
    async with tether.Main() as main:
        server = await main.listen(f"unix://{folder}/s.sock")
        assert stat.S_IMODE(os.stat(f"{folder}/s.sock").st_mode) == 0o600
        assert server.uids == frozenset({os.geteuid()}) and server.refused == 0


async def test_a_uid_not_allowed_is_refused_logged_and_counted(
    folder: str, caplog: pytest.LogCaptureFixture
) -> None:
    other = os.geteuid() + 4242  # main's own uid is then not on the list
    async with tether.Main() as main:
        _install(main)
        server = await main.listen(f"unix://{folder}/s.sock", uids={other})
        caplog.set_level(logging.WARNING, "tether")
        with pytest.raises(tether.PeerGone):
            await tether.connect(str(server.address), connect_timeout=5.0)
        assert server.refused == 1 and not main.peers
    text = "\n".join(r.getMessage() for r in caplog.records if r.levelno == logging.WARNING)
    assert f"uid {os.geteuid()}" in text and f"pid {os.getpid()}" in text and folder in text


def _nobody_connects(path: str, hello: bool) -> int:
    """Fork a process that becomes uid 65534 and connects; its exit code says what it saw.

    0: main closed the connection without a word (refused). 1: main said hello,
    and (``hello``) then answered ``open`` Forbidden and ``who`` as a stranger.
    """
    pid = os.fork()
    if pid == 0:
        code = 9
        try:
            os.setgid(65534)
            os.setuid(65534)
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            sock.settimeout(5.0)
            try:
                sock.connect(path)
            except OSError:
                os._exit(7)  # the kernel refused: not the check under test
            conn = Connection("client")
            sock.sendall(conn.data_to_send()[0])
            got: list[wire.Frame] = []
            while conn.peer_hello is None:
                data = sock.recv(65536)
                if not data:
                    os._exit(0)
                got += conn.receive_data(data)
            code = 1
            if hello:
                conn.send_invoke(b"open", (), "a")
                conn.send_invoke(b"who", (), "b")
                sock.sendall(conn.data_to_send()[0])
                while len(got) < 2:
                    got += conn.receive_data(sock.recv(65536))
                err = codec.error_decoder.decode(got[0].body)
                who = msgspec.msgpack.decode(got[1].body)
                if err.code == "forbidden" and who["uid"] == 65534 and who["local"] is False:
                    code = 2
        except OSError:  # main closed the connection while we wrote
            code = 0 if code == 9 else 8
        except BaseException:
            code = 8
        os._exit(code)
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status)


needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="needs root to become another uid")


@needs_root
async def test_another_user_is_refused_by_default(folder: str) -> None:
    os.chmod(folder, 0o711)  # even if it could enter the directory
    async with tether.Main() as main:
        _install(main)
        path = f"{folder}/s.sock"
        with pytest.raises(PermissionError):  # the directory must be private by default
            await main.listen(f"unix://{path}")
        os.chmod(folder, 0o700)
        server = await main.listen(f"unix://{path}")
        os.chmod(folder, 0o711)  # (loosened afterwards, to reach the uid check)
        os.chmod(path, 0o666)
        code = await asyncio.to_thread(_nobody_connects, path, False)
        assert code == 0 and server.refused == 1


@needs_root
async def test_an_allowed_other_user_is_a_stranger(folder: str) -> None:
    os.chmod(folder, 0o711)
    async with tether.Main(timeout=10.0) as main:
        _install(main)
        path = f"{folder}/s.sock"
        server = await main.listen(f"unix://{path}", uids={os.geteuid(), 65534})
        # The other uid can reach the socket (the directory and our uid check guard it).
        assert stat.S_IMODE(os.stat(path).st_mode) == 0o666
        code = await asyncio.to_thread(_nobody_connects, path, True)
        assert code == 2 and server.refused == 0


@pytest.mark.parametrize("mode", [0o711, 0o755, 0o757, 0o775])
async def test_allowing_other_uids_lets_them_enter_but_not_write(folder: str, mode: int) -> None:
    os.chmod(folder, mode)
    async with tether.Main() as main:
        address = f"unix://{folder}/s.sock"
        if mode & 0o022:
            with pytest.raises(PermissionError, match="not writable by group or others"):
                await main.listen(address, uids={os.geteuid(), 65534})
        else:
            server = await main.listen(address, uids={os.geteuid(), 65534})
            assert server.uids == {os.geteuid(), 65534}
        with pytest.raises(PermissionError, match="mode 0700"):  # own uid only: private
            await main.listen(f"unix://{folder}/t.sock")


async def test_listen_uids_must_be_ints(folder: str) -> None:
    async with tether.Main() as main:
        for bad in (0, "0", ["x"], [True]):
            with pytest.raises(TypeError):
                await main.listen(f"unix://{folder}/s.sock", uids=bad)  # type: ignore[arg-type]


# -- no pickle --------------------------------------------------------------------


class _Evil:
    """Unpickling this creates a file: proof that someone unpickled it."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, ...]:
        return (open, (self.marker, "w"))


@pytest.fixture
async def pickle_target(sock_path: str) -> AsyncIterator[tuple[str, Path]]:
    marker = Path(os.path.dirname(sock_path)) / "pwned"
    async with tether.Main(timeout=10.0) as main:

        @main.handle("take")
        def take(call: tether.Call, x: Any) -> str:
            return type(x).__name__

        @main.handle("take_int")
        def take_int(call: tether.Call, x: int) -> int:
            return x

        await main.listen(f"unix://{sock_path}")
        yield sock_path, marker


def _attack(path: str, frames: list[tuple[bytes, bytes]]) -> list[wire.Frame]:
    """Say hello, send INVOKE frames with hand-made bodies; return the answers."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(5.0)
    with sock:
        sock.connect(path)
        conn = Connection("client")
        sock.sendall(conn.data_to_send()[0])
        out = bytearray()
        for rid, (channel, body) in enumerate(frames, 1):
            wire.encode_frame(out, wire.K_INVOKE, rid, 0, channel, body)
        sock.sendall(out)
        got: list[wire.Frame] = []
        while len(got) < len(frames):
            data = sock.recv(65536)
            assert data, "main hung up"
            got += [f for f in conn.receive_data(data) if f.kind in (wire.K_RESULT, wire.K_ERROR)]
    return sorted(got, key=lambda f: f.request_id)


@pytest.mark.parametrize("protocol", [0, pickle.HIGHEST_PROTOCOL])
async def test_a_pickle_payload_is_never_unpickled(
    pickle_target: tuple[str, Path], protocol: int
) -> None:
    path, marker = pickle_target
    evil = pickle.dumps(_Evil(str(marker)), protocol=protocol)
    pickle.loads(evil).close()  # the payload works: unpickling it creates the file
    assert marker.exists()
    marker.unlink()
    as_ext = [codec.encoder.encode([msgspec.msgpack.Ext(code, evil)]) for code in (3, 4, 0x50, 127)]
    frames = [(b"take", body) for body in as_ext]
    frames += [(b"take_int", as_ext[0]), (b"take", evil), (b"take_int", evil)]
    answers = await asyncio.to_thread(_attack, path, frames)
    assert not marker.exists()
    # Ext 3 is tether's pickle type: refused on a connection that did not opt in...
    assert codec.error_decoder.decode(answers[0].body).code == "bad_request"
    # ...so is Ext 4 (a descriptor reference) in a frame with no attachments...
    assert codec.error_decoder.decode(answers[1].body).code == "bad_request"
    # ...an extension type tether does not define reaches a handler undecoded...
    for f in answers[2:4]:
        assert f.kind == wire.K_RESULT and msgspec.msgpack.decode(f.body) == "Ext"
    # ...a typed argument refuses it, and a raw pickle body is no MessagePack.
    for f in answers[4:]:
        assert f.kind == wire.K_ERROR
        assert codec.error_decoder.decode(f.body).code == "bad_request"


async def test_attachment_references_in_a_frame_without_attachments_are_bad_request(
    pickle_target: tuple[str, Path],
) -> None:
    """docs/protocol.md 3.6 over a unix socket (no store): Ext 1/2/4 naming no attachment."""
    path, _ = pickle_target
    refs = [
        msgspec.msgpack.Ext(codec.EXT_BYTES, bytes(4)),
        msgspec.msgpack.Ext(codec.EXT_NDARRAY, codec.encoder.encode([0, "|u1", [1]])),
        msgspec.msgpack.Ext(codec.EXT_HANDLE, bytes(4)),
    ]
    frames = [(b"take", codec.encoder.encode([ref])) for ref in refs]
    answers = await asyncio.to_thread(_attack, path, frames)
    for f in answers:
        assert f.kind == wire.K_ERROR
        info = codec.error_decoder.decode(f.body)
        assert info.code == "bad_request" and "no attachments" in info.message, info
