"""Tests for tether's public names: __all__ and the names DESIGN.md fixes."""

from __future__ import annotations

import importlib
import types

import pytest

import tether

FIXED = ["Main", "Peer", "Child", "Call", "connect", "pipe", "sync"]
ERRORS = [
    "TetherError",
    "PeerGone",
    "InvokeTimeout",
    "RemoteError",
    "NoHandler",
    "Forbidden",
    "BadRequest",
    "ProtocolError",
    "ConsumedError",
    "PayloadTooLarge",
]


def test_all_is_a_list_of_unique_public_strings() -> None:
    assert isinstance(tether.__all__, list)
    assert len(set(tether.__all__)) == len(tether.__all__)
    for name in tether.__all__:
        assert isinstance(name, str)
        assert not name.startswith("_"), name


@pytest.mark.parametrize("name", tether.__all__)
def test_each_name_in_all_importable(name: str) -> None:
    assert hasattr(tether, name)
    ns: dict[str, object] = {}
    exec(f"from tether import {name}", ns)
    assert ns[name] is getattr(tether, name)


def test_star_import_gives_exactly_all() -> None:
    ns: dict[str, object] = {}
    exec("from tether import *", ns)
    ns.pop("__builtins__", None)
    assert set(ns) == set(tether.__all__)


def test_all_matches_public_names() -> None:
    public = {
        n
        for n, v in vars(tether).items()
        if not n.startswith("_") and (not isinstance(v, types.ModuleType) or n == "sync")
    }
    assert public == set(tether.__all__)


@pytest.mark.parametrize("name", FIXED + ERRORS)
def test_design_fixed_names_present(name: str) -> None:
    assert name in tether.__all__
    assert getattr(tether, name) is not None


def test_fixed_names_are_the_right_kind() -> None:
    for name in ("Main", "Peer", "Child", "Call"):
        assert isinstance(getattr(tether, name), type), name
    assert callable(tether.connect)
    assert callable(tether.pipe)
    assert isinstance(tether.sync, types.ModuleType)
    assert tether.sync is importlib.import_module("tether.sync")
    assert callable(tether.sync.connect)


def test_sync_connect_exported() -> None:
    from tether.sync import connect

    assert connect is tether.sync.connect
    assert "connect" in getattr(tether.sync, "__all__", ["connect"])


def test_buffer_if_present() -> None:
    if not hasattr(tether, "Buffer"):
        pytest.skip("tether.Buffer not implemented yet")
    assert "Buffer" in tether.__all__
    assert isinstance(tether.Buffer, type)


def test_version() -> None:
    assert isinstance(tether.__version__, str)
    assert tether.__version__.count(".") >= 1
