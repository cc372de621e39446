"""The peers tether is measured against, for small messages.

Round trip (``rt_*``): a raw socketpair with a 4-byte length prefix (the
floor), ``multiprocessing.Pipe``, pyzmq REQ/REP. One-way events (``ev_*``):
``multiprocessing.Pipe``, pyzmq PUSH/PULL. Invokes with 256 in flight:
pyzmq DEALER/ROUTER. Every echo runs in a child started with ``spawn``.

The hot loops use blocking calls without per-call timeouts (a timeout would
add a ``poll`` syscall to every operation and distort the figure); they are
bounded by the case's alarm and the runner's hard timeout instead. Waits for
acknowledgements outside the hot loop have their own timeouts.
"""

from __future__ import annotations

import contextlib
import os
import socket
import struct
import time
from collections.abc import Callable, Iterator
from multiprocessing.connection import Connection
from multiprocessing.process import BaseProcess
from typing import Any

import msgspec

from .common import (
    PAYLOAD,
    CpuMeter,
    Params,
    Result,
    batch_rate,
    child_init,
    join_or_kill,
    latency,
    rate,
    rate_loop,
    scratch_dir,
    spawn_ctx,
    time_loop,
)

__all__ = [
    "ev_mp_pipe",
    "ev_zmq",
    "inflight_zmq",
    "rt_budget",
    "rt_mp_pipe",
    "rt_socketpair",
    "rt_zmq",
    "stream_zmq",
]

_LEN = struct.Struct("<I")
ACK_TIMEOUT = 30.0


def rt_budget(params: Params) -> dict[str, Any]:
    """Warm-up, iterations and time cap of a round-trip loop."""
    if params.get("quick"):
        return {"warmup": 300, "iters": 5000, "max_s": 1.0}
    return {"warmup": 2000, "iters": 30000, "max_s": 4.0}


def ev_budget(params: Params) -> tuple[int, int, float]:
    """(events per batch, batches, time cap in seconds) of an event-rate case."""
    if params.get("quick"):
        return 20000, 3, 2.0
    return 100000, 5, 5.0


def _recv_ack(conn: Connection, timeout: float = ACK_TIMEOUT) -> Any:
    if not conn.poll(timeout):
        raise TimeoutError(f"no acknowledgement within {timeout} s")
    return conn.recv()


@contextlib.contextmanager
def _child(target: Callable[..., None], *args: Any) -> Iterator[BaseProcess]:
    """``target(*args, parent_pid)`` in a spawned child for the block; reaped (or killed) after."""
    proc = spawn_ctx().Process(target=target, args=(*args, os.getpid()), daemon=True)
    try:
        proc.start()
        yield proc
    finally:
        join_or_kill(proc)


@contextlib.contextmanager
def _child_over(
    target: Callable[..., None],
    here: socket.socket | Connection,
    there: socket.socket | Connection,
) -> Iterator[BaseProcess]:
    """``target(there, parent_pid)`` in a spawned child; this process keeps ``here``.

    ``there`` is closed here once the child has it; at the end ``here`` is
    closed first (the child reads end-of-file), then the child is reaped.
    """
    proc = spawn_ctx().Process(target=target, args=(there, os.getpid()), daemon=True)
    try:
        proc.start()
        there.close()
        yield proc
    finally:
        here.close()
        join_or_kill(proc)


@contextlib.contextmanager
def _zmq_context() -> Iterator[Any]:
    """A ``zmq.Context`` for the block: every socket of it closed (linger 0), then ended."""
    import zmq

    ctx = zmq.Context()
    try:
        yield ctx
    finally:
        ctx.destroy(linger=0)


# -- raw socketpair -----------------------------------------------------------


def _socketpair_echo(sock: socket.socket, parent_pid: int) -> None:
    child_init(parent_pid)
    while True:
        head = sock.recv(4, socket.MSG_WAITALL)
        if len(head) < 4:
            return
        (n,) = _LEN.unpack(head)
        if n == 0:
            return
        body = sock.recv(n, socket.MSG_WAITALL)
        sock.sendall(head + body)


def rt_socketpair(params: Params) -> Result:
    """Raw socketpair, 4-byte length prefix, msgspec bodies, blocking send/recv."""
    enc = msgspec.msgpack.Encoder()
    dec = msgspec.msgpack.Decoder()
    parent, child = socket.socketpair()
    with _child_over(_socketpair_echo, parent, child) as proc:
        recv = parent.recv
        waitall = socket.MSG_WAITALL
        unpack = _LEN.unpack
        pack = _LEN.pack

        def op() -> object:
            body = enc.encode(PAYLOAD)
            parent.sendall(pack(len(body)) + body)
            (n,) = unpack(recv(4, waitall))
            return dec.decode(recv(n, waitall))

        assert op() == PAYLOAD
        meter = CpuMeter(proc.pid)
        samples = time_loop(op, **rt_budget(params), meter=meter)
        cpu = meter.stop(len(samples))
        parent.sendall(_LEN.pack(0))
    return {"metrics": [latency("round trip", samples, cpu=cpu)]}


# -- multiprocessing.Pipe ---------------------------------------------------------


