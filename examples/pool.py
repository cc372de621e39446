"""A worker pool: module-level functions run in worker processes, no pickle, no hang.

Run: python examples/pool.py
"""

from __future__ import annotations

import asyncio
import os
import signal

import numpy as np

import tether


def fib(n: int) -> int:  # a job: a module-level function, imported by name in the worker
    return n if n < 2 else fib(n - 1) + fib(n - 2)


def normalize(frame: np.ndarray) -> np.ndarray:  # arrays travel through shared memory
    return (frame - frame.mean()) / frame.std()


def crash() -> None:  # a job whose worker dies under it
    os.kill(os.getpid(), signal.SIGKILL)


async def main() -> None:
    async with tether.Pool(workers=2) as pool:
        print(f"fib(25) = {await pool.submit(fib, 25)}")
        print(f"map: {[r async for r in pool.map(fib, range(10))]}")  # in input order
        out = await pool.submit(normalize, np.arange(1_000_000, dtype=np.float64))
        print(f"normalized: mean {abs(out.mean()):.1f}, std {out.std():.1f}")
        try:
            await pool.submit(crash)
        except tether.PeerGone as exc:  # only this job fails; its worker is replaced
            print(f"crash() failed: PeerGone, exit code {exc.exitcode} (SIGKILL)")
        try:
            await pool.submit(fib, 40, timeout=0.5)  # cancelled, and its worker replaced
        except tether.InvokeTimeout:
            print("fib(40) took more than 0.5 s")
        print(f"the pool goes on: fib(20) = {await pool.submit(fib, 20)}")

    with tether.sync.Pool(workers=2) as pool:  # the same, blocking
        print(f"sync: {pool.submit(fib, 25).result()}, {list(pool.map(fib, range(5)))}")


if __name__ == "__main__":  # workers import this file again: keep the start behind the guard
    asyncio.run(main())
