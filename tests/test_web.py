"""``ws://`` listeners: pages, tether.js and their WebSocket, driven by raw websockets clients.

The clients here build frames by hand (struct, JSON), as a page's own code
would, so these tests check the wire (docs/protocol.md, 1.1) and the web
security rules (docs/security.md, "Web pages"), not tether.js.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import struct
import urllib.error
import urllib.request
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import msgspec
import pytest
from websockets.asyncio.client import ClientConnection
from websockets.asyncio.client import connect as ws_connect
from websockets.exceptions import ConnectionClosed, InvalidStatus

import tether
from tether.web.server import WebServer

HEADER = struct.Struct("<IBBHIIHH")
HELLO, INVOKE, RESULT, ERROR, EVENT, CANCEL, GOODBYE = 1, 2, 3, 4, 5, 6, 11
PAGE_HELLO = {"protocol": "tether", "version": 1, "role": "page", "encoding": "json"}


def frame(kind: int, rid: int = 0, channel: str = "", body: Any = None, raw: bytes = b"") -> bytes:
    """One frame: ``body`` JSON-encoded (unless ``raw`` bytes are given)."""
    chan = channel.encode()
    data = raw if body is None else json.dumps(body).encode()
    return HEADER.pack(16 + len(chan) + len(data), kind, 0, len(chan), rid, 0, 0, 0) + chan + data


def parse(message: bytes | str) -> tuple[int, int, str, Any]:
    """(kind, request id, channel, JSON body or None) of one frame-message."""
    assert isinstance(message, bytes)
    size, kind, _, chan_len, rid, _, n_att, _ = HEADER.unpack_from(message)
    assert size + 4 == len(message) and n_att == 0
    body = message[20 + chan_len :]
    return kind, rid, message[20 : 20 + chan_len].decode(), json.loads(body) if body else None


@pytest.fixture
async def main(tmp_path: Path) -> AsyncIterator[tether.Main]:
    m = tether.Main(hello_timeout=5.0)

    @m.handle("message-from-renderer", roles={"web"})
    def reply(call: tether.Call, message: str) -> str:
        return f"Received: {message}"

    async with m:
        yield m


@pytest.fixture
def site(tmp_path: Path) -> Path:
    root = tmp_path / "site"
    root.mkdir()
    (root / "index.html").write_text("<h1>page</h1>")
    (root / "app.js").write_text("export const x = 1;")
    return root


def ws_url(server: WebServer, token: str | None = None) -> str:
    base = server.origin.replace("http://", "ws://") + "/tether"
    return base if token is None else f"{base}?token={token}"


async def open_page(
    server: WebServer,
    origin: str | None = None,
    hello: dict[str, Any] = PAGE_HELLO,
    url: str | None = None,
) -> ClientConnection:
    """A WebSocket as a page would open it (JSON), its HELLO sent and main's read."""
    ws = await ws_connect(
        f"{url}/tether?token={server.token}" if url else ws_url(server, server.token),
        subprotocols=["tether.json"],  # type: ignore[list-item]
        origin=origin or server.origin,  # type: ignore[arg-type]
        open_timeout=5,
        close_timeout=1,  # a page that stopped reading cannot finish a closing handshake
    )
    await ws.send(frame(HELLO, body=hello))
    kind, _, _, theirs = parse(await asyncio.wait_for(ws.recv(), 5))
    assert kind == HELLO and theirs["role"] == "main" and theirs["encoding"] == "json"
    return ws


async def call(ws: ClientConnection, rid: int, channel: str, *args: Any) -> tuple[int, Any]:
    await ws.send(frame(INVOKE, rid, channel, list(args)))
    kind, got, _, body = parse(await asyncio.wait_for(ws.recv(), 5))
    assert got == rid
    return kind, body


def http_get(url: str, headers: dict[str, str] | None = None) -> tuple[int, dict[str, str], bytes]:
    req = urllib.request.Request(url, headers=headers or {})
    try:
        with urllib.request.urlopen(req, timeout=5) as r:
            return r.status, dict(r.headers), r.read()
    except urllib.error.HTTPError as exc:
        return exc.code, dict(exc.headers), exc.read()


async def get(url: str, headers: dict[str, str] | None = None) -> tuple[int, dict[str, str], bytes]:
    return await asyncio.to_thread(http_get, url, headers)


async def test_page_invokes_a_web_channel(main: tether.Main, site: Path) -> None:
    server = await main.listen("ws://127.0.0.1:0", static=site)
    assert isinstance(server, WebServer) and server.address.port != 0
    assert server.url == f"{server.origin}/t/{server.token}/"
    async with await open_page(server) as ws:
        assert await call(ws, 1, "message-from-renderer", "Hola, mundo!") == (
            RESULT,
            "Received: Hola, mundo!",
        )


async def test_page_is_served_under_the_secret_path_and_refused_without(
    main: tether.Main, site: Path
) -> None:
    server = await main.listen("ws://127.0.0.1:0", static=site)
    status, headers, body = await get(server.url)
    assert (status, body) == (200, b"<h1>page</h1>")
    assert headers["Content-Type"].startswith("text/html")
    assert headers["Referrer-Policy"] == "no-referrer"
    assert "Set-Cookie" not in headers  # nothing a same-site page would send back
    # The page's relative links carry the secret: its own scripts load.
    status, headers, body = await get(server.url + "app.js")
    assert (status, body) == (200, b"export const x = 1;")
    assert headers["Content-Type"].startswith("text/javascript")
    # Without the secret in the path: 403, the old ?token= form included.
    wrong = server.token[:-1] + ("a" if server.token[-1] != "a" else "b")
    for path in (
        "/",
        "/index.html",
        "/app.js",
        f"/?token={server.token}",
        f"/app.js?token={server.token}",
        f"/t/{wrong}/",
        f"/t/{wrong}/app.js",
        "/t//app.js",
        f"/x/{server.token}/app.js",
    ):
        status, headers, _ = await get(server.origin + path)
        assert status == 403, path
        assert headers["Referrer-Policy"] == "no-referrer", path
    assert server.refused >= 9
    # /t/<secret> without its slash: sent to the page, whose relative links then work.
    status, _, body = await get(f"{server.origin}/t/{server.token}")
    assert (status, body) == (200, b"<h1>page</h1>")


