"""The ``tether`` command: ``demo``, ``call``, ``types``, ``trace`` and ``bench``.

Exit codes: 0 on success, 1 when the operation failed (a tether error, a
failed demo), 2 for a usage error (bad arguments, malformed address).
"""

from __future__ import annotations

import argparse
import base64
import binascii
import importlib
import logging
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import msgspec

from . import __version__
from .errors import NoHandler, TetherError
from .wire import DEFAULT_MAX_FRAME_SIZE

__all__ = ["main", "parse_arg", "parse_call_arg"]

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2


def parse_arg(text: str) -> Any:
    """One command-line argument as a call argument: JSON if it parses, else the plain string."""
    try:
        return msgspec.json.decode(text)
    except msgspec.DecodeError:
        return text


def parse_call_arg(text: str) -> Any:
    """A ``tether call`` argument: ``b64:DATA`` and ``@FILE`` are bytes, else :func:`parse_arg`.

    ``@-`` reads standard input. A string that starts with ``@`` or ``b64:``
    is passed as JSON: ``'"@home"'``.

    Raises:
        ValueError: ``b64:`` data that is not base64, or a file that cannot be read
            (the message names it).
    """
    if text.startswith("b64:"):
        try:
            return base64.b64decode(text[4:], validate=True)
        except binascii.Error as exc:
            raise ValueError(f"{text[:20]!r}...: not base64 ({exc})") from None
    if text.startswith("@"):
        if text == "@-":
            data = sys.stdin.buffer.read(_MAX_ARG + 1)
        else:
            try:
                with open(text[1:], "rb") as f:  # bounded: /dev/zero must not fill memory
                    data = f.read(_MAX_ARG + 1)
            except OSError as exc:
                raise ValueError(f"cannot read {text[1:]!r}: {exc.strerror or exc}") from None
        if len(data) > _MAX_ARG:
            raise ValueError(
                f"{text[1:] if text != '@-' else 'standard input'!r} is larger than "
                f"{_MAX_ARG >> 20} MiB, the most one frame carries"
            )
        return data
    return parse_arg(text)


#: the most bytes one ``@FILE`` argument may hold (the default frame limit)
_MAX_ARG = DEFAULT_MAX_FRAME_SIZE


def _has_bytes(value: Any, depth: int = 0) -> bool:
    """Whether ``value`` holds bytes anywhere (JSON shows them as base64)."""
    if isinstance(value, bytes | bytearray | memoryview):
        return True
    if depth > 32:
        return False
    if isinstance(value, dict):
        return any(_has_bytes(v, depth + 1) for v in value.values())
    if isinstance(value, list | tuple):
        return any(_has_bytes(v, depth + 1) for v in value)
    return False


def _secret(ns: argparse.Namespace) -> bytes | None:
    """The shared secret from ``--secret`` (text, or ``b64:``) or ``--secret-file`` (its bytes)."""
    if ns.secret_file is not None:
        return Path(ns.secret_file).read_bytes()
    if ns.secret is None:
        return None
    if ns.secret.startswith("b64:"):
        return base64.b64decode(ns.secret[4:], validate=True)
    return str(ns.secret).encode()


