"""The adaptive polling policy (tether.polling), driven with made-up wait times: no clock."""

from __future__ import annotations

import itertools

import pytest

from tether import polling
from tether.polling import (
    BACKOFF_MAX,
    HIT_BOUND,
    WINDOW_MAX,
    WINDOW_MIN,
    SpinPolicy,
    check_spin,
    usable_cpus,
)

US = 1e-6


def chances(policy: SpinPolicy, n: int, waited: float | None) -> list[float]:
    """``n`` chances; each window granted ends as ``waited`` says (None: a miss)."""
    windows = []
    for _ in range(n):
        w = policy.window()
        windows.append(w)
        if w:
            policy.spun(waited if waited is None or waited <= w else None)
    return windows


def test_fast_answers_keep_polling_on_with_a_window_that_follows_them() -> None:
    p = SpinPolicy(cpus=2)
    assert p.window() == WINDOW_MAX  # the first chance is a probe as long as polling goes
    p.spun(10 * US)
    windows = chances(p, 100, 10 * US)
    assert all(windows)  # every chance polled
    assert (p.spins, p.hits) == (101, 101)
    assert windows[-1] == pytest.approx(max(WINDOW_MIN, polling.WINDOW_FACTOR * 10 * US))
    assert windows[-1] < WINDOW_MAX


def test_the_window_stays_within_its_bounds() -> None:
    fast = SpinPolicy(cpus=2)
    chances(fast, 50, 1 * US)
    assert fast.window() == WINDOW_MIN
    slowish = SpinPolicy(cpus=2)
    chances(slowish, 50, 90 * US)
    assert slowish.window() == WINDOW_MAX


def test_a_slow_handler_is_probed_ever_less_often() -> None:
    """10 ms answers never arrive within a window: the misses back off exponentially."""
    p = SpinPolicy(cpus=2)
    windows = chances(p, 2000, 10_000 * US)
    polled = [i for i, w in enumerate(windows) if w]
    gaps = [b - a for a, b in itertools.pairwise(polled)]
    # 1, 2, 4, ... chances apart, then one probe every 2**BACKOFF_MAX chances.
    assert gaps[:BACKOFF_MAX] == [1 << k for k in range(1, BACKOFF_MAX + 1)]
    assert set(gaps[BACKOFF_MAX:]) == {1 << BACKOFF_MAX}
    assert p.hits == 0
    assert p.spins == len(polled) < 2000 / (1 << BACKOFF_MAX) + BACKOFF_MAX + 1
    # What polling costs such a caller: at most one window in 256 answers of 10 ms.
    assert p.spins * WINDOW_MAX / (2000 * 10e-3) < 0.001


def test_a_hit_after_misses_turns_polling_back_on() -> None:
    p = SpinPolicy(cpus=2)
    chances(p, 300, None)  # the peer went quiet
    assert p.skip > 0 and p.hits == 0
    windows = chances(p, 1 << BACKOFF_MAX, 10 * US)  # ... and answers fast again
    assert p.hits >= 1  # the probe found it
    first = next(i for i, w in enumerate(windows) if w)
    assert all(windows[first:])  # and from then on every chance polls


def test_the_probe_after_a_miss_waits_longer() -> None:
    """A peer that slowed down (but within WINDOW_MAX) is caught again by a longer probe."""
    p = SpinPolicy(cpus=2)
    chances(p, 20, 10 * US)
    short = p.window()
    assert WINDOW_MIN < short < WINDOW_MAX / 2
    p.spun(None)  # 60 us answers now: past the short window
    while not (w := p.window()):
        pass
    assert w == min(WINDOW_MAX, 2 * short)
    p.spun(60 * US)
    assert p.misses == 0 and p.skip == 0


def test_a_long_quiet_spell_does_not_slow_the_recovery() -> None:
    """However many misses, the average stays bounded: one fast hit turns polling back on."""
    p = SpinPolicy(cpus=2)
    chances(p, 10, 10 * US)
    chances(p, 200_000, None)
    assert p.average <= WINDOW_MAX
    while not p.window():
        pass
    p.spun(10 * US)
    assert p.skip == 0 and p.window() > 0


def test_hits_that_average_past_the_bound_back_off() -> None:
    """Bytes caught only after ~HIT_BOUND or longer did not save enough to keep polling."""
    p = SpinPolicy(cpus=2)
    windows = chances(p, 200, HIT_BOUND * 1.5)
    assert p.hits == p.spins  # every poll caught its bytes...
    assert sum(1 for w in windows if w) < 20  # ... but polling backed off all the same


def test_spin_zero_never_polls_and_fixed_spin_always_polls_its_window() -> None:
    off = SpinPolicy(0, cpus=8)
    assert chances(off, 50, 1 * US) == [0.0] * 50
    assert off.spins == 0
    fixed = SpinPolicy(0.0005, cpus=8)
    assert chances(fixed, 50, None) == [0.0005] * 50  # misses change nothing
    assert chances(fixed, 5, HIT_BOUND * 3) == [0.0005] * 5


def test_one_cpu_never_polls() -> None:
    """The other side cannot run while this one polls: neither adaptive nor fixed polls."""
    for spin in (None, 0.0002):
        p = SpinPolicy(spin, cpus=1)
        assert chances(p, 20, 1 * US) == [0.0] * 20


def test_usable_cpus_reads_the_affinity_mask(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(polling.os, "sched_getaffinity", lambda pid: {3}, raising=False)
    assert usable_cpus() == 1
    assert SpinPolicy().off  # pinned to one CPU: polling off
    monkeypatch.setattr(polling.os, "sched_getaffinity", lambda pid: {0, 1}, raising=False)
    assert usable_cpus() == 2
    assert not SpinPolicy().off


@pytest.mark.parametrize(
    ("spin", "exc"),
    [("0.1", TypeError), (True, TypeError), (-1e-6, ValueError), (float("nan"), ValueError)],
)
def test_spin_is_checked(spin: object, exc: type[Exception]) -> None:
    with pytest.raises(exc, match="spin"):
        check_spin(spin)
    with pytest.raises(exc, match="spin"):
        SpinPolicy(spin)  # type: ignore[arg-type]


def test_solo_refuses_peers_taking_turns() -> None:
    """Two peers busy at once never poll (each would hold up the other); one alone does."""
    solo = polling.Solo()
    a, b = object(), object()
    assert solo.claim(a, 0.0)
    assert solo.claim(a, 0.0001)  # the same peer again
    t = 0.0002
    turns = []
    for _ in range(10):  # a and b alternate, closer together than SOLO_GAP
        turns += [solo.claim(b, t), solo.claim(a, t + 0.0001)]
        t += 0.0002
    assert turns == [False] * 20
    later = t + polling.SOLO_GAP
    assert solo.claim(b, later)  # b alone for a while: polls again
    assert solo.claim(b, later + 0.0001)


def test_repr_says_the_mode() -> None:
    assert "adaptive" in repr(SpinPolicy(cpus=2))
    assert "off" in repr(SpinPolicy(0, cpus=2))
    assert "fixed" in repr(SpinPolicy(0.001, cpus=2))
