"""``tether demo``: the IPC scenarios tether grew from, run end to end.

1. The C example: a parent writes one message into a pipe, a forked child
   reads it whole. Here the pipe is :func:`tether.pipe`, so the message is
   framed and the child gets exactly what was sent, however big.
2. The Electron example: main handles ``message-from-renderer``; a renderer
   process invokes it with ``Hola, mundo!`` and prints the reply.
3. What Electron lacks: main invokes a handler in the child (``compute``).
4. The Chromium example: a sandboxed renderer with no network opens
   WebSockets through main's broker, one route per socket
   (:mod:`tether.demo_broker`).

``tether demo --web`` serves the Electron example's page instead
(``examples/electron_style/``): a real browser tab is the renderer.

The child's target must be a module-level function, so the ``spawn`` start
method can import it in the new interpreter.
"""

from __future__ import annotations

import asyncio
import importlib.util
import os
import sys
import traceback
from pathlib import Path

from .aio.loop import run
from .aio.main import Main
from .aio.peer import Peer
from .pipe import pipe
from .registry import Call

__all__ = [
    "ELECTRON_MESSAGE",
    "PIPE_MESSAGE",
    "electron_demo",
    "electron_style_dir",
    "main",
    "pipe_demo",
    "renderer",
    "web_main",
]

PIPE_MESSAGE = "Psst .. hello from parent process!"
ELECTRON_MESSAGE = "Hola, mundo!"
_TIMEOUT = 30.0


def _heading(text: str, *, first: bool = False) -> None:
    print(("" if first else "\n") + f"== {text} ==", flush=True)


def pipe_demo() -> int:
    """The C example: parent -> forked child over a framed pipe. Returns the child's exit code."""
    reader, writer = pipe()
    # Anything still buffered would be flushed twice, once by each process.
    sys.stdout.flush()
    sys.stderr.flush()
    pid = os.fork()
    if pid == 0:  # child: read end only
        code = 0
        try:
            writer.close()
            message = reader.recv(timeout=_TIMEOUT).decode()
            print(f"Child received message: {message}", flush=True)
            reader.close()
        except BaseException:
            traceback.print_exc()
            code = 1
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(code)
    # parent: write end only
    reader.close()
    print(f"Parent process message: {PIPE_MESSAGE}", flush=True)
    try:
        writer.send(PIPE_MESSAGE)
    finally:
        writer.close()  # the child sees end-of-stream after this message
        _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status)


async def renderer(peer: Peer, message: str) -> None:
    """The renderer process: invoke main, print the reply, then serve main until told to quit."""
    quit_requested = asyncio.Event()

    def compute(call: Call, x: int) -> int:
        return 2 * x

    def on_quit(call: Call) -> None:
        quit_requested.set()

    # Registered before the first await: nothing main sends can miss them.
    peer.handle("compute", compute)
    peer.on("quit", on_quit)

    response = await peer.invoke("message-from-renderer", message, timeout=_TIMEOUT)
    print(response, flush=True)
    await peer.send("rendered", response)
    await asyncio.wait_for(quit_requested.wait(), _TIMEOUT)


async def electron_demo() -> int:
    """The Electron example, plus main -> child invoke. Returns the child's exit code."""
    rendered: asyncio.Future[str] = asyncio.get_running_loop().create_future()

    async def reply(call: Call, message: str) -> str:
        return f"Received: {message}"

    def on_rendered(call: Call, text: str) -> None:
        if not rendered.done():
            rendered.set_result(text)

    async with Main() as main:
        main.handle("message-from-renderer", reply)
        main.on("rendered", on_rendered)

        _heading("2. Electron: ipcRenderer.invoke -> ipcMain.handle (a spawned child)")
        child = await main.spawn(renderer, ELECTRON_MESSAGE)
        await asyncio.wait_for(rendered, _TIMEOUT)  # the child printed its line

        _heading("3. Beyond Electron: main invokes the child")
        doubled = await child.invoke("compute", 21, timeout=_TIMEOUT)
        print(f"Main invoked child's compute(21): {doubled}", flush=True)
        await child.send("quit")
        return await child.wait(_TIMEOUT)


def main() -> int:
    """Run every scenario; return 0 when all of them succeeded."""
    _heading("1. C: pipe() + fork(), parent writes, child reads", first=True)
    code = pipe_demo()
    if code != 0:
        print(f"pipe demo: child exited with code {code}", file=sys.stderr)
        return 1
    code = run(electron_demo())
    if code != 0:
        print(f"electron demo: child exited with code {code}", file=sys.stderr)
        return 1
    _heading("4. Chromium: a sandboxed renderer's WebSockets, owned by main (routes)")
    if importlib.util.find_spec("websockets") is None:  # main's real sockets need it
        print("skipped: needs the websockets package (pip install 'tether-ipc[broker]')")
        return 0
    from .demo_broker import broker_demo

    code = run(broker_demo(ELECTRON_MESSAGE))
    if code != 0:
        print(f"broker demo: renderer exited with code {code}", file=sys.stderr)
        return 1
    return 0


def electron_style_dir() -> Path:
    """The Electron example's page and main: inside the wheel, or examples/ in a checkout.

    Raises:
        FileNotFoundError: neither holds ``main.py``.
    """
    here = Path(__file__).resolve().parent
    for d in (here / "electron_style", here.parent.parent / "examples" / "electron_style"):
        if (d / "main.py").is_file():
            return d
    raise FileNotFoundError("the electron_style example is not installed with tether")


def web_main() -> int:
    """``tether demo --web``: serve the example's page until SIGINT or SIGTERM.

    Prints a heading, then the page's address (secret included) alone on one
    line. Returns 0 after a clean stop.
    """
    path = electron_style_dir() / "main.py"
    spec = importlib.util.spec_from_file_location("tether_electron_style", path)
    if spec is None or spec.loader is None:
        raise ImportError(f"cannot load {path}")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)

    def show(url: str) -> None:
        _heading("The Electron page in a browser: open this address (Ctrl-C stops)", first=True)
        print(url, flush=True)

    try:
        code: int = run(module.serve(on_url=show))
    except ImportError as exc:  # ws:// without websockets: the message names the extra
        print(f"error: tether demo --web: {exc}", file=sys.stderr)
        return 1
    return code
