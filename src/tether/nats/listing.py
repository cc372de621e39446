"""``tether call --list nats://...``: the channels of *every* listener of a namespace.

An invoke of ``tether.channels`` over NATS goes, like any invoke, to one
listener of the queue group, so it lists that one's channels only. Here a
client publishes an empty message on ``NS.list``, which every listener
subscribes *outside* the queue group; each answers, on the reply subject
the client chose, one RESULT frame (request id 0) holding what
``tether.channels`` would answer that client (docs/protocol.md 1.2). The
client gathers the answers until none came for :data:`QUIET` seconds (or
its timeout passed) and returns their union.
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import TYPE_CHECKING, Any, Final

import msgspec

from .. import codec
from ..errors import InvokeTimeout, PayloadTooLarge, ProtocolError
from ..introspect import CHANNELS, describe
from ..results import decode_error, decode_result
from ..wire import FrameParser, Kind, encode_frame
from .stream import NO_RESPONDERS, error_frame

if TYPE_CHECKING:
    from ..aio.peer import Peer
    from .link import NatsServer

__all__ = ["QUIET", "answer", "list_channels"]

#: seconds without a new answer after which a client stops gathering
QUIET: Final = 0.25
#: answers taken at most (listeners of one namespace, and then some)
MAX_ANSWERS: Final = 4096


async def answer(server: NatsServer, msg: Any) -> None:
    """A listener's answer to a message on ``NS.list``: its channels, for its role."""
    if server._closed or not msg.reply or msg.data:
        return
    infos = describe(server.main.registry, server.role, False)
    out = bytearray()
    try:
        body = codec.encoder.encode(infos)
        encode_frame(out, Kind.RESULT, 0, 0, b"", body, max_frame_size=server._max())
    except PayloadTooLarge as exc:
        out = bytearray(error_frame(0, "too_large", f"{server!r}: its channel list: {exc}"))
    with contextlib.suppress(Exception):  # the link went away: nobody waits for it
        await server.nc.publish(msg.reply, bytes(out))


async def list_channels(
    peer: Peer, timeout: float | None = 10.0, quiet: float = QUIET
) -> list[dict[str, Any]]:
    """The union of the channels every listener of ``peer``'s namespace lets it reach.

    ``peer`` is a client of :func:`tether.connect` on a ``nats://`` address.
    Entries are ``tether.channels``'s (dicts: ``channel``, ``kind``,
    ``params``, ``result``), each once, invokes first, by name; two
    listeners that type one channel differently give an entry each.
    Listeners that do not answer on ``NS.list`` (older versions) are
    asked ``tether.channels`` the usual way, which reaches one of them.

    Raises:
        InvokeTimeout: no listener answered within ``timeout``.
        PayloadTooLarge: a listener's list does not fit the server's ``max_payload``.
        ValueError: ``peer`` is not a NATS client.
    """
    stream = peer._stream
    ns = getattr(stream, "namespace", None)
    nc = getattr(stream, "_nc", None)
    if ns is None or nc is None or not hasattr(stream, "inbox"):
        raise ValueError(f"{peer!r} is not a NATS client (tether.connect('nats://...'))")
    loop = asyncio.get_running_loop()
    got: asyncio.Queue[Any] = asyncio.Queue()

    async def take(msg: Any) -> None:
        got.put_nowait(msg)

    inbox = nc.new_inbox()
    sub = await nc.subscribe(inbox, cb=take, max_msgs=MAX_ANSWERS)
    seen: dict[bytes, dict[str, Any]] = {}
    answers = 0
    limit = 10.0 if timeout is None else timeout  # (bounded all the same)
    try:
        await nc.publish(f"{ns}.list", b"", reply=inbox)
        end = loop.time() + limit
        wait = limit  # for the first answer; then QUIET after each
        while answers < MAX_ANSWERS:
            left = min(wait, end - loop.time())
            if left <= 0:
                break
            try:
                msg = await asyncio.wait_for(got.get(), left)
            except TimeoutError:
                break
            if not msg.data:
                if msg.headers and msg.headers.get("Status") == NO_RESPONDERS and not answers:
                    return _decoded(await peer.invoke(CHANNELS, timeout=timeout))
                continue
            entries = _entries(msg.data, int(nc.max_payload))
            if entries is None:
                continue  # not an answer: ignored
            answers += 1
            for entry in entries:
                seen.setdefault(msgspec.msgpack.encode(entry), entry)
            wait = quiet
    finally:
        with contextlib.suppress(Exception):
            await sub.unsubscribe()
    if not answers:
        raise InvokeTimeout(
            f"{peer!r}: no listener answered on {ns}.list within {limit} s "
            "(asked for the channels of every listener)"
        )
    return sorted(seen.values(), key=lambda e: (e.get("kind") != "invoke", str(e.get("channel"))))


def _entries(data: bytes, max_payload: int) -> list[dict[str, Any]] | None:
    """The entries of one listener's answer; None if it is not one (an ERROR
    answer raises what it stands for)."""
    try:
        frames = FrameParser(max_payload).feed(data)
        if len(frames) != 1 or frames[0].kind not in (Kind.RESULT, Kind.ERROR):
            return None
        if frames[0].kind == Kind.ERROR:
            raise decode_error(frames[0])
        return _decoded(decode_result(frames[0], Any))
    except ProtocolError:
        return None


def _decoded(value: Any) -> list[dict[str, Any]]:
    if not isinstance(value, list) or not all(isinstance(e, dict) for e in value):
        raise ProtocolError(f"a channel list is not a list of entries: {value!r:.80}")
    return value