async def test_cookies_are_neither_set_nor_taken(main: tether.Main, site: Path) -> None:
    """A cookie is sent by every page of the same site (any port of 127.0.0.1): never a key."""
    server = await main.listen("ws://127.0.0.1:0", static=site)
    cookie = f"tether-{server.address.port}={server.token}"
    status, _, _ = await get(server.origin + "/app.js", {"Cookie": cookie})
    assert status == 403
    with pytest.raises(InvalidStatus) as info:
        await ws_connect(
            ws_url(server),
            subprotocols=["tether.json"],  # type: ignore[list-item]
            origin=server.origin,  # type: ignore[arg-type]
            additional_headers={"Cookie": cookie},
            open_timeout=5,
        )
    assert info.value.response.status_code == 403


async def test_static_files_refuse_requests_from_other_sites(main: tether.Main, site: Path) -> None:
    """A page on another port of 127.0.0.1 is the same site; the browser says so: refused."""
    server = await main.listen("ws://127.0.0.1:0", static=site)
    for where in ("same-site", "cross-site"):
        status, _, _ = await get(server.url + "app.js", {"Sec-Fetch-Site": where})
        assert status == 403, where
    for where in ("same-origin", "none"):
        status, _, _ = await get(server.url + "app.js", {"Sec-Fetch-Site": where})
        assert status == 200, where
    # A link to the app clicked on another site's page: a top-level navigation, let in.
    navigate = {"Sec-Fetch-Mode": "navigate", "Sec-Fetch-Dest": "document"}
    for where in ("same-site", "cross-site"):
        status, _, body = await get(server.url, {"Sec-Fetch-Site": where, **navigate})
        assert (status, body) == (200, b"<h1>page</h1>"), where
        frame = {"Sec-Fetch-Site": where, "Sec-Fetch-Mode": "navigate", "Sec-Fetch-Dest": "iframe"}
        assert (await get(server.url, frame))[0] == 403, where
        script = {"Sec-Fetch-Site": where, "Sec-Fetch-Mode": "no-cors", "Sec-Fetch-Dest": "script"}
        assert (await get(server.url + "app.js", script))[0] == 403, where
    # The library is public: any page may load it.
    status, _, _ = await get(server.origin + "/tether.js", {"Sec-Fetch-Site": "cross-site"})
    assert status == 200


async def test_library_is_served_from_the_package(main: tether.Main) -> None:
    server = await main.listen("ws://127.0.0.1:0")  # no static folder: the library only
    status, headers, body = await get(f"{server.origin}/tether.js")  # public: no secret
    assert status == 200 and headers["Content-Type"].startswith("text/javascript")
    assert headers["Referrer-Policy"] == "no-referrer"
    assert b"export function connect" in body
    status, _, body = await get(f"{server.origin}/tether.d.ts")
    assert status == 200 and b"export function connect" in body
    status, _, _ = await get(server.url)
    assert status == 404  # no index without a static folder


async def test_socket_without_the_secret_is_refused(main: tether.Main) -> None:
    server = await main.listen("ws://127.0.0.1:0")
    for token in (None, "", server.token[:-1] + ("a" if server.token[-1] != "a" else "b")):
        with pytest.raises(InvalidStatus) as info:
            await ws_connect(
                ws_url(server, token),
                subprotocols=["tether.json"],  # type: ignore[list-item]
                origin=server.origin,  # type: ignore[arg-type]
                open_timeout=5,
            )
        assert info.value.response.status_code == 403
    assert not main.peers


async def test_socket_from_another_origin_is_refused(main: tether.Main) -> None:
    server = await main.listen("ws://127.0.0.1:0")
    port = server.address.port
    for origin in ("http://evil.example", f"http://localhost.evil.example:{port}", "null"):
        with pytest.raises(InvalidStatus) as info:
            await open_page(server, origin=origin)
        assert info.value.response.status_code == 403
    assert not main.peers
    # https only for a public listener (behind a TLS proxy that keeps the Host).
    with pytest.raises(InvalidStatus):
        await open_page(server, origin=server.origin.replace("http:", "https:"))
    async with await open_page(server) as ws:  # the served origin
        assert (await call(ws, 1, "message-from-renderer", "x"))[0] == RESULT
    public = await main.listen("ws://127.0.0.1:0", public=True)  # (tests bind loopback only)
    assert isinstance(public, WebServer)
    host = f"127.0.0.1:{public.address.port}"
    for origin in (f"http://{host}", f"https://{host}"):
        async with await open_page(public, origin=origin, url=f"ws://{host}") as ws:
            assert (await call(ws, 1, "message-from-renderer", "x"))[0] == RESULT
    with pytest.raises(InvalidStatus):
        await open_page(public, origin="https://evil.example", url=f"ws://{host}")


