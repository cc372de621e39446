"""Tests for tether.protocol.Connection, driven against each other with no sockets."""

from __future__ import annotations

import os

import msgspec
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tether import codec
from tether.attachments import MemfdStore
from tether.errors import ConnectionClosed, PayloadTooLarge, ProtocolError
from tether.protocol import Connection, State
from tether.wire import HEADER, Frame, FrameParser, Kind, encode_frame

U32 = 0xFFFFFFFF


def transfer(src: Connection, dst: Connection) -> list[Frame]:
    """Move everything ``src`` wants to send into ``dst``; return dst's frames."""
    return dst.receive_data(bytes(src.data_to_send()[0]))


def pair(**kwargs: int) -> tuple[Connection, Connection]:
    """Two connections with the handshake done."""
    a = Connection("main", name="A", **kwargs)
    b = Connection("child", name="B", **kwargs)
    assert transfer(a, b) == []
    assert transfer(b, a) == []
    assert a.state is State.OPEN and b.state is State.OPEN
    return a, b


def outgoing(conn: Connection) -> list[Frame]:
    """Decode (and consume) what ``conn`` wants to send."""
    return FrameParser().feed(bytes(conn.data_to_send()[0]))


def raw(kind: int, rid: int = 0, route: int = 0, channel: bytes = b"", body: bytes = b"") -> bytes:
    out = bytearray()
    encode_frame(out, kind, rid, route, channel, body)
    return bytes(out)


def hello_bytes(**fields: object) -> bytes:
    h = codec.Hello(**{"protocol": "tether", "version": 1, "role": "x", **fields})  # type: ignore[arg-type]
    return raw(Kind.HELLO, body=codec.encoder.encode(h))


def decode(body: bytes | memoryview) -> object:
    return codec.any_decoder.decode(body)


# -- handshake -----------------------------------------------------------


def test_handshake() -> None:
    store = MemfdStore()
    a = Connection("main", name="A", pid=4242, max_frame_size=1 << 20, store=store)
    b = Connection("child", name="B")
    assert a.state is State.HANDSHAKE and b.state is State.HANDSHAKE
    assert a.peer_hello is None
    (hello,) = FrameParser().feed(bytes(a.data_to_send()[0]))
    assert hello.kind == Kind.HELLO
    assert a.data_to_send()[0] == b""  # data_to_send forgets what it returned
    assert b.receive_data(raw(Kind.HELLO, body=bytes(hello.body))) == []
    assert b.state is State.OPEN
    assert a.state is State.HANDSHAKE
    assert transfer(b, a) == []
    assert a.state is State.OPEN

    assert b.peer_hello is not None and a.peer_hello is not None
    assert b.peer_hello.protocol == "tether"
    assert b.peer_hello.version == codec.PROTOCOL_VERSION == 1
    assert b.peer_hello.role == "main"
    assert b.peer_hello.name == "A"
    assert b.peer_hello.pid == 4242  # given by the I/O layer: the core calls no getpid
    assert b.peer_hello.max_frame_size == 1 << 20
    assert b.peer_hello.features == ["fd", "stream"]  # what the store supports, and streams
    assert a.peer_hello.role == "child"
    assert a.peer_hello.name == "B"


def test_hello_split_across_reads() -> None:
    a = Connection("main")
    b = Connection("child")
    data = bytes(a.data_to_send()[0])
    for i in range(len(data) - 1):
        assert b.receive_data(data[i : i + 1]) == []
        assert b.state is State.HANDSHAKE
    b.receive_data(data[-1:])
    assert b.state is State.OPEN


def test_pipelined_invoke_before_peer_hello() -> None:
    a = Connection("main")
    b = Connection("child")
    rid = a.send_invoke(b"compute", (21,), "waiter")  # still HANDSHAKE on a
    a.send_event(b"log", ("line",))
    assert a.state is State.HANDSHAKE
    frames = transfer(a, b)  # HELLO + INVOKE + EVENT in one read
    assert [f.kind for f in frames] == [Kind.INVOKE, Kind.EVENT]
    assert frames[0].request_id == rid
    assert frames[0].channel == "compute"
    assert decode(frames[0].body) == [21]
    assert frames[1].channel == "log"
    assert decode(frames[1].body) == ["line"]
    # a has not seen b's HELLO yet; it arrives in the same read as the RESULT.
    b.send_result(rid, 42)
    (res,) = transfer(b, a)
    assert a.state is State.OPEN
    assert res.kind == Kind.RESULT and res.request_id == rid
    assert a.take_pending(rid) == "waiter"
    assert decode(res.body) == 42


