"""Fuzz the sans-I/O core: only ProtocolError may escape the parser.

Run with atheris (coverage-guided)::

    python fuzz/fuzz_protocol.py -runs=20000
    python fuzz/fuzz_protocol.py -max_total_time=300 .fuzz/fuzz_protocol fuzz/corpus/fuzz_protocol

``make fuzz`` runs the second form (new inputs go to the first directory; the second holds
the committed seeds, written by fuzz/make_corpus.py).

``TestOneInput`` is also driven by ``tests/test_fuzz.py`` without atheris.

The first input byte picks the target and how the rest is cut into reads:

* bits 0-1: 0 = a bare FrameParser (small limit), 1 = an OPEN Connection,
  2 = a Connection still in HANDSHAKE, 3 = an OPEN Connection, then EOF;
* bit 2: 0 = feed the rest as raw bytes; 1 = read the rest as a recipe of
  mostly well-formed frames (see :func:`_frames_from`), so the fuzzer gets
  past the header checks quickly;
* bits 3-7: the read size (1..31 bytes; 0 = everything in one read).

Any exception other than :class:`tether.ProtocolError` is a finding.
"""

from __future__ import annotations

import contextlib
import importlib
import sys
from typing import Any

if __name__ == "__main__":  # coverage-instrument the core before anything imports it
    import atheris

    with atheris.instrument_imports(include=["tether"]):
        for _name in ("tether.wire", "tether.codec", "tether.protocol"):
            importlib.import_module(_name)

import msgspec

from tether import codec
from tether.errors import ProtocolError
from tether.protocol import Connection, State
from tether.wire import FrameParser, Kind, encode_frame

MAX_FRAME = 1 << 16
_RETURNED = frozenset(
    {
        Kind.INVOKE,
        Kind.RESULT,
        Kind.ERROR,
        Kind.EVENT,
        Kind.CANCEL,
        Kind.ROUTE_OPEN,
        Kind.ROUTE_CLOSE,
        Kind.GOODBYE,
    }
    | {Kind.STREAM, Kind.ITEM, Kind.CREDIT}  # with "stream" (our peer's HELLO has it)
)
_PEER_HELLO = bytes(Connection("main", name="fuzz-peer").data_to_send()[0])


def _chunks(data: bytes, step: int) -> list[bytes]:
    if step == 0:
        return [data]
    return [data[i : i + step] for i in range(0, len(data), step)] or [b""]


def _frames_from(recipe: bytes) -> bytes:
    """Turn ``recipe`` into a byte stream of frames, some of them corrupted.

    Per frame: kind byte, channel length byte, channel bytes, body length
    byte, body bytes, attachment count byte, one length byte per attachment,
    then a corruption byte (if non-zero, that offset of the frame is xored).
    """
    out = bytearray()
    pos = 0
    n = len(recipe)

    def take(k: int) -> bytes:
        nonlocal pos
        piece = recipe[pos : pos + k]
        pos += k
        return piece

    def byte() -> int:
        b = take(1)
        return b[0] if b else 0

    while pos < n:
        kind = byte() % 18  # 0 and 17 are invalid kinds (12, 13: not after the handshake)
        channel = take(byte() % 24)
        body = take(byte())
        atts = [b"\xaa" * byte() for _ in range(byte() % 4)]
        corrupt = byte()
        start = len(out)
        encode_frame(out, kind, byte(), byte() % 3, channel, body, atts)
        if corrupt:
            i = start + corrupt % (len(out) - start)
            out[i] ^= byte() or 0xFF
    return bytes(out)


def _touch(frame: object) -> None:
    """Read every field of a frame, as an application would."""
    repr(frame)
    bytes(frame.body)  # type: ignore[attr-defined]
    for a in frame.attachments:  # type: ignore[attr-defined]
        bytes(a)
    assert isinstance(frame.channel, str)  # type: ignore[attr-defined]
    assert 0 <= frame.request_id <= 0xFFFFFFFF  # type: ignore[attr-defined]
    assert 0 <= frame.route_id <= 0xFFFFFFFF  # type: ignore[attr-defined]


def _fuzz_parser(pieces: list[bytes]) -> None:
    parser = FrameParser(MAX_FRAME)
    total = 0
    try:
        for piece in pieces:
            for f in parser.feed(piece):
                assert f.kind in set(Kind)
                _touch(f)
            total += len(piece)
            assert 0 <= parser.buffered <= min(total, MAX_FRAME + 4)
    except ProtocolError:
        pass


def _route_frame(conn: Connection, f: Any) -> None:
    """What an I/O layer does with route frames (tether.routes), the host always accepting."""
    table = conn.route_table()
    if f.kind == Kind.ROUTE_CLOSE:
        table.closed_by_peer(f.route_id)
        return
    try:
        refusal = table.accept(f.route_id)
    except ProtocolError:
        conn.abort()  # as the peer drops one that broke the protocol
        raise
    if refusal is None:
        table.add(f.route_id, f.channel)
        conn.answer(f.request_id, None)
    else:
        conn.send_error(f.request_id, refusal)
    assert table.hosted <= table.max_routes


def _fuzz_connection(pieces: list[bytes], *, open_first: bool, eof: bool) -> None:
    conn = Connection("child", name="fuzz", max_frame_size=MAX_FRAME)
    conn.data_to_send()
    if open_first:
        assert conn.receive_data(_PEER_HELLO) == []
        assert conn.state is State.OPEN
    try:
        for piece in pieces:
            for f in conn.receive_data(piece):
                assert f.kind in _RETURNED, f
                _touch(f)
                if f.kind == Kind.ERROR:
                    # What an I/O layer does with an ERROR body.
                    with contextlib.suppress(msgspec.MsgspecError):
                        codec.error_decoder.decode(f.body)
                elif f.kind in (Kind.ROUTE_OPEN, Kind.ROUTE_CLOSE):
                    _route_frame(conn, f)
            conn.data_to_send()
        if eof:
            conn.receive_eof()
    except ProtocolError:
        assert conn.state is State.CLOSED
        return
    if open_first:
        assert conn.state in (State.OPEN, State.CLOSING, State.CLOSED)


def TestOneInput(data: bytes) -> None:
    if not data:
        return
    mode, step = data[0] & 3, data[0] >> 3
    rest = _frames_from(data[1:]) if data[0] & 4 else data[1:]
    pieces = _chunks(rest, step)
    if mode == 0:
        _fuzz_parser(pieces)
    elif mode == 1:
        _fuzz_connection(pieces, open_first=True, eof=False)
    elif mode == 2:
        _fuzz_connection(pieces, open_first=False, eof=False)
    else:
        _fuzz_connection(pieces, open_first=True, eof=True)


def main() -> None:
    import atheris

    atheris.Setup(sys.argv, TestOneInput)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
