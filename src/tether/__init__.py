"""tether: inter-process communication for Python.

Framed pipes, child processes with a connected channel, and named channels
with ``invoke``/``handle`` (request and response) and ``send``/``on`` (events)
in both directions, over socketpairs, unix sockets and TCP.
"""

from . import sync as sync
from .aio import Call as Call
from .aio import Child as Child
from .aio import Main as Main
from .aio import Peer as Peer
from .aio import Route as Route
from .aio import Server as Server
from .aio import connect as connect
from .aio.runner import run as run
from .errors import AuthenticationError as AuthenticationError
from .errors import BadRequest as BadRequest
from .errors import BufferInUse as BufferInUse
from .errors import Busy as Busy
from .errors import ConnectError as ConnectError
from .errors import ConnectionClosed as ConnectionClosed
from .errors import ConsumedError as ConsumedError
from .errors import EndOfStream as EndOfStream
from .errors import Forbidden as Forbidden
from .errors import HandleRefused as HandleRefused
from .errors import InvokeTimeout as InvokeTimeout
from .errors import NoHandler as NoHandler
from .errors import PayloadTooLarge as PayloadTooLarge
from .errors import PeerGone as PeerGone
from .errors import ProtocolError as ProtocolError
from .errors import RemoteError as RemoteError
from .errors import RouteClosed as RouteClosed
from .errors import SandboxError as SandboxError
from .errors import StreamMismatch as StreamMismatch
from .errors import TetherError as TetherError
from .executor import Pool as Pool
from .handles import Handle as Handle
from .pipe import PipeReader as PipeReader
from .pipe import PipeWriter as PipeWriter
from .pipe import pipe as pipe
from .sandbox import Sandbox as Sandbox
from .sandbox import SandboxReport as SandboxReport
from .shm import Buffer as Buffer

__version__ = "0.1.0"

__all__ = [
    "AuthenticationError",
    "BadRequest",
    "Buffer",
    "BufferInUse",
    "Busy",
    "Call",
    "Child",
    "ConnectError",
    "ConnectionClosed",
    "ConsumedError",
    "EndOfStream",
    "Forbidden",
    "Handle",
    "HandleRefused",
    "InvokeTimeout",
    "Main",
    "NoHandler",
    "PayloadTooLarge",
    "Peer",
    "PeerGone",
    "PipeReader",
    "PipeWriter",
    "Pool",
    "ProtocolError",
    "RemoteError",
    "Route",
    "RouteClosed",
    "Sandbox",
    "SandboxError",
    "SandboxReport",
    "Server",
    "StreamMismatch",
    "TetherError",
    "connect",
    "pipe",
    "run",
    "sync",
]