# -- calls ---------------------------------------------------------------


def test_invoke_result_correlation() -> None:
    a, b = pair()
    w1, w2, w3 = object(), object(), object()
    r1 = a.send_invoke(b"add", (1, 2), w1)
    r2 = a.send_invoke(b"add", (3, 4), w2)
    r3 = a.send_invoke(b"echo", ("x",), w3)
    assert len({r1, r2, r3}) == 3
    assert set(a.pending) == {r1, r2, r3}
    invokes = transfer(a, b)
    assert [(f.kind, f.request_id, f.channel) for f in invokes] == [
        (Kind.INVOKE, r1, "add"),
        (Kind.INVOKE, r2, "add"),
        (Kind.INVOKE, r3, "echo"),
    ]
    # Answer out of order.
    for f in reversed(invokes):
        args = decode(f.body)
        assert isinstance(args, list)
        b.send_result(f.request_id, sum(args) if f.channel == "add" else args[0])
    results = transfer(b, a)
    got = {f.request_id: (a.take_pending(f.request_id), decode(f.body)) for f in results}
    assert got == {r1: (w1, 3), r2: (w2, 7), r3: (w3, "x")}
    assert a.pending == {}
    assert a.take_pending(r1) is None  # a late duplicate is simply dropped


def test_result_bodies_of_many_types() -> None:
    a, b = pair()
    values: list[object] = [None, True, -1, 2**63, 1.5, "ü", b"\x00\xff", [1, [2]], {"k": 1}]
    for v in values:
        rid = a.send_invoke(b"c", (), None)
        transfer(a, b)
        b.send_result(rid, v)
        (f,) = transfer(b, a)
        assert decode(f.body) == v


def test_error_frames() -> None:
    a, b = pair()
    rid = a.send_invoke(b"missing", (), "w")
    (inv,) = transfer(a, b)
    info = codec.ErrorInfo(code="no_handler", message="no handler for 'missing'")
    b.send_error(inv.request_id, info)
    (err,) = transfer(b, a)
    assert err.kind == Kind.ERROR and err.request_id == rid
    assert codec.error_decoder.decode(err.body) == info
    assert a.take_pending(rid) == "w"

    try:
        raise KeyError("k")
    except KeyError as exc:
        info = codec.error_info(exc)
    rid = a.send_invoke(b"boom", (), "w2")
    transfer(a, b)
    b.send_error(rid, info)
    (err,) = transfer(b, a)
    back = codec.error_decoder.decode(err.body)
    assert back.code == "remote" and back.type == "KeyError"
    assert "test_error_frames" in back.traceback


def test_events_both_ways() -> None:
    a, b = pair()
    a.send_event(b"theme", ("dark",))
    b.send_event(b"log", ("one", 2))
    b.send_event("ch-ñ".encode(), ())
    (ev,) = transfer(a, b)
    assert (ev.kind, ev.request_id, ev.channel, decode(ev.body)) == (
        Kind.EVENT,
        0,
        "theme",
        ["dark"],
    )
    evs = transfer(b, a)
    assert [(f.channel, decode(f.body)) for f in evs] == [("log", ["one", 2]), ("ch-ñ", [])]


def test_route_ids_carried() -> None:
    a, b = pair()
    a.send_event(b"e", (1,), route_id=77)
    a.send_invoke(b"i", (1,), None, route_id=U32)
    frames = transfer(a, b)
    assert [f.route_id for f in frames] == [77, U32]