def _pipe_echo(conn: Connection, parent_pid: int) -> None:
    child_init(parent_pid)
    while True:
        obj = conn.recv()
        if obj is None:
            return
        conn.send(obj)


def rt_mp_pipe(params: Params) -> Result:
    """multiprocessing.Pipe: send a dict, the child sends it back (pickle both ways)."""
    parent, child = spawn_ctx().Pipe()
    with _child_over(_pipe_echo, parent, child) as proc:
        send, recv = parent.send, parent.recv

        def op() -> object:
            send(PAYLOAD)
            return recv()

        assert op() == PAYLOAD
        meter = CpuMeter(proc.pid)
        samples = time_loop(op, **rt_budget(params), meter=meter)
        cpu = meter.stop(len(samples))
        parent.send(None)
    return {"metrics": [latency("round trip", samples, cpu=cpu)]}


def _pipe_count(conn: Connection, parent_pid: int) -> None:
    child_init(parent_pid)
    n = 0
    while True:
        obj = conn.recv()
        if obj.__class__ is dict:
            n += 1
        elif obj is None:  # end of a batch: report how many arrived
            conn.send(n)
            n = 0
        else:
            return


def ev_mp_pipe(params: Params) -> Result:
    """multiprocessing.Pipe one-way: N dicts to a child that counts, then one ack."""
    parent, child = spawn_ctx().Pipe()
    n, batches, max_s = ev_budget(params)
    with _child_over(_pipe_count, parent, child) as proc:
        send = parent.send

        def batch(count: int) -> float:
            t0 = time.perf_counter()
            for _ in range(count):
                send(PAYLOAD)
            send(None)
            got = _recv_ack(parent)
            return batch_rate(count, got, t0, "events")

        rates, cpu = rate_loop(batch, n, batches, max_s, CpuMeter(proc.pid))
        parent.send("stop")
    return {"metrics": [rate("events", rates, "/s", cpu=cpu)]}


# -- pyzmq --------------------------------------------------------------------


def _zmq_rep(addr: str, parent_pid: int) -> None:
    import zmq

    child_init(parent_pid)
    enc = msgspec.msgpack.Encoder()
    dec = msgspec.msgpack.Decoder()
    with _zmq_context() as ctx:
        sock = ctx.socket(zmq.REP)
        sock.bind(addr)
        while True:
            msg = sock.recv()
            if not msg:
                sock.send(b"")
                return
            sock.send(enc.encode(dec.decode(msg)))


def rt_zmq(params: Params) -> Result:
    """pyzmq REQ/REP over ipc:// in /tmp, msgspec-encoded on both sides."""
    import zmq

    enc = msgspec.msgpack.Encoder()
    dec = msgspec.msgpack.Decoder()
    with scratch_dir() as tmp, _zmq_context() as ctx:
        addr = f"ipc://{tmp}/rt.ipc"
        sock = ctx.socket(zmq.REQ)
        sock.setsockopt(zmq.RCVTIMEO, int(ACK_TIMEOUT * 1000))
        with _child(_zmq_rep, addr) as proc:
            sock.connect(addr)
            send, recv = sock.send, sock.recv

            def op() -> object:
                send(enc.encode(PAYLOAD))
                return dec.decode(recv())

            assert op() == PAYLOAD
            meter = CpuMeter(proc.pid)
            samples = time_loop(op, **rt_budget(params), meter=meter)
            cpu = meter.stop(len(samples))
            sock.send(b"")
            sock.recv()
    return {"metrics": [latency("round trip", samples, cpu=cpu)]}


def _zmq_pull_count(addr: str, ack_addr: str, parent_pid: int) -> None:
    import zmq

    child_init(parent_pid)
    dec = msgspec.msgpack.Decoder()
    with _zmq_context() as ctx:
        pull = ctx.socket(zmq.PULL)
        pull.bind(addr)
        ack = ctx.socket(zmq.PUSH)
        ack.connect(ack_addr)
        n = 0
        while True:
            msg = pull.recv()
            if len(msg) > 1:
                dec.decode(msg)  # a real consumer decodes what it counts
                n += 1
            elif not msg:
                ack.send(n.to_bytes(8, "little"))
                n = 0
            else:
                return


def ev_zmq(params: Params) -> Result:
    """pyzmq PUSH/PULL one-way, msgspec frames; the child acks each batch on PUSH/PULL."""
    import zmq

    enc = msgspec.msgpack.Encoder()
    n, batches, max_s = ev_budget(params)
    with scratch_dir() as tmp, _zmq_context() as ctx:
        addr, ack_addr = f"ipc://{tmp}/ev.ipc", f"ipc://{tmp}/ack.ipc"
        push = ctx.socket(zmq.PUSH)
        ack = ctx.socket(zmq.PULL)
        ack.setsockopt(zmq.RCVTIMEO, int(ACK_TIMEOUT * 1000))
        ack.bind(ack_addr)
        with _child(_zmq_pull_count, addr, ack_addr) as proc:
            push.connect(addr)
            send = push.send

            def batch(count: int) -> float:
                t0 = time.perf_counter()
                for _ in range(count):
                    send(enc.encode(PAYLOAD))
                send(b"")
                got = int.from_bytes(ack.recv(), "little")
                return batch_rate(count, got, t0, "events")

            rates, cpu = rate_loop(batch, n, batches, max_s, CpuMeter(proc.pid))
            push.send(b"S")
            proc.join(5.0)
    return {"metrics": [rate("events", rates, "/s", cpu=cpu)]}


