"""Tests for tether.wire: frame encode/parse round trips, chunking, limits, garbage."""

from __future__ import annotations

import struct
import tracemalloc

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tether.errors import PayloadTooLarge, ProtocolError
from tether.wire import (
    DEFAULT_MAX_FRAME_SIZE,
    HEADER,
    HEADER_SIZE,
    WHERE_FD,
    WHERE_INLINE,
    Frame,
    FrameParser,
    Kind,
    encode_frame,
)

ATT = struct.Struct("<BBHIQ")
U32 = st.integers(min_value=0, max_value=0xFFFFFFFF)
# Unicode text whose UTF-8 form stays within a few hundred bytes.
CHANNELS = st.text(max_size=100).filter(lambda s: len(s.encode()) <= 400)
BODIES = st.binary(max_size=600)
ATTACHMENTS = st.lists(st.binary(max_size=300), max_size=4)


def raw_frame(
    kind: int,
    *,
    rid: int = 0,
    route: int = 0,
    channel: bytes = b"",
    chan_len: int | None = None,
    n_att: int = 0,
    rest: bytes = b"",
    size: int | None = None,
) -> bytes:
    """Build a frame by hand, with every field under the caller's control."""
    if chan_len is None:
        chan_len = len(channel)
    payload = channel + rest
    if size is None:
        size = HEADER_SIZE - 4 + len(payload)
    return HEADER.pack(size, kind, 0, chan_len, rid, route, n_att, 0) + payload


def encode(
    kind: int,
    rid: int = 0,
    route: int = 0,
    channel: str = "",
    body: bytes = b"",
    attachments: list[bytes] | None = None,
    max_frame_size: int = DEFAULT_MAX_FRAME_SIZE,
) -> bytes:
    out = bytearray()
    encode_frame(out, kind, rid, route, channel.encode(), body, attachments or [], max_frame_size)
    return bytes(out)


def split_at(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({c % (len(data) + 1) for c in cuts})
    pieces, prev = [], 0
    for p in [*points, len(data)]:
        pieces.append(data[prev:p])
        prev = p
    return pieces


frames_strategy = st.builds(
    Frame,
    kind=st.sampled_from(list(Kind)),
    request_id=U32,
    route_id=U32,
    channel=CHANNELS,
    body=BODIES,
    attachments=ATTACHMENTS,
)


def encode_all(frames: list[Frame]) -> bytes:
    out = bytearray()
    for f in frames:
        encode_frame(
            out,
            f.kind,
            f.request_id,
            f.route_id,
            f.channel.encode(),
            f.body,
            list(f.attachments),
        )
    return bytes(out)


# -- round trips ---------------------------------------------------------


@pytest.mark.parametrize("kind", list(Kind))
def test_every_kind_round_trips(kind: Kind) -> None:
    f = Frame(kind, 7, 9, "chan-ñ", b"\x93\x01\x02\x03", [b"abc", b"", b"\x00" * 50])
    got = FrameParser().feed(encode_all([f]))
    assert got == [f]
    g = got[0]
    assert g.kind == kind
    assert (g.request_id, g.route_id, g.channel) == (7, 9, "chan-ñ")
    assert bytes(g.body) == b"\x93\x01\x02\x03"
    assert [bytes(a) for a in g.attachments] == [b"abc", b"", b"\x00" * 50]


@settings(max_examples=300, deadline=None)
@given(frame=frames_strategy)
def test_round_trip_single(frame: Frame) -> None:
    data = encode_all([frame])
    parser = FrameParser()
    got = parser.feed(data)
    assert got == [frame]
    assert parser.buffered == 0
    # Frame.__eq__ is real: a changed field makes frames differ.
    other = Frame(
        frame.kind,
        (frame.request_id + 1) & 0xFFFFFFFF,
        frame.route_id,
        frame.channel,
        frame.body,
        frame.attachments,
    )
    assert got[0] != other


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    frames=st.lists(frames_strategy, min_size=1, max_size=8),
    cuts=st.lists(st.integers(min_value=0, max_value=1 << 16), max_size=40),
)
def test_round_trip_random_chunking(frames: list[Frame], cuts: list[int]) -> None:
    data = encode_all(frames)
    parser = FrameParser()
    got: list[Frame] = []
    for piece in split_at(data, cuts):
        got.extend(parser.feed(piece))
    assert got == frames
    assert parser.buffered == 0


