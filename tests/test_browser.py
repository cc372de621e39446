"""Pages as peers, in a real browser: Debian's Chromium driven by Playwright.

These tests run, never skip: ``make test`` installs /usr/bin/chromium when it
is missing, and a missing browser fails the tests. Playwright's own browser
download is not used (the machines have no network): /usr/bin/chromium is
started once per session and Playwright connects to it (``connect_over_cdp``).

Two kinds of server: ``tether demo --web`` as a subprocess (the seed's page,
clicked), and a Main running in a thread of this process (``WebApp``), whose
handlers record what ran, for the security tests.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import datetime
import os
import queue
import re
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Coroutine, Iterator
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, TypeVar

import msgspec
import pytest
from playwright.sync_api import Browser, Page, expect, sync_playwright

import tether
from tether.tstypes import typescript

T = TypeVar("T")

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
ROOT = Path(__file__).resolve().parent.parent
SCREENSHOT = ROOT / "docs" / "img" / "electron-style.png"
WAIT_MS = 15_000  # every Playwright wait in these tests
WAIT_S = WAIT_MS / 1000


@pytest.fixture(scope="session")
def chromium(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """One headless Chromium for the whole session; its DevTools address.

    Missing Chromium fails, never skips. Chromium runs as its own process and
    Playwright connects to it per module (:func:`browser`): Playwright's sync
    API holds an event loop in this thread while it is started, which would
    stop every asyncio test that runs after it in the session.
    """
    if not os.access(CHROMIUM, os.X_OK):
        pytest.fail(f"{CHROMIUM} is missing: `make test` installs it (apt-get install chromium)")
    profile = tmp_path_factory.mktemp("chromium")
    log = profile / "stderr.txt"
    with open(log, "wb") as err:
        proc = subprocess.Popen(
            [
                CHROMIUM,
                *CHROMIUM_ARGS,
                "--remote-debugging-address=127.0.0.1",
                "--remote-debugging-port=0",
                f"--user-data-dir={profile / 'profile'}",
                "about:blank",
            ],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=err,
            start_new_session=True,  # its helper processes end with it (killpg below)
        )
    try:
        deadline = time.monotonic() + 30
        while not (found := re.search(r"DevTools listening on (ws://\S+)", log.read_text())):
            if proc.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"{CHROMIUM} did not start (exit {proc.poll()}):\n{log.read_text()}")
            time.sleep(0.05)
        yield found.group(1)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(WAIT_S)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(WAIT_S)


@pytest.fixture(scope="module")
def browser(chromium: str) -> Iterator[Browser]:
    """Playwright connected to the session's Chromium, for this module's tests."""
    with sync_playwright() as pw:
        b = pw.chromium.connect_over_cdp(chromium, timeout=30_000)
        try:
            yield b
        finally:
            b.close()


@pytest.fixture
def page(browser: Browser) -> Iterator[Page]:
    """A fresh browser context and page (no shared cookies or storage between tests)."""
    context = browser.new_context()
    context.set_default_timeout(WAIT_MS)
    try:
        yield context.new_page()
    finally:
        context.close()


def without_secret(url: str) -> str:
    """``url`` with the secret (its path's ``/t/<secret>`` prefix) removed."""
    parts = urllib.parse.urlsplit(url)
    path = parts.path
    if path.startswith("/t/"):
        path = "/" + path[3:].partition("/")[2]
    return urllib.parse.urlunsplit(parts._replace(path=path))


def http_status(url: str) -> int:
    try:
        with urllib.request.urlopen(url, timeout=WAIT_S) as r:
            return int(r.status)
    except urllib.error.HTTPError as exc:
        return exc.code


# ---------------------------------------------------------------- tether demo --web


class Demo:
    """``tether demo --web`` as a subprocess; its stdout lines arrive in :attr:`lines`."""

    def __init__(self, child_env: dict[str, str]) -> None:
        env = dict(child_env)
        env["PYTHONPATH"] = os.pathsep.join([str(ROOT / "src"), env["PYTHONPATH"]])
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "tether", "demo", "--web"],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
        )
        self.lines: queue.Queue[str] = queue.Queue()
        # readline blocks: a thread reads, the test waits on the queue (bounded)
        threading.Thread(target=self._read, daemon=True).start()
        seen = []
        try:
            while not (line := self.lines.get(timeout=WAIT_S * 2)).startswith("http"):
                seen.append(line)
        except queue.Empty:
            self.close()
            pytest.fail(f"tether demo --web printed no address: {seen!r}")
        self.url = line

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.put(line.rstrip("\n"))

    def stop(self, sig: int) -> int:
        """Send ``sig``; return the exit code (killed if it does not exit in time)."""
        self.proc.send_signal(sig)
        try:
            return self.proc.wait(WAIT_S)
        except subprocess.TimeoutExpired:
            self.close()
            raise

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(WAIT_S)
        for f in (self.proc.stdout, self.proc.stderr):
            if f is not None:
                f.close()


