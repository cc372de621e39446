"""Shared-secret authentication (AUTH, docs/protocol.md 6.1) and the non-loopback listener rule."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import re
import shutil
import socket
import ssl
import subprocess
import time
from collections.abc import Callable

import pytest

import tether
import tether.sync
from tether import codec
from tether.errors import AuthenticationError, ProtocolError
from tether.protocol import NONCE_SIZE, Connection, State, auth_proof
from tether.wire import Frame, FrameParser, Kind, encode_frame

SECRET = b"s3cret-s3cret-s3cret"
OTHER = b"another-secret-entirely"


def transfer(src: Connection, dst: Connection) -> list[Frame]:
    return dst.receive_data(bytes(src.data_to_send()[0]))


def pair(a_secret: bytes | None, b_secret: bytes | None) -> tuple[Connection, Connection]:
    a = Connection("client", secret=a_secret, initiator=True)
    b = Connection("main", secret=b_secret, initiator=False)
    return a, b


def kinds(data: bytes | bytearray) -> list[int]:
    return [f.kind for f in FrameParser().feed(bytes(data))]


# -- the core ------------------------------------------------------------------------------


def test_both_sides_prove_the_secret_then_frames_flow() -> None:
    a, b = pair(SECRET, SECRET)
    a_hello = bytes(a.data_to_send()[0])
    b_hello = bytes(b.data_to_send()[0])
    assert kinds(a_hello) == [Kind.HELLO] and kinds(b_hello) == [Kind.HELLO]
    assert SECRET not in a_hello + b_hello
    assert b.receive_data(a_hello) == []
    assert b.state is State.HANDSHAKE and b.peer_hello is None  # a's AUTH not yet in
    assert a.receive_data(b_hello) == []
    a_auth = bytes(a.data_to_send()[0])
    b_auth = bytes(b.data_to_send()[0])
    assert kinds(a_auth) == [Kind.AUTH] and kinds(b_auth) == [Kind.AUTH]
    assert SECRET not in a_auth + b_auth
    b.receive_data(a_auth)
    a.receive_data(b_auth)
    assert {a.state, b.state} == {State.OPEN}
    assert a.peer_hello is not None and b.peer_hello is not None
    a.send_event(b"ev", (1,))
    assert [f.channel for f in transfer(a, b)] == ["ev"]


def test_frames_queued_before_the_proof_wait_behind_our_auth() -> None:
    a, b = pair(SECRET, SECRET)
    rid = a.send_invoke(b"early", (1,), waiter="w")
    assert kinds(a.data_to_send()[0]) == [Kind.HELLO]  # the INVOKE is held back
    assert a.data_to_send()[0] == b"" and a.buffered_out == 0
    a.receive_data(bytes(b.data_to_send()[0]))  # b's HELLO: now a can prove
    out = bytes(a.data_to_send()[0])
    assert kinds(out) == [Kind.AUTH, Kind.INVOKE]
    assert FrameParser().feed(out)[1].request_id == rid


def test_pipelined_invoke_is_delivered_only_after_the_proof() -> None:
    a, b = pair(SECRET, SECRET)
    a.send_invoke(b"early", (1,), waiter="w")
    hello_a = bytes(a.data_to_send()[0])
    a.receive_data(bytes(b.data_to_send()[0]))
    rest = bytes(a.data_to_send()[0])  # AUTH + INVOKE
    frames = b.receive_data(hello_a + rest)
    assert [(f.kind, f.channel) for f in frames] == [(Kind.INVOKE, "early")]
    assert b.state is State.OPEN


@pytest.mark.parametrize(
    ("a_secret", "b_secret", "a_says", "b_says"),
    [
        (SECRET, OTHER, "proof is wrong", "proof is wrong"),
        (None, SECRET, "requires a shared secret", "has no shared secret"),
        (SECRET, None, "has no shared secret", "requires a shared secret"),
    ],
)
def test_mismatched_secrets_are_refused_on_both_sides(
    a_secret: bytes | None, b_secret: bytes | None, a_says: str, b_says: str
) -> None:
    a, b = pair(a_secret, b_secret)
    ha, hb = bytes(a.data_to_send()[0]), bytes(b.data_to_send()[0])
    errors = []
    for conn, hello in ((a, hb), (b, ha)):
        try:
            conn.receive_data(hello)
        except AuthenticationError as exc:
            errors.append(str(exc))
    if len(errors) < 2:  # both have a secret: the proofs decide
        pa, pb = bytes(a.data_to_send()[0]), bytes(b.data_to_send()[0])
        for conn, proof in ((a, pb), (b, pa)):
            with pytest.raises(AuthenticationError) as ei:
                conn.receive_data(proof)
            errors.append(str(ei.value))
    assert a_says in errors[0] and b_says in errors[1]
    assert a.state is State.CLOSED and b.state is State.CLOSED
    assert isinstance(AuthenticationError("x"), ProtocolError)


def test_a_replayed_handshake_fails_on_a_new_connection() -> None:
    # Record the client's HELLO and AUTH on a genuine connection...
    a, b = pair(SECRET, SECRET)
    recorded = bytes(a.data_to_send()[0])
    a.receive_data(bytes(b.data_to_send()[0]))
    recorded += bytes(a.data_to_send()[0])
    assert b.receive_data(recorded) == [] and b.state is State.OPEN
    # ...and replay it to a new listener, which picked a new nonce.
    b2 = Connection("main", secret=SECRET, initiator=False)
    with pytest.raises(AuthenticationError, match="proof is wrong"):
        b2.receive_data(recorded)
    assert b2.peer_hello is None


def test_the_listeners_own_proof_reflected_back_fails() -> None:
    b = Connection("main", secret=SECRET, initiator=False)
    b_hello = bytes(b.data_to_send()[0])
    nonce = codec.hello_decoder.decode(FrameParser().feed(b_hello)[0].body).nonce
    # An attacker without the secret sends a HELLO and then the acceptor's
    # kind of proof computed... it can't; but even the right bytes with the
    # wrong direction label are refused.
    mine = b"\x01" * NONCE_SIZE
    hello = codec.encoder.encode(
        codec.Hello(protocol="tether", version=1, role="client", nonce=mine)
    )
    out = bytearray()
    encode_frame(out, Kind.HELLO, 0, 0, b"", hello)
    encode_frame(out, Kind.AUTH, 0, 0, b"", auth_proof(SECRET, False, nonce, mine))
    with pytest.raises(AuthenticationError, match="proof is wrong"):
        b.receive_data(bytes(out))
    b = Connection("main", secret=SECRET, initiator=False)
    nonce = codec.hello_decoder.decode(FrameParser().feed(bytes(b.data_to_send()[0]))[0].body).nonce
    out = bytearray()
    encode_frame(out, Kind.HELLO, 0, 0, b"", hello)
    encode_frame(out, Kind.AUTH, 0, 0, b"", auth_proof(SECRET, True, nonce, mine))
    assert b.receive_data(bytes(out)) == [] and b.state is State.OPEN  # the right label passes


def test_a_frame_in_place_of_the_proof_is_refused_and_not_delivered() -> None:
    a, b = pair(SECRET, SECRET)
    hello = bytes(a.data_to_send()[0])
    out = bytearray()
    encode_frame(out, Kind.INVOKE, 1, 0, b"steal", codec.encoder.encode([1]))
    with pytest.raises(AuthenticationError, match="expected the peer's AUTH"):
        b.receive_data(hello + bytes(out))
    assert b.state is State.CLOSED


def test_auth_without_a_secret_is_a_protocol_error() -> None:
    a, b = pair(None, None)
    transfer(a, b)
    transfer(b, a)
    out = bytearray()
    encode_frame(out, Kind.AUTH, 0, 0, b"", bytes(32))
    with pytest.raises(ProtocolError, match="AUTH outside the handshake"):
        b.receive_data(bytes(out))


def test_the_documented_test_vector() -> None:
    """docs/protocol.md 6.1 gives both proofs for a fixed secret and nonces: we make them."""
    with open(os.path.join(os.path.dirname(__file__), "..", "docs", "protocol.md")) as f:
        doc = f.read()
    m = re.search(
        r"initiator's AUTH body is\s+`([0-9a-f]{64})` and the\s+acceptor's is `([0-9a-f]{64})`", doc
    )
    assert m is not None
    secret, ni, na = b"0123456789abcdef", bytes([1]) * 32, bytes([2]) * 32
    assert auth_proof(secret, True, na, ni).hex() == m.group(1)
    assert auth_proof(secret, False, ni, na).hex() == m.group(2)


def test_a_short_secret_is_refused() -> None:
    with pytest.raises(ValueError, match="at least 16 bytes"):
        Connection("main", secret=b"short")
    with pytest.raises(TypeError, match="bytes"):
        Connection("main", secret="a str secret, long enough")  # type: ignore[arg-type]


# -- live: asyncio main, asyncio and blocking clients ----------------------------------------


async def _serve(main: tether.Main, **kw: object) -> tuple[tether.Server, str]:
    @main.handle("echo", roles="client")  # TCP peers are strangers: name their role
    def echo(call: tether.Call, x: int) -> int:
        return x

    server = await main.listen("tcp://127.0.0.1:0", **kw)  # type: ignore[arg-type]
    return server, str(server.address)


async def test_invoke_both_clients_with_the_secret() -> None:
    async with tether.Main() as main:
        server, addr = await _serve(main, secret=SECRET)
        async with tether.connect(addr, secret=SECRET, connect_timeout=5.0) as peer:
            assert await peer.invoke("echo", 7, timeout=5.0) == 7

        def blocking() -> int:
            with tether.sync.connect(addr, secret=SECRET, connect_timeout=5.0) as p:
                return int(p.invoke("echo", 8, timeout=5.0))

        assert await asyncio.to_thread(blocking) == 8
        assert server.refused == 0


@pytest.mark.parametrize(
    ("server_secret", "client_secret"),
    [(SECRET, OTHER), (SECRET, None), (None, SECRET)],
    ids=["wrong", "client-missing", "server-missing"],
)
async def test_refused_logged_with_address_and_counted(
    server_secret: bytes | None,
    client_secret: bytes | None,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.WARNING, logger="tether")
    async with tether.Main() as main:
        server, addr = await _serve(main, secret=server_secret)
        with pytest.raises(AuthenticationError):
            await tether.connect(addr, secret=client_secret, connect_timeout=5.0)

        def blocking() -> None:
            tether.sync.connect(addr, secret=client_secret, connect_timeout=5.0)

        with pytest.raises(AuthenticationError):
            await asyncio.to_thread(blocking)
        deadline = time.monotonic() + 5.0
        while server.refused < 2 and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        assert server.refused == 2
        assert not main.peers
    refusals = [r.getMessage() for r in caplog.records if "refused 127.0.0.1:" in r.getMessage()]
    assert len(refusals) == 2 and all(
        "AuthenticationError" in m or "proof" in m or "secret" in m for m in refusals
    )


async def test_replayed_handshake_bytes_are_refused_by_a_live_listener() -> None:
    async with tether.Main() as main:
        server, _ = await _serve(main, secret=SECRET)
        port = server.address.port
        loop = asyncio.get_running_loop()

        def record_and_replay() -> bytes:
            # A genuine client handshake, driven by hand so its bytes can be kept.
            c = Connection("client", secret=SECRET, initiator=True)
            with socket.create_connection(("127.0.0.1", port), timeout=5.0) as s:
                sent = bytes(c.data_to_send()[0])
                s.sendall(sent)
                while c.peer_hello is None:
                    c.receive_data(s.recv(4096))
                    more = bytes(c.data_to_send()[0])
                    s.sendall(more)
                    sent += more
            # The same bytes on a new connection: the listener's nonce differs.
            with socket.create_connection(("127.0.0.1", port), timeout=5.0) as s:
                s.sendall(sent)
                got = b""
                while chunk := s.recv(4096):
                    got += chunk
                return got

        got = await loop.run_in_executor(None, record_and_replay)
        assert Kind.INVOKE not in kinds(got)  # the listener sent its HELLO (and AUTH), then EOF
        deadline = time.monotonic() + 5.0
        while server.refused < 1 and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        assert server.refused == 1


async def test_a_peer_that_never_sends_its_proof_is_dropped_at_the_hello_deadline(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.WARNING, logger="tether")
    async with tether.Main(hello_timeout=0.3) as main:
        server, _ = await _serve(main, secret=SECRET)
        port = server.address.port

        def hello_only() -> float:
            c = Connection("client", secret=SECRET, initiator=True)
            with socket.create_connection(("127.0.0.1", port), timeout=5.0) as s:
                s.sendall(bytes(c.data_to_send()[0]))  # HELLO, never the AUTH
                t0 = time.monotonic()
                while s.recv(4096):
                    pass
                return time.monotonic() - t0

        elapsed = await asyncio.to_thread(hello_only)
        assert 0.2 < elapsed < 3.0
        deadline = time.monotonic() + 5.0
        while server.refused < 1 and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        assert server.refused == 1
    assert any(
        "refused 127.0.0.1:" in r.getMessage() and "handshake not completed" in r.getMessage()
        for r in caplog.records
    )


# -- listening beyond loopback --------------------------------------------------------------


async def test_non_loopback_listener_needs_a_secret() -> None:
    async with tether.Main() as main:
        with pytest.raises(ValueError, match=r"secret=b'\.\.\.'"):
            await main.listen("tcp://0.0.0.0:0")
        assert not main.servers
        server = await main.listen("tcp://0.0.0.0:0", secret=SECRET)  # bind only, no connect
        assert server.secret == SECRET
        for host in ("127.0.0.1", "127.1.2.3", "[::1]", "localhost"):
            try:
                await main.listen(f"tcp://{host}:0")
            except OSError:  # no IPv6 here
                assert host == "[::1]"
        with pytest.raises(ValueError, match="at least 16 bytes"):
            await main.listen("tcp://0.0.0.0:0", secret=b"short")


def test_eof_instead_of_the_peers_proof_is_an_authentication_error() -> None:
    a, b = pair(SECRET, SECRET)
    a.receive_data(bytes(b.data_to_send()[0]))
    with pytest.raises(AuthenticationError, match="instead of proving"):
        a.receive_eof()


def test_hello_auth_and_a_descriptor_frame_in_one_read() -> None:
    from tether.attachments import MemfdStore
    from tether.shm import SHM_THRESHOLD

    a = Connection("client", secret=SECRET, initiator=True, store=MemfdStore())
    b = Connection("main", secret=SECRET, initiator=False, store=MemfdStore())
    hello_a, hello_b = bytes(a.data_to_send()[0]), bytes(b.data_to_send()[0])

    def nonce(hello: bytes) -> bytes:
        return codec.hello_decoder.decode(FrameParser().feed(hello)[0].body).nonce

    # b's AUTH made by hand, so that b sees a's HELLO, AUTH and EVENT all in one read.
    b_auth = bytearray()
    proof = auth_proof(SECRET, False, nonce(hello_a), nonce(hello_b))
    encode_frame(b_auth, Kind.AUTH, 0, 0, b"", proof)
    assert a.receive_data(hello_b + bytes(b_auth)) == [] and a.state is State.OPEN
    a.send_event(b"big", (bytes(SHM_THRESHOLD + 1),))
    out, fds = a.data_to_send()
    assert len(fds) == 1
    b.receive_fds(fds)
    frames = b.receive_data(hello_a + bytes(out))
    assert [f.channel for f in frames] == ["big"] and b.state is State.OPEN
    a.abort()
    b.abort()


# -- TLS ---------------------------------------------------------------------------------------


def _openssl(*args: str, cwd: str) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True, timeout=30)


def _ca(d: str, name: str) -> None:
    _openssl(
        "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
        "-keyout", f"{name}.key", "-out", f"{name}.pem", "-days", "2", "-subj", f"/CN={name}",
        "-addext", "basicConstraints=critical,CA:TRUE",
        "-addext", "keyUsage=critical,keyCertSign,cRLSign",
        cwd=d,
    )  # fmt: skip


def _leaf(d: str, name: str, ca: str, ext: str) -> None:
    with open(os.path.join(d, f"{name}.ext"), "w") as f:
        f.write(ext)
    _openssl(
        "req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
        "-keyout", f"{name}.key", "-out", f"{name}.csr", "-subj", f"/CN={name}",
        cwd=d,
    )  # fmt: skip
    _openssl(
        "x509", "-req", "-in", f"{name}.csr", "-CA", f"{ca}.pem", "-CAkey", f"{ca}.key",
        "-CAcreateserial", "-out", f"{name}.pem", "-days", "2", "-extfile", f"{name}.ext",
        cwd=d,
    )  # fmt: skip


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> str:
    """A throwaway CA, a server certificate for 127.0.0.1, a client certificate, another CA."""
    if shutil.which("openssl") is None:
        pytest.fail("the openssl command is needed to make test certificates")
    d = str(tmp_path_factory.mktemp("pki"))
    _ca(d, "ca")
    _ca(d, "otherca")
    _leaf(d, "server", "ca", "subjectAltName=IP:127.0.0.1\nextendedKeyUsage=serverAuth\n")
    _leaf(d, "client", "ca", "extendedKeyUsage=clientAuth\n")
    _leaf(d, "stranger", "otherca", "extendedKeyUsage=clientAuth\n")
    return d


def _server_ctx(d: str, client_auth: bool = False) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(f"{d}/server.pem", f"{d}/server.key")
    if client_auth:
        ctx.verify_mode = ssl.CERT_REQUIRED
        ctx.load_verify_locations(f"{d}/ca.pem")
    return ctx


def _client_ctx(d: str, ca: str = "ca", cert: str | None = None) -> ssl.SSLContext:
    ctx = ssl.create_default_context(cafile=f"{d}/{ca}.pem")
    if cert is not None:
        ctx.load_cert_chain(f"{d}/{cert}.pem", f"{d}/{cert}.key")
    return ctx


async def _refused(server: tether.Server, n: int) -> None:
    deadline = time.monotonic() + 5.0
    while server.refused < n and time.monotonic() < deadline:
        await asyncio.sleep(0.01)
    assert server.refused == n


async def test_invoke_both_ways_over_tls(pki: str) -> None:
    async with tether.Main() as main:
        server, addr = await _serve(main, ssl=_server_ctx(pki))
        main.handle("blob", lambda call, s: s, roles="client")
        async with tether.connect(addr, ssl=_client_ctx(pki), connect_timeout=5.0) as peer:

            @peer.handle("twice")
            def twice(call: tether.Call, x: int) -> int:
                return 2 * x

            big = "x" * 8_000_000  # many TLS records each way; the socket buffers fill
            assert await peer.invoke("blob", big, timeout=5.0) == big
            await _until(lambda: main.peers)
            accepted = next(iter(main.peers))
            assert accepted._sock.version() is not None  # type: ignore[attr-defined]
            assert await accepted.invoke("twice", 21, timeout=5.0) == 42

        def blocking() -> str:
            with tether.sync.connect(addr, ssl=_client_ctx(pki), connect_timeout=5.0) as p:
                return str(p.invoke("blob", big, timeout=5.0))

        assert await asyncio.to_thread(blocking) == big
        assert server.refused == 0


async def test_tls_and_a_secret_together(pki: str) -> None:
    async with tether.Main() as main:
        _, addr = await _serve(main, ssl=_server_ctx(pki), secret=SECRET)
        async with tether.connect(addr, ssl=_client_ctx(pki), secret=SECRET) as peer:
            assert await peer.invoke("echo", 3, timeout=5.0) == 3


async def test_a_client_with_the_wrong_ca_is_refused(
    pki: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="tether")
    async with tether.Main() as main:
        server, addr = await _serve(main, ssl=_server_ctx(pki))
        with pytest.raises(AuthenticationError, match="certificate verify failed"):
            await tether.connect(addr, ssl=_client_ctx(pki, ca="otherca"), connect_timeout=5.0)

        def blocking() -> None:
            tether.sync.connect(addr, ssl=_client_ctx(pki, ca="otherca"), connect_timeout=5.0)

        with pytest.raises(AuthenticationError, match="certificate verify failed"):
            await asyncio.to_thread(blocking)
        await _refused(server, 2)
    assert any("refused 127.0.0.1:" in r.getMessage() for r in caplog.records)


async def test_tls_client_authentication(pki: str) -> None:
    async with tether.Main() as main:
        server, addr = await _serve(main, ssl=_server_ctx(pki, client_auth=True))
        good = _client_ctx(pki, cert="client")
        async with tether.connect(addr, ssl=good, connect_timeout=5.0) as peer:
            assert await peer.invoke("echo", 1, timeout=5.0) == 1
        for cert in (None, "stranger"):  # no certificate; one from another CA
            with pytest.raises(AuthenticationError, match="this client"):
                await tether.connect(addr, ssl=_client_ctx(pki, cert=cert), connect_timeout=5.0)

        def blocking() -> None:
            tether.sync.connect(addr, ssl=_client_ctx(pki), connect_timeout=5.0)

        with pytest.raises(AuthenticationError, match="this client"):
            await asyncio.to_thread(blocking)

        def blocking_good() -> int:
            with tether.sync.connect(addr, ssl=good, connect_timeout=5.0) as p:
                return int(p.invoke("echo", 2, timeout=5.0))

        assert await asyncio.to_thread(blocking_good) == 2
        await _refused(server, 3)


async def test_a_stalled_tls_handshake_is_dropped_at_the_hello_deadline(
    pki: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="tether")
    async with tether.Main(hello_timeout=0.3) as main:
        server, _ = await _serve(main, ssl=_server_ctx(pki))
        port = server.address.port

        def silent() -> float:
            with socket.create_connection(("127.0.0.1", port), timeout=5.0) as s:
                t0 = time.monotonic()
                while s.recv(4096):  # never starts TLS: EOF at the deadline
                    pass
                return time.monotonic() - t0

        elapsed = await asyncio.to_thread(silent)
        assert 0.2 < elapsed < 3.0
        await _refused(server, 1)
    assert any(
        "refused 127.0.0.1:" in r.getMessage() and "TLS handshake timed out" in r.getMessage()
        for r in caplog.records
    )


async def test_non_loopback_listener_accepts_tls_client_authentication(pki: str) -> None:
    async with tether.Main() as main:
        with pytest.raises(ValueError, match="CERT_REQUIRED"):
            await main.listen("tcp://0.0.0.0:0", ssl=_server_ctx(pki))  # TLS alone: not enough
        await main.listen("tcp://0.0.0.0:0", ssl=_server_ctx(pki, client_auth=True))


async def _until(cond: Callable[[], object], timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.01)


@pytest.mark.parametrize("nonce", [b"\x01" * 8, b"\x01" * 64])
def test_a_nonce_of_the_wrong_size_is_refused(nonce: bytes) -> None:
    b = Connection("main", secret=SECRET, initiator=False)
    hello = codec.encoder.encode(codec.Hello(protocol="tether", version=1, role="x", nonce=nonce))
    out = bytearray()
    encode_frame(out, Kind.HELLO, 0, 0, b"", hello)
    with pytest.raises(AuthenticationError, match="32 fresh bytes"):
        b.receive_data(bytes(out))


def test_our_own_nonce_echoed_back_is_refused() -> None:
    b = Connection("main", secret=SECRET, initiator=False)
    mine = FrameParser().feed(bytes(b.data_to_send()[0]))[0].body
    out = bytearray()
    encode_frame(out, Kind.HELLO, 0, 0, b"", bytes(mine))  # b's own HELLO, nonce and all
    with pytest.raises(AuthenticationError, match="32 fresh bytes"):
        b.receive_data(bytes(out))


def test_auth_before_hello_is_a_protocol_error() -> None:
    b = Connection("main", secret=SECRET, initiator=False)
    out = bytearray()
    encode_frame(out, Kind.AUTH, 0, 0, b"", bytes(32))
    with pytest.raises(ProtocolError, match="expected HELLO"):
        b.receive_data(bytes(out))


# -- found by the outside look: TLS handshakes count, one deadline ------------------------


async def test_tls_handshakes_in_progress_count_against_the_listener_limits(pki: str) -> None:
    async with tether.Main() as main:
        server, addr = await _serve(main, ssl=_server_ctx(pki))
        server.max_handshaking = 3
        host, port = addr.removeprefix("tcp://").rsplit(":", 1)
        silent = []
        for _ in range(10):  # connect, never start TLS
            s = socket.create_connection((host, int(port)), timeout=5.0)
            silent.append(s)
            await asyncio.sleep(0.02)
        await _until(lambda: server.handshakes_dropped >= 7)
        assert len(server._tls) <= 3

        def closed(s: socket.socket) -> bool:
            s.settimeout(2.0)
            try:
                return s.recv(1) == b""
            except (ConnectionResetError, TimeoutError):
                return False

        assert await asyncio.to_thread(closed, silent[0])  # the oldest went first
        for s in silent:
            s.close()


async def test_tls_and_the_tether_handshake_share_one_deadline(pki: str) -> None:
    async with tether.Main(hello_timeout=2.0) as main:
        _, addr = await _serve(main, ssl=_server_ctx(pki))
        host, port = addr.removeprefix("tcp://").rsplit(":", 1)

        def slow_then_silent() -> float:
            t0 = time.monotonic()
            raw = socket.create_connection((host, int(port)), timeout=5.0)
            time.sleep(1.5)  # most of the deadline spent before TLS even starts
            tls = _client_ctx(pki).wrap_socket(raw, server_hostname=host)
            tls.settimeout(5.0)
            try:
                while tls.recv(4096):  # main's HELLO, then nothing: wait for the close
                    pass
            except (ConnectionResetError, ssl.SSLError):
                pass
            tls.close()
            return time.monotonic() - t0

        elapsed = await asyncio.to_thread(slow_then_silent)
        assert elapsed < 3.0, f"dropped after {elapsed:.1f} s: two deadlines, not one"


def test_a_large_frame_before_the_proof_is_refused_before_it_is_read() -> None:
    # An unauthenticated peer announcing a 60 MB "AUTH" must not make us hold it.
    b = Connection("main", secret=SECRET, initiator=False)
    hello = codec.encoder.encode(
        codec.Hello(protocol="tether", version=1, role="client", nonce=b"\x01" * NONCE_SIZE)
    )
    out = bytearray()
    encode_frame(out, Kind.HELLO, 0, 0, b"", hello)
    head = (60_000_000).to_bytes(4, "little")
    with pytest.raises(ProtocolError, match="limit of 4096"):
        b.receive_data(bytes(out) + head + bytes(100))
    # Without a secret, the frame after the HELLO has the full limit.
    plain = bytearray()
    encode_frame(plain, Kind.HELLO, 0, 0, b"", codec.encoder.encode(
        codec.Hello(protocol="tether", version=1, role="client")
    ))  # fmt: skip
    c = Connection("main")
    frames = c.receive_data(bytes(plain) + head + bytes(100))
    assert frames == [] and c.buffered_in > 100


async def test_protocol_errors_are_logged_a_few_times_a_second(
    sock_path: str, caplog: pytest.LogCaptureFixture
) -> None:
    async with tether.Main(timeout=10.0) as main:
        server = await main.listen(f"unix://{sock_path}")

        def garbage() -> None:
            for _ in range(200):
                s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                s.connect(sock_path)
                s.sendall(b"\xff" * 64)  # not a HELLO: a protocol error
                s.settimeout(5.0)
                with contextlib.suppress(OSError):
                    while s.recv(4096):  # main's HELLO, then its close
                        pass
                s.close()

        with caplog.at_level(logging.WARNING, logger="tether"):
            await asyncio.to_thread(garbage)
            await _until(lambda: server.refused >= 200, timeout=10.0)
        lines = [r for r in caplog.records if "not a tether" in r.getMessage()]
        assert 1 <= len(lines) <= 40


async def test_a_frame_before_hello_logs_one_line_that_does_not_call_the_peer_open(
    sock_path: str, caplog: pytest.LogCaptureFixture
) -> None:
    async with tether.Main(timeout=10.0) as main:
        server = await main.listen(f"unix://{sock_path}")
        bad = bytearray()
        encode_frame(bad, Kind.ROUTE_OPEN, 1, 1, b"", b"")
        with caplog.at_level(logging.WARNING, logger="tether"):
            _, writer = await asyncio.open_unix_connection(sock_path)
            writer.write(bytes(bad))
            await writer.drain()
            await _until(lambda: server.refused >= 1, timeout=10.0)
            writer.close()
        lines = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
        assert len(lines) == 1, lines
        assert "expected HELLO, got frame kind 7" in lines[0]
        assert " open>" not in lines[0]


async def test_listen_refuses_a_client_context_and_uids_on_tcp() -> None:
    async with tether.Main() as main:
        with pytest.raises(ValueError, match="server context"):
            await main.listen("tcp://127.0.0.1:0", ssl=ssl.create_default_context())
        with pytest.raises(ValueError, match="uids= is for unix"):
            await main.listen("tcp://127.0.0.1:0", uids={0})
