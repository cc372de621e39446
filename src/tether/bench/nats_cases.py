"""tether over NATS beside bare nats-py, on a nats-server this case starts on loopback.

The serving side is a process of its own (a :class:`tether.Main` listening
on ``nats://``, or a bare nats-py subscriber); the measuring side invokes
(``request``) or sends (``publish``) through the same server, bodies encoded
with msgspec on both, so the two rows differ only by tether's own work.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import msgspec

import tether

from ..aio.loop import run
from .baselines import ev_budget, rt_budget
from .common import (
    PAYLOAD,
    CpuMeter,
    Params,
    Result,
    child_init,
    join_or_kill,
    latency,
    rate,
    spawn_ctx,
    time_loop_async,
    unavailable,
)
from .tether_cases import WAIT, bounded, loop_name

__all__ = ["ev_nats_py", "ev_nats_tether", "rt_nats_py", "rt_nats_tether"]


def _server_binary() -> str | None:
    found = shutil.which("nats-server")
    if found is None and os.path.exists("/usr/sbin/nats-server"):
        found = "/usr/sbin/nats-server"
    return found


@contextmanager
def _nats_server() -> Iterator[str]:
    """A nats-server on a free loopback port (JetStream off) for the case's duration."""
    binary = _server_binary()
    assert binary is not None
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen(
        [binary, "-a", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + WAIT
        while True:
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=1):
                    break
            except OSError:
                if time.monotonic() > deadline or proc.poll() is not None:
                    raise TimeoutError("nats-server did not start") from None
                time.sleep(0.02)
        yield f"nats://127.0.0.1:{port}"
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)


# -- serving processes (module-level: started with ``spawn``) ---------------------


async def _serve_tether(url: str, ready: Any) -> None:
    n = 0

    def echo(call: tether.Call, d: Any) -> Any:
        return d

    def on_ev(call: tether.Call, d: Any) -> None:
        nonlocal n
        n += 1

    def count(call: tether.Call) -> int:
        nonlocal n
        got, n = n, 0
        return got

    async with tether.Main() as main:
        main.handle("echo", echo, roles="nats")
        main.on("ev", on_ev, roles="nats")
        main.handle("count", count, roles="nats")
        await main.listen(f"{url}/bench")
        ready.set()
        await asyncio.get_running_loop().create_future()  # until the parent ends us


async def _serve_bare(url: str, ready: Any) -> None:
    import nats

    enc, dec = msgspec.msgpack.Encoder(), msgspec.msgpack.Decoder()
    nc = await nats.connect(url)
    n = 0

    async def echo(msg: Any) -> None:
        await msg.respond(enc.encode(dec.decode(msg.data)))

    async def on_ev(msg: Any) -> None:
        nonlocal n
        dec.decode(msg.data)
        n += 1

    async def count(msg: Any) -> None:
        nonlocal n
        got, n = n, 0
        await msg.respond(enc.encode(got))

    await nc.subscribe("bench.echo", cb=echo)
    await nc.subscribe("bench.ev", cb=on_ev)
    await nc.subscribe("bench.count", cb=count)
    await nc.flush()
    ready.set()
    await asyncio.get_running_loop().create_future()


def _server_process(kind: str, url: str, ready: Any, parent_pid: int) -> None:
    child_init(parent_pid)
    run((_serve_tether if kind == "tether" else _serve_bare)(url, ready))


@contextmanager
def _serving(kind: str) -> Iterator[tuple[str, Any]]:
    with _nats_server() as url:
        ctx = spawn_ctx()
        ready = ctx.Event()
        proc = ctx.Process(
            target=_server_process, args=(kind, url, ready, os.getpid()), daemon=True
        )
        proc.start()
        try:
            if not ready.wait(WAIT):
                raise TimeoutError(f"the {kind} server did not start within {WAIT} s")
            yield url, proc
        finally:
            if proc.exitcode is None:
                proc.terminate()
            join_or_kill(proc)


def _missing() -> Result | None:
    if _server_binary() is None:
        return unavailable("nats-server is not installed (apt-get install nats-server)")
    try:
        import nats  # noqa: F401
    except ModuleNotFoundError:
        return unavailable("nats-py is not installed (pip install 'tether-ipc[nats]')")
    return None


