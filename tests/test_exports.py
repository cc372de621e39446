"""Tests for tether's public names: ``__all__``, the names DESIGN.md fixes, the errors module.

A guard in the manner of trio's ``test_exports`` and httpx's ``test_exported_members``:
adding or removing a public name must be a deliberate edit of ``EXPECTED_ALL`` here.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import inspect
import pkgutil
import types
from collections.abc import Iterator

import pytest

import tether
import tether.errors

# Every exception DESIGN.md names that exists today.
FIXED_ERRORS = {
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
    "ConnectError",
    "ConnectionClosed",
    "EndOfStream",
    "BufferInUse",
    "RouteClosed",
}
# The other names DESIGN.md fixes.
FIXED_OTHERS = {
    "Main",
    "Peer",
    "Child",
    "Call",
    "connect",
    "pipe",
    "sync",
    "Buffer",
    "run",
    "Pool",
    "Route",
    "Handle",
}
# Public, but not fixed by DESIGN.md.
# Errors added since DESIGN.md fixed its list (public, in errors.py, under TetherError).
OTHER_ERRORS = {"Busy", "AuthenticationError", "SandboxError", "StreamMismatch"}
OTHER_ERRORS |= {"HandleRefused"}  # issue 11: a Handle sent where no descriptors pass
EXTRA = {"Server", "PipeReader", "PipeWriter", "Sandbox", "SandboxReport"} | OTHER_ERRORS
EXPECTED_ALL = FIXED_ERRORS | FIXED_OTHERS | EXTRA
EXPECTED_ALL |= {"Handle"}  # issue 11: descriptors as values

# The standard exception each error also is, as errors.py documents.
ALSO_STDLIB: dict[str, type[BaseException]] = {
    "PeerGone": ConnectionError,
    "ConnectError": ConnectionError,
    "InvokeTimeout": TimeoutError,
    "NoHandler": LookupError,
    "Forbidden": PermissionError,
    "BadRequest": ValueError,
    "ConsumedError": RuntimeError,
    "PayloadTooLarge": ValueError,
    "ConnectionClosed": ConnectionError,
    "EndOfStream": EOFError,
    "BufferInUse": BufferError,
    "StreamMismatch": TypeError,
    "RouteClosed": ConnectionError,
    "HandleRefused": TypeError,
}


def all_tether_modules() -> Iterator[types.ModuleType]:
    """Import and yield every module of the package (``__main__`` modules would run)."""
    yield tether
    for info in pkgutil.walk_packages(tether.__path__, "tether."):
        if info.name.rsplit(".", 1)[-1] != "__main__":
            yield importlib.import_module(info.name)


def exception_classes_defined_in_tether() -> dict[str, type[BaseException]]:
    """Every exception class whose defining module is part of tether, by name."""
    found: dict[str, type[BaseException]] = {}
    for module in all_tether_modules():
        for _, obj in inspect.getmembers(module, inspect.isclass):
            if issubclass(obj, BaseException) and obj.__module__.startswith("tether"):
                found[obj.__qualname__] = obj
    return found


def test_all_is_exactly_the_expected_set() -> None:
    assert isinstance(tether.__all__, list)
    assert len(set(tether.__all__)) == len(tether.__all__), "duplicates in __all__"
    missing = EXPECTED_ALL - set(tether.__all__)
    unexpected = set(tether.__all__) - EXPECTED_ALL
    assert not missing and not unexpected, f"missing {missing}, unexpected {unexpected}"


@pytest.mark.parametrize("name", sorted(EXPECTED_ALL))
def test_each_name_in_all_resolves(name: str) -> None:
    value = getattr(tether, name)
    ns: dict[str, object] = {}
    exec(f"from tether import {name}", ns)
    assert ns[name] is value


def test_star_import_gives_exactly_all() -> None:
    ns: dict[str, object] = {}
    exec("from tether import *", ns)
    ns.pop("__builtins__", None)
    assert set(ns) == EXPECTED_ALL


def test_no_public_name_outside_all() -> None:
    public = {
        n
        for n, v in vars(tether).items()
        if not n.startswith("_") and (not isinstance(v, types.ModuleType) or n == "sync")
    }
    assert public == EXPECTED_ALL


def test_fixed_names_are_the_right_kind() -> None:
    for name in (
        "Main",
        "Peer",
        "Child",
        "Call",
        "Buffer",
        "Server",
        "PipeReader",
        "PipeWriter",
        "Pool",
    ):
        assert isinstance(getattr(tether, name), type), name
    assert inspect.isfunction(tether.connect)
    assert inspect.isfunction(tether.pipe)
    assert tether.sync is importlib.import_module("tether.sync")
    assert inspect.isfunction(tether.sync.connect)
    assert "connect" in tether.sync.__all__
    assert isinstance(tether.sync.Pool, type) and "Pool" in tether.sync.__all__


def test_errors_module_all_is_the_whole_hierarchy() -> None:
    assert set(tether.errors.__all__) == FIXED_ERRORS | OTHER_ERRORS


@pytest.mark.parametrize(
    "name",
    [n for n in sorted(FIXED_ERRORS | OTHER_ERRORS)],
)
def test_each_error_is_in_errors_module_and_exported(name: str) -> None:
    cls = getattr(tether.errors, name)
    assert cls is getattr(tether, name)
    assert issubclass(cls, tether.errors.TetherError)
    assert issubclass(cls, Exception)
    if name in ALSO_STDLIB:
        assert issubclass(cls, ALSO_STDLIB[name])


def test_every_exception_class_is_defined_in_errors() -> None:
    # "One exceptions module": a class raised by tether but defined elsewhere is missed
    # by `except tether.errors.X` readers and by this file's expected set.
    elsewhere = {
        name: cls.__module__
        for name, cls in exception_classes_defined_in_tether().items()
        if cls.__module__ != "tether.errors"
    }
    assert elsewhere == {}


def test_version_is_the_installed_distributions() -> None:
    assert tether.__version__ == importlib.metadata.version("tether-ipc")
