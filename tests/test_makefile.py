"""``make chromium`` (run by ``make test``): installs Debian's Chromium when it is missing.

apt-get, sudo and id are stand-in scripts on PATH here: the tests check what
the Makefile would run, without touching the machine's packages.
"""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

pytestmark = pytest.mark.skipif(shutil.which("make") is None, reason="make is not installed")


def _script(path: Path, body: str) -> None:
    path.write_text("#!/bin/sh\n" + body)
    path.chmod(path.stat().st_mode | stat.S_IXUSR)


def _make(
    tmp_path: Path, chromium: Path, *, uid: int, sudo: bool, apt_works: bool = True
) -> tuple[subprocess.CompletedProcess[str], list[str]]:
    """Run ``make chromium`` with fake id/apt-get/sudo; return it and the commands run."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    log = tmp_path / "log"
    _script(bin_dir / "id", f"echo {uid}\n")
    install = f'touch "{chromium}"; chmod +x "{chromium}"' if apt_works else "exit 100"
    _script(
        bin_dir / "apt-get",
        f'echo "apt-get $*" >> "{log}"\ncase "$*" in *install*) {install};; esac\n',
    )
    if sudo:
        _script(bin_dir / "sudo", f'echo "sudo" >> "{log}"\nexec "$@"\n')
    path = os.pathsep.join([str(bin_dir), "/usr/bin", "/bin"])
    if not sudo:
        # no sudo anywhere on PATH: only our bin and a directory without it
        plain = tmp_path / "plain"
        plain.mkdir(exist_ok=True)
        for tool in ("sh", "make", "touch", "chmod", "echo", "test", "["):
            found = shutil.which(tool)
            if found:
                link = plain / tool
                if not link.exists():
                    link.symlink_to(found)
        path = os.pathsep.join([str(bin_dir), str(plain)])
    env = {"PATH": path, "HOME": str(tmp_path)}
    make = shutil.which("make")
    assert make is not None
    done = subprocess.run(
        [make, "-s", "-C", str(ROOT), "chromium", f"CHROMIUM={chromium}"],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
    )
    return done, log.read_text().splitlines() if log.exists() else []


def test_present_chromium_installs_nothing(tmp_path: Path) -> None:
    chromium = tmp_path / "chromium"
    _script(chromium, "exit 0\n")
    done, ran = _make(tmp_path, chromium, uid=0, sudo=False)
    assert done.returncode == 0, done.stderr
    assert ran == []


def test_root_installs_with_apt_get(tmp_path: Path) -> None:
    chromium = tmp_path / "chromium"
    done, ran = _make(tmp_path, chromium, uid=0, sudo=False)
    assert done.returncode == 0, done.stderr
    assert ran == ["apt-get install -y -q chromium"]
    assert os.access(chromium, os.X_OK)


def test_root_updates_package_lists_when_install_fails(tmp_path: Path) -> None:
    chromium = tmp_path / "chromium"
    done, ran = _make(tmp_path, chromium, uid=0, sudo=False, apt_works=False)
    assert done.returncode != 0
    assert ran == [
        "apt-get install -y -q chromium",
        "apt-get update -q",
        "apt-get install -y -q chromium",
    ]
    assert "could not install chromium" in done.stderr


def test_non_root_uses_sudo(tmp_path: Path) -> None:
    chromium = tmp_path / "chromium"
    done, ran = _make(tmp_path, chromium, uid=1000, sudo=True)
    assert done.returncode == 0, done.stderr
    assert ran == ["sudo", "apt-get install -y -q chromium"]


def test_non_root_without_sudo_says_what_to_run(tmp_path: Path) -> None:
    chromium = tmp_path / "chromium"
    done, ran = _make(tmp_path, chromium, uid=1000, sudo=False)
    assert done.returncode != 0
    assert ran == []
    assert "apt-get install -y chromium" in done.stderr
    assert f"{chromium} is missing" in done.stderr