def test_demo_web_page_clicked(page: Page, child_env: dict[str, str]) -> None:
    """The seed's page: Send Message -> `Received: Hola, mundo!` on the enabled button;
    main invoked the page's handler and pushed the answer; SIGINT stops it with 0."""
    demo = Demo(child_env)
    url = demo.url
    try:
        assert re.fullmatch(r"http://127\.0\.0\.1:\d+/t/[\w-]+/", url), url
        response = page.goto(url)
        assert response is not None and response.status == 200
        received = page.locator("#receivedButton")
        expect(received).to_be_disabled()
        expect(received).to_have_text("Received: Click to Display")
        expect(page.locator("#messageToSend")).to_have_text("Hola, mundo!")
        # past the seed: main invoked the page's page.title, then pushed main-status
        expect(page.locator("#fromMain")).to_have_text("Main invoked page.title: 'IPC' (role web)")
        page.click("#sendButton")  # waits until connected (enabled)
        expect(received).to_be_enabled()
        expect(received).to_have_text("Received: Hola, mundo!")
        SCREENSHOT.parent.mkdir(parents=True, exist_ok=True)
        page.set_viewport_size({"width": 560, "height": 160})
        page.screenshot(path=str(SCREENSHOT))
        # main's log names the page's identity: role web and the served origin
        origin = "http://" + urllib.parse.urlsplit(url).netloc
        assert demo.lines.get(timeout=WAIT_S) == f"page connected: role web, origin {origin}"
        # the same server refuses the page without its secret
        assert http_status(without_secret(url)) == 403
        assert demo.stop(signal.SIGINT) == 0
    finally:
        demo.close()


def test_demo_web_stops_on_sigterm(child_env: dict[str, str]) -> None:
    demo = Demo(child_env)
    try:
        assert http_status(demo.url) == 200
        assert demo.stop(signal.SIGTERM) == 0
    finally:
        demo.close()


def test_demo_web_without_websockets_says_what_to_install(child_env: dict[str, str]) -> None:
    env = dict(child_env)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT / "src"), env["PYTHONPATH"]])
    script = (
        "import sys; sys.modules['websockets'] = None\n"  # import websockets now fails
        "from tether import cli; sys.exit(cli.main(['demo', '--web']))"
    )
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=60
    )
    assert done.returncode == 1, done.stderr
    assert done.stderr.startswith("error: tether demo --web: ws:// needs the websockets package")
    assert "pip install 'tether-ipc[web]'" in done.stderr
    assert "Traceback" not in done.stderr
    assert "http" not in done.stdout  # no address printed: nothing is served


# ---------------------------------------------------------------- a Main in a thread

