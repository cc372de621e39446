"""The client's :class:`~tether.Peer` over NATS (what ``connect("nats://...")`` returns)."""

from __future__ import annotations

from typing import Any

from ..aio.peer import Peer
from ..errors import PeerGone
from .stream import ClientStream

__all__ = ["NatsClientPeer"]


class NatsClientPeer(Peer):
    """A :class:`~tether.Peer` whose events fail at once while the NATS server is away.

    NATS buffers what is published while it reconnects and may drop it;
    an event sent then raises ``PeerGone`` instead of looking sent (an
    invoke made then is answered ``PeerGone`` by :class:`ClientStream`).
    """

    async def send(self, channel: str, *args: Any) -> None:
        """As :meth:`tether.Peer.send`; raises ``PeerGone`` while the NATS link is down."""
        stream = self._stream
        if isinstance(stream, ClientStream):
            nc = stream._nc
            if not nc.is_connected and not nc.is_closed:
                raise PeerGone(stream.lost_server())
        await super().send(channel, *args)
