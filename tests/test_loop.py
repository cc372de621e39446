"""uvloop by default (issue 14): a dependency where it has wheels, and the loop every entry
point picks; asyncio's own loop when uvloop cannot be imported."""

from __future__ import annotations

import asyncio
import sys
import tomllib
from pathlib import Path

import pytest
from packaging.requirements import Requirement

import _loop_targets
import tether
from tether.aio import loop as tether_loop

ROOT = Path(__file__).resolve().parent.parent

pytestmark = pytest.mark.timeout(60)


def _uvloop_requirement() -> Requirement:
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    (req,) = [Requirement(d) for d in deps if Requirement(d).name == "uvloop"]
    return req


def _env(platform: str, implementation: str) -> dict[str, str]:
    return {"sys_platform": platform, "platform_python_implementation": implementation}


def test_uvloop_is_a_dependency_where_it_ships_wheels() -> None:
    req = _uvloop_requirement()
    assert req.marker is not None, "uvloop needs an environment marker (no wheels on Windows)"
    assert req.specifier.contains("0.19.0") and not req.specifier.contains("0.18.0")
    assert req.marker.evaluate(_env("linux", "CPython"))
    assert req.marker.evaluate(_env("darwin", "CPython"))
    assert not req.marker.evaluate(_env("win32", "CPython"))
    assert not req.marker.evaluate(_env("linux", "PyPy"))


async def _loop_module() -> str:
    return type(asyncio.get_running_loop()).__module__


def test_run_picks_uvloop_when_it_imports(monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("uvloop")
    monkeypatch.delenv("TETHER_LOOP", raising=False)
    assert tether.run(_loop_module()).startswith("uvloop")
    assert tether_loop.run(_loop_module()).startswith("uvloop")
    loop = tether_loop.new_loop()
    try:
        assert type(loop).__module__.startswith("uvloop")
    finally:
        loop.close()


def test_run_falls_back_to_asyncio_when_uvloop_import_fails(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv("TETHER_LOOP", raising=False)
    monkeypatch.setitem(sys.modules, "uvloop", None)  # `import uvloop` now raises ImportError
    with pytest.raises(ImportError):
        import uvloop  # noqa: F401
    assert tether.run(_loop_module()).startswith("asyncio")
    assert tether_loop.run(_loop_module()).startswith("asyncio")
    loop = tether_loop.new_loop()
    try:
        assert type(loop).__module__.startswith("asyncio")
    finally:
        loop.close()


async def test_an_async_child_runs_on_uvloop() -> None:
    pytest.importorskip("uvloop")
    async with tether.Main(timeout=30.0) as main:
        child = await main.spawn(_loop_targets.loop_kind)
        assert (await child.invoke("loop")).startswith("uvloop")


class _FakeNatsPeer:
    """Stands in for the NATS connection: only what NatsPeer and its close use."""

    timeout = 5.0
    closed = False
    registry = None  # NatsPeer shares the peer's registry; nothing registers here

    async def close(self, reason: str = "closed") -> None:
        self.closed = True


@pytest.mark.parametrize("uvloop_imports", [True, False])
def test_the_blocking_nats_peer_loop_thread_is_tethers_kind(
    monkeypatch: pytest.MonkeyPatch, uvloop_imports: bool
) -> None:
    from tether.nats import blocking

    monkeypatch.delenv("TETHER_LOOP", raising=False)
    if uvloop_imports:
        pytest.importorskip("uvloop")
    else:
        monkeypatch.setitem(sys.modules, "uvloop", None)

    async def fake_connect(address: str, kw: dict[str, object]) -> _FakeNatsPeer:
        return _FakeNatsPeer()

    monkeypatch.setattr(blocking, "connect_nats", fake_connect)
    peer = blocking.connect_blocking("nats://127.0.0.1:4222/x", {"connect_timeout": 5.0})
    try:
        kind = type(peer._loop).__module__
        assert kind.startswith("uvloop" if uvloop_imports else "asyncio"), kind
    finally:
        peer.close()
    assert peer.aio.closed and not peer._thread.is_alive()
