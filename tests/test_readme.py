"""The README's user's guide is checked by running it.

* Every ```python block of the guide is a whole program: it is run as a script
  (so ``spawn`` children can import it), must exit 0, and must print each
  line a ``print(...)  # text`` comment promises. A block may be preceded by
  ``<!-- check: interrupt after "TEXT" -->`` (SIGINT once TEXT is printed and
  the program catches SIGTERM, i.e. serve_forever is waiting; it must still
  exit 0) or ``<!-- check: skip until merge (...) -->`` (a feature another
  branch brings; the marker goes when it lands).
* The table of what can be sent is checked row by row, both ways: what a
  handler's argument arrives as, and what an invoke's result arrives as,
  without a hint and with the row's hint.
* The guide comes before the contributor's quick start, which keeps its two
  commands; "the seed" (the article this project grew from) is not left
  unexplained in what users read.
"""

from __future__ import annotations

import dataclasses
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from datetime import date, datetime, timezone
from pathlib import Path
from typing import Any
from uuid import UUID

import msgspec
import numpy as np
import pytest

import tether
from tether import cli

README = Path(__file__).resolve().parent.parent / "README.md"
TEXT = README.read_text()
GUIDE = TEXT[TEXT.index("## User's guide") : TEXT.index("## Quick start")]

_BLOCK = re.compile(r"(?:<!-- check: (?P<check>.*?) -->\n)?```python\n(?P<code>.*?)```", re.S)
_PROMISE = re.compile(r"\bprint\(.*\)\s+# (?P<text>.+)$")


def guide_blocks() -> list[tuple[str, str]]:
    """(check marker or "", code) of each python block of the guide."""
    return [(m["check"] or "", m["code"]) for m in _BLOCK.finditer(GUIDE)]


def promised(code: str) -> list[str]:
    return [m["text"] for line in code.splitlines() if (m := _PROMISE.search(line.strip()))]


def test_the_guide_has_runnable_blocks() -> None:
    blocks = guide_blocks()
    assert len(blocks) >= 6
    for _, code in blocks:
        assert promised(code), f"a guide block promises no output:\n{code}"


