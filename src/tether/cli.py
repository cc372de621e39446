"""The ``tether`` command: ``demo``, ``call``, ``types`` and ``bench``.

Exit codes: 0 on success, 1 when the operation failed (a tether error, a
failed demo), 2 for a usage error (bad arguments, malformed address).
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence
from typing import Any

import msgspec

from . import __version__
from .errors import TetherError

__all__ = ["main", "parse_arg"]

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2


def parse_arg(text: str) -> Any:
    """One command-line argument as a call argument: JSON if it parses, else the plain string."""
    try:
        return msgspec.json.decode(text)
    except msgspec.DecodeError:
        return text


def _build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="tether",
        description="Inter-process communication for Python: pipes, child processes, channels.",
    )
    parser.add_argument("--version", action="version", version=f"tether {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    demo = sub.add_parser("demo", help="run the seed article's IPC scenarios end to end")
    demo.add_argument(
        "--web",
        action="store_true",
        help="serve the Electron example's page to a browser until interrupted",
    )
    call = sub.add_parser(
        "call",
        help="invoke a channel on a listening main and print the JSON result",
        description=(
            "Invoke CHANNEL on the main listening at ADDRESS and print the result as JSON. "
            "Each ARG is parsed as JSON; one that is not valid JSON is passed as a string. "
            "Use -- before arguments that start with a dash."
        ),
    )
    call.add_argument("address", metavar="ADDRESS", help="unix:///path or tcp://host:port")
    call.add_argument("channel", metavar="CHANNEL", help="the channel to invoke")
    call.add_argument("args", metavar="ARG", nargs="*", help="arguments, as JSON")
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
        "bench",
        help="benchmark tether against other IPC libraries (arguments go to the benchmark)",
        add_help=False,
    )
    return parser


def _demo(web: bool = False) -> int:
    from . import demo

    return demo.web_main() if web else demo.main()


def _call(address: str, channel: str, raw_args: Sequence[str], timeout: float) -> int:
    from . import sync
    from .address import parse_address

    if timeout <= 0:
        print("error: --timeout must be positive", file=sys.stderr)
        return EXIT_USAGE
    try:
        addr = parse_address(address)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    args = [parse_arg(a) for a in raw_args]
    try:
        with sync.connect(addr, timeout=timeout, connect_timeout=timeout) as peer:
            result = peer.invoke(channel, *args)
        text = msgspec.json.encode(result).decode()
    except TetherError as exc:
        print(f"error: {type(exc).__name__}: {exc}", file=sys.stderr)
        return EXIT_FAILED
    except (TypeError, msgspec.EncodeError) as exc:  # a result JSON cannot represent
        print(f"error: result is not JSON-encodable: {exc}", file=sys.stderr)
        return EXIT_FAILED
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
    parser = _build_parser()
    ns = parser.parse_args(args_list)
    if ns.command == "demo":
        return _demo(ns.web)
    if ns.command == "call":
        return _call(ns.address, ns.channel, ns.args, ns.timeout)
    if ns.command == "types":
        return _types(ns.ts, ns.output)
    parser.print_help(sys.stderr)
    return EXIT_USAGE