TEST_PAGE = """<!DOCTYPE html>
<html><head><meta charset="utf-8"><title>test page</title></head><body>
<p id="state">loading</p>
<script type="module">
// Every WebSocket the page opens, so a test can reach under tether.js.
window.sockets = [];
const Native = window.WebSocket;
window.WebSocket = class extends Native {
  constructor(...args) { super(...args); window.sockets.push(this); }
};
const { connect } = await import("/tether.js");
window.pushes = [];
try {
  window.ipc = await connect();
  ipc.on("pushed", (...args) => window.pushes.push(args));
  ipc.handle("page.sum", (a, b) => a + b);
  ipc.handle("page.fail", () => { throw new TypeError("page says no"); });
  await ipc.invoke("hello", { timeout: 5000 });
  document.getElementById("state").textContent = "ready";
} catch (err) {
  document.getElementById("state").textContent = `${err.name}: ${err.message}`;
}
// An invoke's outcome as plain data: {ok, value} or {name, message}.
window.attempt = async (channel, ...args) => {
  try {
    return { ok: true, value: await window.ipc.invoke(channel, ...args, { timeout: 5000 }) };
  } catch (err) {
    return { ok: false, name: err.name, message: String(err.message) };
  }
};
</script></body></html>
"""

# What a socket opened from a page came to: "open" or "refused" (closed before opening).
PROBE = """async (url) => await new Promise((resolve) => {
  const ws = new WebSocket(url, "tether.json");
  const timer = setTimeout(() => resolve("timeout"), 10000);
  ws.onopen = () => { clearTimeout(timer); ws.close(); resolve("open"); };
  ws.onerror = () => { clearTimeout(timer); resolve("refused"); };
  ws.onclose = () => { clearTimeout(timer); resolve("refused"); };
})"""


class Point(msgspec.Struct):
    x: int
    y: float = 0.0


@dataclasses.dataclass
class Shapes:
    point: Point
    when: datetime.datetime
    data: bytes
    pair: tuple[int, str]
    maybe: dict[str, int | None]


class WebApp:
    """A Main serving ``static`` on ws://127.0.0.1:0 in its own thread and event loop."""

    def __init__(self, static: Path) -> None:
        self.ran: list[str] = []  # handlers not exposed to pages append here if they run
        self.pages: list[tether.Peer] = []  # pages that invoked "hello"
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.main = tether.Main()
        self._register()
        self.run(self.main.__aenter__())
        self.server = self.run(self.main.listen("ws://127.0.0.1:0", static=str(static)))
        self.url: str = self.server.url

    def _register(self) -> None:
        main = self.main

        @main.handle("hello", roles={"web"})
        def hello(call: tether.Call) -> dict[str, Any]:
            self.pages.append(call.peer)
            return {"role": call.peer.role, "origin": call.peer.origin}

        @main.handle("echo", roles={"web"})
        def echo(call: tether.Call, text: str) -> str:
            return text

        @main.handle("shapes", roles={"web"})
        def shapes(call: tether.Call, p: Point, when: datetime.datetime) -> Shapes:
            return Shapes(p, when, b"\x00\x01", (1, "one"), {"k": None})

        @main.handle("blob", roles={"web"})
        def blob(call: tether.Call, data: bytes) -> int:
            return len(data)

        @main.handle("local-only")
        def local_only(call: tether.Call) -> str:
            self.ran.append("local-only")
            return "secret"

        @main.handle("admin-only", roles={"admin"})
        def admin_only(call: tether.Call) -> str:
            self.ran.append("admin-only")
            return "secret"

    def run(self, coro: Coroutine[Any, Any, T]) -> T:
        """Run ``coro`` on the app's loop; bounded."""
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(WAIT_S * 2)

    def page_url(self, path: str) -> str:
        """The address of ``path`` on this server, with the secret (``/t/<secret>/path``)."""
        return self.url + path.lstrip("/")

    def close(self) -> None:
        try:
            self.run(self.main.close())
        finally:
            self.run(self._cancel_the_rest())
            self.loop.call_soon_threadsafe(self.loop.stop)
            self.thread.join(WAIT_S)
            self.loop.close()

    @staticmethod
    async def _cancel_the_rest() -> None:
        """End the tasks still running (connection handlers), so none outlives the loop."""
        rest = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
        for t in rest:
            t.cancel()
        await asyncio.wait_for(asyncio.gather(*rest, return_exceptions=True), WAIT_S)


