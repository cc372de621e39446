"""Sandboxed children (``Main.spawn(..., sandbox=...)``): no network, limits, no privileges.

The child's findings come from :mod:`_sandbox_targets` (``probe``): it tries
a loopback TCP server main reaches, reads its rlimits, ``NoNewPrivs`` and
capability sets back, and invokes main. The refusal tests run a whole main
where the kernel really refuses: a user namespace with no capability to make
a network namespace and no quota for another user namespace.
"""

from __future__ import annotations

import asyncio
import os
import pickle
import resource
import shutil
import socket
import subprocess
import sys
import tempfile
from collections.abc import AsyncIterator
from typing import Any

import pytest

import tether
from _sandbox_targets import sandbox_probe, sandbox_probe_sync
from tether.sandbox import Sandbox, SandboxReport

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="Linux namespaces")

MAIN_NETNS = os.readlink("/proc/self/ns/net")


@pytest.fixture
async def port() -> AsyncIterator[int]:
    """A loopback TCP server main itself can reach."""
    server = await asyncio.start_server(lambda r, w: w.close(), "127.0.0.1", 0)
    number = server.sockets[0].getsockname()[1]
    with socket.create_connection(("127.0.0.1", number), timeout=5.0):
        pass  # main reaches it
    yield number
    server.close()
    await server.wait_closed()


async def _run(port: int, box: Sandbox, method: str, target: Any = sandbox_probe) -> dict[str, Any]:
    got: dict[str, Any] = {}
    async with tether.Main(start_method=method) as main:

        @main.handle("add")
        def add(call: tether.Call, a: int, b: int) -> int:
            return a + b

        @main.handle("report")
        def report(call: tether.Call, found: dict[str, Any]) -> None:
            got.update(found)

        try:
            child = await main.spawn(target, port, sandbox=box)
        except tether.SandboxError as exc:  # pragma: no cover - a kernel without namespaces
            pytest.skip(f"this system refuses the sandbox: {exc}")
        assert await child.wait(30.0) == 0
        got["report"] = child.sandbox
    return got


@pytest.mark.parametrize("method", ["spawn", "forkserver", "fork"])
async def test_sandboxed_child_cannot_reach_network_but_reaches_main(
    method: str, port: int
) -> None:
    got = await _run(port, Sandbox(), method)
    assert got["connect"] in ("ENETUNREACH", "EHOSTUNREACH", "EACCES", "EPERM")
    assert got["netns"] != MAIN_NETNS
    assert got["sum"] == 5  # its invokes reach main over the inherited socketpair
    assert got["setns"] in ("EPERM", "EACCES")  # no way back into main's network
    assert got["lo_up"] == "EPERM"  # nor up in its own
    assert got["report"] == SandboxReport(
        ("network", "capabilities", "no_new_privs", "address_space", "open_files", "cpu_seconds"),
        {},
    )


@pytest.mark.parametrize("method", ["spawn", "forkserver"])
async def test_target_module_is_imported_inside_the_sandbox(method: str, port: int) -> None:
    got = await _run(port, Sandbox(), method)
    assert got["imported_in"] == got["netns"] != MAIN_NETNS


async def test_unsandboxed_child_reaches_the_same_server(port: int) -> None:
    """The control: the same probe without a sandbox connects, shares main's namespace."""
    got: dict[str, Any] = {}
    async with tether.Main() as main:
        main.handle("add")(lambda call, a, b: a + b)
        main.handle("report")(lambda call, found: got.update(found))
        child = await main.spawn(sandbox_probe, port)
        assert await child.wait(30.0) == 0
        assert child.sandbox is None
    assert got["connect"] == "connected"
    assert got["netns"] == MAIN_NETNS


@pytest.mark.parametrize("method", ["spawn", "fork"])
async def test_limits_and_privileges_read_back_in_the_child(method: str, port: int) -> None:
    box = Sandbox(address_space=3 << 30, open_files=100, cpu_seconds=500)
    got = await _run(port, box, method, sandbox_probe_sync)
    assert got["nofile"] == [100, 100]
    assert got["as"] == [3 << 30, 3 << 30]
    assert got["cpu"] == [500, 501]  # SIGXCPU at 500 s, SIGKILL a second later
    assert got["no_new_privs"] == "1"
    assert int(got["cap_eff"], 16) == 0
    assert int(got["cap_bnd"], 16) == 0
    assert got["sum"] == 5


async def test_network_kept_and_parts_turned_off(port: int) -> None:
    box = Sandbox(network=True, address_space=None, cpu_seconds=None, drop_capabilities=False)
    got = await _run(port, box, "fork")
    assert got["connect"] == "connected"
    assert got["report"].applied == ("no_new_privs", "open_files")
    assert got["cpu"] == list(resource.getrlimit(resource.RLIMIT_CPU))