# -- streams: the other side produces, this side consumes ------------------------------


def _zmq_push_items(addr: str, ctl_addr: str, parent_pid: int) -> None:
    """On each count read from ``ctl_addr``, PUSH that many encoded items, then an empty end."""
    import zmq

    child_init(parent_pid)
    enc = msgspec.msgpack.Encoder()
    with _zmq_context() as ctx:
        push = ctx.socket(zmq.PUSH)
        push.connect(addr)
        ctl = ctx.socket(zmq.PULL)
        ctl.bind(ctl_addr)
        while True:
            n = int.from_bytes(ctl.recv(), "little")
            if not n:
                return
            send = push.send
            for _ in range(n):
                send(enc.encode(PAYLOAD))
            send(b"")


def stream_zmq(params: Params) -> Result:
    """A child PUSHes N msgspec items per request to main's PULL, which decodes each.

    The stream counterpart of ``stream_tether``: pyzmq paces it by its high-water
    mark (1000 messages), not by what main consumed.
    """
    import zmq

    dec = msgspec.msgpack.Decoder()
    n, batches, max_s = ev_budget(params)
    with scratch_dir() as tmp, _zmq_context() as ctx:
        addr, ctl_addr = f"ipc://{tmp}/items.ipc", f"ipc://{tmp}/ctl.ipc"
        pull = ctx.socket(zmq.PULL)
        pull.setsockopt(zmq.RCVTIMEO, int(ACK_TIMEOUT * 1000))
        pull.bind(addr)
        ctl = ctx.socket(zmq.PUSH)
        with _child(_zmq_push_items, addr, ctl_addr) as proc:
            ctl.connect(ctl_addr)
            recv = pull.recv

            def batch(count: int) -> float:
                t0 = time.perf_counter()
                ctl.send(count.to_bytes(8, "little"))
                got = 0
                while msg := recv():
                    dec.decode(msg)
                    got += 1
                return batch_rate(count, got, t0, "items")

            rates, cpu = rate_loop(batch, n, batches, max_s, CpuMeter(proc.pid))
            ctl.send((0).to_bytes(8, "little"))
            proc.join(5.0)
    return {"metrics": [rate("items", rates, "/s", cpu=cpu)]}


def _zmq_router(addr: str, parent_pid: int) -> None:
    import zmq

    child_init(parent_pid)
    enc = msgspec.msgpack.Encoder()
    dec = msgspec.msgpack.Decoder()
    with _zmq_context() as ctx:
        sock = ctx.socket(zmq.ROUTER)
        sock.bind(addr)
        while True:
            ident, rid, body = sock.recv_multipart()
            if not rid:
                return
            sock.send_multipart([ident, rid, enc.encode(dec.decode(body))])


def inflight_budget(params: Params) -> tuple[int, int, int, float]:
    """(invokes per batch, batches, in flight, time cap) of an in-flight case."""
    if params.get("quick"):
        return 20000, 3, 256, 2.0
    return 50000, 5, 256, 5.0


def inflight_zmq(params: Params) -> Result:
    """pyzmq DEALER/ROUTER with 256 requests in flight, correlated by request id."""
    import zmq

    enc = msgspec.msgpack.Encoder()
    dec = msgspec.msgpack.Decoder()
    n, batches, window, max_s = inflight_budget(params)
    with scratch_dir() as tmp, _zmq_context() as ctx:
        addr = f"ipc://{tmp}/inflight.ipc"
        sock = ctx.socket(zmq.DEALER)
        sock.setsockopt(zmq.RCVTIMEO, int(ACK_TIMEOUT * 1000))
        with _child(_zmq_router, addr) as proc:
            sock.connect(addr)
            send, recv = sock.send_multipart, sock.recv_multipart

            def batch(count: int) -> float:
                pending: dict[bytes, int] = {}
                t0 = time.perf_counter()
                sent = 0
                for _ in range(min(window, count)):
                    rid = sent.to_bytes(4, "little")
                    pending[rid] = sent
                    send([rid, enc.encode(PAYLOAD)])
                    sent += 1
                for _ in range(count):
                    rid, body = recv()
                    dec.decode(body)
                    del pending[rid]
                    if sent < count:
                        rid = sent.to_bytes(4, "little")
                        pending[rid] = sent
                        send([rid, enc.encode(PAYLOAD)])
                        sent += 1
                elapsed = time.perf_counter() - t0
                if pending:
                    raise RuntimeError(f"{len(pending)} requests unanswered")
                return count / elapsed

            rates, cpu = rate_loop(batch, n, batches, max_s, CpuMeter(proc.pid))
            sock.send_multipart([b"", b""])
            proc.join(5.0)
    return {"metrics": [rate("invokes", rates, "/s", cpu=cpu)]}