@pytest.fixture(scope="module")
def app(tmp_path_factory: pytest.TempPathFactory) -> Iterator[WebApp]:
    static = tmp_path_factory.mktemp("site")
    (static / "test.html").write_text(TEST_PAGE)
    (static / "config.js").write_text("window.leaked = 'app config';")
    web = WebApp(static)
    try:
        yield web
    finally:
        web.close()


def open_test_page(page: Page, app: WebApp) -> Page:
    response = page.goto(app.page_url("/test.html"))
    assert response is not None and response.status == 200
    expect(page.locator("#state")).to_have_text("ready")
    return page


def test_page_identity(page: Page, app: WebApp) -> None:
    open_test_page(page, app)
    origin = "http://" + urllib.parse.urlsplit(app.url).netloc
    assert page.evaluate("attempt('hello')") == {
        "ok": True,
        "value": {"role": "web", "origin": origin},
    }
    assert page.evaluate("attempt('echo', 'Hola, mundo!')") == {"ok": True, "value": "Hola, mundo!"}


def test_json_a_page_gets_is_what_tether_types_declares(page: Page, app: WebApp) -> None:
    """`tether types --ts` says what the JSON encoding gives the page; check it in the page."""
    text = typescript(app.main)
    assert '  "shapes": [[p: Point, when: string], Shapes];' in text
    assert "export interface Point {\n  x: number;\n  y?: number;\n}" in text
    assert (
        "export interface Shapes {\n  point: Point;\n  when: string;\n  data: string;\n"
        "  pair: [number, string];\n  maybe: Record<string, number | null>;\n}"
    ) in text
    open_test_page(page, app)
    got = page.evaluate(
        """async () => {
          const r = await ipc.invoke("shapes", { x: 1 }, "2024-01-02T03:04:05Z", { timeout: 5000 });
          return { r, types: [typeof r.point.x, typeof r.point.y, typeof r.when, typeof r.data,
                              Array.isArray(r.pair), r.maybe.k === null] };
        }"""
    )
    assert got["types"] == ["number", "number", "string", "string", True, True]
    assert got["r"] == {
        "point": {"x": 1, "y": 0.0},
        "when": "2024-01-02T03:04:05Z",
        "data": "AAE=",  # base64
        "pair": [1, "one"],
        "maybe": {"k": None},
    }


def test_a_page_cannot_send_bytes(page: Page, app: WebApp) -> None:
    """JSON has no bytes: a base64 string for a bytes argument is a BadRequest (as the
    header of `tether types --ts` output says)."""
    open_test_page(page, app)
    outcome = page.evaluate("attempt('blob', 'AAE=')")
    assert outcome["ok"] is False and outcome["name"] == "BadRequest", outcome
    assert "blob() argument 'data': expected bytes, got str" in outcome["message"]


def test_main_pushes_and_invokes_the_page(page: Page, app: WebApp) -> None:
    open_test_page(page, app)
    peer = app.pages[-1]
    app.run(peer.send("pushed", "dark", 2))
    page.wait_for_function("window.pushes.length === 1", timeout=WAIT_MS)
    assert page.evaluate("window.pushes") == [["dark", 2]]
    assert app.run(peer.invoke("page.sum", 40, 2, timeout=WAIT_S)) == 42
    with pytest.raises(tether.RemoteError) as info:
        app.run(peer.invoke("page.fail", timeout=WAIT_S))
    assert "page says no" in str(info.value)
    with pytest.raises(tether.NoHandler):
        app.run(peer.invoke("page.nothing-here", timeout=WAIT_S))


def test_channel_not_exposed_to_pages_is_forbidden(page: Page, app: WebApp) -> None:
    open_test_page(page, app)
    for channel in ("local-only", "admin-only"):
        outcome = page.evaluate(f"attempt('{channel}')")
        assert outcome["ok"] is False and outcome["name"] == "Forbidden", outcome
    assert page.evaluate("attempt('no-such-channel')")["name"] == "NoHandler"
    assert app.ran == []  # neither handler ran