def _wait_caught(pid: int, sig: int, timeout: float = 30.0) -> None:
    """Wait until process ``pid`` catches ``sig`` (its SigCgt mask in /proc, Linux)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with open(f"/proc/{pid}/status") as f:
            caught = next(int(line.split()[1], 16) for line in f if line.startswith("SigCgt:"))
        if caught & (1 << (sig - 1)):
            return
        time.sleep(0.01)
    raise AssertionError(f"process {pid} does not catch signal {sig} after {timeout} s")


@pytest.mark.timeout(180)
@pytest.mark.parametrize("index", range(len(guide_blocks())))
def test_guide_block_runs_and_prints_what_it_says(index: int, child_env: dict[str, str]) -> None:
    check, code = guide_blocks()[index]
    if check.startswith("skip until merge"):
        pytest.skip(check)
    folder = tempfile.mkdtemp(prefix="tether-guide-")
    script = Path(folder) / f"guide_{index}.py"
    script.write_text(code)
    env = dict(child_env)  # run from the folder: the tether under test by absolute path
    src = str(Path(tether.__file__).resolve().parent.parent)
    env["PYTHONPATH"] = os.pathsep.join([src, *env.get("PYTHONPATH", "").split(os.pathsep)])
    proc = subprocess.Popen(
        [sys.executable, str(script)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
        cwd=folder,
    )
    try:
        if check.startswith("interrupt after"):
            wanted = check.split('"')[1]
            assert proc.stdout is not None
            seen = []
            for line in proc.stdout:  # (the test's timeout bounds this)
                seen.append(line.rstrip("\n"))
                if seen[-1] == wanted:
                    break
            _wait_caught(proc.pid, signal.SIGTERM)
            # tether.run catches SIGTERM from the start; serve_forever takes over the
            # signals in the few bytecodes after "serving" is printed: let it get there
            time.sleep(0.3)
            proc.send_signal(signal.SIGINT)
            rest, err = proc.communicate(timeout=120)
            out = "\n".join(seen) + "\n" + rest
        else:
            assert not check, f"unknown check marker {check!r}"
            out, err = proc.communicate(timeout=150)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
    assert proc.returncode == 0, f"exit {proc.returncode}\n{out}\n{err}"
    lines = out.splitlines()
    for text in promised(code):
        assert text in lines, f"did not print {text!r}:\n{out}\n{err}"
    assert "Traceback" not in err, err


# -- the table of what can be sent -------------------------------------------------


@dataclasses.dataclass
class Point:
    x: int
    y: int


class PointStruct(msgspec.Struct):
    x: int
    y: int


NAMES: dict[str, Any] = {
    "datetime": datetime,
    "date": date,
    "timezone": timezone,
    "UUID": UUID,
    "np": np,
    "tether": tether,
    "Point": Point,
    "PointStruct": PointStruct,
}
_CODE = re.compile(r"`([^`]+)`")

# Rows that hold once another branch lands (strict: they fail loudly when they start to pass,
# so the marker goes at the merge). The large-bytes fix (bytes hints give bytes at every size,
# a memoryview hint the view, both ways) is helper `handlers`'s.
PENDING: dict[tuple[str, str], str] = {}


def table_rows() -> list[tuple[str, str, str, str]]:
    """(sent, type without hint, hint, type with hint) of each row, as written."""
    body = GUIDE[GUIDE.index("<!-- types-table -->") : GUIDE.index("<!-- /types-table -->")]
    rows = []
    for line in body.splitlines():
        if not line.startswith("| `"):
            continue
        cells = [c.strip() for c in line.strip("|").split("|")]
        sent, bare, hint, hinted = (_CODE.search(c) for c in cells)
        assert sent and bare and hint and hinted, line
        rows.append((sent[1], bare[1], hint[1], hinted[1]))
    return rows


def _param(rows: list[tuple[str, str, str, str]]) -> list[Any]:
    out = []
    for row in rows:
        why = PENDING.get((row[0], row[2]))
        marks = [pytest.mark.xfail(strict=True, reason=why)] if why else []
        out.append(pytest.param(*row, marks=marks, id=f"{row[0]}->{row[2]}"))
    return out


def test_the_table_has_the_types_the_guide_promises() -> None:
    sent = " ".join(r[0] for r in table_rows())
    for expected in ("(1, 2)", "{1, 2}", "datetime(", "Point(", "PointStruct(", "bytes("):
        assert expected in sent
    assert "np.arange" in sent and "tether.Buffer" in sent


@pytest.mark.timeout(60)
@pytest.mark.parametrize(("sent", "bare", "hint", "hinted"), _param(table_rows()))
async def test_table_row(sent: str, bare: str, hint: str, hinted: str, sock_path: str) -> None:
    hint_type = eval(hint, NAMES)
    got: dict[str, str] = {}

    def untyped(call: tether.Call, x: Any) -> Any:
        got["untyped"] = type(x).__name__
        return eval(sent, NAMES)  # a fresh value: a Buffer is moved by the send

    def typed(call: tether.Call, x: Any) -> Any:
        got["typed"] = type(x).__name__
        return eval(sent, NAMES)

    typed.__annotations__ = {"x": hint_type}
    async with tether.Main(timeout=20.0) as main:
        main.handle("untyped", untyped)
        main.handle("typed", typed)
        await main.listen(f"unix://{sock_path}")
        async with tether.connect(f"unix://{sock_path}", timeout=20.0) as peer:
            plain = await peer.invoke("untyped", eval(sent, NAMES))
            hinted_result = await peer.invoke("typed", eval(sent, NAMES), result_type=hint_type)
    assert (got["untyped"], type(plain).__name__) == (bare, bare)
    assert (got["typed"], type(hinted_result).__name__) == (hinted, hinted)


# -- placement and words -------------------------------------------------------------


def test_the_guide_comes_before_the_contributors_quick_start() -> None:
    guide, quick = TEXT.index("## User's guide"), TEXT.index("## Quick start")
    assert guide < quick < TEXT.index("## API tour")
    start = TEXT[quick : TEXT.index("## API tour")]
    assert "```sh\nmake demo\nmake test\n```" in start
    for needed in ("pip install tether-ipc", "import tether", "tether.run(", "__main__"):
        assert needed in GUIDE


def test_the_seed_is_not_left_unexplained() -> None:
    assert "the seed" not in TEXT.lower()
    parser = cli._build_parser()
    helps = [parser.format_help()]
    for action in parser._subparsers._group_actions if parser._subparsers else []:
        helps.extend(p.format_help() for p in action.choices.values())
    assert all("seed" not in h.lower() for h in helps)
    for name in tether.__all__:
        obj = getattr(tether, name)
        docs = [obj.__doc__ or ""]
        docs += (
            [getattr(m, "__doc__", None) or "" for m in vars(obj).values()]
            if isinstance(obj, type)
            else []
        )
        assert all("seed" not in d.lower() for d in docs), name


@pytest.mark.timeout(120)
def test_platforms_table_without_the_linux_calls(child_env: dict[str, str]) -> None:
    """The Platforms table's "Without it" column, with memfd, pidfd and SO_PEERCRED removed."""
    probe = Path(__file__).resolve().parent / "_platform_probe.py"
    env = dict(child_env)
    env["PYTHONPATH"] = os.pathsep.join(
        [str(Path(tether.__file__).resolve().parent.parent), env.get("PYTHONPATH", "")]
    )
    result = subprocess.run(
        [sys.executable, str(probe)], capture_output=True, text=True, env=env, timeout=100
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == [
        "tcp large: 1048576",  # TCP: attachments inline
        "child small: 3",  # children: messages under 64 KiB
        "child large: AttributeError True",  # large payloads need memfd_create
        "unix refused: 1",  # a unix listener cannot tell who connected
        "child exit seen: -9",  # no pidfd: the sentinel still reports the exit
    ]
    platforms = GUIDE[GUIDE.index("### Platforms") : GUIDE.index("### Run an async main")]
    for claim in ("memfd_create", "SO_PEERCRED", "PR_SET_PDEATHSIG", "pidfd_open", "SCM_RIGHTS"):
        assert claim in platforms