@settings(max_examples=50, deadline=None)
@given(frames=st.lists(frames_strategy, min_size=1, max_size=5))
def test_round_trip_byte_at_a_time(frames: list[Frame]) -> None:
    data = encode_all(frames)
    parser = FrameParser()
    got: list[Frame] = []
    for i in range(len(data)):
        got.extend(parser.feed(data[i : i + 1]))
        if i < len(data) - 1:
            assert parser.buffered > 0 or got
    assert got == frames
    assert parser.buffered == 0


def test_many_frames_in_one_feed() -> None:
    frames = [
        Frame(Kind.EVENT, i, i * 3, f"ch{i}", bytes([i % 256]) * (i % 17)) for i in range(1000)
    ]
    got = FrameParser().feed(encode_all(frames))
    assert len(got) == 1000
    assert got == frames


def test_frame_split_then_many_in_next_feed() -> None:
    frames = [Frame(Kind.INVOKE, i, 0, "c", b"x" * i) for i in range(1, 50)]
    data = encode_all(frames)
    parser = FrameParser()
    first = parser.feed(data[:21])  # frame 0 (22 bytes) less one byte
    assert first == []
    assert parser.buffered == 21
    assert parser.feed(data[21:]) == frames


def test_feed_empty_returns_nothing() -> None:
    parser = FrameParser()
    assert parser.feed(b"") == []
    parser.feed(b"\x10\x00")
    assert parser.feed(b"") == []
    assert parser.buffered == 2


def test_whole_frame_body_is_a_view_of_the_input() -> None:
    data = bytearray(encode(Kind.EVENT, channel="c", body=b"hello", attachments=[b"att"]))
    (f,) = FrameParser().feed(data)
    assert isinstance(f.body, memoryview)
    assert f.body.obj is data
    assert isinstance(f.attachments[0], memoryview)
    assert f.attachments[0].obj is data


def test_frame_repr_and_unhashable() -> None:
    f = Frame(Kind.PING, 5, 0, "x", b"")
    assert "PING" in repr(f)
    assert "rid=5" in repr(f)
    assert "99" in repr(Frame(99))
    with pytest.raises(TypeError):
        hash(f)
    assert (f == 1) is False


# -- limits --------------------------------------------------------------


@pytest.mark.parametrize("split", [False, True])
def test_hostile_length_rejected_from_four_bytes(split: bool) -> None:
    parser = FrameParser()
    header = (0xFFFFFFFF).to_bytes(4, "little")
    tracemalloc.start()
    try:
        tracemalloc.reset_peak()
        with pytest.raises(ProtocolError, match="exceeds"):
            if split:
                assert parser.feed(header[:2]) == []
                parser.feed(header[2:])
            else:
                parser.feed(header)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 64 * 1024, f"parser allocated {peak} bytes for a hostile header"


def test_length_over_custom_limit_rejected_before_allocation() -> None:
    parser = FrameParser(max_frame_size=1024)
    tracemalloc.start()
    try:
        tracemalloc.reset_peak()
        with pytest.raises(ProtocolError):
            parser.feed((1025).to_bytes(4, "little"))
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 16 * 1024


@pytest.mark.parametrize("with_attachment", [False, True])
def test_frame_exactly_at_limit_accepted_one_over_rejected(with_attachment: bool) -> None:
    limit = 4096
    overhead = HEADER_SIZE - 4 + len(b"chan") + (ATT.size if with_attachment else 0)
    att_len = 100 if with_attachment else 0
    body = b"b" * (limit - overhead - att_len)
    atts = [b"a" * att_len] if with_attachment else []
    exact = encode(Kind.RESULT, 1, 0, "chan", body, atts, max_frame_size=limit)
    assert int.from_bytes(exact[:4], "little") == limit
    assert FrameParser(limit).feed(exact) == [Frame(Kind.RESULT, 1, 0, "chan", body, atts)]
    # Also at the limit when it arrives in pieces.
    parser = FrameParser(limit)
    assert parser.feed(exact[:100]) == []
    assert len(parser.feed(exact[100:])) == 1

    with pytest.raises(PayloadTooLarge):
        encode(Kind.RESULT, 1, 0, "chan", body + b"!", atts, max_frame_size=limit)
    over = encode(Kind.RESULT, 1, 0, "chan", body + b"!", atts, max_frame_size=limit + 1)
    with pytest.raises(ProtocolError):
        FrameParser(limit).feed(over)
    with pytest.raises(ProtocolError):
        FrameParser(limit).feed(over[:4])