def test_cancel() -> None:
    a, b = pair()
    rid = a.send_invoke(b"slow", (), "w")
    transfer(a, b)
    a.send_cancel(rid)
    assert rid not in a.pending
    (c,) = transfer(a, b)
    assert c.kind == Kind.CANCEL and c.request_id == rid
    # The handler's answer crosses the cancel: dropped, not an error.
    b.send_result(rid, "late")
    (late,) = transfer(b, a)
    assert a.take_pending(late.request_id) is None
    # Cancelling an unknown id is harmless.
    a.send_cancel(12345)
    (c2,) = transfer(a, b)
    assert c2.request_id == 12345


def test_ping_answered_with_pong() -> None:
    a, b = pair()
    a.send_ping(0xDEADBEEF)
    assert transfer(a, b) == []  # nothing for b's application
    (pong,) = outgoing(b)
    assert pong.kind == Kind.PONG and pong.request_id == 0xDEADBEEF
    # And the PONG itself is swallowed by a.
    b.send_ping(5)
    transfer(b, a)
    assert a.receive_data(raw(Kind.PONG, 5)) == []
    assert [f.kind for f in outgoing(a)] == [Kind.PONG]


def test_route_frames_go_to_the_application_in_order() -> None:
    """ROUTE_OPEN/ROUTE_CLOSE change route state when dispatched (tests/test_routes_core.py)."""
    _a, b = pair()
    data = raw(Kind.ROUTE_OPEN, 1, 9, b"files", b"\x90") + raw(Kind.EVENT, 0, 9, b"e", b"\x90")
    frames = b.receive_data(data + raw(Kind.ROUTE_CLOSE, 0, 9))
    assert [(f.kind, f.route_id) for f in frames] == [
        (Kind.ROUTE_OPEN, 9),
        (Kind.EVENT, 9),
        (Kind.ROUTE_CLOSE, 9),
    ]
    assert outgoing(b) == []  # nothing is answered before the I/O layer dispatches them
    assert b.state is State.OPEN


def test_goodbye() -> None:
    a, b = pair()
    a.send_goodbye("shutting down")
    assert a.state is State.CLOSING
    (bye,) = transfer(a, b)
    assert bye.kind == Kind.GOODBYE
    assert b.state is State.CLOSING
    assert b.goodbye_reason == "shutting down"
    # A second goodbye from a CLOSING side sends nothing.
    a.send_goodbye("again")
    assert a.data_to_send()[0] == b""


def test_goodbye_with_malformed_body_has_empty_reason() -> None:
    _a, b = pair()
    assert [f.kind for f in b.receive_data(raw(Kind.GOODBYE, body=b"\xc1"))] == [Kind.GOODBYE]
    assert b.goodbye_reason == ""
    assert b.state is State.CLOSING


def test_send_after_goodbye_is_connection_closed() -> None:
    a, _ = pair()
    rid = a.send_invoke(b"x", (), "w")
    a.send_goodbye()
    a.data_to_send()[0]
    with pytest.raises(ConnectionClosed):
        a.send_invoke(b"x", (), "w")
    with pytest.raises(ConnectionClosed):
        a.send_event(b"x", ())
    with pytest.raises(ConnectionClosed):
        a.send_ping(1)
    a.send_cancel(rid)  # allowed quietly, sends nothing once closing
    assert a.data_to_send()[0] == b""
    assert a.pending == {}


def test_send_after_peer_goodbye_is_connection_closed() -> None:
    a, b = pair()
    b.send_goodbye("bye")
    transfer(b, a)
    with pytest.raises(ConnectionClosed):
        a.send_invoke(b"x", (), "w")


def test_fail_all_returns_pending_waiters() -> None:
    a, _ = pair()
    waiters = [object() for _ in range(5)]
    for w in waiters:
        a.send_invoke(b"c", (), w)
    a.data_to_send()[0]
    got = a.fail_all()
    assert sorted(map(id, got)) == sorted(map(id, waiters))
    assert a.pending == {}
    assert a.state is State.CLOSED
    assert a.fail_all() == []
    with pytest.raises(ConnectionClosed):
        a.send_invoke(b"c", (), "w")
    # A closed connection ignores further input and answers nothing.
    assert a.receive_data(raw(Kind.PING, 1)) == []
    a.send_result(1, "x")
    a.send_error(1, codec.ErrorInfo(code="closed", message=""))
    assert a.data_to_send()[0] == b""


