"""Tracing after a new user's look: unanswered invokes, --kind, SIGTERM, labels, bad paths."""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest

import _trace_targets
import tether
from tether import trace_cli, trace_control, tracing

pytestmark = pytest.mark.timeout(120)

_SRC = str(Path(tether.__file__).resolve().parent.parent)


async def test_timed_out_and_orphaned_invokes_are_error_spans(tmp_path: Path) -> None:
    out = tmp_path / "t.json"
    seen: list[dict[str, Any]] = []
    async with tether.Main(trace=out, timeout=30.0) as main:
        assert tracing.hook is not None
        tracing.hook.listen(seen.append)
        child = await main.spawn(_trace_targets.slow)
        assert await child.invoke("double", 2) == 4
        with pytest.raises(tether.InvokeTimeout):
            await child.invoke("hang", timeout=0.3)
        pending = asyncio.ensure_future(child.invoke("hang"))
        await asyncio.sleep(0.3)
        child.kill()
        with pytest.raises(tether.PeerGone):
            await asyncio.wait_for(pending, 30)
    spans = [
        e
        for e in tracing.load(out)
        if e["ph"] == "X" and e["pid"] == os.getpid() and e["cat"] == "invoke"
    ]
    assert [(s["name"], s["args"]["error"]) for s in spans] == [
        ("double", False),
        ("hang", "timeout"),
        ("hang", "peer gone"),
    ]
    # the live records end them too, and the summary counts them as errors
    ended = [r for r in seen if r["kind"] == "unanswered"]
    assert [(r["channel"], r["error"]) for r in ended] == [
        ("hang", "timeout"),
        ("hang", "peer gone"),
    ]
    assert "ERROR (timeout)" in trace_control.format_record(ended[0])
    summary = trace_cli.Summary()
    for r in seen:
        summary.add(r)
    [(_, count, _, _, errors)] = [row for row in summary.rows() if row[0] == "hang"]
    assert (count, errors) == (2, 2)


def test_kind_filter_prints_but_still_measures(capsys: pytest.CaptureFixture[str]) -> None:
    ns = argparse.Namespace(channel=["add"], peer=None, kind=["invoke"])
    invoke = {"kind": "invoke", "channel": "add", "dir": "send", "ts": 1.0, "peer": "child[1]"}
    result = {
        "kind": "result",
        "channel": "add",
        "dir": "recv",
        "ts": 2.0,
        "peer": "child[1]",
        "latency_us": 1500.0,
        "error": False,
    }
    event = {"kind": "event", "channel": "add", "dir": "recv", "ts": 3.0}
    assert trace_control._keep(invoke, ns)
    # the answer completing the invoke carries its latency: shown with --kind invoke
    assert trace_control._keep(result, ns)
    assert "invoke 1.500 ms" in trace_control.format_record(result)
    assert not trace_control._keep(event, ns)
    assert trace_control._keep(event, ns, by_kind=False)  # measured regardless of --kind
    ns.kind = ["event"]
    assert not trace_control._keep(result, ns) and trace_control._keep(result, ns, by_kind=False)
    with pytest.raises(SystemExit) as ended:
        trace_cli.main(["unix:///nowhere", "--kind", "bogus"])
    assert ended.value.code == 2
    err = capsys.readouterr().err
    assert "unknown --kind bogus" in err and "invoke, item" in err and "unanswered" in err


_SIGTERMED = textwrap.dedent(
    """
    import asyncio
    import tether
    import _trace_targets

    async def amain():
        async with tether.Main(timeout=30.0) as main:
            child = await main.spawn(_trace_targets.slow)
            assert await child.invoke("double", 3) == 6
            print(child.pid, flush=True)
            await asyncio.sleep(60)

    if __name__ == "__main__":
        tether.run(amain())
    """
)