@pytest.mark.parametrize(
    "kwargs",
    [
        {"body": b"x" * 200},
        {"channel": "c" * 200},
        {"attachments": [b"a" * 100, b"b" * 100]},
        {"attachments": [b""] * 20},  # the descriptor table alone is too big
    ],
)
def test_encode_too_large_leaves_buffer_unchanged(kwargs: dict[str, object]) -> None:
    out = bytearray(b"previous bytes")
    args: dict[str, object] = {"channel": "", "body": b"", "attachments": []}
    args.update(kwargs)
    with pytest.raises(PayloadTooLarge) as info:
        encode_frame(
            out,
            Kind.EVENT,
            1,
            0,
            str(args["channel"]).encode(),
            args["body"],  # type: ignore[arg-type]
            args["attachments"],  # type: ignore[arg-type]
            max_frame_size=150,
        )
    assert out == b"previous bytes"
    assert isinstance(info.value, ValueError)


def test_payload_too_large_then_buffer_still_usable() -> None:
    out = bytearray()
    encode_frame(out, Kind.PING, 1, 0, b"", b"")
    before = bytes(out)
    with pytest.raises(PayloadTooLarge):
        encode_frame(out, Kind.EVENT, 2, 0, b"c", b"x" * 100, max_frame_size=50)
    assert out == before
    encode_frame(out, Kind.PONG, 1, 0, b"", b"")
    assert FrameParser().feed(out) == [Frame(Kind.PING, 1), Frame(Kind.PONG, 1)]


# -- garbage -------------------------------------------------------------


@pytest.mark.parametrize("kind", [0, 17, 18, 100, 255])
def test_unknown_kind(kind: int) -> None:
    with pytest.raises(ProtocolError, match="unknown frame kind"):
        FrameParser().feed(raw_frame(kind))


@pytest.mark.parametrize("size", [0, 1, 4, 15])
def test_size_shorter_than_header(size: int) -> None:
    data = size.to_bytes(4, "little") + b"\x00" * 40
    with pytest.raises(ProtocolError, match="shorter than a header"):
        FrameParser().feed(data)


def test_channel_length_past_end() -> None:
    with pytest.raises(ProtocolError, match="channel"):
        FrameParser().feed(raw_frame(Kind.EVENT, channel=b"abc", chan_len=4))
    with pytest.raises(ProtocolError, match="channel"):
        FrameParser().feed(raw_frame(Kind.EVENT, chan_len=0xFFFF, rest=b"x" * 100))


@pytest.mark.parametrize("bad", [b"\xff", b"\xc3", b"ab\xed\xa0\x80", b"\x80abc"])
def test_invalid_utf8_channel(bad: bytes) -> None:
    with pytest.raises(ProtocolError, match="UTF-8"):
        FrameParser().feed(raw_frame(Kind.INVOKE, channel=bad))


def test_attachment_table_past_end() -> None:
    # Two descriptors announced, room for one.
    one = ATT.pack(WHERE_INLINE, 0, 0, 0, 0)
    with pytest.raises(ProtocolError, match="attachment table"):
        FrameParser().feed(raw_frame(Kind.EVENT, n_att=2, rest=one))
    with pytest.raises(ProtocolError, match="attachment table"):
        FrameParser().feed(raw_frame(Kind.EVENT, channel=b"c", n_att=0xFFFF))


def test_attachment_longer_than_frame() -> None:
    desc = ATT.pack(WHERE_INLINE, 0, 0, 0, 11)
    with pytest.raises(ProtocolError, match="longer than the frame"):
        FrameParser().feed(raw_frame(Kind.EVENT, n_att=1, rest=desc + b"x" * 10))
    huge = ATT.pack(WHERE_INLINE, 0, 0, 0, 0xFFFFFFFFFFFFFFFF)
    with pytest.raises(ProtocolError):
        FrameParser().feed(raw_frame(Kind.EVENT, n_att=1, rest=huge))
    # Exactly fitting is fine, and an empty body is allowed.
    (f,) = FrameParser().feed(raw_frame(Kind.EVENT, n_att=1, rest=desc + b"y" * 11))
    assert bytes(f.body) == b""
    assert [bytes(a) for a in f.attachments] == [b"y" * 11]


