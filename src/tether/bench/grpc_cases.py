"""gRPC beside tether: grpcio over a unix socket, generic bytes handlers (no protoc).

Many users pick gRPC for services between processes, so the bench measures
it as a peer. The server is a process of its own (``spawn``) serving one
service, ``tether.bench.Echo``, through ``grpc.method_handlers_generic_handler``
with no (de)serializers: bodies cross as bytes, encoded and decoded with
msgspec on both sides like pyzmq's rows (the server decodes each request and
encodes its answer). ``Echo`` (unary-unary) answers the request it gets;
``Items`` (unary-stream) answers a count ``n`` with ``n`` encoded items.

Rows: ``rt_grpc`` (blocking client, ``grpc.server`` with a thread pool),
``rt_grpc_aio`` (``grpc.aio`` client and server, the client on tether's loop)
and ``stream_grpc`` (items per second from ``Items``, ``grpc.aio`` both ends,
beside ``stream_tether``). Same payload, counts and CPU meter (both
processes, every thread) as tether's rows.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import time
from collections.abc import AsyncIterator, Iterator
from typing import Any, Final

import msgspec

from .baselines import ev_budget, rt_budget
from .common import (
    PAYLOAD,
    CpuMeter,
    Params,
    Result,
    ServerProcess,
    batch_rate,
    child_init,
    latency,
    rate,
    rate_loop_async,
    scratch_dir,
    time_loop,
    time_loop_async,
)
from .tether_cases import WAIT, bounded, loop_name

__all__ = ["ECHO", "ITEMS", "SERVICE", "rt_grpc", "rt_grpc_aio", "stream_grpc"]

SERVICE: Final = "tether.bench.Echo"
ECHO: Final = f"/{SERVICE}/Echo"
ITEMS: Final = f"/{SERVICE}/Items"


# -- the server process ----------------------------------------------------------------


def _handlers(aio: bool) -> Any:
    """The generic handler of :data:`SERVICE`: coroutines for ``grpc.aio``, plain functions else."""
    import grpc

    enc = msgspec.msgpack.Encoder()
    dec = msgspec.msgpack.Decoder()

    def echo(request: bytes, context: Any) -> bytes:
        return enc.encode(dec.decode(request))

    def items(request: bytes, context: Any) -> Iterator[bytes]:
        for _ in range(dec.decode(request)):
            yield enc.encode(PAYLOAD)

    async def echo_aio(request: bytes, context: Any) -> bytes:
        return enc.encode(dec.decode(request))

    async def items_aio(request: bytes, context: Any) -> AsyncIterator[bytes]:
        for _ in range(dec.decode(request)):
            yield enc.encode(PAYLOAD)

    methods = {
        "Echo": grpc.unary_unary_rpc_method_handler(echo_aio if aio else echo),
        "Items": grpc.unary_stream_rpc_method_handler(items_aio if aio else items),
    }
    return grpc.method_handlers_generic_handler(SERVICE, methods)


async def _serve_aio(address: str, ready: Any) -> None:
    import grpc

    server = grpc.aio.server()
    server.add_generic_rpc_handlers((_handlers(aio=True),))
    server.add_insecure_port(address)
    await server.start()
    ready.set()
    await server.wait_for_termination()


def _server_process(address: str, aio: bool, ready: Any, parent_pid: int) -> None:
    child_init(parent_pid)
    if aio:
        from ..aio.loop import run

        run(_serve_aio(address, ready))
        return
    import grpc

    server = grpc.server(concurrent.futures.ThreadPoolExecutor(max_workers=4))
    server.add_generic_rpc_handlers((_handlers(aio=False),))
    server.add_insecure_port(address)
    server.start()
    ready.set()
    server.wait_for_termination()


class _GrpcServer(ServerProcess):
    """A process serving :data:`SERVICE` on ``unix:{tmp}/grpc.sock`` (``grpc.aio`` if ``aio``)."""

    def __init__(self, tmp: str, aio: bool) -> None:
        self.address = f"unix:{tmp}/grpc.sock"
        super().__init__(_server_process, self.address, aio, what="gRPC server", timeout=WAIT)


# -- round trip ------------------------------------------------------------------------


def rt_grpc(params: Params) -> Result:
    """A blocking ``grpc`` client calls ``Echo`` on a ``grpc.server`` (thread pool)."""
    import grpc

    enc = msgspec.msgpack.Encoder()
    dec = msgspec.msgpack.Decoder()
    with (
        scratch_dir() as tmp,
        _GrpcServer(tmp, aio=False) as server,
        grpc.insecure_channel(server.address) as channel,
    ):
        grpc.channel_ready_future(channel).result(timeout=WAIT)
        call = channel.unary_unary(ECHO)

        def op() -> object:
            return dec.decode(call(enc.encode(PAYLOAD)))

        assert op() == PAYLOAD
        meter = CpuMeter(server.proc.pid)
        samples = time_loop(op, **rt_budget(params), meter=meter)
        cpu = meter.stop(len(samples))
    return {
        "metrics": [latency("round trip", samples, cpu=cpu)],
        "info": {"grpc": grpc.__version__},
    }


def rt_grpc_aio(params: Params) -> Result:
    """A ``grpc.aio`` client (on tether's loop) calls ``Echo`` on a ``grpc.aio`` server."""
    import grpc

    enc = msgspec.msgpack.Encoder()
    dec = msgspec.msgpack.Decoder()

    async def measure(server: _GrpcServer) -> tuple[list[int], dict[str, float], str]:
        async with grpc.aio.insecure_channel(server.address) as channel:
            await asyncio.wait_for(channel.channel_ready(), WAIT)
            call = channel.unary_unary(ECHO)

            async def op() -> object:
                return dec.decode(await call(enc.encode(PAYLOAD)))

            assert await op() == PAYLOAD
            meter = CpuMeter(server.proc.pid)
            samples = await time_loop_async(op, **rt_budget(params), meter=meter)
            return samples, meter.stop(len(samples)), loop_name()

    with scratch_dir() as tmp, _GrpcServer(tmp, aio=True) as server:
        samples, cpu, loop = bounded(measure(server), params)
    info = {"loop": loop, "grpc": grpc.__version__}
    return {"metrics": [latency("round trip", samples, cpu=cpu)], "info": info}


# -- server streaming ------------------------------------------------------------------


def stream_grpc(params: Params) -> Result:
    """A ``grpc.aio`` client reads N items per ``Items`` call from a ``grpc.aio`` server.

    The counterpart of ``stream_tether`` (main reads a child's async generator
    with ``async for``): gRPC paces the stream by HTTP/2 flow control.
    """
    import grpc

    enc = msgspec.msgpack.Encoder()
    dec = msgspec.msgpack.Decoder()
    n, batches, max_s = ev_budget(params)

    async def measure(server: _GrpcServer) -> tuple[list[float], dict[str, float], str]:
        async with grpc.aio.insecure_channel(server.address) as channel:
            await asyncio.wait_for(channel.channel_ready(), WAIT)
            call = channel.unary_stream(ITEMS)

            async def batch(count: int) -> float:
                t0 = time.perf_counter()
                got = 0
                async for msg in call(enc.encode(count)):
                    dec.decode(msg)
                    got += 1
                return batch_rate(count, got, t0, "items")

            meter = CpuMeter(server.proc.pid)
            rates, cpu = await rate_loop_async(batch, n, batches, max_s, meter)
            return rates, cpu, loop_name()

    with scratch_dir() as tmp, _GrpcServer(tmp, aio=True) as server:
        rates, cpu, loop = bounded(measure(server), params)
    info = {"loop": loop, "grpc": grpc.__version__}
    return {"metrics": [rate("items", rates, "/s", cpu=cpu)], "info": info}
