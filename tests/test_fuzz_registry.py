"""Fuzz Registry.resolve / listeners and ArgsSpec.decode (fuzz/fuzz_registry.py), also via atheris.

Whatever body and attachments a peer sends, dispatch yields validated arguments
or an ErrorInfo, and ``ArgsSpec.decode`` raises only BadRequest.
"""

from __future__ import annotations

import importlib.util
import os
import random
import re
import subprocess
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import msgspec
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tether import codec
from tether.codec import EXT_BYTES, EXT_NDARRAY
from tether.errors import BadRequest

ROOT = Path(__file__).resolve().parent.parent
HARNESS = ROOT / "fuzz" / "fuzz_registry.py"
CORPUS = ROOT / "fuzz" / "corpus" / "fuzz_registry"  # written by fuzz/make_corpus.py


def _load() -> ModuleType:
    spec = importlib.util.spec_from_file_location("fuzz_registry", HARNESS)
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    sys.modules.setdefault("fuzz_registry", mod)
    spec.loader.exec_module(mod)
    return mod


fuzz = _load()
CHANNELS = [name for name, _, _ in fuzz.HANDLERS]


# --- hypothesis: msgpack values built from a strategy -----------------------------------

_leaf = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(2**63), 2**64 - 1),
    st.floats(allow_nan=True),
    st.text(max_size=8),
    st.sampled_from(["red", "blue", "a", "b", "x", "Point", "Tagged", "depth", "label"]),
    st.binary(max_size=16),
    st.integers(0, 6).map(lambda i: msgspec.msgpack.Ext(EXT_BYTES, i.to_bytes(4, "little"))),
    st.builds(
        lambda i, dt, shape: msgspec.msgpack.Ext(EXT_NDARRAY, codec.encoder.encode([i, dt, shape])),
        st.integers(-1, 5),
        st.sampled_from(fuzz._DTYPES),
        st.lists(st.integers(-3, 2**40), max_size=4),
    ),
    st.builds(msgspec.msgpack.Ext, st.integers(-128, 127), st.binary(max_size=12)),
)
_value = st.recursive(
    _leaf,
    lambda inner: st.one_of(
        st.lists(inner, max_size=4),
        st.dictionaries(st.one_of(st.text(max_size=6), st.integers(-5, 5)), inner, max_size=4),
    ),
    max_leaves=12,
)
_attachments = st.lists(st.binary(max_size=64).map(memoryview), max_size=4)


def _encode(args: list[Any]) -> bytes:
    return codec.encoder.encode(args)


@settings(max_examples=600, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    channel=st.sampled_from([*CHANNELS, *(c + "!" for c in CHANNELS), "nobody"]),
    args=st.lists(_value, max_size=5),
    attachments=_attachments,
)
def test_resolve_on_random_argument_lists(
    channel: str, args: list[Any], attachments: list[memoryview]
) -> None:
    fuzz.check_resolve(channel, _encode(args), attachments)


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    channel=st.sampled_from(CHANNELS),
    args=st.lists(_value, min_size=1, max_size=4),
    attachments=_attachments,
    data=st.data(),
)
def test_resolve_on_corrupted_bodies(
    channel: str, args: list[Any], attachments: list[memoryview], data: st.DataObject
) -> None:
    body = bytearray(_encode(args))
    cut = data.draw(st.integers(0, len(body)))
    fuzz.check_resolve(channel, bytes(body[:cut]), attachments)
    i = data.draw(st.integers(0, len(body) - 1))
    body[i] ^= data.draw(st.integers(1, 255))
    fuzz.check_resolve(channel, bytes(body), attachments)


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(channel=st.sampled_from(CHANNELS), body=st.binary(max_size=200), attachments=_attachments)
def test_resolve_on_raw_bytes(channel: str, body: bytes, attachments: list[memoryview]) -> None:
    fuzz.check_resolve(channel, body, attachments)