def test_fd_attachment_not_accepted_inline() -> None:
    desc = ATT.pack(WHERE_FD, 0, 0, 0, 0)
    with pytest.raises(ProtocolError, match="not supported"):
        FrameParser().feed(raw_frame(Kind.EVENT, n_att=1, rest=desc))


def test_garbage_after_good_frame_in_same_feed() -> None:
    good = encode(Kind.PING, 3)
    with pytest.raises(ProtocolError):
        FrameParser().feed(good + raw_frame(42))


@settings(max_examples=500, deadline=None)
@given(data=st.binary(max_size=300), cuts=st.lists(st.integers(0, 400), max_size=5))
def test_arbitrary_bytes_only_protocol_error(data: bytes, cuts: list[int]) -> None:
    parser = FrameParser(max_frame_size=1 << 16)
    try:
        for piece in split_at(data, cuts):
            for f in parser.feed(piece):
                assert f.kind in set(Kind)
                bytes(f.body)
                for a in f.attachments:
                    bytes(a)
    except ProtocolError:
        pass


def test_buffered_counts_every_held_byte() -> None:
    data = encode(Kind.EVENT, 1, 0, "chan", b"x" * 100)
    parser = FrameParser()
    for i in range(1, len(data)):
        parser = FrameParser()
        assert parser.feed(data[:i]) == []
        assert parser.buffered == i  # including a size field that was fully read
        assert len(parser.feed(data[i:])) == 1
        assert parser.buffered == 0  # nothing left once a spanning frame completes
    # Two frames, the second cut: only the second one's bytes are held.
    parser = FrameParser()
    assert len(parser.feed(data + data[:30])) == 1
    assert parser.buffered == 30


def test_a_header_announcing_a_large_frame_costs_only_what_arrived() -> None:
    # A stranger announcing 60 MB and sending 100 bytes must not make us hold 60 MB.
    p = FrameParser(64 * 1024 * 1024)
    head = HEADER.pack(60_000_000, Kind.EVENT, 0, 0, 0, 0, 0, 0)
    tracemalloc.start()
    try:
        assert p.feed(head + bytes(100)) == []
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert p.buffered == 4 + HEADER_SIZE - 4 + 100
    assert peak < 1_000_000


def test_a_frame_assembled_across_many_reads_is_whole() -> None:
    body = bytes(range(256)) * 1000
    data = bytearray()
    encode_frame(data, Kind.EVENT, 0, 0, b"ch", body)
    p = FrameParser()
    frames = []
    for i in range(0, len(data), 999):
        frames += p.feed(bytes(data[i : i + 999]))
    assert len(frames) == 1 and bytes(frames[0].body) == body and p.buffered == 0


def test_the_first_frame_has_its_own_limit() -> None:
    p = FrameParser(1 << 20, first_limit=4096)
    with pytest.raises(ProtocolError, match="limit of 4096"):
        p.feed(HEADER.pack(5000, Kind.HELLO, 0, 0, 0, 0, 0, 0))
    p = FrameParser(1 << 20, first_limit=4096)
    first = bytearray()
    encode_frame(first, Kind.HELLO, 0, 0, b"", b"x")
    second = bytearray()
    encode_frame(second, Kind.EVENT, 0, 0, b"c", bytes(10_000))
    frames = p.feed(bytes(first + second))
    assert [f.kind for f in frames] == [Kind.HELLO, Kind.EVENT]


def test_small_bodies_of_whole_frames_are_bytes_and_frames_are_not_gc_tracked() -> None:
    """Many small frames per read: no view and no GC-tracked object per frame."""
    import gc

    small = encode(Kind.EVENT, channel="c", body=b"x" * 512)
    big = encode(Kind.EVENT, channel="c", body=b"y" * 513)
    data = bytes(small + big)
    f1, f2 = FrameParser().feed(data)
    assert type(f1.body) is bytes and f1.body == b"x" * 512
    assert isinstance(f2.body, memoryview) and f2.body.obj is data  # larger: still a view
    assert not gc.is_tracked(f1) and not gc.is_tracked(f2)
    assert f1 == Frame(Kind.EVENT, channel="c", body=memoryview(b"x" * 512))