async def raw_http(server: WebServer, target: str, host: str | None = None) -> int:
    """The status of ``GET target`` sent byte for byte (no client-side path cleaning)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", server.address.port)
    try:
        host = host or f"127.0.0.1:{server.address.port}"
        target = f"/t/{server.token}{target}"
        writer.write(f"GET {target} HTTP/1.1\r\nHost: {host}\r\n\r\n".encode())
        await writer.drain()
        line = await asyncio.wait_for(reader.readline(), 5)
        return int(line.split()[1])
    finally:
        writer.close()


async def test_no_file_outside_the_static_folder(
    main: tether.Main, site: Path, tmp_path: Path
) -> None:
    (tmp_path / "secret.txt").write_text("not for pages")
    (site / ".env").write_text("KEY=1")
    (site / "sub").mkdir()
    (site / "sub" / "ok.txt").write_text("fine")
    os.symlink(tmp_path / "secret.txt", site / "link.txt")
    os.symlink(tmp_path, site / "linkdir")
    server = await main.listen("ws://127.0.0.1:0", static=site)
    assert await raw_http(server, "/sub/ok.txt") == 200
    assert await raw_http(server, "/sub/../index.html") == 404  # no .. at all, even inside
    for target in (
        "/../secret.txt",
        "/sub/../../secret.txt",
        "/%2e%2e/secret.txt",
        "/%2E%2E%2Fsecret.txt",
        "/sub/%2e%2e/%2e%2e/secret.txt",
        "/..%2fsecret.txt",
        "//etc/passwd",
        "/%2fetc%2fpasswd",
        f"/{tmp_path}/secret.txt".replace("//", "/"),
        f"/%2F{str(tmp_path).lstrip('/')}%2Fsecret.txt",
        "/link.txt",
        "/linkdir/secret.txt",
        "/.env",
        "/%2eenv",
        "/index.html%00.txt",
        "/sub\\..\\..\\secret.txt",
    ):
        assert await raw_http(server, target) == 404, target


async def test_unknown_host_is_refused(main: tether.Main, site: Path) -> None:
    """A name that resolves here (DNS rebinding) is not this server's, token or not."""
    server = await main.listen("ws://127.0.0.1:0", static=site)
    port = server.address.port
    assert await raw_http(server, "/", host=f"localhost:{port}") == 200
    assert await raw_http(server, "/", host=f"rebind.example:{port}") == 403


async def test_page_reaches_only_web_channels(main: tether.Main) -> None:
    ran: list[str] = []

    @main.handle("local-only")
    def local_only(call: tether.Call) -> str:
        ran.append("local-only")
        return "no"

    @main.handle("admin", roles={"client"})
    def admin(call: tether.Call) -> str:
        ran.append("admin")
        return "no"

    @main.on("log")
    def log(call: tether.Call, line: str) -> None:
        ran.append(line)

    server = await main.listen("ws://127.0.0.1:0")
    async with await open_page(server) as ws:
        kind, body = await call(ws, 1, "local-only")
        assert (kind, body["code"]) == (ERROR, "forbidden")
        kind, body = await call(ws, 2, "admin")
        assert (kind, body["code"]) == (ERROR, "forbidden")
        await ws.send(frame(EVENT, 0, "log", ["from a page"]))
        kind, body = await call(ws, 3, "nope")
        assert (kind, body["code"]) == (ERROR, "no_handler")
        assert "traceback" not in body
    assert ran == []


async def test_web_peer_identity(main: tether.Main) -> None:
    seen: list[tether.Peer] = []

    @main.handle("who", roles="web")
    def who(call: tether.Call) -> dict[str, Any]:
        seen.append(call.peer)
        p = call.peer
        return {"role": p.role, "origin": p.origin, "local": p.local, "uid": p.uid, "pid": p.pid}

    server = await main.listen("ws://127.0.0.1:0")
    async with await open_page(server) as ws:
        kind, body = await call(ws, 1, "who")
        assert kind == RESULT
        assert body == {
            "role": "web",
            "origin": server.origin,
            "local": False,
            "uid": None,
            "pid": None,
        }
        local = ws.local_address
        assert seen[0].address == f"tcp://{local[0]}:{local[1]}"
        assert seen[0] in main.peers


async def test_main_invokes_and_sends_to_a_page(main: tether.Main) -> None:
    got: asyncio.Future[tether.Peer] = asyncio.get_running_loop().create_future()

    @main.handle("ready", roles="web")
    def ready(call: tether.Call) -> None:
        got.set_result(call.peer)

    server = await main.listen("ws://127.0.0.1:0")
    async with await open_page(server) as ws:
        assert await call(ws, 1, "ready") == (RESULT, None)
        peer = await asyncio.wait_for(got, 5)
        await peer.send("theme", "dark")
        assert parse(await asyncio.wait_for(ws.recv(), 5)) == (EVENT, 0, "theme", ["dark"])
        task = asyncio.create_task(peer.invoke("page.title", 2, timeout=5))
        kind, rid, channel, args = parse(await asyncio.wait_for(ws.recv(), 5))
        assert (kind, channel, args) == (INVOKE, "page.title", [2])
        await ws.send(frame(RESULT, rid, body={"title": "tab 2"}))
        assert await task == {"title": "tab 2"}
        task = asyncio.create_task(peer.invoke("page.fail", timeout=5))
        kind, rid, _, _ = parse(await asyncio.wait_for(ws.recv(), 5))
        await ws.send(
            frame(ERROR, rid, body={"code": "remote", "message": "no", "type": "TypeError"})
        )
        with pytest.raises(tether.RemoteError) as info:
            await task
        assert info.value.type_name == "TypeError"
        # A timeout sends CANCEL, as to any peer.
        with pytest.raises(tether.InvokeTimeout):
            await peer.invoke("page.slow", timeout=0.2)
        kind, rid, _, _ = parse(await asyncio.wait_for(ws.recv(), 5))
        assert kind == INVOKE
        assert parse(await asyncio.wait_for(ws.recv(), 5))[:2] == (CANCEL, rid)


async def _closed_with(ws: ClientConnection) -> int | None:
    with pytest.raises(ConnectionClosed) as info:
        for _ in range(10):
            await asyncio.wait_for(ws.recv(), 5)
    return info.value.rcvd.code if info.value.rcvd else None


