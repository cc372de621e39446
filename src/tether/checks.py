"""Argument checks shared by the connecting functions: a mistake fails at the call.

``tether.connect`` and ``tether.sync.connect`` check their options here,
before any socket is opened, so ``timeout="5"`` or ``max_frame_size=0`` is a
``TypeError``/``ValueError`` naming the argument instead of a failure later
(or an error about something else, such as the address).
"""

from __future__ import annotations

from .wire import MIN_MAX_FRAME_SIZE

__all__ = ["check_connect_options", "check_count", "check_seconds"]


def check_seconds(name: str, value: object, *, zero: bool = False, none: bool = False) -> None:
    """A duration: a real number of seconds, positive (or zero if allowed; None if allowed)."""
    if value is None and none:
        return
    if not isinstance(value, int | float) or isinstance(value, bool):
        kind = "a number of seconds" + (" or None" if none else "")
        raise TypeError(f"{name} must be {kind}, not {type(value).__name__}")
    if not (value >= 0 if zero else value > 0):  # (NaN fails both)
        raise ValueError(f"{name} must be {'zero or more' if zero else 'positive'}, not {value}")


def check_count(name: str, value: object, *, least: int = 1, unit: str = "") -> None:
    """A limit: an int of at least ``least``."""
    if not isinstance(value, int) or isinstance(value, bool):
        raise TypeError(f"{name} must be an int, not {type(value).__name__}")
    if value < least:
        raise ValueError(f"{name} must be at least {least}{unit}, not {value}")


def check_connect_options(
    *,
    timeout: object,
    connect_timeout: object,
    max_frame_size: object,
    spin: object,
    max_inflight: object,
    max_queued: object = 1,
    drain_timeout: object = None,
) -> None:
    """Check the options ``connect`` takes (both APIs); raise naming the first wrong one.

    Raises:
        TypeError: an option has the wrong type.
        ValueError: an option has an impossible value (negative, NaN, zero,
            a frame limit below the protocol's floor).
    """
    check_seconds("timeout", timeout, none=True)
    check_seconds("connect_timeout", connect_timeout)
    check_count("max_frame_size", max_frame_size, least=MIN_MAX_FRAME_SIZE, unit=" bytes")
    check_seconds("spin", spin, zero=True, none=True)
    check_count("max_inflight", max_inflight)
    check_count("max_queued", max_queued)
    check_seconds("drain_timeout", drain_timeout, none=True)
