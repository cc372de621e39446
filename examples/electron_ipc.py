"""Electron's main/renderer IPC in tether: a renderer invokes main's `message-from-renderer`.

main.js:      ipcMain.handle('message-from-renderer', (event, message) => `Received: ${message}`)
renderer.js:  const response = await ipcRenderer.invoke('message-from-renderer', 'Hola, mundo!')

Here the renderer is a Python child process spawned by main. Prints `Received: Hola, mundo!`.
"""

from __future__ import annotations

import tether
from tether.aio.loop import run


async def renderer(peer: tether.Peer, message: str) -> None:
    """Runs in the child process (must be a module-level function)."""
    response = await peer.invoke("message-from-renderer", message, timeout=10.0)
    print(response, flush=True)


async def main() -> int:
    async with tether.Main() as ipc_main:

        @ipc_main.handle("message-from-renderer")
        async def reply(call: tether.Call, message: str) -> str:
            return f"Received: {message}"

        child = await ipc_main.spawn(renderer, "Hola, mundo!")
        return await child.wait(timeout=30.0)  # the child's exit code


if __name__ == "__main__":
    raise SystemExit(run(main()))