@pytest.mark.parametrize("group", [False, True], ids=["main-alone", "process-group"])
def test_sigterm_keeps_the_childrens_trace(tmp_path: Path, group: bool) -> None:
    out = tmp_path / "out.json"
    script = tmp_path / "app.py"
    script.write_text(_SIGTERMED)
    tests = str(Path(__file__).parent)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([_SRC, tests]), tracing.ENV: str(out)}
    env.pop("TETHER_TRACE_ROOT", None)
    proc = subprocess.Popen(
        [sys.executable, str(script)],
        env=env,
        stdout=subprocess.PIPE,
        start_new_session=True,
        text=True,
    )
    try:
        assert proc.stdout is not None
        child_pid = int(proc.stdout.readline())
        if group:  # what a terminal, `timeout` or a service manager does
            os.killpg(proc.pid, signal.SIGTERM)
        else:
            proc.send_signal(signal.SIGTERM)
        assert proc.wait(60) == 143
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)
    events = tracing.load(out)
    names = {e["pid"]: e["args"]["name"] for e in events if e["name"] == "process_name"}
    # both processes, main labelled main, the child by its target and pid
    assert names == {proc.pid: "main", child_pid: f"child slow {child_pid}"}
    handler = [e for e in events if e["ph"] == "X" and e["pid"] == child_pid]
    assert [e["name"] for e in handler] == ["double"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["app.py", "out.json"]


def test_bad_trace_path_fails_fast_or_warns(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    bad = tmp_path / "missing" / "out.json"
    with pytest.raises(OSError, match="no directory"):
        tether.Main(trace=bad)
    assert tracing.hook is None
    with caplog.at_level(logging.WARNING, logger="tether.trace"):
        tracing.start(bad)
        try:
            assert any("cannot write the trace file" in r.getMessage() for r in caplog.records)
        finally:
            assert tracing.stop() is None  # nothing written, nothing raised
    # the environment variable at import: the warning reaches stderr (logging's last resort)
    run = subprocess.run(
        [sys.executable, "-c", "import tether"],
        env={**os.environ, "PYTHONPATH": _SRC, tracing.ENV: str(bad)},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert run.returncode == 0 and "cannot write the trace file" in run.stderr


def test_merge_dedupes_refuses_twice_and_names_a_bad_file(tmp_path: Path) -> None:
    one = tmp_path / "a.json"
    two = tmp_path / "b.json"
    meta = {"name": "process_name", "ph": "M", "pid": 1, "tid": 0, "args": {"name": "main"}}
    x = {"name": "x", "ph": "i", "s": "p", "ts": 2, "pid": 1, "tid": 1}
    y = {"name": "y", "ph": "i", "s": "p", "ts": 1, "pid": 2, "tid": 2}
    one.write_text(json.dumps({"traceEvents": [meta, x]}))
    two.write_text(json.dumps([y]))
    out = tmp_path / "all.json"
    assert tracing.merge([one, two], out) == 3
    # merging the merged file with one of its parts again: nothing doubled
    again = tmp_path / "again.json"
    assert tracing.merge([out, one], again) == 3
    assert [e["name"] for e in tracing.load(again)] == ["process_name", "y", "x"]
    with pytest.raises(ValueError, match="given twice"):
        tracing.merge([one, tmp_path / "." / "a.json"], again)
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(ValueError, match=r"bad\.json: not a JSON trace file"):
        tracing.merge([one, bad], again)


async def test_watcher_says_when_main_goes_away(tmp_path: Path) -> None:
    folder = tmp_path / "m"
    folder.mkdir(mode=0o700)
    address = f"unix://{folder}/main.sock"
    async with tether.Main(timeout=10.0) as main:
        await main.listen(address)
        watcher = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "tether",
            "trace",
            address,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
            env={**os.environ, "PYTHONPATH": _SRC},
        )
        try:
            assert watcher.stdout is not None
            line = await asyncio.wait_for(watcher.stdout.readline(), 60)
            assert line.startswith(b"attached to main pid")
        except BaseException:
            watcher.kill()
            await watcher.wait()
            raise
    out, err = await asyncio.wait_for(watcher.communicate(), 60)
    text = out.decode()
    assert f"main pid {os.getpid()} went away" in text, (text, err)
    assert text.index("went away") < text.index("invokes per channel")


def test_refusal_hint_names_the_uid_check(tmp_path: Path) -> None:
    mine = tmp_path / "mine.sock"
    mine.write_text("")
    assert trace_control._refusal_hint(f"unix://{mine}") == ""
    assert trace_control._refusal_hint("tcp://127.0.0.1:1") == ""
    if os.geteuid() != 0:
        pytest.skip("needs root to make a file of another uid")
    theirs = tmp_path / "theirs.sock"
    theirs.write_text("")
    os.chown(theirs, 65534, 65534)
    hint = trace_control._refusal_hint(f"unix://{theirs}")
    assert "refused by the listener: uid not allowed" in hint and "uid 65534" in hint


async def test_logs_name_the_peer_for_failures_timeouts_deaths_and_clients(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    folder = tmp_path / "m"
    folder.mkdir(mode=0o700)
    address = f"unix://{folder}/main.sock"
    out = tmp_path / "t.json"
    caplog.set_level(logging.DEBUG, logger="tether")
    async with tether.Main(trace=out, timeout=30.0) as main:

        def boom(call: tether.Call) -> None:
            raise ValueError("kaboom")

        main.handle("boom", boom)
        await main.listen(address)
        child = await main.spawn(_trace_targets.slow)
        with pytest.raises(tether.InvokeTimeout):
            await child.invoke("hang", timeout=0.3)
        client = await tether.connect(address, timeout=30.0)
        with pytest.raises(tether.RemoteError):
            await client.invoke("boom")
        await client.close()
        child.kill()
        await child.wait(30)
        for _ in range(200):  # main learns of the client's goodbye on its own turn
            if not any("left" in r.getMessage() for r in caplog.records):
                await asyncio.sleep(0.02)
    messages = [
        (r.name, r.levelno, r.getMessage(), getattr(r, "peer_pid", None)) for r in caplog.records
    ]

    def find(text: str) -> tuple[str, int, str, Any]:
        return next(m for m in messages if text in m[2])

    assert find("timed out after 0.3 s")[3] == child.pid
    raised = find("raised ValueError: kaboom")
    assert raised[1] == logging.DEBUG and raised[3] == os.getpid()  # the client: this process
    assert find("connected from")[3] == os.getpid()
    assert find(" left: ")[3] == os.getpid()
    assert find("was killed by SIGKILL")[3] == child.pid
    assert find(f"trace written to {out}")[0] == "tether.trace"