def test_sandbox_argument_is_checked() -> None:
    assert Sandbox.coerce(True) == Sandbox()
    assert Sandbox.coerce(False) is None
    assert Sandbox.coerce(None) is None
    with pytest.raises(TypeError):
        Sandbox.coerce("yes")  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        Sandbox(open_files=0)
    with pytest.raises(TypeError):
        Sandbox(best_effort=1)  # type: ignore[arg-type]
    err = pickle.loads(pickle.dumps(tether.SandboxError("no", part="network")))
    assert (str(err), err.part) == ("no", "network")


async def test_spawn_rejects_a_bad_sandbox_before_starting() -> None:
    async with tether.Main() as main:
        with pytest.raises(TypeError, match="sandbox"):
            await main.spawn(sandbox_probe, 1, sandbox="on")  # type: ignore[arg-type]
        assert not main.children


# -- a kernel that really refuses: whole mains in a restricted user namespace -------------

_NEEDS = ("unshare", "setpriv")


def _restricted(argv: list[str]) -> list[str]:
    """``argv`` as root of a fresh user namespace without CAP_SYS_ADMIN or any userns quota."""
    return [
        "unshare",
        "-U",
        "-r",
        "sh",
        "-c",
        "echo 0 > /proc/sys/user/max_user_namespaces && exec setpriv --bounding-set=-sys_admin "
        '--inh-caps=-sys_admin -- "$@"',
        "sh",
        *argv,
    ]


def _main(best_effort: bool, method: str = "spawn") -> list[str]:
    flag = "1" if best_effort else "0"
    code = f"import _sandbox_targets as t; t.main_script({flag!r}, {method!r})"
    return [sys.executable, "-c", code]


def _run_main(argv: list[str], env: dict[str, str]) -> str:
    if not all(shutil.which(tool) for tool in _NEEDS):
        pytest.skip("needs util-linux unshare and setpriv")
    probe = subprocess.run(_restricted(["true"]), capture_output=True, timeout=30)
    if probe.returncode != 0:
        pytest.skip(f"cannot make a restricted user namespace here: {probe.stderr!r}")
    out = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    return out.stdout


def test_refused_sandbox_raises_sandbox_error(child_env: dict[str, str]) -> None:
    out = _run_main(_restricted(_main(best_effort=False)), child_env)
    assert out.startswith("SandboxError part=network: sandbox_probe: sandbox refused (network)")
    assert "CLONE_NEWNET: Operation not permitted" in out
    assert "with a new user namespace: No space left on device" in out


def test_refused_sandbox_best_effort_starts_and_says_what_was_skipped(
    child_env: dict[str, str],
) -> None:
    out = _run_main(_restricted(_main(best_effort=True)), child_env)
    lines = dict(line.split(" ", 1) for line in out.splitlines())
    assert lines["skipped"].startswith("{'network': 'CLONE_NEWNET: Operation not permitted")
    assert "network" not in lines["applied"]
    assert "no_new_privs" in lines["applied"]
    assert lines["connect"] == "connected"  # honestly reported: the network stayed
    assert lines["sum"] == "5"


def _readable_copy() -> str:
    """A folder anyone may read holding tether, msgspec and the test's targets."""
    import msgspec

    folder = tempfile.mkdtemp(prefix="tether-sandbox-")
    for pkg in (tether, msgspec):
        src = os.path.dirname(os.path.abspath(pkg.__file__ or ""))
        shutil.copytree(src, os.path.join(folder, os.path.basename(src)))
    shutil.copy(os.path.join(os.path.dirname(__file__), "_sandbox_targets.py"), folder)
    for root, _dirs, files in os.walk(folder):
        os.chmod(root, 0o755)
        for name in files:
            os.chmod(os.path.join(root, name), 0o644)
    return folder


@pytest.mark.skipif(os.geteuid() != 0, reason="switches to user nobody")
def test_unprivileged_main_sandboxes_through_a_user_namespace(child_env: dict[str, str]) -> None:
    if shutil.which("setpriv") is None:
        pytest.skip("needs util-linux setpriv")
    argv = [
        "setpriv",
        "--reuid",
        "65534",
        "--regid",
        "65534",
        "--clear-groups",
        *_main(False, "fork"),
    ]
    # User nobody may not read this checkout (a clone in a 0700 temp dir): give it a
    # world-readable copy of what the script imports.
    path = _readable_copy()
    env = dict(child_env, HOME="/tmp", PYTHONPATH=path)
    try:
        out = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=120, cwd="/tmp")
    finally:
        shutil.rmtree(path, ignore_errors=True)
    if "SandboxError" in out.stdout:
        pytest.skip(f"no unprivileged user namespaces here: {out.stdout}")
    assert out.returncode == 0, out.stderr
    lines = dict(line.split(" ", 1) for line in out.stdout.splitlines())
    assert lines["uid"] == "65534"  # mapped to itself inside the new user namespace
    assert lines["connect"] in ("ENETUNREACH", "EHOSTUNREACH")
    assert lines["sum"] == "5"
    assert lines["skipped"] == "{}"
