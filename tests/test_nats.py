"""tether over a real nats-server (started per module on a free loopback port)."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from typing import Any

import pytest

import tether
from _nats_server import NatsServer, running
from tether import Main

pytestmark = pytest.mark.timeout(180)
HERE = os.path.dirname(os.path.abspath(__file__))
SRC = os.path.join(os.path.dirname(HERE), "src")


@pytest.fixture(scope="module")
def nats() -> Iterator[NatsServer]:
    with running() as server:
        yield server


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([SRC, HERE, env.get("PYTHONPATH", "")])
    return env


def start_workers(url: str, n: int, *names: str) -> list[subprocess.Popen[str]]:
    """``n`` worker processes (tests/_nats_targets.py) listening on ``url``, each ready.

    ``names``: the first workers also serve ``only.<name>``, one name each.
    """
    procs = [
        subprocess.Popen(
            [sys.executable, os.path.join(HERE, "_nats_targets.py"), url, *names[i : i + 1]],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            env=_env(),
        )
        for i in range(n)
    ]
    for p in procs:
        assert p.stdout is not None
        assert p.stdout.readline().strip() == "ready"
    return procs


def stop_workers(procs: list[subprocess.Popen[str]]) -> None:
    for p in procs:
        assert p.stdin is not None
        p.stdin.close()
    for p in procs:
        try:
            p.wait(20)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait(10)


async def until(cond: object, seconds: float = 20.0) -> None:
    deadline = time.monotonic() + seconds
    while not cond() and time.monotonic() < deadline:  # type: ignore[operator]
        await asyncio.sleep(0.01)


async def test_invoke_and_events_both_ways(nats: NatsServer) -> None:
    url = f"{nats.url}/t1"
    async with Main() as main:
        got: list[str] = []

        @main.handle("add", roles="nats")
        async def add(call: tether.Call, a: int, b: int) -> int:
            return await call.peer.invoke("twice", a + b)

        @main.on("note", roles="nats")
        def note(call: tether.Call, text: str) -> None:
            got.append(text)

        @main.handle("boom", roles="nats")
        def boom(call: tether.Call) -> None:
            raise KeyError("nope")

        await main.listen(url)
        async with tether.connect(url) as peer:

            @peer.handle("twice")
            def twice(call: tether.Call, x: int) -> int:
                return 2 * x

            assert await peer.invoke("add", 2, 3) == 10
            await peer.send("note", "hi")
            with pytest.raises(tether.NoHandler):
                await peer.invoke("nothing")
            with pytest.raises(tether.BadRequest):
                await peer.invoke("add", "x", 1)
            with pytest.raises(tether.RemoteError) as err:
                await peer.invoke("boom")
            assert err.value.type_name == "KeyError"
            await until(lambda: got)
            assert got == ["hi"]


async def test_invoke_across_processes(nats: NatsServer) -> None:
    url = f"{nats.url}/procs"
    procs = start_workers(url, 1)
    try:
        async with tether.connect(url) as peer:
            pid = await peer.invoke("pid")
            assert pid == procs[0].pid != os.getpid()
            assert await peer.invoke("echo", {"a": [1, b"x"]}) == {"a": [1, b"x"]}
    finally:
        stop_workers(procs)


async def test_three_workers_share_the_invokes_of_one_client(nats: NatsServer) -> None:
    url = f"{nats.url}/shared"
    procs = start_workers(url, 3)
    try:
        async with tether.connect(url) as peer:
            seen = [await peer.invoke("pid") for _ in range(60)]
            seen += await asyncio.gather(*(peer.invoke("pid") for _ in range(60)))
        assert set(seen) == {p.pid for p in procs}  # each worker served some, one client
    finally:
        stop_workers(procs)


async def test_streams_of_one_client_shared_by_workers(nats: NatsServer) -> None:
    url = f"{nats.url}/sharedstreams"
    procs = start_workers(url, 3)
    try:
        async with tether.connect(url) as peer:
            pids = set()
            for _ in range(12):
                items = [x async for x in peer.stream("count", 20, window=2)]
                assert [i for _, i in items] == list(range(20))
                assert len({pid for pid, _ in items}) == 1  # one worker makes a stream
                pids.add(items[0][0])
            assert len(pids) > 1
    finally:
        stop_workers(procs)


async def test_a_channel_only_one_main_handles_reaches_it(nats: NatsServer) -> None:
    url = f"{nats.url}/onlyone"
    procs = start_workers(url, 2, "a")
    try:
        async with tether.connect(url) as peer:
            for _ in range(20):
                assert await peer.invoke("only.a") == procs[0].pid
            assert {await peer.invoke("pid") for _ in range(40)} == {p.pid for p in procs}
    finally:
        stop_workers(procs)


async def test_no_responders_is_no_handler_at_once(nats: NatsServer) -> None:
    url = f"{nats.url}/noresp"
    async with Main() as main:
        main.handle("here", lambda call: "yes", roles="nats")
        await main.listen(url)
        async with tether.connect(url, timeout=60) as peer:
            t0 = time.monotonic()
            with pytest.raises(tether.NoHandler, match="no responders"):
                await peer.invoke("nobody.handles.this")
            with pytest.raises(tether.NoHandler, match="no responders"):
                await peer.invoke("not a token: ~*>")  # base32 subject, same answer
            assert time.monotonic() - t0 < 30  # not the timeout
            assert await peer.invoke("here") == "yes"  # the peer goes on


async def test_handlers_added_and_removed_after_listen(nats: NatsServer) -> None:
    url = f"{nats.url}/follow"
    async with Main() as main:
        server = await main.listen(url)
        async with tether.connect(url, timeout=60) as peer:
            main.handle("late", lambda call: "late", roles="nats")
            await server.sync()  # type: ignore[attr-defined]
            assert await peer.invoke("late") == "late"
            main.remove_handler("late")
            await server.sync()  # type: ignore[attr-defined]
            with pytest.raises(tether.NoHandler, match="no responders"):
                await peer.invoke("late")
            names = {c.name for c in await peer.invoke("tether.channels")}
            assert "late" not in names


async def test_events_reach_every_main(nats: NatsServer) -> None:
    url = f"{nats.url}/fanin"
    got: list[tuple[int, str]] = []
    async with Main() as one, Main() as two:
        for i, main in enumerate((one, two)):
            main.on("note", lambda call, text, i=i: got.append((i, text)), roles="nats")
            await main.listen(url)
        async with tether.connect(url) as peer:
            for n in range(100):
                await peer.send("note", str(n))
            await until(lambda: len(got) == 200)
        assert [t for i, t in got if i == 0] == [str(n) for n in range(100)]  # in order
        assert [t for i, t in got if i == 1] == [str(n) for n in range(100)]


async def test_events_reach_every_client(nats: NatsServer) -> None:
    url = f"{nats.url}/fanout"
    async with Main() as main:
        server = await main.listen(url)
        got: list[tuple[int, str]] = []
        peers = [await tether.connect(url) for _ in range(3)]
        try:
            for i, peer in enumerate(peers):
                peer.on("news", lambda call, text, i=i: got.append((i, text)))
            await server.send("news", "one message")  # type: ignore[attr-defined]
            await until(lambda: len(got) == 3)
            assert sorted(got) == [(0, "one message"), (1, "one message"), (2, "one message")]
        finally:
            for peer in peers:
                await peer.close()


async def test_no_listener_fails_at_once(nats: NatsServer) -> None:
    t0 = time.monotonic()
    with pytest.raises(tether.ConnectError, match="no responders"):
        await tether.connect(f"{nats.url}/nobody", connect_timeout=60)
    assert time.monotonic() - t0 < 30  # not the connect_timeout


async def test_oversized_payload_fails_before_sending(nats: NatsServer) -> None:
    url = f"{nats.url}/big"
    async with Main() as main:
        calls: list[int] = []

        @main.handle("size", roles="nats")
        def size(call: tether.Call, data: bytes) -> int:
            calls.append(len(data))
            return len(data)

        server = await main.listen(url)
        async with tether.connect(url) as peer:
            with pytest.raises(tether.PayloadTooLarge):
                await peer.invoke("size", bytes(2 * 1024 * 1024), timeout=60)
            with pytest.raises(tether.PayloadTooLarge):
                await server.send("size", bytes(2 * 1024 * 1024))  # type: ignore[attr-defined]
            assert calls == []
            assert await peer.invoke("size", bytes(500_000)) == 500_000


async def test_roles_deny_by_default(nats: NatsServer) -> None:
    async with Main() as main:

        @main.handle("local_only")
        def local_only(call: tether.Call) -> str:
            return "no"

        @main.handle("for_workers", roles="worker")
        def for_workers(call: tether.Call) -> str:
            return call.peer.role

        await main.listen(f"{nats.url}/roles")
        await main.listen(f"{nats.url}/roles_w", role="worker")
        async with tether.connect(f"{nats.url}/roles") as peer:
            with pytest.raises(tether.Forbidden):
                await peer.invoke("local_only")
            with pytest.raises(tether.Forbidden):
                await peer.invoke("for_workers")
        async with tether.connect(f"{nats.url}/roles_w") as peer:
            assert await peer.invoke("for_workers") == "worker"


async def test_timeout_and_cancel_reach_the_handler(nats: NatsServer) -> None:
    url = f"{nats.url}/cancel"
    async with Main() as main:
        cancelled: list[str] = []

        @main.handle("hang", roles="nats")
        async def hang(call: tether.Call, tag: str) -> None:
            try:
                await asyncio.sleep(3600)
            except asyncio.CancelledError:
                cancelled.append(tag)
                raise

        await main.listen(url)
        async with tether.connect(url) as peer:
            with pytest.raises(tether.InvokeTimeout):
                await peer.invoke("hang", "timeout", timeout=0.3)
            task = asyncio.ensure_future(peer.invoke("hang", "cancel"))
            await asyncio.sleep(0.3)
            task.cancel()
            await until(lambda: len(cancelled) == 2)
            assert sorted(cancelled) == ["cancel", "timeout"]


async def test_server_restart_fails_pending_then_reconnects() -> None:
    with running() as nats:
        url = f"{nats.url}/restart"
        async with Main() as main:

            @main.handle("slow", roles="nats")
            async def slow(call: tether.Call, x: int) -> int:
                await asyncio.sleep(x)
                return x

            await main.listen(url)
            async with tether.connect(url) as peer:
                assert await peer.invoke("slow", 0) == 0
                pending = [asyncio.ensure_future(peer.invoke("slow", 60, timeout=90))]
                await asyncio.sleep(0.3)
                t0 = time.monotonic()
                await asyncio.get_running_loop().run_in_executor(None, nats.stop)
                with pytest.raises(tether.PeerGone):
                    await pending[0]
                assert time.monotonic() - t0 < 60  # failed, not timed out
                await asyncio.get_running_loop().run_in_executor(None, nats.start)
                result = None
                deadline = time.monotonic() + 60
                while result is None and time.monotonic() < deadline:
                    try:
                        result = await peer.invoke("slow", 0, timeout=2)
                    except (tether.PeerGone, tether.InvokeTimeout, tether.NoHandler):
                        await asyncio.sleep(0.2)  # NoHandler: main's link not back yet
                assert result == 0


CREDENTIALS = "authorization { user: alice, password: s3cret }\n"


async def test_credentials_refuse_a_wrong_client() -> None:
    with running(CREDENTIALS) as nats:
        host = nats.url.removeprefix("nats://")
        good = f"nats://alice:s3cret@{host}/auth"
        async with Main() as main:

            @main.handle("hi", roles="nats")
            def hi(call: tether.Call) -> str:
                return "hello"

            await main.listen(good)
            with pytest.raises(tether.ConnectError):
                await tether.connect(f"nats://alice:wrong@{host}/auth", connect_timeout=5)
            with pytest.raises(tether.ConnectError):
                await tether.connect(f"nats://{host}/auth", connect_timeout=5)
            async with tether.connect(good) as peer:
                assert await peer.invoke("hi") == "hello"


def test_blocking_client(nats: NatsServer) -> None:
    url = f"{nats.url}/blocking"
    procs = start_workers(url, 1)
    try:
        with tether.sync.connect(url) as peer:
            assert peer.invoke("pid") == procs[0].pid
            assert peer.invoke("echo", [1, 2]) == [1, 2]
            with pytest.raises(tether.NoHandler):
                peer.invoke("missing")
    finally:
        stop_workers(procs)


def test_cli_call(nats: NatsServer) -> None:
    url = f"{nats.url}/cli"
    procs = start_workers(url, 1)
    try:
        out = subprocess.run(
            [sys.executable, "-m", "tether", "call", url, "echo", '{"k": 1}'],
            capture_output=True,
            text=True,
            env=_env(),
            timeout=60,
        )
        assert out.returncode == 0, out.stderr
        assert out.stdout.strip() == '{"k":1}'
        listed = subprocess.run(
            [sys.executable, "-m", "tether", "call", "--list", url],
            capture_output=True,
            text=True,
            env=_env(),
            timeout=60,
        )
        assert listed.returncode == 0, listed.stderr
        assert "pid() -> int" in listed.stdout  # tether.channels answered over NATS
        bad = subprocess.run(
            [sys.executable, "-m", "tether", "call", f"{nats.url}/nobody", "echo", "1"],
            capture_output=True,
            text=True,
            env=_env(),
            timeout=60,
        )
        assert bad.returncode == 1
        assert "no responders" in bad.stderr
    finally:
        stop_workers(procs)


async def test_token_refuses_a_wrong_client() -> None:
    with running("authorization { token: t0ken }\n") as nats:
        host = nats.url.removeprefix("nats://")
        async with Main() as main:
            main.handle("hi", lambda call: "hello", roles="nats")
            await main.listen(f"nats://t0ken@{host}/tok")
            with pytest.raises(tether.ConnectError):
                await tether.connect(f"nats://other@{host}/tok", connect_timeout=5)
            async with tether.connect(f"nats://t0ken@{host}/tok") as peer:
                assert await peer.invoke("hi") == "hello"


async def test_tls_with_client_certificates(tmp_path_factory: pytest.TempPathFactory) -> None:
    from test_auth import _ca, _client_ctx, _leaf

    d = str(tmp_path_factory.mktemp("natspki"))
    _ca(d, "ca")
    _ca(d, "otherca")
    _leaf(d, "server", "ca", "subjectAltName=IP:127.0.0.1\nextendedKeyUsage=serverAuth\n")
    _leaf(d, "client", "ca", "extendedKeyUsage=clientAuth\n")
    _leaf(d, "stranger", "otherca", "extendedKeyUsage=clientAuth\n")
    conf = (
        f'tls {{\n  cert_file: "{d}/server.pem"\n  key_file: "{d}/server.key"\n'
        f'  ca_file: "{d}/ca.pem"\n  verify: true\n}}\n'
    )
    with running(conf) as nats:
        url = f"{nats.url}/tls"
        async with Main() as main:
            main.handle("hi", lambda call: "hello", roles="nats")
            await main.listen(url, ssl=_client_ctx(d, cert="client"))
            for ctx in (_client_ctx(d), _client_ctx(d, "otherca", "stranger"), None):
                with pytest.raises(tether.ConnectError):
                    await tether.connect(url, ssl=ctx, connect_timeout=5)
            async with tether.connect(url, ssl=_client_ctx(d, cert="client")) as peer:
                assert await peer.invoke("hi") == "hello"


async def test_handles_do_not_cross(nats: NatsServer) -> None:
    url = f"{nats.url}/handles"
    async with Main() as main:
        main.handle("take", lambda call, h: "took", roles="nats")
        await main.listen(url)
        async with tether.connect(url) as peer:
            r, w = os.pipe()
            try:
                with pytest.raises(tether.HandleRefused):
                    await peer.invoke("take", tether.Handle(w))
            finally:
                os.close(r)
            assert await peer.invoke("take", 1) == "took"  # the connection goes on


async def test_a_closed_listener_leaves_the_queue_group(nats: NatsServer) -> None:
    url = f"{nats.url}/leave"
    async with Main() as main:
        main.handle("pid", lambda call: os.getpid(), roles="nats")
        server = await main.listen(url)
        async with tether.connect(url) as held:  # the only listener yet: it is ours
            assert await held.invoke("pid") == os.getpid()
            procs = start_workers(url, 1)
            try:
                server.close()
                await server.wait_closed()  # type: ignore[attr-defined]
                for _ in range(10):  # every invoke goes to the worker now, also a known client's
                    async with tether.connect(url, connect_timeout=20) as peer:
                        assert await peer.invoke("pid") == procs[0].pid
                    assert await held.invoke("pid") == procs[0].pid
            finally:
                stop_workers(procs)


async def test_blocking_client_serves_main_too(nats: NatsServer) -> None:
    url = f"{nats.url}/blocking_back"
    async with Main() as main:

        @main.handle("relay", roles="nats")
        async def relay(call: tether.Call, x: int) -> int:
            return await call.peer.invoke("twice", x)

        await main.listen(url)

        def client() -> int:
            with tether.sync.connect(url) as peer:
                peer.handle("twice", lambda call, x: 2 * x)
                result: int = peer.invoke("relay", 21)
                return result

        server = await main.listen(url)  # a second listener: its own clients
        assert await asyncio.get_running_loop().run_in_executor(None, client) == 42
        # the blocking client's goodbye went out before its loop stopped
        await until(lambda: not any(s.peers for s in main.servers))  # type: ignore[attr-defined]
        assert not any(s.peers for s in main.servers)  # type: ignore[attr-defined]
        assert server.idle_timeout > 100  # type: ignore[attr-defined]


async def test_a_client_that_leaves_is_forgotten(nats: NatsServer) -> None:
    url = f"{nats.url}/forget"
    async with Main() as main:
        main.handle("hi", lambda call: "hello", roles="nats")
        server = await main.listen(url)
        assert server.idle_timeout > 100  # type: ignore[attr-defined]
        async with tether.connect(url) as peer:  # says goodbye (NS.bye) on close
            assert await peer.invoke("hi") == "hello"
            assert len(server.peers) == 1  # type: ignore[attr-defined]
        await until(lambda: not server.peers)  # type: ignore[attr-defined]
        assert not server.peers  # type: ignore[attr-defined]
        # One that vanishes without a goodbye is dropped once idle (nothing in flight).
        server.idle_timeout = 0.5  # type: ignore[attr-defined]
        gone = await tether.connect(url)
        assert await gone.invoke("hi") == "hello"
        assert len(server.peers) == 1  # type: ignore[attr-defined]
        gone.abort(tether.PeerGone("vanished"))  # no goodbye
        await until(lambda: not server.peers)  # type: ignore[attr-defined]
        assert not server.peers  # type: ignore[attr-defined]


async def test_a_busy_client_is_not_dropped_as_idle(nats: NatsServer) -> None:
    url = f"{nats.url}/busy"
    async with Main() as main:

        @main.handle("slow", roles="nats")
        async def slow(call: tether.Call) -> str:
            await asyncio.sleep(1.5)
            return "done"

        server = await main.listen(url)
        server.idle_timeout = 0.2  # type: ignore[attr-defined]
        async with tether.connect(url) as peer:
            assert await peer.invoke("slow") == "done"  # served past the idle bound


async def _raw(url: str) -> object:
    import nats as nats_py

    return await nats_py.connect(url)


def _frame(kind: int, rid: int, channel: bytes, body: bytes) -> bytes:
    from tether.wire import encode_frame

    out = bytearray()
    encode_frame(out, kind, rid, 0, channel, body)
    return bytes(out)


async def test_a_hostile_publisher_does_not_hurt_a_listener(nats: NatsServer) -> None:
    from tether.wire import Kind

    url = f"{nats.url}/hostile"
    ns = "hostile"
    async with Main() as main:
        got: list[str] = []
        main.handle("x", lambda call, n: n + 1, roles="nats")
        main.on("x", lambda call, text: got.append(text), roles="nats")
        server = await main.listen(url)
        nc: Any = await _raw(nats.url)
        try:
            me = "0123456789abcdef"
            good_invoke = _frame(Kind.INVOKE, 1, b"x", b"\x91\x01")
            garbage = [
                (f"{ns}.h.x", b"\x00garbage", f"{ns}.p.{me}.r.1"),
                (f"{ns}.h.x", good_invoke, ""),  # no reply subject: who is it?
                (f"{ns}.h.x", good_invoke, f"{ns}.p.NOT-AN-ID.r.1"),
                (f"{ns}.h.x", good_invoke, f"{ns}.p.{me}.r.2"),  # not its request id
                (f"{ns}.h.x", _frame(Kind.INVOKE, 1, b"y", b"\x90"), f"{ns}.p.{me}.r.1"),
                (f"{ns}.h.x", _frame(Kind.HELLO, 0, b"", b"\x80"), f"{ns}.p.{me}.r.0"),
                (f"{ns}.h.x", good_invoke + good_invoke, f"{ns}.p.{me}.r.1"),
                (f"{ns}.e.x", b"\xff" * 40, f"{ns}.p.{me}.e"),
                (f"{ns}.e.x", _frame(Kind.EVENT, 0, b"z", b"\x90"), f"{ns}.p.{me}.e"),
                (f"{ns}.e.x", _frame(Kind.INVOKE, 3, b"x", b"\x90"), f"{ns}.p.{me}.e"),
                (f"{ns}.x", b"\x01\x02", f"{ns}.p.{me}.x"),
                (f"{ns}.x", _frame(Kind.CANCEL, 1, b"", b""), ""),
                (f"{ns}.bye", b"bye", ""),
                (f"{ns}.bye", b"bye", f"{ns}.p.x.b"),
            ]
            for subject, data, reply in garbage:
                await nc.publish(subject, data, reply=reply)
            await nc.flush()
            await until(lambda: server.dropped >= len(garbage))  # type: ignore[attr-defined]
            assert server.dropped == len(garbage)  # type: ignore[attr-defined]
            # Well framed, a body that does not decode: that caller gets its BadRequest.
            inbox = await nc.subscribe(f"{ns}.p.{me}.>")
            bad = _frame(Kind.INVOKE, 7, b"x", b"\xc1")
            await nc.publish(f"{ns}.h.x", bad, reply=f"{ns}.p.{me}.r.7.{'7' * 16}")
            answer = await inbox.next_msg(timeout=20)
            assert answer.subject == f"{ns}.p.{me}.r.7.{'7' * 16}"
            assert answer.data[4] == Kind.ERROR and b"bad_request" in answer.data
            async with tether.connect(url) as peer:  # the listener serves on
                assert await peer.invoke("x", 41) == 42
                await peer.send("x", "fine")
                await until(lambda: got == ["fine"])
                assert got == ["fine"]
        finally:
            await nc.close()


async def test_a_flood_of_client_ids_is_capped(nats: NatsServer) -> None:
    url = f"{nats.url}/flood"
    ns = "flood"
    async with Main() as main:
        got: list[str] = []
        main.on("note", lambda call, text: got.append(text), roles="nats")
        server = await main.listen(url)
        server.max_clients = 5  # type: ignore[attr-defined]
        nc: Any = await _raw(nats.url)
        try:
            from tether.wire import Kind

            event = _frame(Kind.EVENT, 0, b"note", b"\x91\xa2hi")
            for i in range(50):
                await nc.publish(f"{ns}.e.note", event, reply=f"{ns}.p.{i:016x}.e")
            await nc.flush()
            await until(lambda: len(got) == 50)
            assert len(got) == 50  # each was heard (the longest idle made room)
            assert len(server.peers) <= 5  # type: ignore[attr-defined]
        finally:
            await nc.close()


async def test_an_invoke_to_a_vanished_client_fails_at_once(nats: NatsServer) -> None:
    url = f"{nats.url}/vanish"
    async with Main() as main:
        held: list[tether.Peer] = []

        @main.handle("hold", roles="nats")
        def hold(call: tether.Call) -> None:
            held.append(call.peer)

        await main.listen(url)
        peer = await tether.connect(url)
        peer.handle("twice", lambda call, x: 2 * x)
        await peer.invoke("hold")
        assert await held[0].invoke("twice", 4) == 8
        peer.abort(tether.PeerGone("vanished"))  # no goodbye; its NATS link closes
        await asyncio.wait_for(peer._stream.finished, 20)  # type: ignore[attr-defined]
        # (the NATS server drops the client's subscription a moment after its link
        # closed: an invoke that still reached it just times out)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                await held[0].invoke("twice", 4, timeout=2)
            except tether.InvokeTimeout:
                continue
            except tether.PeerGone as exc:
                assert "no responders" in str(exc)
                break
        assert held[0].closed


def test_channel_tokens() -> None:
    from tether.nats.stream import channel_token

    assert channel_token(b"math.add") == "math.add"
    assert channel_token(b"tether.channels") == "tether.channels"
    assert channel_token(b"a b") == "~meqge"  # docs/protocol.md 1.2
    for other in (b"a..b", b".a", b"a.", b"a*", b"a.>", "\u00e9".encode(), b"a\x00b"):
        token = channel_token(other)
        assert token.startswith("~") and set(token[1:]) <= set("abcdefghijklmnopqrstuvwxyz234567")


async def test_streams_cross_nats(nats: NatsServer) -> None:
    url = f"{nats.url}/streams"
    async with Main() as main:
        stopped: list[int] = []

        @main.handle("count", roles="nats")
        async def count(call: tether.Call, n: int) -> AsyncIterator[int]:
            try:
                for i in range(n):
                    yield i
            finally:
                stopped.append(n)

        await main.listen(url)
        async with tether.connect(url) as peer:
            # window 4: CREDITs go back to the listener serving the stream, once known
            got = [x async for x in peer.stream("count", 50, window=4)]
            assert got == list(range(50))
            partial = []
            async for x in peer.stream("count", 10_000, window=2):
                partial.append(x)
                if x == 5:
                    break  # a CANCEL to the listener producing it
            await until(lambda: 10_000 in stopped)
            assert partial == list(range(6)) and 10_000 in stopped
            with pytest.raises(tether.NoHandler, match="no responders"):
                async for _ in peer.stream("nothing.streams.here"):
                    pass
            with pytest.raises(tether.RouteClosed, match="routes do not cross NATS"):
                await peer.open("anything")


async def test_many_events_split_under_max_payload(nats: NatsServer) -> None:
    url = f"{nats.url}/split"
    async with Main() as main:
        got: list[int] = []
        main.on("big", lambda call, n, pad: got.append(n), roles="nats")
        await main.listen(url)
        async with tether.connect(url) as peer:
            for n in range(3000):  # ~3 MB queued in one turn: several messages of <= 1 MiB
                await peer.send("big", n, "x" * 1000)
            await until(lambda: len(got) == 3000)
        assert got == list(range(3000))


async def test_broadcast_reaches_every_client_of_the_namespace(nats: NatsServer) -> None:
    url = f"{nats.url}/bcast"
    async with Main() as main:
        main.handle("hi", lambda call: "hello", roles="nats")
        await main.listen(url)
        got: list[int] = []
        quiet, talking = await tether.connect(url), await tether.connect(url)
        try:
            for i, peer in enumerate((quiet, talking)):
                peer.on("news", lambda call, text, i=i: got.append(i))
            assert await talking.invoke("hi") == "hello"  # main keeps a peer for this one only
            assert await main.broadcast("news", "to all") == 1
            assert await main.broadcast("news", "nobody", role="nobody") == 0
            await until(lambda: len(got) == 2)
            assert sorted(got) == [0, 1]  # also the client main never heard from
        finally:
            await quiet.close()
            await talking.close()


async def test_a_handler_streams_from_its_caller(nats: NatsServer) -> None:
    url = f"{nats.url}/backstream"
    async with Main() as main:

        @main.handle("total", roles="nats")
        async def total(call: tether.Call, n: int) -> int:
            return sum([x async for x in call.peer.stream("numbers", n, window=3)])

        await main.listen(url)
        async with tether.connect(url) as peer:

            @peer.handle("numbers")
            async def numbers(call: tether.Call, n: int) -> AsyncIterator[int]:
                for i in range(n):
                    yield i

            assert await peer.invoke("total", 40) == sum(range(40))
            assert await asyncio.gather(*(peer.invoke("total", 10) for _ in range(5))) == [45] * 5


async def test_a_closing_main_fails_the_invokes_it_serves(nats: NatsServer) -> None:
    url = f"{nats.url}/closing"
    async with tether.Main() as main:
        started = asyncio.Event()

        @main.handle("hang", roles="nats")
        async def hang(call: tether.Call) -> None:
            started.set()
            await asyncio.sleep(3600)

        await main.listen(url)
        async with tether.connect(url, timeout=60) as peer:
            pending = asyncio.ensure_future(peer.invoke("hang"))
            await asyncio.wait_for(started.wait(), 20)
            t0 = time.monotonic()
            await main.close()
            with pytest.raises(tether.PeerGone, match="closed"):
                await pending
            assert time.monotonic() - t0 < 30  # not the timeout


async def test_flushed_pushes_queued_commands_out_before_its_ping() -> None:
    """nats-py's flush() writes PING ahead of SUBs still queued: the PONG proved nothing.

    Seen as a handler added after listen answering "no responders" right after
    ``server.sync()`` (about one full NATS test run in three).
    """
    from tether.nats.stream import flushed

    order: list[str] = []

    class Client:
        async def _flush_pending(self, force_flush: bool = False) -> None:
            order.append(f"queue out (forced={force_flush})")

        async def flush(self, timeout: float = 10) -> None:
            order.append("ping")

    await flushed(Client(), 1.0)
    assert order == ["queue out (forced=True)", "ping"]
