"""The route state of the sans-I/O core (tether.routes), driven with no sockets.

Two :class:`~tether.protocol.Connection` objects talk to each other; the
test plays the I/O layer: it calls the :class:`~tether.routes.RouteTable`
methods where a peer dispatches ROUTE_OPEN/ROUTE_CLOSE.
"""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tether import codec
from tether.errors import Busy, ConnectionClosed, ProtocolError
from tether.protocol import Connection, State
from tether.routes import HOST_BIT, MAX_ROUTES, RouteTable
from tether.wire import Frame, FrameParser, Kind, encode_frame


def pair() -> tuple[Connection, Connection]:
    a = Connection("main", name="A")
    b = Connection("child", name="B")
    b.receive_data(bytes(a.data_to_send()[0]))
    a.receive_data(bytes(b.data_to_send()[0]))
    assert a.state is State.OPEN and b.state is State.OPEN
    return a, b


def transfer(src: Connection, dst: Connection) -> list[Frame]:
    return dst.receive_data(bytes(src.data_to_send()[0]))


def outgoing(conn: Connection) -> list[Frame]:
    return FrameParser().feed(bytes(conn.data_to_send()[0]))


def raw(kind: int, rid: int = 0, route: int = 0, channel: bytes = b"", body: bytes = b"") -> bytes:
    out = bytearray()
    encode_frame(out, kind, rid, route, channel, body)
    return bytes(out)


def host_dispatch(conn: Connection, f: Frame, obj: object = "host") -> codec.ErrorInfo | None:
    """What a peer does with a ROUTE_OPEN: accept, make the host, answer."""
    table = conn.route_table()
    refusal = table.accept(f.route_id)
    if refusal is not None:
        conn.send_error(f.request_id, refusal)
        return refusal
    table.add(f.route_id, obj)
    conn.answer(f.request_id, None)
    return None


def test_route_open_frame_and_answer() -> None:
    a, b = pair()
    ta = a.route_table()
    rid, key = ta.open(b"counter", (5,), "waiter", "route-obj")
    assert key == 1 | HOST_BIT  # the host's frames on route 1 carry the host bit
    assert a.pending[rid] == "waiter"
    (f,) = transfer(a, b)
    assert (f.kind, f.request_id, f.route_id, f.channel) == (Kind.ROUTE_OPEN, rid, 1, "counter")
    assert codec.any_decoder.decode(f.body) == [5]
    assert host_dispatch(b, f) is None
    (ans,) = transfer(b, a)
    assert ans.kind == Kind.RESULT and a.take_pending(ans.request_id) == "waiter"
    # Frames each way carry the id as the receiver keys it.
    a.send_event(b"inc", (1,), route_id=key ^ HOST_BIT)
    (ev,) = transfer(a, b)
    assert ev.route_id == 1 and b.route_table().routes[ev.route_id] == "host"
    b.send_event(b"changed", (6,), route_id=1 ^ HOST_BIT)
    (ev2,) = transfer(b, a)
    assert ev2.route_id == key and ta.routes[ev2.route_id] == "route-obj"


def test_ids_count_up_and_skip_ids_still_in_use() -> None:
    a, b = pair()
    ta = a.route_table()
    keys = [ta.open(b"k", (), None, i)[1] for i in range(3)]
    assert [k & ~HOST_BIT for k in keys] == [1, 2, 3]
    ta._next = 0x7FFFFFFF - 1  # near the top: wraps to 1, which is in use
    assert ta.open(b"k", (), None, "x")[1] & ~HOST_BIT == 0x7FFFFFFF
    assert ta.open(b"k", (), None, "y")[1] & ~HOST_BIT == 4
    transfer(a, b)


def test_close_handshake_frees_the_id_on_both_sides() -> None:
    a, b = pair()
    ta, tb = a.route_table(), b.route_table()
    _, key = ta.open(b"k", (), None, "r")
    (f,) = transfer(a, b)
    host_dispatch(b, f)
    transfer(b, a)
    assert ta.close(key) is True
    assert ta.close(key) is False  # once
    assert key not in ta.routes and key in ta.closing
    (c,) = transfer(a, b)
    assert (c.kind, c.route_id) == (Kind.ROUTE_CLOSE, 1)
    assert tb.closed_by_peer(c.route_id) == "host"  # the I/O layer closes this host
    assert tb.hosted == 0 and not tb.routes
    (answer,) = transfer(b, a)
    assert (answer.kind, answer.route_id) == (Kind.ROUTE_CLOSE, key)
    assert ta.closed_by_peer(answer.route_id) is None
    assert not ta.closing  # both ROUTE_CLOSEs through: the id is free
    assert outgoing(a) == []  # an answer is never answered


