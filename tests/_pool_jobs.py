"""Module-level jobs for the worker-pool tests (workers import them by name)."""

from __future__ import annotations

import asyncio
import dataclasses
import datetime
import os
import signal
import time
from typing import Any

import numpy as np


def square(x: int) -> int:
    return x * x


def add(a: int, b: int) -> int:
    return a + b


def fail(message: str) -> None:
    raise ValueError(message)


def pid() -> int:
    return os.getpid()


def nap(seconds: float, value: Any = None) -> Any:
    time.sleep(seconds)
    return value


async def async_nap(seconds: float, value: Any = None) -> Any:
    await asyncio.sleep(seconds)
    return value


def die(sig: int = signal.SIGKILL) -> None:
    os.kill(os.getpid(), sig)
    time.sleep(10)


def die_once(marker: str) -> str:
    """SIGKILL its own worker the first time (``marker`` records each attempt)."""
    with open(marker, "a") as f:
        f.write(f"{os.getpid()}\n")
    with open(marker) as f:
        if len(f.read().split()) == 1:
            os.kill(os.getpid(), signal.SIGKILL)
            time.sleep(10)
    return "second try"


def logged(log: str, i: int, seconds: float) -> int:
    """Append ``s`` at the start and ``e`` at the end to ``log``, sleeping between."""
    fd = os.open(log, os.O_WRONLY | os.O_APPEND | os.O_CREAT)
    try:
        os.write(fd, b"s\n")
        time.sleep(seconds)
        os.write(fd, b"e\n")
    finally:
        os.close(fd)
    return i


def double(a: np.ndarray[Any, Any]) -> tuple[np.ndarray[Any, Any], str, bool]:
    """Twice ``a``, with what the worker received (type name, writeable)."""
    return a * 2, type(a).__name__, bool(a.flags.writeable)


class Tools:
    @staticmethod
    def triple(x: int) -> int:
        return 3 * x

    def method(self, x: int) -> int:
        return x


async def short_lived_worker(peer: Any) -> None:
    """A pool worker that says hello, then dies before taking any job."""
    await asyncio.sleep(0.05)
    os.kill(os.getpid(), signal.SIGKILL)


def returns_coroutine() -> Any:
    """A plain function that returns an awaitable (a decorated async one, say)."""
    return asyncio.sleep(0)


async def async_square(x: int) -> int:
    await asyncio.sleep(0)
    return x * x


def checksum(data: Any) -> tuple[int, str]:
    """Sum of the bytes of ``data``, and what the worker received."""
    return int(np.frombuffer(data, np.uint8).sum(dtype=np.uint64)), type(data).__name__


@dataclasses.dataclass
class Point:
    x: int
    y: int


def kinds(s: set[int], t: tuple[int, int], p: Point, d: datetime.date, b: bytes) -> str:
    """The type names of what the worker received."""
    return " ".join(type(v).__name__ for v in (s, t, p, d, b))


async def async_kinds(s: set[int], t: tuple[int, int], p: Point, d: datetime.date) -> str:
    return " ".join(type(v).__name__ for v in (s, t, p, d))


def point(x: int, y: int) -> Point:
    return Point(x, y)


def blob(n: int) -> bytes:
    return b"z" * n


def digits(n: int) -> set:  # type: ignore[type-arg]  # (bare set: as the reviewer wrote it)
    return set(range(n))


def pair(a: int, b: int) -> set[int]:
    return {a, b}


def echo(value: Any) -> Any:
    return value


def liar() -> int:
    """Says int, returns a str."""
    return "not an int"  # type: ignore[return-value]


def a_job_whose_name_is_longer_than_thirty_one_characters(x: int) -> int:
    return x
