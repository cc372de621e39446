"""What the type checker sees: ``invoke(..., result_type=T)`` returns ``T`` (mypy on a snippet)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
MYPY = Path(sys.executable).parent / "mypy"

SNIPPET = """
import tether
import tether.sync

async def amain(peer: tether.Peer, child: tether.Child, sp: tether.sync.Peer) -> None:
    reveal_type(await peer.invoke("ch", result_type=bytes))
    reveal_type(await peer.invoke("ch", 1, timeout=2.0, result_type=list[int]))
    reveal_type(await peer.invoke("ch"))
    reveal_type(await child.invoke("ch", result_type=int))
    reveal_type(sp.invoke("ch", result_type=str))
    reveal_type(sp.invoke("ch"))
"""


@pytest.mark.timeout(300)
def test_result_type_is_the_type_invoke_returns(tmp_path: Path) -> None:
    if not MYPY.exists():
        pytest.fail(f"{MYPY} is missing: install the dev extra (pip install -e '.[dev]')")
    snippet = tmp_path / "snippet.py"
    snippet.write_text(SNIPPET)
    env = {**os.environ, "MYPYPATH": str(ROOT / "src")}
    result = subprocess.run(
        [str(MYPY), "--strict", "--no-incremental", "--config-file", "", str(snippet)],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=280,
        check=False,
    )
    revealed = [
        line.split("Revealed type is ")[1]
        for line in result.stdout.splitlines()
        if "Revealed type is" in line
    ]
    assert revealed == [
        '"bytes"',
        '"list[int]"',
        '"Any"',
        '"int"',
        '"str"',
        '"Any"',
    ], result.stdout + result.stderr
