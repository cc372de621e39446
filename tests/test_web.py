"""``ws://`` listeners: pages, tether.js and their WebSocket, driven by raw websockets clients.

The clients here build frames by hand (struct, JSON), as a page's own code
would, so these tests check the wire (docs/protocol.md, 1.1) and the web
security rules (docs/security.md, "Web pages"), not tether.js.
"""

from __future__ import annotations

import asyncio
import json
import struct
import urllib.error
import urllib.request
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from websockets.asyncio.client import ClientConnection
from websockets.asyncio.client import connect as ws_connect
from websockets.exceptions import InvalidStatus

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


async def open_page(server: WebServer, origin: str | None = None) -> ClientConnection:
    """A WebSocket as a page would open it (JSON), its HELLO sent and main's read."""
    ws = await ws_connect(
        ws_url(server, server.token),
        subprotocols=["tether.json"],  # type: ignore[list-item]
        origin=origin or server.origin,  # type: ignore[arg-type]
        open_timeout=5,
    )
    await ws.send(frame(HELLO, body=PAGE_HELLO))
    kind, _, _, hello = parse(await asyncio.wait_for(ws.recv(), 5))
    assert kind == HELLO and hello["role"] == "main" and hello["encoding"] == "json"
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
    assert server.url == f"{server.origin}/?token={server.token}"
    async with await open_page(server) as ws:
        assert await call(ws, 1, "message-from-renderer", "Hola, mundo!") == (
            RESULT,
            "Received: Hola, mundo!",
        )


async def test_page_is_served_with_the_token_and_refused_without(
    main: tether.Main, site: Path
) -> None:
    server = await main.listen("ws://127.0.0.1:0", static=site)
    status, headers, body = await get(server.url)
    assert (status, body) == (200, b"<h1>page</h1>")
    assert headers["Content-Type"].startswith("text/html")
    assert headers["Referrer-Policy"] == "no-referrer"
    cookie = headers["Set-Cookie"].split(";")[0]
    assert cookie == f"tether-{server.address.port}={server.token}"
    # Without the secret: 403, for the page, a file and the library alike.
    for path in ("/", "/index.html", "/app.js", "/tether.js"):
        status, _, _ = await get(server.origin + path)
        assert status == 403, path
    status, _, _ = await get(server.url.replace(server.token, server.token[:-1] + "x"))
    assert status == 403
    # The cookie the page got lets its own requests through (scripts, a reload).
    status, headers, body = await get(server.origin + "/app.js", {"Cookie": cookie})
    assert (status, body) == (200, b"export const x = 1;")
    assert headers["Content-Type"].startswith("text/javascript")
    assert server.refused >= 5


async def test_library_is_served_from_the_package(main: tether.Main) -> None:
    server = await main.listen("ws://127.0.0.1:0")  # no static folder: the library only
    status, headers, body = await get(f"{server.origin}/tether.js?token={server.token}")
    assert status == 200 and headers["Content-Type"].startswith("text/javascript")
    assert b"export function connect" in body
    status, _, body = await get(f"{server.origin}/tether.d.ts?token={server.token}")
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
    # The served origin, and localhost for a loopback listener, are fine.
    async with await open_page(server) as ws:
        assert (await call(ws, 1, "message-from-renderer", "x"))[0] == RESULT
