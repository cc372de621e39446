"""The reserved channel ``tether.channels``: what a peer may call, with its types.

Main answers it for every peer, whatever its role, and lists only the channels
that peer may reach (the same check as a real invoke), so a peer learns
nothing about channels it could not call anyway. ``tether call --list`` uses
it. Users cannot register, remove or replace it: a reserved name raises
``ValueError`` at ``handle``/``on``.
"""

from __future__ import annotations

import inspect
import typing
from collections.abc import Callable
from typing import Any

import msgspec

from .registry import RESERVED_CHANNELS, Call, Handler, Registry

__all__ = ["CHANNELS", "RESERVED", "ChannelInfo", "describe", "install", "type_name"]

#: the introspection channel's name
CHANNELS = "tether.channels"
#: channel names users may not register
RESERVED = RESERVED_CHANNELS


class ChannelInfo(msgspec.Struct, omit_defaults=True):
    """One channel a peer may reach (one element of ``tether.channels``'s result).

    Attributes:
        channel: its name.
        kind: ``"invoke"`` (``handle``: answers) or ``"event"`` (``on``: listens).
        params: ``[name, type]`` of each argument after the call, in order;
            ``"Any"`` where the handler gives no hint; ``["*args", "Any"]``
            for a variadic handler.
        result: the result's type (invokes only; ``"Any"`` without a hint).
    """

    channel: str
    kind: str
    params: list[tuple[str, str]]
    result: str | None = None


class _Everyone(frozenset[str]):
    """A roles set every role is in (only for ``tether.channels``)."""

    def __contains__(self, role: object) -> bool:
        return True


def type_name(hint: Any) -> str:
    """A short, Python-looking name for a type hint: ``int``, ``list[str]``, ``bytes | None``."""
    if hint is inspect.Parameter.empty or hint is Any:
        return "Any"
    if hint is None or hint is type(None):
        return "None"
    if isinstance(hint, str):
        return hint
    if isinstance(hint, type) and not typing.get_args(hint):
        return hint.__qualname__
    text = repr(hint)
    for prefix in (
        "typing.",
        "collections.abc.",
        "numpy.",
        "tether.shm.",
        "tether.handles.",
        "tether.",
    ):
        text = text.replace(prefix, "")
    return text


def _signature(fn: Callable[..., Any], event: bool) -> tuple[list[tuple[str, str]], str | None]:
    try:
        hints = typing.get_type_hints(fn)
    except Exception:  # an unresolvable hint: show the annotations as written
        hints = dict(getattr(fn, "__annotations__", {}))
    try:
        params = list(inspect.signature(fn).parameters.values())[1:]  # skip the call
    except (TypeError, ValueError):
        return [("*args", "Any")], None if event else "Any"
    out: list[tuple[str, str]] = []
    for p in params:
        if p.kind is p.VAR_POSITIONAL:
            out.append((f"*{p.name}", type_name(hints.get(p.name, Any))))
        elif p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD):
            shown = type_name(hints.get(p.name, Any))
            if p.default is not p.empty:  # optional: say so, as Python writes it
                default = repr(p.default)
                shown += f" = {default if len(default) <= 40 else default[:37] + '...'}"
            out.append((p.name, shown))
    result = None if event else type_name(hints.get("return", Any))
    return out, result


def describe(registry: Registry, role: str, local: bool) -> list[ChannelInfo]:
    """The channels of ``registry`` a peer with ``role`` (and ``local``) may reach, by name."""
    out: list[ChannelInfo] = []
    for name, h in sorted(registry.invokes.items()):
        if name not in RESERVED and h.allows(role, local):
            params, result = _signature(h.fn, event=False)
            out.append(ChannelInfo(name, "invoke", params, result))
    for name, hs in sorted(registry.events.items()):
        for h in hs:
            if h.allows(role, local):
                params, _ = _signature(h.fn, event=True)
                out.append(ChannelInfo(name, "event", params))
                break  # one entry per channel: its first listener the peer reaches
    return out


def install(registry: Registry) -> None:
    """Answer ``tether.channels`` from ``registry``, for every role."""

    def channels(call: Call) -> list[ChannelInfo]:
        return describe(registry, call.peer.role, bool(call.peer.local))

    handler = Handler(channels, None)
    handler.roles = _Everyone()
    registry.invokes[CHANNELS] = handler
