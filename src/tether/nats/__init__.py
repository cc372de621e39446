"""tether over NATS: ``main.listen("nats://host:4222/ns")`` and ``tether.connect("nats://...")``.

See :mod:`tether.nats.link` for the subjects and options, and the NATS
section of ``docs/protocol.md``. Needs the ``nats-py`` package
(``pip install 'tether-ipc[nats]'``).
"""

from __future__ import annotations

from .link import NatsAddress, NatsServer, connect_nats, listen_nats, parse_nats_address
from .stream import ClientStream, NatsStream, ServerStream, channel_token

__all__ = [
    "ClientStream",
    "NatsAddress",
    "NatsServer",
    "NatsStream",
    "ServerStream",
    "channel_token",
    "connect_nats",
    "listen_nats",
    "parse_nats_address",
]