def test_page_request_without_secret_is_refused(page: Page, app: WebApp) -> None:
    for path in ("/test.html", "/"):
        response = page.goto(without_secret(app.page_url(path)))
        assert response is not None and response.status == 403, path
    assert http_status(without_secret(app.page_url("/test.html"))) == 403
    assert http_status(app.page_url("/test.html")) == 200
    assert http_status(without_secret(app.page_url("/tether.js"))) == 200  # public library


def test_socket_without_secret_is_refused(page: Page, app: WebApp) -> None:
    open_test_page(page, app)
    ws_url = page.evaluate("window.sockets[0].url")
    assert page.evaluate(PROBE, ws_url) == "open"  # the same socket, secret included
    parts = urllib.parse.urlsplit(ws_url)
    bare = urllib.parse.urlunsplit(parts._replace(query=""))
    assert page.evaluate(PROBE, bare) == "refused"
    wrong = urllib.parse.urlunsplit(parts._replace(query=_wrong_secret(parts.query)))
    assert page.evaluate(PROBE, wrong) == "refused"


def _wrong_secret(query: str) -> str:
    pairs = urllib.parse.parse_qsl(query)
    assert pairs, f"the socket address carries no secret: {query!r}"
    return urllib.parse.urlencode([(k, "x" * len(v)) for k, v in pairs])


class _EvilSite:
    """A page on another loopback origin (another port) that tries the app's socket."""

    def __init__(self, root: Path) -> None:
        self.cookies: list[str] = []  # every Cookie header the browser sent this site
        cookies = self.cookies

        def record(handler: SimpleHTTPRequestHandler) -> None:
            cookies.extend(handler.headers.get_all("Cookie") or [])
            SimpleHTTPRequestHandler.do_GET(handler)

        handler = type(
            "Handler",
            (SimpleHTTPRequestHandler,),
            {"log_message": lambda *a: None, "do_GET": record},
        )
        self.httpd = ThreadingHTTPServer(
            ("127.0.0.1", 0), lambda *a: handler(*a, directory=str(root))
        )
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/evil.html"

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join(WAIT_S)


def test_cross_origin_socket_is_refused(page: Page, app: WebApp, tmp_path: Path) -> None:
    """Cross-site WebSocket hijacking: even knowing the secret, another origin is refused."""
    open_test_page(page, app)
    ws_url = page.evaluate("window.sockets[0].url")
    (tmp_path / "evil.html").write_text("<!DOCTYPE html><title>evil</title><p>evil</p>")
    evil = _EvilSite(tmp_path)
    try:
        other = page.context.new_page()
        other.goto(evil.url)
        assert other.evaluate("location.origin") != page.evaluate("location.origin")
        assert other.evaluate(PROBE, ws_url) == "refused"
        assert page.evaluate(PROBE, ws_url) == "open"  # the app's own origin still gets in
    finally:
        evil.close()


def test_page_on_another_port_gets_neither_files_nor_secret(
    page: Page, app: WebApp, tmp_path: Path
) -> None:
    """Every port of 127.0.0.1 is one *site*: a page there must not load the app's files
    (even at the secret address: the browser marks the request same-site), and a server
    there must receive nothing secret from the browser (no cookie)."""
    open_test_page(page, app)  # the user has the app open
    probe = """(src) => new Promise((resolve) => {
      const s = document.createElement("script");
      s.src = src;
      s.onload = () => resolve(window.leaked ?? "loaded");
      s.onerror = () => resolve("refused");
      setTimeout(() => resolve("timeout"), 10000);
      document.head.appendChild(s);
    })"""
    (tmp_path / "evil.html").write_text("<!DOCTYPE html><title>evil</title><p>evil</p>")
    evil = _EvilSite(tmp_path)
    try:
        other = page.context.new_page()
        other.goto(evil.url)
        assert other.evaluate(probe, without_secret(app.page_url("/config.js"))) == "refused"
        assert other.evaluate(probe, app.page_url("/config.js")) == "refused"
        assert page.evaluate(probe, app.page_url("/config.js")) == "app config"  # its own page
        other.goto(evil.url)  # a second visit: would carry any cookie the app had set
        assert not any(app.server.token in c for c in evil.cookies), evil.cookies
        assert page.context.cookies() == []
    finally:
        evil.close()


