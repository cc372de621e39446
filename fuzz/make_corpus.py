"""Write the seed corpora of the atheris harnesses: ``fuzz/corpus/<harness>/<seed name>``.

Every seed is a valid input, so a run starts from frames that get past the
header checks instead of discovering them byte by byte::

    python fuzz/make_corpus.py            # rewrite fuzz/corpus/ (the files are committed)
    python fuzz/make_corpus.py OUT_DIR    # write them elsewhere

``fuzz_protocol`` seeds cover every frame kind, inline attachments, a HELLO
with each feature, an ERROR of each code and GOODBYE, fed whole and in small
reads, to a bare parser, an OPEN connection, one in the handshake and one that
then sees EOF (the harness's first byte picks which, see fuzz/fuzz_protocol.py).
``fuzz_registry`` seeds give each handler of fuzz/fuzz_registry.py arguments
that resolve, the same for its admin-only twin (``forbidden``) and a channel
nobody handles. ``make fuzz`` runs each harness from these; tests/test_fuzz.py
checks that the committed files are what this script writes.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import msgspec

from tether.codec import EXT_BYTES, EXT_NDARRAY, ErrorInfo, Goodbye, Hello, encoder
from tether.wire import Kind, encode_frame

CORPUS = Path(__file__).resolve().parent / "corpus"

# --- fuzz_protocol ------------------------------------------------------------------------

# The harness's first byte: bits 0-1 the target, bits 3-7 the read size (0 = one read).
PARSER, OPEN, HANDSHAKE, OPEN_EOF = 0, 1, 2, 3
FEATURES: list[list[str]] = [[], ["fd"], ["lease"], ["fd", "lease"], ["fd", "lease", "future"]]
ERROR_CODES = ["remote", "no_handler", "forbidden", "bad_request", "too_large", "cancelled"]


def _frame(
    kind: int,
    body: bytes = b"",
    *,
    rid: int = 0,
    route: int = 0,
    channel: bytes = b"",
    atts: list[bytes] | None = None,
) -> bytes:
    out = bytearray()
    encode_frame(out, kind, rid, route, channel, body, atts or [])
    return bytes(out)


def _ref(index: int) -> msgspec.msgpack.Ext:
    return msgspec.msgpack.Ext(EXT_BYTES, index.to_bytes(4, "little"))


def _array_ref(index: int, dtype: str, shape: list[int]) -> msgspec.msgpack.Ext:
    return msgspec.msgpack.Ext(EXT_NDARRAY, encoder.encode([index, dtype, shape]))


def hello(features: list[str], role: str = "main", **extra: Any) -> bytes:
    """A HELLO frame as a peer (by default main) sends it."""
    msg = Hello(protocol="tether", version=1, role=role, name="seed", features=features, **extra)
    return _frame(Kind.HELLO, encoder.encode(msg))


def protocol_frames() -> dict[str, bytes]:
    """One or a few valid frames per name, every kind and body shape the core decodes."""
    enc = encoder.encode
    return {
        "invoke": _frame(Kind.INVOKE, enc([1, "two", 3.0]), rid=1, channel=b"echo"),
        "invoke_no_args": _frame(Kind.INVOKE, enc([]), rid=2, channel=b"ping"),
        "invoke_kwargs": _frame(Kind.INVOKE, enc([1, {"scale": 2.0}]), rid=3, channel=b"k"),
        "invoke_attachment": _frame(
            Kind.INVOKE, enc([_ref(0)]), rid=4, channel=b"blob", atts=[b"payload" * 9]
        ),
        "invoke_attachments": _frame(
            Kind.INVOKE,
            enc([_ref(0), _ref(1), _array_ref(2, "<i4", [2, 2]), _ref(3)]),
            rid=5,
            channel=b"many",
            atts=[b"a", b"", bytes(16), b"z" * 300],
        ),
        "result": _frame(Kind.RESULT, enc({"ok": [1, 2, None]}), rid=1),
        "result_attachment": _frame(Kind.RESULT, enc(_ref(0)), rid=4, atts=[b"back" * 4]),
        **{
            f"error_{code}": _frame(
                Kind.ERROR,
                enc(ErrorInfo(code=code, message=f"{code} here", type="ValueError", path="x")),
                rid=6,
            )
            for code in ERROR_CODES
        },
        "error_traceback": _frame(
            Kind.ERROR,
            enc(ErrorInfo("remote", "boom", "KeyError", "Traceback (most recent call last):\n")),
            rid=7,
        ),
        "event": _frame(Kind.EVENT, enc(["tick", 1]), channel=b"news"),
        "event_attachment": _frame(
            Kind.EVENT, enc([_ref(0)]), channel=b"frame", atts=[b"\x00\x01" * 32]
        ),
        "cancel": _frame(Kind.CANCEL, rid=1),
        "route_open": _frame(Kind.ROUTE_OPEN, route=5, channel=b"r"),
        "route_close": _frame(Kind.ROUTE_CLOSE, route=5),
        "ping": _frame(Kind.PING, rid=42),
        "pong": _frame(Kind.PONG, rid=42),
        "release": _frame(Kind.RELEASE, rid=9),
        "auth": _frame(Kind.AUTH, bytes(range(32))),  # a (wrong) 32-byte proof
        "stream": _frame(Kind.STREAM, enc(["a b c"]), rid=11, channel=b"tokens"),
        "credit": _frame(Kind.CREDIT, enc(16), rid=11),
        "item": _frame(Kind.ITEM, enc("a"), rid=11),
        "goodbye": _frame(Kind.GOODBYE, enc(Goodbye(reason="done"))),
        "goodbye_empty": _frame(Kind.GOODBYE, enc(Goodbye())),
    }


_STREAMING = ("stream", "credit", "item")


def protocol_seeds() -> dict[str, bytes]:
    """Inputs of fuzz/fuzz_protocol.py: a target byte, then the stream it is fed."""
    frames = protocol_frames()
    # (STREAM, CREDIT, ITEM only after a HELLO with "stream": the open seeds have one)
    session = b"".join(
        frames[k] for k in frames if not k.startswith(("goodbye", "auth")) and k not in _STREAMING
    )
    seeds: dict[str, bytes] = {}
    for name, data in frames.items():
        seeds[f"parser-{name}"] = bytes([PARSER]) + data
        seeds[f"open-{name}"] = bytes([OPEN]) + data
    for features in FEATURES:
        tag = "-".join(features) or "none"
        seeds[f"handshake-hello-{tag}"] = bytes([HANDSHAKE]) + hello(features)
        seeds[f"handshake-hello-{tag}-session"] = bytes([HANDSHAKE]) + hello(features) + session
    seeds["handshake-hello-limits"] = bytes([HANDSHAKE]) + hello(
        ["fd"], pid=4241, max_frame_size=1 << 20
    )
    seeds["handshake-hello-then-goodbye"] = (
        bytes([HANDSHAKE]) + hello([]) + frames["invoke"] + frames["goodbye"]
    )
    for target, label in ((PARSER, "parser"), (OPEN, "open"), (OPEN_EOF, "open-eof")):
        for step in (0, 1, 7):
            seeds[f"{label}-session-read{step}"] = bytes([target | step << 3]) + session
    seeds["open-eof-goodbye"] = bytes([OPEN_EOF]) + frames["goodbye"]
    seeds["open-eof-partial"] = bytes([OPEN_EOF]) + frames["invoke_attachments"][:-3]
    seeds["open-session-then-goodbye"] = bytes([OPEN]) + session + frames["goodbye"]
    seeds["open-stream-session"] = bytes([OPEN]) + b"".join(frames[k] for k in _STREAMING)
    # Recipe mode (bit 2): kind, channel, body, attachment sizes, no corruption (see
    # _frames_from in fuzz/fuzz_protocol.py); one seed per kind the core returns.
    for kind in (Kind.INVOKE, Kind.RESULT, Kind.ERROR, Kind.EVENT, Kind.CANCEL):
        body = encoder.encode([1]) if kind != Kind.ERROR else encoder.encode(ErrorInfo("x", "y"))
        recipe = bytes([kind, 2]) + b"ch" + bytes([len(body)]) + body + bytes([1, 4, 0, 1, 0])
        seeds[f"recipe-{kind.name.lower()}"] = bytes([OPEN | 4]) + recipe
    return seeds


# --- fuzz_registry ------------------------------------------------------------------------

# The harness's second byte: bits 0-1 how the body is made (0 = the raw bytes that
# follow), bits 2-3 the number of attachments (their sizes come first, one byte each).
_ATTACHMENT = bytes(range(256)) * 2  # what the harness attaches: a prefix of this


def registry_arguments() -> dict[str, tuple[list[Any], list[int]]]:
    """Per handler of fuzz/fuzz_registry.py: arguments that resolve, and attachment sizes."""
    return {
        "none": ([], []),
        "int": ([7], []),
        "str_float": (["s", 1.5], []),
        "bool_default": ([True], []),
        "bytes": ([_ref(0)], [16]),
        "memoryview": ([b"inline", _ref(0)], [3]),
        "list": ([[1, 2, 3], {"a": 1.0}], []),
        "tuple": ([[1, "x"], [1, 2], ["a"]], []),
        "optional": ([None, "y"], []),
        "struct": ([{"x": 1, "y": 2.0}, {"type": "Tagged", "name": "t"}, {"w": 2, "h": 3}], []),
        "enum": (["red", 2, "a"], []),
        "typeddict": ([{"depth": 1, "label": "l"}, [1, "b"]], []),
        "ndarray": ([_array_ref(0, "u1", [2, 4])], [8]),
        "any": ([1, [None, {"k": b"v"}]], []),
        "variadic": ([1, 2, 3], []),
        "nested": ([{"p": [{"x": 1}, None]}, [b"a", b""]], []),
        "unresolvable": ([None, 1], []),
    }


def registry_seeds(channels: list[str]) -> dict[str, bytes]:
    """Inputs of fuzz/fuzz_registry.py; ``channels`` is its HANDLERS' order."""
    seeds: dict[str, bytes] = {}
    for name, (args, sizes) in registry_arguments().items():
        index = channels.index(name)
        # Byte 0: the handler (index modulo the channel count; 31 modulo 32 is "no handler"),
        # bit 7 its admin-only twin.
        which = index
        admin = next(b for b in range(128, 256) if b % len(channels) == index and b % 32 != 31)
        how = len(sizes) << 2  # raw body
        data = bytes([how, *sizes]) + encoder.encode(args)
        seeds[f"{name}"] = bytes([which]) + data
        seeds[f"{name}-admin-only"] = bytes([admin]) + data
    seeds["no-handler"] = bytes([31, 0]) + encoder.encode([1])
    # Recipe mode (see value_from in fuzz/fuzz_registry.py), one 8-byte attachment, three
    # values for ``any``: an int, a string, a list of an int and an attachment reference.
    recipe = [3, 2, 4, 5, 2, 12, 2, 2, 1, 8, 0]
    seeds["recipe-values"] = bytes([channels.index("any"), 1 | 1 << 2, 8, *recipe])
    return seeds


def write(out: Path = CORPUS) -> dict[str, int]:
    """Write both corpora under ``out`` (stale seeds removed); returns seeds per harness."""
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import fuzz_registry

    channels = [name for name, _, _ in fuzz_registry.HANDLERS]
    written: dict[str, int] = {}
    for harness, seeds in (
        ("fuzz_protocol", protocol_seeds()),
        ("fuzz_registry", registry_seeds(channels)),
    ):
        directory = out / harness
        directory.mkdir(parents=True, exist_ok=True)
        for old in directory.iterdir():
            if old.name not in seeds:
                old.unlink()
        for name, data in seeds.items():
            (directory / name).write_bytes(data)
        written[harness] = len(seeds)
    return written


if __name__ == "__main__":
    target = Path(sys.argv[1]) if len(sys.argv) > 1 else CORPUS
    for harness, n in write(target).items():
        print(f"{target / harness}: {n} seeds")
