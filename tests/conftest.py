"""Shared test plumbing.

* The tests directory goes on ``sys.path`` so spawned children (start methods
  ``spawn`` and ``forkserver`` pass ``sys.path`` on) can import module-level
  targets from ``tests/_targets.py``. Subprocess scripts get it through the
  ``child_env`` fixture.
* ``sock_path`` gives a short unix socket path under /tmp (``tmp_path`` can
  exceed the 108-byte ``sun_path`` limit) and removes it afterwards.
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
from collections.abc import Iterator

import pytest

TESTS_DIR = os.path.dirname(os.path.abspath(__file__))
if TESTS_DIR not in sys.path:
    sys.path.insert(0, TESTS_DIR)


@pytest.fixture
def sock_path() -> Iterator[str]:
    """A fresh unix socket path, short enough for ``sun_path``; cleaned up after."""
    d = tempfile.mkdtemp(prefix="tt-", dir="/tmp")
    try:
        yield os.path.join(d, "s.sock")
    finally:
        shutil.rmtree(d, ignore_errors=True)


@pytest.fixture
def child_env() -> dict[str, str]:
    """Environment for a subprocess that must import ``tether`` and ``_targets``."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (TESTS_DIR, env.get("PYTHONPATH")) if p)
    env["PYTHONUNBUFFERED"] = "1"
    return env