def test_both_sides_close_at_once() -> None:
    a, b = pair()
    ta, tb = a.route_table(), b.route_table()
    _, key = ta.open(b"k", (), None, "r")
    host_dispatch(b, transfer(a, b)[0])
    transfer(b, a)
    ta.close(key)
    tb.close(1)
    (ca,) = transfer(a, b)
    (cb,) = transfer(b, a)
    assert tb.closed_by_peer(ca.route_id) is None
    assert ta.closed_by_peer(cb.route_id) is None
    assert outgoing(a) == [] and outgoing(b) == []
    assert not ta.closing and not tb.closing and not ta.routes and not tb.routes


def test_host_answers_a_close_for_an_id_it_does_not_know() -> None:
    """An opener that gave up on an open sends ROUTE_CLOSE; a host that refused it answers."""
    a, b = pair()
    ta, tb = a.route_table(), b.route_table()
    rid, key = ta.open(b"nope", (), "w", "r")
    f = transfer(a, b)[0]
    a.take_pending(rid)  # the opener gives up (timeout) ...
    ta.close(key)  # ... and closes the id it may have been given
    tb.max_routes = 0  # the host refuses the open
    assert host_dispatch(b, f) is not None
    (c,) = transfer(a, b)
    assert tb.closed_by_peer(c.route_id) is None
    refusal, answer = transfer(b, a)
    assert refusal.kind == Kind.ERROR
    assert (answer.kind, answer.route_id) == (Kind.ROUTE_CLOSE, key)
    assert ta.closed_by_peer(answer.route_id) is None and not ta.closing
    # An opener ignores a ROUTE_CLOSE for an id it never opened: no ping-pong.
    assert ta.closed_by_peer(77 | HOST_BIT) is None
    assert outgoing(a) == []


def test_refused_open_frees_the_id_without_a_close() -> None:
    a, b = pair()
    ta = a.route_table()
    _rid, key = ta.open(b"k", (), "w", "r")
    ta.refused(key)
    assert key not in ta.routes
    assert ta.open(b"k", (), "w", "r2")[1] == 2 | HOST_BIT  # counts on: never reuses at once
    transfer(a, b)


def test_the_cap_refuses_opens_past_it() -> None:
    a, b = pair()
    tb = b.route_table()
    assert tb.max_routes == MAX_ROUTES == 255
    tb.max_routes = 2
    for n in (1, 2):
        assert tb.accept(n) is None
        tb.add(n, f"host{n}")
    info = tb.accept(3)
    assert info is not None and info.code == "busy"
    assert "2 routes are open on this connection already (max_routes)" in info.message
    # Closing one makes room.
    tb.close(1)
    assert tb.accept(3) is None
    # The opener's own cap: nothing is sent past it.
    ta = a.route_table()
    ta.max_routes = 1
    ta.open(b"k", (), None, "r")
    before = a.buffered_out
    with pytest.raises(Busy, match="1 routes opened to this peer already"):
        ta.open(b"k", (), None, "r2")
    assert a.buffered_out == before


@pytest.mark.parametrize("route_id", [0, HOST_BIT | 5])
def test_route_open_with_an_invalid_id_is_a_protocol_error(route_id: int) -> None:
    _, b = pair()
    with pytest.raises(ProtocolError, match=r"must be 1\.\.2"):
        b.route_table().accept(route_id)


def test_route_open_of_an_id_in_use_is_a_protocol_error() -> None:
    _, b = pair()
    tb = b.route_table()
    tb.add(4, "h")
    with pytest.raises(ProtocolError, match="still in use"):
        tb.accept(4)
    tb.close(4)  # closing, not yet acknowledged: still in use
    with pytest.raises(ProtocolError, match="still in use"):
        tb.accept(4)
    tb.closed_by_peer(4)
    assert tb.accept(4) is None


def test_connection_loss_drops_every_route() -> None:
    a, b = pair()
    ta = a.route_table()
    ta.open(b"k", (), None, "first")
    ta.open(b"k", (), None, "second")
    tb = b.route_table()
    tb.add(9, "hosted")
    ta.close(1 | HOST_BIT)
    a.abort()
    assert ta.drop_all() == ["second"]
    assert not ta.routes and not ta.closing
    assert tb.drop_all() == ["hosted"] and tb.hosted == 0


def test_nothing_is_sent_once_the_connection_is_closing() -> None:
    _a, b = pair()
    tb = b.route_table()
    tb.add(3, "h")
    b.send_goodbye("bye")
    outgoing(b)
    assert tb.close(3) is True  # forgotten ...
    assert outgoing(b) == [] and not tb.closing  # ... and nothing follows the GOODBYE
    with pytest.raises(ConnectionClosed):
        b.route_table().open(b"k", (), None, "r")


def test_route_closes_are_bounded_like_pongs() -> None:
    """A peer that floods ROUTE_CLOSEs for unknown ids and never reads the answers is dropped."""
    _, b = pair()
    tb = b.route_table()
    with pytest.raises(ProtocolError, match="PONG/ROUTE_CLOSE replies queued"):
        for n in range(1, 10_000):
            tb.closed_by_peer(n)