# -- bad messages --------------------------------------------------------


def test_first_frame_not_hello() -> None:
    b = Connection("child")
    with pytest.raises(ProtocolError, match="expected HELLO"):
        b.receive_data(raw(Kind.INVOKE, 1, 0, b"c", b"\x90"))
    assert b.state is State.CLOSED
    assert b.peer_hello is None
    assert b.receive_data(hello_bytes()) == []  # closed: input ignored


@pytest.mark.parametrize(
    ("fields", "match"),
    [
        ({"protocol": "other"}, "not 'tether'"),
        ({"protocol": ""}, "not 'tether'"),
        ({"version": 2}, "version 2"),
        ({"version": 0}, "version 0"),
    ],
)
def test_wrong_hello(fields: dict[str, object], match: str) -> None:
    b = Connection("child")
    with pytest.raises(ProtocolError, match=match):
        b.receive_data(hello_bytes(**fields))
    assert b.state is State.CLOSED


@pytest.mark.parametrize(
    "body", [b"", b"\xc1", b"\x93\x01\x02\x03", msgspec.msgpack.encode({"version": "one"})]
)
def test_malformed_hello_body(body: bytes) -> None:
    b = Connection("child")
    with pytest.raises(ProtocolError, match="HELLO"):
        b.receive_data(raw(Kind.HELLO, body=body))
    assert b.state is State.CLOSED


def test_hello_with_unknown_fields_accepted() -> None:
    b = Connection("child")
    body = msgspec.msgpack.encode(
        {"protocol": "tether", "version": 1, "role": "page", "future": [1, 2]}
    )
    b.receive_data(raw(Kind.HELLO, body=body))
    assert b.state is State.OPEN
    assert b.peer_hello is not None and b.peer_hello.role == "page"


def test_second_hello() -> None:
    _a, b = pair()
    with pytest.raises(ProtocolError, match="second HELLO"):
        b.receive_data(hello_bytes())
    assert b.state is State.CLOSED


def test_second_hello_in_same_read_as_first() -> None:
    b = Connection("child")
    with pytest.raises(ProtocolError):
        b.receive_data(hello_bytes() + hello_bytes())
    assert b.state is State.CLOSED


def test_malformed_frame_closes() -> None:
    _a, b = pair()
    bad = HEADER.pack(16, 200, 0, 0, 0, 0, 0, 0)
    with pytest.raises(ProtocolError):
        b.receive_data(bad)
    assert b.state is State.CLOSED


def test_oversized_frame_from_peer_closes() -> None:
    a = Connection("main", max_frame_size=1 << 20)
    b2 = Connection("child", max_frame_size=4096)
    transfer(a, b2)
    a.send_event(b"e", (b"x" * 5000,))
    with pytest.raises(ProtocolError, match="exceeds"):
        transfer(a, b2)
    assert b2.state is State.CLOSED


def test_receive_eof_clean() -> None:
    a, b = pair()
    a.send_event(b"e", (b"x" * 5000,))
    data = bytes(a.data_to_send()[0])
    # The frame spans several reads; EOF after its last byte is clean.
    assert b.receive_data(data[:10]) == []
    assert b.receive_data(data[10:3000]) == []
    assert len(b.receive_data(data[3000:])) == 1
    b.receive_eof()
    assert b.state is State.CLOSED


@pytest.mark.parametrize("cut", [1, 3, 4, 5, 20, 30])
def test_receive_eof_mid_frame(cut: int) -> None:
    a, b = pair()
    a.send_event(b"chan", ("payload",))
    data = bytes(a.data_to_send()[0])
    assert b.receive_data(data[:cut]) == []
    with pytest.raises(ProtocolError, match="middle of a frame"):
        b.receive_eof()
    assert b.state is State.CLOSED