@pytest.mark.parametrize(
    "bad",
    [
        frame(INVOKE, 1, "message-from-renderer", ["x"]) + b"\x00",  # one frame and a byte
        frame(INVOKE, 1, "message-from-renderer", ["x"]) * 2,  # two frames in one message
        frame(INVOKE, 1, "message-from-renderer", ["x"])[:-1],  # a frame cut short
        b"\x10\x00\x00",  # shorter than a header
        frame(99, 1),  # unknown kind
        frame(INVOKE, 0, "message-from-renderer", ["x"]),  # request id 0
        frame(HELLO, body=PAGE_HELLO),  # a second HELLO
        HEADER.pack(16 + 2 + 16 + 3, INVOKE, 0, 2, 1, 0, 1, 0)  # an attachment: not on JSON
        + b"ch"
        + struct.pack("<BBHIQ", 0, 0, 0, 0, 3)
        + b"abc",
        "a text message",
    ],
    ids=["trailing", "two", "short", "tiny", "kind", "rid0", "hello2", "attachment", "text"],
)
async def test_malformed_frame_closes_only_that_page(main: tether.Main, bad: bytes | str) -> None:
    server = await main.listen("ws://127.0.0.1:0")
    async with await open_page(server) as good, await open_page(server) as evil:
        await evil.send(bad)
        assert await _closed_with(evil) == 1002  # protocol error
        assert await call(good, 1, "message-from-renderer", "still here") == (
            RESULT,
            "Received: still here",
        )
        for _ in range(100):
            if len(main.peers) == 1:
                break
            await asyncio.sleep(0.05)
        assert len(main.peers) == 1


async def test_malformed_body_is_a_bad_request_not_a_close(main: tether.Main) -> None:
    server = await main.listen("ws://127.0.0.1:0")
    async with await open_page(server) as ws:
        for rid, raw in enumerate(
            (b"[1,", b"\xff", b"", b"[1e999999]", b"[123456789012345678901234]"), 1
        ):
            await ws.send(frame(INVOKE, rid, "message-from-renderer", raw=raw))
            kind, got, _, body = parse(await asyncio.wait_for(ws.recv(), 5))
            assert (kind, got, body["code"]) == (ERROR, rid, "bad_request"), raw
        kind, body = await call(ws, 9, "message-from-renderer", 5)
        assert (kind, body["code"], body["path"]) == (ERROR, "bad_request", "message")


async def test_oversize_message_closes_the_page() -> None:
    async with tether.Main(max_frame_size=8192) as main:

        @main.handle("echo", roles="web")
        def echo(call: tether.Call, text: str) -> str:
            return text

        server = await main.listen("ws://127.0.0.1:0")
        async with await open_page(server) as ws:
            # The largest frame fits (its message is max_frame_size + 4 bytes)...
            body = json.dumps(["x" * (8192 - 16 - 4 - 4)]).encode()
            fits = frame(INVOKE, 1, "echo", raw=body)
            assert len(fits) == 8192 + 4
            await ws.send(fits)
            kind, _, _, answer = parse(await asyncio.wait_for(ws.recv(), 5))
            assert (kind, len(answer)) == (RESULT, 8192 - 24)
            # ...one byte more does not: the page is closed.
            await ws.send(frame(INVOKE, 2, "echo", raw=body + b" "))
            assert await _closed_with(ws) == 1009  # websockets: message too big
        for _ in range(100):
            if not main.peers:
                break
            await asyncio.sleep(0.05)
        assert not main.peers


async def test_main_cannot_send_a_page_more_than_it_accepts() -> None:
    async with tether.Main() as main:
        got: asyncio.Future[tether.Peer] = asyncio.get_running_loop().create_future()

        @main.handle("ready", roles="web")
        def ready(call: tether.Call) -> None:
            got.set_result(call.peer)

        server = await main.listen("ws://127.0.0.1:0")
        async with await open_page(server, hello={**PAGE_HELLO, "max_frame_size": 4096}) as ws:
            assert await call(ws, 1, "ready") == (RESULT, None)
            peer = await asyncio.wait_for(got, 5)
            with pytest.raises(tether.PayloadTooLarge):
                await peer.send("x", "y" * 5000)
            await peer.send("x", "small")
            assert parse(await asyncio.wait_for(ws.recv(), 5)) == (EVENT, 0, "x", ["small"])


async def test_hello_must_say_json(main: tether.Main) -> None:
    server = await main.listen("ws://127.0.0.1:0")
    ws = await ws_connect(
        ws_url(server, server.token),
        subprotocols=["tether.json"],  # type: ignore[list-item]
        origin=server.origin,  # type: ignore[arg-type]
    )
    async with ws:
        hello = {k: v for k, v in PAGE_HELLO.items() if k != "encoding"}
        await ws.send(frame(HELLO, body=hello))
        assert parse(await asyncio.wait_for(ws.recv(), 5))[0] == HELLO
        assert await _closed_with(ws) == 1002


async def test_msgpack_subprotocol_speaks_the_byte_stream_protocol(main: tether.Main) -> None:
    """``tether.msgpack``: the very frames of docs/protocol.md, one per message."""
    server = await main.listen("ws://127.0.0.1:0")
    ws = await ws_connect(
        ws_url(server, server.token),
        subprotocols=["tether.msgpack"],  # type: ignore[list-item]
        origin=server.origin,  # type: ignore[arg-type]
    )
    async with ws:
        assert ws.subprotocol == "tether.msgpack"
        hello = msgspec.msgpack.encode({"protocol": "tether", "version": 1, "role": "page"})
        await ws.send(HEADER.pack(16 + len(hello), HELLO, 0, 0, 0, 0, 0, 0) + hello)
        their = await asyncio.wait_for(ws.recv(), 5)
        assert isinstance(their, bytes)
        assert msgspec.msgpack.decode(their[20:])["role"] == "main"
        body = msgspec.msgpack.encode(["Hola, mundo!"])
        chan = b"message-from-renderer"
        await ws.send(
            HEADER.pack(16 + len(chan) + len(body), INVOKE, 0, len(chan), 1, 0, 0, 0) + chan + body
        )
        answer = await asyncio.wait_for(ws.recv(), 5)
        assert isinstance(answer, bytes)
        assert answer[4] == RESULT
        assert msgspec.msgpack.decode(answer[20:]) == "Received: Hola, mundo!"