@pytest.mark.parametrize("channel", CHANNELS)
@pytest.mark.parametrize("dtype", fuzz._DTYPES)
def test_ndarray_references_of_every_shape(channel: str, dtype: str) -> None:
    atts = [memoryview(bytes(16)), memoryview(b"")]
    for index in (0, 1, 2, -1):
        for shape in ([], [0], [-1], [4, -1], [-2], [2**40], [2**62, 2**62], [1] * 70):
            ext = msgspec.msgpack.Ext(EXT_NDARRAY, codec.encoder.encode([index, dtype, shape]))
            fuzz.check_resolve(channel, _encode([ext, ext, ext]), atts)
            fuzz.check_resolve(channel, _encode([[ext], {"a": ext}]), atts)


def test_harness_on_seeded_random_inputs(monkeypatch: pytest.MonkeyPatch) -> None:
    # Nesting kept under the recursion limit here: the deep case has its own tests.
    monkeypatch.setattr(fuzz, "deep", lambda depth: msgspec.Raw(b"\x91" * (depth % 64) + b"\x00"))
    rng = random.Random(0x6E61)
    for _ in range(3000):
        fuzz.TestOneInput(rng.randbytes(2 + rng.randrange(120)))


@pytest.mark.parametrize("channel", ["bytes", "any", "variadic", "ndarray", "memoryview"])
def test_deeply_nested_body_is_a_bad_request(channel: str) -> None:
    body = b"\x93" + b"\x91" * 5000 + b"\x00" + b"\xc0\xc0"  # 3 args, the first 5000 deep
    body1 = b"\x91" * 5001 + b"\x00"
    spec = fuzz.REGISTRY.invokes[channel].spec
    for b in (body, body1):
        with pytest.raises(BadRequest):
            spec.decode(b)


@pytest.mark.parametrize("channel", ["bytes", "any", "variadic", "ndarray", "memoryview"])
def test_deeply_nested_body_resolves_to_bad_request(channel: str) -> None:
    # What an invoke sees today: answered, not dropped (Registry.resolve's catch-all).
    frame = fuzz.Frame(fuzz.Kind.INVOKE, 1, 0, channel, b"\x91" * 5001 + b"\x00", [])
    out = fuzz.REGISTRY.resolve(frame, fuzz.ROLE)
    assert isinstance(out, codec.ErrorInfo) and out.code == "bad_request"


def test_check_decode_reports_foreign_exceptions() -> None:
    """The harness lets anything but BadRequest out, so a finding is seen."""

    class Broken:
        def decode(self, body: object, attachments: object = ()) -> tuple[Any, ...]:
            raise KeyError("decoder bug")

    with pytest.raises(KeyError, match="decoder bug"):
        fuzz.check_decode(Broken(), b"\x91\x01", [])


