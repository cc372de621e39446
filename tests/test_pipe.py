"""Tests for tether.pipe: framing, fork survival, EOF/truncation, limits, timeouts."""

from __future__ import annotations

import array
import fcntl
import hashlib
import os
import select
import signal
import struct
import termios
import threading
import time
import traceback
import tracemalloc
from collections.abc import Callable, Iterator

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tether.errors import (
    ConnectionClosed,
    EndOfStream,
    PayloadTooLarge,
    PeerGone,
    ProtocolError,
    TetherError,
)
from tether.pipe import PipeReader, PipeWriter, pipe

SEED_MESSAGE = "Psst .. hello from parent process!"
MiB = 1024 * 1024
F_GETPIPE_SZ = getattr(fcntl, "F_GETPIPE_SZ", 1032)  # Linux


@pytest.fixture
def ends() -> Iterator[tuple[PipeReader, PipeWriter]]:
    """A fresh pipe whose two ends are closed after the test, whatever happens."""
    reader, writer = pipe()
    try:
        yield reader, writer
    finally:
        reader.close()
        writer.close()


def readable(reader: PipeReader) -> bool:
    """Whether the reader's descriptor has data (or EOF) pending right now."""
    return bool(select.select([reader.fileno()], [], [], 0)[0])


def in_thread(fn: Callable[[], object]) -> threading.Thread:
    """Run ``fn`` in a started daemon thread (for writes that exceed the pipe buffer)."""
    thread = threading.Thread(target=fn, daemon=True)
    thread.start()
    return thread


def fork_child(body: Callable[[], int]) -> int:
    """Fork; the child runs ``body`` and always leaves through ``os._exit``.

    The child exits with ``body``'s return value, 99 if it raised, and is killed
    by SIGALRM after 30 s so it can never outlive the test run.
    """
    pid = os.fork()
    if pid == 0:  # pragma: no cover - runs in the child
        code = 98
        try:
            signal.signal(signal.SIGALRM, signal.SIG_DFL)
            signal.alarm(30)
            code = body()
        except BaseException:
            traceback.print_exc()
            code = 99
        finally:
            os._exit(code)
    return pid


def wait_child(pid: int, timeout: float = 30.0) -> int:
    """Reap ``pid`` and return its exit code (``-N`` if killed by signal N)."""
    deadline = time.monotonic() + timeout
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return os.waitstatus_to_exitcode(status)
        if time.monotonic() > deadline:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            pytest.fail(f"child {pid} did not exit within {timeout} s")
        time.sleep(0.01)


# --- across a real fork -------------------------------------------------------


@pytest.mark.timeout(30)
def test_fork_parent_writes_child_verifies_sizes() -> None:
    messages = [b"", os.urandom(1024), os.urandom(16 * MiB)]
    data_r, data_w = pipe()
    result_r, result_w = pipe()

    def child() -> int:
        data_w.close()
        result_r.close()
        got = [data_r.recv(timeout=20) for _ in messages]
        with pytest.raises(EndOfStream):
            data_r.recv(timeout=20)
        for message in got:
            result_w.send(hashlib.sha256(message).digest() + struct.pack("<Q", len(message)))
        return 0 if got == messages else 1

    pid = fork_child(child)
    data_r.close()
    result_w.close()
    with data_w:
        for message in messages:
            data_w.send(message)
    with result_r:
        reports = list(result_r)
    assert wait_child(pid) == 0
    assert reports == [hashlib.sha256(m).digest() + struct.pack("<Q", len(m)) for m in messages]


def test_fork_seed_scenario() -> None:
    """The seed article's program: parent sends one line, child gets it whole."""
    reader, writer = pipe()
    echo_r, echo_w = pipe()

    def child() -> int:
        writer.close()
        echo_r.close()
        message = reader.recv(timeout=20)
        echo_w.send(message)
        return 0 if message == SEED_MESSAGE.encode() else 1

    pid = fork_child(child)
    reader.close()
    echo_w.close()
    with writer:
        writer.send(SEED_MESSAGE)
    with echo_r:
        assert echo_r.recv(timeout=20) == SEED_MESSAGE.encode()
    assert wait_child(pid) == 0