def _build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="tether",
        description="Inter-process communication for Python: pipes, child processes, channels.",
    )
    parser.add_argument("--version", action="version", version=f"tether {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    demo = sub.add_parser(
        "demo",
        help=(
            "run the scenarios tether grew from (a pipe across fork(), Electron's "
            "main/renderer IPC, Chromium's WebSocket broker) end to end"
        ),
    )
    demo.add_argument(
        "--web",
        action="store_true",
        help="serve the Electron example's page to a browser until interrupted",
    )
    demo.add_argument(
        "--trace",
        metavar="FILE",
        help="write a Chrome trace-event timeline of every process's frames to FILE",
    )
    call = sub.add_parser(
        "call",
        help="invoke a channel on a listening main, print the JSON result (--list: its channels)",
        description=(
            "Invoke CHANNEL on the main listening at ADDRESS and print the result as JSON, "
            "or, with --list, print the channels this caller may reach. "
            "Each ARG is parsed as JSON; one that is not valid JSON is passed as a string; "
            "b64:DATA is bytes (base64) and @FILE the bytes of FILE (@- reads stdin); "
            'pass a string starting with @ or b64: as JSON ("@x"). '
            "Bytes in the result are printed as base64 strings (a note on stderr says so). "
            "Use -- before arguments that start with a dash."
        ),
    )
    call.add_argument(
        "address",
        metavar="ADDRESS",
        help="unix:///path, tcp://host:port or nats://host:port/namespace",
    )
    call.add_argument("channel", metavar="CHANNEL", nargs="?", help="the channel to invoke")
    call.add_argument(
        "args", metavar="ARG", nargs="*", help="arguments: JSON, text, b64:DATA or @FILE"
    )
    call.add_argument(
        "--list",
        action="store_true",
        help=(
            "print the channels this caller's role may reach, with argument and result types "
            "(asks the reserved channel tether.channels)"
        ),
    )
    secret = call.add_mutually_exclusive_group()
    secret.add_argument(
        "--secret",
        metavar="TEXT",
        help=(
            "the listener's shared secret (listen(secret=...)): TEXT as UTF-8, or b64:DATA; "
            "other users can see a command line, so prefer --secret-file"
        ),
    )
    secret.add_argument(
        "--secret-file",
        metavar="FILE",
        help="read the shared secret from FILE (its bytes, exactly)",
    )
    call.add_argument(
        "--timeout",
        type=float,
        default=10.0,
        metavar="SECONDS",
        help="how long to wait to connect and for the result (default: 10)",
    )
    types = sub.add_parser(
        "types",
        help="write TypeScript declarations for the channels a Main exposes to pages",
        description=(
            "Import MODULE (a dotted name, or a path to a .py file) and write TypeScript "
            'declarations for the channels ATTR, a tether.Main, exposes to role "web", typed '
            "from the handlers' type hints."
        ),
    )
    types.add_argument("--ts", required=True, metavar="MODULE:ATTR", help="e.g. app:main")
    types.add_argument(
        "-o", "--output", metavar="FILE", help="write to FILE instead of standard output"
    )
    sub.add_parser(
        "trace",
        help="watch a running main's frames live (tether trace ADDRESS), or merge trace files",
        add_help=False,
    )
    sub.add_parser(
        "bench",
        help="benchmark tether against other IPC libraries (arguments go to the benchmark)",
        add_help=False,
    )
    return parser


def _demo(web: bool = False, trace: str | None = None) -> int:
    from . import demo

    return demo.web_main() if web else demo.main(trace=trace)


def _format_channels(channels: Any) -> str:
    """``tether.channels``'s answer as one line per channel: ``add(a: int, b: int) -> int``."""
    lines = []
    for ch in channels:
        params = ", ".join(f"{name}: {kind}" for name, kind in ch.get("params", []))
        if ch.get("kind") == "event":
            lines.append(f"event   {ch['channel']}({params})")
        else:
            lines.append(f"invoke  {ch['channel']}({params}) -> {ch.get('result', 'Any')}")
    return "\n".join(lines) if lines else "(no channels this caller may reach)"