def test_receive_eof_during_handshake_mid_hello() -> None:
    a = Connection("main")
    b = Connection("child")
    b.receive_data(bytes(a.data_to_send()[0])[:7])
    with pytest.raises(ProtocolError):
        b.receive_eof()


# -- request ids ---------------------------------------------------------


def test_request_ids_unique_across_10k_invokes() -> None:
    a, b = pair()
    rids = [a.send_invoke(b"c", (i,), i) for i in range(10_000)]
    assert len(set(rids)) == 10_000
    assert all(0 < r <= U32 for r in rids)
    frames = transfer(a, b)
    assert [f.request_id for f in frames] == rids
    assert [decode(f.body) for f in frames[:3]] == [[0], [1], [2]]


def test_request_ids_wrap_skipping_zero_and_pending() -> None:
    a, b = pair()
    a._next_rid = U32 - 1
    r1 = a.send_invoke(b"c", (), "w1")
    r2 = a.send_invoke(b"c", (), "w2")
    r3 = a.send_invoke(b"c", (), "w3")
    assert (r1, r2, r3) == (U32, 1, 2)  # 0 is never used
    # Wrap again while U32, 1 and 2 are still in flight: they are skipped.
    a._next_rid = U32 - 1
    r4 = a.send_invoke(b"c", (), "w4")
    assert r4 == 3
    assert [f.request_id for f in transfer(a, b)] == [U32, 1, 2, 3]
    # Once answered, an id may be reused.
    assert a.take_pending(1) == "w2"
    a._next_rid = 0
    assert a.send_invoke(b"c", (), "w5") == 1
    assert a.pending[U32] == "w1"


# -- size limits ---------------------------------------------------------


def test_oversized_result_raises_and_leaves_buffer_unchanged() -> None:
    a, b = pair(max_frame_size=4096)
    rid = a.send_invoke(b"big", (), "w")
    transfer(a, b)
    b.send_event(b"before", (1,))
    before = bytes(b._out)
    with pytest.raises(PayloadTooLarge):
        b.send_result(rid, b"x" * 5000)
    assert bytes(b._out) == before
    assert b.buffered_out == len(before)
    assert b.state is State.OPEN
    # An error can be sent instead, and the stream stays well formed.
    b.send_error(rid, codec.ErrorInfo(code="too_large", message="result too large"))
    frames = transfer(b, a)
    assert [f.kind for f in frames] == [Kind.EVENT, Kind.ERROR]


def test_oversized_invoke_and_event_send_nothing() -> None:
    a, b = pair(max_frame_size=4096)
    with pytest.raises(PayloadTooLarge):
        a.send_invoke(b"c", ("y" * 5000,), "w")
    assert a.pending == {}
    with pytest.raises(PayloadTooLarge):
        a.send_event(b"c", ("y" * 5000,))
    assert a.buffered_out == 0
    assert a.state is State.OPEN
    a.send_event(b"c", ("ok",))
    assert [decode(f.body) for f in transfer(a, b)] == [["ok"]]


def test_result_exactly_at_limit() -> None:
    limit = 4096
    a, b = pair(max_frame_size=limit)
    rid = a.send_invoke(b"c", (), "w")
    transfer(a, b)
    # A msgpack bin 16 of n bytes has a 3-byte prefix; header after size is 16 bytes.
    n = limit - 16 - 3
    b.send_result(rid, b"z" * n)
    (f,) = transfer(b, a)
    assert decode(f.body) == b"z" * n
    with pytest.raises(PayloadTooLarge):
        b.send_result(rid, b"z" * (n + 1))


def test_unencodable_value_leaves_buffer_unchanged() -> None:
    _a, b = pair()
    b.send_event(b"x", ())
    before = bytes(b._out)
    with pytest.raises(TypeError):
        b.send_result(1, object())
    assert bytes(b._out) == before


# -- only ProtocolError escapes ------------------------------------------


