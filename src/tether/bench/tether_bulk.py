"""tether's large-payload cases: an ndarray as an attachment (both directions), ``tether.Buffer``.

The child is started with :meth:`tether.Main.spawn`; the measuring side runs
on :func:`tether.aio.loop.run`. Both cases are written against the attachment
API; when it is missing or unfinished (an ndarray cannot be encoded, no
``tether.Buffer``) they report "unavailable: <reason>" instead of failing.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from typing import Any

import msgspec

import tether

from .bulk import big_budget, big_result, checksum, direction, make_source
from .common import CpuMeter, Params, Result, latency, rate, unavailable
from .tether_cases import WAIT, bounded, loop_name

__all__ = ["big_tether_attach", "big_tether_buffer"]


def _as_u8(data: Any) -> Any:
    """A flat uint8 ndarray over whatever the attachment arrived as."""
    import numpy as np

    if isinstance(data, np.ndarray):
        return data.reshape(-1).view(np.uint8)
    try:
        return np.frombuffer(data, dtype=np.uint8)
    except TypeError:
        array = getattr(data, "array", None)
        if array is None:
            raise
        return _as_u8(array())


def _take(call: tether.Call, data: Any) -> int:
    return checksum(_as_u8(data))


def _peek(call: tether.Call, data: Any) -> int:
    a = _as_u8(data)
    return int(a[0]) + int(a[-1])


async def _sink_child(peer: tether.Peer) -> None:
    import numpy  # noqa: F401  (before the hello: the cold transfer is not the import)

    peer.handle("take", _take)
    peer.handle("peek", _peek)
    await peer.wait_closed()


#: What a missing or unfinished feature raises when a case first tries it.
_FEATURE_ERRORS = (
    TypeError,
    ValueError,
    NotImplementedError,
    msgspec.MsgspecError,
    tether.TetherError,
)


def _reason(what: str, exc: BaseException) -> str:
    text = str(exc).splitlines()[0] if str(exc) else ""
    return f"{what}: {type(exc).__name__}: {text}"[:160]


async def _timed(
    op: Callable[[], Awaitable[int]], expected: int, reps: int, max_s: float
) -> list[int]:
    """Time up to ``reps`` awaited transfers (ns each), checking every answer."""
    out: list[int] = []
    end = time.perf_counter() + max_s
    for _ in range(reps):
        t0 = time.perf_counter_ns()
        got = await op()
        out.append(time.perf_counter_ns() - t0)
        if got != expected:
            raise RuntimeError(f"checksum mismatch: got {got}, expected {expected}")
        if time.perf_counter() > end:
            break
    return out


def _limit(size: int) -> int:
    """A frame limit that admits one ``size``-byte attachment (they count against it)."""
    return max(64 << 20, size + (1 << 20))


async def _source_child(peer: tether.Peer, size: int) -> None:
    src = make_source(size)

    def make(call: tether.Call) -> Any:
        return src

    peer.handle("make", make)
    await peer.wait_closed()


def big_tether_attach(params: Params) -> Result:
    """An ndarray as an attachment: ``child.invoke("take", arr)`` main -> child, or
    ``child.invoke("make")`` returning the child's array (``c2m``), checksummed in main.

    The first transfer (which creates and maps the pool's segment) is timed
    apart as the cold one.
    """
    size, reps, max_s = big_budget(params)
    c2m = direction(params) == "c2m"
    src = make_source(size)
    expected = checksum(src)

    async def measure() -> Result:
        async with tether.Main(timeout=WAIT * 2, max_frame_size=_limit(size)) as main:
            if c2m:
                child = await main.spawn(_source_child, size)

                async def op() -> int:
                    return checksum(_as_u8(await child.invoke("make")))

            else:
                child = await main.spawn(_sink_child)

                async def op() -> int:
                    result: int = await child.invoke("take", src)
                    return result

            t0 = time.perf_counter_ns()
            try:
                got = await op()
            except _FEATURE_ERRORS as exc:
                return unavailable(_reason("ndarray attachments not supported", exc))
            cold = size / (time.perf_counter_ns() - t0)
            if got != expected:
                raise RuntimeError(f"checksum mismatch: got {got}, expected {expected}")
            meter = CpuMeter(child.pid)
            meter.start()
            ns = await _timed(op, expected, reps, max_s)
            cpu = meter.stop(len(ns))
            result = big_result(cold, [size / t for t in ns], cpu)
            result["info"] = {"loop": loop_name()}
            return result

    return bounded(measure(), params)


def _buffer_array(buf: Any) -> Any:
    """A writable uint8 ndarray over a :class:`tether.Buffer`."""
    import numpy as np

    array = getattr(buf, "array", None)
    if array is not None:
        try:
            a = array()
        except TypeError:
            a = array(np.uint8)
        return a.reshape(-1).view(np.uint8)
    return np.frombuffer(buf, dtype=np.uint8)


def big_tether_buffer(params: Params) -> Result:
    """``tether.Buffer``: fill it in place, then ``invoke("peek", buf)`` hands it over.

    Metrics: the handoff (the invoke, in which the child reads the first and
    last byte) in ms, and the producer's whole cycle (allocate + fill +
    handoff) as GB/s.
    """
    import numpy as np

    Buffer = getattr(tether, "Buffer", None)
    if Buffer is None:
        return unavailable("tether.Buffer does not exist yet")
    size, reps, max_s = big_budget(params)
    src = make_source(size)
    expected = int(src[0]) + int(src[-1])

    async def measure() -> Result:
        async with tether.Main(timeout=WAIT * 2, max_frame_size=_limit(size)) as main:
            child = await main.spawn(_sink_child)
            handoff: list[int] = []
            cycle: list[float] = []
            cold: list[int] = []
            meter = CpuMeter(child.pid)
            end = time.perf_counter() + max_s
            for i in range(reps + 1):  # the first round is the cold one, reported apart
                t0 = time.perf_counter_ns()
                try:
                    buf = Buffer(size)
                    a = _buffer_array(buf)
                    np.copyto(a, src)
                    del a
                    t1 = time.perf_counter_ns()
                    got = await child.invoke("peek", buf)
                except _FEATURE_ERRORS as exc:
                    if i:
                        raise
                    return unavailable(_reason("tether.Buffer handoff failed", exc))
                t2 = time.perf_counter_ns()
                del buf
                if got != expected:
                    raise RuntimeError(f"child read {got}, expected {expected}")
                if i:
                    handoff.append(t2 - t1)
                    cycle.append(size / (t2 - t0))
                else:
                    cold.append(t2 - t1)
                    meter.start()
                if time.perf_counter() > end:
                    break
            cpu = meter.stop(len(cycle))
            return {
                "metrics": [
                    latency("handoff", handoff, unit="ms"),
                    rate("alloc+fill+handoff", cycle, "GB/s", cpu=cpu),
                    latency("cold handoff", cold, unit="ms"),
                ],
                "info": {"loop": loop_name()},
            }

    return bounded(measure(), params)
