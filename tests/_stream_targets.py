"""Child targets for tests/test_streams.py: children that stream, and children that read streams."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator

import tether
import tether.sync


async def serve_counts(peer: tether.Peer) -> None:
    """A child whose handlers stream (async and plain generators), until main closes."""

    @peer.handle("count")
    async def count(call: tether.Call, n: int) -> AsyncIterator[int]:
        for i in range(n):
            yield i

    @peer.handle("words")
    def words(call: tether.Call, text: str) -> Iterator[str]:
        yield from text.split()

    await peer.wait_closed()


async def read_main_stream(peer: tether.Peer, n: int) -> None:
    """A child that reads main's ``count`` stream and sends back the total."""
    total = 0
    async for x in peer.stream("count", n, item_type=int):
        total += x
    await peer.send("total", total)
    await peer.wait_closed()


def serve_counts_sync(peer: tether.sync.Peer) -> None:
    """A blocking child whose plain-generator handlers stream; ``finally`` is told to main."""

    @peer.handle("count")
    def count(call: tether.Call, n: int) -> Iterator[int]:
        try:
            yield from range(n)
        finally:
            call.peer.send("finally", "count")

    @peer.handle("forever")
    def forever(call: tether.Call) -> Iterator[int]:
        i = 0
        try:
            while True:
                yield i
                i += 1
        finally:
            call.peer.send("finally", "forever")

    @peer.handle("fails")
    def fails(call: tether.Call, n: int) -> Iterator[int]:
        yield from range(n)
        raise ValueError("sync boom")

    @peer.handle("plain")
    def plain(call: tether.Call, x: int) -> int:
        return x + 1

    peer.wait_closed()