def frame_like(draw: st.DrawFn) -> bytes:
    kind = draw(st.integers(0, 17))
    chan = draw(st.binary(max_size=12))
    n_att = draw(st.sampled_from([0, 0, 0, 1, 2, 0xFFFF]))
    rest = draw(st.binary(max_size=80))
    chan_len = draw(st.sampled_from([len(chan), len(chan), len(chan) + 1, 0xFFFF]))
    size = 16 + len(chan) + len(rest)
    size = draw(st.sampled_from([size, size, size - 1, size + 1, 3, 0xFFFFFFFF]))
    rid = draw(st.integers(0, U32))
    return HEADER.pack(size & U32, kind, 0, chan_len, rid, 0, n_att, 0) + chan + rest


frame_like_strategy = st.composite(frame_like)()
byte_stream = st.lists(st.one_of(st.binary(max_size=64), frame_like_strategy), max_size=6).map(
    b"".join
)


@settings(max_examples=600, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=byte_stream, cuts=st.lists(st.integers(0, 600), max_size=4), eof=st.booleans())
def test_arbitrary_bytes_to_open_connection(data: bytes, cuts: list[int], eof: bool) -> None:
    _a, b = pair(max_frame_size=1 << 16)
    points = sorted({c % (len(data) + 1) for c in cuts})
    pieces = [data[i:j] for i, j in zip([0, *points], [*points, len(data)], strict=True)]
    try:
        for piece in pieces:
            for f in b.receive_data(piece):
                assert f.kind in {
                    Kind.INVOKE,
                    Kind.RESULT,
                    Kind.ERROR,
                    Kind.EVENT,
                    Kind.CANCEL,
                    Kind.ROUTE_OPEN,
                    Kind.ROUTE_CLOSE,
                    Kind.GOODBYE,
                    Kind.STREAM,
                    Kind.ITEM,
                    Kind.CREDIT,
                }
            b.data_to_send()[0]
        if eof:
            b.receive_eof()
    except ProtocolError:
        assert b.state is State.CLOSED


@settings(max_examples=300, deadline=None)
@given(data=byte_stream)
def test_arbitrary_bytes_to_handshaking_connection(data: bytes) -> None:
    b = Connection("child")
    try:
        b.receive_data(data)
    except ProtocolError:
        assert b.state is State.CLOSED


def test_send_respects_peer_announced_max_frame_size() -> None:
    a = Connection("main", max_frame_size=1 << 20)
    b = Connection("child", max_frame_size=4096)
    transfer(a, b)
    transfer(b, a)
    assert a.peer_hello is not None and a.peer_hello.max_frame_size == 4096
    with pytest.raises(PayloadTooLarge):
        a.send_event(b"e", (b"x" * 5000,))


# -- issue 6: goodbye per frame (D16), one answer per invoke, frame-size floor ---------


def test_frames_after_goodbye_in_the_same_read_are_ignored() -> None:
    _, b = pair()
    event = raw(Kind.EVENT, channel=b"e", body=codec.encoder.encode([1]))
    frames = b.receive_data(raw(Kind.GOODBYE, body=codec.encoder.encode({"reason": "x"})) + event)
    assert [f.kind for f in frames] == [Kind.GOODBYE]
    assert b.their_goodbye and not b.our_goodbye and b.goodbye_reason == "x"
    assert b.state is State.CLOSING


def test_frames_after_goodbye_in_a_later_read_are_ignored() -> None:
    _, b = pair()
    assert [f.kind for f in b.receive_data(raw(Kind.GOODBYE))] == [Kind.GOODBYE]
    later = raw(Kind.EVENT, channel=b"e", body=codec.encoder.encode([1]))
    later += raw(Kind.RESULT, rid=1, body=codec.encoder.encode(1))
    later += raw(Kind.PING, rid=5)
    assert b.receive_data(later) == []
    assert b.data_to_send()[0] == b"", "no PONG after the peer's GOODBYE"


def test_after_our_goodbye_only_answers_to_our_calls_count() -> None:
    a, b = pair()
    rid = a.send_invoke(b"c", (), "w")
    transfer(a, b)
    a.send_goodbye("done")
    assert a.our_goodbye and not a.their_goodbye
    b.send_result(rid, 7)
    b.send_event(b"e", ())
    b.send_ping(9)
    assert [f.kind for f in transfer(b, a)] == [Kind.RESULT]
    assert a.data_to_send()[0][4] == Kind.GOODBYE  # the GOODBYE, and no PONG after it
    a.send_result(1, "late")
    a.send_error(1, codec.ErrorInfo("remote", "late"))
    assert a.data_to_send()[0] == b"", "nothing is sent after our GOODBYE"


