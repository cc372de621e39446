"""Worker processes sharing a channel through a NATS server.

    python examples/nats_workers.py                       # starts its own nats-server
    python examples/nats_workers.py nats://127.0.0.1:4222 # or uses yours

Three worker processes each run a :class:`tether.Main` listening on the same
NATS namespace (``nats://.../jobs``) and handling the channel ``square``:
each invoke of it goes to one of them (they subscribe in a queue group).
The coordinator makes ONE connection and invokes ``square`` 30 times at
once; each worker answers some of the invokes and sends a log event back
to the caller (``call.peer``). Nothing here is tied to one machine: run the
workers wherever the NATS server is reachable.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import socket
import subprocess
import sys
import time

import tether
from tether.aio.loop import run

WORKERS = 3
JOBS = 30


async def worker(url: str) -> None:
    """One worker: serve ``square`` on the namespace until stdin closes."""
    async with tether.Main() as main:

        @main.handle("square", roles="nats")  # peers over NATS have role "nats"
        async def square(call: tether.Call, x: int) -> tuple[int, int]:
            await call.peer.send("log", f"worker {os.getpid()} squared {x}")
            return os.getpid(), x * x

        await main.listen(url)
        print("ready", flush=True)
        await asyncio.get_running_loop().run_in_executor(None, sys.stdin.read)


async def coordinator(url: str) -> None:
    logs: list[str] = []
    async with tether.connect(url, timeout=10.0) as peer:
        peer.on("log", lambda call, text: logs.append(text))
        answers = await asyncio.gather(*(peer.invoke("square", x) for x in range(JOBS)))
        deadline = time.monotonic() + 10
        while len(logs) < JOBS and time.monotonic() < deadline:
            await asyncio.sleep(0.01)  # the events may trail the last answer
    print(f"squares of 0..{JOBS - 1}: sum {sum(r for _, r in answers)}")
    print(f"{len(logs)} log events came back")
    print(f"one client's invokes served by {len({pid for pid, _ in answers})} of {WORKERS} workers")


def start_nats_server() -> tuple[subprocess.Popen[bytes], str]:
    """A nats-server on a free loopback port (JetStream off), for this run only."""
    binary = shutil.which("nats-server") or "/usr/sbin/nats-server"
    if not os.path.exists(binary):
        sys.exit("nats-server not found: apt-get install nats-server, or pass nats://host:port")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([binary, "-a", "127.0.0.1", "-p", str(port)], stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 15
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return proc, f"nats://127.0.0.1:{port}"
        except OSError:
            if time.monotonic() > deadline:
                proc.kill()
                sys.exit("nats-server did not start")
            time.sleep(0.05)


def main() -> None:
    if len(sys.argv) == 3 and sys.argv[1] == "--worker":
        run(worker(sys.argv[2]))
        return
    server, base = (None, sys.argv[1]) if len(sys.argv) > 1 else start_nats_server()
    url = f"{base}/jobs"
    workers = [
        subprocess.Popen(
            [sys.executable, __file__, "--worker", url],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        for _ in range(WORKERS)
    ]
    try:
        for w in workers:
            assert w.stdout is not None and w.stdout.readline().strip() == "ready"
        run(coordinator(url))
    finally:
        for w in workers:
            assert w.stdin is not None
            w.stdin.close()
        for w in workers:
            w.wait(20)
        if server is not None:
            server.terminate()
            server.wait(10)


if __name__ == "__main__":
    main()