def test_fork_child_writes_parent_reads() -> None:
    reader, writer = pipe()
    expected = [f"message {i}".encode() * (i % 7) for i in range(500)]

    def child() -> int:
        reader.close()
        with writer:
            for message in expected:
                writer.send(message)
        return 0

    pid = fork_child(child)
    writer.close()
    with reader:
        assert list(reader) == expected
    assert wait_child(pid) == 0


# --- framing and ordering -----------------------------------------------------


def test_many_messages_keep_order_and_boundaries(ends: tuple[PipeReader, PipeWriter]) -> None:
    reader, writer = ends
    expected = [os.urandom(i % 300) for i in range(2000)]

    def produce() -> None:
        for message in expected:
            writer.send(message)
        writer.close()

    thread = in_thread(produce)
    assert list(reader) == expected
    thread.join(10)
    assert not thread.is_alive()


@pytest.mark.timeout(30)
def test_16_mib_message_spans_many_reads(
    ends: tuple[PipeReader, PipeWriter], monkeypatch: pytest.MonkeyPatch
) -> None:
    reader, writer = ends
    payload = os.urandom(16 * MiB)
    reads: list[int] = []
    real_readv = os.readv

    def counting_readv(fd: int, buffers: list[memoryview]) -> int:
        n = real_readv(fd, buffers)
        reads.append(n)
        return n

    monkeypatch.setattr(os, "readv", counting_readv)
    thread = in_thread(lambda: writer.send(payload))
    received = reader.recv(timeout=20)
    thread.join(10)
    assert received == payload
    assert len(reads) > 10  # the pipe buffer is far smaller than 16 MiB
    assert sum(reads) == 4 + len(payload)