def _deep(n: int) -> list[object]:
    x: list[object] = []
    for _ in range(n):
        x = [x]
    return x


class _Unencodable:
    pass


@pytest.mark.parametrize(
    ("value", "error_type"),
    [
        (2**70, "OverflowError"),
        (_deep(100_000), "RecursionError"),
        (_Unencodable(), "TypeError"),
        ({"k": [1, 2, 2**64]}, "OverflowError"),
    ],
)
def test_answer_turns_any_encoding_failure_into_one_error(value: object, error_type: str) -> None:
    a, b = pair()
    rid = a.send_invoke(b"c", (), "w")
    transfer(a, b)
    b.send_event(b"before", ())
    b.answer(rid, value)
    b.send_event(b"after", ())
    frames = outgoing(b)  # the buffer parses whole: no half frame was left behind
    assert [f.kind for f in frames] == [Kind.EVENT, Kind.ERROR, Kind.EVENT]
    info = codec.error_decoder.decode(frames[1].body)
    assert (info.code, info.type) == ("remote", error_type)
    assert info.traceback == ""  # tether's encoder frames are nobody's business
    assert frames[1].request_id == rid


def test_answer_with_an_attachment_then_a_failure_leaves_nothing_behind() -> None:
    from tether.shm import Buffer

    a = Connection("main", store=MemfdStore())
    b = Connection("child", store=MemfdStore())
    transfer(a, b)
    transfer(b, a)
    rid = a.send_invoke(b"c", (), "w")
    transfer(a, b)
    fds0 = len(os.listdir("/proc/self/fd"))
    buf = Buffer(100_000)
    b.answer(rid, [buf, 2**70])  # the Buffer became a descriptor, then encoding failed
    assert buf.consumed
    data, fds = b.data_to_send()
    assert fds == [] and len(os.listdir("/proc/self/fd")) == fds0
    (f,) = FrameParser().feed(bytes(data))
    assert f.kind == Kind.ERROR and not f.attachments
    a.abort()
    b.abort()


def _big_error() -> codec.ErrorInfo:
    tb = "".join(f"  File 'h.py', line {i}, in f{i}\n" for i in range(5000)) + "ValueError: boom\n"
    return codec.ErrorInfo("remote", "boom", "ValueError", tb)


def test_an_error_too_large_for_the_peer_keeps_the_end_of_its_traceback() -> None:
    a = Connection("main")
    b = Connection("child", max_frame_size=4096)
    transfer(a, b)
    transfer(b, a)
    info = _big_error()
    assert len(codec.encoder.encode(info)) > 4096
    a.send_error(1, info)
    a.send_event(b"after", ())
    frames = b.receive_data(bytes(a.data_to_send()[0]))
    assert [f.kind for f in frames] == [Kind.ERROR, Kind.EVENT]
    got = codec.error_decoder.decode(frames[0].body)
    assert (got.code, got.message, got.type) == ("remote", "boom", "ValueError")
    assert 0 < len(got.traceback) < 4096 and got.traceback.endswith("ValueError: boom\n")
    assert info.traceback.endswith(got.traceback)


def test_an_error_whose_message_does_not_fit_becomes_code_and_truncated_message() -> None:
    a = Connection("main")
    b = Connection("child", max_frame_size=4096)
    transfer(a, b)
    transfer(b, a)
    a.send_error(1, codec.ErrorInfo("remote", "é" * 50_000, "X", "tb" * 10_000, "$.x"))
    (f,) = b.receive_data(bytes(a.data_to_send()[0]))
    got = codec.error_decoder.decode(f.body)
    assert got.code == "remote" and got.traceback == "" and got.type == "X"
    assert len(got.message) > 0 and set(got.message) == {"é"}