def test_table_is_made_on_first_use() -> None:
    a, _ = pair()
    assert a.routes is None
    assert isinstance(a.route_table(), RouteTable) and a.route_table() is a.routes


# -- random interleavings ------------------------------------------------------------

_OPS = st.lists(
    st.tuples(
        st.sampled_from(["open", "close", "deliver", "refuse-next"]),
        st.booleans(),  # which side acts (True: a)
        st.integers(0, 7),  # which of its routes / how many frames
    ),
    max_size=60,
)


class _Side:
    """One end, played as an I/O layer would: open, close, dispatch route frames."""

    def __init__(self, conn: Connection, name: str) -> None:
        self.conn = conn
        self.name = name
        self.table = conn.route_table()
        self.table.max_routes = 4
        #: request id -> key and object of an open awaiting its answer
        self.opening: dict[int, tuple[int, str]] = {}
        self.ended: list[str] = []  # route objects ended here, each must end once
        self.refuse = False
        self.n = 0
        self.made: set[str] = set()  # route objects made here (opened or hosted)
        self.refused: set[str] = set()  # opened here and refused by the peer

    def open(self) -> None:
        self.n += 1
        try:
            rid, key = self.table.open(b"k", (), None, f"{self.name}-opened-{self.n}")
        except Busy:
            return
        self.made.add(f"{self.name}-opened-{self.n}")
        self.opening[rid] = (key, f"{self.name}-opened-{self.n}")

    def close(self, i: int) -> None:
        keys = sorted(self.table.routes)
        if keys:
            key = keys[i % len(keys)]
            obj = self.table.routes[key]
            if self.table.close(key):
                self.ended.append(obj)

    def dispatch(self, f: Frame) -> None:
        if f.kind == Kind.ROUTE_OPEN:
            if self.refuse:
                self.refuse = False
                self.conn.send_error(f.request_id, codec.ErrorInfo("no_handler", "refused"))
                return
            obj = f"{self.name}-hosted-{f.route_id}-{f.request_id}"
            if host_dispatch(self.conn, f, obj) is None:
                self.made.add(obj)
        elif f.kind == Kind.ROUTE_CLOSE:
            obj = self.table.closed_by_peer(f.route_id)
            if obj is not None:
                self.ended.append(obj)
        elif f.kind == Kind.ERROR and f.request_id in self.opening:
            key, obj = self.opening.pop(f.request_id)
            self.table.refused(key)
            self.refused.add(obj)
        elif f.kind == Kind.RESULT:
            self.opening.pop(f.request_id, None)


@settings(max_examples=300, deadline=None)
@given(_OPS)
def test_random_opens_and_closes_converge(ops: list[tuple[str, bool, int]]) -> None:
    """Whatever both sides do, in whatever order frames cross, every route ends once per
    side, no id is in use twice, and once all frames are through both tables are empty."""
    a, b = pair()
    sa, sb = _Side(a, "a"), _Side(b, "b")
    # bytes written by each side and not yet read by the other, frame by frame
    wire: dict[str, list[bytes]] = {"a": [], "b": []}

    def pump(side: _Side) -> None:
        data = bytes(side.conn.data_to_send()[0])
        if data:
            wire[side.name].append(data)

    def deliver(src: _Side, dst: _Side, n: int) -> None:
        for _ in range(n):
            if not wire[src.name]:
                return
            for f in dst.conn.receive_data(wire[src.name].pop(0)):
                dst.dispatch(f)
            pump(dst)

    for op, on_a, k in ops:
        me, other = (sa, sb) if on_a else (sb, sa)
        if op == "open":
            me.open()
        elif op == "close":
            me.close(k)
        elif op == "refuse-next":
            me.refuse = True
        else:
            deliver(other, me, k)
        pump(me)
        # ids in use are unique per space, and the cap holds
        assert me.table.hosted <= me.table.max_routes
        assert not set(me.table.routes) & me.table.closing
    for _ in range(200):  # everything still on the wire goes through
        if not wire["a"] and not wire["b"]:
            break
        deliver(sa, sb, 1)
        deliver(sb, sa, 1)
    for s in (sa, sb):  # close what is still open; the peer answers; the ids go
        for key in list(s.table.routes):
            s.ended.append(s.table.routes[key])
            s.table.close(key)
        pump(s)
    for _ in range(200):
        if not wire["a"] and not wire["b"]:
            break
        deliver(sa, sb, 1)
        deliver(sb, sa, 1)
    for s in (sa, sb):
        assert not s.table.routes and not s.table.closing and s.table.hosted == 0
        assert len(s.ended) == len(set(s.ended)), "a route ended twice"
    for s in (sa, sb):
        # every route hosted here ended here; so did every one opened here that the
        # peer did not refuse (one closed while opening, then refused, ends once too)
        ended = set(s.ended)
        assert ended <= s.made
        assert s.made - s.refused <= ended
