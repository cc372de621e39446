"""Pickle only between consenting, trusted ends: a main and the child it spawned with
``pickle=True``. Everywhere else a pickle is refused without being unpickled."""

from __future__ import annotations

import fractions
import pickle
from pathlib import Path
from typing import Any

import msgspec
import pytest

import _targets
import tether
from tether import codec
from tether.errors import BadRequest
from tether.protocol import Connection
from tether.wire import Kind, encode_frame


def _pair(a_pickle: bool, b_pickle: bool) -> tuple[Connection, Connection]:
    a = Connection("main", pickle=a_pickle)
    b = Connection("child", pickle=b_pickle)
    b.receive_data(bytes(a.data_to_send()[0]))
    a.receive_data(bytes(b.data_to_send()[0]))
    return a, b


class _Marker:
    """Unpickling this writes a file: proof that someone unpickled it."""

    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self) -> tuple[Any, ...]:
        return (Path(self.path).write_text, ("unpickled",))


@pytest.mark.parametrize(("a", "b"), [(True, True), (True, False), (False, True), (False, False)])
def test_pickle_is_on_only_when_both_ends_opt_in(a: bool, b: bool) -> None:
    ca, cb = _pair(a, b)
    assert ca.pickle is cb.pickle is (a and b)


def test_without_both_opting_in_an_unencodable_object_is_refused() -> None:
    ca, _ = _pair(True, False)
    with pytest.raises(TypeError, match="cannot be sent"):
        ca.send_event(b"e", (fractions.Fraction(1, 3),))


def test_a_pickle_reaching_a_connection_without_pickle_is_never_unpickled(tmp_path: Path) -> None:
    marker = tmp_path / "marker"
    evil = msgspec.msgpack.Ext(codec.EXT_PICKLE, pickle.dumps(_Marker(str(marker))))
    _, receiver = _pair(True, False)  # the sender opted in; the receiver did not
    frame = bytearray()
    encode_frame(frame, Kind.EVENT, 0, 0, b"e", msgspec.msgpack.encode([evil]))
    (f,) = receiver.receive_data(bytes(frame))
    assert not f.pickle

    def h(call: object, x: Any) -> None: ...

    with pytest.raises(BadRequest, match="pickle is not allowed"):
        codec.ArgsSpec(h).decode(f.body, f.attachments, f.pickle)
    assert not marker.exists()


def test_between_consenting_ends_objects_travel_pickled() -> None:
    a, b = _pair(True, True)
    a.send_event(b"e", (fractions.Fraction(1, 3), {1, 2}))
    (f,) = b.receive_data(bytes(a.data_to_send()[0]))
    assert f.pickle

    def h(call: object, x: Any, s: Any) -> None: ...

    assert codec.ArgsSpec(h).decode(f.body, f.attachments, f.pickle) == (
        fractions.Fraction(1, 3),
        [1, 2],  # a set is MessagePack's array: msgspec encodes it, no pickle needed
    )


async def test_a_child_spawned_with_pickle_exchanges_any_object_both_ways() -> None:
    async with tether.Main(timeout=20.0) as main:

        @main.handle("half")
        def half(call: tether.Call, x: Any) -> Any:
            return x / 2

        child = await main.spawn(_targets.pickle_worker, pickle=True)
        assert await child.invoke("echo", fractions.Fraction(2, 3)) == fractions.Fraction(2, 3)
        assert await child.invoke("ask_main") == fractions.Fraction(3, 8)


async def test_a_child_spawned_without_pickle_cannot_send_such_objects() -> None:
    async with tether.Main(timeout=20.0) as main:

        @main.handle("half")
        def half(call: tether.Call, x: Any) -> Any:
            return x / 2

        child = await main.spawn(_targets.pickle_worker)
        with pytest.raises(TypeError, match="cannot be sent"):
            await child.invoke("echo", fractions.Fraction(2, 3))
        with pytest.raises(tether.RemoteError, match="cannot be sent"):
            await child.invoke("ask_main")  # the child could not send its Fraction either