async def test_socket_needs_a_tether_subprotocol(main: tether.Main) -> None:
    server = await main.listen("ws://127.0.0.1:0")
    with pytest.raises(InvalidStatus) as info:
        await ws_connect(ws_url(server, server.token), origin=server.origin)  # type: ignore[arg-type]
    assert info.value.response.status_code == 400


async def test_listen_arguments_are_checked(main: tether.Main, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="public=True"):
        await main.listen("ws://0.0.0.0:0")
    with pytest.raises(ValueError, match="'web'"):
        await main.listen("ws://127.0.0.1:0", role="client")
    with pytest.raises(FileNotFoundError):
        await main.listen("ws://127.0.0.1:0", static=tmp_path / "missing")
    with pytest.raises(ValueError, match="ws://"):
        await main.listen("tcp://127.0.0.1:0", static=tmp_path)
    with pytest.raises(ValueError, match="own secret"):
        await main.listen("ws://127.0.0.1:0", secret=b"0123456789abcdef")
    server = await main.listen("ws://127.0.0.1:0", public=True)
    assert server.url.startswith("http://127.0.0.1:")
    assert await raw_http(server, "/", host=f"any.example:{server.address.port}") == 404


async def test_close_ends_pages_with_a_goodbye(site: Path) -> None:
    main = tether.Main()
    server = await main.listen("ws://127.0.0.1:0", static=site)
    assert isinstance(server, WebServer)
    ws = await open_page(server)
    fd = server.fileno()
    assert fd >= 0
    await main.close()
    kind, _, _, body = parse(await asyncio.wait_for(ws.recv(), 5))
    assert (kind, body) == (GOODBYE, {"reason": "main closing"})
    assert await _closed_with(ws) == 1000
    assert server.fileno() == -1
    await asyncio.wait_for(server.wait_closed(), 5)


async def test_a_page_that_stops_reading_is_dropped() -> None:
    async with tether.Main(max_queued=64 << 20, drain_timeout=1.0) as main:
        got: asyncio.Future[tether.Peer] = asyncio.get_running_loop().create_future()

        @main.handle("ready", roles="web")
        def ready(call: tether.Call) -> None:
            got.set_result(call.peer)

        server = await main.listen("ws://127.0.0.1:0")
        async with await open_page(server) as ws:
            assert await call(ws, 1, "ready") == (RESULT, None)
            peer = await asyncio.wait_for(got, 5)
            with pytest.raises(tether.PeerGone, match="stopped reading: nothing drained"):
                for _ in range(400):  # the page reads nothing from here on
                    await peer.send("flood", "x" * (256 << 10))
            assert peer.closed


async def test_a_silent_page_is_dropped_after_hello_timeout() -> None:
    async with tether.Main(hello_timeout=0.3) as main:
        server = await main.listen("ws://127.0.0.1:0")
        assert isinstance(server, WebServer)
        ws = await ws_connect(
            ws_url(server, server.token),
            subprotocols=["tether.json"],  # type: ignore[list-item]
            origin=server.origin,  # type: ignore[arg-type]
        )
        async with ws:
            assert parse(await asyncio.wait_for(ws.recv(), 5))[0] == HELLO  # main's
            assert await _closed_with(ws) == 1008  # then nothing from us: dropped
            assert ws.close_reason == "no HELLO within 0.3 s"
        assert server.refused == 1


async def test_max_connections_holds_for_pages() -> None:
    async with tether.Main() as main:
        server = await main.listen("ws://127.0.0.1:0", max_connections=1)
        assert isinstance(server, WebServer)
        async with await open_page(server):
            with pytest.raises(InvalidStatus) as info:
                await open_page(server)
            assert info.value.response.status_code == 503


def test_server_url_of_other_listeners_is_the_address() -> None:
    async def run() -> None:
        async with tether.Main() as main:
            server = await main.listen("tcp://127.0.0.1:0")
            assert server.url == str(server.address)

    asyncio.run(run())


async def test_main_pushes_to_every_connected_page(main: tether.Main) -> None:
    server = await main.listen("ws://127.0.0.1:0")
    assert isinstance(server, WebServer)
    async with await open_page(server) as a, await open_page(server) as b:
        for _ in range(100):
            if len(server.peers) == 2:
                break
            await asyncio.sleep(0.02)
        pages = server.peers
        assert len(pages) == 2 and all(p.role == "web" for p in pages)
        for page in pages:
            await page.send("theme", "dark")
        for ws in (a, b):
            assert parse(await asyncio.wait_for(ws.recv(), 5)) == (EVENT, 0, "theme", ["dark"])
        await a.close()
        for _ in range(100):
            if len(server.peers) == 1:
                break
            await asyncio.sleep(0.02)
        assert len(server.peers) == 1


