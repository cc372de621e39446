"""A worker process for tests/test_nats.py: a main serving ``pid`` on a NATS namespace.

Run as ``python tests/_nats_targets.py URL [NAME]``; prints ``ready`` once
listening and serves until stdin closes. With ``NAME`` it also serves
``only.NAME`` (a channel the other workers do not handle).
"""

from __future__ import annotations

import asyncio
import os
import sys
from collections.abc import AsyncIterator

import tether


async def serve(url: str, name: str | None) -> None:
    async with tether.Main() as main:

        @main.handle("pid", roles="nats")
        def pid(call: tether.Call) -> int:
            return os.getpid()

        @main.handle("echo", roles="nats")
        async def echo(call: tether.Call, value: object) -> object:
            return value

        @main.handle("count", roles="nats")
        async def count(call: tether.Call, n: int) -> AsyncIterator[tuple[int, int]]:
            for i in range(n):
                yield os.getpid(), i

        if name is not None:
            main.handle(f"only.{name}", lambda call: os.getpid(), roles="nats")

        await main.listen(url)
        print("ready", flush=True)
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(None, sys.stdin.read)  # until the test closes our stdin


if __name__ == "__main__":
    asyncio.run(serve(sys.argv[1], sys.argv[2] if len(sys.argv) > 2 else None))
