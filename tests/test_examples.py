"""Every script under examples/ runs to completion and prints what it promises."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"

# Lines each example must print (whole lines, any order unless noted in the test).
EXPECTED: dict[str, list[str]] = {
    "electron_ipc.py": ["Received: Hola, mundo!"],
    "main_child.py": [
        "child: got settings {'name': 'w1', 'mode': 'fast'}",
        "main: child progress 100%",
        "main: compute(21) = 42",
        "main: InvokeTimeout: no answer on 'slow' within 0.2 s",
        "child: theme is now dark",
        "main: child exited with code 0",
    ],
    "server_client.py": [
        "async client: hello, async client (role client)",
        "main log: async client was here",
        "sync client: hello, sync client (role client)",
        "tcp client: tether 0.1.0",
        "tcp client: greet is Forbidden",
    ],
    "pipe_fork.py": [
        "Parent process message: Psst .. hello from parent process!",
        "Child received message: Psst .. hello from parent process!",
        "child exited with code 0",
    ],
    "arrays.py": [
        "stats of a 4 MB array: mean 499999.5, max 999999, writeable 0.0",
        "checksum of a 64 MiB Buffer: 67108864",
        "the sent Buffer is gone from main: ConsumedError",
    ],
    "threads.py": [
        "main: progress 0%",
        "main: progress 75%",
        "main: crunch = 21333253333400000",
        "main: child: the thread saw call.cancelled and stopped",
        "main: got bytes of 1048576 bytes back",
    ],
    "handles.py": [
        "main: the pipe says 'hello through a pipe'",
        "main: the sent Handle is gone from main: ConsumedError",
        "main: the socket says 'PING'",
        "main: the child's file says 'written by the child'",
        "tcp client: a Handle over TCP is refused: HandleRefused",
    ],
    "direct.py": [
        "main: a's sibling is b: True",
        "main: a summed 0..9999 through b: 49995000",
        "main: a says sibling PeerGone",
        "main: b exited: True",
    ],
    "pool.py": [
        "fib(25) = 75025",
        "map: [0, 1, 1, 2, 3, 5, 8, 13, 21, 34]",
        "normalized: mean 0.0, std 1.0",
        "crash() failed: PeerGone, exit code -9 (SIGKILL)",
        "fib(40) took more than 0.5 s",
        "the pool goes on: fib(20) = 6765",
        "sync: 75025, [0, 1, 1, 2, 3]",
    ],
    "routes.py": [
        "child: route 1 'counter': add(2) = 7",
        "child: counter changed to 0",
        "main: counter closed at 0",
        "child: NoHandler: no host for route kind 'camera'",
        "child: Forbidden: route kind 'admin-panel' may not be opened by role 'child'",
        "main: feed 4 closed",
        "main: child exited with code 0",
        "main: RouteClosed: route 4 ('feed'), channel 'frame': the route is closed",
        "main: the Buffer was consumed by the failed send",
    ],
    "nats_workers.py": [
        "squares of 0..29: sum 8555",
        "30 log events came back",
        "one client's invokes served by 3 of 3 workers",
    ],
    "errors.py": [
        "RemoteError: ZeroDivisionError: division by zero",
        "NoHandler: no handler for channel 'no-such-channel'",
        "BadRequest: add() argument 'b': expected int, got str",
        "Forbidden: channel 'shutdown' is not exposed to role 'guest'",
        "InvokeTimeout: no answer on 'slow' within 0.2 s",
        "every error caught",
    ],
    "streams.py": [
        "main: tokens ['the', 'quick', 'brown', 'fox']",
        "child: numbers stopped, at most 8 ahead of main: True",
        "main: got [1, 2], then ValueError: ran out of luck",
        "sync client: countdown [3, 2, 1]",
    ],
}


def run_example(name: str) -> list[str]:
    result = subprocess.run(
        [sys.executable, str(EXAMPLES / name)],
        capture_output=True,
        text=True,
        timeout=90,
        check=False,
    )
    assert result.returncode == 0, f"{name} exited {result.returncode}:\n{result.stderr}"
    return result.stdout.splitlines()


def test_every_example_is_covered() -> None:
    assert sorted(p.name for p in EXAMPLES.glob("*.py")) == sorted(EXPECTED)


@pytest.mark.timeout(120)
@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_example_runs(name: str) -> None:
    lines = run_example(name)
    for expected in EXPECTED[name]:
        assert expected in lines, f"{name} did not print {expected!r}:\n" + "\n".join(lines)


@pytest.mark.timeout(120)
def test_errors_example_reports_each_failure_kind() -> None:
    lines = run_example("errors.py")
    kinds = [line.split(":", 1)[0] for line in lines[:-1]]
    assert kinds == [
        "RemoteError",
        "NoHandler",
        "BadRequest",
        "Forbidden",
        "InvokeTimeout",
        "PayloadTooLarge",
        "ConnectionClosed",
        "PeerGone",
        "PeerGone",
    ]
    assert "exited with code 3" in lines[-2]  # the crashed child's exit status reaches the caller


@pytest.mark.timeout(120)
def test_pipe_fork_child_gets_the_big_message_intact() -> None:
    lines = run_example("pipe_fork.py")
    sent = [line for line in lines if line.startswith("Parent sends 4194304 bytes, sha256 ")]
    got = [line for line in lines if line.startswith("Child received 4194304 bytes, sha256 ")]
    assert len(sent) == 1 and len(got) == 1, lines
    assert got[0].split("sha256 ")[1] == sent[0].split("sha256 ")[1]
    assert lines.index("Parent process message: Psst .. hello from parent process!") < lines.index(
        "Child received message: Psst .. hello from parent process!"
    )


@pytest.mark.timeout(120)
def test_threads_example_progress_arrives_before_the_result() -> None:
    lines = run_example("threads.py")
    assert lines[:5] == [
        "main: progress 0%",
        "main: progress 25%",
        "main: progress 50%",
        "main: progress 75%",
        "main: crunch = 21333253333400000",
    ]