async def test_random_frames_never_break_the_server(
    main: tether.Main, caplog: pytest.LogCaptureFixture
) -> None:
    """Garbage in well-sized messages: each page is answered or closed (1002), nothing else."""
    import random

    rng = random.Random(9)
    server = await main.listen("ws://127.0.0.1:0")
    with caplog.at_level("WARNING"):
        for _ in range(40):
            kind = rng.choice([0, *range(1, 14), 14, 255])
            chan = bytes(rng.randrange(256) for _ in range(rng.randrange(4)))
            body = bytes(rng.randrange(256) for _ in range(rng.randrange(40)))
            head = HEADER.pack(
                16 + len(chan) + len(body),
                kind,
                rng.randrange(2),
                rng.choice([len(chan), len(chan) + 5]),
                rng.randrange(3),
                rng.randrange(2),
                rng.choice([0, 0, 1]),
                0,
            )
            async with await open_page(server) as ws:
                await ws.send(head + chan + body)
                await ws.send(frame(INVOKE, 77, "message-from-renderer", ["after"]))
                try:
                    while True:
                        kind_, rid, _, _ = parse(await asyncio.wait_for(ws.recv(), 5))
                        if rid == 77 and kind_ in (RESULT, ERROR):
                            break
                except ConnectionClosed as exc:  # 1000 after a GOODBYE, else a protocol error
                    assert exc.rcvd is not None
                    assert exc.rcvd.code in ((1000, 1002) if kind == GOODBYE else (1002,)), kind
        async with await open_page(server) as ws:
            assert (await call(ws, 1, "message-from-renderer", "x"))[0] == RESULT
    bad = [r for r in caplog.records if "broke the protocol" not in r.getMessage()]
    assert not [r for r in bad if r.levelname in ("ERROR", "CRITICAL") or r.exc_info], bad


async def test_without_websockets_listen_says_what_to_install(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import sys

    for name in [n for n in sys.modules if n == "tether.web.server" or n.startswith("websockets")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "websockets", None)  # as if not installed
    async with tether.Main() as main:
        with pytest.raises(ImportError, match=r"tether-ipc\[web\]"):
            await main.listen("ws://127.0.0.1:0")


async def raw_request(server: WebServer, head: str, timeout: float = 5) -> tuple[int, bytes]:
    """Send ``head`` (request line and headers, no blank line) byte for byte; (status, rest)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", server.address.port)
    try:
        writer.write(head.encode() + b"\r\n\r\n")
        await writer.drain()
        data = await asyncio.wait_for(reader.read(), timeout)
        status = int(data.split(b" ", 2)[1])
        return status, data.partition(b"\r\n\r\n")[2]
    finally:
        writer.close()


async def test_duplicate_host_or_origin_is_a_counted_refusal(
    main: tether.Main, site: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Two Host or Origin headers: 400, counted, logged as a refusal (no traceback)."""
    server = await main.listen("ws://127.0.0.1:0", static=site)
    host = f"127.0.0.1:{server.address.port}"
    upgrade = (
        f"GET /tether?token={server.token} HTTP/1.1\r\nHost: {host}\r\nUpgrade: websocket\r\n"
        "Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
        "Sec-WebSocket-Version: 13\r\nSec-WebSocket-Protocol: tether.json"
    )
    before = server.refused
    with caplog.at_level(logging.WARNING):
        for head in (
            f"GET /t/{server.token}/ HTTP/1.1\r\nHost: {host}\r\nHost: {host}",
            f"{upgrade}\r\nOrigin: http://evil.example\r\nOrigin: {server.origin}",
            f"GET /t/{server.token}/ HTTP/1.1\r\nHost: {host}\r\nSec-Fetch-Site: none"
            "\r\nSec-Fetch-Site: cross-site",
        ):
            status, body = await raw_request(server, head)
            assert status == 400, head
            assert b"more than one" in body
    assert server.refused == before + 3
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR or r.exc_info]
    assert not main.peers


async def test_http_methods_head_and_trailing_slash(main: tether.Main, site: Path) -> None:
    server = await main.listen("ws://127.0.0.1:0", static=site)
    host = f"127.0.0.1:{server.address.port}"
    page = f"/t/{server.token}/app.js"
    status, body = await raw_request(server, f"GET {page} HTTP/1.1\r\nHost: {host}")
    assert (status, body) == (200, b"export const x = 1;")
    # HEAD: a GET's headers, no body
    reader, writer = await asyncio.open_connection("127.0.0.1", server.address.port)
    try:
        writer.write(f"HEAD {page} HTTP/1.1\r\nHost: {host}\r\n\r\n".encode())
        data = await asyncio.wait_for(reader.read(), 5)
    finally:
        writer.close()
    head, _, body = data.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200") and b"Content-Length: 19" in head
    assert body == b""
    for method in ("POST", "OPTIONS", "PUT", "DELETE"):
        status, _ = await raw_request(server, f"{method} {page} HTTP/1.1\r\nHost: {host}")
        assert status == 405, method
        status, _ = await raw_request(server, f"{method} /tether.js HTTP/1.1\r\nHost: {host}")
        assert status == 405, method
    # A file is not a folder.
    (site / "sub").mkdir()
    (site / "sub" / "a.txt").write_text("a")
    assert await raw_http(server, "/sub/a.txt") == 200
    assert await raw_http(server, "/sub/a.txt/") == 404
    assert await raw_http(server, "/app.js/") == 404
    assert await raw_http(server, "/sub/") == 404  # no index.html there


async def test_static_files_have_a_size_cap(main: tether.Main, site: Path) -> None:
    from tether.web.server import MAX_STATIC_FILE_SIZE

    with open(site / "huge.bin", "wb") as f:
        f.truncate(MAX_STATIC_FILE_SIZE + 1)  # sparse: costs no disk
    with open(site / "edge.bin", "wb") as f:
        f.truncate(MAX_STATIC_FILE_SIZE)
    server = await main.listen("ws://127.0.0.1:0", static=site)
    status, _, body = await get(server.url + "huge.bin")
    assert status == 413 and str(MAX_STATIC_FILE_SIZE).encode() in body
    status, _, body = await get(server.url + "edge.bin")
    assert status == 200 and len(body) == MAX_STATIC_FILE_SIZE


