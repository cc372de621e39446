"""The handler table: roles as one role or several, one handler per channel, checked names."""

from __future__ import annotations

import logging
from typing import Any

import msgspec
import pytest

import tether
from tether.codec import ErrorInfo
from tether.registry import Handlers, Registry
from tether.wire import K_EVENT, K_INVOKE, Frame


def _invoke(channel: str, *args: Any) -> Frame:
    return Frame(K_INVOKE, 1, 0, channel, memoryview(msgspec.msgpack.encode(list(args))))


def _answer(reg: Registry, channel: str, role: str) -> str:
    """``ok`` if ``role`` reaches the handler of ``channel``, else the error code."""
    found = reg.resolve(_invoke(channel), role)
    return found.code if isinstance(found, ErrorInfo) else "ok"


def _ping(call: tether.Call) -> str:
    return "pong"


class Owner(Handlers):
    def __init__(self) -> None:
        self.registry = Registry()


# -- roles -------------------------------------------------------------------------------


def test_a_bare_str_is_one_role_not_its_letters() -> None:
    reg = Registry()
    reg.handle("admin_only", _ping, roles="admin")
    assert _answer(reg, "admin_only", "admin") == "ok"
    for letter in "admin":
        assert _answer(reg, "admin_only", letter) == "forbidden"


def test_roles_as_a_collection_and_none() -> None:
    reg = Registry()
    reg.handle("two", _ping, roles={"web", "child"})
    reg.handle("open", _ping)
    assert _answer(reg, "two", "web") == "ok"
    assert _answer(reg, "two", "child") == "ok"
    assert _answer(reg, "two", "client") == "forbidden"
    assert _answer(reg, "open", "anyone") == "ok"
    from tether.registry import checked_roles

    assert checked_roles(["a", "b"]) == frozenset({"a", "b"})
    assert checked_roles("ab") == frozenset({"ab"})
    assert checked_roles(None) is None


def test_event_listener_roles_take_a_bare_str_as_one_role() -> None:
    reg = Registry()
    seen: list[str] = []
    reg.on("log", lambda call, line: seen.append(line), roles="admin")
    ev = Frame(K_EVENT, 0, 0, "log", memoryview(msgspec.msgpack.encode(["x"])))
    assert len(reg.listeners(ev, "admin")) == 1
    assert reg.listeners(ev, "a") == []


@pytest.mark.parametrize("bad", [5, 1.5, b"admin", object(), ["ok", 3]])
def test_roles_that_are_not_str_are_refused_at_the_call(bad: Any) -> None:
    owner = Owner()
    with pytest.raises(TypeError, match="role"):
        owner.handle("ch", roles=bad)  # the decorator form fails where it is written
    with pytest.raises(TypeError, match="role"):
        owner.on("ch", _ping, roles=bad)
    assert not owner.registry.invokes and not owner.registry.events


# -- channels -----------------------------------------------------------------------------


@pytest.mark.parametrize("bad", [5, b"ch", None, ("a",)])
def test_a_non_str_channel_is_a_type_error_naming_the_argument(bad: Any) -> None:
    owner = Owner()
    with pytest.raises(TypeError, match="channel must be a str"):
        owner.handle(bad)
    with pytest.raises(TypeError, match="channel must be a str"):
        owner.handle(bad, _ping)
    with pytest.raises(TypeError, match="channel must be a str"):
        owner.on(bad, _ping)
    with pytest.raises(TypeError, match="channel must be a str"):
        owner.remove_handler(bad)


def test_empty_channel_is_a_value_error() -> None:
    with pytest.raises(ValueError, match="invalid channel"):
        Owner().handle("", _ping)


# -- one handler per channel -----------------------------------------------------------------


def test_second_handler_for_a_channel_raises_naming_it() -> None:
    owner = Owner()
    owner.handle("save", _ping)

    def other(call: tether.Call) -> str:
        return "other"

    with pytest.raises(ValueError, match="second handler for 'save'"):
        owner.handle("save", other)
    with pytest.raises(ValueError, match="'save'"):
        owner.handle("save")(other)
    assert owner.registry.invokes["save"].fn is _ping  # the first one stays


def test_remove_handler_frees_the_channel_and_keeps_listeners() -> None:
    owner = Owner()
    owner.handle("save", _ping)
    owner.on("save", _ping)
    owner.remove_handler("save")
    assert _answer(owner.registry, "save", "client") == "no_handler"
    assert len(owner.registry.events["save"]) == 1
    owner.remove_handler("save")  # nothing left to remove: a no-op
    owner.handle("save", _ping)  # registering again is fine now
    assert _answer(owner.registry, "save", "client") == "ok"


def test_main_and_peers_have_remove_handler() -> None:
    assert callable(tether.Main().remove_handler)
    assert callable(tether.Peer.remove_handler)
    assert callable(tether.sync.Peer.remove_handler)


def test_a_flood_of_bad_events_logs_a_bounded_number_of_lines(
    caplog: pytest.LogCaptureFixture,
) -> None:
    reg = Registry()
    reg.on("note", _int_listener)
    bad = Frame(5, 0, 0, "note", msgspec.msgpack.encode(["not an int"]))
    with caplog.at_level(logging.WARNING, logger="tether"):
        for _ in range(5000):
            assert reg.listeners(bad, "client") == []
    lines = [r for r in caplog.records if "dropped event" in r.getMessage()]
    assert 1 <= len(lines) <= 2 * Registry.WARNINGS_PER_SECOND


def _int_listener(call: object, n: int) -> None: ...


def test_an_event_no_listener_is_exposed_to_is_logged_rate_limited(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A page's send to a channel not open to pages is logged like a bad-argument event."""
    reg = Registry()
    reg.on("admin.shutdown", _int_listener)  # no roles: local peers only
    reg.on("audit", _int_listener, roles="admin")
    reg.on("audit", _int_listener, roles="ops")
    frame = Frame(5, 0, 0, "admin.shutdown", msgspec.msgpack.encode([]))
    audit = Frame(5, 0, 0, "audit", msgspec.msgpack.encode([1]))
    with caplog.at_level(logging.WARNING, logger="tether"):
        assert reg.listeners(frame, "web", local=False) == []
        assert reg.listeners(audit, "web", local=False) == []
        assert len(reg.listeners(audit, "ops", local=False)) == 1  # exposed: no warning
    lines = [r.getMessage() for r in caplog.records if "dropped event" in r.getMessage()]
    assert lines == [
        "dropped event on 'admin.shutdown' from role 'web': no listener is exposed to role 'web'"
        " (a listener without roles= hears local peers only)",
        "dropped event on 'audit' from role 'web': no listener is exposed to role 'web'",
    ]
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="tether"):
        for _ in range(5000):
            assert reg.listeners(frame, "web", local=False) == []
    lines = [r.getMessage() for r in caplog.records if "dropped event" in r.getMessage()]
    assert 1 <= len(lines) <= 2 * Registry.WARNINGS_PER_SECOND
