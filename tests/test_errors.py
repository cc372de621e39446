"""Tests for tether's exception hierarchy (DESIGN.md: all under tether.TetherError)."""

from __future__ import annotations

import pickle

import pytest

import tether
import tether.errors

DESIGN_ERRORS = [
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


@pytest.mark.parametrize("name", DESIGN_ERRORS)
def test_design_errors_exist_under_tether_error(name: str) -> None:
    cls = getattr(tether, name)
    assert isinstance(cls, type)
    assert issubclass(cls, tether.TetherError)
    assert issubclass(cls, Exception)
    assert cls is getattr(tether.errors, name)
    assert name in tether.__all__


def test_tether_error_is_exception() -> None:
    assert issubclass(tether.TetherError, Exception)
    assert not issubclass(tether.TetherError, (ValueError, OSError))


def test_every_error_in_errors_module_is_a_tether_error() -> None:
    for name in tether.errors.__all__:
        cls = getattr(tether.errors, name)
        assert issubclass(cls, tether.TetherError), name
        assert getattr(tether, name) is cls, name


def test_invoke_timeout_is_timeout_error() -> None:
    assert issubclass(tether.InvokeTimeout, TimeoutError)
    with pytest.raises(TimeoutError):
        raise tether.InvokeTimeout("no answer in 1.0 s")


def test_stdlib_bases() -> None:
    # Code that catches the standard categories keeps working.
    assert issubclass(tether.PeerGone, ConnectionError)
    assert issubclass(tether.NoHandler, LookupError)
    assert issubclass(tether.Forbidden, PermissionError)
    assert issubclass(tether.BadRequest, ValueError)
    assert issubclass(tether.PayloadTooLarge, ValueError)
    assert issubclass(tether.ConsumedError, RuntimeError)


def test_errors_are_distinct() -> None:
    classes = [getattr(tether, n) for n in DESIGN_ERRORS]
    for c in classes:
        for d in classes:
            if c is not d:
                assert not issubclass(c, d), (c, d)


def test_remote_error_keeps_type_message_traceback() -> None:
    tb = "Traceback (most recent call last):\n  File \"w.py\", line 3, in handler\nKeyError: 'k'\n"
    err = tether.RemoteError("KeyError", "'k'", tb)
    assert err.type_name == "KeyError"
    assert err.remote_message == "'k'"
    assert err.remote_traceback == tb
    text = str(err)
    assert text.startswith("KeyError: 'k'")
    assert "Remote traceback" in text
    assert 'File "w.py", line 3, in handler' in text
    assert str(tether.RemoteError("X", "m")) == "X: m"


def test_remote_error_traceback_shown_when_raised() -> None:
    import traceback

    try:
        raise tether.RemoteError("mod.Err", "bad", "REMOTE-FRAME-MARKER\n")
    except tether.RemoteError as exc:
        shown = "".join(traceback.format_exception(exc))
    assert "REMOTE-FRAME-MARKER" in shown
    assert "mod.Err: bad" in shown


def test_bad_request_path() -> None:
    err = tether.BadRequest("bad argument `point.y`", path="point.y")
    assert err.path == "point.y"
    assert tether.BadRequest("m").path == ""


def test_peer_gone_exitcode() -> None:
    assert tether.PeerGone("child died", exitcode=-9).exitcode == -9
    assert tether.PeerGone("eof").exitcode is None
    assert str(tether.PeerGone("child died", exitcode=3)) == "child died"


@pytest.mark.parametrize("name", DESIGN_ERRORS)
def test_catchable_as_tether_error(name: str) -> None:
    cls = getattr(tether, name)
    args: tuple[str, ...] = ("T", "m") if cls is tether.RemoteError else ("m",)
    with pytest.raises(tether.TetherError):
        raise cls(*args)


def test_errors_module_docstring_draws_every_class() -> None:
    doc = tether.errors.__doc__ or ""
    for name in tether.errors.__all__:
        assert name in doc, name


def test_errors_with_keyword_attributes_pickle() -> None:
    for err in (tether.PeerGone("x", exitcode=1), tether.BadRequest("m", path="p")):
        back = pickle.loads(pickle.dumps(err))
        assert type(back) is type(err)
        assert str(back) == str(err)
        assert vars(back) == vars(err)


def test_remote_error_pickles() -> None:
    err = tether.RemoteError("T", "m", "tb")
    back = pickle.loads(pickle.dumps(err))
    assert str(back) == str(err)
