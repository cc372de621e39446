"""Run fuzz/fuzz_protocol.py's TestOneInput without atheris, so CI exercises it."""

from __future__ import annotations

import importlib.util
import random
import struct
import sys
from pathlib import Path
from types import ModuleType

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tether.wire import Kind

HARNESS = Path(__file__).resolve().parent.parent / "fuzz" / "fuzz_protocol.py"


def _load() -> ModuleType:
    spec = importlib.util.spec_from_file_location("fuzz_protocol", HARNESS)
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    sys.modules.setdefault("fuzz_protocol", mod)
    spec.loader.exec_module(mod)
    return mod


fuzz = _load()


def _header(kind: int, size: int, chan_len: int = 0, n_att: int = 0) -> bytes:
    return struct.pack("<IBBHIIHH", size, kind, 0, chan_len, 1, 0, n_att, 0)


@settings(max_examples=2000, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.binary(max_size=400))
def test_harness_on_hypothesis_inputs(data: bytes) -> None:
    fuzz.TestOneInput(data)


@pytest.mark.timeout(120)
def test_harness_on_random_inputs() -> None:
    rng = random.Random(0x7E7E)
    for i in range(3000):
        mode = rng.randrange(256)
        if i % 3 == 0:
            # Raw bytes that start with a plausible header.
            kind = rng.choice([*list(Kind), 0, 12, 255])
            body = rng.randbytes(rng.randrange(64))
            size = rng.choice([16 + len(body), rng.randrange(40), 0xFFFFFFFF])
            rest = _header(kind, size, rng.randrange(20), rng.choice([0, 1, 2])) + body
        else:
            rest = rng.randbytes(rng.randrange(300))
        fuzz.TestOneInput(bytes([mode]) + rest)


@pytest.mark.parametrize("first", range(8))
def test_harness_modes_with_valid_frames(first: int) -> None:
    # A recipe of well-formed frames of every kind, each mode, whole and in 1-byte reads.
    recipe = b"".join(bytes([k, 3]) + b"abc" + bytes([2]) + b"\x91\x01" + b"\x00\x00" for k in Kind)
    raw = b"".join(bytes([1]) + b"x" for _ in range(3))
    for step in (0, 1):
        fuzz.TestOneInput(bytes([first | step << 3]) + (recipe if first & 4 else raw))


def test_frames_from_builds_parseable_frames() -> None:
    from tether.wire import FrameParser

    recipe = bytes([int(Kind.EVENT), 2]) + b"ch" + bytes([1]) + b"\x90" + bytes([1, 3, 0, 7, 1])
    frames = FrameParser().feed(fuzz._frames_from(recipe))
    assert len(frames) == 1
    f = frames[0]
    assert (f.kind, f.channel, bytes(f.body), f.request_id, f.route_id) == (
        Kind.EVENT,
        "ch",
        b"\x90",
        7,
        1,
    )
    assert [bytes(a) for a in f.attachments] == [b"\xaa" * 3]


def test_harness_reports_unexpected_exceptions(monkeypatch: pytest.MonkeyPatch) -> None:
    """The harness must not swallow anything but ProtocolError."""

    class Broken:
        def __init__(self, *args: object) -> None:
            pass

        buffered = 0

        def feed(self, data: bytes) -> list[object]:
            raise ValueError("parser bug")

    monkeypatch.setattr(fuzz, "FrameParser", Broken)
    with pytest.raises(ValueError, match="parser bug"):
        fuzz.TestOneInput(b"\x00abcdef")
