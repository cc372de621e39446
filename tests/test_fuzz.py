"""Run fuzz/fuzz_protocol.py's TestOneInput without atheris, and briefly under atheris from
the seed corpus (fuzz/corpus/, written by fuzz/make_corpus.py), so CI exercises both."""

from __future__ import annotations

import importlib.util
import os
import random
import re
import struct
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tether.wire import Kind

HARNESS = Path(__file__).resolve().parent.parent / "fuzz" / "fuzz_protocol.py"


def _load() -> ModuleType:
    spec = importlib.util.spec_from_file_location("fuzz_protocol", HARNESS)
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    sys.modules.setdefault("fuzz_protocol", mod)
    spec.loader.exec_module(mod)
    return mod


fuzz = _load()
# The atheris subprocess imports the same tether as this process does.
_SRC = str(Path(__import__("tether").__file__).resolve().parent.parent)


def _header(kind: int, size: int, chan_len: int = 0, n_att: int = 0) -> bytes:
    return struct.pack("<IBBHIIHH", size, kind, 0, chan_len, 1, 0, n_att, 0)


@settings(max_examples=2000, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.binary(max_size=400))
def test_harness_on_hypothesis_inputs(data: bytes) -> None:
    fuzz.TestOneInput(data)


@pytest.mark.timeout(120)
def test_harness_on_random_inputs() -> None:
    rng = random.Random(0x7E7E)
    for i in range(3000):
        mode = rng.randrange(256)
        if i % 3 == 0:
            # Raw bytes that start with a plausible header.
            kind = rng.choice([*list(Kind), 0, 12, 255])
            body = rng.randbytes(rng.randrange(64))
            size = rng.choice([16 + len(body), rng.randrange(40), 0xFFFFFFFF])
            rest = _header(kind, size, rng.randrange(20), rng.choice([0, 1, 2])) + body
        else:
            rest = rng.randbytes(rng.randrange(300))
        fuzz.TestOneInput(bytes([mode]) + rest)


@pytest.mark.parametrize("first", range(8))
def test_harness_modes_with_valid_frames(first: int) -> None:
    # A recipe of well-formed frames of every kind, each mode, whole and in 1-byte reads.
    recipe = b"".join(bytes([k, 3]) + b"abc" + bytes([2]) + b"\x91\x01" + b"\x00\x00" for k in Kind)
    raw = b"".join(bytes([1]) + b"x" for _ in range(3))
    for step in (0, 1):
        fuzz.TestOneInput(bytes([first | step << 3]) + (recipe if first & 4 else raw))


def test_frames_from_builds_parseable_frames() -> None:
    from tether.wire import FrameParser

    recipe = bytes([int(Kind.EVENT), 2]) + b"ch" + bytes([1]) + b"\x90" + bytes([1, 3, 0, 7, 1])
    frames = FrameParser().feed(fuzz._frames_from(recipe))
    assert len(frames) == 1
    f = frames[0]
    assert (f.kind, f.channel, bytes(f.body), f.request_id, f.route_id) == (
        Kind.EVENT,
        "ch",
        b"\x90",
        7,
        1,
    )
    assert [bytes(a) for a in f.attachments] == [b"\xaa" * 3]


def test_harness_reports_unexpected_exceptions(monkeypatch: pytest.MonkeyPatch) -> None:
    """The harness must not swallow anything but ProtocolError."""

    class Broken:
        def __init__(self, *args: object) -> None:
            pass

        buffered = 0

        def feed(self, data: bytes) -> list[object]:
            raise ValueError("parser bug")

    monkeypatch.setattr(fuzz, "FrameParser", Broken)
    with pytest.raises(ValueError, match="parser bug"):
        fuzz.TestOneInput(b"\x00abcdef")


# --- the seed corpus (fuzz/make_corpus.py, fuzz/corpus/) -------------------------------------

ROOT = HARNESS.parent.parent
CORPUS = ROOT / "fuzz" / "corpus"


def _load_make_corpus() -> ModuleType:
    spec = importlib.util.spec_from_file_location("make_corpus", ROOT / "fuzz" / "make_corpus.py")
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


make_corpus = _load_make_corpus()


def _tree(directory: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(directory)): p.read_bytes() for p in directory.rglob("*") if p.is_file()
    }


def test_committed_corpus_is_what_make_corpus_writes(tmp_path: Path) -> None:
    """``python fuzz/make_corpus.py`` after a wire or harness change keeps fuzz/corpus current."""
    written = make_corpus.write(tmp_path)
    assert written["fuzz_protocol"] >= 50 and written["fuzz_registry"] >= 30, written
    assert _tree(tmp_path) == _tree(CORPUS)
    assert sum(len(b) for b in _tree(CORPUS).values()) < 64 * 1024  # small enough to commit