async def test_static_reads_are_bounded_and_off_the_loop(
    main: tether.Main, site: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import threading
    import time

    from tether.web import server as web_server

    loop_thread = threading.get_ident()
    lock = threading.Lock()
    now, most, threads = 0, 0, set()
    read = web_server._read

    def slow_read(path: str, limit: int) -> bytes | None:
        nonlocal now, most
        with lock:
            now += 1
            most = max(most, now)
            threads.add(threading.get_ident())
        time.sleep(0.1)
        with lock:
            now -= 1
        return read(path, limit)

    monkeypatch.setattr(web_server, "_read", slow_read)
    server = await main.listen("ws://127.0.0.1:0", static=site)
    got = await asyncio.gather(*(get(server.url + "app.js") for _ in range(12)))
    assert [g[0] for g in got] == [200] * 12
    assert 1 <= most <= web_server.MAX_STATIC_READS
    assert loop_thread not in threads


async def test_static_bytes_held_are_bounded(
    main: tether.Main, site: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A client that does not read holds its response: past the budget, others get 503."""
    import socket

    from tether.web import server as web_server

    size = 8 * 1024 * 1024
    monkeypatch.setattr(web_server, "MAX_STATIC_BYTES", size + size // 2)
    with open(site / "big.bin", "wb") as f:
        f.truncate(size)
    server = await main.listen("ws://127.0.0.1:0", static=site)
    host = f"127.0.0.1:{server.address.port}"
    stalled = socket.socket()
    stalled.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    stalled.connect(("127.0.0.1", server.address.port))
    try:
        stalled.sendall(f"GET /t/{server.token}/big.bin HTTP/1.1\r\nHost: {host}\r\n\r\n".encode())
        for _ in range(100):  # bounded: until the server holds the response
            if server._static_bytes:
                break
            await asyncio.sleep(0.05)
        assert server._static_bytes == size
        status, headers, _ = await get(server.url + "big.bin")
        assert status == 503 and headers["Retry-After"] == "1"
        assert (await get(server.url + "app.js"))[0] == 200  # small files still fit
    finally:
        stalled.close()
    for _ in range(100):
        if not server._static_bytes:
            break
        await asyncio.sleep(0.05)
    assert server._static_bytes == 0
    status, _, body = await get(server.url + "big.bin")
    assert status == 200 and len(body) == size


async def test_connections_in_the_http_stage_are_bounded(main: tether.Main, site: Path) -> None:
    """Sockets that never finish their request: past max_handshaking the oldest go."""
    server = await main.listen("ws://127.0.0.1:0", static=site, max_handshaking=8)
    assert isinstance(server, WebServer)
    held = []
    try:
        for _ in range(20):
            reader, writer = await asyncio.open_connection("127.0.0.1", server.address.port)
            writer.write(b"GET / HTTP/1.1\r\n")  # never finished
            held.append((reader, writer))
        for _ in range(100):
            if server.http_dropped >= 12:
                break
            await asyncio.sleep(0.05)
        assert server.http_dropped >= 12 and len(server._http) <= 8
        assert await asyncio.wait_for(held[0][0].read(), 5) == b""  # the oldest: closed
        # A real request still gets in, at once.
        status, _, body = await asyncio.wait_for(get(server.url), 5)
        assert (status, body) == (200, b"<h1>page</h1>")
    finally:
        for _, writer in held:
            writer.close()


async def test_page_dropped_to_make_room_is_told_to_try_again(
    main: tether.Main, site: Path
) -> None:
    """Past max_handshaking pages without HELLO, the oldest closes with 1013 and a reason."""
    server = await main.listen("ws://127.0.0.1:0", static=site, max_handshaking=2)
    opened = []
    try:
        for _ in range(3):  # upgraded, no HELLO yet
            opened.append(
                await ws_connect(
                    ws_url(server, server.token),
                    subprotocols=["tether.json"],  # type: ignore[list-item]
                    origin=server.origin,  # type: ignore[arg-type]
                    open_timeout=5,
                    close_timeout=1,
                )
            )
            await asyncio.sleep(0.05)  # each one tracked before the next
        oldest = opened[0]
        with pytest.raises(ConnectionClosed):
            while True:
                await asyncio.wait_for(oldest.recv(), 5)  # main's HELLO, then the close
        assert oldest.close_code == 1013
        assert oldest.close_reason == "2 pages still connecting: try again later"
        assert server.handshakes_dropped == 1
    finally:
        for ws in opened:
            await ws.close()


async def test_json_the_decoder_cannot_take_is_explained_in_json_terms(main: tether.Main) -> None:
    server = await main.listen("ws://127.0.0.1:0")
    async with await open_page(server) as ws:
        for rid, raw, says in (
            (1, b"[18446744073709551616]", "JSON number out of range"),
            (2, b"[-9223372036854775809]", "JSON number out of range"),
            (3, b"[1e400]", "JSON number out of range"),
            (4, b'["\\ud800"]', "invalid JSON body"),
            (5, b"[1,", "invalid JSON body"),
            (6, b"[" * 5000 + b"]" * 5000, "invalid JSON body"),
        ):
            await ws.send(frame(INVOKE, rid, "message-from-renderer", raw=raw))
            kind, got, _, body = parse(await asyncio.wait_for(ws.recv(), 5))
            assert (kind, got, body["code"]) == (ERROR, rid, "bad_request"), body
            assert says in body["message"] and "MessagePack" not in body["message"], body
        # the connection is fine
        assert await call(ws, 9, "message-from-renderer", "x") == (RESULT, "Received: x")


async def test_a_page_result_json_cannot_carry_is_explained(main: tether.Main) -> None:
    got: asyncio.Future[tether.Peer] = asyncio.get_running_loop().create_future()

    @main.handle("ready", roles="web")
    def ready(call: tether.Call) -> None:
        got.set_result(call.peer)

    server = await main.listen("ws://127.0.0.1:0")
    async with await open_page(server) as ws:
        assert await call(ws, 1, "ready") == (RESULT, None)
        peer = await asyncio.wait_for(got, 5)
        task = asyncio.create_task(peer.invoke("page.big", timeout=5))
        _, rid, _, _ = parse(await asyncio.wait_for(ws.recv(), 5))
        await ws.send(frame(RESULT, rid, raw=b"18446744073709551616"))
        with pytest.raises(tether.TetherError) as info:
            await task
        assert "JSON number out of range" in str(info.value), info.value


async def test_msgpack_page_attachment_references_without_attachments_are_bad_request(
    main: tether.Main,
) -> None:
    """A page has no attachments: Ext 1/2/4 in its frames name none (protocol.md 3.6)."""
    got: list[Any] = []

    @main.handle("take", roles={"web"})
    def take(call: tether.Call, x: Any) -> str:
        got.append(x)
        return type(x).__name__

    server = await main.listen("ws://127.0.0.1:0")
    ws = await ws_connect(
        ws_url(server, server.token),
        subprotocols=["tether.msgpack"],  # type: ignore[list-item]
        origin=server.origin,  # type: ignore[arg-type]
    )
    async with ws:
        hello = msgspec.msgpack.encode({"protocol": "tether", "version": 1, "role": "page"})
        await ws.send(HEADER.pack(16 + len(hello), HELLO, 0, 0, 0, 0, 0, 0) + hello)
        await asyncio.wait_for(ws.recv(), 5)
        chan = b"take"
        refs = [
            msgspec.msgpack.Ext(1, bytes(4)),
            msgspec.msgpack.Ext(2, msgspec.msgpack.encode([0, "|u1", [1]])),
            msgspec.msgpack.Ext(4, bytes(4)),
        ]
        for rid, ref in enumerate(refs, 1):
            body = msgspec.msgpack.encode([ref])
            await ws.send(
                HEADER.pack(16 + len(chan) + len(body), INVOKE, 0, len(chan), rid, 0, 0, 0)
                + chan
                + body
            )
            answer = await asyncio.wait_for(ws.recv(), 5)
            assert isinstance(answer, bytes) and answer[4] == ERROR
            info = msgspec.msgpack.decode(answer[20:])
            assert info["code"] == "bad_request" and "no attachments" in info["message"], info
    assert got == []


async def test_the_secret_never_reaches_a_log(
    main: tether.Main, site: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Refusals of requests that carry the secret log the path with ``…`` in its place."""
    from tether.web.server import MAX_STATIC_FILE_SIZE

    with open(site / "huge.bin", "wb") as f:
        f.truncate(MAX_STATIC_FILE_SIZE + 1)  # sparse: costs no disk
    server = await main.listen("ws://127.0.0.1:0", static=site)
    host = f"127.0.0.1:{server.address.port}"
    page = f"/t/{server.token}/"
    heads = [
        f"GET {page}app.js HTTP/1.1\r\nHost: {host}\r\nSec-Fetch-Site: same-site",
        f"GET {page}huge.bin HTTP/1.1\r\nHost: {host}",
        f"GET {page} HTTP/1.1\r\nHost: {host}\r\nHost: {host}",
        f"GET /{page} HTTP/1.1\r\nHost: {host}",
        f"GET /t/{server.token}%2fapp.js HTTP/1.1\r\nHost: {host}",
        f"GET {server.origin}{page}app.js HTTP/1.1\r\nHost: {host}",
        f"GET {page}app.js HTTP/1.1\r\nHost: evil.example:{server.address.port}",
    ]
    with caplog.at_level(logging.DEBUG):
        for head in heads:
            status, body = await raw_request(server, head)
            assert status >= 400, head
            assert server.token.encode() not in body, head
    logged = [r.getMessage() for r in caplog.records]
    assert any("/t/…/app.js" in m for m in logged)
    assert not [m for m in logged if server.token in m]


async def test_a_flood_of_half_requests_does_not_cut_a_download(
    main: tether.Main, site: Path
) -> None:
    """Only connections still sending their request are dropped for room, not one being answered."""
    import socket

    size = 8 * 1024 * 1024
    with open(site / "big.bin", "wb") as f:
        f.truncate(size)
    server = await main.listen("ws://127.0.0.1:0", static=site, max_handshaking=8)
    assert isinstance(server, WebServer)
    port = server.address.port
    loop = asyncio.get_running_loop()
    legit = socket.socket()
    legit.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    legit.settimeout(10)
    held: list[socket.socket] = []
    try:
        legit.connect(("127.0.0.1", port))
        legit.sendall(
            f"GET /t/{server.token}/big.bin HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n\r\n".encode()
        )
        got = await loop.run_in_executor(None, legit.recv, 4096)
        assert got.startswith(b"HTTP/1.1 200")
        for _ in range(40):  # no secret, never finished
            attacker = socket.create_connection(("127.0.0.1", port))
            attacker.sendall(b"GET / HTTP/1.1\r\n")
            held.append(attacker)
        for _ in range(100):
            if server.http_dropped >= 32:
                break
            await asyncio.sleep(0.05)
        assert server.http_dropped >= 32

        def rest() -> bytes:
            chunks = [got]
            while chunk := legit.recv(1 << 16):
                chunks.append(chunk)
            return b"".join(chunks)

        data = await loop.run_in_executor(None, rest)
        assert len(data.partition(b"\r\n\r\n")[2]) == size
    finally:
        legit.close()
        for attacker in held:
            attacker.close()


async def test_favicon_at_the_root_is_no_content_not_a_refusal(
    main: tether.Main, site: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Browsers ask for /favicon.ico on every page: 204, neither logged nor counted."""
    server = await main.listen("ws://127.0.0.1:0", static=site)
    with caplog.at_level(logging.WARNING, logger="tether"):
        status, _, body = await get(server.origin + "/favicon.ico")
    assert (status, body) == (204, b"")
    assert server.refused == 0
    assert not [r for r in caplog.records if r.name == "tether"]
    assert (await get(server.origin + "/favicon.png"))[0] == 403  # nothing else opens
