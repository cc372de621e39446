"""Large transfers in both directions, with an acknowledgement: the peers and the ceiling.

Each transfer moves one ``size``-byte ``numpy.uint8`` array. Main -> child
(``direction`` ``m2c``, the default): the child reads one byte of every 4 KiB
page (so every page is really reached) and returns that checksum. Child ->
main (``c2m``): main asks, the child sends the array it holds, and main
computes the checksum. A sample is ``size / elapsed`` for one transfer, from
the start of the send (or the request) to the checksum.

The first transfer of a process is timed apart and reported as ``cold
transfer`` (it creates and maps whatever the later ones reuse); the
``transfer`` samples are the warm ones after it, with the CPU time of both
processes over them.

Cases: ``multiprocessing.Pipe`` ``send_bytes``; pyzmq PAIR ``copy=False``;
``multiprocessing.shared_memory`` with a new segment per transfer (unlinking
is not timed) and with one segment reused, as tether's pool reuses its own;
and an in-process ``np.copyto`` into a preallocated array, the ceiling any
transfer can reach.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from multiprocessing.connection import Connection
from typing import TYPE_CHECKING, Any

from .common import (
    CpuMeter,
    MiB,
    Params,
    Result,
    child_init,
    join_or_kill,
    rate,
    scratch_dir,
    spawn_ctx,
)

if TYPE_CHECKING:
    import numpy as np
    import numpy.typing as npt

__all__ = [
    "big_budget",
    "big_memcpy",
    "big_mp_pipe",
    "big_result",
    "big_shm",
    "big_shm_reuse",
    "big_zmq",
    "checksum",
    "direction",
    "make_source",
    "time_transfers",
]

PAGE = 4096
ACK_TIMEOUT = 60.0


def big_budget(params: Params) -> tuple[int, int, float]:
    """(size in bytes, timed transfers, time cap in seconds)."""
    size = int(params.get("size", 64 * MiB))
    if params.get("quick"):
        return size, 5, 3.0
    return size, (10 if size <= 64 * MiB else 6), 8.0


def make_source(size: int) -> npt.NDArray[np.uint8]:
    """A ``size``-byte array with a non-trivial pattern (so checksums mean something)."""
    import numpy as np

    pattern = (np.arange(MiB, dtype=np.uint32) * 2654435761 >> 13).astype(np.uint8)
    return np.resize(pattern, size)


def checksum(a: Any) -> int:
    """Sum of one byte per 4 KiB page: touches every page, costs little else."""
    import numpy as np

    arr = a if isinstance(a, np.ndarray) else np.frombuffer(a, dtype=np.uint8)
    return int(arr.reshape(-1).view(np.uint8)[::PAGE].sum(dtype=np.uint64))


def direction(params: Params) -> str:
    """``m2c`` (main -> child, the default) or ``c2m`` (child -> main)."""
    d = str(params.get("direction", "m2c"))
    if d not in ("m2c", "c2m"):
        raise ValueError(f"unknown direction {d!r}")
    return d


def time_transfers(
    one: Callable[[], int],
    expected: int,
    size: int,
    reps: int,
    max_s: float,
    cleanup: Callable[[], None] | None = None,
    meter: CpuMeter | None = None,
) -> tuple[float, list[float], dict[str, float] | None]:
    """Time the first (cold) transfer on its own, then up to ``reps`` warm ones.

    Returns (cold GB/s, warm GB/s per transfer, the meter's CPU time over the
    warm transfers). ``cleanup`` runs after each transfer, outside the timed span.
    """
    t0 = time.perf_counter_ns()
    got = one()
    cold = size / (time.perf_counter_ns() - t0)  # bytes per ns == GB/s
    if cleanup is not None:
        cleanup()
    if got != expected:
        raise RuntimeError(f"checksum mismatch: got {got}, expected {expected}")
    out: list[float] = []
    if meter is not None:
        meter.start()
    end = time.perf_counter() + max_s
    for _ in range(reps):
        t0 = time.perf_counter_ns()
        got = one()
        elapsed = time.perf_counter_ns() - t0
        if cleanup is not None:
            cleanup()
        if got != expected:
            raise RuntimeError(f"checksum mismatch: got {got}, expected {expected}")
        out.append(size / elapsed)
        if time.perf_counter() > end:
            break
    return cold, out, (meter.stop(len(out)) if meter is not None else None)


def big_result(cold: float, samples: list[float], cpu: dict[str, float] | None) -> Result:
    """The metrics of a large-transfer case: warm transfers (with CPU) and the cold first one."""
    return {
        "metrics": [
            rate("transfer", samples, "GB/s", cpu=cpu),
            rate("cold transfer", [cold], "GB/s"),
        ]
    }


def _recv_ack(conn: Connection) -> Any:
    if not conn.poll(ACK_TIMEOUT):
        raise TimeoutError(f"no acknowledgement within {ACK_TIMEOUT} s")
    return conn.recv()


READY = "ready"


def _child_ready(parent_pid: int) -> None:
    """A sink or source child's start: die with the parent; import numpy before the cold transfer.

    The cold transfer measures what the first transfer creates and maps, not
    the child's imports, so every child imports numpy and says it is ready
    first (tether's children likewise import it before their hello).
    """
    import numpy  # noqa: F401

    child_init(parent_pid)


def _wait_ready(conn: Connection) -> None:
    if _recv_ack(conn) != READY:
        raise RuntimeError("the child did not say it was ready")


# -- multiprocessing.Pipe ---------------------------------------------------------


def _pipe_sink(conn: Connection, parent_pid: int) -> None:
    _child_ready(parent_pid)
    conn.send(READY)
    while True:
        data = conn.recv_bytes()
        if not data:
            return
        conn.send(checksum(data))
        del data


def _pipe_source(conn: Connection, size: int, parent_pid: int) -> None:
    _child_ready(parent_pid)
    src = make_source(size)
    conn.send(READY)
    while conn.recv():
        conn.send_bytes(src.data)


def big_mp_pipe(params: Params) -> Result:
    """``Connection.send_bytes`` of the array's buffer; the other side ``recv_bytes``.

    ``c2m``: main asks, the child (holding the array) sends it, main checksums.
    """
    size, reps, max_s = big_budget(params)
    c2m = direction(params) == "c2m"
    src = make_source(size)
    expected = checksum(src)
    ctx = spawn_ctx()
    parent, child = ctx.Pipe()
    target, args = (_pipe_source, (child, size)) if c2m else (_pipe_sink, (child,))
    proc = ctx.Process(target=target, args=(*args, os.getpid()), daemon=True)
    try:
        proc.start()
        child.close()
        _wait_ready(parent)
        view = src.data

        def m2c() -> int:
            parent.send_bytes(view)
            return int(_recv_ack(parent))

        def c2m_one() -> int:
            parent.send(True)
            if not parent.poll(ACK_TIMEOUT):
                raise TimeoutError(f"no data within {ACK_TIMEOUT} s")
            return checksum(parent.recv_bytes())

        cold, samples, cpu = time_transfers(
            c2m_one if c2m else m2c, expected, size, reps, max_s, meter=CpuMeter(proc.pid)
        )
        if c2m:
            parent.send(False)
        else:
            parent.send_bytes(b"")
    finally:
        parent.close()
        join_or_kill(proc)
    return big_result(cold, samples, cpu)


# -- pyzmq --------------------------------------------------------------------


def _zmq_sink(addr: str, parent_pid: int) -> None:
    import zmq

    _child_ready(parent_pid)
    ctx = zmq.Context()
    sock = ctx.socket(zmq.PAIR)
    sock.connect(addr)
    sock.send(READY.encode())
    try:
        while True:
            frame = sock.recv(copy=False)
            if len(frame) == 0:
                return
            s = checksum(frame.buffer)
            del frame
            sock.send(s.to_bytes(8, "little"))
    finally:
        sock.close(linger=0)
        ctx.term()


def _zmq_source(addr: str, size: int, parent_pid: int) -> None:
    import zmq

    _child_ready(parent_pid)
    src = make_source(size)
    ctx = zmq.Context()
    sock = ctx.socket(zmq.PAIR)
    sock.connect(addr)
    sock.send(READY.encode())
    try:
        while sock.recv() == b"go":
            sock.send(src.data, copy=False)
    finally:
        sock.close(linger=0)
        ctx.term()


def big_zmq(params: Params) -> Result:
    """pyzmq PAIR over ipc://, ``send(copy=False)``; the receiver ``recv(copy=False)``."""
    import zmq

    size, reps, max_s = big_budget(params)
    c2m = direction(params) == "c2m"
    src = make_source(size)
    expected = checksum(src)
    with scratch_dir() as tmp:
        addr = f"ipc://{tmp}/big.ipc"
        ctx = zmq.Context()
        sock = ctx.socket(zmq.PAIR)
        sock.setsockopt(zmq.RCVTIMEO, int(ACK_TIMEOUT * 1000))
        sock.bind(addr)
        target, args = (_zmq_source, (addr, size)) if c2m else (_zmq_sink, (addr,))
        proc = spawn_ctx().Process(target=target, args=(*args, os.getpid()), daemon=True)
        try:
            proc.start()
            if sock.recv() != READY.encode():
                raise RuntimeError("the child did not say it was ready")

            def m2c() -> int:
                sock.send(src.data, copy=False)
                return int.from_bytes(sock.recv(), "little")

            def c2m_one() -> int:
                sock.send(b"go")
                frame = sock.recv(copy=False)
                return checksum(frame.buffer)

            cold, samples, cpu = time_transfers(
                c2m_one if c2m else m2c, expected, size, reps, max_s, meter=CpuMeter(proc.pid)
            )
            sock.send(b"stop" if c2m else b"")
            proc.join(5.0)
        finally:
            sock.close(linger=0)
            ctx.term()
            join_or_kill(proc)
    return big_result(cold, samples, cpu)


# -- multiprocessing.shared_memory ---------------------------------------------------


def _shm_sink(conn: Connection, size: int, parent_pid: int) -> None:
    """Main -> child: attach to each named segment, read it, detach; ``reuse``: stay attached."""
    from multiprocessing import shared_memory

    import numpy as np

    _child_ready(parent_pid)
    kept: dict[str, shared_memory.SharedMemory] = {}
    conn.send(READY)
    try:
        while True:
            name = conn.recv()
            if name is None:
                return
            shm = kept.get(name) or shared_memory.SharedMemory(name=name)
            a = np.ndarray((size,), dtype=np.uint8, buffer=shm.buf)
            s = checksum(a)
            del a
            if conn.recv():  # reuse: the same segment comes again
                kept[name] = shm
            else:
                shm.close()
            conn.send(s)
    finally:
        for shm in kept.values():
            shm.close()


def _shm_source(conn: Connection, size: int, reuse: bool, parent_pid: int) -> None:
    """Child -> main: copy the array into a segment (a new one each time unless ``reuse``)."""
    from multiprocessing import shared_memory

    import numpy as np

    _child_ready(parent_pid)
    src = make_source(size)
    seg: shared_memory.SharedMemory | None = None
    conn.send(READY)
    try:
        while conn.recv():
            if seg is None or not reuse:
                if seg is not None:
                    seg.close()  # main unlinked it once read
                seg = shared_memory.SharedMemory(create=True, size=size)
            dst = np.ndarray((size,), dtype=np.uint8, buffer=seg.buf)
            np.copyto(dst, src)
            del dst
            conn.send(seg.name)
    finally:
        if seg is not None:
            seg.close()
            if reuse:
                seg.unlink()


def _shm_case(params: Params, reuse: bool) -> Result:
    from multiprocessing import shared_memory

    import numpy as np

    size, reps, max_s = big_budget(params)
    c2m = direction(params) == "c2m"
    src = make_source(size)
    expected = checksum(src)
    ctx = spawn_ctx()
    parent, child = ctx.Pipe()
    target, args = (_shm_source, (child, size, reuse)) if c2m else (_shm_sink, (child, size))
    proc = ctx.Process(target=target, args=(*args, os.getpid()), daemon=True)
    live: list[shared_memory.SharedMemory] = []  # segments main created or attached
    done: list[shared_memory.SharedMemory] = []  # to release after a transfer

    def release() -> None:
        while done:
            shm = done.pop()
            shm.close()
            shm.unlink()

    try:
        proc.start()
        child.close()
        _wait_ready(parent)

        def m2c() -> int:
            if not live or not reuse:
                live[:] = [shared_memory.SharedMemory(create=True, size=size)]
            shm = live[0]
            dst = np.ndarray((size,), dtype=np.uint8, buffer=shm.buf)
            np.copyto(dst, src)
            del dst
            parent.send(shm.name)
            parent.send(reuse)
            got = int(_recv_ack(parent))
            if not reuse:
                done.append(live.pop())
            return got

        def c2m_one() -> int:
            parent.send(True)
            name = _recv_ack(parent)
            if not live or live[0].name != name:
                live[:] = [shared_memory.SharedMemory(name=name)]
            a = np.ndarray((size,), dtype=np.uint8, buffer=live[0].buf)
            got = checksum(a)
            del a
            if not reuse:
                done.append(live.pop())
            return got

        cold, samples, cpu = time_transfers(
            c2m_one if c2m else m2c,
            expected,
            size,
            reps,
            max_s,
            cleanup=release,
            meter=CpuMeter(proc.pid),
        )
        parent.send(False if c2m else None)
    finally:
        parent.close()
        join_or_kill(proc)
        release()
        for shm in live:
            shm.close()
            if not c2m:
                shm.unlink()
    return big_result(cold, samples, cpu)


def big_shm(params: Params) -> Result:
    """A new ``SharedMemory`` segment per transfer: create, copy in, the other side attaches.

    The receiver reads it and detaches; unlinking is cleanup, not timed.
    """
    return _shm_case(params, reuse=False)


def big_shm_reuse(params: Params) -> Result:
    """One ``SharedMemory`` segment for every transfer, kept mapped on both sides.

    What tether's pool does: the producer copies into the same (already
    faulted-in) pages each time and the consumer stays attached; only the
    first transfer creates and maps the segment (see the cold row).
    """
    return _shm_case(params, reuse=True)


# -- in-process memcpy: the ceiling -------------------------------------------------


def big_memcpy(params: Params) -> Result:
    """``np.copyto`` into a preallocated array, in one process.

    The cold first copy faults the destination's pages in; later ones reuse them.
    """
    import numpy as np

    size, reps, max_s = big_budget(params)
    src = make_source(size)
    expected = checksum(src)
    dst = np.empty_like(src)

    def one() -> int:
        np.copyto(dst, src)
        return expected

    cold, samples, cpu = time_transfers(one, expected, size, max(reps, 10), max_s, meter=CpuMeter())
    if checksum(dst) != expected:
        raise RuntimeError("memcpy produced a different array")
    return big_result(cold, samples, cpu)