def test_link_to_the_app_on_another_site_opens_it(page: Page, app: WebApp, tmp_path: Path) -> None:
    """The printed address, clicked on a page of another port (same site) or of
    ``localhost`` (another site), opens the app; that page's scripts still get nothing."""
    (tmp_path / "evil.html").write_text("<!DOCTYPE html><title>evil</title><p>evil</p>")
    evil = _EvilSite(tmp_path)
    port = evil.httpd.server_address[1]
    load = """(src) => new Promise((resolve) => {
      const s = document.createElement("script");
      s.src = src;
      s.onload = () => resolve(window.leaked ?? "loaded");
      s.onerror = () => resolve("refused");
      setTimeout(() => resolve("timeout"), 10000);
      document.head.appendChild(s);
    })"""
    try:
        for host in ("127.0.0.1", "localhost"):
            page.goto(f"http://{host}:{port}/evil.html")
            assert page.evaluate(load, app.page_url("/config.js")) == "refused", host
            page.evaluate(
                """(u) => { const a = document.createElement("a"); a.href = u; a.id = "go";
                  a.textContent = "open the app"; document.body.appendChild(a); }""",
                app.page_url("/test.html"),
            )
            with page.expect_response(app.page_url("/test.html")) as opened:
                page.click("#go")
            assert opened.value.status == 200, host
            expect(page.locator("#state")).to_have_text("ready")
            assert page.evaluate("attempt('echo', 'clicked')") == {"ok": True, "value": "clicked"}
    finally:
        evil.close()


def test_malformed_frame_closes_only_that_page(browser: Browser, app: WebApp) -> None:
    context = browser.new_context()
    context.set_default_timeout(WAIT_MS)
    try:
        good = open_test_page(context.new_page(), app)
        bad = open_test_page(context.new_page(), app)
        assert bad.evaluate("attempt('echo', 'before')") == {"ok": True, "value": "before"}
        # Under tether.js: bytes that are no tether frame, on the bad page's socket.
        bad.evaluate(
            """() => new Promise((resolve) => {
              const ws = window.sockets[0];
              setTimeout(resolve, 10000);
              ws.addEventListener("close", () => resolve());
              ws.send(new Uint8Array([0xff, 0xff, 0xff, 0xff, 0x00, 0x01]));
              ws.send("{ not a frame");
            })"""
        )
        assert bad.evaluate("window.sockets[0].readyState") == 3  # CLOSED
        outcome = bad.evaluate("attempt('echo', 'after')")
        assert outcome["ok"] is False
        assert outcome["name"] in ("ConnectionClosed", "PeerGone"), outcome
        # The other page, on its own connection, keeps working; so does a new one.
        assert good.evaluate("attempt('echo', 'still here')") == {"ok": True, "value": "still here"}
        fresh = open_test_page(context.new_page(), app)
        assert fresh.evaluate("attempt('echo', 'new')") == {"ok": True, "value": "new"}
    finally:
        context.close()


def test_demo_web_page_loads_without_a_failed_request(
    page: Page, child_env: dict[str, str]
) -> None:
    """No request of the demo page fails (a browser asks for /favicon.ico unless the page
    names an icon: a 404 logged in the console on every load)."""
    demo = Demo(child_env)
    try:
        failed: list[str] = []
        page.on(
            "response", lambda r: failed.append(f"{r.status} {r.url}") if r.status >= 400 else None
        )
        page.on("console", lambda m: failed.append(m.text) if m.type == "error" else None)
        response = page.goto(demo.url)
        assert response is not None and response.status == 200
        expect(page.locator("#fromMain")).to_have_text("Main invoked page.title: 'IPC' (role web)")
        page.wait_for_load_state("networkidle", timeout=WAIT_MS)
        assert failed == []
    finally:
        demo.close()