def test_short_writes_and_reads_resume_at_exact_offset(
    ends: tuple[PipeReader, PipeWriter], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A kernel that moves 3 bytes per call must not lose or repeat a byte."""
    reader, writer = ends
    real_write, real_read = os.write, os.read

    def tiny_writev(fd: int, buffers: list[memoryview]) -> int:
        return real_write(fd, b"".join(bytes(b) for b in buffers)[:3])

    def tiny_readv(fd: int, buffers: list[memoryview]) -> int:
        chunk = real_read(fd, min(3, len(buffers[0])))
        buffers[0][: len(chunk)] = chunk
        return len(chunk)

    monkeypatch.setattr(os, "writev", tiny_writev)
    monkeypatch.setattr(os, "readv", tiny_readv)
    messages = [b"0123456789abcdef", b"", b"x", bytes(range(256))]
    for message in messages:
        writer.send(message)
    assert [reader.recv(timeout=5) for _ in messages] == messages


def test_wire_format_is_le_u32_length_then_payload(ends: tuple[PipeReader, PipeWriter]) -> None:
    reader, writer = ends
    writer.send(b"abc")
    assert os.read(reader.fileno(), 100) == b"\x03\x00\x00\x00abc"


@settings(max_examples=50, deadline=None)
@given(st.lists(st.binary(max_size=2000), max_size=40))
def test_roundtrip_property(messages: list[bytes]) -> None:
    reader, writer = pipe()
    with reader, writer:

        def produce() -> None:
            for message in messages:
                writer.send(message)
            writer.close()

        thread = in_thread(produce)
        assert list(reader) == messages
        thread.join(10)


def test_payload_types(ends: tuple[PipeReader, PipeWriter]) -> None:
    reader, writer = ends
    writer.send("héllo ✓ wörld")
    writer.send(bytearray(b"ba"))
    writer.send(memoryview(b"xxmvxx")[2:4])
    writer.send(array.array("H", [1, 2]))
    writer.send(b"")
    assert reader.recv() == "héllo ✓ wörld".encode()
    assert reader.recv() == b"ba"
    assert reader.recv() == b"mv"
    assert reader.recv() == array.array("H", [1, 2]).tobytes()
    assert reader.recv() == b""
    with pytest.raises(TypeError):
        writer.send(memoryview(b"abcdef")[::2])  # not contiguous
    with pytest.raises(TypeError):
        writer.send(12345)  # type: ignore[arg-type]
    assert not readable(reader)


# --- end of stream and broken streams ----------------------------------------


def test_end_of_stream_at_boundary(ends: tuple[PipeReader, PipeWriter]) -> None:
    reader, writer = ends
    writer.send(b"last")
    writer.close()
    assert reader.recv() == b"last"
    with pytest.raises(EndOfStream, match="pipe writer closed") as info:
        reader.recv()
    assert isinstance(info.value, EOFError)
    with pytest.raises(EndOfStream):
        reader.recv(timeout=1)  # stays at end of stream
    assert list(reader) == []


def test_iteration_stops_after_writer_close(ends: tuple[PipeReader, PipeWriter]) -> None:
    reader, writer = ends
    for word in ("a", "bb", "", "ccc"):
        writer.send(word)
    writer.close()
    assert list(reader) == [b"a", b"bb", b"", b"ccc"]
    assert not reader.closed


def test_truncated_payload_is_protocol_error(ends: tuple[PipeReader, PipeWriter]) -> None:
    reader, writer = ends
    os.write(writer.fileno(), struct.pack("<I", 100) + b"0123456789")
    writer.close()
    with pytest.raises(ProtocolError, match="truncated message: got 10 of 100 bytes"):
        reader.recv(timeout=5)
    assert reader.closed
    with pytest.raises(ConnectionClosed):
        reader.recv()


def test_truncated_header_is_protocol_error(ends: tuple[PipeReader, PipeWriter]) -> None:
    reader, writer = ends
    os.write(writer.fileno(), b"\x05\x00")
    writer.close()
    with pytest.raises(ProtocolError, match="truncated message: got 2 of 4"):
        reader.recv()


def test_oversized_header_rejected_before_allocation(
    ends: tuple[PipeReader, PipeWriter],
) -> None:
    reader, writer = ends
    os.write(writer.fileno(), b"\xff\xff\xff\xff")
    tracemalloc.start()
    try:
        with pytest.raises(ProtocolError) as info:
            reader.recv(timeout=5)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < MiB  # a 4 GiB bytearray was never created
    assert "4294967295" in str(info.value)
    assert str(64 * MiB) in str(info.value)
    assert reader.closed


def test_header_just_over_custom_limit_rejected() -> None:
    reader, writer = pipe(max_message_size=10)
    with reader, writer:
        writer.send(b"x" * 10)  # exactly at the limit is fine
        assert reader.recv() == b"x" * 10
        os.write(writer.fileno(), struct.pack("<I", 11))
        with pytest.raises(ProtocolError, match=r"11 .*max_message_size=10"):
            reader.recv()


def test_send_too_large_writes_nothing() -> None:
    reader, writer = pipe(max_message_size=16)
    with reader, writer:
        with pytest.raises(PayloadTooLarge) as info:
            writer.send(b"x" * 17)
        assert isinstance(info.value, ValueError)
        assert "17" in str(info.value)
        assert not readable(reader)
        writer.send("é" * 8)  # 16 bytes once encoded
        assert reader.recv() == ("é" * 8).encode()
        with pytest.raises(PayloadTooLarge):
            writer.send("é" * 9)  # 9 characters, but 18 bytes
        assert not writer.closed
        assert not readable(reader)


def test_invalid_limit() -> None:
    with pytest.raises(ValueError):
        pipe(max_message_size=-1)
    with pytest.raises(ValueError):
        pipe(max_message_size=2**32)


def test_send_after_reader_closed_is_peer_gone(ends: tuple[PipeReader, PipeWriter]) -> None:
    reader, writer = ends
    reader.close()
    with pytest.raises(PeerGone, match="pipe reader closed: Broken pipe") as info:
        writer.send(b"anyone there?")
    assert isinstance(info.value.__cause__, BrokenPipeError)
    assert isinstance(info.value, ConnectionError)


def pipe_is_full(reader: PipeReader) -> bool:
    """Whether the unread bytes fill the pipe's kernel buffer (a writer would block)."""
    pending = fcntl.ioctl(reader.fileno(), termios.FIONREAD, b"\0\0\0\0")
    return struct.unpack("i", pending)[0] >= fcntl.fcntl(reader.fileno(), F_GETPIPE_SZ)


@pytest.mark.timeout(30)
def test_reader_closing_mid_message_closes_writer() -> None:
    # The reader closes only once the writer has filled the pipe and is blocked
    # mid-frame, whatever the load: no timer races the payload's generation.
    payload = os.urandom(16 * MiB)
    reader, writer = pipe()

    def close_when_full() -> None:
        deadline = time.monotonic() + 20.0
        while not pipe_is_full(reader) and time.monotonic() < deadline:
            time.sleep(0.001)
        reader.close()

    with writer:
        closer = in_thread(close_when_full)
        with pytest.raises(PeerGone):
            writer.send(payload)  # blocks once the pipe is full
        closer.join(timeout=25.0)
        assert not closer.is_alive()
        assert writer.closed  # half a frame went out; the stream is unusable


# --- timeouts -----------------------------------------------------------------


def test_recv_timeout_on_empty_pipe(ends: tuple[PipeReader, PipeWriter]) -> None:
    reader, _ = ends
    start = time.monotonic()
    with pytest.raises(TimeoutError, match=r"no complete message within 0\.05 s"):
        reader.recv(timeout=0.05)
    elapsed = time.monotonic() - start
    assert 0.04 <= elapsed < 1.0
    with pytest.raises(TimeoutError):
        reader.recv(timeout=0)


def test_timeout_mid_payload_loses_nothing(ends: tuple[PipeReader, PipeWriter]) -> None:
    reader, writer = ends
    message = os.urandom(1000)
    frame = struct.pack("<I", len(message)) + message
    os.write(writer.fileno(), frame[:504])  # header + half the payload
    with pytest.raises(TimeoutError, match="504 bytes of the current frame"):
        reader.recv(timeout=0.05)
    os.write(writer.fileno(), frame[504:])
    writer.send(b"next")
    assert reader.recv(timeout=5) == message
    assert reader.recv(timeout=5) == b"next"


def test_timeout_mid_header_loses_nothing(ends: tuple[PipeReader, PipeWriter]) -> None:
    reader, writer = ends
    frame = struct.pack("<I", 3) + b"abc"
    os.write(writer.fileno(), frame[:2])
    with pytest.raises(TimeoutError):
        reader.recv(timeout=0.05)
    os.write(writer.fileno(), frame[2:5])
    with pytest.raises(TimeoutError):
        reader.recv(timeout=0.05)
    os.write(writer.fileno(), frame[5:])
    assert reader.recv(timeout=5) == b"abc"


def test_timeout_then_delayed_rest_arrives(ends: tuple[PipeReader, PipeWriter]) -> None:
    reader, writer = ends
    frame = struct.pack("<I", 6) + b"halves"
    os.write(writer.fileno(), frame[:7])
    timer = threading.Timer(0.1, lambda: os.write(writer.fileno(), frame[7:]))
    timer.start()
    assert reader.recv(timeout=5) == b"halves"
    timer.join()


# --- lifecycle ----------------------------------------------------------------


def test_use_after_close_and_idempotent_close() -> None:
    reader, writer = pipe()
    assert not reader.closed and not writer.closed
    assert "fd=" in repr(reader) and "PipeWriter" in repr(writer)
    reader.close()
    writer.close()
    reader.close()
    writer.close()
    assert reader.closed and writer.closed
    assert "closed" in repr(reader) and "closed" in repr(writer)
    with pytest.raises(ConnectionClosed):
        reader.recv()
    with pytest.raises(ConnectionClosed):
        writer.send(b"x")
    with pytest.raises(ConnectionClosed):
        reader.fileno()
    with pytest.raises(ConnectionClosed):
        writer.fileno()
    with pytest.raises(ConnectionClosed):
        next(iter(reader))
    assert issubclass(ConnectionClosed, TetherError)


def test_context_managers_close_descriptors() -> None:
    reader, writer = pipe()
    with reader as r, writer as w:
        fds = (r.fileno(), w.fileno())
        assert r is reader and w is writer
    assert reader.closed and writer.closed
    for fd in fds:
        with pytest.raises(OSError):
            os.fstat(fd)


def test_ends_are_plain_non_inheritable_fds(ends: tuple[PipeReader, PipeWriter]) -> None:
    reader, writer = ends
    assert not os.get_inheritable(reader.fileno())
    assert os.get_blocking(reader.fileno()) and os.get_blocking(writer.fileno())
    assert reader.max_message_size == writer.max_message_size == 64 * MiB