def _call(ns: argparse.Namespace) -> int:
    from . import sync
    from .address import parse_address
    from .introspect import CHANNELS
    from .protocol import check_secret

    address, channel, raw_args, timeout = ns.address, ns.channel, ns.args, ns.timeout
    # The failure is printed once, as "error: ..."; tether's warnings would repeat it.
    logging.getLogger("tether").setLevel(logging.ERROR)
    if timeout <= 0:
        print("error: --timeout must be positive", file=sys.stderr)
        return EXIT_USAGE
    if ns.list:
        if channel is not None:
            print("error: --list takes ADDRESS only (no CHANNEL or ARG)", file=sys.stderr)
            return EXIT_USAGE
        channel = CHANNELS
    elif channel is None:
        print("error: the CHANNEL to invoke is required (or --list)", file=sys.stderr)
        return EXIT_USAGE
    try:
        if address.startswith("nats://"):
            from .nats.link import parse_nats_address

            parse_nats_address(address)  # checked here: a usage error
            addr = address
        else:
            addr = parse_address(address)
        args = [parse_call_arg(a) for a in raw_args]
        secret = _secret(ns)
        if secret is not None and address.startswith("nats://"):
            raise ValueError("--secret is not for nats:// (NATS credentials go in the address)")
        if secret is not None:
            check_secret(secret)
    except (ValueError, TypeError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    try:
        with sync.connect(addr, timeout=timeout, connect_timeout=timeout, secret=secret) as peer:
            if ns.list and isinstance(addr, str):  # nats://: the channels of every listener
                from .nats.blocking import list_channels

                result = list_channels(peer, timeout)  # type: ignore[arg-type]
            else:
                result = peer.invoke(channel, *args)
        if ns.list:
            print(_format_channels(result))
            return EXIT_OK
        text = msgspec.json.encode(result).decode()
    except ImportError as exc:  # a package the address needs (nats-py, nkeys)
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_FAILED
    except TetherError as exc:
        print(f"error: {type(exc).__name__}: {exc}", file=sys.stderr)
        if ns.list and isinstance(exc, NoHandler):
            print(f"(this peer does not answer {CHANNELS}: not a tether main)", file=sys.stderr)
        return EXIT_FAILED
    except (TypeError, msgspec.EncodeError) as exc:  # a result JSON cannot represent
        print(f"error: result is not JSON-encodable: {exc}", file=sys.stderr)
        return EXIT_FAILED
    if _has_bytes(result):
        print("note: bytes in the result are printed as base64 strings", file=sys.stderr)
    print(text)
    return EXIT_OK


def _types(target: str, output: str | None) -> int:
    from .tstypes import load_main, typescript

    try:
        main = load_main(target)
    except (ValueError, ImportError, AttributeError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    text = typescript(main, source=target)
    if output is None:
        sys.stdout.write(text)
    else:
        with open(output, "w", encoding="utf-8") as f:
            f.write(text)
    return EXIT_OK


def _bench(argv: list[str]) -> int:
    """Hand off to ``tether.bench.main(argv)``, imported only now (it pulls in heavy deps)."""
    bench_main: Any = None
    for module_name in ("tether.bench", "tether.bench.__main__"):
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as exc:
            if exc.name is not None and (
                exc.name == module_name or module_name.startswith(exc.name + ".")
            ):
                continue  # this module is absent; a missing dependency inside it is not
            raise
        bench_main = getattr(module, "main", None)
        if callable(bench_main):
            break
    if not callable(bench_main):
        print(
            "error: tether bench is not available in this installation "
            "(the tether.bench package is missing)",
            file=sys.stderr,
        )
        return EXIT_FAILED
    code = bench_main(argv)
    return int(code) if code is not None else EXIT_OK


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``tether`` command; returns the exit code."""
    args_list = list(sys.argv[1:] if argv is None else argv)
    # Everything after "bench" belongs to the benchmark's own parser.
    if args_list[:1] == ["bench"]:
        return _bench(args_list[1:])
    if args_list[:1] == ["trace"]:
        from .trace_cli import main as trace_main

        return trace_main(args_list[1:])
    parser = _build_parser()
    ns = parser.parse_args(args_list)
    if ns.command == "demo":
        return _demo(ns.web, ns.trace)
    if ns.command == "call":
        return _call(ns)
    if ns.command == "types":
        return _types(ns.ts, ns.output)
    parser.print_help(sys.stderr)
    return EXIT_USAGE


if __name__ == "__main__":
    sys.exit(main())
