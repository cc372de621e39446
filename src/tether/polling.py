"""Adaptive polling: whether a peer polls its socket instead of sleeping, and for how long.

A process that sleeps in ``epoll``/``select`` takes 20-30 us to wake when the
other side's bytes arrive (more when the wake-up crosses CPUs): more than a
small round trip itself costs. Polling the socket for a short window instead
saves that wake-up, at the price of the CPU it burns; it pays only while the
next bytes are due soon. Like Linux's busy-poll sockets and glibc's adaptive
mutexes, :class:`SpinPolicy` learns per peer when that is:

* a peer asks :meth:`SpinPolicy.window` at each *chance* to poll -- the
  caller side right after it wrote an invoke whose answer it awaits, the
  serving side right after it answered a request (the next request may
  follow) -- and polls for the window it gets (0: sleep instead);
* it reports what happened with :meth:`SpinPolicy.spun`: bytes came after so
  many seconds (a *hit*), or the window ended first (a *miss*);
* a hit keeps polling on while the recent hit times average under
  :data:`HIT_BOUND` (bytes caught after longer did not save much: the peer
  was slow, or busy, or the CPUs are shared with other work), and the next
  window follows them (a few times their average, between :data:`WINDOW_MIN`
  and :data:`WINDOW_MAX`);
* each miss in a row (or hit that leaves the average above the bound)
  doubles how many chances pass without polling (up to
  ``2 ** BACKOFF_MAX - 1``); the next chance after them polls again as a
  probe, with a longer window (so a peer that slowed down within
  :data:`WINDOW_MAX` is caught again). A slow handler (10 ms per answer)
  so costs its caller one window in every 256 calls, and an idle connection
  has no chances at all.

Polling never happens with fewer than two usable CPUs (``os.sched_getaffinity``):
then the other side cannot run while this one polls. ``spin=0`` turns it off,
and ``spin=x`` (seconds) polls for a fixed ``x`` at every chance, learning
nothing: the low-latency mode of earlier versions.

No I/O here and no clock: the peers (:mod:`tether.aio.peer`,
:mod:`tether.sync.peer`) time the windows and report; tests drive it with
made-up times.
"""

from __future__ import annotations

import os
from typing import Final

from .checks import check_seconds

__all__ = [
    "BACKOFF_MAX",
    "HIT_BOUND",
    "WINDOW_MAX",
    "WINDOW_MIN",
    "Solo",
    "SpinPolicy",
    "check_spin",
    "usable_cpus",
]

#: the shortest adaptive window, in seconds
WINDOW_MIN: Final = 30e-6
#: the longest adaptive window: bytes due later than this are slept for
WINDOW_MAX: Final = 200e-6
#: a window is this many times the recent average hit time (within the bounds)
WINDOW_FACTOR: Final = 4.0
#: polling stays on only while the recent hit times average under this
HIT_BOUND: Final = 100e-6
#: misses in a row past which the chances skipped stop doubling (2**8 - 1 = 255)
BACKOFF_MAX: Final = 8
#: seconds within which another peer's poll means several peers of the process are busy
SOLO_GAP: Final = 0.001
#: weight of the newest hit time in the running average
_WEIGHT: Final = 0.25


class Solo:
    """Polls only while one peer of the process is busy: with more, each would hold up the rest.

    A peer polling its socket blocks its event loop, so another peer's answer
    (a second worker of a pool, say) waits until the window ends. Each poll
    asks :meth:`claim` first: refused while a different peer asked within
    :data:`SOLO_GAP` seconds, so peers taking turns never poll, and a peer
    busy on its own polls as its policy says.
    """

    __slots__ = ("at", "owner")

    def __init__(self) -> None:
        self.owner: object = None
        self.at = float("-inf")

    def claim(self, peer: object, now: float) -> bool:
        """May ``peer`` poll at ``now`` (seconds, any monotonic clock)?"""
        alone = self.owner is peer or now - self.at >= SOLO_GAP
        self.owner, self.at = peer, now
        return alone


def usable_cpus() -> int:
    """How many CPUs this process may run on (its affinity mask; else the machine's)."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not on Linux
        return os.cpu_count() or 1


def check_spin(spin: object) -> None:
    """``spin`` is ``None`` (adaptive), 0 (off) or a fixed window in seconds.

    Raises:
        TypeError: not a number or None.
        ValueError: negative or NaN.
    """
    check_seconds("spin", spin, zero=True, none=True)


class SpinPolicy:
    """One peer's polling decisions for one kind of wait (answers, or the next request).

    ``spin``: ``None`` adapts (see the module), 0 never polls, a positive
    number polls for that many seconds at every chance. ``cpus``: how many
    CPUs the process may use (:func:`usable_cpus` when not given); with fewer
    than 2 it never polls, whatever ``spin`` says.

    Counters, for tests and curious users: ``spins`` windows polled, ``hits``
    of them that saw bytes arrive.
    """

    __slots__ = ("average", "fixed", "hits", "misses", "off", "skip", "spins")

    def __init__(self, spin: float | None = None, *, cpus: int | None = None) -> None:
        check_spin(spin)
        if cpus is None:
            cpus = usable_cpus()
        #: polling is off for good: ``spin=0``, or fewer than 2 usable CPUs
        self.off = spin == 0 or cpus < 2
        #: the fixed window (``spin=x``), or 0.0 when adaptive
        self.fixed = float(spin) if spin else 0.0
        #: running average of recent hit times (seconds); 0.0 before the first hit
        self.average = 0.0
        #: misses in a row (the backoff's exponent, up to BACKOFF_MAX)
        self.misses = 0
        #: chances still to pass without polling
        self.skip = 0
        self.spins = 0
        self.hits = 0

    def window(self) -> float:
        """A chance to poll: how many seconds to poll now (0.0: sleep instead).

        Counts the chance: a backing-off policy returns 0.0 for the chances
        it skips, then a probe's window.
        """
        if self.off:
            return 0.0
        if self.fixed:
            return self.fixed
        if self.skip:
            self.skip -= 1
            return 0.0
        if not self.average:
            return WINDOW_MAX  # first probe: as long as polling may ever last
        return min(WINDOW_MAX, max(WINDOW_MIN, WINDOW_FACTOR * self.average))

    def spun(self, waited: float | None) -> None:
        """The window from :meth:`window` ended: bytes came after ``waited`` seconds, or None."""
        self.spins += 1
        if waited is not None:
            self.hits += 1
            avg = self.average
            self.average = avg = waited if not avg else avg + _WEIGHT * (waited - avg)
            if avg <= HIT_BOUND:
                self.misses = self.skip = 0
                return
        elif self.average:
            # The probe after the skips waits longer, up to WINDOW_MAX (and one fast hit
            # brings the average back under the bound).
            self.average = min(2 * self.average, WINDOW_MAX / WINDOW_FACTOR)
        if self.misses < BACKOFF_MAX:
            self.misses += 1
        self.skip = (1 << self.misses) - 1

    def __repr__(self) -> str:
        mode = "off" if self.off else f"fixed {self.fixed:g} s" if self.fixed else "adaptive"
        return f"<SpinPolicy {mode}: {self.hits}/{self.spins} hits, skip {self.skip}>"