def test_check_resolve_catches_a_forbidden_handler_resolved(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(fuzz, "ROLE", "admin")
    with pytest.raises(AssertionError, match="forbidden handler"):
        fuzz.check_resolve("int!", codec.encoder.encode([1]), [])


# --- atheris: a short coverage-guided run, as a subprocess ------------------------------


def _atheris_available() -> bool:
    return importlib.util.find_spec("atheris") is not None


# Seed inputs the run starts from (libFuzzer runs its corpus first): one per mode, and one
# argument nested 4080 deep for the `bytes` handler, so the outcome does not hang on whether
# the mutator happens to reach that depth in a short run.
SEEDS = [bytes([4, 1, 1, 16, 255]), bytes([1, 0]) + b"\x91\x01", bytes([9, 6, 3, 9, 1, 2])]


def _run_atheris(runs: int, seed: int, corpus: Path) -> None:
    for i, data in enumerate(SEEDS):
        (corpus / f"seed{i}").write_bytes(data)
    # The child imports the same tether as this process does.
    env = {**os.environ, "PYTHONPATH": str(Path(codec.__file__).resolve().parent.parent)}
    # New inputs go to `corpus` (a temporary directory); the committed seeds are read only.
    cmd = [sys.executable, str(HARNESS), str(corpus), str(CORPUS), f"-atheris_runs={runs}"]
    cmd += [f"-seed={seed}", f"-artifact_prefix={corpus}/"]
    proc = subprocess.run(
        [*cmd, "-max_len=512"],
        cwd="/tmp",
        env=env,
        capture_output=True,
        text=True,
        timeout=50,
    )
    out = proc.stdout + proc.stderr
    if proc.returncode != 0:
        m = re.search(r"=== Uncaught Python exception: ===\n(\w+): ", out)
        tail = out[-3000:]
        for art in re.findall(r"Test unit written to (\S+)", out):
            Path("/tmp", art).unlink(missing_ok=True)
        if m and m.group(1) == "RecursionError":
            raise RecursionError(tail)
        raise AssertionError(f"atheris found a failure (rc={proc.returncode}):\n{tail}")
    assert f"Done {runs} " in out, out[-2000:]


@pytest.mark.timeout(60)
@pytest.mark.skipif(not _atheris_available(), reason="atheris is not installed")
def test_atheris_short_run(tmp_path: Path) -> None:
    _run_atheris(5000, seed=1, corpus=tmp_path)


# Found by `make fuzz` (fuzz_registry, 2026-11-30): numpy parses a dtype string such as
# "01i4" with ast.literal_eval; its SyntaxError used to escape codec.ext_hook.
@pytest.mark.parametrize("dtype", ["01i4", "9" * 5000 + "i4"])
def test_ndarray_dtype_numpy_cannot_parse_is_a_bad_request(dtype: str) -> None:
    ext = msgspec.msgpack.Ext(EXT_NDARRAY, codec.encoder.encode([0, dtype, [1]]))
    with pytest.raises(BadRequest):
        fuzz.REGISTRY.invokes["ndarray"].spec.decode(_encode([ext]), [memoryview(bytes(16))])


def test_dtype_defect_reproduces_from_the_fuzzer_input() -> None:
    """The input atheris wrote (crash-010522f0...), base64: dtype "\\x01\\x00..." on `any!`."""
    import base64

    fuzz.TestOneInput(base64.b64decode("jQZuksQGaW5sbmllAQDWAAAA"))


# --- the committed seed corpus ------------------------------------------------------------


def _outcome(seed: bytes) -> str:
    """What the harness's INVOKE resolves to for ``seed``: a handler's channel or an error code."""
    got: list[str] = []

    def spy(channel: str, body: Any, attachments: list[Any]) -> None:
        frame = fuzz.Frame(fuzz.Kind.INVOKE, 1, 0, channel, body, attachments)
        out = fuzz.REGISTRY.resolve(frame, fuzz.ROLE)
        got.append(out.code if isinstance(out, codec.ErrorInfo) else channel)
        real(channel, body, attachments)

    real = fuzz.check_resolve
    fuzz.check_resolve = spy
    try:
        fuzz.TestOneInput(seed)
    finally:
        fuzz.check_resolve = real
    (outcome,) = got
    return outcome


def test_corpus_seeds_reach_every_handler() -> None:
    """Each handler's seed resolves (valid arguments), its admin-only twin is forbidden."""
    seeds = {p.name: p.read_bytes() for p in CORPUS.iterdir()}
    for name in CHANNELS:
        assert _outcome(seeds[name]) == name, name
        assert _outcome(seeds[name + "-admin-only"]) == "forbidden", name
    assert _outcome(seeds["no-handler"]) == "no_handler"
    assert _outcome(seeds["recipe-values"]) == "any"


# --- codec.error_info: describing whatever a handler raised -----------------------------


class _StrRaises(Exception):
    def __str__(self) -> str:
        raise RuntimeError("__str__ broke")


class _ArgsUnprintable(Exception):
    pass


def test_error_info_describes_an_exception_whose_str_raises() -> None:
    info = codec.error_info(_StrRaises())
    assert info.code == "remote" and "_StrRaises" in info.type
    codec.encoder.encode(info)


@settings(max_examples=200, deadline=None)
@given(args=st.lists(st.one_of(st.text(), st.binary(), st.integers(), st.none()), max_size=3))
def test_error_info_on_arbitrary_exception_args(args: list[Any]) -> None:
    for exc in (_ArgsUnprintable(*args), ValueError(*args), BadRequest("x", "p")):
        try:
            raise exc
        except Exception as caught:
            info = codec.error_info(caught)
        assert info.code == "remote" and info.type
        assert codec.error_decoder.decode(codec.encoder.encode(info)) == info