def test_an_error_with_text_that_cannot_encode_is_still_answered() -> None:
    a, b = pair()
    a.send_error(1, codec.ErrorInfo("remote", "bad \ud800 surrogate"))
    (f,) = b.receive_data(bytes(a.data_to_send()[0]))
    assert codec.error_decoder.decode(f.body).code == "remote"


def test_max_frame_size_has_a_floor() -> None:
    with pytest.raises(ValueError, match="at least 4096"):
        Connection("main", max_frame_size=4095)
    b = Connection("child")
    with pytest.raises(ProtocolError, match="floor"):
        b.receive_data(hello_bytes(max_frame_size=200))
    assert b.state is State.CLOSED


def test_a_hello_that_would_not_fit_the_floor_is_refused() -> None:
    with pytest.raises(ValueError, match="HELLO"):
        Connection("main", name="n" * 5000)


def test_abort_closes_the_core_and_drops_what_is_queued() -> None:
    a, _ = pair()
    a.send_invoke(b"c", (), "w")
    a.abort()
    assert a.state is State.CLOSED
    assert a.data_to_send() == (b"", [])
    assert a.receive_data(raw(Kind.PING, rid=1)) == []
    with pytest.raises(ConnectionClosed):
        a.send_event(b"e", ())


def test_a_first_frame_larger_than_any_hello_is_refused_before_allocating() -> None:
    conn = Connection("main")
    head = (5000).to_bytes(4, "little")  # no HELLO is this large
    with pytest.raises(ProtocolError, match="limit of 4096"):
        conn.receive_data(head + bytes(16))
    assert conn.state is State.CLOSED


# -- found by the hostile-peer review ---------------------------------------------------


def test_a_deeply_nested_hello_is_a_protocol_error() -> None:
    conn = Connection("main")
    enc = codec.encoder.encode
    # an unknown key whose value nests 3,000 arrays deep: msgspec's depth guard
    body = b"\x82" + enc("protocol") + enc("tether") + enc("x") + b"\x91" * 3_000 + b"\xc0"
    with pytest.raises(ProtocolError, match="malformed HELLO"):
        conn.receive_data(raw(Kind.HELLO, body=body))
    assert conn.state is State.CLOSED


@pytest.mark.parametrize("limit", [-1, -4096, 100])
def test_a_hello_with_a_negative_or_tiny_frame_limit_is_refused(limit: int) -> None:
    conn = Connection("main")
    with pytest.raises(ProtocolError, match="max_frame_size"):
        conn.receive_data(hello_bytes(max_frame_size=limit))


def test_a_ping_flood_nobody_reads_is_a_protocol_error() -> None:
    conn = Connection("main")
    conn.receive_data(hello_bytes())
    conn.data_to_send()
    pings = b"".join(raw(Kind.PING, rid=i) for i in range(4000))
    conn.receive_data(pings)  # 4,000 PONGs queued: within the bound
    with pytest.raises(ProtocolError, match="does not read"):
        conn.receive_data(pings)  # the I/O layer took none of them
    assert conn.state is State.CLOSED


def test_pongs_taken_as_they_come_are_never_too_many() -> None:
    conn = Connection("main")
    conn.receive_data(hello_bytes())
    conn.data_to_send()  # our HELLO
    for _ in range(5):
        conn.receive_data(b"".join(raw(Kind.PING, rid=i) for i in range(4000)))
        assert len(outgoing(conn)) == 4000


def test_garbage_after_a_goodbye_in_the_same_read_is_ignored() -> None:
    conn = Connection("main")
    conn.receive_data(hello_bytes())
    frames = conn.receive_data(raw(Kind.GOODBYE) + b"\xff" * 40)
    assert [f.kind for f in frames] == [Kind.GOODBYE]
    assert conn.receive_data(b"\xff" * 40) == []


def test_abort_frees_a_partial_frame_at_once() -> None:
    conn = Connection("main")
    conn.receive_data(hello_bytes())
    head = (10_000_000).to_bytes(4, "little")
    conn.receive_data(head + bytes(1_000_000))
    assert conn.buffered_in > 1_000_000
    conn.abort()
    assert conn.buffered_in == 0