def test_protocol_corpus_covers_every_frame_kind() -> None:
    from tether.wire import FrameParser

    kinds, with_attachments = set(), 0
    for data in make_corpus.protocol_frames().values():
        (f,) = FrameParser().feed(data)
        kinds.add(Kind(f.kind))
        with_attachments += bool(f.attachments)
    assert kinds == set(Kind) - {Kind.HELLO}  # HELLOs are the handshake seeds
    assert with_attachments >= 4
    errors = [n for n in make_corpus.protocol_frames() if n.startswith("error_")]
    assert len(errors) > len(make_corpus.ERROR_CODES)


@pytest.mark.parametrize("features", make_corpus.FEATURES, ids=str)
def test_protocol_corpus_hellos_open_a_connection(features: list[str]) -> None:
    """Each handshake seed is a HELLO that opens a Connection, then every kind it returns."""
    from tether.protocol import Connection, State

    seed = CORPUS / "fuzz_protocol" / f"handshake-hello-{'-'.join(features) or 'none'}-session"
    data = seed.read_bytes()
    assert data[0] == make_corpus.HANDSHAKE
    conn = Connection("child", name="seed")
    conn.data_to_send()
    got = {Kind(f.kind) for f in conn.receive_data(data[1:])}
    assert conn.state is State.OPEN
    assert got == fuzz._RETURNED - {Kind.GOODBYE, Kind.STREAM, Kind.ITEM, Kind.CREDIT}
    end = CORPUS / "fuzz_protocol" / "handshake-hello-then-goodbye"
    conn = Connection("child", name="seed")
    conn.data_to_send()
    assert Kind.GOODBYE in {Kind(f.kind) for f in conn.receive_data(end.read_bytes()[1:])}
    assert conn.state is not State.OPEN


def test_harness_on_the_corpus() -> None:
    seeds = sorted((CORPUS / "fuzz_protocol").iterdir())
    assert {p.read_bytes()[0] & 3 for p in seeds} == {0, 1, 2, 3}  # every target
    for seed in seeds:
        fuzz.TestOneInput(seed.read_bytes())


# --- atheris: a short coverage-guided run from the corpus, as `make fuzz` runs it ----------


def run_atheris(harness: Path, corpus: Path, work: Path, runs: int) -> str:
    """Run ``harness`` under atheris for ``runs`` inputs from ``corpus`` (new ones go to
    ``work``, so the committed corpus is not touched); returns its output, raises on a finding.
    """
    work.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "PYTHONPATH": _SRC}
    cmd = [
        sys.executable,
        str(harness),
        f"-atheris_runs={runs}",
        "-max_total_time=20",
        "-max_len=2048",
        f"-artifact_prefix={work}/",
        str(work),
        str(corpus),
    ]
    proc = subprocess.run(cmd, cwd=work, env=env, capture_output=True, text=True, timeout=50)
    out = proc.stdout + proc.stderr
    if proc.returncode != 0:
        raise AssertionError(f"atheris found a failure (rc={proc.returncode}):\n{out[-3000:]}")
    return out


@pytest.mark.timeout(60)
@pytest.mark.skipif(importlib.util.find_spec("atheris") is None, reason="atheris is not installed")
def test_atheris_short_run_from_the_corpus(tmp_path: Path) -> None:
    before = _tree(CORPUS)
    out = run_atheris(HARNESS, CORPUS / "fuzz_protocol", tmp_path / "work", 5000)
    assert "Done 5000 " in out, out[-2000:]
    loaded = re.search(r"INITED cov: (\d+) ft: \d+ corp: (\d+)/", out)
    assert loaded and int(loaded.group(2)) >= 10, out[-2000:]  # the seeds were read
    assert _tree(CORPUS) == before


@pytest.mark.timeout(60)
@pytest.mark.skipif(importlib.util.find_spec("atheris") is None, reason="atheris is not installed")
def test_atheris_run_reports_a_finding(tmp_path: Path) -> None:
    """A seed that makes the harness raise fails the run (as it fails ``make fuzz``)."""
    harness = tmp_path / "broken.py"
    harness.write_text(
        "import sys, atheris\n"
        "def TestOneInput(data):\n"
        "    if data.startswith(b'boom'):\n"
        "        raise ValueError('found it')\n"
        "atheris.Setup(sys.argv, TestOneInput)\n"
        "atheris.Fuzz()\n"
    )
    (tmp_path / "seeds").mkdir()
    (tmp_path / "seeds" / "boom").write_bytes(b"boom!")
    with pytest.raises(AssertionError, match="ValueError: found it"):
        run_atheris(harness, tmp_path / "seeds", tmp_path / "work", 100)
