"""tether over NATS as a new user meets it: the blocking client's API, timeouts,
``tether call --list``, ``Main.broadcast``, what cannot cross (a real nats-server)."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import tempfile
from collections.abc import AsyncIterator, Iterator

import pytest

import tether
import tether.sync
from _nats_server import NatsServer, running
from tether import Main

pytestmark = pytest.mark.timeout(180)
HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)

#: public names of a blocking unix peer the blocking NATS client has not, and why
NOT_OVER_NATS = {
    "on_connect": "direct channels pass a socket as a descriptor; none cross NATS",
    "max_queued": "a statistic of the blocking peer's worker queue; the NATS client has none",
}


@pytest.fixture(scope="module")
def nats() -> Iterator[NatsServer]:
    with running() as server:
        yield server


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(
        [os.path.join(ROOT, "src"), HERE, env.get("PYTHONPATH", "")]
    )
    return env


async def _cli(*argv: str) -> tuple[int, str, str]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "tether",
        "call",
        *argv,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=_env(),
    )
    out, err = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


def _public(obj: object) -> set[str]:
    return {a for a in dir(obj) if not a.startswith("_")}


async def test_the_blocking_client_has_the_blocking_peers_api(nats: NatsServer) -> None:
    url = f"{nats.url}/api"
    async with Main() as main:

        @main.handle("slow", roles="nats")
        async def slow(call: tether.Call, seconds: float) -> str:
            await asyncio.sleep(seconds)
            return "done"

        stopped: list[int] = []

        @main.handle("count", roles="nats")
        async def count(call: tether.Call, n: int) -> AsyncIterator[int]:
            try:
                for i in range(n):
                    yield i
            finally:
                stopped.append(n)

        @main.handle("ask", roles="nats")
        async def ask(call: tether.Call) -> str:
            return await call.peer.invoke("whoami")

        addr = f"unix://{tempfile.mkdtemp()}/a.sock"
        await main.listen(addr)
        await main.listen(url)

        def blocking() -> None:
            with tether.sync.connect(addr) as u, tether.sync.connect(url, timeout=5, spin=0) as n:
                missing = _public(u) - _public(n)
                assert missing == set(NOT_OVER_NATS), sorted(missing)
                assert n.role == "main" and n.local is True
                assert n.name == n.address == url
                assert n.remote_hello is not None and n.remote_hello.features == ["stream"]
                assert n.timeout == 5 and n.spin == 0 and n.pid is None
                n.timeout = 7
                assert n.timeout == 7 == n.aio.timeout
                assert list(n.stream("count", 4, window=2)) == [0, 1, 2, 3]
                with n.stream("count", 1000, window=2) as it:
                    assert next(it) == 0  # left early: the producer is stopped
                for x in n.stream("count", 2000, window=2):
                    assert x == 0
                    break  # dropped: stopped too
                n.handle("whoami", lambda call: "sync")
                assert n.invoke("ask") == "sync"
                n.remove_handler("whoami")
                with pytest.raises(tether.RemoteError, match="no handler for channel 'whoami'"):
                    n.invoke("ask")
                with pytest.raises(tether.RouteClosed, match="routes do not cross NATS"):
                    n.open("anything")
                n.send_threadsafe("nobody.listens", 1)
                n.wait_hello(1)
                with pytest.raises(TimeoutError, match="still open"):
                    n.wait_closed(0.1)
                n.close()
                n.wait_closed(5)  # closed: returns at once
                assert n.closed

        await asyncio.to_thread(blocking)
        deadline = asyncio.get_running_loop().time() + 20
        while len(stopped) < 3 and asyncio.get_running_loop().time() < deadline:
            await asyncio.sleep(0.01)
        assert sorted(stopped) == [4, 1000, 2000]


async def test_a_blocking_timeout_names_the_channel(nats: NatsServer) -> None:
    url = f"{nats.url}/slow"
    async with Main() as main:

        @main.handle("slow", roles="nats")
        async def slow(call: tether.Call, seconds: float) -> str:
            await asyncio.sleep(seconds)
            return "done"

        await main.listen(url)

        def blocking() -> str:
            with tether.sync.connect(url) as peer:
                with pytest.raises(tether.InvokeTimeout) as err:
                    peer.invoke("slow", 30, timeout=0.5)
                return str(err.value)

        said = await asyncio.to_thread(blocking)
        assert "no answer on 'slow' within 0.5 s" in said
        code, _, err = await _cli("--timeout", "0.5", url, "slow", "30")
        assert code == 1
        assert "InvokeTimeout: no answer on 'slow' within 0.5 s" in err


async def test_broadcast_counts_a_nats_namespace_as_one(nats: NatsServer) -> None:
    url = f"{nats.url}/bcast"
    async with Main() as main:
        main.handle("hi", lambda call: 1, roles="nats")
        await main.listen(url)
        await main.listen(url)  # a second listener on the same namespace
        assert await main.broadcast("all", 0) == 1  # no client yet: NATS cannot tell
        got: list[list[int]] = [[], [], []]
        clients = [await tether.connect(url) for _ in got]
        try:
            for c, box in zip(clients, got, strict=True):
                c.on("all", lambda call, x, box=box: box.append(x))
            await clients[0].invoke("hi")  # one client heard from, two never
            assert await main.broadcast("all", 1) == 1
            child = await main.spawn(_listens_to_all)
            await child.invoke("ready")
            assert await main.broadcast("all", 2) == 2  # the namespace, and the child
            assert await child.invoke("seen") == [2]
            deadline = asyncio.get_running_loop().time() + 20
            while any(len(b) < 2 for b in got) and asyncio.get_running_loop().time() < deadline:
                await asyncio.sleep(0.01)
            await asyncio.sleep(0.2)  # a second copy (one per listener) would be in by now
            assert got == [[1, 2]] * 3  # every client, once each, never heard from or not
            assert await main.broadcast("all", 3, role="child") == 1
        finally:
            for c in clients:
                await c.close()


async def _listens_to_all(peer: tether.Peer) -> None:
    seen: list[int] = []
    peer.on("all", lambda call, x: seen.append(x))
    peer.handle("ready", lambda call: True)
    peer.handle("seen", lambda call: seen)
    await peer.wait_closed()


async def test_what_cannot_share_memory_over_nats(nats: NatsServer) -> None:
    url = f"{nats.url}/inline"
    async with Main() as main:

        @main.handle("take", roles="nats")
        def take(call: tether.Call, value: object) -> list[int]:
            data = bytes(value)  # type: ignore[call-overload]
            return [len(data), data[0], data[-1]]

        await main.listen(url)
        async with tether.connect(url) as peer:
            r, w = os.pipe()
            try:
                with pytest.raises(tether.HandleRefused, match="NATS"):
                    await peer.invoke("take", tether.Handle(w))
            finally:
                os.close(r)
            buf = tether.Buffer(100_000)  # inline (copied), as the docs say
            view = buf.view()
            view[0], view[-1] = 7, 9
            del view
            assert await peer.invoke("take", buf) == [100_000, 7, 9]
            with pytest.raises(tether.ConsumedError):
                buf.view()
            big = tether.Buffer(2 << 20)  # above max_payload: refused before sending
            with pytest.raises(tether.PayloadTooLarge):
                await peer.invoke("take", big)
            with pytest.raises(tether.ConsumedError):
                big.view()
    with open(os.path.join(ROOT, "docs", "protocol.md"), encoding="utf-8") as f:
        doc = f.read()
    nats_part = doc[doc.index("### 1.2 NATS") : doc.index("## 2. Encoding")]
    assert "`tether.Buffer` travel **inline**" in nats_part
    assert "shared-memory attachment\n  is refused" not in nats_part


async def test_list_shows_the_channels_of_every_listener(nats: NatsServer) -> None:
    from tether.nats.listing import list_channels

    url = f"{nats.url}/listsplit"
    async with Main() as a, Main() as b:
        a.handle("only_a", lambda call: "A", roles="nats")
        b.handle("only_b", lambda call: "B", roles="nats")
        for m in (a, b):
            m.handle("both", lambda call: 1, roles="nats")
            m.handle("private", lambda call: 1)  # local peers only: not for NATS clients
            m.on("note", lambda call, text: None, roles="nats")
        await a.listen(url)
        await b.listen(url)
        async with tether.connect(url) as peer:
            for _ in range(3):  # not one listener's, whichever the queue group picks
                names = [(e["kind"], e["channel"]) for e in await list_channels(peer)]
                assert names == [
                    ("invoke", "both"),
                    ("invoke", "only_a"),
                    ("invoke", "only_b"),
                    ("event", "note"),
                ]
        for _ in range(2):
            code, out, err = await _cli("--list", url)
            assert code == 0, err
            lines = out.splitlines()
            assert "invoke  only_a() -> Any" in lines and "invoke  only_b() -> Any" in lines
            assert len(lines) == 4 and "private" not in out
