"""Large transfers parent -> child, with an acknowledgement: the peers and the ceiling.

Each transfer sends one ``size``-byte ``numpy.uint8`` array; the child reads
one byte of every 4 KiB page (so every page is really reached), returns that
checksum, and the parent checks it. A sample is ``size / elapsed`` for one
transfer, from the start of the send to the acknowledgement.

Cases: ``multiprocessing.Pipe`` ``send_bytes``; pyzmq PAIR ``copy=False``;
``multiprocessing.shared_memory`` with a new segment per transfer (cleanup
after the acknowledgement is not timed); and an in-process ``np.copyto`` into
a preallocated array, the ceiling any transfer can reach.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from multiprocessing.connection import Connection
from typing import TYPE_CHECKING, Any

from .common import MiB, Params, Result, child_init, join_or_kill, rate, scratch_dir, spawn_ctx

if TYPE_CHECKING:
    import numpy as np
    import numpy.typing as npt

__all__ = [
    "big_budget",
    "big_memcpy",
    "big_mp_pipe",
    "big_shm",
    "big_zmq",
    "checksum",
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


def time_transfers(
    one: Callable[[], int],
    expected: int,
    size: int,
    reps: int,
    max_s: float,
    cleanup: Callable[[], None] | None = None,
) -> list[float]:
    """Warm up once, then time up to ``reps`` transfers; GB/s per transfer.

    ``cleanup`` runs after each transfer, outside the timed span.
    """
    got = one()
    if cleanup is not None:
        cleanup()
    if got != expected:
        raise RuntimeError(f"checksum mismatch: got {got}, expected {expected}")
    out: list[float] = []
    end = time.perf_counter() + max_s
    for _ in range(reps):
        t0 = time.perf_counter_ns()
        got = one()
        elapsed = time.perf_counter_ns() - t0
        if cleanup is not None:
            cleanup()
        if got != expected:
            raise RuntimeError(f"checksum mismatch: got {got}, expected {expected}")
        out.append(size / elapsed)  # bytes per ns == GB/s
        if time.perf_counter() > end:
            break
    return out


def _recv_ack(conn: Connection) -> Any:
    if not conn.poll(ACK_TIMEOUT):
        raise TimeoutError(f"no acknowledgement within {ACK_TIMEOUT} s")
    return conn.recv()


# -- multiprocessing.Pipe ---------------------------------------------------------


def _pipe_sink(conn: Connection, parent_pid: int) -> None:
    child_init(parent_pid)
    while True:
        data = conn.recv_bytes()
        if not data:
            return
        conn.send(checksum(data))
        del data


def big_mp_pipe(params: Params) -> Result:
    """``Connection.send_bytes`` of the array's buffer; the child ``recv_bytes``."""
    size, reps, max_s = big_budget(params)
    src = make_source(size)
    expected = checksum(src)
    ctx = spawn_ctx()
    parent, child = ctx.Pipe()
    proc = ctx.Process(target=_pipe_sink, args=(child, os.getpid()), daemon=True)
    try:
        proc.start()
        child.close()
        view = src.data

        def one() -> int:
            parent.send_bytes(view)
            return int(_recv_ack(parent))

        samples = time_transfers(one, expected, size, reps, max_s)
        parent.send_bytes(b"")
    finally:
        parent.close()
        join_or_kill(proc)
    return {"metrics": [rate("transfer", samples, "GB/s")]}


# -- pyzmq --------------------------------------------------------------------


def _zmq_sink(addr: str, parent_pid: int) -> None:
    import zmq

    child_init(parent_pid)
    ctx = zmq.Context()
    sock = ctx.socket(zmq.PAIR)
    sock.connect(addr)
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


def big_zmq(params: Params) -> Result:
    """pyzmq PAIR over ipc://, ``send(copy=False)``; the child ``recv(copy=False)``."""
    import zmq

    size, reps, max_s = big_budget(params)
    src = make_source(size)
    expected = checksum(src)
    with scratch_dir() as tmp:
        addr = f"ipc://{tmp}/big.ipc"
        ctx = zmq.Context()
        sock = ctx.socket(zmq.PAIR)
        sock.setsockopt(zmq.RCVTIMEO, int(ACK_TIMEOUT * 1000))
        sock.bind(addr)
        proc = spawn_ctx().Process(target=_zmq_sink, args=(addr, os.getpid()), daemon=True)
        try:
            proc.start()

            def one() -> int:
                sock.send(src.data, copy=False)
                return int.from_bytes(sock.recv(), "little")

            samples = time_transfers(one, expected, size, reps, max_s)
            sock.send(b"")
            proc.join(5.0)
        finally:
            sock.close(linger=0)
            ctx.term()
            join_or_kill(proc)
    return {"metrics": [rate("transfer", samples, "GB/s")]}


# -- multiprocessing.shared_memory ---------------------------------------------------


def _shm_sink(conn: Connection, size: int, parent_pid: int) -> None:
    from multiprocessing import shared_memory

    import numpy as np

    child_init(parent_pid)
    while True:
        name = conn.recv()
        if name is None:
            return
        shm = shared_memory.SharedMemory(name=name)
        a = np.ndarray((size,), dtype=np.uint8, buffer=shm.buf)
        s = checksum(a)
        del a
        shm.close()
        conn.send(s)


def big_shm(params: Params) -> Result:
    """A new ``SharedMemory`` segment per transfer: create, copy in, child attaches and reads."""
    from multiprocessing import shared_memory

    import numpy as np

    size, reps, max_s = big_budget(params)
    src = make_source(size)
    expected = checksum(src)
    ctx = spawn_ctx()
    parent, child = ctx.Pipe()
    proc = ctx.Process(target=_shm_sink, args=(child, size, os.getpid()), daemon=True)
    live: list[shared_memory.SharedMemory] = []

    def release() -> None:
        while live:
            shm = live.pop()
            shm.close()
            shm.unlink()

    try:
        proc.start()
        child.close()

        def one() -> int:
            shm = shared_memory.SharedMemory(create=True, size=size)
            live.append(shm)
            dst = np.ndarray((size,), dtype=np.uint8, buffer=shm.buf)
            np.copyto(dst, src)
            del dst
            parent.send(shm.name)
            return int(_recv_ack(parent))

        samples = time_transfers(one, expected, size, reps, max_s, cleanup=release)
        parent.send(None)
    finally:
        parent.close()
        join_or_kill(proc)
        release()
    return {"metrics": [rate("transfer", samples, "GB/s")]}


# -- in-process memcpy: the ceiling -------------------------------------------------


def big_memcpy(params: Params) -> Result:
    """``np.copyto`` into a preallocated (already faulted-in) array, in one process."""
    import numpy as np

    size, reps, max_s = big_budget(params)
    src = make_source(size)
    expected = checksum(src)
    dst = np.empty_like(src)

    def one() -> int:
        np.copyto(dst, src)
        return expected

    samples = time_transfers(one, expected, size, max(reps, 10), max_s)
    if checksum(dst) != expected:
        raise RuntimeError("memcpy produced a different array")
    return {"metrics": [rate("transfer", samples, "GB/s")]}
