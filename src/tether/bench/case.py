"""Run one scenario in this (fresh) process and print its result as JSON.

Usage: ``python -m tether.bench.case NAME [--params JSON] [--timeout SECONDS]``

The result is one line on stdout, prefixed with :data:`MARKER` (children may
print too; the runner only reads the marked line). An ``alarm`` bounds the
whole case, so ``finally`` blocks still end the case's children on a hang.
"""

from __future__ import annotations

import argparse
import gc
import importlib
import json
import os
import signal
import sys
import time
import traceback
from types import FrameType
from typing import Any

from .scenarios import SCENARIOS

__all__ = ["MARKER", "main", "run_scenario"]

MARKER = "@@tether-bench@@ "
#: Packages a case may need that tether itself does not.
OPTIONAL = frozenset({"zmq", "numpy", "grpc"})


def run_scenario(name: str, params: dict[str, Any]) -> dict[str, Any]:
    """Import and run scenario ``name``; return its result dict."""
    module, _, func = SCENARIOS[name].func.partition(":")
    fn = getattr(importlib.import_module(f"tether.bench.{module}"), func)
    result: dict[str, Any] = fn(params)
    return result


def _on_alarm(signum: int, frame: FrameType | None) -> None:
    raise TimeoutError("the case ran out of time")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m tether.bench.case")
    ap.add_argument("name", choices=sorted(SCENARIOS))
    ap.add_argument("--params", default="{}", help="JSON object passed to the case")
    ap.add_argument("--timeout", type=float, default=120.0, help="abort the case after this")
    ap.add_argument("--out", help="write the result here instead of stdout")
    args = ap.parse_args(argv)
    params = json.loads(args.params)
    params.setdefault("timeout", args.timeout)
    if params.get("cpus"):  # pin this process; every child it starts inherits the mask
        os.sched_setaffinity(0, params["cpus"])
    signal.signal(signal.SIGALRM, _on_alarm)
    signal.setitimer(signal.ITIMER_REAL, args.timeout)
    gc.collect()
    gc.freeze()  # start-up objects need no more scanning while we measure
    t0 = time.perf_counter()
    try:
        result = run_scenario(args.name, params)
        code = 0
    except BaseException as exc:  # report any failure as a result, with the traceback on stderr
        if isinstance(exc, ModuleNotFoundError) and exc.name in OPTIONAL:
            hint = "pip install 'tether-ipc[bench]'"
            result = {"unavailable": f"{exc.name} is not installed ({hint})"}
            code = 0
        else:
            traceback.print_exc()
            text = str(exc) or ("ran out of time" if isinstance(exc, TimeoutError) else "")
            result = {"error": f"{type(exc).__name__}: {text}"[:300]}
            code = 1
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
    result["elapsed_s"] = round(time.perf_counter() - t0, 3)
    if args.out:
        # A file, not stdout: children share stdout, and a line longer than a
        # pipe's atomic write can be interleaved with what they print.
        with open(args.out, "w") as f:
            json.dump(result, f)
    else:
        sys.stdout.write(MARKER + json.dumps(result) + "\n")
        sys.stdout.flush()
    return code


if __name__ == "__main__":
    sys.exit(main())
