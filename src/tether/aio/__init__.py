"""The asyncio layer: Main, Peer, Child, connect."""

from ..registry import Call as Call
from .child import Child as Child
from .main import Main as Main
from .main import Server as Server
from .main import connect as connect
from .peer import Peer as Peer
from .route import Route as Route

__all__ = ["Call", "Child", "Main", "Peer", "Route", "Server", "connect"]
