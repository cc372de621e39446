"""Connections whose bodies are JSON (``encoding="json"``, a page's): docs/protocol.md, 2 and 6.

Driven against each other and against hand-made frames, with no sockets.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import msgspec
import pytest

from tether import codec
from tether.attachments import MemfdStore
from tether.errors import BadRequest, ProtocolError, RemoteError
from tether.protocol import Connection, State
from tether.registry import Registry
from tether.results import decode_error, decode_result
from tether.shm import Buffer
from tether.wire import ATT, HEADER, Frame, FrameParser, Kind, encode_frame


def raw(kind: int, rid: int = 0, channel: bytes = b"", body: bytes = b"") -> bytes:
    out = bytearray()
    encode_frame(out, kind, rid, 0, channel, body)
    return bytes(out)


def page_hello(**fields: Any) -> bytes:
    hello = {"protocol": "tether", "version": 1, "role": "page", "encoding": "json", **fields}
    return raw(Kind.HELLO, body=json.dumps(hello).encode())


def sent(conn: Connection) -> list[Frame]:
    return FrameParser().feed(bytes(conn.data_to_send()[0]))


def opened() -> Connection:
    """main's side of a JSON connection, the page's HELLO taken."""
    main = Connection("main", name="web", encoding="json")
    assert main.receive_data(page_hello()) == []
    assert main.state is State.OPEN
    main.data_to_send()  # its own HELLO
    return main


def test_hello_is_json_and_says_so() -> None:
    main = Connection("main", name="web@ws://127.0.0.1:1", pid=7, encoding="json")
    (hello,) = sent(main)
    assert hello.kind == Kind.HELLO
    assert json.loads(bytes(hello.body)) == {
        "protocol": "tether",
        "version": 1,
        "role": "main",
        "name": "web@ws://127.0.0.1:1",
        "pid": 7,
        "max_frame_size": 67108864,
        "encoding": "json",
    }


def test_msgpack_hello_is_unchanged() -> None:
    """No ``encoding`` key on a MessagePack connection: its HELLO is byte for byte as before."""
    (hello,) = sent(Connection("main", name="renderer", pid=4241))
    assert b"encoding" not in bytes(hello.body)
    assert codec.hello_decoder.decode(hello.body).encoding == ""


@pytest.mark.parametrize(
    "hello",
    [
        page_hello(encoding=None),  # no encoding: a MessagePack peer's word
        page_hello(encoding="msgpack"),
        raw(Kind.HELLO, body=msgspec.msgpack.encode({"protocol": "tether", "version": 1})),
        raw(Kind.HELLO, body=b"{not json"),
        page_hello(version=2),
    ],
    ids=["none", "msgpack", "msgpack-body", "not-json", "version"],
)
def test_hello_of_another_encoding_is_a_protocol_error(hello: bytes) -> None:
    main = Connection("main", encoding="json")
    with pytest.raises(ProtocolError):
        main.receive_data(hello)
    assert main.state is State.CLOSED


def test_msgpack_connection_refuses_a_json_peer() -> None:
    main = Connection("main")
    with pytest.raises(ProtocolError):
        main.receive_data(page_hello())
    main = Connection("main")
    body = codec.encoder.encode(codec.Hello("tether", 1, encoding="json"))
    with pytest.raises(ProtocolError, match="json"):
        main.receive_data(raw(Kind.HELLO, body=body))


def test_bodies_reach_the_application_as_msgpack() -> None:
    """So the registry validates a page's arguments as anyone's (no second decoder)."""
    main = opened()
    reg = Registry()

    def add(call: Any, a: int, b: float) -> float:
        return a + b

    reg.handle("add", add, roles="web")
    (f,) = main.receive_data(raw(Kind.INVOKE, 1, b"add", b"[1, 2]"))
    assert msgspec.msgpack.decode(f.body) == [1, 2]
    _, args = reg.resolve(f, "web", local=False)  # type: ignore[misc]
    assert args == (1, 2.0)
    (f,) = main.receive_data(raw(Kind.INVOKE, 2, b"add", b'[1, "x"]'))
    err = reg.resolve(f, "web", local=False)
    assert isinstance(err, codec.ErrorInfo) and (err.code, err.path) == ("bad_request", "b")


@pytest.mark.parametrize("body", [b"[1,", b"\xff\xfe", b"", b"[1e999999999]", b"[" * 10000])
def test_malformed_json_reads_as_a_malformed_body(body: bytes) -> None:
    main = opened()
    reg = Registry()
    reg.handle("f", lambda call, *a: None, roles="web")
    (f,) = main.receive_data(raw(Kind.INVOKE, 1, b"f", body))
    err = reg.resolve(f, "web", local=False)
    assert isinstance(err, codec.ErrorInfo) and err.code == "bad_request"
    assert main.state is State.OPEN


def test_integer_beyond_64_bits_is_malformed() -> None:
    main = opened()
    (f,) = main.receive_data(raw(Kind.INVOKE, 1, b"f", b"[123456789012345678901234567890]"))
    with pytest.raises(msgspec.DecodeError):
        msgspec.msgpack.decode(f.body)


def test_results_errors_and_goodbye_from_a_json_peer() -> None:
    main = opened()
    fut = object()
    rid = main.send_invoke(b"page.title", (), fut)
    (f,) = main.receive_data(raw(Kind.RESULT, rid, body=b'{"title": "tab", "n": [1, 2.5, null]}'))
    assert decode_result(f, Any) == {"title": "tab", "n": [1, 2.5, None]}
    (f,) = main.receive_data(raw(Kind.RESULT, rid, body=b"{bad"))
    with pytest.raises(ProtocolError):
        decode_result(f, Any)
    (f,) = main.receive_data(raw(Kind.RESULT, rid, body=b'"text"'))
    with pytest.raises(BadRequest):
        decode_result(f, int)
    body = b'{"code": "remote", "message": "no", "type": "TypeError", "traceback": "at x"}'
    (f,) = main.receive_data(raw(Kind.ERROR, rid, body=body))
    exc = decode_error(f)
    assert isinstance(exc, RemoteError)
    assert (exc.type_name, exc.remote_traceback) == ("TypeError", "at x")
    (f,) = main.receive_data(raw(Kind.GOODBYE, body=b'{"reason": "tab closed"}'))
    assert main.goodbye_reason == "tab closed"


def test_main_writes_json_bodies() -> None:
    main = opened()
    np = pytest.importorskip("numpy")
    buf = Buffer(4)
    buf.view()[:] = b"abcd"
    main.send_event(b"data", (b"\x00\x01", bytes(70000), np.arange(3, dtype="<i4"), buf))
    main.send_result(5, {"ok": True, "blob": bytes(70000)})
    main.send_error(6, codec.ErrorInfo("forbidden", "not for pages"))
    main.send_goodbye("main closing")
    event, result, error, goodbye = sent(main)
    assert not event.attachments and not result.attachments
    args = json.loads(bytes(event.body))
    assert args[0] == "AAE=" and len(args[1]) == 93336 and args[2] == [0, 1, 2]
    assert args[3] == "YWJjZA=="
    assert json.loads(bytes(result.body))["ok"] is True
    assert json.loads(bytes(error.body)) == {"code": "forbidden", "message": "not for pages"}
    assert json.loads(bytes(goodbye.body)) == {"reason": "main closing"}


def test_what_json_cannot_carry_is_refused_at_the_sender() -> None:
    main = opened()
    with pytest.raises(TypeError):
        main.send_event(b"x", (object(),))
    assert sent(main) == []


def test_attachments_on_a_json_connection_are_a_protocol_error() -> None:
    main = opened()
    body = b"[1]"
    size = 16 + 1 + ATT.size + len(body) + 3
    frame = HEADER.pack(size, Kind.INVOKE, 0, 1, 1, 0, 1, 0) + b"f"
    frame += ATT.pack(0, 0, 0, 0, 3) + body + b"abc"
    with pytest.raises(ProtocolError, match="attachments"):
        main.receive_data(frame)


def test_json_connection_takes_no_store_secret_or_pickle() -> None:
    with pytest.raises(ValueError):
        Connection("main", encoding="json", store=MemfdStore())
    with pytest.raises(ValueError):
        Connection("main", encoding="json", secret=b"0123456789abcdef")
    with pytest.raises(ValueError):
        Connection("main", encoding="json", pickle=True)
    with pytest.raises(ValueError, match="encoding"):
        Connection("main", encoding="cbor")


DOC = (Path(__file__).parent.parent / "docs" / "protocol.md").read_text(encoding="utf-8")
JSON_BLOCKS = {
    name: bytes.fromhex(" ".join(body.split()))
    for name, body in re.findall(r"^```hex-json name=([\w-]+)\n(.*?)^```", DOC, re.M | re.S)
}


def test_json_worked_example_matches_the_python_main() -> None:
    """docs/protocol.md 12.8: main reads the page's blocks, answers with the documented RESULT."""
    assert set(JSON_BLOCKS) == {"page-hello", "page-invoke", "page-result"}
    main = Connection("main", name="web", encoding="json")
    main.data_to_send()
    frames = main.receive_data(JSON_BLOCKS["page-hello"] + JSON_BLOCKS["page-invoke"])
    assert main.peer_hello == codec.Hello(
        "tether", 1, role="page", max_frame_size=64 << 20, encoding="json"
    )
    (invoke,) = frames
    assert (invoke.kind, invoke.request_id, invoke.channel) == (
        Kind.INVOKE,
        1,
        "message-from-renderer",
    )
    assert msgspec.msgpack.decode(invoke.body) == ["Hola, mundo!"]
    main.send_result(1, "Received: Hola, mundo!")
    assert bytes(main.data_to_send()[0]) == JSON_BLOCKS["page-result"]