# -- round trips -----------------------------------------------------------------


def rt_nats_tether(params: Params) -> Result:
    """An asyncio client invokes ``echo`` on a main process, through nats-server."""
    if (missing := _missing()) is not None:
        return missing

    async def measure(url: str, pid: int) -> tuple[list[int], dict[str, float], str]:
        async with tether.connect(f"{url}/bench", timeout=WAIT) as peer:
            assert await peer.invoke("echo", PAYLOAD) == PAYLOAD
            meter = CpuMeter(pid)
            samples = await time_loop_async(
                lambda: peer.invoke("echo", PAYLOAD), **rt_budget(params), meter=meter
            )
            return samples, meter.stop(len(samples)), loop_name()

    with _serving("tether") as (url, proc):
        samples, cpu, loop = bounded(measure(url, proc.pid), params)
    return {"metrics": [latency("round trip", samples, cpu=cpu)], "info": {"loop": loop}}


def rt_nats_py(params: Params) -> Result:
    """Bare nats-py ``request`` to a subscriber process that ``respond``s (msgspec bodies)."""
    if (missing := _missing()) is not None:
        return missing

    async def measure(url: str, pid: int) -> tuple[list[int], dict[str, float], str]:
        import nats

        enc, dec = msgspec.msgpack.Encoder(), msgspec.msgpack.Decoder()
        nc = await nats.connect(url)
        try:

            async def op() -> Any:
                return dec.decode((await nc.request("bench.echo", enc.encode(PAYLOAD), WAIT)).data)

            assert await op() == PAYLOAD
            meter = CpuMeter(pid)
            samples = await time_loop_async(op, **rt_budget(params), meter=meter)
            return samples, meter.stop(len(samples)), loop_name()
        finally:
            await nc.close()

    with _serving("bare") as (url, proc):
        samples, cpu, loop = bounded(measure(url, proc.pid), params)
    return {"metrics": [latency("round trip", samples, cpu=cpu)], "info": {"loop": loop}}


# -- events ----------------------------------------------------------------------


def _events(params: Params, kind: str) -> Result:
    if (missing := _missing()) is not None:
        return missing
    n, batches, max_s = ev_budget(params)

    async def measure(url: str, pid: int) -> tuple[list[float], dict[str, float], str]:
        import nats

        enc, dec = msgspec.msgpack.Encoder(), msgspec.msgpack.Decoder()
        peer = await tether.connect(f"{url}/bench", timeout=WAIT) if kind == "tether" else None
        nc = None if peer is not None else await nats.connect(url)
        try:

            async def batch(count: int) -> float:
                t0 = time.perf_counter()
                if peer is not None:
                    for _ in range(count):
                        await peer.send("ev", PAYLOAD)
                    got = await peer.invoke("count")
                else:
                    assert nc is not None
                    for _ in range(count):
                        await nc.publish("bench.ev", enc.encode(PAYLOAD))
                    got = dec.decode((await nc.request("bench.count", b"", WAIT)).data)
                elapsed = time.perf_counter() - t0
                if got != count:
                    raise RuntimeError(f"the server counted {got} events, expected {count}")
                return count / elapsed

            await batch(n // 10)
            rates: list[float] = []
            meter = CpuMeter(pid)
            meter.start()
            end = time.perf_counter() + max_s
            for _ in range(batches):
                rates.append(await batch(n))
                if time.perf_counter() > end:
                    break
            return rates, meter.stop(n * len(rates)), loop_name()
        finally:
            if peer is not None:
                await peer.close()
            if nc is not None:
                await nc.close()

    with _serving(kind) as (url, proc):
        rates, cpu, loop = bounded(measure(url, proc.pid), params)
    return {"metrics": [rate("events", rates, "/s", cpu=cpu)], "info": {"loop": loop}}


def ev_nats_tether(params: Params) -> Result:
    """A client ``send``s N events through nats-server; main's ``on`` counts them."""
    return _events(params, "tether")


def ev_nats_py(params: Params) -> Result:
    """Bare nats-py ``publish`` of N events; a subscriber process counts them."""
    return _events(params, "bare")
